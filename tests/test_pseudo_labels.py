"""pseudo_labels: the batched pipeline against the per-image reference (official _get_pseudo).

With crf=False the labels must be identical except where the reference's two best upsampled
log-probabilities are within 1e-5 (documented ties: exp/log rounding and the randomized pca_lowrank of
the reference move values by ~1e-7). With the CRF, at least 99% of the pixels must agree.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import primaps_fast
from primaps_fast import reference
from primaps_fast._dispatch import kernel, triton_available
from primaps_fast.data.synthetic import make_scenes
from primaps_fast.common import IMAGENET_MEAN, IMAGENET_STD, crf_image
from primaps_fast.reference.pseudo_labels import mask_logits

from cuda_backend import GPU_BACKENDS, requires_cuda_backend, requires_triton_gpu

HAS_CRF = importlib.util.find_spec("primaps_fast.ops.dense_crf") is not None
requires_crf = pytest.mark.skipif(not HAS_CRF, reason="primaps_fast.ops.dense_crf not available")


def reference_margin(features, size, threshold=0.4):
    """Gap between the best and second-best upsampled log-probability of the reference, (B, H, W)."""
    pm = reference.principal_masks(features, threshold=threshold)
    gaps = []
    for b, n in enumerate(pm.counts.tolist()):
        logits = mask_logits(pm.masks[b, :n]) if n else torch.zeros(1, *features.shape[-2:])
        up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        if up.shape[0] == 1:
            gaps.append(torch.full(size, float("inf")))
        else:
            top = up.topk(2, dim=0).values
            gaps.append(top[0] - top[1])
    return torch.stack(gaps)


def assert_labels_match(got, want, features):
    assert got.dtype == torch.int64 and got.shape == want.shape
    differ = got != want
    if differ.any():
        margin = reference_margin(features, tuple(want.shape[-2:]))
        assert (margin[differ] < 1e-5).all(), f"{int(differ.sum())} labels differ away from ties"


def normalize(images_uint8):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


@pytest.mark.parametrize("size,patch,B", [(64, 8, 3), ((40, 56), 8, 2), ((27, 21), 3, 1)])
def test_no_crf_matches_reference(size, patch, B):
    sc = make_scenes(B, image_size=size, patch=patch, dim=48, seed=B)
    got = primaps_fast.pseudo_labels(sc.images, sc.features, crf=False, backend="cpu")
    want = reference.pseudo_labels(sc.images, sc.features, crf=False)
    assert_labels_match(got, want, sc.features)
    # images with different counts keep their own label count; background is ignore_index
    counts = primaps_fast.principal_masks(sc.features).counts
    for b in range(B):
        ids = got[b].unique()
        assert set(ids.tolist()) <= set(range(1, int(counts[b]) + 1)) | {255}


def test_edge_cases_no_crf(rng):
    # one proposal: constant features (the official squeeze() bug: background sums over masks here)
    feats = torch.randn(5, 1, 1, generator=rng).expand(5, 3, 4)[None].contiguous()
    img = torch.randint(0, 256, (1, 3, 6, 8), dtype=torch.uint8, generator=rng)
    got = primaps_fast.pseudo_labels(img, feats, crf=False, backend="cpu")
    assert torch.equal(got, reference.pseudo_labels(img, feats, crf=False))
    assert set(got.unique().tolist()) <= {1, 255}
    # 1x1 feature map, odd image size; all-zero features (no proposal: everything ignored)
    for f in (torch.randn(2, 7, 1, 1, generator=rng), torch.zeros(2, 7, 1, 1)):
        img = torch.randint(0, 256, (2, 3, 5, 3), dtype=torch.uint8, generator=rng)
        got = primaps_fast.pseudo_labels(img, f, crf=False, ignore_index=-1, backend="cpu")
        assert torch.equal(got, reference.pseudo_labels(img, f, crf=False, ignore_index=-1))
    assert (got == -1).all()
    # ignore_index=0 keeps the background id
    sc = make_scenes(1, image_size=32, dim=16, seed=3)
    got = primaps_fast.pseudo_labels(sc.images, sc.features, crf=False, ignore_index=0, backend="cpu")
    want = primaps_fast.pseudo_labels(sc.images, sc.features, crf=False, backend="cpu")
    assert torch.equal(got, torch.where(want == 255, 0, want))


@pytest.mark.interpreter
def test_triton_no_crf_matches_reference():
    if not triton_available():
        pytest.skip("triton not available")
    sc = make_scenes(2, image_size=(24, 16), patch=4, dim=8, seed=5)
    got = primaps_fast.pseudo_labels(sc.images, sc.features, crf=False, backend="triton")
    want = reference.pseudo_labels(sc.images, sc.features, crf=False)
    assert_labels_match(got, want, sc.features)


def test_crf_images_clamp_and_bgr():
    img = torch.zeros(1, 3, 2, 2)
    img[0, 0] = 10.0  # far above 1 after un-normalising: clamped to 255, not wrapped
    img[0, 2] = -10.0  # clamped to 0
    from primaps_fast.ops.pseudo_labels import crf_images

    bgr = crf_images(img)
    assert bgr.dtype == torch.uint8
    assert (bgr[0, 2] == 255).all() and (bgr[0, 0] == 0).all()  # R last, B first
    assert (bgr[0, 1] == int(IMAGENET_MEAN[1] * 255)).all()  # truncation: 116.28 -> 116
    u8 = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(crf_images(u8), u8.flip(1)) and torch.equal(crf_image(u8[0]), u8[0])
    # a normalised uint8 image round-trips to within one grey level
    assert (crf_images(normalize(u8)).int() - u8.flip(1).int()).abs().max() <= 1


def test_crf_wiring_with_identity_crf(monkeypatch):
    """The CRF path hands dense_crf_list the BGR uint8 images and, per image, its own (L_b, H, W)
    probabilities summing to 1; with a CRF that returns its input, the labels equal crf=False."""
    import sys
    import types

    seen = {}

    def identity_crf(images, probs, *, iterations, backend=None, **kwargs):
        seen["images"], seen["probs"], seen["iterations"] = images, probs, iterations
        return [p.clone() for p in probs]

    module = sys.modules.get("primaps_fast.ops.dense_crf")
    if module is None:
        module = types.ModuleType("primaps_fast.ops.dense_crf")
        monkeypatch.setitem(sys.modules, "primaps_fast.ops.dense_crf", module)
    monkeypatch.setattr(module, "dense_crf_list", identity_crf, raising=False)
    sc = make_scenes(3, image_size=48, dim=24, seed=7)
    feats = sc.features.clone()
    feats[2] = 0.0  # an image without proposals: background only
    got = primaps_fast.pseudo_labels(sc.images, feats, crf_iterations=3, backend="cpu")
    assert torch.equal(got, primaps_fast.pseudo_labels(sc.images, feats, crf=False, backend="cpu"))
    counts = primaps_fast.principal_masks(feats).counts
    assert seen["iterations"] == 3 and torch.equal(seen["images"], sc.images.flip(1))
    assert [p.shape[0] for p in seen["probs"]] == (counts + 1).tolist()
    for p in seen["probs"]:
        assert p.dtype == torch.float32 and p.shape[1:] == (48, 48)
        torch.testing.assert_close(p.sum(0), torch.ones(48, 48))


@requires_crf
@pytest.mark.parametrize("float_images", [False, True])
def test_crf_matches_reference(float_images):
    sc = make_scenes(2, image_size=64, dim=32, seed=11)
    images = normalize(sc.images) if float_images else sc.images
    got = primaps_fast.pseudo_labels(images, sc.features, crf_iterations=5, backend="cpu")
    want = reference.pseudo_labels(images, sc.features, crf_iterations=5)
    assert (got == want).float().mean() >= 0.99


@requires_crf
def test_crf_edge_cases(rng):
    img = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)  # constant image
    feats = torch.zeros(1, 8, 2, 2)
    feats[0, 0, :, :1] = 1.0
    feats[0, 1, :, 1:] = 1.0
    got = primaps_fast.pseudo_labels(img, feats, backend="cpu")
    want = reference.pseudo_labels(img, feats)
    assert (got == want).float().mean() >= 0.99


def test_bad_inputs(rng):
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    f = torch.randn(2, 8, 4, 4)
    pl = primaps_fast.pseudo_labels
    with pytest.raises(ValueError, match="batch"):
        pl(img[:1], f, crf=False)
    with pytest.raises(ValueError, match="multiple"):
        pl(img[..., :15], f, crf=False)
    with pytest.raises(TypeError, match="images"):
        pl(img.int(), f, crf=False)
    with pytest.raises(ValueError, match="images"):
        pl(img[:, :2], f, crf=False)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match="images"):
            pl(torch.full((2, 3, 16, 16), float("nan"), dtype=dtype), f, crf=False)
    bad = f.clone()
    bad[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="features"):
        pl(img, bad, crf=False)
    with pytest.raises(ValueError, match="features"):
        pl(img, f[0], crf=False)
    with pytest.raises(ValueError, match="ignore_index"):
        pl(img, f, ignore_index=1, crf=False)
    with pytest.raises(TypeError, match="ignore_index"):
        pl(img, f, ignore_index=1.5, crf=False)
    with pytest.raises(ValueError, match="crf_iterations"):
        pl(img, f, crf_iterations=0)
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="threshold"):
            pl(img, f, threshold=0.0, crf=False, backend=backend)
        with pytest.raises(ValueError, match="features"):
            pl(img, bad, crf=False, backend=backend)


@pytest.mark.interpreter
def test_triton_post_processing_matches_cpu(rng):
    """The fused Triton upsample + arg-max / softmax against the C++ post-processing (same proposals)."""
    if not triton_available():
        pytest.skip("triton not available")
    feats = make_scenes(3, image_size=(20, 12), patch=4, dim=8, seed=2).features
    feats[1] = 0.0  # no proposal
    masks, counts = primaps_fast.principal_masks(feats, backend="cpu")
    labels, probs = cpu_post_processing(masks, counts, (20, 12))
    assert torch.equal(kernel("mask_labels", "triton")(masks, counts, (20, 12), 255), labels)
    torch.testing.assert_close(kernel("mask_probs", "triton")(masks, counts, (20, 12)), probs, atol=1e-6, rtol=1e-5)


def test_int_arguments_are_bounded():
    images, features = torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.rand(1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"^crf_iterations: expected an int in \[1, 1000\]"):
        primaps_fast.pseudo_labels(images, features, crf_iterations=10 ** 9)
    with pytest.raises(ValueError, match="^ignore_index: expected an int in"):
        primaps_fast.pseudo_labels(images, features, ignore_index=2 ** 63)
    with pytest.raises(TypeError, match="^crf_iterations: expected an int"):
        primaps_fast.pseudo_labels(images, features, crf_iterations=float("inf"))


# ---- GPU: the CUDA and Triton backends on CUDA tensors; skipped, with the reason, without a GPU ----

def cpu_post_processing(masks, counts, size, ignore_index=255):
    """The C++ mask_labels / mask_probs of CPU proposals."""
    return kernel("mask_labels", "cpu")(masks, counts, size, ignore_index), kernel("mask_probs", "cpu")(masks, counts, size)


def gpu_post_processing(masks, counts, size, backend, ignore_index=255):
    """(labels, probs) of the backend from the raw proposals, on CUDA copies."""
    masks, counts = masks.cuda(), counts.cuda()
    return (kernel("mask_labels", backend)(masks, counts, size, ignore_index),
            kernel("mask_probs", backend)(masks, counts, size))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("size,patch,B", [(64, 8, 3), ((40, 56), 8, 2), ((27, 21), 3, 1), ((20, 12), 4, 3), (16, 1, 2)])
def test_gpu_post_processing_matches_cpu(size, patch, B, backend):
    """Labels equal the C++ kernel's except at reference ties (exactly equal for CUDA, whose upsampling is
    the C++ arithmetic); probabilities to float32 rounding. Patch 1: equal sizes (no upsampling)."""
    sc = make_scenes(B, image_size=size, patch=patch, dim=16, seed=B)
    feats = sc.features
    if B > 2:
        feats[1] = 0.0  # no proposal: background only
    masks, counts = primaps_fast.principal_masks(feats, backend="cpu")
    H, W = sc.images.shape[-2:]
    labels, probs = cpu_post_processing(masks, counts, (H, W))
    got_labels, got_probs = gpu_post_processing(masks, counts, (H, W), backend)
    assert got_labels.is_cuda and got_probs.is_cuda and got_probs.shape == probs.shape
    assert_labels_match(got_labels.cpu(), labels, feats)
    torch.testing.assert_close(got_probs.cpu(), probs, atol=1e-6, rtol=1e-5)


@requires_cuda_backend
def test_cuda_post_processing_of_random_masks(rng):
    """Arbitrary proposal values (gained values below 1, so the background level is a real mean), counts 0
    and M, a 1-pixel-wide grid; labels exactly the C++ kernel's."""
    for shape, counts, size in [((3, 5, 7, 9), [5, 0, 2], (15, 20)), ((2, 3, 1, 6), [3, 1], (4, 18))]:
        masks = 0.2 * torch.rand(shape, generator=rng) * (torch.rand(shape, generator=rng) > 0.4)
        counts = torch.tensor(counts)
        labels, probs = cpu_post_processing(masks, counts, size, ignore_index=-1)
        got_labels, got_probs = gpu_post_processing(masks, counts, size, "cuda", ignore_index=-1)
        assert torch.equal(got_labels.cpu(), labels)
        torch.testing.assert_close(got_probs.cpu(), probs, atol=1e-6, rtol=1e-5)


@requires_triton_gpu
def test_gpu_triton_pipeline_no_crf_matches_reference():
    sc = make_scenes(2, image_size=(48, 40), patch=8, dim=32, seed=5)
    got = primaps_fast.pseudo_labels(sc.images.cuda(), sc.features.cuda(), crf=False, backend="triton")
    assert got.is_cuda
    assert_labels_match(got.cpu(), reference.pseudo_labels(sc.images, sc.features, crf=False), sc.features)
