"""principal_masks: reference (official loop, pca_lowrank) vs C++ (and the GPU backends on a GPU), on 8
synthetic 384 x 40 x 40 scenes and on pure-noise features.

FLOP floor of the C++ path per image (C = 384, N = 1600): the covariance SYRK C^2 N / 2 FMAs = 118 M
FMAs (0.24 GFLOP) once, plus downdates of min(k, n - k) pixels per proposal (about as much again over
the loop on scenes), plus the eigen solver: products of one vector with the C x C covariance (C^2 FMAs
from its lower triangle), about 8 + 30 per proposal on noise, fewer on scenes. On noise every proposal
is about one pixel, so the loop is ~1500 proposals without a cap (254 with the default one); the
reference is timed on the first 8 of them (seconds each), the fast backends also on the whole loop.
"""
import pytest
import torch

import primaps_fast
from primaps_fast import reference
from primaps_fast.data.synthetic import make_scenes
from side_by_side import requires_cuda, time_side_by_side


def _cuda_built():
    try:
        from primaps_fast import _C_cuda  # noqa: F401
    except ImportError:
        return False
    return True


requires_cuda_backend = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cuda_built()),
    reason="CUDA timings need a CUDA device and primaps_fast._C_cuda (built when nvcc is found)")
GPU = ("triton", "cuda")
FAST = ["cpu", pytest.param("triton", marks=requires_cuda), pytest.param("cuda", marks=requires_cuda_backend)]
PROVIDERS = ["reference"] + FAST


@pytest.fixture(scope="module")
def features():
    return make_scenes(8, image_size=320, dim=384).features


@pytest.fixture(scope="module")
def want(features):
    return reference.principal_masks(features)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(1, 384, 40, 40, generator=torch.Generator().manual_seed(0))


def _on(x, provider):
    return x.cuda() if provider in GPU else x


def _check(got, want):
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.masks > 0, want.masks > 0)
    torch.testing.assert_close(got.masks, want.masks, atol=1e-5, rtol=0)


@pytest.mark.benchmark(group="principal_masks 8x384x40x40")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_principal_masks(benchmark, features, want, provider):
    x = _on(features, provider)
    if provider != "reference":
        got = primaps_fast.principal_masks(x, backend=provider)
        _check(type(got)(got.masks.cpu(), got.counts.cpu()), want)
    speedup = time_side_by_side(benchmark, lambda: primaps_fast.principal_masks(x, backend=provider),
                                case="principal_masks", provider=provider, per=x.shape[0],
                                rounds=2 if provider == "reference" else 10)
    if speedup is not None:
        print(f"\nprincipal_masks {provider}: {benchmark.extra_info['ms_per_image']:.2f} ms/image, "
              f"{speedup:.1f}x faster than the reference")


NOISE_PROPOSALS = 8  # of the reference, ~1-6 s each on the 2-core CI machine


@pytest.mark.benchmark(group="principal_masks noise 1x384x40x40, first 8 proposals")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_principal_masks_noise(benchmark, noise, provider):
    """One-pixel proposals: every backend reaches the cap; the proposals themselves are not compared
    (on a flat spectrum the reference's pca_lowrank is not converged)."""
    x = _on(noise, provider)
    run = lambda: primaps_fast.principal_masks(x, max_masks=NOISE_PROPOSALS, backend=provider)  # noqa: E731
    out = run()
    assert out.counts.tolist() == [NOISE_PROPOSALS] and (out.masks > 0).sum(1).max() <= 1
    speedup = time_side_by_side(benchmark, run, case="principal_masks_noise", provider=provider,
                                per=NOISE_PROPOSALS, unit="proposal", rounds=1 if provider == "reference" else 5)
    if speedup is not None:
        print(f"\nprincipal_masks noise {provider}: {benchmark.extra_info['ms_per_proposal']:.2f} ms/proposal, "
              f"{speedup:.1f}x faster than the reference")


@pytest.mark.benchmark(group="principal_masks noise 1x384x40x40, whole loop")
@pytest.mark.parametrize("max_masks", [254, None], ids=["default cap", "no cap"])
@pytest.mark.parametrize("provider", FAST)
def test_principal_masks_noise_whole_loop(benchmark, noise, provider, max_masks):
    x = _on(noise, provider)
    run = lambda: primaps_fast.principal_masks(x, max_masks=max_masks, backend=provider)  # noqa: E731
    count = int(run().counts[0])
    assert count == 254 if max_masks else count > 1400
    time_side_by_side(benchmark, run, case=f"principal_masks_noise_{max_masks}", provider=provider, per=1,
                      rounds=3)
    if benchmark.stats is not None:
        print(f"\nprincipal_masks noise {provider} max_masks={max_masks}: {count} proposals, "
              f"{benchmark.extra_info['ms_per_image'] / 1e3:.2f} s/image")
