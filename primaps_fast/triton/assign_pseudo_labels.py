"""Triton backend of assign_pseudo_labels: one kernel computes the per-pixel argmax of the bilinearly
upsampled scores (PyTorch's align_corners=False arithmetic, no (B, K, H, W) tensor); the per-mask
majority is a bincount over (image, mask, class) keys (CUDA; runs on the CPU with TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from primaps_fast.triton.bilinear import bilinear_sample, bilinear_taps, source_scale


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, K, h, w, H, W, scale_y, scale_x, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < H * W
    y = offs // W
    x = offs % W
    y0, y1, hy0, hy1 = bilinear_taps(y, scale_y, h, H)
    x0, x1, wx0, wx1 = bilinear_taps(x, scale_x, w, W)
    base = x_ptr + b * K * h * w
    best = tl.zeros([BLOCK], dtype=tl.int32)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    for k in range(K):
        v = bilinear_sample(base + k * h * w, y0, y1, x0, x1, hy0, hy1, wx0, wx1, w, inside)
        take = (v > best_v) | (k == 0)  # first maximum
        best = tl.where(take, k, best)
        best_v = tl.where(take, v, best_v)
    tl.store(out_ptr + b * H * W + offs, best.to(tl.int64), mask=inside)


def upsampled_argmax_triton(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, bilinear, align_corners=False).argmax(1)`` as int64 ``(B, H, W)``."""
    B, K, h, w = x.shape
    H, W = size
    out = torch.empty(B, H, W, dtype=torch.int64, device=x.device)
    block = 128
    grid = (B, triton.cdiv(H * W, block))
    _argmax_kernel[grid](x, out, K, h, w, H, W, source_scale(h, H), source_scale(w, W), BLOCK=block)
    return out


def assign_pseudo_labels_triton(x: torch.Tensor, ids: torch.Tensor, num_ids: int, ignore: int,
                                ignore_class: int) -> torch.Tensor:
    """Majority class per (image, id) of the upsampled argmax, the votes for class ``ignore_class`` not
    counted (``ignore_class`` for a mask without votes); ``ignore`` where ``ids == ignore``.

    ``x``: contiguous float32 ``(B, K, h, w)``; ``ids``: int64 ``(B, H, W)`` in ``[0, num_ids)`` or ``ignore``.
    """
    B, K = x.shape[:2]
    cls = upsampled_argmax_triton(x, tuple(ids.shape[-2:]))
    valid = ids != ignore
    image = torch.arange(B, device=x.device).view(B, 1, 1).expand_as(ids)
    slot = image * num_ids + torch.where(valid, ids, 0)
    counts = torch.bincount((slot * K + cls)[valid], minlength=B * num_ids * K).view(B * num_ids, K)
    if 0 <= ignore_class < K:  # the official loop drops these votes
        counts[:, ignore_class] = 0
    winner = torch.where(counts.amax(1) > 0, counts.argmax(1), ignore_class)  # first maximum: the smallest class
    return torch.where(valid, winner[slot], torch.full_like(ids, ignore))
