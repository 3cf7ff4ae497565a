"""The permutohedral lattice of pydensecrf (Adams et al. 2010) built with tensor ops, for the Triton dense CRF.

No hash table, so it runs on any device and is deterministic: float32 elevation exactly as pydensecrf's
SSE code (round half to even, strict ``<`` rank, barycentric weights with wrap-around), integer keys
packed into int64 with a range check, ``torch.unique`` for the vertex ids and ``searchsorted`` on
``key +- delta`` for the one-ring blur neighbours (docs/dense_crf.md). The reference
(``primaps_fast/reference/dense_crf.py``) builds it with a dict instead, so the tests check this one
against it.

One lattice can hold the points of several images: their image index is packed above the key, so
vertices of different images never merge and are never blur neighbours, and every image's vertices,
weights and neighbours are those of its own lattice (numbered image after image).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Lattice(NamedTuple):
    """A permutohedral lattice over ``N`` points in ``d`` dimensions with ``M`` vertices.

    ``offset`` int64 (N, d+1): the vertex of each point's simplex corner, by remainder;
    ``weight`` float32 (N, d+1): the barycentric weights; ``neighbours`` int64 (d+1, 2, M): the
    vertices at ``key - 1 (+ (d+1) on axis j)`` and ``key + 1 (- (d+1) on axis j)`` for blur axis j,
    ``M`` (a zero row) when absent; ``keys`` int64 (M,) the packed keys, sorted.
    """
    offset: torch.Tensor
    weight: torch.Tensor
    neighbours: torch.Tensor
    keys: torch.Tensor
    d: int
    M: int


def scale_factors(d: int) -> list:
    """The diagonal of the elevation matrix as pydensecrf's float32 values."""
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    return [float(torch.tensor(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std, dtype=torch.float32))
            for i in range(d)]


def lattice_coordinates(features: torch.Tensor):
    """Elevation, nearest remainder-0 point, rank and barycentric weights (the SSE code's float32
    arithmetic, one op at a time so nothing is fused). ``features`` float32 (N, d).
    Returns ``rem0`` int64 (N, d+1), ``rank`` int64 (N, d+1), ``weight`` float32 (N, d+1)."""
    N, d = features.shape
    dev = features.device
    sf = scale_factors(d)
    inv = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=dev)
    dp1 = float(d + 1)
    elev = torch.empty(N, d + 1, dtype=torch.float32, device=dev)
    sm = torch.zeros(N, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * sf[j - 1]
        elev[:, j] = sm - cf * float(j)
        sm = sm + cf
    elev[:, 0] = sm
    v = torch.round(elev * inv)  # round half to even, as cvtps2dq in the installed pydensecrf
    if bool((v.abs() > 2 ** 28).any()):
        raise ValueError("features: lattice coordinates too large (sxy/srgb too small for these inputs)")
    rem0 = v * dp1
    total = v.sum(dim=1)  # small integers: exact
    diff = elev - rem0
    rank = torch.zeros(N, d + 1, dtype=torch.float32, device=dev)
    for i in range(d):
        for j in range(i + 1, d + 1):
            c = (diff[:, i] < diff[:, j]).float()
            rank[:, i] += c
            rank[:, j] += 1 - c
    rank = rank + total[:, None]
    fix = torch.where(rank < 0, dp1, 0.0) - torch.where(rank >= dp1, dp1, 0.0)
    rank = rank + fix
    rem0 = rem0 + fix
    rank_i = rank.long()
    vb = (elev - rem0) * inv
    bary = torch.zeros(N, d + 2, dtype=torch.float32, device=dev)
    p = d - rank_i
    # Each slot receives one + and one - term, so 0 + a - b rounds once in any order.
    bary.scatter_add_(1, p, vb)
    bary.scatter_add_(1, p + 1, -vb)
    bary[:, 0] = bary[:, 0] + (1 + bary[:, d + 1])
    return rem0.long(), rank_i, bary[:, : d + 1].contiguous()


class KeyBitsError(ValueError):
    """The packed keys (and image indices) of a lattice need more than ``max_bits`` bits."""


def build_lattice(features: torch.Tensor, *, images: int = 1, max_bits: int = 62) -> Lattice:
    """Permutohedral lattice of float32 ``features`` (N, d), as pydensecrf's ``Permutohedral::init``; with
    ``images`` > 1, the rows are ``images`` images of ``N / images`` points each, one after another, and
    each image gets the vertices of its own lattice."""
    N, d = features.shape
    dev = features.device
    rem0, rank, weight = lattice_coordinates(features)
    r = torch.arange(d + 1, device=dev)
    # canonical[r][k] = r if k <= d - r else r - (d+1); key_i = rem0_i + canonical[r][rank_i], i < d
    canon = torch.where(r[None, :] <= d - r[:, None], r[:, None], r[:, None] - (d + 1))  # (r, k)
    keys = rem0[:, None, :d] + canon[:, rank[:, :d]].permute(1, 0, 2)  # (N, d+1, d)
    margin = 2 * (d + 1)  # room for the blur neighbours, so packed + delta never carries
    lo = keys.amin(dim=(0, 1)) - margin
    hi = keys.amax(dim=(0, 1)) + margin
    widths = [int(x).bit_length() for x in (hi - lo).tolist()]
    if sum(widths) + (images - 1).bit_length() > max_bits:
        raise KeyBitsError(f"features: lattice keys need {sum(widths)} bits and {images} images "
                           f"{(images - 1).bit_length()} more (> {max_bits}): the image is too large or "
                           "sxy/srgb too small")
    shifts, s = [], 0
    for w in widths:
        shifts.append(s)
        s += w
    shift_t = torch.tensor(shifts, dtype=torch.int64, device=dev)
    packed = ((keys - lo) << shift_t).sum(dim=2)  # (N, d+1)
    if images > 1:  # the image index above the key bits
        packed += (torch.arange(N, device=dev) // (N // images) << s)[:, None]
    uniq, inverse = torch.unique(packed.reshape(-1), sorted=True, return_inverse=True)
    M = uniq.numel()
    unit = sum(1 << sh for sh in shifts)
    nbrs = torch.empty(d + 1, 2, M, dtype=torch.int64, device=dev)
    for j in range(d + 1):
        delta = -unit + ((d + 1) << shifts[j] if j < d else 0)
        for side, dl in enumerate((delta, -delta)):
            target = uniq + dl
            pos = torch.searchsorted(uniq, target).clamp_(max=M - 1)
            nbrs[j, side] = torch.where(uniq[pos] == target, pos, torch.full_like(pos, M))
    return Lattice(inverse.reshape(N, d + 1), weight, nbrs, uniq, d, M)


def crf_features(images: torch.Tensor, sxy: float, srgb: float | None) -> torch.Tensor:
    """pydensecrf's ``DenseCRF2D`` features (N, d) float32 of uint8 ``images`` (3, H, W) or (B, 3, H, W),
    image after image: ``(x/sxy, y/sxy)`` and, when ``srgb`` is given, the three channels divided by
    ``srgb``, in channel order."""
    H, W = images.shape[-2:]
    imgs = images.reshape(-1, 3, H, W)
    dev = images.device
    s = torch.tensor(sxy, dtype=torch.float32, device=dev)
    y, x = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32),
                          torch.arange(W, device=dev, dtype=torch.float32), indexing="ij")
    cols = [(x.reshape(-1) / s).repeat(imgs.shape[0]), (y.reshape(-1) / s).repeat(imgs.shape[0])]
    if srgb is not None:
        c = torch.tensor(srgb, dtype=torch.float32, device=dev)
        cols += [imgs[:, k].reshape(-1).float() / c for k in range(3)]
    return torch.stack(cols, dim=1).contiguous()
