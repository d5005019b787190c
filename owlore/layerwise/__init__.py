"""Layer-wise training: which decoder layers train, when, and how the Trainer is told.

``outliers`` (OWL's layer-wise outlier distribution, arXiv 2310.05175) and ``calibration`` (the batches it is
measured on, cached) give each layer a score; ``sampler`` turns scores into draws of γ layers every K steps (OwLore,
LISA, BAdam's blocks); ``layers`` finds the decoder layers and freezes the rest; ``callback`` switches them inside a
stock ``transformers.Trainer``; ``checkpointing`` keeps gradient checkpointing right under switching; ``plotting``
draws the per-layer ratios, probabilities and counts.
"""
