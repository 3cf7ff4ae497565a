"""Triton backend of median_filter: 3x3 median with reflect padding, one program per block of pixels of
one plane (CUDA; runs on the CPU with TRITON_INTERPRET=1 for tests)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reflect(i, n):
    # index -1 -> 1 and n -> n - 2 (F.pad reflect); a 1-pixel axis reads its only pixel
    i = tl.where(i < 0, -i, i)
    i = tl.where(i >= n, 2 * n - 2 - i, i)
    return tl.where(n == 1, 0, i)


@triton.jit
def _med3(a, b, c):
    return tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), c))


@triton.jit
def _sorted_column(base, yu, y, yd, xc, w, inside):
    # (min, median, max) of the vertical triple of rows yu, y, yd at column xc
    a = tl.load(base + yu * w + xc, mask=inside, other=0.0)
    b = tl.load(base + y * w + xc, mask=inside, other=0.0)
    c = tl.load(base + yd * w + xc, mask=inside, other=0.0)
    return tl.minimum(tl.minimum(a, b), c), _med3(a, b, c), tl.maximum(tl.maximum(a, b), c)


@triton.jit
def _median3x3_kernel(x_ptr, out_ptr, h, w, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < h * w
    y = offs // w
    x = offs % w
    base = x_ptr + plane * h * w
    xl = _reflect(x - 1, w)
    xr = _reflect(x + 1, w)
    # sort each vertical triple (columns xl, x, xr); the median of 9 is
    # med3(max of the minima, med3 of the medians, min of the maxima)
    yu = _reflect(y - 1, h)
    yd = _reflect(y + 1, h)
    lo0, m0, hi0 = _sorted_column(base, yu, y, yd, xl, w, inside)
    lo1, m1, hi1 = _sorted_column(base, yu, y, yd, x, w, inside)
    lo2, m2, hi2 = _sorted_column(base, yu, y, yd, xr, w, inside)
    lo_max = tl.maximum(tl.maximum(lo0, lo1), lo2)
    hi_min = tl.minimum(tl.minimum(hi0, hi1), hi2)
    tl.store(out_ptr + plane * h * w + offs, _med3(lo_max, _med3(m0, m1, m2), hi_min), mask=inside)


def median_filter_triton(masks: torch.Tensor) -> torch.Tensor:
    """masks (..., h, w) float -> float32 3x3 median, reflect padding, same shape."""
    h, w = masks.shape[-2:]
    planes = masks.detach().float().contiguous().reshape(-1, h, w)
    out = torch.empty_like(planes)
    block = min(1024, triton.next_power_of_2(h * w))
    _median3x3_kernel[(planes.shape[0], triton.cdiv(h * w, block))](planes, out, h, w, BLOCK=block)
    return out.reshape(masks.shape)
