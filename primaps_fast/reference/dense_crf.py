"""Reference dense CRF: the mean field of pydensecrf (Krähenbühl's "v2" code) in plain PyTorch.

pydensecrf, as the official PriMaPs ``crf.py`` calls it: ``unary_from_softmax`` (clip the
probabilities to [1e-5, 1], -log), ``addPairwiseGaussian(sxy, compat)``,
``addPairwiseBilateral(sxy, srgb, rgbim, compat)``, ``inference(n)``. Both kernels use the
permutohedral lattice of Adams et al. (2010) with symmetric normalisation through the lattice
(``norm = 1/sqrt(K 1 + 1e-20)``, ``K~ Q = norm * K(norm * Q)``), Potts compatibility ``-w``, and
parallel (Jacobi) updates ``Q <- softmax(-U + w_g K~_g Q + w_b K~_b Q)``. See docs/dense_crf.md.

The lattice follows ``Permutohedral::init`` literally: the float32 elevation, rounding (half to even,
as ``cvtps2dq``), strict ``<`` rank, wrap-around and barycentric weights are the SSE code's operations
one coordinate at a time (vectorised over the points, so bit-exact with it); the vertices are a Python
dict keyed by the integer keys (their int64 bytes, no packing), numbered in insertion order as
pydensecrf's hash table numbers them, and the blur neighbours are dict look-ups of its ``n1`` (``n2`` is
the inverse step). The Triton lattice (``primaps_fast/triton/lattice.py``) packs the keys into int64 and
numbers the vertices in sorted key order with ``torch.unique``/``searchsorted`` instead, so comparing the
two up to vertex numbering checks its packing, deduplication and neighbour search. The numbering changes
no sum (the splat adds each vertex's terms in point order, the blur is per vertex). Slow (dicts, a
per-image Python loop) but simple.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from primaps_fast.common import CRF_CLIP


def _elevation_scale(d: int) -> list:
    """pydensecrf's ``scale_factor``: ``1 / sqrt((i+2)(i+1)) * inv_std_dev`` in double, stored as float32,
    with ``inv_std_dev = sqrt(2/3) (d+1)`` a float32."""
    inv_std_dev = torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32).double()
    i = torch.arange(d, dtype=torch.float64)
    return (1.0 / torch.sqrt((i + 2) * (i + 1)) * inv_std_dev).float().tolist()


def _simplices(features: torch.Tensor):
    """The SSE part of ``Permutohedral::init`` for float32 ``features`` (N, d), one coordinate (a column
    over the points) at a time, in its order of float32 operations. Returns the remainder-0 point ``rem0``
    (d+1 float32 columns), the ``rank`` of each coordinate (d+1 float32 columns) and the barycentric
    weights (d+2 float32 columns, the last one already wrapped into the first)."""
    N, d = features.shape
    f = features.t()
    zero = torch.zeros(N, dtype=torch.float32, device=features.device)
    dplus1 = float(d + 1)
    inv_dplus1 = float(torch.tensor(1.0 / (d + 1), dtype=torch.float32))
    scale = _elevation_scale(d)
    elevated = [zero] * (d + 1)
    sm = zero
    for j in range(d, 0, -1):  # y = E f (Adams et al., p. 5)
        cf = f[j - 1] * scale[j - 1]
        elevated[j] = sm - float(j) * cf
        sm = sm + cf
    elevated[0] = sm
    rem0, total = [], zero
    for e in elevated:  # the nearest remainder-0 point, rounding half to even as cvtps2dq
        v = torch.round(inv_dplus1 * e)
        if bool((v.abs() > 2 ** 28).any()):
            raise ValueError("features: lattice coordinates too large (sxy/srgb too small for these inputs)")
        rem0.append(v * dplus1)
        total = total + v
    rank = [zero] * (d + 1)
    for i in range(d):  # the sorted position of each coordinate's remainder, ties by index
        di = elevated[i] - rem0[i]
        for j in range(i + 1, d + 1):
            c = (di < elevated[j] - rem0[j]).float()
            rank[i] = rank[i] + c
            rank[j] = rank[j] + (1.0 - c)
    for i in range(d + 1):  # back onto the plane: wrap ranks outside [0, d]
        rank[i] = rank[i] + total
        step = torch.where(rank[i] < 0, dplus1, 0.0) - torch.where(rank[i] < dplus1, 0.0, dplus1)
        rank[i] = rank[i] + step
        rem0[i] = rem0[i] + step
    fb = torch.zeros(N, d + 2, dtype=torch.float32, device=features.device)
    for i in range(d + 1):  # fb[d - rank] += v, fb[d - rank + 1] -= v, in the scalar loop's order
        v = ((elevated[i] - rem0[i]) * inv_dplus1)[:, None]
        p = d - rank[i].long()[:, None]
        fb.scatter_add_(1, p, v)
        fb.scatter_add_(1, p + 1, -v)
    bary = list(fb.t())
    bary[0] = bary[0] + (1.0 + bary[d + 1])
    return rem0, rank, bary


def _key_range_check(keys: torch.Tensor, d: int, max_bits: int):
    """Refuse the key ranges the kernels cannot pack: each coordinate's range, widened by the blur's
    reach ``2 (d+1)`` on both sides, takes its bit length, and all of them must fit in ``max_bits``."""
    reach = 2 * (d + 1)
    bits = sum(int(hi - lo + 2 * reach).bit_length()
               for lo, hi in zip(keys.min(dim=0).values.tolist(), keys.max(dim=0).values.tolist()))
    if bits > max_bits:
        raise ValueError(f"features: lattice keys need {bits} bits (> {max_bits}): the image is too "
                         "large or sxy/srgb too small")


def _hashable_rows(keys: torch.Tensor) -> list:
    """Each row of the integer ``keys`` (n, d) as one ``bytes`` of its d int64 coordinates: a dict key
    that is the key itself (no packing, so nothing to overflow), far cheaper to make than a tuple."""
    rows = np.ascontiguousarray(keys.cpu().numpy(), dtype=np.int64)
    return rows.view(np.dtype((np.void, 8 * rows.shape[1]))).ravel().tolist()


class Lattice(NamedTuple):
    """The lattice of ``N`` points in ``d`` dimensions: ``M`` vertices, numbered in the order the points
    (raster order, remainders 0..d) first reach them, as pydensecrf's hash table numbers them.

    ``offset`` int64 (N, d+1) and ``weight`` float32 (N, d+1): the vertex and barycentric weight of each
    point's remainder-r corner; ``neighbours`` int64 (d+1, 2, M): for blur axis j, the vertices
    ``n1``/``n2`` of pydensecrf (``M``, a zero row, when absent)."""
    offset: torch.Tensor
    weight: torch.Tensor
    neighbours: torch.Tensor
    d: int
    M: int


def build_lattice(features: torch.Tensor, *, max_bits: int = 62) -> Lattice:
    """Permutohedral lattice of float32 ``features`` (N, d), as pydensecrf's ``Permutohedral::init``."""
    N, d = features.shape
    dev = features.device
    rem0, rank, bary = _simplices(features)
    # pydensecrf's canonical simplex: canonical[r][k] = r for k <= d - r, r - (d+1) after.
    canonical = torch.tensor([[r if k <= d - r else r - (d + 1) for k in range(d + 1)] for r in range(d + 1)],
                             device=dev)
    base = torch.stack(rem0[:d], dim=1).long()  # (N, d)
    ranks = torch.stack(rank[:d], dim=1).long()
    # key[i] = rem0[i] + canonical[remainder][rank[i]], for each point then each remainder (insertion order)
    corner = torch.stack([base + canonical[r][ranks] for r in range(d + 1)], dim=1).reshape(-1, d)
    _key_range_check(corner, d, max_bits)
    corner_keys = _hashable_rows(corner)
    vertex = {key: n for n, key in enumerate(dict.fromkeys(corner_keys))}  # the hash table
    M = len(vertex)
    offset = np.fromiter(map(vertex.__getitem__, corner_keys), dtype=np.int64, count=len(corner_keys))
    keys = torch.from_numpy(np.frombuffer(b"".join(vertex), dtype=np.int64).reshape(M, d).copy())
    neighbours = torch.full((d + 1, 2, M + 1), M, dtype=torch.int64)
    ids = torch.arange(M)
    for j in range(d + 1):
        n1 = keys - 1  # n1 = key - 1 with key[j] + d; n2 = key + 1 with key[j] - d, the inverse step
        if j < d:
            n1[:, j] = keys[:, j] + d
        found = map(vertex.get, _hashable_rows(n1), itertools.repeat(M))
        neighbours[j, 0, :M] = torch.from_numpy(np.fromiter(found, dtype=np.int64, count=M))
        neighbours[j, 1, neighbours[j, 0, :M]] = ids  # v = n1(u) <=> u = n2(v); an absent v lands in M
    weight = torch.stack(bary[: d + 1], dim=1)
    return Lattice(torch.from_numpy(offset).reshape(N, d + 1).to(dev), weight,
                   neighbours[:, :, :M].contiguous().to(dev), d, M)


def lattice_filter(lat: Lattice, values: torch.Tensor, seq: bool) -> torch.Tensor:
    """Splat, blur along axes 0..d, slice (alpha included) of ``values`` (N, V)."""
    N, V = values.shape
    d = lat.d
    buf = torch.zeros(lat.M + 1, V, dtype=torch.float32, device=values.device)
    for r in range(d + 1):
        buf.index_add_(0, lat.offset[:, r], lat.weight[:, r, None] * values)
    for j in range(d + 1):
        n1, n2 = lat.neighbours[j]
        nb = buf[:-1]
        new = nb + 0.5 * (buf[n1] + buf[n2])
        buf = torch.cat([new, buf[-1:]])
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    out = torch.zeros(N, V, dtype=torch.float32, device=values.device)
    for r in range(d + 1):
        if seq:
            out += lat.weight[:, r, None] * buf[lat.offset[:, r]] * alpha
        else:
            out += (lat.weight[:, r, None] * alpha) * buf[lat.offset[:, r]]
    return out


def crf_features(image: torch.Tensor, sxy: float, srgb: float | None) -> torch.Tensor:
    """pydensecrf's ``DenseCRF2D`` features (N, d) float32 of pixel ``j * W + i``: ``(i/sxy, j/sxy)`` and,
    when ``srgb`` is given, the three channels of the uint8 ``image`` (3, H, W) divided by ``srgb``, in
    channel order (float32 quotients of float32 operands, as its loops over the pixels compute them)."""
    _, H, W = image.shape
    pixel = torch.arange(H * W, device=image.device)
    numerators = [pixel % W, pixel // W]
    scales = [sxy, sxy]
    if srgb is not None:
        numerators += list(image.reshape(3, H * W))
        scales += [srgb] * 3
    divisors = torch.tensor(scales, dtype=torch.float32, device=image.device)
    return torch.stack(numerators, dim=1).float() / divisors


def unary_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """``-log(clip(p, 1e-5, 1))`` in float32 (pydensecrf.utils.unary_from_softmax)."""
    return -torch.log(probs.float().clamp(CRF_CLIP, 1.0))


def _crf_one(image, probs, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    L, H, W = probs.shape
    N = H * W
    neg_u = -unary_from_probs(probs).reshape(L, N).t().contiguous()  # (N, L)
    q = torch.softmax(neg_u, dim=1)
    if iterations == 0:
        return q.t().reshape(L, H, W).contiguous()
    kernels = []
    for sxy, srgb, w in ((pos_sxy, None, pos_compat), (bi_sxy, bi_srgb, bi_compat)):
        lat = build_lattice(crf_features(image, sxy, srgb))
        k1 = lattice_filter(lat, torch.ones(N, 1, device=probs.device), seq=True)[:, 0]
        norm = (1.0 / torch.sqrt(k1.double() + 1e-20)).float()
        kernels.append((lat, norm, w))
    seq = L <= 2  # pydensecrf filters 1-2 channels with its scalar code path
    for _ in range(iterations):
        t = neg_u.clone()
        for lat, norm, w in kernels:
            filt = lattice_filter(lat, q * norm[:, None], seq) * norm[:, None]
            t = t - (-w * filt)
        q = torch.softmax(t, dim=1)
    return q.t().reshape(L, H, W).contiguous()


def dense_crf_list(images, probs, *, iterations=10, pos_sxy=1.0, pos_compat=3.0, bi_sxy=67.0,
                    bi_srgb=3.0, bi_compat=4.0):
    """Reference of :func:`primaps_fast.dense_crf_list`: uint8 ``images`` (B, 3, H, W) and a
    sequence of B probability tensors (L_b, H, W); returns B float32 tensors (L_b, H, W)."""
    return [_crf_one(images[b], probs[b].float(), iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb,
                     bi_compat) for b in range(images.shape[0])]


def dense_crf(images, logits, *, iterations=10, pos_sxy=1.0, pos_compat=3.0, bi_sxy=67.0, bi_srgb=3.0,
              bi_compat=4.0):
    """Reference of :func:`primaps_fast.dense_crf`: uint8 ``images`` (B, 3, H, W), float ``logits``
    (B, L, h, w) upsampled bilinearly (``align_corners=False``) to (H, W) when needed, softmax in
    float32, then the pydensecrf mean field. Returns float32 Q (B, L, H, W)."""
    H, W = images.shape[-2:]
    x = logits.float()
    if tuple(x.shape[-2:]) != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    probs = torch.softmax(x, dim=1)
    out = dense_crf_list(images, list(probs), iterations=iterations, pos_sxy=pos_sxy,
                          pos_compat=pos_compat, bi_sxy=bi_sxy, bi_srgb=bi_srgb, bi_compat=bi_compat)
    return torch.stack(out)
