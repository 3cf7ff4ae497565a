"""dense_crf, 10 iterations: pydensecrf2 (one image at a time, one thread, as the official code) against
the C++ kernel, after checking that they agree.

- Clean synthetic scenes, 320x320 (BGR), 7 labels, batches of 1 and 8: pydensecrf vs the reference port
  vs C++ vs Triton (CUDA only); and a batch of smooth colour fields (large bilateral lattices).
- Textured synthetic scenes (``make_scenes(texture=24)``: per-pixel colour texture, bilateral lattices of
  about 3 vertices per pixel) and photographs bundled with scikit-image (``bench`` extra; ``astronaut``,
  ``coffee``), 320-640 px, 3, 7 and 27 labels: pydensecrf against C++ on one thread (``cpu-1``) and on
  every thread (``cpu-all``, ``torch.get_num_threads()``, one image). Each case prints its lattice sizes,
  the argmax agreement and max |dQ| against pydensecrf, and the speed-up.
- The same rows split into time per mean-field iteration and the rest (lattices, unary), each side on
  one thread, against the memory floor of an iteration (``-k floor``).

With ``--benchmark-disable`` (CI) every case runs once, on images 4x smaller.

Where the C++ time goes: moving label rows (V floats: labels padded to a multiple of 4) through the
two lattices. Per iteration, per kernel with d+1 remainders and M vertices: a splat that gathers (d+1) N
rows, d+1 blur passes over M rows (each reading two neighbours), a slice that gathers (d+1) N rows, and
an update pass that exchanges two rows per pixel between the bilateral's pixel order and raster order.
Textured images and photographs have bilateral lattices of 0.6-3.5 N vertices (clean scenes ~0.6 N),
so the update pass (32-43 % of an iteration), the bilateral blur and the bilateral splat dominate;
building the lattices (elevation, radix sort of N (d+1) keys, neighbour merges) is 15-40 % of an image.
"""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from primaps_fast import _dispatch
from primaps_fast.data.synthetic import make_scenes
from primaps_fast.ops.dense_crf import dense_crf_list
from side_by_side import requires_cuda, time_side_by_side

L = 7
ALL_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def shrink(request):
    """4 when timings are off (CI runs every case once on smaller images), else 1."""
    return 4 if request.config.getoption("benchmark_disable") else 1


@pytest.fixture(scope="module")
def inputs(shrink):
    S = 320 // shrink
    s = make_scenes(8, image_size=S, seed=0)
    images = s.images.flip(1).contiguous()  # BGR, as the official pipeline
    g = torch.Generator().manual_seed(0)
    logits = F.avg_pool2d(F.pad(torch.randn(8, L, S // 8, S // 8, generator=g) * 2, (1, 1, 1, 1), mode="replicate"),
                          3, 1)
    probs = torch.softmax(F.interpolate(logits * 3, size=(S, S), mode="bilinear", align_corners=False), 1)
    return images, list(probs)


def _pydensecrf(images, probs):
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is an optional comparison")
    # Imported here: crf_before_after.py imports this file against builds older than official_crf.
    from primaps_fast.reference.official_crf import pydensecrf_marginals

    return [pydensecrf_marginals(img, p) for img, p in zip(images, probs)]


def _run(provider, images, probs):
    if provider == "pydensecrf":
        return _pydensecrf(images, probs)
    if provider == "triton":
        return [q.cpu() for q in dense_crf_list(images.cuda(), [p.cuda() for p in probs], backend="triton")]
    return dense_crf_list(images, probs, backend=provider)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("provider", ["pydensecrf", "reference", "cpu", pytest.param("triton", marks=requires_cuda)])
def test_dense_crf(benchmark, inputs, provider, batch):
    if provider == "reference" and batch == 8:
        pytest.skip("the reference is timed on one image only (several seconds per image)")
    images, probs = inputs[0][:batch], inputs[1][:batch]
    benchmark.group = f"dense_crf {batch}x{images.shape[2]}x{images.shape[3]}, {L} labels"
    got = _run(provider, images, probs)
    if provider != "pydensecrf":  # agreement with the exact port before timing
        want = dense_crf_list(images[:1], probs[:1], backend="cpu")[0]
        assert (got[0].argmax(0) == want.argmax(0)).float().mean() >= 0.999
        assert (got[0] - want).abs().max() < 1e-3
    speedup = time_side_by_side(benchmark, lambda: _run(provider, images, probs), case=("dense_crf", batch),
                                provider=provider, per=batch, baseline="pydensecrf", warmup_rounds=1,
                                rounds=1 if provider == "reference" else 3)
    if speedup is not None:
        print(f"\ndense_crf {provider} batch {batch}: {benchmark.extra_info['ms_per_image']:.1f} ms/image, "
              f"{speedup:.2f}x pydensecrf")


@pytest.mark.parametrize("provider", ["pydensecrf", "cpu"])
def test_dense_crf_large_lattice(benchmark, inputs, provider):
    """Batch of 8 smooth colour fields (bicubic from 10x10): every pixel lands in new bilateral simplices,
    ~378k vertices instead of ~65k, so the blur streams ~12 MB per axis and the time is memory bandwidth."""
    S = inputs[0].shape[-1]
    benchmark.group = f"dense_crf 8x{S}x{S} smooth images (large bilateral lattice), {L} labels"
    g = torch.Generator().manual_seed(3)
    field = F.interpolate(torch.rand(8, 3, 10, 10, generator=g), size=(S, S), mode="bicubic", align_corners=False)
    images = (field.clamp(0, 1) * 255).to(torch.uint8)
    probs = inputs[1]
    speedup = time_side_by_side(benchmark, lambda: _run(provider, images, probs), case="dense_crf_large",
                                provider=provider, per=8, baseline="pydensecrf", warmup_rounds=1, rounds=3)
    if speedup is not None:
        print(f"\ndense_crf cpu, large lattices: {speedup:.2f}x pydensecrf")


# (image, longer side in pixels, labels): the rows of the textured / photograph table.
SCENES = [("textured", 320, 3), ("textured", 320, 7), ("textured", 320, 27), ("textured", 480, 7),
          ("textured", 640, 7), ("astronaut", 320, 3), ("astronaut", 320, 7), ("astronaut", 320, 27),
          ("coffee", 320, 3), ("astronaut", 480, 7), ("astronaut", 640, 3)]
_scene_cache = {}


def _inputs(kind, size, labels):
    """BGR image (3, H, W) and smooth probabilities (labels, H, W): logits at 1/8 resolution, upsampled."""
    if kind == "textured":
        img = make_scenes(1, image_size=size, texture=24.0, seed=size).images[0]
    else:
        data = pytest.importorskip("skimage.data", reason="scikit-image (bench extra) provides the photographs")
        x = torch.from_numpy(getattr(data, kind)()).permute(2, 0, 1).float()[None]
        H, W = x.shape[-2:]
        shape = (size, round(W * size / H)) if H >= W else (round(H * size / W), size)
        img = F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=True)[0]
        img = img.round().clamp(0, 255).to(torch.uint8)
    img = img.flip(0).contiguous()
    H, W = img.shape[1:]
    g = torch.Generator().manual_seed(labels)
    logits = F.avg_pool2d(F.pad(torch.randn(1, labels, max(1, H // 8), max(1, W // 8), generator=g) * 2,
                                (1, 1, 1, 1), mode="replicate"), 3, 1) * 3
    probs = torch.softmax(F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False), 1)[0]
    return img, probs


def _scene(kind, size, labels):
    """_inputs, the lattice sizes and pydensecrf's marginals, computed once per case."""
    key = (kind, size, labels)
    if key not in _scene_cache:
        img, probs = _inputs(kind, size, labels)
        sizes = _dispatch.cpp().dense_crf_lattice_sizes(img[None].numpy(), 1.0, 67.0, 3.0, ALL_THREADS)
        _scene_cache[key] = img, probs, sizes, _pydensecrf([img], [probs])[0]
    return _scene_cache[key]


def _cpu(image, probs, threads, iterations=10):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return dense_crf_list(image[None], [probs], iterations=iterations, backend="cpu")[0]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind,size,labels,provider",
                         [(k, s, n, p) for k, s, n in SCENES for p in ("pydensecrf", "cpu-1", "cpu-all")])
def test_dense_crf_scenes(benchmark, shrink, kind, size, labels, provider):
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is the baseline of these cases")
    img, probs, (m_gauss, (m_bil,)), want = _scene(kind, size // shrink, labels)
    H, W = img.shape[1:]
    benchmark.group = (f"dense_crf {kind} {H}x{W}, {labels} labels (lattices: Gaussian {m_gauss:,}, "
                       f"bilateral {m_bil:,} vertices = {m_bil / (H * W):.2f} per pixel)")
    benchmark.extra_info.update(vertices_gaussian=m_gauss, vertices_bilateral=m_bil)
    threads = 1 if provider in ("pydensecrf", "cpu-1") else ALL_THREADS

    def fn():
        return _pydensecrf([img], [probs]) if provider == "pydensecrf" else _cpu(img, probs, threads)

    if provider != "pydensecrf":  # agreement with pydensecrf before timing
        got = fn()
        agree = (got.argmax(0) == want.argmax(0)).float().mean().item()
        max_dq = (got - want).abs().max().item()
        benchmark.extra_info.update(agreement=agree, max_dq=max_dq)
        assert agree >= 0.995 and max_dq < 1e-3, (agree, max_dq)
    speedup = time_side_by_side(benchmark, fn, case=(kind, size, labels), provider=provider, baseline="pydensecrf",
                                warmup_rounds=0 if provider == "pydensecrf" else 1, rounds=3)
    if speedup is not None:
        print(f"\ndense_crf {kind} {H}x{W} L={labels} {provider} ({threads} thread{'s' * (threads > 1)}): "
              f"{benchmark.extra_info['ms_per_image']:.0f} ms, {speedup:.2f}x pydensecrf; agreement "
              f"{benchmark.extra_info['agreement']:.5f}, max |dQ| {benchmark.extra_info['max_dq']:.1e}; "
              f"vertices {m_gauss:,} Gaussian, {m_bil:,} bilateral")


def _best_ms(fn, rounds=3):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _copy_bandwidth():
    """Single-thread copy bandwidth of this machine, bytes read + written per second (256 MiB arrays, far
    beyond the caches): the rate at which a pass that streams its arrays once can run."""
    a = np.ones(1 << 25)
    b = np.empty_like(a)
    return 2 * a.nbytes / (_best_ms(lambda: np.copyto(b, a), 5) / 1e3)


def _bytes_per_iteration(N, m_gauss, m_bil, labels):
    """Bytes one mean-field iteration must move when every pass streams each of its arrays exactly once:
    per lattice (M vertices, D = d + 1 remainders) a splat (N rows read, M rows written, N D (index,
    weight) pairs), D blur passes (M rows read and written, two neighbour indices per vertex) and a
    slice (M rows, N D pairs); then the update (the unary read, two rows written for the next splats,
    the Gaussian slice written and read). Rows are V = labels rounded up to 4 floats, as the kernel's."""
    row = 4 * ((labels + 3) // 4 * 4)

    def lattice(M, D):
        return (N * row + M * row + 8 * N * D) + D * (2 * M * row + 8 * M) + (M * row + 8 * N * D)

    return lattice(m_gauss, 3) + lattice(m_bil, 6) + 5 * N * row


@pytest.mark.parametrize("kind,size,labels", SCENES)
def test_dense_crf_floor(benchmark, shrink, kind, size, labels):
    """Where the time goes, one thread each side: per mean-field iteration and the rest (building the
    lattices, the unary), against the memory floor of one iteration (the bytes it must move at the
    single-thread copy bandwidth; arrays that fit the caches can beat it). Ours: (t(10) - t(1)) / 9 and
    t(10) - 10 x that; pydensecrf: its ``inference(10)`` / 10, and its set-up (kernels and lattices)."""
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is the baseline of these cases")
    from primaps_fast.reference.official_crf import pydensecrf_model

    img, probs, (m_gauss, (m_bil,)), _ = _scene(kind, size // shrink, labels)
    H, W = probs.shape[1:]
    benchmark.group = f"dense_crf floor {kind} {H}x{W}, {labels} labels"

    def ours(iterations):
        return _cpu(img, probs, 1, iterations)

    def theirs():
        """(set-up ms, inference(10) ms)"""
        t = time.perf_counter()
        d = pydensecrf_model(img, probs)
        t1 = time.perf_counter()
        d.inference(10)
        return (t1 - t) * 1e3, (time.perf_counter() - t1) * 1e3

    benchmark.pedantic(ours, args=(10,), rounds=1, iterations=1, warmup_rounds=0)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test
        return
    t10, t1 = _best_ms(lambda: ours(10), 5), _best_ms(lambda: ours(1), 5)
    runs = [theirs() for _ in range(3)]
    setup, inference = min(r[0] for r in runs), min(r[1] for r in runs)
    rows = {"ours": ((t10 - t1) / 9, t10 - 10 * (t10 - t1) / 9), "pydensecrf": (inference / 10, setup)}
    nbytes = _bytes_per_iteration(H * W, m_gauss, m_bil, labels)
    floor = nbytes / _copy_bandwidth() * 1e3
    benchmark.extra_info.update(floor_ms_per_iteration=floor, bytes_per_iteration=nbytes,
                                **{f"{k}_ms_per_iteration": v[0] for k, v in rows.items()},
                                **{f"{k}_ms_rest": v[1] for k, v in rows.items()})
    print(f"\n{kind} {H}x{W} L={labels}: floor {floor:.1f} ms/iteration ({nbytes / 2**20:.0f} MiB); "
          + "; ".join(f"{k} {it:.1f} ms/iteration ({it / floor:.1f}x floor) + {rest:.0f} ms rest"
                      for k, (it, rest) in rows.items()))
