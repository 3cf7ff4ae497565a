"""The feature stage per image on the CPU, next to the pseudo-label pipeline on the same images, so that
the README can say which stage bounds a whole run: ``compute_features`` from JPEG files (decoding,
resize + centre crop to 320, ``dino_vits8`` forward at fp32 or bf16 autocast, float16 cache rows written
and synced) against ``pseudo_labels`` with the dense CRF (C++ backend) on those features.

Random weights (the timing does not depend on them). The GPU rows (batch 32 and 128, images/s) are in
``benchmarks/gpu_check.py``."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import primaps_fast
from primaps_fast.backbones import Backbone
from primaps_fast.data.cache import compute_features
from primaps_fast.data.datasets import build_dataset
from primaps_fast.data.synthetic import make_scenes
from primaps_fast.data.transforms import unnormalize

N = 2  # images per call


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """N synthetic 480x640 scenes as JPEG files (decoded and resized by the stage)."""
    root = tmp_path_factory.mktemp("jpegs")
    scenes = make_scenes(N, image_size=(480, 640), seed=0)
    for i, im in enumerate(scenes.images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(root / f"{i}.jpg", quality=90)
    return build_dataset(root, size=320)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root, counter = tmp_path_factory.mktemp("caches"), itertools.count()
    return lambda: root / str(next(counter))


@pytest.mark.benchmark(group="feature stage vs pseudo labels, per image (CPU)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_feature_stage(benchmark, jpegs, outputs, precision):
    backbone = Backbone("dino_vits8", "random", precision=precision)
    cache = benchmark.pedantic(lambda: compute_features(jpegs, backbone, outputs(), batch_size=N,
                                                        show_progress=False), rounds=3, iterations=1)
    assert cache.complete and cache.feature_shape == (384, 40, 40)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_image"] = benchmark.stats.stats.median / N * 1e3


@pytest.mark.benchmark(group="feature stage vs pseudo labels, per image (CPU)")
def test_pseudo_label_stage(benchmark, jpegs, outputs):
    """The next stage on the same images: ``pseudo_labels`` with the CRF from the cached features."""
    cache = compute_features(jpegs, Backbone("dino_vits8", "random"), outputs(), batch_size=N,
                             show_progress=False)
    feats = cache.get_features(range(N))
    images = unnormalize(torch.stack([jpegs[i][0] for i in range(N)]))
    labels = benchmark.pedantic(lambda: primaps_fast.pseudo_labels(images, feats), rounds=3, iterations=1)
    assert labels.shape == (N, 320, 320) and np.isin(labels.unique().numpy(), np.r_[1:256]).all()
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_image"] = benchmark.stats.stats.median / N * 1e3
