"""Several processes: ``distributed`` (the active-gradient reducer that replaces DDP under layer switching, replica
checks, collectives), ``fsdp`` (FSDP2 sharding), ``sharded`` (GaLore on DTensor shards), ``deepspeed_config``
(reading a DeepSpeed config's stage and precision)."""
