"""pydensecrf's ``pydensecrf.densecrf`` (Krähenbühl's dense CRF, "v2" code) on our kernels.

Same names, arguments, defaults and results as pydensecrf 1.0 / pydensecrf2 1.1: the lattice is
``_C.PermutohedralLattice`` (csrc/dense_crf_lattice.h, the one built for ``primaps_fast.dense_crf``,
here for any feature dimension 1..16); the mean field runs in numpy around it, in pydensecrf's order
(unary, then each pairwise term in the order added, then softmax). ``DenseCRF2D.inference`` with one
Gaussian and one bilateral term in pydensecrf's default options runs the optimised C++ kernel of
``primaps_fast.dense_crf`` instead. Marginals come back as numpy float32 ``(nlabels, nvar)``, laid out
as pydensecrf's (column-major), so ``np.array(Q)``, ``np.argmax(Q, axis=0)`` and reshapes work as with
pydensecrf.
"""
from __future__ import annotations

import enum
from numbers import Number

import numpy as np
import torch

from primaps_fast import _dispatch
from primaps_fast.common import CRF_CLIP
from primaps_fast.ops.dense_crf import MAX_LABELS, _box_fits, _elevation

MAX_FEATURE_DIM = 16  # the lattice dimensions compiled into _C.PermutohedralLattice
_INT32_MAX = 2 ** 31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class KernelType(enum.IntEnum):
    """How pydensecrf parametrises a kernel's features for learning; at the initial parameters every
    type filters the features as given, so inference does not depend on it."""
    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(enum.IntEnum):
    """pydensecrf's kernel normalisation, with ``n = K 1`` (the kernel applied to ones): none (pydensecrf
    computes a constant ``N / sum(n)`` and never applies it), ``1 / n`` before or after filtering, or
    ``1 / sqrt(n)`` on both sides."""
    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = KernelType
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = NormalizationType


def _array(x, name: str, ndim: int, dtype=np.float32) -> np.ndarray:
    """``x`` (anything with the buffer protocol) as a numpy array of ``ndim`` dimensions and ``dtype``,
    C-contiguous and finite, as pydensecrf's typed memoryviews require (TypeError for None or a
    non-buffer, ValueError for a wrong dtype, rank or layout); read-only arrays are accepted."""
    if x is None:
        raise TypeError(f"{name}: expected a {np.dtype(dtype).name} array, got None")
    try:
        memoryview(x)
    except TypeError:
        raise TypeError(f"{name}: expected a {np.dtype(dtype).name} numpy array, got {type(x).__name__}") from None
    a = np.asarray(x)
    if a.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {a.dtype} (convert with "
                         f".astype(np.{np.dtype(dtype).name}))")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (use np.ascontiguousarray)")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return a


def _enum(value, cls, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a {cls.__name__}, got {type(value).__name__} {value!r}")
    try:
        return cls(int(value))
    except ValueError:
        raise ValueError(f"{name}: expected one of {', '.join(m.name for m in cls)}, got {value!r}") from None


def _pair(value, n: int, name: str) -> tuple:
    """A number or a sequence of ``n`` numbers (pydensecrf's ``sxy``/``srgb``) as ``n`` float32, > 0."""
    values = (value,) * n if isinstance(value, Number) else tuple(value)
    if len(values) < n:
        raise ValueError(f"{name}: expected a number or {n} numbers, got {value!r}")
    return tuple(np.float32(_dispatch.check_number(v, name, lo=0.0, lo_open=True)) for v in values[:n])


class _Compatibility:
    """pydensecrf's label compatibility: a number ``w`` (Potts: ``-w Q``), a float32 vector ``w`` (
    diagonal: ``diag(w) Q``, no minus sign) or a float32 matrix ``m`` (``0.5 (m + m^T) Q``). Works on
    rows ``(N, L)``."""

    def __init__(self, compat, nlabels: int):
        if isinstance(compat, Number):
            self.kind, self.w = "potts", np.float32(_dispatch.check_number(compat, "compat", lo=-_FLOAT32_MAX,
                                                                            hi=_FLOAT32_MAX))
            return
        try:
            ndim = memoryview(compat).ndim
        except TypeError:
            raise TypeError(f"compat: expected a number or a float32 array, got {type(compat).__name__}") from None
        if ndim not in (1, 2):
            raise ValueError("compat: LabelCompatibility of dimension >2 not meaningful (a number, a vector or a "
                             f"matrix), got {ndim} dimensions")
        w = _array(compat, "compat", ndim)
        if w.shape != (nlabels,) * ndim:
            raise ValueError(f"compat: expected shape {(nlabels,) * ndim} for {nlabels} labels, got {w.shape}")
        if ndim == 1:
            self.kind, self.w = "diagonal", w.copy()
        else:
            self.kind, self.w = "matrix", (np.float32(0.5) * (w + w.T)).T.copy()  # applied as rows @ W^T

    def scale(self) -> float:
        """The factor the lattice filter applies itself: ``-w`` for Potts, else 1."""
        return float(-self.w) if self.kind == "potts" else 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The compatibility of rows ``x`` ``(N, L)`` that came out of the filter times :meth:`scale`."""
        if self.kind == "diagonal":
            return np.multiply(x, self.w, out=x)
        return x @ self.w if self.kind == "matrix" else x


class _Pairwise:
    """One pairwise term: the features ``(N, d)`` that ``features()`` returns (made, and the lattice
    built, on first use), a compatibility, a normalisation; ``apply(Q)`` is pydensecrf's
    ``PairwisePotential::apply`` on rows ``(N, L)``. ``lo``/``hi`` bound each feature; ``grid``
    describes a DenseCRF2D term for the optimised kernel: ``(sx, sy)`` of a Gaussian, ``(sx, sy, sr,
    sg, sb, image)`` of a bilateral one."""

    def __init__(self, features, lo, hi, compat: _Compatibility, normalization: NormalizationType, grid=None):
        self.features, self.compat, self.normalization, self.grid = features, compat, normalization, grid
        self.lo, self.hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        self._lattice = self._norm = None
        if not _surely_in_range(self.lo, self.hi):
            self.lattice()  # builds it now: refused here if its keys really leave int16

    def lattice(self):
        if self._lattice is None:
            lat = _dispatch.cpp().PermutohedralLattice(self.features(), _dispatch.num_threads())
            if self.normalization != NO_NORMALIZATION:  # pydensecrf computes N / sum(K 1) there, and never uses it
                k1 = lat.filter_ones(_dispatch.num_threads()).astype(np.float64) + 1e-20
                norm = 1.0 / (np.sqrt(k1) if self.normalization == NORMALIZE_SYMMETRIC else k1)
                self._norm = norm.astype(np.float32)
            self._lattice = lat
        return self._lattice

    def apply(self, q: np.ndarray) -> np.ndarray:
        """pydensecrf's ``filter(out, Q, transpose=false)`` then the compatibility; q: float32 ``(N, L)``."""
        lat, ntype = self.lattice(), self.normalization
        out = np.empty_like(q)
        lat.filter(q, out, False, self._norm if ntype in (NORMALIZE_SYMMETRIC, NORMALIZE_BEFORE) else None,
                   self._norm if ntype in (NORMALIZE_SYMMETRIC, NORMALIZE_AFTER) else None, self.compat.scale(),
                   _dispatch.num_threads())
        return self.compat.apply(out)


def _surely_in_range(lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether the lattice keys of features in the box ``[lo, hi]`` (per dimension) certainly stay inside
    pydensecrf's int16 range (with their blur neighbours): the box elevated in float64, with a margin."""
    d = lo.size
    E = _elevation(d).numpy()
    reach = np.maximum(np.abs(E * lo), np.abs(E * hi)).sum(axis=1)[:d].max()
    return reach + 3 * (d + 1) <= 32767


def _softmax(x: np.ndarray) -> np.ndarray:
    """pydensecrf's ``expAndNormalize`` over the labels of C-contiguous rows ``(N, L)``, in place."""
    _dispatch.cpp().softmax_rows(x, _dispatch.num_threads())
    return x


class Unary:
    """A unary energy for :meth:`DenseCRF.setUnary`; ``get()`` gives it as float32 ``(nlabels, nvar)``."""


class ConstUnary(Unary):
    """A fixed unary ``u``: float32 ``(nlabels, nvar)``."""

    def __init__(self, u):
        self.u = _array(u, "u", 2).copy()

    def get(self) -> np.ndarray:
        return self.u


class LogisticUnary(Unary):
    """pydensecrf's ``LogisticUnary(L, f)``: the unary ``L @ f`` (float32 matrices)."""

    def __init__(self, L, f):
        self.L, self.f = _array(L, "L", 2).copy(), _array(f, "f", 2).copy()
        if self.L.shape[1] != self.f.shape[0]:
            raise ValueError(f"f: expected {self.L.shape[1]} rows to multiply L {self.L.shape}, got {self.f.shape}")

    def get(self) -> np.ndarray:
        return self.L @ self.f


class DenseCRF:
    """pydensecrf's ``DenseCRF(nvar, nlabels)``: a fully connected CRF over ``nvar`` variables."""

    def __init__(self, nvar, nlabels, *_, **__):
        self._nvar = _dispatch.check_int(nvar, "nvar", lo=1, hi=_INT32_MAX)
        self._nlabel = _dispatch.check_int(nlabels, "nlabels", lo=1, hi=_INT32_MAX)
        # the mean field's float32 (nvar, nlabels) arrays: unary, marginals, two messages and the filter's rows
        _dispatch.check_memory(5 * 4 * self._nvar * self._nlabel, "nlabels",
                               f"a dense CRF of {self._nvar} variables and {self._nlabel} labels")
        self._unary = None
        self._pairwise = []

    # -- setup --------------------------------------------------------------------------------------
    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """A pairwise term on float32 ``features`` ``(d, nvar)``, ``1 <= d <= 16``: Gaussian kernel
        ``exp(-|f_i - f_j|^2 / 2)`` through the permutohedral lattice, times the label compatibility
        ``compat`` (a number, a float32 vector or matrix)."""
        f = _array(features, "features", 2)
        if f.shape[1] != self._nvar:
            raise ValueError(f"features: bad shape for pairwise energy (need (?, {self._nvar}), got {f.shape})")
        if not 1 <= f.shape[0] <= MAX_FEATURE_DIM:
            raise ValueError(f"features: 1 to {MAX_FEATURE_DIM} feature dimensions are supported, got {f.shape[0]}")
        points = np.ascontiguousarray(f.T)  # (N, d), a copy
        self._add(lambda: points, points.min(axis=0), points.max(axis=0), compat, kernel, normalization)

    def _add(self, features, lo, hi, compat, kernel, normalization, grid=None):
        if self._nvar * (len(lo) + 1) > _INT32_MAX:
            raise ValueError(f"features: {self._nvar} points of {len(lo)} dimensions, more lattice entries "
                             "(points x (dimensions + 1)) than the 2**31 - 1 supported")
        _enum(kernel, KernelType, "kernel")  # no effect on inference (KernelType)
        normalization = _enum(normalization, NormalizationType, "normalization")
        self._pairwise.append(_Pairwise(features, lo, hi, _Compatibility(compat, self._nlabel), normalization, grid))

    def setUnary(self, u):
        """Set the unary from a :class:`Unary` (``ConstUnary``, ``LogisticUnary``)."""
        if not isinstance(u, Unary):
            raise TypeError(f"u: expected a ConstUnary or LogisticUnary, got {type(u).__name__}")
        self._set_unary(u, "u")

    def setUnaryEnergy(self, u, f=None):
        """Set the unary energy: float32 ``u`` ``(nlabels, nvar)``, or ``u @ f`` with ``f`` (pydensecrf's
        logistic unary; as there, ``u`` itself must have the shape ``(nlabels, nvar)``)."""
        u_arr = _array(u, "u", 2)
        if u_arr.shape != (self._nlabel, self._nvar):
            raise ValueError(f"u: bad shape for unary energy (need {(self._nlabel, self._nvar)}, got {u_arr.shape})")
        self._set_unary(ConstUnary(u_arr) if f is None else LogisticUnary(u_arr, f), "f" if f is not None else "u")

    def _set_unary(self, unary, name):
        shape = unary.get().shape
        if shape != (self._nlabel, self._nvar):
            raise ValueError(f"{name}: the unary has shape {shape}, expected {(self._nlabel, self._nvar)}")
        self._unary = unary

    # -- inference ----------------------------------------------------------------------------------
    def _neg_unary(self) -> np.ndarray:
        """-U as rows ``(N, L)`` (zeros without a unary, as pydensecrf)."""
        if self._unary is None:
            return np.zeros((self._nvar, self._nlabel), np.float32)
        return np.ascontiguousarray(-self._unary.get().T)

    def _step(self, q: np.ndarray, neg_u: np.ndarray):
        """One parallel mean-field update of rows ``q`` ``(N, L)``: returns (tmp1, tmp2) as pydensecrf's
        stepInference leaves them (tmp1 the argument of the softmax, tmp2 the last pairwise message or
        None); the new Q is ``_softmax(tmp1)``."""
        tmp1, tmp2 = neg_u.copy(), None
        for term in self._pairwise:
            tmp2 = term.apply(q)
            tmp1 -= tmp2
        return tmp1, tmp2

    def inference(self, niter):
        """Marginals after ``niter`` mean-field iterations: float32 ``(nlabels, nvar)``."""
        niter = _dispatch.check_int(niter, "niter", lo=-_INT32_MAX - 1, hi=_INT32_MAX)
        fast = self._fast_inference(niter)
        if fast is not None:
            return fast
        neg_u = self._neg_unary()
        q = _softmax(neg_u.copy())
        for _ in range(niter):
            q = _softmax(self._step(q, neg_u)[0])
        return q.T

    def _fast_inference(self, niter):  # DenseCRF2D overrides it
        return None

    def startInference(self):
        """``(Q, tmp1, tmp2)``: the initial marginals ``softmax(-U)`` (zeros without a unary, as
        pydensecrf) and two buffers for :meth:`stepInference`."""
        L, N = self._nlabel, self._nvar
        q = np.zeros((N, L), np.float32) if self._unary is None else _softmax(self._neg_unary())
        return q.T, np.zeros((L, N), np.float32, order="F"), np.zeros((L, N), np.float32, order="F")

    def stepInference(self, Q, tmp1, tmp2):
        """One mean-field iteration on ``Q`` (float32 ``(nlabels, nvar)``, as :meth:`startInference`
        returns it), in place; ``tmp1``/``tmp2`` receive the softmax's argument and the last pairwise
        message (pydensecrf's contents)."""
        q = self._marginals(Q, "Q", writable=True)
        bufs = [self._marginals(t, name, writable=True) for t, name in ((tmp1, "tmp1"), (tmp2, "tmp2"))]
        t1, t2 = self._step(np.ascontiguousarray(q.T), self._neg_unary())
        bufs[0][...] = t1.T
        q[...] = _softmax(t1).T
        if t2 is not None:
            bufs[1][...] = t2.T

    def klDivergence(self, Q):
        """pydensecrf's KL divergence of marginals ``Q`` (float32 ``(nlabels, nvar)``) from the model:
        ``sum Q log Q + sum U Q + sum_k sum Q * (pairwise message k)``, a float."""
        q = np.ascontiguousarray(self._marginals(Q, "Q").T)
        kl = float(np.sum(q.astype(np.float64) * np.log(np.maximum(q, np.float32(1e-20)), dtype=np.float64)))
        if self._unary is not None:
            kl += float(np.sum(self._unary.get().T.astype(np.float64) * q))
        for term in self._pairwise:
            kl += float(np.sum(q * term.apply(q), dtype=np.float64))
        return kl

    def _marginals(self, Q, name: str, writable: bool = False) -> np.ndarray:
        """``Q`` as a float32 ``(nlabels, nvar)`` array (any layout; writable when asked)."""
        if not isinstance(Q, np.ndarray):
            raise TypeError(f"{name}: expected the float32 array of startInference/inference, got {type(Q).__name__}")
        if Q.dtype != np.float32 or Q.shape != (self._nlabel, self._nvar):
            raise ValueError(f"{name}: expected float32 {(self._nlabel, self._nvar)}, got {Q.dtype} {Q.shape}")
        if writable and not Q.flags.writeable:
            raise ValueError(f"{name}: expected a writable array")
        if not writable and not np.isfinite(Q).all():
            raise ValueError(f"{name}: contains NaN or Inf")
        return Q


class DenseCRF2D(DenseCRF):
    """pydensecrf's ``DenseCRF2D(w, h, nlabels)``: a dense CRF over the pixels of a ``h x w`` image,
    pixel ``k = y * w + x``."""

    def __init__(self, w, h, nlabels, *_, **__):
        self._w = _dispatch.check_int(w, "w", lo=1, hi=_INT32_MAX)
        self._h = _dispatch.check_int(h, "h", lo=1, hi=_INT32_MAX)
        if self._w * self._h > _INT32_MAX:
            raise ValueError(f"w: {w} x {h} pixels, more than 2**31 - 1")
        super().__init__(self._w * self._h, nlabels)

    def _features(self, sx, sy, image=None, srgb=None):
        """A function giving pydensecrf's features ``(N, d)``: ``(x / sx, y / sy)``, then the image's
        channels divided by ``srgb`` (float32 divisions, as pydensecrf); and their bounds."""
        lo = [0.0, 0.0] + ([] if image is None else list(image.min(axis=(0, 1)) / np.float32(srgb)))
        hi = [(self._w - 1) / sx, (self._h - 1) / sy] + ([] if image is None else
                                                         list(image.max(axis=(0, 1)) / np.float32(srgb)))

        def features():
            f = np.empty((self._h, self._w, 2 if image is None else 5), np.float32)
            f[..., 0] = np.arange(self._w, dtype=np.float32) / sx
            f[..., 1] = (np.arange(self._h, dtype=np.float32) / sy)[:, None]
            if image is not None:
                f[..., 2:] = image / np.float32(srgb)
            return f.reshape(-1, f.shape[-1])

        return features, lo, hi

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Gaussian kernel on ``(x / sx, y / sy)``; ``sxy`` a number or ``(sx, sy)``."""
        sx, sy = _pair(sxy, 2, "sxy")
        self._add(*self._features(sx, sy), compat, kernel, normalization, grid=(sx, sy))

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Bilateral kernel on ``(x / sx, y / sy, c0 / sr, c1 / sg, c2 / sb)`` of the uint8 ``(h, w, 3)``
        image ``rgbim`` (channels in the order given); ``sxy``, ``srgb`` numbers or tuples."""
        sx, sy = _pair(sxy, 2, "sxy")
        sr, sg, sb = _pair(srgb, 3, "srgb")
        im = _array(rgbim, "rgbim", 3, dtype=np.uint8)
        if im.shape[:2] != (self._h, self._w):
            raise ValueError(f"rgbim: bad shape for pairwise bilateral (need {(self._h, self._w, 3)}, got {im.shape})")
        if im.shape[2] != 3:
            raise ValueError("rgbim: addPairwiseBilateral only works for RGB images (h, w, 3); for other images build "
                             "the features with utils.create_pairwise_bilateral and use addPairwiseEnergy")
        im = im.copy()
        self._add(*self._features(sx, sy, im, (sr, sg, sb)), compat, kernel, normalization,
                  grid=(sx, sy, sr, sg, sb, im))

    def _fast_inference(self, niter):
        """The optimised kernel of ``primaps_fast.dense_crf`` for its configuration: a Gaussian then a
        bilateral term, each with equal scales per axis (and per channel), Potts compatibility in
        (0, 1e30] and symmetric normalisation, a constant unary, at most ``MAX_LABELS`` labels, a pixel
        count that is a multiple of 4 (otherwise pydensecrf's lattice gets its padding vertices, which
        the kernel does not add), and features whose packed keys fit the kernel's 62 bits."""
        terms = self._pairwise
        if (len(terms) != 2 or self._nvar % 4 or self._nlabel > MAX_LABELS or isinstance(self._unary, LogisticUnary)
                or [t.grid is not None and len(t.grid) for t in terms] != [2, 6]):
            return None
        (gx, gy), (bx, by, sr, sg, sb, image) = terms[0].grid, terms[1].grid
        if (gx != gy or bx != by or not sr == sg == sb
                or any(t.normalization != NORMALIZE_SYMMETRIC or t.compat.kind != "potts"
                       or not 0 < t.compat.w <= 1e30 for t in terms)
                or not all(_box_fits(_elevation(t.lo.size), torch.from_numpy(t.lo), torch.from_numpy(t.hi))
                           for t in terms)):
            return None
        L, N = self._nlabel, self._nvar
        unary = (np.zeros((L, N), np.float32) if self._unary is None else self._unary.get()).reshape(-1)
        out = np.empty_like(unary)
        _dispatch.cpp().dense_crf(np.ascontiguousarray(image.transpose(2, 0, 1))[None], unary,
                                  np.array([L], np.int64), out, max(0, niter), CRF_CLIP, float(gx),
                                  float(terms[0].compat.w), float(bx), float(sr), float(terms[1].compat.w),
                                  _dispatch.num_threads(), True)
        return np.asfortranarray(out.reshape(L, N))  # pydensecrf's layout, as the general path
