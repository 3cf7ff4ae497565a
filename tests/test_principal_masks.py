"""principal_masks: every backend against primaps_fast.reference, hand-built cases, bad input.

The reference finds the principal direction with ``torch.pca_lowrank(q=3, niter=100)`` as the official
code does. That is a randomized method: it converges to the top eigenvector only when the top eigenvalue
is well separated from the rest (on flat spectra 100 iterations are not enough, and two calls disagree
with each other). Parity inputs therefore have a clear leading direction: synthetic SSL-like scenes and
low-rank-plus-noise features with a decaying spectrum. On such inputs the backends must give the same
counts, identical supports and values equal to 1e-5. Pure-noise features (a flat spectrum: the reference
is not converged there) are checked for their counts, the default cap, invariants and determinism.
"""
import os

import pytest
import torch

import primaps_fast
from primaps_fast import reference
from primaps_fast._dispatch import triton_available
from primaps_fast.data.synthetic import make_scenes


def assert_same_proposals(got, want):
    torch.testing.assert_close(got.counts, want.counts)
    assert got.masks.dtype == torch.float32 and got.counts.dtype == torch.int64
    M = max(1, int(want.counts.max()))
    assert got.masks.shape == want.masks.shape[:1] + (M,) + want.masks.shape[2:]
    assert torch.equal(got.masks > 0, want.masks > 0), "supports differ"
    torch.testing.assert_close(got.masks, want.masks, atol=1e-5, rtol=0)
    for b, n in enumerate(got.counts.tolist()):
        assert not got.masks[b, n:].any(), "rows beyond counts must be zero"


def low_rank_features(B, C, h, w, gen, rank=4):
    """Mean + a few components with a decaying spectrum (10, 5, 2.5, ...) + small white noise."""
    rank = min(rank, C)
    mean = torch.randn(C, generator=gen)
    basis = torch.linalg.qr(torch.randn(C, rank, generator=gen))[0].T  # (rank, C) orthonormal
    scales = 10.0 * 0.5 ** torch.arange(rank).float()
    coef = torch.randn(B, h * w, rank, generator=gen) * scales
    f = mean + coef @ basis + 0.05 * torch.randn(B, h * w, C, generator=gen)
    return f.permute(0, 2, 1).reshape(B, C, h, w).contiguous()


def scenes_features(B, C, h, w, seed):
    return make_scenes(B, image_size=(8 * h, 8 * w), dim=C, seed=seed).features


BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)]


def skip_unavailable(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton not available")


@pytest.mark.parametrize("B,C,h,w", [(1, 64, 9, 7), (3, 384, 11, 13), (1, 768, 7, 9), (3, 3, 8, 5)])
@pytest.mark.parametrize("kind", ["scenes", "low_rank"])
def test_cpu_matches_reference(B, C, h, w, kind, rng):
    f = scenes_features(B, C, h, w, seed=C + h) if kind == "scenes" else low_rank_features(B, C, h, w, rng)
    assert_same_proposals(primaps_fast.principal_masks(f, backend="cpu"), reference.principal_masks(f))


@pytest.mark.interpreter
@pytest.mark.parametrize("B,C,h,w", [(1, 3, 5, 7), (3, 64, 7, 5)])
def test_triton_matches_reference(B, C, h, w, rng):
    skip_unavailable("triton")
    f = low_rank_features(B, C, h, w, rng)
    assert_same_proposals(primaps_fast.principal_masks(f, backend="triton"), reference.principal_masks(f))


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_two_regions_known_answer(backend):
    """Region A = (2, 0) (norm 2), region B = (0, 1), some zero pixels. The covariance has one direction,
    v ~ (2, -1)/sqrt(5): |cos| is 0.894 on A and 0.447 on B, so A comes first and B (cosine 0 to A)
    is excluded; then B alone is degenerate (identical features) and v = its mean. The zero pixels
    (> 5%) remain, their covariance is 0 with mean 0, so v = 0 and the loop stops: 2 proposals."""
    skip_unavailable(backend)
    region = torch.tensor([[1, 1, 2, 2],
                           [1, 0, 2, 2],
                           [1, 1, 1, 2],
                           [0, 2, 2, 2]])
    f = torch.zeros(2, 4, 4)
    f[0][region == 1] = 2.0
    f[1][region == 2] = 1.0
    out = primaps_fast.principal_masks(f, backend=backend)
    assert out.counts.tolist() == [2]
    torch.testing.assert_close(out.masks[0, 0], (region == 1).float())
    torch.testing.assert_close(out.masks[0, 1], (region == 2).float())


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_constant_and_zero_features(backend, rng):
    """Identical features must give bit-identical cosines wherever the pixel is (vectorised body or
    scalar tail of a loop): one proposal of exactly 1 everywhere."""
    skip_unavailable(backend)
    const = torch.randn(4, 16, 1, 1, generator=rng).expand(4, 16, 5, 3)
    out = primaps_fast.principal_masks(const, backend=backend)
    assert out.counts.tolist() == [1] * 4 and torch.equal(out.masks, torch.ones(4, 1, 5, 3))
    const = const[0]
    zero = torch.zeros(16, 5, 3)
    out = primaps_fast.principal_masks(torch.stack([const, zero]), backend=backend)
    assert out.counts.tolist() == [1, 0]
    assert torch.equal(out.masks[0, 0], torch.ones(5, 3))
    assert not out.masks[1].any()
    assert not out.masks.isnan().any()
    one_pixel = primaps_fast.principal_masks(torch.randn(7, 1, 1), backend=backend)
    assert one_pixel.counts.tolist() == [1] and one_pixel.masks.tolist() == [[[[1.0]]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_patches_and_dominant_direction(backend, rng):
    skip_unavailable(backend)
    f = low_rank_features(2, 16, 7, 9, rng, rank=1)  # one dominant direction
    f[0, :, :3, :4] = 0.0  # an all-zero patch of 12 / 63 pixels (> 5%): never covered
    want = reference.principal_masks(f)
    got = primaps_fast.principal_masks(f, backend=backend)
    assert_same_proposals(got, want)
    assert not got.masks[0, :, :3, :4].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_options_and_invariants(backend, rng):
    skip_unavailable(backend)
    f = low_rank_features(3, 32, 9, 11, rng)
    full = primaps_fast.principal_masks(f, backend=backend)
    capped = primaps_fast.principal_masks(f, max_masks=2, backend=backend)
    assert capped.counts.tolist() == full.counts.clamp(max=2).tolist()
    torch.testing.assert_close(capped.masks, full.masks[:, :2])
    early = primaps_fast.principal_masks(f, stop_fraction=0.01, backend=backend)
    assert early.counts.tolist() == [1, 1, 1]
    strict = primaps_fast.principal_masks(f, threshold=0.9, backend=backend)
    assert_same_proposals(strict, reference.principal_masks(f, threshold=0.9))
    # proposals are disjoint, in [0, 1], each contains a pixel of value 1, and cover >= 95%
    support = (full.masks > 0).sum(1)
    assert support.max() <= 1 and full.masks.max() <= 1
    for b, n in enumerate(full.counts.tolist()):
        assert (full.masks[b, :n].flatten(1).max(1).values == 1).all()
        assert support[b].float().mean() >= 0.95
    single = primaps_fast.principal_masks(f[1], backend=backend)
    assert_same_proposals(single, type(full)(full.masks[1:2, : int(full.counts[1])], full.counts[1:2]))


def test_non_contiguous_and_double_input(rng):
    f = low_rank_features(2, 24, 9, 7, rng)
    want = primaps_fast.principal_masks(f, backend="cpu")
    got = primaps_fast.principal_masks(f.double().transpose(2, 3).contiguous().transpose(2, 3), backend="cpu")
    assert_same_proposals(got, want)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs(backend):
    good = torch.randn(1, 4, 3, 3)
    pm = primaps_fast.principal_masks
    with pytest.raises(ValueError, match="features"):
        pm(torch.randn(4, 3), backend=backend)
    with pytest.raises(TypeError, match="features"):
        pm(torch.ones(1, 4, 3, 3, dtype=torch.int64), backend=backend)
    with pytest.raises(TypeError, match="features"):
        pm(good.numpy(), backend=backend)
    for bad in (float("nan"), float("inf")):
        x = good.clone()
        x[0, 1, 2, 0] = bad
        with pytest.raises(ValueError, match="features"):
            pm(x, backend=backend)
    with pytest.raises(ValueError, match="features.*CPU and CUDA"):
        pm(torch.empty(1, 4, 3, 3, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="features"):
        pm(torch.randn(1, 0, 3, 3), backend=backend)
    with pytest.raises(ValueError, match="features"):
        pm(torch.randn(1, 4, 0, 3), backend=backend)
    for t in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            pm(good, threshold=t, backend=backend)
        with pytest.raises(ValueError, match="stop_fraction"):
            pm(good, stop_fraction=t, backend=backend)
    with pytest.raises(ValueError, match="max_masks"):
        pm(good, max_masks=0, backend=backend)
    with pytest.raises(TypeError, match="max_masks"):
        pm(good, max_masks=2.0, backend=backend)
    with pytest.raises(ValueError, match="max_masks"):
        pm(good, max_masks=2**63, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        pm(good, backend="gpu")


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_cpu_kernel_isas_match_reference(isa, rng):
    """Every SIMD path of the C++ SYRK and block product (the CPU picks the best at load time)."""
    cpp = primaps_fast._dispatch.cpp()
    try:
        cpp.set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU has no {isa}")
    try:
        for C, (h, w) in ((13, (9, 7)), (64, (11, 5))):  # C not a multiple of 4 or 8
            f = low_rank_features(2, C, h, w, rng)
            assert_same_proposals(primaps_fast.principal_masks(f, backend="cpu"), reference.principal_masks(f))
    finally:
        cpp.set_isa("auto")


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_scale_free(backend, rng):
    """Each image is scaled by a power of two first: f times 2^-100 gives bit-identical proposals, and
    f times 1e-20, 1e-35 (products of raw values underflow float32) or 1e30 (sums of squares overflow)
    the same counts and supports, and values equal to 1e-5, in every backend and in the reference."""
    skip_unavailable(backend)
    f = low_rank_features(1 if backend == "reference" else 2, 24, 7, 9, rng)  # the reference is slow
    f[-1, :, 0, :3] = 0.0  # zero pixels stay out at every scale
    base = primaps_fast.principal_masks(f, backend=backend)
    if backend != "reference":
        assert_same_proposals(base, reference.principal_masks(f))
    exact = primaps_fast.principal_masks(f * 2.0**-100, backend=backend)
    if backend != "reference":  # the reference draws random numbers: equal, not identical
        assert torch.equal(exact.masks, base.masks) and torch.equal(exact.counts, base.counts)
    for scale in (2.0**-100, 1e-20, 1e-35, 1e30):
        assert_same_proposals(primaps_fast.principal_masks(f * scale, backend=backend), base)
    for scale in (1e-300, 1e300):  # float64 beyond float32's range: scaled before the cast
        assert_same_proposals(primaps_fast.principal_masks(f.double() * scale, backend=backend), base)


def test_cpu_kernel_isas_bit_identical():
    """The SIMD kernels and their scalar twins round alike: bit-identical proposals on noise (a flat
    spectrum, where any rounding difference would move the anchors)."""
    cpp = primaps_fast._dispatch.cpp()
    f = noise_features(2, 40, 9, 8, seed=7)
    want = primaps_fast.principal_masks(f, max_masks=None, backend="cpu")
    try:
        for isa in ("avx512", "avx2", "scalar"):
            try:
                cpp.set_isa(isa)
            except ValueError:
                continue  # not on this CPU
            got = primaps_fast.principal_masks(f, max_masks=None, backend="cpu")
            assert torch.equal(got.masks, want.masks) and torch.equal(got.counts, want.counts), isa
    finally:
        cpp.set_isa("auto")


def noise_features(B, C, h, w, seed):
    return torch.randn(B, C, h, w, generator=torch.Generator().manual_seed(seed))


def test_noise_default_cap_and_unbounded():
    """Pure noise: proposals of a pixel or a few. The default stops at DEFAULT_MAX_MASKS = 254, the
    reference's default too (254 reference proposals take minutes: its signature is checked);
    max_masks=None runs until 95% of the pixels are covered; both satisfy the invariants (disjoint, an
    anchor of value 1 each), and the capped run is the start of the full one."""
    import inspect

    from primaps_fast.common import DEFAULT_MAX_MASKS

    assert DEFAULT_MAX_MASKS == 254
    for fn in (primaps_fast.principal_masks, reference.principal_masks):
        assert inspect.signature(fn).parameters["max_masks"].default == DEFAULT_MAX_MASKS
    f = noise_features(2, 128, 20, 19, seed=5)  # 380 pixels, cosines ~ N(0, 1/128): mostly 1 pixel each
    full = primaps_fast.principal_masks(f, max_masks=None, backend="cpu")
    assert (full.counts > 300).all()
    default = primaps_fast.principal_masks(f, backend="cpu")
    assert default.counts.tolist() == [254, 254]
    assert torch.equal(default.masks, full.masks[:, :254])
    support = (full.masks > 0).sum(1)
    assert support.max() <= 1 and (support.float().mean((1, 2)) >= 0.95).all()
    for b, n in enumerate(full.counts.tolist()):
        assert (full.masks[b, :n].flatten(1).max(1).values == 1).all()


def test_noise_bit_identical_at_any_thread_count():
    f = noise_features(3, 40, 9, 10, seed=6)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(primaps_fast.principal_masks(f, max_masks=None, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out.masks, outs[0].masks) and torch.equal(out.counts, outs[0].counts)


@pytest.mark.interpreter
def test_triton_host_syncs_per_round_do_not_grow_with_the_batch(triton_launches, monkeypatch, rng):
    """The Triton proposals read the device on the host once per round (``active.any()``) and once to
    stop, at batch 2 and 8 and on any features: no read per eigen-solver step. Counted: the tensor reads
    ``__bool__``, ``__int__``, ``__float__``, ``item`` and ``tolist``; rounds: the _select_kernel launches."""
    from primaps_fast.triton.principal_masks import principal_masks_triton

    reads = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            reads.append(1)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    per_round = {}
    for B in (2, 8):  # half low-rank (a few proposals), half noise (one pixel each)
        f = torch.cat([low_rank_features(B // 2, 16, 6, 7, rng), noise_features(B // 2, 16, 6, 7, seed=B)])
        reads.clear()
        triton_launches.clear()
        principal_masks_triton(f, 0.4, 0.95, 254)
        rounds = triton_launches.count("_select_kernel")
        assert rounds >= 10
        per_round[B] = (len(reads) - 1) / rounds
    assert per_round == {2: 1.0, 8: 1.0}, per_round


@pytest.mark.interpreter
def test_triton_noise_matches_cpu():
    """Pure noise up to the 254-proposal cap (one pixel each, a flat spectrum: many eigen-solver steps per
    round, some rounds going on past the round's fixed schedule): the C++ backend's proposals."""
    skip_unavailable("triton")
    f = noise_features(1, 64, 24, 24, seed=7)
    want = primaps_fast.principal_masks(f, backend="cpu")
    assert want.counts.tolist() == [254]
    assert_same_proposals(primaps_fast.principal_masks(f, backend="triton"), want)


def test_memory_refused_before_allocation(monkeypatch):
    """C = 100000 channels need a float64 C x C matrix (80 GB) per image, even for 2 pixels: a clear
    error up front. With a small memory limit, a moderate input is refused the same way."""
    from primaps_fast import _dispatch

    monkeypatch.setattr(_dispatch, "device_memory", lambda device: 64 * 2**30)  # not this machine's memory
    with pytest.raises(ValueError, match=r"features: .*100000 x 100000 covariance.*GiB"):
        primaps_fast.principal_masks(torch.randn(1, 100_000, 1, 2), backend="cpu")
    # the reference never forms a C x C matrix: two random (near-orthogonal) pixels, two proposals
    assert reference.principal_masks(torch.randn(1, 100_000, 1, 2)).counts.tolist() == [2]
    monkeypatch.setattr(_dispatch, "device_memory", lambda device: 2**20)
    with pytest.raises(ValueError, match=r"features: .*more than the 0.0 GiB of memory of this CPU device"):
        primaps_fast.principal_masks(torch.randn(2, 512, 4, 4), backend="cpu")
    assert primaps_fast.principal_masks(torch.randn(2, 16, 4, 4), backend="cpu").counts.shape == (2,)


def test_max_masks_beyond_pixels_is_no_cap(rng):
    f = low_rank_features(2, 16, 5, 6, rng)
    want = primaps_fast.principal_masks(f, max_masks=None, backend="cpu")
    assert_same_proposals(primaps_fast.principal_masks(f, max_masks=2**63 - 1, backend="cpu"), want)


# ---- GPU: the CUDA and Triton backends on CUDA tensors; skipped, with the reason, without a GPU ----

def skip_gpu_unavailable(backend):
    if not torch.cuda.is_available():
        pytest.skip(f"principal_masks backend={backend!r} on CUDA tensors: needs an NVIDIA GPU (none here)")
    if backend == "cuda":
        try:
            from primaps_fast import _C_cuda  # noqa: F401
        except ImportError:
            pytest.skip("CUDA backend: primaps_fast._C_cuda was not built (no nvcc at build time, or "
                        "PRIMAPS_FAST_CUDA=0)")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton on CUDA tensors: TRITON_INTERPRET=1 (run with PRIMAPS_FAST_TEST_DEVICE=cuda)")


GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("B,C,h,w", [(1, 3, 5, 7), (3, 64, 9, 7), (2, 384, 11, 13), (1, 768, 7, 9)])
@pytest.mark.parametrize("kind", ["scenes", "low_rank"])
def test_gpu_matches_reference(backend, B, C, h, w, kind, rng):
    skip_gpu_unavailable(backend)
    f = scenes_features(B, C, h, w, seed=C + h) if kind == "scenes" else low_rank_features(B, C, h, w, rng)
    got = primaps_fast.principal_masks(f.cuda(), backend=backend)
    assert got.masks.is_cuda and got.counts.is_cuda
    want = reference.principal_masks(f)
    assert_same_proposals(type(got)(got.masks.cpu(), got.counts.cpu()), want)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_edge_cases_and_options(backend, rng):
    """Constant, zero and one-pixel images, the caps and thresholds, the scale, and pure noise (whose
    proposals are checked for their invariants and determinism: the reference is not converged there)."""
    skip_gpu_unavailable(backend)
    pm = primaps_fast.principal_masks
    const = torch.randn(16, 1, 1, generator=rng).expand(16, 5, 3)
    out = pm(torch.stack([const, torch.zeros(16, 5, 3)]).cuda(), backend=backend)
    assert out.counts.tolist() == [1, 0] and torch.equal(out.masks[0, 0].cpu(), torch.ones(5, 3))
    assert pm(torch.randn(7, 1, 1).cuda(), backend=backend).counts.tolist() == [1]
    f = low_rank_features(3, 32, 9, 11, rng)
    full = pm(f.cuda(), backend=backend)
    capped = pm(f.cuda(), max_masks=2, backend=backend)
    assert capped.counts.tolist() == full.counts.clamp(max=2).tolist()
    torch.testing.assert_close(capped.masks, full.masks[:, :2])
    strict = pm(f.cuda(), threshold=0.9, backend=backend)
    want = reference.principal_masks(f, threshold=0.9)
    assert_same_proposals(type(strict)(strict.masks.cpu(), strict.counts.cpu()), want)
    for scale in (2.0**-100, 1e-35, 1e30):
        assert_same_proposals(pm(f.cuda() * scale, backend=backend), full)
    noise = noise_features(2, 128, 20, 19, seed=5)
    got = pm(noise.cuda(), max_masks=None, backend=backend)
    assert (got.counts > 300).all()  # mostly one-pixel proposals (the anchors may differ from the C++ ones)
    support = (got.masks > 0).sum(1)
    assert support.max() <= 1 and (support.float().mean((1, 2)) >= 0.95).all()
    assert torch.equal(pm(noise.cuda(), backend=backend).counts.cpu(), torch.tensor([254, 254]))
    again = pm(noise.cuda(), max_masks=None, backend=backend)
    assert torch.equal(again.masks, got.masks)  # the same result on every run
