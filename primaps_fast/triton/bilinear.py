"""Bilinear upsampling taps (``F.interpolate(mode="bilinear", align_corners=False)``) for the Triton
kernels that fuse the upsampling of class scores with what follows (assign_pseudo_labels, focal_loss,
pseudo_labels): ATen's source index and weight per output index, and the 4-tap sum in ATen's order, so
that the upsampled values round exactly as PyTorch's CPU kernel."""
from __future__ import annotations

import numpy as np
import triton
import triton.language as tl


def source_scale(size_in: int, size_out: int) -> float:
    """``in / out`` rounded to float32 as PyTorch's ``area_pixel_compute_scale`` (float32 division)."""
    return float(np.float32(size_in) / np.float32(size_out))


@triton.jit
def bilinear_taps(o, scale, n_in, n_out):
    """Source taps of output indices ``o`` along one axis: ``(i0, i1, w0, w1)``, ATen's
    ``area_pixel_compute_source_index`` and ``guard_index_and_lambda`` (an axis of equal size copies)."""
    src = scale * (o.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), n_in - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    same = n_in == n_out
    i0 = tl.where(same, o, i0)
    i1 = tl.where(same, o, i1)
    lam = tl.where(same, 0.0, lam)
    return i0, i1, 1.0 - lam, lam


@triton.jit
def bilinear_sample(src_ptr, y0, y1, x0, x1, wy0, wy1, wx0, wx1, w, mask):
    """The upsampled value from the 4 taps of a ``(h, w)`` plane at ``src_ptr`` (any broadcastable
    shapes): interpolate along the rows, then between the rows (ATen's ``upsample_bilinear2d`` order)."""
    t0 = tl.load(src_ptr + y0 * w + x0, mask=mask, other=0.0) * wx0 + \
        tl.load(src_ptr + y0 * w + x1, mask=mask, other=0.0) * wx1
    t1 = tl.load(src_ptr + y1 * w + x0, mask=mask, other=0.0) * wx0 + \
        tl.load(src_ptr + y1 * w + x1, mask=mask, other=0.0) * wx1
    return t0 * wy0 + t1 * wy1
