"""Triton dense CRF (pydensecrf's v2 mean field) for CUDA tensors: a whole batch in every launch.

The lattices are built with tensor ops (:func:`primaps_fast.triton.lattice.build_lattice`: elementwise
elevation, ``torch.unique`` for vertex ids, ``searchsorted`` on ``key +- delta`` for the blur
neighbours; deterministic, no hash table). The Gaussian lattice depends only on the grid: one for the
batch, applied to every image (a second grid axis over the images). The bilateral lattices of all the
batch's images are one lattice whose keys carry the image index, so the images' vertices never mix.
Each iteration is a fixed set of launches whatever the batch size: per kernel a CSR-gather splat (every
vertex sums its pixels in pixel order, no atomics, so results are the same run to run) and one blur
launch per lattice axis, then one fused slice + Potts update + softmax over every pixel of the batch.
Labels are padded to a power of two lanes (the batch's largest label count; each image's own count
masks its lanes). A batch larger than a quarter of the device's memory allows runs in chunks of images.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from primaps_fast._dispatch import device_memory
from primaps_fast.common import crf_unary
from primaps_fast.triton.lattice import KeyBitsError, build_lattice, crf_features


@triton.jit
def _splat_kernel(q_ptr, norm_ptr, start_ptr, pix_ptr, wgt_ptr, out_ptr, M, q_stride, out_stride,
                  V: tl.constexpr, BLOCK_M: tl.constexpr):
    # out[c, v] = sum over the vertex's (pixel, weight) entries, pixels ascending, of w * (Q[c, p] * norm[p]);
    # c (grid axis 1) is the copy of a lattice shared by several images, q_stride / out_stride its strides
    copy = tl.program_id(1).to(tl.int64)
    q_ptr += copy * q_stride
    out_ptr += copy * out_stride
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
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
def _blur_kernel(src_ptr, nbr_ptr, dst_ptr, M, stride, V: tl.constexpr, BLOCK_M: tl.constexpr):
    # dst[c, v] = src[c, v] + 0.5 * (src[c, n1] + src[c, n2]); row M is the zero sentinel
    copy = tl.program_id(1).to(tl.int64)
    src_ptr += copy * stride
    dst_ptr += copy * stride
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
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
def _slice_one(vals_ptr, off_ptr, bary_ptr, norm_ptr, w_compat, alpha, rows, image, lanes, rmask, n_mod, vstride,
               D: tl.constexpr, V: tl.constexpr, BLOCK_N: tl.constexpr):
    # w_compat * norm[p] * sum_r alpha * bary[p, r] * vals[vertex(p, r)] at the lattice's point p of each row:
    # p = row % n_mod (n_mod: the lattice's points), the vertex values of its copy image * vstride
    p = rows % n_mod
    base = vals_ptr + (image * vstride)[:, None] + lanes[None, :]
    acc = tl.zeros((BLOCK_N, V), dtype=tl.float32)
    for r in tl.static_range(D):
        o = tl.load(off_ptr + p * D + r, mask=rmask, other=0)
        w = tl.load(bary_ptr + p * D + r, mask=rmask, other=0.0) * alpha
        acc += w[:, None] * tl.load(base + o[:, None] * V, mask=rmask[:, None], other=0.0)
    nm = tl.load(norm_ptr + p, mask=rmask, other=0.0)
    return w_compat * (acc * nm[:, None])


@triton.jit
def _update_kernel(negu_ptr, q_ptr, labels_ptr, N, total,
                   vals0_ptr, off0_ptr, bary0_ptr, norm0_ptr, w0, alpha0, n_mod0, vstride0,
                   vals1_ptr, off1_ptr, bary1_ptr, norm1_ptr, w1, alpha1, n_mod1, vstride1,
                   D0: tl.constexpr, D1: tl.constexpr, V: tl.constexpr, BLOCK_N: tl.constexpr):
    # rows: the batch's pixels, image after image (N each); t = -U + w0 * norm0 * slice0 + w1 * norm1 * slice1
    # (pydensecrf: t - (-w * filtered)); Q = softmax(t) over the image's own labels
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, V)
    rmask = rows < total
    image = rows // N
    L = tl.load(labels_ptr + image, mask=rmask, other=1)  # rows past the batch: finite, not stored
    lmask = lanes[None, :] < L[:, None]
    m2 = rmask[:, None] & lmask
    t = tl.load(negu_ptr + rows[:, None] * V + lanes[None, :], mask=m2, other=0.0)
    t = t - (-_slice_one(vals0_ptr, off0_ptr, bary0_ptr, norm0_ptr, w0, alpha0, rows, image, lanes, rmask,
                         n_mod0, vstride0, D0, V, BLOCK_N))
    t = t - (-_slice_one(vals1_ptr, off1_ptr, bary1_ptr, norm1_ptr, w1, alpha1, rows, image, lanes, rmask,
                         n_mod1, vstride1, D1, V, BLOCK_N))
    t = tl.where(lmask, t, float("-inf"))
    mx = tl.max(t, axis=1)
    e = tl.exp(t - mx[:, None])
    e = tl.where(lmask, e, 0.0)
    q = e / tl.sum(e, axis=1)[:, None]
    tl.store(q_ptr + rows[:, None] * V + lanes[None, :], q, mask=rmask[:, None])


_BLOCK = 64
# Device memory a pixel of a chunk takes, for V label lanes: -U and Q, two buffers of vertex values for
# each kernel (the Gaussian lattice has ~1.2 vertices a pixel, a bilateral one up to 6), and the
# bilateral lattice's build (keys, vertex ids, weights, CSR list, neighbours: ~400 B a pixel).
def _bytes_per_pixel(V: int) -> int:
    return 4 * V * (2 + 2 * 2 + 2 * 6) + 400


class _Kernel:
    """One pairwise kernel: its lattice over the points of one image (shared by several images through
    the splat's copies) or of ``images`` images one after another, its CSR splat list, neighbour tables
    and normalisation (``compat`` is pydensecrf's Potts weight)."""

    def __init__(self, features: torch.Tensor, compat: float, images: int = 1):
        lat = build_lattice(features, images=images)
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
        self.M, self.D, self.points = lat.M, D, features.shape[0]
        self.compat = compat
        self.alpha = 1.0 / (1.0 + 2.0 ** (-(D - 1)))
        # pydensecrf's symmetric normalisation 1 / sqrt(K 1 + 1e-20): ones filtered through the lattice
        ones = torch.ones(self.points, 2, device=flat.device)
        self.norm = torch.ones(self.points, device=flat.device)
        k1 = self.filter(ones, self.buffers(2))[0, :, 0]
        s = torch.zeros(self.points, device=flat.device)
        for r in range(D):  # sliced in the scalar order: (bary * value) * alpha, added axis by axis
            s += lat.weight[:, r] * k1[lat.offset[:, r]] * self.alpha
        self.norm = (1.0 / torch.sqrt(s.double() + 1e-20)).float()

    def buffers(self, V: int, copies: int = 1) -> tuple:
        """Two zeroed ``(copies, M + 1, V)`` buffers of vertex values (row M: the absent neighbour)."""
        dev = self.off.device
        return (torch.zeros(copies, self.M + 1, V, device=dev), torch.zeros(copies, self.M + 1, V, device=dev))

    def filter(self, q: torch.Tensor, bufs: tuple) -> torch.Tensor:
        """Splat ``q`` (copies x points, V) (times the normalisation) and blur along every axis, in the
        ``buffers``; returns the one holding the blurred vertex values."""
        vals, tmp = bufs
        copies, _, V = vals.shape
        grid = (triton.cdiv(self.M, _BLOCK), copies)
        stride = (self.M + 1) * V
        _splat_kernel[grid](q, self.norm, self.start, self.pix, self.wgt, vals, self.M, self.points * V, stride,
                            V=V, BLOCK_M=_BLOCK)
        for j in range(self.D):
            _blur_kernel[grid](vals, self.nbr[j], tmp, self.M, stride, V=V, BLOCK_M=_BLOCK)
            vals, tmp = tmp, vals
        return vals


def _mean_field(images, probs, gauss, iterations, bi_sxy, bi_srgb, bi_compat):
    """Marginals of a chunk of images (uint8 (B, 3, H, W), probs B float32 (L_b, H, W)), every launch
    over the whole chunk; ``gauss``: the grid's Gaussian kernel (None when iterations == 0)."""
    B, (H, W), dev = len(probs), images.shape[-2:], images.device
    N = H * W
    counts = [p.shape[0] for p in probs]
    V = max(2, triton.next_power_of_2(max(counts)))
    neg_u = torch.zeros(B, N, V, dtype=torch.float32, device=dev)
    if len(set(counts)) == 1:
        neg_u[:, :, :counts[0]] = -crf_unary(torch.stack(probs)).reshape(B, counts[0], N).transpose(1, 2)
    else:
        for b, p in enumerate(probs):
            neg_u[b, :, :counts[b]] = -crf_unary(p).reshape(counts[b], N).t()
    labels = torch.tensor(counts, dtype=torch.int32, device=dev)
    live = torch.arange(V, device=dev) < labels[:, None, None]
    q = torch.softmax(neg_u.masked_fill(~live, float("-inf")), dim=2)
    if iterations > 0:
        bilateral = _Kernel(crf_features(images, bi_sxy, bi_srgb), bi_compat, images=B)
        gauss_bufs, bilateral_bufs = gauss.buffers(V, copies=B), bilateral.buffers(V)
        for _ in range(iterations):
            v0 = gauss.filter(q, gauss_bufs)
            v1 = bilateral.filter(q, bilateral_bufs)
            _update_kernel[(triton.cdiv(B * N, _BLOCK),)](
                neg_u, q, labels, N, B * N,
                v0, gauss.off, gauss.bary, gauss.norm, gauss.compat, gauss.alpha, N, (gauss.M + 1) * V,
                v1, bilateral.off, bilateral.bary, bilateral.norm, bilateral.compat, bilateral.alpha, B * N, 0,
                D0=gauss.D, D1=bilateral.D, V=V, BLOCK_N=_BLOCK)
    return [q[b, :, :L].t().reshape(L, H, W).contiguous() for b, L in enumerate(counts)]


def _chunk(images, probs, gauss, params):
    """:func:`_mean_field` of a chunk; halved while the batched lattice's keys do not fit 62 bits."""
    try:
        return _mean_field(images, probs, gauss, *params)
    except KeyBitsError:
        if len(probs) == 1:
            raise
        half = len(probs) // 2
        return _chunk(images[:half], probs[:half], gauss, params) + _chunk(images[half:], probs[half:], gauss, params)


def dense_crf_triton(images, probs, *, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    """Triton backend of ``dense_crf_list`` (validated inputs): returns B float32 (L_b, H, W)."""
    B, _, H, W = images.shape
    probs = [p.float() for p in probs]
    gauss = _Kernel(crf_features(images[0], pos_sxy, None), pos_compat) if iterations > 0 else None
    V = max(2, triton.next_power_of_2(max(p.shape[0] for p in probs)))
    per_chunk = max(1, device_memory(images.device) // 4 // (H * W * _bytes_per_pixel(V)))
    params = (iterations, bi_sxy, bi_srgb, bi_compat)
    out = []
    for b0 in range(0, B, per_chunk):
        out += _chunk(images[b0:b0 + per_chunk], probs[b0:b0 + per_chunk], gauss, params)
    return out
