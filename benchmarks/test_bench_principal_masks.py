"""principal_masks: reference (official loop, pca_lowrank) vs C++ on 8 synthetic 384 x 40 x 40 scenes.

FLOP floor of the C++ path per image (C = 384, N = 1600): the covariance SYRK C^2 N / 2 FMAs = 118 M
FMAs (0.24 GFLOP) once, plus downdates of min(k, n - k) pixels per proposal (about as much again
over the loop), plus about 6 block iterations of 8 vectors (8 C^2 FMAs = 1.2 M each) per proposal.
The benchmark prints the per-image time and the speed-up over the reference.
"""
import pytest
import torch

import primaps_fast
from primaps_fast import reference
from primaps_fast.data.synthetic import make_scenes

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton timings need a CUDA device")


@pytest.fixture(scope="module")
def features():
    return make_scenes(8, image_size=320, dim=384).features


@pytest.fixture(scope="module")
def want(features):
    return reference.principal_masks(features)


_times = {}


def _check(got, want):
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.masks > 0, want.masks > 0)
    torch.testing.assert_close(got.masks, want.masks, atol=1e-5, rtol=0)


@pytest.mark.benchmark(group="principal_masks 8x384x40x40")
@pytest.mark.parametrize("provider", ["reference", "cpu", pytest.param("triton", marks=requires_cuda)])
def test_principal_masks(benchmark, features, want, provider):
    x = features.cuda() if provider == "triton" else features
    if provider != "reference":
        got = primaps_fast.principal_masks(x, backend=provider)
        _check(type(got)(got.masks.cpu(), got.counts.cpu()), want)
    rounds = 2 if provider == "reference" else 10
    benchmark.pedantic(lambda: primaps_fast.principal_masks(x, backend=provider), rounds=rounds,
                       iterations=1, warmup_rounds=0 if provider == "reference" else 1)
    if benchmark.stats is not None:
        per_image = benchmark.stats.stats.median / x.shape[0]
        _times[provider] = per_image
        benchmark.extra_info["ms_per_image"] = per_image * 1e3
        if provider != "reference" and "reference" in _times:
            benchmark.extra_info["speedup_vs_reference"] = _times["reference"] / per_image
            print(f"\nprincipal_masks {provider}: {per_image * 1e3:.2f} ms/image, "
                  f"{_times['reference'] / per_image:.1f}x faster than the reference")
