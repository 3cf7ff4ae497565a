"""dense_crf / dense_crf_list: C++ vs the reference port vs pydensecrf (when installed), Triton under the
interpreter and on the GPU, edge cases and bad input."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import primaps_fast
from primaps_fast import _dispatch
from primaps_fast.data.synthetic import make_scenes
from primaps_fast.ops.dense_crf import dense_crf_list
from primaps_fast.reference import official_crf

from cuda_backend import requires_triton_gpu

ref = importlib.import_module("primaps_fast.reference.dense_crf")  # the module: reference.dense_crf is the op


def scene(H, W, L, seed, noise=0.0, texture=0.0):
    """A synthetic scene in BGR (as the official pipeline) and smooth logits at 1/8 resolution, upsampled
    bilinearly and softmaxed as in PriMaPs; ``noise`` adds per-pixel logit noise, ``texture`` image noise."""
    s = make_scenes(1, image_size=(H, W), patch=1, dim=8, seed=seed)
    img = s.images[0].flip(0).contiguous()
    g = torch.Generator().manual_seed(seed)
    if texture:
        img = (img.float() + texture * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    lg = torch.randn(1, L, max(1, H // 8), max(1, W // 8), generator=g) * 2
    lg = F.avg_pool2d(F.pad(lg, (1, 1, 1, 1), mode="replicate"), 3, 1) * 3
    x = F.interpolate(lg, size=(H, W), mode="bilinear", align_corners=False)
    if noise:
        x = x + noise * torch.randn(x.shape, generator=g)
    return img, torch.softmax(x, 1)[0]


def pydensecrf_q(img, probs, iterations=10):
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is an optional comparison")
    return official_crf.pydensecrf_marginals(img, probs, iterations)


def agreement(a, b):
    return (a.argmax(0) == b.argmax(0)).float().mean().item()


def smooth_probs(H, W, L, seed):
    """Softmax of smooth logits at 1/8 resolution, upsampled bilinearly (as PriMaPs' CRF inputs)."""
    g = torch.Generator().manual_seed(seed)
    lg = F.avg_pool2d(F.pad(torch.randn(1, L, max(1, H // 8), max(1, W // 8), generator=g) * 2, (1, 1, 1, 1),
                            mode="replicate"), 3, 1) * 3
    return torch.softmax(F.interpolate(lg, size=(H, W), mode="bilinear", align_corners=False), 1)[0]


def textured(H, W, seed):
    """A synthetic scene with per-pixel colour texture (bilateral lattices ~3x the pixels), BGR."""
    return make_scenes(1, image_size=(H, W), patch=8, dim=8, texture=24.0, seed=seed).images[0].flip(0).contiguous()


def photo(name, size):
    """A photograph bundled with scikit-image, resized so its longer side is ``size``, BGR."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (optional) provides the sample photographs")
    x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None]
    H, W = x.shape[-2:]
    shape = (size, round(W * size / H)) if H >= W else (round(H * size / W), size)
    x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=True)[0]
    return x.round().clamp(0, 255).to(torch.uint8).flip(0).contiguous()


@pytest.mark.parametrize("H,W,L,seed,noise,texture", [
    (64, 80, 5, 0, 0.0, 0.0), (64, 80, 7, 1, 3.0, 0.0), (56, 72, 3, 2, 1.0, 25.0),
    (48, 40, 2, 3, 0.0, 0.0), (40, 48, 17, 4, 2.0, 10.0)])
def test_cpu_matches_pydensecrf(H, W, L, seed, noise, texture):
    img, p = scene(H, W, L, seed, noise, texture)
    want = pydensecrf_q(img, p)
    got = dense_crf_list(img[None], [p], backend="cpu")[0]
    assert agreement(got, want) == 1.0
    assert (got - want).abs().max().item() < 1e-3


def test_cpu_matches_pydensecrf_320():
    img, p = scene(320, 320, 7, 5, 1.0, 8.0)
    want = pydensecrf_q(img, p)
    got = dense_crf_list(img[None], [p], backend="cpu")[0]
    assert agreement(got, want) >= 0.999
    assert (got - want).abs().max().item() < 1e-3


@pytest.mark.parametrize("H,W,L,seed", [(72, 96, 7, 6), (64, 64, 3, 7), (48, 56, 27, 8), (40, 48, 2, 9)])
def test_cpu_matches_pydensecrf_textured(H, W, L, seed):
    img, p = textured(H, W, seed), smooth_probs(H, W, L, seed)
    want = pydensecrf_q(img, p)
    got = dense_crf_list(img[None], [p], backend="cpu")[0]
    assert agreement(got, want) == 1.0
    assert (got - want).abs().max().item() < 1e-3


@pytest.mark.parametrize("name,size,L", [("astronaut", 96, 3), ("coffee", 120, 7), ("chelsea", 80, 27)])
def test_cpu_matches_pydensecrf_photo(name, size, L):
    img = photo(name, size)
    p = smooth_probs(*img.shape[1:], L, size)
    want = pydensecrf_q(img, p)
    got = dense_crf_list(img[None], [p], backend="cpu")[0]
    assert agreement(got, want) == 1.0
    assert (got - want).abs().max().item() < 1e-3


@pytest.mark.parametrize("L", [2, 3, 7, 27, 70])
def test_threads_do_not_change_results(L):
    # One image on a team of threads (a textured image, whose large lattice runs in the order of its
    # simplices, and a clean one, in raster order), and a batch split over images and threads: fixed
    # summation orders, so the outputs are bit-identical for any thread count.
    images = torch.stack([textured(72, 88, 70 + L), textured(72, 88, 80 + L).flip(2).contiguous(),
                          scene(72, 88, 3, 90 + L)[0]])
    probs = [smooth_probs(72, 88, L, 100 + b) for b in range(3)]
    before = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs[threads] = ([dense_crf_list(images[b:b + 1], probs[b:b + 1], backend="cpu")[0] for b in (0, 2)],
                             dense_crf_list(images, probs, iterations=4, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    for threads in (2, 4):
        for got, want in zip(outs[threads][0] + outs[threads][1], outs[1][0] + outs[1][1]):
            assert torch.equal(got, want)


def test_memory_check_counts_the_lattice(monkeypatch):
    # The lattice's build counts against the machine's memory, not only the label buffers: with room
    # for four times the label buffers but not for the lattice, the call is refused by name.
    img, p = scene(64, 64, 2, 5)
    monkeypatch.setattr(_dispatch, "device_memory", lambda device: 4 * 16 * 2 * 64 * 64)
    with pytest.raises(ValueError, match=r"^probs: the dense CRF of 1 images of 64x64 pixels needs"):
        dense_crf_list(img[None], [p], backend="cpu")
    with pytest.raises(ValueError, match=r"^logits: the dense CRF of 1 images of 64x64 pixels with 2 labels needs"):
        primaps_fast.dense_crf(img[None], torch.randn(1, 2, 8, 8), backend="cpu")


def test_threads_do_not_change_results_large_lattice():
    # Over 65,536 vertices the build splits the sort of the keys and the CSR list over vertex ranges
    # (and the threads share one hash table at any size): the output is still bit-identical.
    img = textured(160, 176, 5)
    _, bilateral = _dispatch.cpp().dense_crf_lattice_sizes(img[None].numpy(), 1.0, 67.0, 3.0, 1)
    assert bilateral[0] > 65536
    p = smooth_probs(160, 176, 3, 6)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(dense_crf_list(img[None], [p], iterations=2, backend="cpu")[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


@pytest.mark.parametrize("pos_sxy", [1.0, 0.7, 2.5, 0.3])
def test_lattices_match_reference(pos_sxy):
    # The Gaussian lattice is built on its grid (holes below sxy = 1, a sorted lattice again when the
    # grid would be much larger than the lattice, here sxy = 0.3), the bilateral one by hashing: same
    # vertex counts as the reference lattices, and the same marginals.
    img, _ = scene(45, 61, 4, 110, texture=20.0)
    p = smooth_probs(45, 61, 4, 111)
    gauss, bilateral = _dispatch.cpp().dense_crf_lattice_sizes(img[None].numpy(), pos_sxy, 67.0, 3.0, 2)
    zeros = torch.zeros(3, 45, 61, dtype=torch.uint8)
    assert gauss == ref.build_lattice(ref.crf_features(zeros, pos_sxy, None)).M
    assert bilateral == [ref.build_lattice(ref.crf_features(img, 67.0, 3.0)).M]
    got = dense_crf_list(img[None], [p], pos_sxy=pos_sxy, iterations=5, backend="cpu")[0]
    want = ref.dense_crf_list(img[None], [p], pos_sxy=pos_sxy, iterations=5)[0]
    assert agreement(got, want) == 1.0
    # 5e-5: the reference's own float32 rounding moves its marginals by up to 2.6e-5 between torch's CPU
    # kernels (ATEN_CPU_CAPABILITY default / avx2 / avx512) on this textured scene
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)


@pytest.mark.parametrize("H,W,L,seed,noise", [(64, 80, 6, 10, 0.0), (33, 47, 4, 11, 3.0), (24, 40, 1, 12, 0.0),
                                             (20, 28, 37, 13, 1.0), (16, 20, 70, 14, 0.0), (12, 14, 300, 15, 1.0)])
def test_cpu_matches_reference(H, W, L, seed, noise):
    # 37, 70 and 300 labels: rows of more than 32 labels run in chunks of 32 lanes, the last one partly
    # padding (300 labels overflowed fixed-size buffers before).
    img, p = scene(H, W, L, seed, noise, texture=15.0)
    want = ref.dense_crf_list(img[None], [p])[0]
    got = dense_crf_list(img[None], [p], backend="cpu")[0]
    assert agreement(got, want) == 1.0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_kept_gaussian_lattice_follows_size_and_sxy():
    # The Gaussian lattice of the last (H, W, pos_sxy) is kept for the next call: calls that change the
    # size or pos_sxy in turn agree with the reference, and the repeated first call is bit-identical.
    outs = []
    for H, W, sxy in [(30, 40, 1.0), (40, 30, 1.0), (30, 40, 2.0), (30, 40, 1.0)]:
        img, p = scene(H, W, 4, 30, 1.0)
        got = dense_crf_list(img[None], [p], pos_sxy=sxy, iterations=3, backend="cpu")[0]
        want = ref.dense_crf_list(img[None], [p], pos_sxy=sxy, iterations=3)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        outs.append(got)
    assert torch.equal(outs[0], outs[3])


def test_batch_with_different_label_counts():
    imgs, probs = [], []
    for b, L in enumerate((3, 6, 2)):
        img, p = scene(40, 56, L, 20 + b, 1.0)
        imgs.append(img)
        probs.append(p)
    images = torch.stack(imgs)
    got = dense_crf_list(images, probs, iterations=5, backend="cpu")
    for b in range(3):
        single = dense_crf_list(images[b:b + 1], probs[b:b + 1], iterations=5, backend="cpu")[0]
        assert got[b].shape == probs[b].shape
        torch.testing.assert_close(got[b], single, atol=0, rtol=0)  # threads do not change any sum
        want = ref.dense_crf_list(images[b:b + 1], probs[b:b + 1], iterations=5)[0]
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=0)


def test_dense_crf_upsamples_logits_like_reference():
    img, _ = scene(48, 64, 4, 30)
    logits = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(3)) * 3
    images = torch.stack([img, img.flip(0)])
    got = primaps_fast.dense_crf(images, logits, iterations=4)
    want = ref.dense_crf(images, logits, iterations=4)
    assert got.shape == (2, 4, 48, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert agreement(got[0], want[0]) == 1.0
    torch.testing.assert_close(got.sum(1), torch.ones(2, 48, 64), atol=1e-5, rtol=0)


def test_channel_order_matters():
    img, p = scene(48, 64, 4, 31, texture=30.0)
    a = dense_crf_list(img[None], [p])[0]
    b = dense_crf_list(img.flip(0)[None], [p])[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("L", [3, 27])
def test_zero_iterations_is_clipped_normalised_probs(L):
    # exp(log(clip(p))) renormalised: the kernel's own log and exp, over every binade of the clip range
    # (and values outside it), on an odd pixel count; float64 is the truth
    img, _ = scene(19, 23, L, 40)
    g = torch.Generator().manual_seed(L)
    p = 10 ** (torch.rand(L, 19, 23, generator=g) * 7.5 - 7)  # 1e-7 .. 3.2
    p[0, :2] = 0.0  # clipped to 1e-5
    p[-1, 3, :4] = 1.0
    got = dense_crf_list(img[None], [p], iterations=0)[0]
    c = p.double().clamp(1e-5, 1)
    torch.testing.assert_close(got.double(), c / c.sum(0), atol=1e-7, rtol=3e-6)


def test_edge_cases():
    # one label: Q == 1
    img, p = scene(16, 24, 3, 41)
    assert torch.equal(dense_crf_list(img[None], [torch.ones(1, 16, 24)])[0], torch.ones(1, 16, 24))
    # a dominant label stays dominant; a constant image keeps the argmax of smooth inputs
    q = torch.full((3, 16, 24), 0.01)
    q[1] = 0.98
    assert (dense_crf_list(img[None], [q])[0].argmax(0) == 1).all()
    flat = torch.full_like(img, 77)
    got = dense_crf_list(flat[None], [p])[0]
    torch.testing.assert_close(got, ref.dense_crf_list(flat[None], [p])[0], atol=1e-4, rtol=0)
    # 1x1 and odd sizes
    one = torch.tensor([[[10]], [[20]], [[30]]], dtype=torch.uint8)
    r = torch.tensor([[[0.3]], [[0.7]]])
    torch.testing.assert_close(dense_crf_list(one[None], [r])[0], ref.dense_crf_list(one[None], [r])[0])
    img, p = scene(13, 7 * 3, 5, 42)
    torch.testing.assert_close(dense_crf_list(img[None], [p])[0], ref.dense_crf_list(img[None], [p])[0],
                               atol=1e-4, rtol=0)


def test_validation():
    img, p = scene(16, 16, 3, 50)
    images = img[None]
    with pytest.raises(TypeError, match="images"):
        dense_crf_list(images.float(), [p])
    with pytest.raises(ValueError, match="images"):
        dense_crf_list(images[:, :2], [p])
    with pytest.raises(ValueError, match="images"):
        dense_crf_list(img, [p])
    with pytest.raises(ValueError, match="probs"):
        dense_crf_list(images, [p, p])
    with pytest.raises(ValueError, match=r"probs\[0\]"):
        dense_crf_list(images, [p[:, :8]])
    bad = p.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"probs\[0\]"):
        dense_crf_list(images, [bad])
    with pytest.raises(ValueError, match="logits"):
        primaps_fast.dense_crf(images, torch.full((1, 3, 2, 2), float("inf")))
    with pytest.raises(ValueError, match="logits"):
        primaps_fast.dense_crf(images, torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="iterations"):
        dense_crf_list(images, [p], iterations=-1)
    for name in ("pos_sxy", "pos_compat", "bi_sxy", "bi_srgb", "bi_compat"):
        with pytest.raises(ValueError, match=name):
            dense_crf_list(images, [p], **{name: 0.0})
    with pytest.raises(ValueError, match="backend"):
        dense_crf_list(images, [p], backend="gpu")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lattice_key_overflow_is_an_error(backend):
    """The message names the argument that is too small, before any kernel runs."""
    img, p = scene(16, 16, 2, 51, texture=60.0)
    with pytest.raises(ValueError, match="^bi_srgb: 1e-08 is too small"):
        dense_crf_list(img[None], [p], bi_srgb=1e-8, backend=backend)
    with pytest.raises(ValueError, match="^bi_sxy: 1e-08 is too small"):
        dense_crf_list(img[None], [p], bi_sxy=1e-8, backend=backend)
    with pytest.raises(ValueError, match="^pos_sxy: 1e-07 is too small"):
        dense_crf_list(img[None], [p], pos_sxy=1e-7, backend=backend)
    with pytest.raises(ValueError, match="^bi_srgb: 1e-08 is too small"):
        primaps_fast.dense_crf(img[None], p[None].log(), bi_srgb=1e-8, backend=backend)


def test_lattice_check_refuses_exactly_what_the_kernel_cannot_do():
    """The Python check before the kernel agrees with the C++ kernel's own (backstop) check: on a log grid of
    bi_srgb / bi_sxy / pos_sxy, the public op refuses exactly the values the raw kernel refuses (up to the
    float32 rounding of a value within 1 % of the limit), so nothing that works is refused."""
    from primaps_fast.ops.dense_crf import dense_crf_cpu

    gen = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (1, 3, 9, 11), generator=gen, dtype=torch.uint8),
              torch.randint(100, 140, (2, 3, 6, 5), generator=gen, dtype=torch.uint8)]
    params = dict(iterations=1, pos_sxy=1.0, pos_compat=3.0, bi_sxy=67.0, bi_srgb=3.0, bi_compat=4.0)
    for img in images:
        probs = [torch.full((2, *img.shape[-2:]), 0.5) for _ in range(img.shape[0])]
        for name in ("bi_srgb", "bi_sxy", "pos_sxy"):
            grid = torch.logspace(-9, 1, 41, dtype=torch.float64).tolist()
            kernel_ok = []
            for value in grid:
                try:
                    dense_crf_cpu(img, probs, **{**params, name: value})
                    kernel_ok.append(True)
                except ValueError:
                    kernel_ok.append(False)
            assert not all(kernel_ok) and any(kernel_ok)  # the grid crosses the limit
            for value, ok in zip(grid, kernel_ok):
                try:
                    dense_crf_list(img, probs, **{**params, name: value})
                    assert ok, (name, value)
                except ValueError as exc:
                    near = any(abs(value / v - 1) < 0.01 for v, o in zip(grid, kernel_ok) if o != ok)
                    assert not ok or near, (name, value, str(exc))
                    assert str(exc).startswith(name + ":") or not ok


def test_lattice_sizes_match_pydensecrf_statistics():
    # The Gaussian lattice of a 320x320 grid has 118,586 vertices (docs/dense_crf.md, measured on pydensecrf).
    lat = ref.build_lattice(ref.crf_features(torch.zeros(3, 320, 320, dtype=torch.uint8), 1.0, None))
    assert lat.M == 118586
    gauss, _ = _dispatch.cpp().dense_crf_lattice_sizes(torch.zeros(1, 3, 320, 320, dtype=torch.uint8).numpy(),
                                                       1.0, 67.0, 3.0, 1)
    assert gauss == 118586


def test_triton_lattice_matches_the_reference_lattice():
    """The Triton backend builds its lattice with its own torch-op code (packed keys, sorted): it must be the
    reference's (dict, insertion order) up to the numbering of the vertices."""
    from primaps_fast.triton import lattice

    img, _ = scene(13, 17, 2, 70, texture=30.0)
    for feats in (ref.crf_features(img, 1.0, None), ref.crf_features(img, 5.0, 3.0)):
        want, got = ref.build_lattice(feats), lattice.build_lattice(feats)
        assert (got.d, got.M) == (want.d, want.M)
        assert torch.equal(got.weight, want.weight)
        to_ref = torch.full((got.M + 1,), -1, dtype=torch.int64)  # Triton vertex id -> reference id
        to_ref[got.offset.reshape(-1)] = want.offset.reshape(-1)
        to_ref[got.M] = want.M  # the absent neighbour
        assert torch.equal(to_ref[got.offset], want.offset)  # a function of the vertex, not of the point
        assert torch.equal(to_ref.sort().values, torch.arange(got.M + 1))  # a bijection
        assert torch.equal(want.neighbours[:, :, to_ref[:-1]], to_ref[got.neighbours])



@pytest.mark.interpreter
def test_triton_normalisation_is_the_pixel_order_filter_of_ones():
    """The Triton kernel's normalisation, computed by its splat and blur kernels (no atomics): pydensecrf's
    order, each vertex summing its pixels in pixel order, float32 throughout."""
    import numpy as np

    pytest.importorskip("triton")
    from primaps_fast.triton.dense_crf import _Kernel

    img, _ = scene(9, 11, 2, 71, texture=30.0)
    for feats in (ref.crf_features(img, 1.0, None), ref.crf_features(img, 5.0, 3.0)):
        kernel = _Kernel(feats, 1.0)
        off, w = kernel.off.numpy(), kernel.bary.numpy()
        N, D = off.shape
        buf = np.zeros(kernel.M + 1, np.float32)
        for p in range(N):
            for r in range(D):
                buf[off[p, r]] = buf[off[p, r]] + w[p, r]
        for j in range(D):
            n1, n2 = kernel.nbr[j].numpy()
            buf = np.concatenate([buf[:-1] + np.float32(0.5) * (buf[n1] + buf[n2]), buf[-1:]])
        alpha = np.float32(1.0 / (1.0 + 2.0 ** (-(D - 1))))
        k1 = np.zeros(N, np.float32)
        for r in range(D):
            k1 = k1 + w[:, r] * buf[off[:, r]] * alpha
        assert torch.equal(kernel.norm, (1.0 / torch.sqrt(torch.from_numpy(k1).double() + 1e-20)).float())


def test_batched_triton_lattice_is_each_images_own():
    """Images' points in one lattice (the image index above the keys): every image gets the vertices,
    weights and blur neighbours of its own lattice, numbered image after image."""
    from primaps_fast.triton import lattice

    imgs = [scene(10, 7, 2, 80 + i, texture=40.0)[0] for i in range(3)]
    feats = torch.cat([ref.crf_features(img, 5.0, 3.0) for img in imgs])
    assert torch.equal(feats, lattice.crf_features(torch.stack(imgs), 5.0, 3.0))
    got = lattice.build_lattice(feats, images=3)
    base, N = 0, 70
    for i, img in enumerate(imgs):
        own = lattice.build_lattice(ref.crf_features(img, 5.0, 3.0))
        assert torch.equal(got.offset[i * N:(i + 1) * N], own.offset + base)
        assert torch.equal(got.weight[i * N:(i + 1) * N], own.weight)
        nbrs = got.neighbours[:, :, base:base + own.M]
        assert torch.equal(torch.where(nbrs == got.M, own.M, nbrs - base), own.neighbours)
        base += own.M
    assert base == got.M
    with pytest.raises(lattice.KeyBitsError, match="^features: "):
        lattice.build_lattice(feats, images=3, max_bits=2)


@pytest.mark.interpreter
def test_triton_matches_cpu():
    pytest.importorskip("triton")
    img, p = scene(12, 16, 3, 60, 1.0, 20.0)
    img2, p2 = scene(12, 16, 3, 61, 0.0)
    images = torch.stack([img, img2])
    got = dense_crf_list(images, [p, p2[:2] / p2[:2].sum(0)], iterations=3, backend="triton")
    want = dense_crf_list(images, [p, p2[:2] / p2[:2].sum(0)], iterations=3, backend="cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def _batch_of(kind, B, H=20, W=24):
    """``B`` images of ``kind`` (textured scenes or photographs, BGR) of ``H x W`` with smooth logits and
    label counts 3, 7, 2, 5, ... (mixed lane widths in one batch)."""
    counts = [(3, 7, 2, 5)[b % 4] for b in range(B)]
    if kind == "photographs":
        names = ["astronaut", "coffee", "chelsea", "rocket"]
        images = [photo(names[b % 4], 2 * max(H, W))[:, :H, :W].contiguous() for b in range(B)]
    else:
        images = [scene(H, W, 2, 90 + b, noise=1.0, texture=30.0 * (b % 2))[0] for b in range(B)]
    probs = [smooth_probs(H, W, L, 40 + b) for b, L in enumerate(counts)]
    return torch.stack(images), probs


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["scenes", "photographs"])
def test_batched_triton_matches_cpu(kind):
    """One batch of images with different label counts (and textures), every launch over all of them:
    each image's marginals are the C++ CRF's, labels equal and values to float rounding."""
    pytest.importorskip("triton")
    images, probs = _batch_of(kind, 4)
    got = dense_crf_list(images, probs, iterations=3, backend="triton")
    want = dense_crf_list(images, probs, iterations=3, backend="cpu")
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert agreement(g, w) == 1.0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.interpreter
def test_triton_crf_launches_do_not_grow_with_the_batch(triton_launches):
    """Batch 2 and batch 8: the same launches. Setup: the two kernels' normalisations (a splat and d + 1
    blurs each, d = 2 and 5); each iteration: both kernels' splat and blurs and one update."""
    counts = {}
    for B in (2, 8):
        images, probs = _batch_of("scenes", B, 10, 12)
        triton_launches.clear()
        dense_crf_list(images, probs, iterations=2, backend="triton")
        counts[B] = list(triton_launches)
    assert counts[2] == counts[8]
    assert len(counts[2]) == (1 + 3) + (1 + 6) + 2 * ((1 + 3) + (1 + 6) + 1)
    assert counts[2].count("_update_kernel") == 2


@pytest.mark.interpreter
def test_triton_pseudo_labels_launches_do_not_grow_with_the_batch(triton_launches):
    """``pseudo_labels(..., crf=True)`` on the Triton backend: batch 8 (the batch-2 scenes four times, so
    the proposals take the same rounds) launches exactly what batch 2 does."""
    from primaps_fast.data.synthetic import make_scenes

    sc = make_scenes(2, image_size=24, dim=16, patch=8, seed=5)
    counts = {}
    for reps in (1, 4):
        triton_launches.clear()
        primaps_fast.pseudo_labels(sc.images.repeat(reps, 1, 1, 1), sc.features.repeat(reps, 1, 1, 1),
                                   crf_iterations=2, backend="triton")
        counts[reps] = list(triton_launches)
    assert counts[1] == counts[4]
    assert counts[1].count("_update_kernel") == 2


@requires_triton_gpu
@pytest.mark.parametrize("H, W, L, noise, texture", [(1, 1, 2, 0.0, 0.0), (7, 5, 1, 0.0, 0.0), (33, 47, 3, 1.0, 0.0),
                                                     (64, 80, 7, 0.0, 30.0), (40, 24, 40, 2.0, 10.0)])
def test_gpu_matches_cpu(H, W, L, noise, texture):
    """Both GPU backends run the Triton CRF on CUDA tensors: the C++ CRF's marginals up to float rounding
    (the GPU sums in another order), for a batch whose images have different label counts."""
    img, p = scene(H, W, L, 70 + L, noise, texture)
    img2, p2 = scene(H, W, max(1, L - 1), 71 + L, noise, texture)
    images, probs = torch.stack([img, img2]), [p, p2]
    want = dense_crf_list(images, probs, iterations=5, backend="cpu")
    for backend in ("triton", "cuda"):
        got = dense_crf_list(images.cuda(), [q.cuda() for q in probs], iterations=5, backend=backend)
        for g, w in zip(got, want):
            assert g.is_cuda and g.shape == w.shape
            torch.testing.assert_close(g.cpu(), w, atol=1e-5, rtol=0)


def test_dense_crf_list_is_public():
    assert primaps_fast.dense_crf_list is dense_crf_list
    assert "dense_crf_list" in primaps_fast.__all__


def test_messages_name_the_users_arguments():
    """Bounds are checked before the kernel, with the name of the argument the user passed: no 'labels:' or
    'probs[0]:' from dense_crf, whose arguments are images and logits."""
    images = torch.randint(0, 256, (1, 3, 4, 5), dtype=torch.uint8)
    logits = torch.randn(1, 2, 4, 5)
    with pytest.raises(ValueError, match=r"^iterations: expected an int in \[0, 1000\], got 1000000000"):
        primaps_fast.dense_crf(images, logits, iterations=10 ** 9)
    with pytest.raises(TypeError, match="^iterations: "):
        primaps_fast.dense_crf(images, logits, iterations=2 ** 63 * 1.0)
    with pytest.raises(ValueError, match="^logits: values beyond the float32 range"):
        primaps_fast.dense_crf(images, logits.double() * 1e300)
    with pytest.raises(ValueError, match="^logits: 1048577 labels, more than the 1048576"):
        primaps_fast.dense_crf(images[:, :, :1, :1], torch.zeros(1, 2 ** 20 + 1, 1, 1))
    with pytest.raises(ValueError, match=r"^probs\[0\]: 1048577 labels"):
        dense_crf_list(images[:, :, :1, :1], [torch.full((2 ** 20 + 1, 1, 1), 1e-6)])
    for name in ("pos_compat", "bi_compat"):
        with pytest.raises(ValueError, match=f"^{name}: expected a finite number"):
            primaps_fast.dense_crf(images, logits, **{name: 1e300})
    with pytest.raises(ValueError, match="^bi_sxy: expected a finite number"):
        primaps_fast.dense_crf(images, logits, bi_sxy=10 ** 400)
    with pytest.raises(ValueError, match=r"^logits: the dense CRF of 1 images of 100000x100000 pixels with 2 labels "
                                         r"needs [0-9.]+ GiB"):
        primaps_fast.dense_crf(torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(1, 3, 10 ** 5, 10 ** 5), logits)
    # the largest iteration count and the extreme float32 logits still work
    q = primaps_fast.dense_crf(images, logits.double() * 1e37, iterations=1)
    assert bool(torch.isfinite(q).all())
