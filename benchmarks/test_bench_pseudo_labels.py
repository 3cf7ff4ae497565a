"""pseudo_labels end to end: reference (per-image official pipeline) vs C++ on 8 synthetic 320x320 scenes
(384 x 40 x 40 features), with and without the dense CRF, plus the post-processing stage alone."""
import importlib.util

import pytest
import torch

import primaps_fast
from primaps_fast import reference
from primaps_fast.data.synthetic import make_scenes
from side_by_side import PROVIDERS, time_side_by_side



@pytest.fixture(scope="module")
def scenes():
    return make_scenes(8, image_size=320, dim=384)


@pytest.fixture(scope="module")
def want_no_crf(scenes):
    return reference.pseudo_labels(scenes.images, scenes.features, crf=False)


@pytest.fixture(scope="module")
def want_crf(scenes):
    return reference.pseudo_labels(scenes.images, scenes.features)


def _inputs(scenes, provider):
    if provider == "triton":
        return scenes.images.cuda(), scenes.features.cuda()
    return scenes.images, scenes.features


@pytest.mark.benchmark(group="pseudo_labels crf=False 8x320x320")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pseudo_labels_no_crf(benchmark, scenes, want_no_crf, provider):
    images, feats = _inputs(scenes, provider)
    if provider != "reference":
        got = primaps_fast.pseudo_labels(images, feats, crf=False, backend=provider).cpu()
        assert (got == want_no_crf).float().mean() >= 0.999
    fn = lambda: primaps_fast.pseudo_labels(images, feats, crf=False, backend=provider)  # noqa: E731
    time_side_by_side(benchmark, fn, case="no_crf", provider=provider, per=8,
                      rounds=2 if provider == "reference" else 5)


@pytest.mark.benchmark(group="pseudo_labels crf=True 8x320x320")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pseudo_labels_crf(benchmark, scenes, want_crf, provider):
    images, feats = _inputs(scenes, provider)
    if provider != "reference":
        got = primaps_fast.pseudo_labels(images, feats, backend=provider).cpu()
        assert (got == want_crf).float().mean() >= 0.99
    fn = lambda: primaps_fast.pseudo_labels(images, feats, backend=provider)  # noqa: E731
    time_side_by_side(benchmark, fn, case="crf", provider=provider, per=8,
                      rounds=1 if provider == "reference" else 3)


def official_pipeline(images, features):
    """The official per-image flow with pydensecrf (github visinf/primaps ``_get_pseudo`` + ``crf.py``):
    reference proposals and post-processing, then pydensecrf on the BGR image, arg-max."""
    import torch.nn.functional as F

    from primaps_fast.common import crf_image
    from primaps_fast.reference.official_crf import pydensecrf_marginals
    from primaps_fast.reference.principal_masks import proposals_one
    from primaps_fast.reference.pseudo_labels import mask_logits

    out = []
    for img, feat in zip(images, features):
        props = proposals_one(feat, 0.4, 0.95, None)
        logits = mask_logits(torch.stack(props))
        H, W = img.shape[-2:]
        up = F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        lab = pydensecrf_marginals(crf_image(img).flip(0), F.softmax(up, dim=0)).argmax(0)
        lab[lab == 0] = 255
        out.append(lab)
    return torch.stack(out)


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 not installed")
@pytest.mark.benchmark(group="pseudo_labels crf=True 8x320x320")
def test_pseudo_labels_crf_official_pydensecrf(benchmark, scenes, want_crf):
    """Baseline: the official flow with pydensecrf (what PriMaPs runs), next to reference and cpu."""
    result = {}

    def fn():
        result["labels"] = official_pipeline(scenes.images, scenes.features)

    time_side_by_side(benchmark, fn, case="crf", provider="official", per=8, rounds=1)
    assert (result["labels"] == want_crf).float().mean() >= 0.99


@pytest.fixture(scope="module")
def scene_folder(scenes, tmp_path_factory):
    """The scenes as a folder dataset of PNG files, with their synthetic features in a feature cache."""
    from primaps_fast import fileio
    from primaps_fast.data.cache import store_features
    from primaps_fast.data.datasets import FolderDataset

    root = tmp_path_factory.mktemp("scene_folder")
    for i, im in enumerate(scenes.images):
        fileio.write_png(root / "images" / f"scene{i:04d}.png", im.permute(1, 2, 0).numpy())
    ds = FolderDataset(root / "images", size=scenes.images.shape[-1])
    cache = store_features(ds, scenes.features, root / "cache", backbone="synthetic", weights="synthetic")
    return ds, cache, root


@pytest.mark.benchmark(group="pseudo-label folder 8x320x320 (load images, pseudo_labels + CRF, write PNGs)")
@pytest.mark.parametrize("provider", ["reference", "cpu"])
def test_pseudo_label_folder(benchmark, scene_folder, want_crf, provider):
    """A dataset end to end: ``generate_pseudo_labels`` from the feature cache, each round into a new folder."""
    import numpy as np
    from PIL import Image

    from primaps_fast.pseudo_gen import generate_pseudo_labels

    ds, cache, root = scene_folder
    runs = []

    def fn():
        out = root / f"pseudo_{provider}_{len(runs)}"
        runs.append(out)
        generate_pseudo_labels(ds, out, cache=cache, backend=provider, batch_size=8, show_progress=False)

    time_side_by_side(benchmark, fn, case="folder", provider=provider, per=len(ds), rounds=1, warmup_rounds=0)
    got = torch.stack([torch.from_numpy(np.array(Image.open(runs[-1] / "pseudos" / f"{n}.png")).astype(np.int64))
                       for n in ds.names])
    # the PNG images round-trip through ImageNet normalisation: within one grey level of the scenes
    assert (got == want_crf).float().mean() >= 0.99
