"""Training data: per-case sampling, patch extraction, batch sources and augmentation.

Modules (import them directly; this package imports nothing so the CLI stays fast):

- ``sampling``: per-case probabilities ∝ n_dataset^(-exponent), foreground oversampling,
  5-fold splits, rank/worker partitioning.
- ``patches``: crop boxes with padding and chunk-aware patch reads.
- ``batch``: the ``Batch`` dataclass, normalisation and collation.
- ``sources``: ``ZarrPatchSource`` (random access) and ``WebDatasetPatchSource`` (streaming).
- ``augment``: batch augmentation.
"""
