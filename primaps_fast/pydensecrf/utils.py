"""pydensecrf's ``pydensecrf.utils`` in numpy: unaries from probabilities or labels and the feature
arrays of Gaussian and bilateral kernels of any dimension, with pydensecrf's results (same dtypes and
float32 arithmetic)."""
from __future__ import annotations

import logging
from numbers import Number

import numpy as np


def unary_from_labels(labels, n_labels, gt_prob, zero_unsure=True):
    """float32 ``(n_labels, labels.size)`` unary of a label map: ``-log(gt_prob)`` for the given label,
    ``-log((1 - gt_prob) / (n_labels - 1))`` for the others. With ``zero_unsure`` label 0 means
    "unknown" (uniform ``-log(1 / n_labels)``) and label ``k >= 1`` is row ``k - 1``; otherwise label
    ``k`` is row ``k``. ``gt_prob`` must lie in (0, 1) (``AssertionError`` otherwise, as pydensecrf)."""
    assert 0 < gt_prob < 1, "`gt_prob must be in (0,1)."
    flat = np.asarray(labels).reshape(-1)
    rows = flat - 1 if zero_unsure else flat
    unary = np.full((n_labels, flat.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    unary[rows, np.arange(flat.size)] = -np.log(gt_prob)
    if zero_unsure:
        unary[:, flat == 0] = -np.log(1.0 / n_labels)
    return unary


def compute_unary(labels, M, GT_PROB=0.5):
    """Deprecated alias of :func:`unary_from_labels` (logs a warning, as pydensecrf)."""
    logging.warning("pydensecrf.compute_unary is deprecated, use unary_from_labels instead.")
    return unary_from_labels(labels, M, GT_PROB)


def unary_from_softmax(sm, scale=None, clip=1e-5):
    """float32 ``(C, prod(rest))`` unary ``-log(p)`` of probabilities ``sm`` ``(C, ...)``: with ``scale``
    in (0, 1] the probabilities are first mixed with the uniform one, ``scale * p + (1 - scale) / C``
    (in float64); with ``clip`` they are clipped to ``[clip, 1]`` in their own dtype."""
    n = sm.shape[0]
    if scale is not None:
        assert 0 < scale <= 1, "`scale` needs to be in (0,1]"
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / n)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([n, -1]).astype(np.float32)


def softmax_to_unary(sm, GT_PROB=1):
    """Deprecated: :func:`unary_from_softmax` with ``scale=GT_PROB`` (none for 1) and no clip (logs a
    warning, as pydensecrf)."""
    logging.warning("pydensecrf.softmax_to_unary is deprecated, use unary_from_softmax instead.")
    return unary_from_softmax(sm, None if GT_PROB == 1 else GT_PROB, clip=None)


def _grid(shape, sdims) -> np.ndarray:
    """float32 ``(len(shape), *shape)``: the index of each axis (``ij`` order) divided by its ``sdims``."""
    mesh = np.array(np.meshgrid(*[range(s) for s in shape], indexing="ij"), dtype=np.float32)
    for axis, s in enumerate(sdims):
        mesh[axis] /= s
    return mesh


def create_pairwise_gaussian(sdims, shape):
    """float32 ``(len(sdims), prod(shape))`` features of a Gaussian kernel over a grid of any dimension:
    the coordinates along each axis divided by its ``sdims`` (for 2-D, ``addPairwiseGaussian``'s with
    the axes in ``(y, x)`` order)."""
    return _grid(shape, sdims).reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim=-1):
    """float32 ``(len(sdims) + channels, pixels)`` features of a bilateral kernel: the grid coordinates
    divided by ``sdims``, then the image's channels divided by ``schan`` (a number for all channels, or
    one per channel). ``chdim`` is the channel axis of ``img``, -1 when it has none (one channel)."""
    chans = img[np.newaxis].astype(np.float32) if chdim == -1 else np.rollaxis(img, chdim).astype(np.float32)
    if isinstance(schan, Number):
        chans /= schan
    else:
        for c, s in enumerate(schan):
            chans[c] /= s
    feats = np.concatenate([_grid(chans.shape[1:], sdims), chans])
    return feats.reshape([feats.shape[0], -1])
