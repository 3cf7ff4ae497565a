"""primaps_fast.pydensecrf against pydensecrf2, one thread each (pydensecrf is single-threaded;
``primaps_fast-all``: ours on every thread of ``torch.get_num_threads()``, its default), after checking
that they agree (100 % argmax, max |dQ| <= 1e-4).

- ``DenseCRF2D`` on photographs bundled with scikit-image (``bench`` extra), longer side 320 px, 3 / 7 /
  27 labels, the official PriMaPs settings (Gaussian sxy=1 compat=3, bilateral sxy=67 srgb=3 compat=4,
  10 iterations): the optimised kernel of ``primaps_fast.dense_crf`` runs it. Timed from constructing
  the CRF to the marginals, as a caller sees it.
- The general path (``DenseCRF.addPairwiseEnergy``) on a 48^3 volume of blocky noisy colours, 5 labels,
  5 iterations: d = 3 (positions / 3) and d = 6 (positions / 10, colours / 20).

Each row prints the ratio (pydensecrf time / ours); the README reports the worst. With
``--benchmark-disable`` (CI) every case runs once on inputs 4x smaller per axis.
"""
import numpy as np
import pytest
import torch

from side_by_side import time_side_by_side

PROVIDERS = ["pydensecrf", "primaps_fast", "primaps_fast-all"]
ALL_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def shrink(request):
    return 4 if request.config.getoption("benchmark_disable") else 1


@pytest.fixture
def threads(provider):
    """One thread, or all of them for ``primaps_fast-all`` (primaps_fast follows torch's setting)."""
    torch.set_num_threads(ALL_THREADS if provider.endswith("-all") else 1)
    yield
    torch.set_num_threads(ALL_THREADS)


def module(provider):
    if provider == "pydensecrf":
        d = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is an optional comparison")
        assert not d.__name__.startswith("primaps_fast")
        return d
    import primaps_fast.pydensecrf.densecrf as d  # both primaps_fast providers

    return d


def unary(L, shape, seed):
    """float32 (L, prod(shape)) unary of smooth probabilities: logits on a grid 8x coarser, repeated."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((L, *[s // 8 + 1 for s in shape])).astype(np.float32) * 3
    logits = coarse[(slice(None), *np.ix_(*[np.arange(s) // 8 for s in shape]))]
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    return np.ascontiguousarray(-np.log(np.clip(p, 1e-5, 1)).reshape(L, -1), dtype=np.float32)


def photo(name, size):
    data = pytest.importorskip("skimage.data", reason="scikit-image (bench extra) provides the photographs")
    x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None]
    H, W = x.shape[-2:]
    shape = (size, round(W * size / H) // 4 * 4) if H >= W else (round(H * size / W) // 4 * 4, size)
    x = torch.nn.functional.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return np.ascontiguousarray(x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()[..., ::-1])


def check_agreement(run):
    """Ours against pydensecrf2 where it is installed (without it, ours is timed alone: the tests check it)."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return
    theirs, ours = np.array(run(module("pydensecrf"))), np.array(run(module("primaps_fast")))
    assert (theirs.argmax(0) == ours.argmax(0)).all()
    assert np.abs(theirs - ours).max() <= 1e-4


def report(benchmark, run, provider, case):
    speedup = time_side_by_side(benchmark, lambda: run(module(provider)), case=case, provider=provider, rounds=5,
                                baseline="pydensecrf", warmup_rounds=1)
    if speedup is not None:
        threads = f"{ALL_THREADS} threads" if provider.endswith("-all") else "one thread"
        print(f"\n{case}, {provider} on {threads}: {benchmark.extra_info['ms_per_image']:.1f} ms, "
              f"{speedup:.2f}x pydensecrf")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("labels", [3, 7, 27])
@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_dense_crf_2d(benchmark, shrink, threads, name, labels, provider):
    img = photo(name, 320 // shrink)
    H, W, _ = img.shape
    U = unary(labels, (H, W), labels)
    benchmark.group = f"pydensecrf DenseCRF2D {name} {H}x{W}, {labels} labels, 10 iterations"

    def run(m):
        crf = m.DenseCRF2D(W, H, labels)
        crf.setUnaryEnergy(U)
        crf.addPairwiseGaussian(sxy=1, compat=3)
        crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=img, compat=4)
        return crf.inference(10)

    if provider == "primaps_fast":
        check_agreement(run)
    report(benchmark, run, provider, f"DenseCRF2D {name} {H}x{W} {labels} labels")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("d", [3, 6])
def test_general_volume(benchmark, shrink, threads, d, provider):
    S, L = 48 // shrink, 5
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (S // 8 + 1,) * 3 + (3,))
    idx = np.arange(S) // 8
    vol = blocks[np.ix_(idx, idx, idx)].astype(np.float32) + rng.normal(0, 10, (S, S, S, 3))
    vol = np.clip(vol, 0, 255).astype(np.uint8)
    from primaps_fast.pydensecrf import utils

    feats = (utils.create_pairwise_gaussian((3, 3, 3), (S, S, S)) if d == 3
             else utils.create_pairwise_bilateral((10, 10, 10), (20, 20, 20), vol, chdim=3))
    feats = np.ascontiguousarray(feats)
    U = unary(L, (S, S, S), 1)
    benchmark.group = f"pydensecrf DenseCRF {S}^3 volume, d = {d}, {L} labels, 5 iterations"

    def run(m):
        crf = m.DenseCRF(S ** 3, L)
        crf.setUnaryEnergy(U)
        crf.addPairwiseEnergy(feats, compat=3.0)
        return crf.inference(5)

    if provider == "primaps_fast":
        check_agreement(run)
    report(benchmark, run, provider, f"volume {S}^3 d={d}")
