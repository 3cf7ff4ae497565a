"""median_filter: C++, Triton and CUDA against the reference (official MedianPool2d semantics) and numpy."""
import numpy as np
import pytest
import torch

import primaps_fast
from primaps_fast import reference
from primaps_fast._dispatch import triton_available

from cuda_backend import GPU_BACKENDS, requires_cuda_backend


def numpy_median3x3(x):
    """Independent oracle: numpy median over the 9 shifted copies of a reflect-padded plane."""
    modes = ["reflect" if n > 1 else "edge" for n in x.shape[-2:]]  # 1-pixel axes: replicate
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (0, 0)], mode=modes[0])
    p = np.pad(p, [(0, 0)] * (x.ndim - 1) + [(1, 1)], mode=modes[1])
    h, w = x.shape[-2:]
    stack = [p[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return np.median(np.stack(stack), axis=0)


SHAPES = [(2, 3, 9, 7), (1, 1, 1, 1), (1, 2, 1, 5), (3, 4, 2, 1), (5, 40, 40), (6, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_matches_reference_and_numpy(shape, rng):
    x = torch.randn(shape, generator=rng).clamp_min(0)  # proposals: many exact zeros (ties)
    got = primaps_fast.median_filter(x, backend="cpu")
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, reference.median_filter(x))
    np.testing.assert_array_equal(got.numpy(), numpy_median3x3(x.numpy()))


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (2, 1, 4), (3, 2, 1)])
def test_triton_matches_reference(shape, rng):
    if not triton_available():
        pytest.skip("triton not available")
    x = torch.randn(shape, generator=rng).clamp_min(0)
    assert torch.equal(primaps_fast.median_filter(x, backend="triton"), reference.median_filter(x))


def test_known_answer_and_zero_rows():
    x = torch.zeros(2, 5, 5)
    x[0, 2, 2] = 1.0  # an isolated pixel is removed
    x[0, :, 3:] = 0.5  # a 2-pixel band at the border survives, reflected at the border
    x[1, :, 0] = 0.5  # a 1-pixel line is removed (its reflected neighbours are zero)
    out = primaps_fast.median_filter(x, backend="cpu")
    assert out[0, 2, 2] == 0 and (out[0, :, 3:] == 0.5).all() and not out[0, :, :3].any()
    assert not out[1].any()
    assert not primaps_fast.median_filter(torch.zeros(3, 4, 4), backend="cpu").any()


def test_bad_inputs():
    with pytest.raises(ValueError, match="masks"):
        primaps_fast.median_filter(torch.ones(3))
    with pytest.raises(TypeError, match="masks"):
        primaps_fast.median_filter(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="masks"):
        primaps_fast.median_filter(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="masks"):
        primaps_fast.median_filter(torch.ones(2, 0, 3))


# ---- GPU: the CUDA and Triton backends on CUDA tensors; skipped, with the reason, without a GPU ----

def gpu_median(x, backend):
    return primaps_fast.median_filter(x, backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [(3, 70, 33), (300, 5, 6), (2, 1, 1, 9)])
def test_gpu_matches_cpu_and_reference(shape, backend, rng):
    x = torch.randn(shape, generator=rng).clamp_min(0)
    got = gpu_median(x.cuda(), backend)
    assert got.is_cuda and got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got.cpu(), primaps_fast.median_filter(x, backend="cpu"))
    assert torch.equal(got, reference.median_filter(x.cuda()))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_known_answer(backend):
    x = torch.zeros(2, 5, 5)
    x[0, 2, 2] = 1.0
    x[0, :, 3:] = 0.5
    got = gpu_median(x.cuda(), backend).cpu()
    assert got[0, 2, 2] == 0 and (got[0, :, 3:] == 0.5).all() and not got[0, :, :3].any() and not got[1].any()


@requires_cuda_backend
def test_cuda_custom_op(rng):
    import primaps_fast.ops.median_filter  # noqa: F401  (defines the op, registers its CUDA kernel)

    planes = torch.rand(5, 7, 9, generator=rng).cuda()
    torch.library.opcheck(torch.ops.primaps_fast.median_filter.default, (planes,))
    assert torch.equal(torch.ops.primaps_fast.median_filter(planes).cpu(), primaps_fast.median_filter(planes.cpu()))
