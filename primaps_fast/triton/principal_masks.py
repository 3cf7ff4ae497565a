"""Triton backend of principal_masks (CUDA; runs on the CPU with TRITON_INTERPRET=1 for tests).

All images of the batch advance together, one proposal per round (or none while an image's eigen solve
goes on), until every image has stopped:

- the scatter ``S`` (float64, B x C x C) of each image's features, shifted by the image mean, over its
  remaining pixels: ``_scatter_kernel`` forms it once; then each round subtracts the outer products of
  the pixels the round removed, or, for an image that removed more pixels than remain, recomputes it
  from the remaining ones (the C++ backend's rule). float32 products of blocks of pixels, accumulated
  in float64; blocks without a selected pixel are skipped;
- the top eigenvector of ``cov = S / n - m m^T`` by Chebyshev-filtered block subspace iteration (8
  vectors per image, batched over the images with ``torch.bmm`` in float64 and 8 x 8 ``eigh`` for the
  Rayleigh-Ritz step), warm-started from the last round's Ritz vectors, until the image passes the C++
  backend's convergence test ``||A u - theta u|| <= 1e-7 theta``. The Chebyshev degree, the test and the
  degenerate-covariance rule restate ``csrc/principal_masks.h``;
- one host read per round (``active.any()``), whatever the batch and the features (on CUDA,
  ``torch.linalg.eigh`` also checks its error flags on the host: a fixed number per round too): each
  round runs a fixed schedule, ``CHUNK_ITERATIONS`` Rayleigh-Ritz steps with ``MAX_DEGREE - 1``
  Chebyshev steps after each but the last, masked per image (a step past an image's degree leaves it as
  it is). An image whose solve needs more steps proposes nothing this round and goes on from its Ritz
  vectors in the next;
- the per-pixel passes in Triton: cosine of every pixel's normalised feature to a per-image vector (the
  direction, then the anchor; the anchor is the first maximum of ``|cos|``), and the fused selection
  (threshold, normalisation, owner/value, update of the remaining set, the removed-pixel mask for S).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from primaps_fast.common import DEGENERATE_RTOL, scaled_float32

BLOCK_VECTORS = 8  # Ritz block (csrc/principal_masks.h kBlockVectors)
EIG_TOL = 1e-7  # kEigTol
MAX_EIG_ITERATIONS = 200  # kMaxEigIterations
MAX_DEGREE = 16  # kMaxDegree
MAX_AMPLIFICATION = 1e12  # kMaxAmplification
CHUNK_ITERATIONS = 3  # Rayleigh-Ritz steps per round (most warm-started solves take 2 or 3)


@triton.jit
def _scatter_kernel(y_ptr, sel_ptr, sign_ptr, s_ptr, C, N,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    """S[b, i, j] += sign[b] * sum_p sel[b, p] y[b, i, p] y[b, j, p] on one (BLOCK_I, BLOCK_J) tile."""
    b = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < C
    mask_j = offs_j < C
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float64)
    for p0 in range(0, N, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < N
        sel = tl.load(sel_ptr + b * N + offs_p, mask=mask_p, other=0)
        if tl.max(sel, axis=0) != 0:
            w = tl.where(sel != 0, 1.0, 0.0)
            yi = tl.load(y_ptr + b * C * N + offs_i[:, None] * N + offs_p[None, :],
                         mask=mask_i[:, None] & mask_p[None, :], other=0.0)
            yj = tl.load(y_ptr + b * C * N + offs_j[:, None] * N + offs_p[None, :],
                         mask=mask_j[:, None] & mask_p[None, :], other=0.0)
            part = tl.dot(yi * w[None, :], tl.trans(yj), input_precision="ieee")
            acc += part.to(tl.float64)
    sign = tl.load(sign_ptr + b)
    ptrs = s_ptr + b * C * C + offs_i[:, None] * C + offs_j[None, :]
    tile = mask_i[:, None] & mask_j[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=tile, other=0.0) + sign * acc, mask=tile)


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
def _select_kernel(sim_ptr, mx_ptr, active_ptr, index_ptr, rem_ptr, owner_ptr, value_ptr, removed_ptr,
                   threshold, N, BLOCK_P: tl.constexpr):
    """Proposal of every active image (csrc/principal_masks.h proposal_value): value sim / max where
    sim >= threshold * max, owner = index; the pixel leaves the remaining set and is marked removed."""
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N
    active = tl.load(active_ptr + b)
    mx = tl.load(mx_ptr + b)
    k = tl.load(index_ptr + b)
    sim = tl.load(sim_ptr + b * N + offs_p, mask=mask_p, other=0.0)
    rem = tl.load(rem_ptr + b * N + offs_p, mask=mask_p, other=0)
    val = tl.where(sim >= threshold * mx, sim / tl.where(mx > 0.0, mx, 1.0), 0.0)  # inactive: mx may be 0
    take = mask_p & (active != 0) & (rem != 0) & (val > 0.0)
    tl.store(owner_ptr + b * N + offs_p, k, mask=take)
    tl.store(value_ptr + b * N + offs_p, val, mask=take)
    tl.store(rem_ptr + b * N + offs_p, tl.zeros([BLOCK_P], dtype=tl.int8), mask=take)
    tl.store(removed_ptr + b * N + offs_p, take.to(tl.int8), mask=mask_p)


def _blocks(C):
    return min(64, triton.next_power_of_2(C)), 128


def _cosine(fn, u, remaining):
    B, C, N = fn.shape
    out = torch.empty(B, N, dtype=torch.float32, device=fn.device)
    block_c, block_p = _blocks(C)
    _cosine_kernel[(B, triton.cdiv(N, block_p))](fn, u.contiguous(), remaining, out, C, N,
                                                 BLOCK_C=block_c, BLOCK_P=block_p)
    return out


def scatter_(S, y, sel, sign):
    """S (B, C, C) float64 += sign[b] * sum over the pixels with sel[b, p] != 0 of y_p y_p^T
    (y (B, C, N) float32, sel (B, N) int8, sign (B,) float64)."""
    B, C, N = y.shape
    bi = 32 if C > 16 else 16
    _scatter_kernel[(B, triton.cdiv(C, bi), triton.cdiv(C, bi))](y, sel, sign, S, C, N,
                                                                BLOCK_I=bi, BLOCK_J=bi, BLOCK_P=32)


def chebyshev_degree(res, theta, low):
    """csrc/principal_masks.h chebyshev_degree on tensors: 0 = plain power step."""
    ok = (low > 1e-3 * theta) & (theta > low * (1.0 + 1e-9))
    x0 = torch.where(ok, 2.0 * theta / torch.where(ok, low, 1.0) - 1.0, 2.0)
    rate = torch.acosh(x0)
    want = (res / (EIG_TOL * theta)).clamp_min(1.0)
    d = torch.ceil(torch.acosh(want) / rate)
    d = torch.minimum(d, torch.floor(math.acosh(MAX_AMPLIFICATION) / rate)).clamp(1, MAX_DEGREE)
    return torch.where(ok, d, 0.0).to(torch.int64)


def chebyshev_filter(A, U, AU, degree, low):
    """T_d(2 A / low - I) U (B, C, k) with d = degree[b] in 1..MAX_DEGREE where positive, given AU = A U:
    MAX_DEGREE - 1 steps of four launches each whatever the degrees; a step past d leaves the image."""
    s = 2.0 / torch.where(degree > 0, low, 1.0)
    j = torch.arange(2, MAX_DEGREE + 1, device=A.device)
    m = (degree[None, :] >= j[:, None]).to(A.dtype)  # (steps, B): 1 where step j applies
    g = 2.0 * s * m
    Y0, Y1 = U, s[:, None, None] * AU - U
    for i in range(MAX_DEGREE - 1):
        # m = 1: Y2 = 2 (s A Y1 - Y1) - Y0 = A (2 s Y1) - 2 Y1 - Y0; m = 0: Y2 = Y1
        rest = torch.addcmul(Y1, m[i, :, None, None], torch.add(Y0, Y1, alpha=3.0), value=-1.0)
        Y0, Y1 = Y1, torch.baddbmm(rest, A, g[i, :, None, None] * Y1)
    return Y1


def top_vectors(A, V, todo, steps):
    """CHUNK_ITERATIONS Rayleigh-Ritz steps of Chebyshev-filtered subspace iteration on each symmetric
    PSD A[b] (B, C, C) float64 where todo[b], from the block V (B, C, k), which is updated in place to
    the latest Ritz vectors (the next round's start). steps (B,) int64 counts the steps of each image's
    solve, MAX_EIG_ITERATIONS at most (in place; back to 0 when it ends). Returns (v, done): the top
    eigenvector (B, C) where the solve ended, else 0, and done (B,) bool. Fixed launches, no host read."""
    B, C, k = V.shape
    v = torch.zeros(B, C, dtype=A.dtype, device=A.device)
    ended = torch.zeros(B, dtype=torch.bool, device=A.device)
    todo = todo.clone()
    X = torch.linalg.qr(V).Q
    W = torch.bmm(A, X)
    for it in range(CHUNK_ITERATIONS):
        H = torch.bmm(X.transpose(1, 2), W)
        lam, Q = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
        lam, Q = lam.flip(-1), Q.flip(-1)  # descending
        U, AU = torch.bmm(X, Q), torch.bmm(W, Q)
        res = (AU[:, :, 0] - lam[:, :1] * U[:, :, 0]).norm(dim=1)
        steps += todo.to(torch.int64)
        done = todo & ((res <= EIG_TOL * lam[:, 0].abs()) | (steps >= MAX_EIG_ITERATIONS))
        v = torch.where(done[:, None], U[:, :, 0], v)
        ended |= done
        todo &= ~done
        V.copy_(torch.where((done | todo)[:, None, None], U, V))
        if it + 1 == CHUNK_ITERATIONS:
            break
        degree = torch.where(todo, chebyshev_degree(res, lam[:, 0], lam[:, -1]), 0)
        # degree 0: plain power step
        X = torch.where((degree > 0)[:, None, None], chebyshev_filter(A, U, AU, degree, lam[:, -1]), AU)
        X = torch.where(todo[:, None, None], torch.linalg.qr(X).Q, U)
        W = torch.bmm(A, X)
    steps.masked_fill_(ended, 0)
    return v, ended


def principal_masks_triton(features, threshold, stop_fraction, max_masks):
    """features (B, C, h, w) float (each image scaled by its power of two here, as in every backend) ->
    owner (B, h, w) int64, value (B, h, w) float32, counts (B,) int64 (the disjoint-proposal form that
    ops.principal_masks stacks)."""
    features = scaled_float32(features).contiguous()
    B, C, h, w = features.shape
    N = h * w
    dev = features.device
    x = features.reshape(B, C, N)
    fn = F.normalize(x, dim=1).contiguous()
    x_mean = x.double().mean(-1)  # (B, C)
    y = (x.double() - x_mean[:, :, None]).float().contiguous()
    remaining = torch.ones(B, N, dtype=torch.int8, device=dev)
    removed = torch.empty(B, N, dtype=torch.int8, device=dev)
    owner = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    value = torch.zeros(B, N, dtype=torch.float32, device=dev)
    counts = torch.zeros(B, dtype=torch.int64, device=dev)
    n_rem = torch.full((B,), N, dtype=torch.int64, device=dev)
    S = torch.zeros(B, C, C, dtype=torch.float64, device=dev)
    scatter_(S, y, remaining, torch.ones(B, dtype=torch.float64, device=dev))
    sums = y.double().sum(-1)  # channel sums of y over the remaining pixels
    k = min(BLOCK_VECTORS, C)
    gen = torch.Generator(device="cpu").manual_seed(0)
    V = (torch.rand(C, k, generator=gen, dtype=torch.float64) * 2 - 1).to(dev).expand(B, C, k).contiguous()
    stop = torch.tensor(stop_fraction, dtype=torch.float32, device=dev)
    cap = max_masks if max_masks is not None else N
    _, block_p = _blocks(C)
    grid = (B, triton.cdiv(N, block_p))

    def keep_going():  # csrc/principal_masks.h keep_going
        return ((N - n_rem).float() / N < stop) & (counts < cap)

    active = torch.ones(B, dtype=torch.bool, device=dev)
    steps = torch.zeros(B, dtype=torch.int64, device=dev)  # of each image's eigen solve
    while True:
        active &= keep_going()
        if not bool(active.any()):  # the round's one host synchronisation
            break
        n = n_rem.clamp_min(1).double()
        mean = sums / n[:, None]
        A = S / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
        # exactly symmetric: the tiles (I, J) and (J, I) of S round differently, and an asymmetry at the
        # level of the tolerance would stall the residual test
        A = 0.5 * (A + A.transpose(1, 2))
        trace = A.diagonal(dim1=1, dim2=2).sum(-1)
        mean_x = mean + x_mean
        degenerate = trace <= DEGENERATE_RTOL * (trace + (mean_x * mean_x).sum(-1))
        v, solved = top_vectors(A, V, active & ~degenerate, steps)
        v = torch.where(degenerate[:, None], F.normalize(mean_x, dim=1), v).float()
        ready = active & (solved | degenerate)  # the others go on solving next round
        cos = _cosine(fn, v, remaining).abs()
        best, anchor = cos.max(-1)  # first maximum: the sign fix of docs/design.md
        a = fn.gather(2, anchor.view(B, 1, 1).expand(B, C, 1))[:, :, 0]  # (B, C)
        sim = _cosine(fn, a, remaining)
        mx = sim.max(-1).values
        # v orthogonal to every remaining feature, or no remaining pixel similar to the anchor: stop
        active &= ~ready | ((best > 0) & (mx > 0))
        ready &= active
        _select_kernel[grid](sim, mx.contiguous(), ready.to(torch.int8), counts.clone(), remaining, owner,
                             value, removed, threshold, N, BLOCK_P=block_p)
        counts += ready.to(torch.int64)
        taken = removed.sum(-1, dtype=torch.int64)
        n_rem -= taken
        # S and the sums of the images that go on: subtract the removed pixels, or recompute from the
        # remaining ones when fewer remain
        go_on = ready & (n_rem > 0) & keep_going()
        recompute = go_on & (taken > n_rem)
        sel = torch.where(recompute[:, None], remaining, removed) * go_on[:, None].to(torch.int8)
        S.masked_fill_(recompute[:, None, None], 0.0)
        sign = torch.where(recompute, 1.0, -1.0).double()
        scatter_(S, y, sel.contiguous(), sign)
        part = (y.double() * sel[:, None, :]).sum(-1)
        sums = torch.where(recompute[:, None], part, sums - torch.where(go_on[:, None], part, 0.0))
    return owner.view(B, h, w), value.view(B, h, w), counts
