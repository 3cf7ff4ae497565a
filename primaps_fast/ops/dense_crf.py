"""Dense CRF (pydensecrf's mean field, Krähenbühl's "v2" code) on a batch, with the GIL released.

Semantics (docs/dense_crf.md): ``unary_from_softmax`` (clip to [1e-5, 1], -log), a Gaussian kernel on
``(x, y) / pos_sxy`` and a bilateral kernel on ``(x / bi_sxy, y / bi_sxy, c0 / bi_srgb, c1 / bi_srgb,
c2 / bi_srgb)`` (image channels in the order given), both through the permutohedral lattice with
symmetric normalisation, Potts compatibility and parallel mean-field updates.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from primaps_fast import _dispatch
from primaps_fast.common import CRF_CLIP


# Bounds of the kernels' arguments (the same in every backend).
MAX_ITERATIONS = 1000  # mean field converges in tens of iterations; 10 in the official code
MAX_LABELS = 1 << 20   # labels per image (the C++ kernel's limit)
# Memory of one image's bilateral lattice while the C++ kernel builds it: 6 entries a pixel, each with
# its key, vertex id, weight and 1.5-3 hash-table slots, and the features (about 190-260 B a pixel).
_LATTICE_BYTES_PER_PIXEL = 272
# The lattice (docs/dense_crf.md): each elevated coordinate divided by d + 1 must stay below 2**22 (the
# float32 rounding of the elevation is exact there) and the packed keys must fit in 62 bits.
_MAX_COORD = 2.0 ** 22
_MAX_KEY_BITS = 62


def _check_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    _dispatch.check_int(iterations, "iterations", lo=0, hi=MAX_ITERATIONS)
    for name, value in (("pos_sxy", pos_sxy), ("bi_sxy", bi_sxy), ("bi_srgb", bi_srgb)):
        _dispatch.check_number(value, name, lo=0.0, lo_open=True)
    for name, value in (("pos_compat", pos_compat), ("bi_compat", bi_compat)):
        # compat times the filtered marginals (at most the pixel count) must stay finite in float32
        _dispatch.check_number(value, name, lo=0.0, hi=1e30, lo_open=True)


def _elevation(d: int) -> torch.Tensor:
    """The ``(d + 1, d)`` float64 matrix of the lattice's elevation (pydensecrf's scale factors
    included): ``elevated = E @ features``."""
    E = torch.zeros(d + 1, d, dtype=torch.float64)
    sf = [math.sqrt(2.0 / 3.0) * (d + 1) / math.sqrt((i + 2) * (i + 1)) for i in range(d)]
    for j in range(d + 1):
        for i in range(j, d):
            E[j, i] += sf[i]
        if j > 0:
            E[j, j - 1] -= j * sf[j - 1]
    return E


def _lattice_fits(lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Whether elevated coordinates in ``[lo, hi]`` (float64 ``(d + 1,)``) fit the kernels' lattice."""
    D = lo.numel()
    if float(torch.maximum(lo.abs(), hi.abs()).max()) / D >= _MAX_COORD:
        return False
    rem_lo, rem_hi = torch.round(lo / D) * D, torch.round(hi / D) * D
    # key coordinates 1..d (csrc/dense_crf_lattice.h), each widened by 3 (d + 1) on both sides for the blur
    # neighbours
    bits = sum(int(x).bit_length() for x in (rem_hi - rem_lo + 6 * D)[1:].tolist())
    return bits <= _MAX_KEY_BITS


def _box_fits(E: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Whether features anywhere in the box ``[lo, hi]`` (per coordinate) fit the lattice."""
    a, b = E * lo, E * hi
    return _lattice_fits(torch.minimum(a, b).sum(1), torch.maximum(a, b).sum(1))


def _check_lattice(images: torch.Tensor, pos_sxy: float, bi_sxy: float, bi_srgb: float) -> None:
    """Refuse, naming the argument, parameters whose lattice coordinates the kernels cannot represent
    (tiny ``sxy``/``srgb`` or huge images), before any kernel runs. The Gaussian features are the pixel
    positions (the box of the grid's corners is exact); the bilateral ones first use the box of the
    positions and of the batch's colour range, and only when that box does not fit, each image's own
    pixels (so nothing that fits is refused; the kernels' own check stays as a backstop)."""
    B, _, H, W = images.shape
    pos_sxy, bi_sxy, bi_srgb = float(pos_sxy), float(bi_sxy), float(bi_srgb)
    zero = torch.zeros(2, dtype=torch.float64)
    pos_hi = torch.tensor([W - 1.0, H - 1.0], dtype=torch.float64)
    if not _box_fits(_elevation(2), zero, pos_hi / pos_sxy):
        raise ValueError(f"pos_sxy: {pos_sxy:g} is too small for {H}x{W} images: the Gaussian kernel's lattice "
                         "coordinates (x / pos_sxy, y / pos_sxy) exceed what the kernels represent")
    E = _elevation(5)
    x = images.detach()
    lo = torch.cat([zero, x.amin(dim=(0, 2, 3)).double().cpu() / bi_srgb])
    hi = torch.cat([pos_hi / bi_sxy, x.amax(dim=(0, 2, 3)).double().cpu() / bi_srgb])
    if _box_fits(E, lo, hi):
        return
    rows = max(1, (1 << 20) // W)  # bounded temporary memory on huge images
    for b in range(B):
        el_lo = torch.full((6,), math.inf, dtype=torch.float64)
        el_hi = -el_lo
        for y0 in range(0, H, rows):
            y, xx = torch.meshgrid(torch.arange(y0, min(H, y0 + rows), dtype=torch.float64),
                                   torch.arange(W, dtype=torch.float64), indexing="ij")
            f = torch.cat([torch.stack([xx.reshape(-1), y.reshape(-1)], 1) / bi_sxy,
                           x[b, :, y0:y0 + rows].reshape(3, -1).t().double().cpu() / bi_srgb], 1)
            el = f @ E.t()
            el_lo, el_hi = torch.minimum(el_lo, el.amin(0)), torch.maximum(el_hi, el.amax(0))
        if not _lattice_fits(el_lo, el_hi):
            name, value = ("bi_sxy", bi_sxy) if max(H - 1, W - 1) / bi_sxy > 255 / bi_srgb else ("bi_srgb", bi_srgb)
            raise ValueError(f"{name}: {value:g} is too small for image {b} ({H}x{W}): the bilateral kernel's "
                             "lattice coordinates (x / bi_sxy, y / bi_sxy, colour / bi_srgb) exceed what the "
                             "kernels represent")


def _check_images(images):
    _dispatch.check_tensor(images, "images", ndim=4)
    if images.dtype != torch.uint8:
        raise TypeError(f"images: expected uint8 (B, 3, H, W), got {images.dtype}")
    if images.shape[1] != 3:
        raise ValueError(f"images: expected 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")


def dense_crf_list(images: torch.Tensor, probs: Sequence[torch.Tensor], *, iterations: int = 10,
                   pos_sxy: float = 1.0, pos_compat: float = 3.0, bi_sxy: float = 67.0,
                   bi_srgb: float = 3.0, bi_compat: float = 4.0,
                   backend: str | None = None) -> list:
    """Dense CRF of each image with its own label count (the batch entry point of ``pseudo_labels``).

    Args:
        images: uint8 ``(B, 3, H, W)``; the channels enter the bilateral features in this order.
        probs: a sequence of ``B`` float tensors ``(L_b, H, W)``, ``L_b >= 1``: per-pixel probabilities
            (softmax already applied), finite in float32. The unary is ``-log(clip(p, 1e-5, 1))``.
        iterations: mean-field iterations, in ``[0, MAX_ITERATIONS]`` (1000; 0 returns the clipped,
            renormalised probabilities).
        pos_sxy, pos_compat: Gaussian kernel (pydensecrf ``addPairwiseGaussian``), > 0.
        bi_sxy, bi_srgb, bi_compat: bilateral kernel (``addPairwiseBilateral``), > 0.
        backend: None (C++ on CPU; CUDA C++ or Triton on CUDA), "cpu", "cuda", "triton" or "reference".

    Returns:
        a list of ``B`` float32 tensors ``(L_b, H, W)``: the marginals Q of pydensecrf's
        ``inference(iterations)``, on the device of ``images``.

    Raises ``ValueError`` naming ``pos_sxy``, ``bi_sxy`` or ``bi_srgb`` when the lattice coordinates do
    not fit (an elevated coordinate of 2**22 (d + 1) or more, or keys beyond 62 bits: huge images or tiny
    ``sxy``/``srgb``; pydensecrf's int16 keys silently overflow there), and naming ``probs[b]`` beyond
    ``MAX_LABELS`` (2**20) labels.
    """
    _check_images(images)
    _check_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat)
    B, _, H, W = images.shape
    if isinstance(probs, torch.Tensor) or not isinstance(probs, Sequence):
        raise TypeError(f"probs: expected a sequence of {B} tensors (L_b, H, W), got {type(probs).__name__}")
    if len(probs) != B:
        raise ValueError(f"probs: expected {B} tensors (one per image), got {len(probs)}")
    for b, p in enumerate(probs):
        _dispatch.check_tensor(p, f"probs[{b}]", ndim=3, floating=True)
        if tuple(p.shape[1:]) != (H, W):
            raise ValueError(f"probs[{b}]: expected shape (L, {H}, {W}), got {tuple(p.shape)}")
        if p.shape[0] > MAX_LABELS:
            raise ValueError(f"probs[{b}]: {p.shape[0]} labels, more than the {MAX_LABELS} (2**20) the kernels support")
        if p.device != images.device:
            raise ValueError(f"probs[{b}]: on {p.device}, but images are on {images.device}")
    # unary, marginals and two mean-field buffers in float32, for every label of the batch; a lattice
    _dispatch.check_memory((16 * sum(p.shape[0] for p in probs) + _LATTICE_BYTES_PER_PIXEL) * H * W, "probs",
                           f"the dense CRF of {B} images of {H}x{W} pixels", images.device)
    _check_lattice(images, pos_sxy, bi_sxy, bi_srgb)
    backend = _dispatch.choose_backend(backend, images, *probs)
    if backend != "cpu":  # the C++ kernel checks the float32 values itself
        for b, p in enumerate(probs):
            _dispatch.check_tensor(p.float(), f"probs[{b}]", finite=True)
    params = dict(iterations=iterations, pos_sxy=float(pos_sxy), pos_compat=float(pos_compat),
                  bi_sxy=float(bi_sxy), bi_srgb=float(bi_srgb), bi_compat=float(bi_compat))
    if backend == "reference":
        return _dispatch.reference("dense_crf_list")(images, list(probs), **params)
    return _dispatch.kernel("dense_crf_list", backend)(images, list(probs), **params)


@torch.library.custom_op("primaps_fast::dense_crf", mutates_args=(), device_types="cpu")
def _dense_crf_flat(images: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, iterations: int,
                    pos_sxy: float, pos_compat: float, bi_sxy: float, bi_srgb: float,
                    bi_compat: float) -> torch.Tensor:
    """C++ kernel: uint8 ``(B, 3, H, W)`` images, float32 flat probabilities (each image's ``(L_b, H,
    W)`` in turn; the kernel refuses NaN and Inf and takes the unary ``-log(clip(p, CRF_CLIP, 1))``
    itself), int64 ``(B,)`` label counts ``L_b`` -> the marginals Q, laid out like ``probs``."""
    out = torch.empty_like(probs)
    _dispatch.cpp().dense_crf(images.numpy(), probs.numpy(), labels.numpy(), out.numpy(), iterations, CRF_CLIP,
                              pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat, _dispatch.num_threads())
    return out


@_dense_crf_flat.register_fake
def _(images, probs, labels, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    return torch.empty_like(probs)


_dispatch.skip_dynamo_import(_dense_crf_flat)


def dense_crf_cpu(images, probs, *, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    """C++ backend of ``dense_crf_list`` (validated inputs): returns B float32 (L_b, H, W)."""
    labels = torch.tensor([p.shape[0] for p in probs], dtype=torch.int64)
    # one flat float32 buffer for the whole batch (label counts differ); a single image needs no copy
    flat = [p.detach().float().reshape(-1) for p in probs]
    flat = flat[0] if len(flat) == 1 else torch.cat(flat)
    out = _dense_crf_flat(images.detach().contiguous(), flat, labels, iterations, pos_sxy, pos_compat,
                          bi_sxy, bi_srgb, bi_compat)
    H, W = images.shape[-2:]
    counts = labels.tolist()
    return [q.view(L, H, W) for q, L in zip(out.split([L * H * W for L in counts]), counts)]


def dense_crf(images: torch.Tensor, logits: torch.Tensor, *, iterations: int = 10, pos_sxy: float = 1.0,
              pos_compat: float = 3.0, bi_sxy: float = 67.0, bi_srgb: float = 3.0, bi_compat: float = 4.0,
              backend: str | None = None) -> torch.Tensor:
    """Mean-field marginals of the fully connected CRF of pydensecrf (as the official PriMaPs calls it).

    Args:
        images: uint8 ``(B, 3, H, W)``. The channels enter the bilateral features in the order given
            (the lattice is not invariant to their order; the official pipeline passes BGR).
        logits: float ``(B, L, h, w)``, ``1 <= L <= 2**20``, finite in float32; upsampled bilinearly
            (``align_corners=False``) to ``(H, W)`` when ``(h, w) != (H, W)``, then softmax (float32).
        iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat, backend: as
            :func:`dense_crf_list`.

    Returns:
        float32 ``(B, L, H, W)``: pydensecrf's ``inference(iterations)`` of ``DenseCRF2D`` with
        ``unary_from_softmax(softmax(logits))``, ``addPairwiseGaussian(sxy=pos_sxy,
        compat=pos_compat)`` and ``addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, compat=bi_compat)``.
        The C++ backend reproduces pydensecrf's float32 arithmetic step by step (same lattice, same
        summation order); only ``exp``/``log`` differ in the last bits (a vectorised ``expf``, ~1 ulp),
        so marginals agree to ~1e-5.
    """
    _check_images(images)
    _check_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat)
    _dispatch.check_tensor(logits, "logits", ndim=4, floating=True, finite=True)
    B, L = logits.shape[:2]
    H, W = images.shape[-2:]
    if B != images.shape[0]:
        raise ValueError(f"logits: batch {B} does not match images batch {images.shape[0]}")
    if logits.device != images.device:
        raise ValueError(f"logits: on {logits.device}, but images are on {images.device}")
    if L > MAX_LABELS:
        raise ValueError(f"logits: {L} labels, more than the {MAX_LABELS} (2**20) the kernels support")
    # the upsampled probabilities, then the CRF's own buffers and a lattice (dense_crf_list)
    _dispatch.check_memory((20 * B * L + _LATTICE_BYTES_PER_PIXEL) * H * W, "logits",
                           f"the dense CRF of {B} images of {H}x{W} pixels "
                           f"with {L} labels", images.device)
    x = logits.detach().float()
    if tuple(x.shape[-2:]) != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    if not _dispatch.all_finite(x):
        raise ValueError("logits: values beyond the float32 range (the CRF computes in float32; |logits| must "
                         "stay below ~3.4e38)")
    probs = torch.softmax(x, dim=1)
    out = dense_crf_list(images, list(probs), iterations=iterations, pos_sxy=pos_sxy, pos_compat=pos_compat,
                         bi_sxy=bi_sxy, bi_srgb=bi_srgb, bi_compat=bi_compat, backend=backend)
    return torch.stack(out)
