"""Triton backend of principal_masks (CUDA; runs on the CPU with TRITON_INTERPRET=1 for tests).

All images of the batch advance together, one proposal per step, until every image has stopped:
- covariance of each image's remaining pixels: one batched float64 matmul (``torch.bmm``) of the
  features shifted by the image mean, masked by the remaining set;
- top eigenvector: batched ``torch.linalg.eigh`` (exact, deterministic) or, when the covariance is
  degenerate, the normalised mean (same rule as the reference);
- Triton kernels for the per-pixel passes: cosine of every pixel's normalised feature to a per-image
  vector (used for the principal direction, then for the anchor), and the fused selection
  (threshold, normalisation, owner/value write, update of the remaining set).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from primaps_fast.common import DEGENERATE_RTOL


@triton.jit
def _cosine_kernel(fn_ptr, u_ptr, rem_ptr, out_ptr, C, N,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[b, p] = sum_c u[b, c] * fn[b, c, p] on remaining pixels, 0 elsewhere."""
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        u = tl.load(u_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        f = tl.load(fn_ptr + b * C * N + offs_c[:, None] * N + offs_p[None, :],
                    mask=mask_c[:, None] & mask_p[None, :], other=0.0)
        acc += tl.sum(u[:, None] * f, axis=0)
    rem = tl.load(rem_ptr + b * N + offs_p, mask=mask_p, other=0)
    tl.store(out_ptr + b * N + offs_p, tl.where(rem != 0, acc, 0.0), mask=mask_p)


@triton.jit
def _select_kernel(sim_ptr, mx_ptr, active_ptr, index_ptr, rem_ptr, owner_ptr, value_ptr, threshold, N,
                   BLOCK_P: tl.constexpr):
    """Proposal of every active image: sim >= threshold * max -> value sim / max, owner = index,
    pixel leaves the remaining set."""
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N
    active = tl.load(active_ptr + b)
    mx = tl.load(mx_ptr + b)
    k = tl.load(index_ptr + b)
    sim = tl.load(sim_ptr + b * N + offs_p, mask=mask_p, other=0.0)
    rem = tl.load(rem_ptr + b * N + offs_p, mask=mask_p, other=0)
    cut = threshold * mx
    val = sim / tl.where(mx > 0.0, mx, 1.0)  # inactive images may have mx == 0
    take = mask_p & (active != 0) & (rem != 0) & (sim >= cut) & (val > 0.0)
    tl.store(owner_ptr + b * N + offs_p, k, mask=take)
    tl.store(value_ptr + b * N + offs_p, val, mask=take)
    tl.store(rem_ptr + b * N + offs_p, tl.zeros([BLOCK_P], dtype=tl.int8), mask=take)


def _blocks(C):
    return min(64, triton.next_power_of_2(C)), 128


def _cosine(fn, u, remaining):
    B, C, N = fn.shape
    out = torch.empty(B, N, dtype=torch.float32, device=fn.device)
    block_c, block_p = _blocks(C)
    _cosine_kernel[(B, triton.cdiv(N, block_p))](fn, u.contiguous(), remaining, out, C, N,
                                                 BLOCK_C=block_c, BLOCK_P=block_p)
    return out


def _directions(y, x_mean, remaining):
    """Top principal direction (B, C) float32 of each image's remaining pixels (y: (B, C, N) float64,
    shifted by x_mean (B, C) float64)."""
    r = remaining.to(torch.float64)[:, None, :]
    n = r.sum(-1).clamp_min(1)  # (B, 1)
    ym = y * r
    mean = ym.sum(-1) / n  # (B, C)
    cov = torch.bmm(ym, y.transpose(1, 2)) / n[:, :, None] - mean[:, :, None] * mean[:, None, :]
    trace = cov.diagonal(dim1=1, dim2=2).sum(-1)
    mean_x = mean + x_mean
    mean_sq = trace + (mean_x * mean_x).sum(-1)
    degenerate = trace <= DEGENERATE_RTOL * mean_sq
    vecs = torch.linalg.eigh(torch.where(degenerate[:, None, None], torch.eye(cov.shape[1], dtype=cov.dtype,
                                                                               device=cov.device), cov))[1]
    v = torch.where(degenerate[:, None], F.normalize(mean_x, dim=1), vecs[:, :, -1])
    return v.float()


def principal_masks_triton(features, threshold, stop_fraction, max_masks):
    """features (B, C, h, w) float32 contiguous -> owner (B, h, w) int64, value (B, h, w) float32,
    counts (B,) int64 (the disjoint-proposal form that ops.principal_masks stacks)."""
    B, C, h, w = features.shape
    N = h * w
    dev = features.device
    x = features.reshape(B, C, N)
    fn = F.normalize(x, dim=1).contiguous()
    x64 = x.double()
    x_mean = x64.mean(-1)
    y = x64 - x_mean[:, :, None]
    remaining = torch.ones(B, N, dtype=torch.int8, device=dev)
    owner = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    value = torch.zeros(B, N, dtype=torch.float32, device=dev)
    counts = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    stop = torch.tensor(stop_fraction, dtype=torch.float32, device=dev)
    _, block_p = _blocks(C)
    grid = (B, triton.cdiv(N, block_p))
    while True:
        removed = (remaining == 0).sum(-1)
        active &= removed.float() / N < stop  # float32, as the official loop test
        if max_masks is not None:
            active &= counts < max_masks
        if not bool(active.any()):
            break
        v = _directions(y, x_mean, remaining)
        cos = _cosine(fn, v, remaining).abs()
        best, anchor = cos.max(-1)  # first maximum: the sign fix of DESIGN.md section 2
        active &= best > 0  # v orthogonal to every remaining feature: stop
        a = fn.gather(2, anchor.view(B, 1, 1).expand(B, C, 1))[:, :, 0]  # (B, C)
        sim = _cosine(fn, a, remaining)
        mx = sim.max(-1).values
        active &= mx > 0
        if not bool(active.any()):
            break
        _select_kernel[grid](sim, mx.contiguous(), active.to(torch.int8), counts.clone(), remaining, owner,
                             value, threshold, N, BLOCK_P=block_p)
        counts += active.to(torch.int64)
    return owner.view(B, h, w), value.view(B, h, w), counts
