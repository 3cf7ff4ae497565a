"""Triton dense CRF (pydensecrf's v2 mean field) for CUDA tensors.

The lattice is built with tensor ops (:func:`primaps_fast.triton.lattice.build_lattice`: elementwise
elevation, ``torch.unique`` for vertex ids, ``searchsorted`` on ``key +- delta`` for the blur
neighbours; deterministic, no hash table). Each iteration runs three kinds of kernels: a CSR-gather
splat (every vertex sums its pixels in pixel order, no atomics), one blur launch per lattice axis,
and a fused slice + Potts update + softmax over pixels. Labels are padded to a power of two lanes.
The Gaussian lattice is built once per batch; images are processed one after another (no cross-image
lattice concatenation or CUDA graphs yet).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from primaps_fast.common import crf_unary
from primaps_fast.triton.lattice import build_lattice, crf_features, normalisation


@triton.jit
def _splat_kernel(q_ptr, norm_ptr, start_ptr, pix_ptr, wgt_ptr, out_ptr, M,
                  V: tl.constexpr, BLOCK_M: tl.constexpr):
    # out[v] = sum over the vertex's (pixel, weight) entries, pixels ascending, of w * (Q[p] * norm[p])
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, V)
    rmask = rows < M
    s = tl.load(start_ptr + rows, mask=rmask, other=0)
    e = tl.load(start_ptr + rows + 1, mask=rmask, other=0)
    cnt = e - s
    acc = tl.zeros((BLOCK_M, V), dtype=tl.float32)
    for j in range(0, tl.max(cnt, axis=0)):
        live = rmask & (j < cnt)
        idx = s + j
        p = tl.load(pix_ptr + idx, mask=live, other=0)
        w = tl.load(wgt_ptr + idx, mask=live, other=0.0)
        # a dead entry reads pixel 0 with weight 0: unmasked gathers (Triton 3.6 cannot compile this loop's
        # gather with a broadcast mask, tests/test_triton_compile.py)
        nm = tl.load(norm_ptr + p)
        q = tl.load(q_ptr + p[:, None] * V + lanes[None, :])
        acc += w[:, None] * (q * nm[:, None])
    tl.store(out_ptr + rows[:, None] * V + lanes[None, :], acc, mask=rmask[:, None])


@triton.jit
def _blur_kernel(src_ptr, nbr_ptr, dst_ptr, M, V: tl.constexpr, BLOCK_M: tl.constexpr):
    # dst[v] = src[v] + 0.5 * (src[n1] + src[n2]); row M is the zero sentinel
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, V)
    rmask = rows < M
    n1 = tl.load(nbr_ptr + rows, mask=rmask, other=0)
    n2 = tl.load(nbr_ptr + M + rows, mask=rmask, other=0)
    m2 = rmask[:, None]
    o = tl.load(src_ptr + rows[:, None] * V + lanes[None, :], mask=m2, other=0.0)
    a = tl.load(src_ptr + n1[:, None] * V + lanes[None, :], mask=m2, other=0.0)
    b = tl.load(src_ptr + n2[:, None] * V + lanes[None, :], mask=m2, other=0.0)
    tl.store(dst_ptr + rows[:, None] * V + lanes[None, :], o + 0.5 * (a + b), mask=m2)


@triton.jit
def _slice_one(acc, vals_ptr, off_ptr, bary_ptr, rows, lanes, rmask, alpha, D: tl.constexpr, V: tl.constexpr):
    for r in tl.static_range(D):
        o = tl.load(off_ptr + rows * D + r, mask=rmask, other=0)
        w = tl.load(bary_ptr + rows * D + r, mask=rmask, other=0.0) * alpha
        acc += w[:, None] * tl.load(vals_ptr + o[:, None] * V + lanes[None, :], mask=rmask[:, None], other=0.0)
    return acc


@triton.jit
def _update_kernel(negu_ptr, q_ptr, vals0_ptr, off0_ptr, bary0_ptr, norm0_ptr, w0, alpha0,
                   vals1_ptr, off1_ptr, bary1_ptr, norm1_ptr, w1, alpha1, N, L,
                   D0: tl.constexpr, D1: tl.constexpr, V: tl.constexpr, BLOCK_N: tl.constexpr):
    # t = -U + w0 * norm0 * slice0 + w1 * norm1 * slice1 (pydensecrf: t - (-w * filtered)); Q = softmax(t)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, V)
    rmask = rows < N
    lmask = lanes < L
    m2 = rmask[:, None] & lmask[None, :]
    t = tl.load(negu_ptr + rows[:, None] * V + lanes[None, :], mask=m2, other=0.0)
    s0 = _slice_one(tl.zeros((BLOCK_N, V), dtype=tl.float32), vals0_ptr, off0_ptr, bary0_ptr, rows, lanes,
                    rmask, alpha0, D0, V)
    nm0 = tl.load(norm0_ptr + rows, mask=rmask, other=0.0)
    t = t - (-w0) * (s0 * nm0[:, None])
    s1 = _slice_one(tl.zeros((BLOCK_N, V), dtype=tl.float32), vals1_ptr, off1_ptr, bary1_ptr, rows, lanes,
                    rmask, alpha1, D1, V)
    nm1 = tl.load(norm1_ptr + rows, mask=rmask, other=0.0)
    t = t - (-w1) * (s1 * nm1[:, None])
    t = tl.where(lmask[None, :], t, float("-inf"))
    mx = tl.max(t, axis=1)
    e = tl.exp(t - mx[:, None])
    e = tl.where(lmask[None, :], e, 0.0)
    q = e / tl.sum(e, axis=1)[:, None]
    tl.store(q_ptr + rows[:, None] * V + lanes[None, :], q, mask=rmask[:, None])


_BLOCK = 64


class _Kernel:
    """One pairwise kernel of an image: lattice, CSR splat list, neighbour tables, normalisation."""

    def __init__(self, features: torch.Tensor, compat: float):
        lat = build_lattice(features)
        D = lat.offset.shape[1]
        flat = lat.offset.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # entries of a vertex stay in pixel order
        counts = torch.bincount(flat, minlength=lat.M)
        self.start = torch.zeros(lat.M + 1, dtype=torch.int64, device=flat.device)
        self.start[1:] = torch.cumsum(counts, 0)
        self.pix = (order // D).contiguous()
        self.wgt = lat.weight.reshape(-1)[order].contiguous()
        self.nbr = lat.neighbours.contiguous()  # (D, 2, M), M = zero row
        self.off = lat.offset.contiguous()
        self.bary = lat.weight.contiguous()
        self.M, self.D = lat.M, D
        self.norm = normalisation(lat).contiguous()
        self.compat = compat
        self.alpha = 1.0 / (1.0 + 2.0 ** (-(D - 1)))

    def filter_into(self, q: torch.Tensor, V: int, vals: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        grid = (triton.cdiv(self.M, _BLOCK),)
        _splat_kernel[grid](q, self.norm, self.start, self.pix, self.wgt, vals, self.M, V=V, BLOCK_M=_BLOCK)
        for j in range(self.D):
            _blur_kernel[grid](vals, self.nbr[j], tmp, self.M, V=V, BLOCK_M=_BLOCK)
            vals, tmp = tmp, vals
        return vals


def _crf_one(image, probs, gauss, iterations, bi_sxy, bi_srgb, bi_compat):
    """One image; ``gauss``: the Gaussian kernel of the batch's grid (None when iterations == 0)."""
    L, H, W = probs.shape
    N = H * W
    V = max(2, triton.next_power_of_2(L))
    neg_u = torch.zeros(N, V, dtype=torch.float32, device=probs.device)
    neg_u[:, :L] = -crf_unary(probs).reshape(L, N).t()
    q = torch.zeros(N, V, dtype=torch.float32, device=probs.device)
    q[:, :L] = torch.softmax(neg_u[:, :L], dim=1)
    if iterations > 0:
        kernels = [gauss, _Kernel(crf_features(image, bi_sxy, bi_srgb), bi_compat)]
        bufs = [(torch.zeros(k.M + 1, V, device=probs.device), torch.zeros(k.M + 1, V, device=probs.device))
                for k in kernels]
        g, b = kernels
        for _ in range(iterations):
            v0 = g.filter_into(q, V, *bufs[0])
            v1 = b.filter_into(q, V, *bufs[1])
            _update_kernel[(triton.cdiv(N, _BLOCK),)](
                neg_u, q, v0, g.off, g.bary, g.norm, g.compat, g.alpha,
                v1, b.off, b.bary, b.norm, b.compat, b.alpha, N, L,
                D0=g.D, D1=b.D, V=V, BLOCK_N=_BLOCK)
    return q[:, :L].t().reshape(L, H, W).contiguous()


def dense_crf_triton(images, probs, *, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    """Triton backend of ``dense_crf_list`` (validated inputs): returns B float32 (L_b, H, W)."""
    # The Gaussian kernel depends only on the grid and pos_sxy: one lattice for the batch.
    gauss = _Kernel(crf_features(images[0], pos_sxy, None), pos_compat) if iterations > 0 else None
    return [_crf_one(images[b], probs[b].float(), gauss, iterations, bi_sxy, bi_srgb, bi_compat)
            for b in range(images.shape[0])]
