"""Plain-PyTorch port of the official PriMaPs / PriMaPs-EM code (github visinf/primaps).

The oracle for tests and the baseline for benchmarks: it follows the official code step by step
(per-image Python loops included), with only the deliberate differences listed in docs/design.md.
Slow is fine here; faithful and simple is the point. One module per op (``reference/<op>.py``), plus
``em.py`` for the training step and the PCA / k-means initialisation.

It is a leaf: it imports ``primaps_fast.common`` and nothing else from the package, so it checks the
fast paths independently, and no production module imports it (``backend="reference"`` resolves it by
name in ``primaps_fast._dispatch.reference``).

The names are imported here eagerly, not lazily: each op's module has the op's name, and importing a
submodule sets the package attribute of that name to the module; binding the function here, after
all submodules are imported, keeps ``primaps_fast.reference.<op>`` the function. The modules import
only torch, so this costs little.
"""
from primaps_fast.reference.principal_masks import principal_masks
from primaps_fast.reference.median_filter import median_filter
from primaps_fast.reference.dense_crf import dense_crf, dense_crf_list
from primaps_fast.reference.pseudo_labels import pseudo_labels
from primaps_fast.reference.assign_pseudo_labels import assign_pseudo_labels
from primaps_fast.reference.focal_loss import focal_loss
from primaps_fast.reference.em import PriMaPsEM, kmeans_prototypes, pca_prototypes

__all__ = ["PriMaPsEM", "assign_pseudo_labels", "dense_crf", "dense_crf_list", "focal_loss", "kmeans_prototypes",
           "median_filter", "pca_prototypes", "principal_masks", "pseudo_labels"]
