"""primaps_fast: fast PriMaPs-EM for unsupervised semantic segmentation (the API of docs/api.md).

Names resolve lazily, so ``import primaps_fast`` stays cheap (no Triton, no timm) until an op is used.
"""
from primaps_fast._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "principal_masks": "primaps_fast.ops.principal_masks",
    "PrincipalMasks": "primaps_fast.ops.principal_masks",
    "median_filter": "primaps_fast.ops.median_filter",
    "dense_crf": "primaps_fast.ops.dense_crf",
    "dense_crf_list": "primaps_fast.ops.dense_crf",
    "pseudo_labels": "primaps_fast.ops.pseudo_labels",
    "assign_pseudo_labels": "primaps_fast.ops.assign_pseudo_labels",
    "focal_loss": "primaps_fast.ops.focal_loss",
    "PriMaPsEM": "primaps_fast.em",
    "UnsupervisedMetrics": "primaps_fast.metrics",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__():
    return sorted(list(globals()) + __all__)
