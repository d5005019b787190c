"""A run's configuration and its life on disk.

``config`` (the sections as dataclasses) and ``recipe`` (YAML loading, overrides, every check before weights load),
``typecheck`` (values read against field types), ``sources`` (model paths checked), ``output_dir`` (one directory,
one run), ``resume`` (checkpoint manifests, verified resumes), ``interrupt`` (Ctrl-C / SIGTERM at a checkpoint),
``fileio`` (atomic writes), ``metrics`` (step time, peak memory, TensorBoard scalars).
The runtime layers (``owlore.optim``, ``owlore.layerwise``, ``owlore.parallel``) never import ``recipe``: they
receive the config objects.
"""
