"""Triton backend of the pseudo-label post-processing (CUDA; TRITON_INTERPRET=1 runs it on the CPU).

From the raw proposals: the Triton median filter, then the low-resolution part (x10 gain, background,
log_softmax over at most M + 1 channels of h x w) in a few batched torch ops; the full-resolution part, bilinear upsampling (align_corners=False, ATen's
weights) fused with the arg-max (crf=False) or with the softmax the CRF starts from, is one Triton
kernel, so the (B, M + 1, H, W) logits are never written.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from primaps_fast.triton.bilinear import bilinear_sample, bilinear_taps, source_scale
from primaps_fast.triton.median_filter import median_filter_triton


@triton.jit
def _upsample_kernel(logits_ptr, counts_ptr, labels_ptr, probs_ptr, L_max, h, w, H, W, scale_y, scale_x,
                     ignore_index, WRITE_PROBS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < H * W
    oy = offs // W
    ox = offs % W
    y0, y1, wy0, wy1 = bilinear_taps(oy, scale_y, h, H)
    x0, x1, wx0, wx1 = bilinear_taps(ox, scale_x, w, W)
    L = tl.load(counts_ptr + b) + 1
    base = logits_ptr + b * L_max * h * w
    best = bilinear_sample(base, y0, y1, x0, x1, wy0, wy1, wx0, wx1, w, inside)
    arg = tl.zeros([BLOCK], dtype=tl.int64)
    for l in range(1, L):
        v = bilinear_sample(base + l * h * w, y0, y1, x0, x1, wy0, wy1, wx0, wx1, w, inside)
        arg = tl.where(v > best, l, arg)  # strict: the first maximum wins ties
        best = tl.maximum(best, v)
    if WRITE_PROBS:
        out = probs_ptr + b * L_max * H * W + offs
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for l in range(0, L):
            v = bilinear_sample(base + l * h * w, y0, y1, x0, x1, wy0, wy1, wx0, wx1, w, inside)
            e = tl.exp(v - best)
            total += e
            tl.store(out + l * H * W, e, mask=inside)
        for l in range(0, L):
            e = tl.load(out + l * H * W, mask=inside, other=0.0)
            tl.store(out + l * H * W, e / total, mask=inside)
        for l in range(L, L_max):
            tl.store(out + l * H * W, tl.zeros([BLOCK], dtype=tl.float32), mask=inside)
    else:
        arg = tl.where(arg == 0, ignore_index, arg)
        tl.store(labels_ptr + b * H * W + offs, arg, mask=inside)


def mask_logits_batched(filtered: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Median-filtered proposals (B, M, h, w) -> log-probabilities (B, M + 1, h, w), background first;
    channels beyond counts[b] + 1 are -inf (they take no part in the softmax)."""
    B, M = filtered.shape[:2]
    p = (filtered * 10).clamp(0, 1)
    nz = (p != 0).flatten(1).sum(1)
    level = p.flatten(1).sum(1) / nz.clamp_min(1)  # 0 when no value is non-zero
    bg = (level.view(B, 1, 1) - p.sum(1)).clamp(0, 1)
    logits = torch.cat([bg[:, None], p], dim=1)
    valid = torch.arange(M + 1, device=filtered.device).view(1, -1, 1, 1) <= counts.view(-1, 1, 1, 1)
    return F.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=1)


def _launch(logits, counts, size, labels, probs, ignore_index):
    B, L_max, h, w = logits.shape
    H, W = size
    block = min(1024, triton.next_power_of_2(H * W))
    grid = (B, triton.cdiv(H * W, block))
    write_probs = probs is not None
    _upsample_kernel[grid](logits.contiguous(), counts.contiguous(), labels if labels is not None else probs,
                           probs if write_probs else labels, L_max, h, w, H, W, source_scale(h, H),
                           source_scale(w, W), ignore_index, WRITE_PROBS=write_probs, BLOCK=block)


def mask_labels_triton(masks, counts, size, ignore_index):
    """crf=False: (B, H, W) int64 ids 1..counts[b], ignore_index for the background, from the raw proposals
    float32 ``(B, M, h, w)`` of principal_masks and their int64 ``counts``; ``size``: ``(H, W)``."""
    logits = mask_logits_batched(median_filter_triton(masks), counts)
    labels = torch.empty(logits.shape[0], *size, dtype=torch.int64, device=logits.device)
    _launch(logits, counts, size, labels, None, int(ignore_index))
    return labels


def mask_probs_triton(masks, counts, size):
    """crf=True: (B, M + 1, H, W) float32 softmax of the upsampled log-probabilities, zero beyond
    counts[b] + 1 (arguments as :func:`mask_labels_triton`)."""
    logits = mask_logits_batched(median_filter_triton(masks), counts)
    probs = torch.empty(logits.shape[0], logits.shape[1], *size, dtype=torch.float32, device=logits.device)
    _launch(logits, counts, size, None, probs, 0)
    return probs
