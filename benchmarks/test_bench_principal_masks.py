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
from side_by_side import PROVIDERS, time_side_by_side


@pytest.fixture(scope="module")
def features():
    return make_scenes(8, image_size=320, dim=384).features


@pytest.fixture(scope="module")
def want(features):
    return reference.principal_masks(features)


def _check(got, want):
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.masks > 0, want.masks > 0)
    torch.testing.assert_close(got.masks, want.masks, atol=1e-5, rtol=0)


@pytest.mark.benchmark(group="principal_masks 8x384x40x40")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_principal_masks(benchmark, features, want, provider):
    x = features.cuda() if provider == "triton" else features
    if provider != "reference":
        got = primaps_fast.principal_masks(x, backend=provider)
        _check(type(got)(got.masks.cpu(), got.counts.cpu()), want)
    speedup = time_side_by_side(benchmark, lambda: primaps_fast.principal_masks(x, backend=provider),
                                case="principal_masks", provider=provider, per=x.shape[0],
                                rounds=2 if provider == "reference" else 10)
    if speedup is not None:
        print(f"\nprincipal_masks {provider}: {benchmark.extra_info['ms_per_image']:.2f} ms/image, "
              f"{speedup:.1f}x faster than the reference")
