"""primaps_fast: fast PriMaPs-EM for unsupervised semantic segmentation (the API of shared/API.md).

Names resolve lazily, so ``import primaps_fast`` stays cheap (no Triton, no timm) until an op is used.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "principal_masks": "primaps_fast.ops.principal_masks",
    "PrincipalMasks": "primaps_fast.ops.principal_masks",
    "median_filter": "primaps_fast.ops.median_filter",
    "dense_crf": "primaps_fast.ops.dense_crf",
    "pseudo_labels": "primaps_fast.ops.pseudo_labels",
    "assign_pseudo_labels": "primaps_fast.ops.assign_pseudo_labels",
    "focal_loss": "primaps_fast.ops.focal_loss",
    "PriMaPsEM": "primaps_fast.em",
    "UnsupervisedMetrics": "primaps_fast.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'primaps_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
