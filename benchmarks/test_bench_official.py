"""primaps_fast.official against the official flow with pydensecrf, on 4 synthetic 320x320 scenes.

* PriMaPs pseudo labels (``PriMaPs(...)(pool, imgs, feats, zeros)``, what ``train.py --precomp-primaps``
  runs): the official per-image flow (reference proposals with ``pca_lowrank``, median filter,
  background, pydensecrf on the BGR image) one image at a time, the same flow over a process pool as the
  official code runs it (``pool.map``, one worker per thread of this process), and ``official.PriMaPs``.
* CRF evaluation (``batched_crf(pool, img, log_softmax(logits))`` of ``test.py``, 27 classes at full
  resolution): pydensecrf per image, the same over the pool, and ``official.batched_crf``.

Providers "official" and "official_pool" need pydensecrf2 and are skipped without it.
"""
import importlib.util
import multiprocessing

import pytest
import torch
import torch.nn.functional as F

from primaps_fast import official, reference
from primaps_fast.common import IMAGENET_MEAN, IMAGENET_STD
from primaps_fast.data.synthetic import make_scenes
from primaps_fast.reference.official_crf import official_dense_crf_pydensecrf
from side_by_side import time_side_by_side

B, SIZE, CLASSES, IGNORE = 4, 320, 27, 27
HAS_PYDENSECRF = importlib.util.find_spec("pydensecrf") is not None
PROVIDERS = [pytest.param(p, marks=pytest.mark.skipif(not HAS_PYDENSECRF, reason="pydensecrf2 not installed"))
             for p in ("official", "official_pool")] + ["fast"]


def official_pseudo_one(args):
    """The official ``_get_pseudo(img, feat, zeros)`` flow: reference proposals (``pca_lowrank``), median
    filter, x10, background, log-softmax, pydensecrf, arg-max, background -> ignore id (float labels)."""
    img, feat = args
    props = reference.principal_masks(feat[None], threshold=0.4)
    p = (reference.median_filter(props.masks[0, : int(props.counts[0])]) * 10).clamp(0, 1)
    bg = (p[p != 0].mean() - p.sum(0)).clamp(0, 1)
    q = official_dense_crf_pydensecrf(img, torch.log_softmax(torch.cat([bg[None], p]), 0))
    labels = torch.from_numpy(q.argmax(0)).float()
    labels[labels == 0] = IGNORE
    return labels


def official_crf_one(args):
    return official_dense_crf_pydensecrf(*args)


@pytest.fixture(scope="module")
def inputs():
    sc = make_scenes(B, image_size=SIZE, dim=384, seed=0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    imgs = (sc.images.float() / 255 - mean) / std
    # smooth class scores at feature resolution, upsampled as the official head's input is
    g = torch.Generator().manual_seed(0)
    scores = F.avg_pool2d(F.pad(torch.randn(B, CLASSES, 40, 40, generator=g) * 2, (1, 1, 1, 1), mode="replicate"), 3, 1)
    soft = torch.log_softmax(F.interpolate(scores * 3, size=(SIZE, SIZE), mode="bilinear", align_corners=False), 1)
    return imgs, sc.features, soft


@pytest.fixture(scope="module")
def pool():
    """A process pool as the official scripts create it (forkserver, once, outside the timed calls)."""
    with multiprocessing.get_context("forkserver").Pool(torch.get_num_threads()) as p:
        yield p


def _pseudo(provider, pool, imgs, feats):
    if provider == "fast":
        return official.PriMaPs(threshold=0.4, ignore_id=IGNORE)(None, imgs, feats, torch.zeros_like(feats))
    pairs = list(zip(imgs, feats))
    return torch.stack(pool.map(official_pseudo_one, pairs) if provider == "official_pool"
                       else [official_pseudo_one(x) for x in pairs])


def _crf(provider, pool, imgs, soft):
    if provider == "fast":
        return official.batched_crf(None, imgs, soft)
    pairs = list(zip(imgs, soft))
    out = pool.map(official_crf_one, pairs) if provider == "official_pool" else [official_crf_one(x) for x in pairs]
    return torch.stack([torch.from_numpy(q) for q in out])


@pytest.fixture(scope="module")
def want(inputs):
    """Labels of the official flow (serial), the correctness check before every timing."""
    if not HAS_PYDENSECRF:
        return None
    imgs, feats, soft = inputs
    return _pseudo("official", None, imgs, feats), _crf("official", None, imgs, soft).argmax(1)


@pytest.mark.benchmark(group=f"official PriMaPs pseudo labels {B}x{SIZE}x{SIZE}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_official_primaps(benchmark, request, inputs, want, provider):
    pool = request.getfixturevalue("pool") if provider == "official_pool" else None
    imgs, feats, _ = inputs
    if want is not None:
        assert (_pseudo(provider, pool, imgs, feats) == want[0]).float().mean() >= 0.99
    time_side_by_side(benchmark, lambda: _pseudo(provider, pool, imgs, feats), case="official_primaps",
                      provider=provider, per=B, baseline="official", rounds=1 if provider != "fast" else 3)


@pytest.mark.benchmark(group=f"official batched_crf {B}x{SIZE}x{SIZE}, {CLASSES} labels")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_official_batched_crf(benchmark, request, inputs, want, provider):
    pool = request.getfixturevalue("pool") if provider == "official_pool" else None
    imgs, _, soft = inputs
    if want is not None:
        assert (_crf(provider, pool, imgs, soft).argmax(1) == want[1]).float().mean() >= 0.995
    time_side_by_side(benchmark, lambda: _crf(provider, pool, imgs, soft), case="official_crf",
                      provider=provider, per=B, baseline="official", rounds=1 if provider != "fast" else 3)
