"""Plain-PyTorch port of the official PriMaPs / PriMaPs-EM code (github visinf/primaps).

The oracle for tests and the baseline for benchmarks: it follows the official code step by step
(per-image Python loops included), with only the deliberate differences of DESIGN.md section 2.
Slow is fine here; faithful and simple is the point. Names resolve lazily to their stage module.
"""
from primaps_fast._lazy import lazy_getattr

_EXPORTS = {
    "principal_masks": "primaps_fast.reference.primaps",
    "median_filter": "primaps_fast.reference.primaps",
    "dense_crf": "primaps_fast.reference.crf",
    "pseudo_labels": "primaps_fast.reference.primaps",
    "assign_pseudo_labels": "primaps_fast.reference.train",
    "focal_loss": "primaps_fast.reference.train",
    "PriMaPsEM": "primaps_fast.reference.em",
    "pca_prototypes": "primaps_fast.reference.em",
    "kmeans_prototypes": "primaps_fast.reference.em",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
