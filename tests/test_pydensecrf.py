"""primaps_fast.pydensecrf: the lattice against an independent numpy lattice written here, invariances,
errors, install(), a pydensecrf caller run in a subprocess where pydensecrf does not import, and
everything against pydensecrf2 when it is installed (those tests skip with the reason otherwise)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from primaps_fast import _dispatch
import primaps_fast.pydensecrf as ours
import primaps_fast.pydensecrf.densecrf as dcrf
import primaps_fast.pydensecrf.utils as utils

from child_process import child_env


def real():
    """pydensecrf2's densecrf and utils modules (the test skips without them)."""
    if ours.installed():
        ours.uninstall()
    d = pytest.importorskip("pydensecrf.densecrf",
                            reason="pydensecrf2 is an optional comparison (pip install pydensecrf2)")
    assert not d.__name__.startswith("primaps_fast")
    import pydensecrf.utils as u

    return d, u


# ---------------------------------------------------------------------------------------------------
# An independent permutohedral lattice (dicts, float32 elevation as pydensecrf, float64 values)

def numpy_lattice(features, phantom):
    """Vertices, per-point (vertex ids, barycentric weights) and blur neighbours of pydensecrf's lattice
    of float32 features (N, d); ``phantom`` adds the vertices of the zero vector (pydensecrf's SSE
    padding lanes when N % 4 != 0)."""
    N, d = features.shape
    D = d + 1
    f32 = np.float32
    inv_std = f32(np.sqrt(2.0 / 3.0) * D)
    sf = [f32(1.0 / np.sqrt((i + 2) * (i + 1)) * np.float64(inv_std)) for i in range(d)]
    invd = f32(1.0 / D)
    index, keys, points = {}, [], []
    rows = list(features) + ([np.zeros(d, f32)] if phantom else [])
    for f in rows:
        el = [f32(0)] * D
        sm = f32(0)
        for j in range(d, 0, -1):
            cf = f32(f[j - 1] * sf[j - 1])
            el[j] = f32(sm - f32(j) * cf)
            sm = f32(sm + cf)
        el[0] = sm
        v = [f32(np.rint(f32(invd * x))) for x in el]
        rem = [f32(x * f32(D)) for x in v]
        total = int(sum(int(x) for x in v))
        rank = [0] * D
        for i in range(d):
            for j in range(i + 1, D):
                if f32(el[i] - rem[i]) < f32(el[j] - rem[j]):
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(D):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += D
                rem[i] = f32(rem[i] + D)
            elif rank[i] >= D:
                rank[i] -= D
                rem[i] = f32(rem[i] - D)
        bary = [f32(0)] * (D + 1)
        for i in range(D):
            x = f32(f32(el[i] - rem[i]) * invd)
            bary[d - rank[i]] = f32(bary[d - rank[i]] + x)
            bary[d - rank[i] + 1] = f32(bary[d - rank[i] + 1] - x)
        bary[0] = f32(bary[0] + f32(1 + bary[D]))
        ids = []
        for r in range(D):
            key = tuple(int(rem[i]) + (r if rank[i] <= d - r else r - D) for i in range(d))
            ids.append(index.setdefault(key, len(index)))
            if len(keys) < len(index):
                keys.append(key)
        points.append((ids, [float(b) for b in bary[:D]]))
    nbr = []
    for j in range(D):
        axis = []
        for key in keys:
            n1 = [k - 1 for k in key]
            n2 = [k + 1 for k in key]
            if j < d:
                n1[j], n2[j] = key[j] + d, key[j] - d
            axis.append((index.get(tuple(n1)), index.get(tuple(n2))))
        nbr.append(axis)
    return len(keys), points[:N], nbr


def numpy_filter(features, values, reverse=False, phantom=None):
    """pydensecrf's Permutohedral::compute of values (N, V), in float64 on the lattice above."""
    N, d = features.shape
    M, points, nbr = numpy_lattice(features, N % 4 != 0 if phantom is None else phantom)
    vals = np.zeros((M, values.shape[1]))
    for (ids, w), x in zip(points, values.astype(np.float64)):
        for v, b in zip(ids, w):
            vals[v] += b * x
    for j in (range(d, -1, -1) if reverse else range(d + 1)):
        new = vals.copy()
        for v, (a, c) in enumerate(nbr[j]):
            new[v] += 0.5 * ((vals[a] if a is not None else 0) + (vals[c] if c is not None else 0))
        vals = new
    alpha = 1.0 / (1 + 2.0 ** -d)
    return np.stack([sum(b * vals[v] for v, b in zip(ids, w)) * alpha for ids, w in points])


def lattice(features, threads=2):
    return _dispatch.cpp().PermutohedralLattice(np.ascontiguousarray(features, dtype=np.float32), threads)


def ours_filter(features, values, reverse=False, threads=2):
    out = np.empty_like(values)
    lattice(features, threads).filter(values, out, reverse, threads=threads)
    return out


def test_one_point_by_hand():
    """d = 1, one point at 0: weights (1, 0) on the vertices 0 and 1; splat (1, 0); blur along axis 0
    (neighbours of 0: 1 and -1; of 1: 2 and 0) gives (1, 0.5), along axis 1 (neighbours key -+ 1) gives
    (1 + 0.5 * 0.5, 0.5 + 0.5 * 1) = (1.25, 1); slice 1 * 1.25 * alpha, alpha = 1 / (1 + 1/2)."""
    lat = lattice(np.zeros((1, 1), np.float32))
    assert lat.vertices == 2
    assert lat.filter_ones(1)[0] == pytest.approx(1.25 * 2 / 3, rel=1e-6)
    out = np.empty((1, 3), np.float32)
    lat.filter(np.array([[2.0, -1.0, 0.5]], np.float32), out, True)  # the transpose: axes 1 then 0
    # reverse order: axis 1 first gives (1, 0.5) again by symmetry, then axis 0 gives (1.25, 1)
    np.testing.assert_allclose(out[0], np.array([2.0, -1.0, 0.5]) * 1.25 * 2 / 3, rtol=1e-6)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("N", [48, 51])
def test_lattice_filter_matches_an_independent_lattice(d, N):
    rng = np.random.default_rng(d * 100 + N)
    features = (rng.random((N, d)) * 3 - 1).astype(np.float32)
    for V in (1, 2, 5, 40):  # the scalar path (V <= 2), vectors, and chunks of 32 lanes
        values = rng.random((N, V)).astype(np.float32)
        for reverse in (False, True):
            want = numpy_filter(features, values, reverse)
            np.testing.assert_allclose(ours_filter(features, values, reverse), want, rtol=2e-5, atol=1e-6)
    k1 = lattice(features).filter_ones(2)
    np.testing.assert_allclose(k1, numpy_filter(features, np.ones((N, 1)))[:, 0], rtol=2e-5)
    assert lattice(features).vertices == numpy_lattice(features, N % 4 != 0)[0]


def test_padding_vertices_change_the_result_as_in_pydensecrf():
    """With N % 4 != 0 pydensecrf's lattice holds the vertices of the zero vector: points near the origin
    then filter differently than without them, and ours matches the lattice with them."""
    rng = np.random.default_rng(1)
    features = (rng.random((7, 3)) * 0.8 + 0.3).astype(np.float32)
    values = rng.random((7, 3)).astype(np.float32)
    with_padding, without = numpy_filter(features, values, phantom=True), numpy_filter(features, values, phantom=False)
    assert np.abs(with_padding - without).max() > 1e-3
    np.testing.assert_allclose(ours_filter(features, values), with_padding, rtol=2e-5, atol=1e-6)


def test_lattice_invariances():
    rng = np.random.default_rng(2)
    N, d = 400, 6
    features = (rng.random((N, d)) * 5).astype(np.float32)
    values = rng.random((N, 7)).astype(np.float32)
    out = ours_filter(features, values)
    # the thread count changes nothing (fixed summation order)
    np.testing.assert_array_equal(ours_filter(features, values, threads=1), out)
    # permuting the points permutes the result (up to the splat's summation order)
    perm = rng.permutation(N)
    np.testing.assert_allclose(ours_filter(features[perm], values[perm]), out[perm], rtol=1e-5, atol=1e-6)
    # the filter is linear in the values
    other = rng.random((N, 7)).astype(np.float32)
    np.testing.assert_allclose(ours_filter(features, values + other), out + ours_filter(features, other),
                               rtol=1e-5, atol=1e-5)
    # clusters far apart in feature space do not interact
    far = np.concatenate([features, features + 1000]).astype(np.float32)
    both = ours_filter(far, np.concatenate([values, other]))
    np.testing.assert_allclose(both[:N], out, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The mean field without pydensecrf

def random_crf(cls, N, L, d, seed, unary=True):
    rng = np.random.default_rng(seed)
    crf = cls(N, L)
    if unary:
        crf.setUnaryEnergy(rng.standard_normal((L, N)).astype(np.float32))
    crf.addPairwiseEnergy((rng.random((d, N)) * 4).astype(np.float32), compat=3.0)
    return crf


def test_inference_is_the_mean_field_of_its_own_steps():
    """inference(n) equals n stepInference calls from startInference, and those steps lower the KL
    divergence (mean field with a Potts kernel)."""
    crf = random_crf(dcrf.DenseCRF, 500, 4, 3, 0)
    Q, tmp1, tmp2 = crf.startInference()
    kl = [crf.klDivergence(Q)]
    for _ in range(5):
        crf.stepInference(Q, tmp1, tmp2)
        kl.append(crf.klDivergence(Q))
    np.testing.assert_allclose(np.array(Q), np.array(crf.inference(5)), rtol=1e-6, atol=1e-7)
    assert kl[-1] < kl[0]
    Qn = np.array(Q)
    assert Qn.shape == (4, 500) and Qn.dtype == np.float32
    np.testing.assert_allclose(Qn.sum(0), 1, rtol=1e-5)
    # tmp1 holds the softmax's argument: softmax(tmp1) is Q
    t = np.array(tmp1)
    np.testing.assert_allclose(np.exp(t - t.max(0)) / np.exp(t - t.max(0)).sum(0), Qn, rtol=1e-5, atol=1e-7)


def test_kl_divergence_formula():
    """klDivergence(Q) = sum Q log Q + sum U Q + sum Q * (pairwise message), computed here from the
    filter of the lattice."""
    rng = np.random.default_rng(3)
    N, L, d = 300, 3, 2
    U = rng.standard_normal((L, N)).astype(np.float32)
    f = (rng.random((d, N)) * 3).astype(np.float32)
    crf = dcrf.DenseCRF(N, L)
    crf.setUnaryEnergy(U)
    crf.addPairwiseEnergy(f, compat=0.05, normalization=dcrf.NO_NORMALIZATION)
    Q = np.array(crf.inference(2))
    msg = -0.05 * numpy_filter(f.T, Q.T).T  # Potts: -w K Q, no normalisation
    want = (Q * np.log(np.maximum(Q, 1e-20))).sum() + (U * Q).sum() + (Q * msg).sum()
    assert crf.klDivergence(Q) == pytest.approx(want, rel=1e-5)


def test_no_unary_and_zero_iterations():
    crf = random_crf(dcrf.DenseCRF, 64, 3, 2, 4, unary=False)
    Q, _, _ = crf.startInference()
    assert not np.array(Q).any()  # pydensecrf starts from zeros without a unary
    np.testing.assert_allclose(np.array(crf.inference(0)), 1 / 3, rtol=1e-6)
    crf = random_crf(dcrf.DenseCRF, 64, 3, 2, 4)
    np.testing.assert_array_equal(np.array(crf.inference(0)), np.array(crf.inference(-3)))


def test_label_compatibility_forms():
    """A diagonal w and a matrix diag(w) give the same result; a Potts w equals the diagonal -w; an
    asymmetric matrix acts as its symmetric part."""
    rng = np.random.default_rng(5)
    N, L = 200, 4
    U = rng.standard_normal((L, N)).astype(np.float32)
    f = (rng.random((3, N)) * 3).astype(np.float32)
    w = rng.random(L).astype(np.float32)
    m = rng.standard_normal((L, L)).astype(np.float32)

    def q(compat):
        crf = dcrf.DenseCRF(N, L)
        crf.setUnaryEnergy(U)
        crf.addPairwiseEnergy(f, compat)
        return np.array(crf.inference(3))

    np.testing.assert_allclose(q(w), q(np.diag(w).astype(np.float32)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q(2.5), q(np.full(L, -2.5, np.float32)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q(m), q(((m + m.T) / 2).astype(np.float32)), rtol=1e-5, atol=1e-6)


def test_dense_crf_2d_fast_path_equals_the_general_path():
    """DenseCRF2D with pydensecrf's defaults runs the optimised kernel; the same CRF through the general
    lattice path gives the same marginals."""
    rng = np.random.default_rng(6)
    H, W, L = 40, 48, 5
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    U = rng.standard_normal((L, H * W)).astype(np.float32)
    crf = dcrf.DenseCRF2D(W, H, L)
    crf.setUnaryEnergy(U)
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=30, srgb=13, rgbim=img, compat=10)
    fast = np.array(crf.inference(5))
    crf._fast_inference = lambda n: None  # the general path of the same model
    general = np.array(crf.inference(5))
    np.testing.assert_allclose(fast, general, rtol=1e-5, atol=2e-6)
    assert (fast.argmax(0) == general.argmax(0)).all()


# ---------------------------------------------------------------------------------------------------
# Errors

def bad_calls():
    """(description, callable) pairs that must raise ValueError or TypeError, each taking the module;
    pydensecrf raises for all but the last ones (PYDENSECRF_RAISES)."""
    f32 = np.float32
    img = np.zeros((6, 5, 3), np.uint8)
    U = np.zeros((3, 30), f32)
    feats = np.zeros((2, 30), f32)

    def crf2d(m):
        c = m.DenseCRF2D(5, 6, 3)
        return c

    return [
        ("unary float64", lambda m: crf2d(m).setUnaryEnergy(U.astype(np.float64))),
        ("unary wrong shape", lambda m: crf2d(m).setUnaryEnergy(np.zeros((3, 29), f32))),
        ("unary transposed", lambda m: crf2d(m).setUnaryEnergy(np.zeros((30, 3), f32))),
        ("unary 1-D", lambda m: crf2d(m).setUnaryEnergy(np.zeros(90, f32))),
        ("unary non-contiguous", lambda m: crf2d(m).setUnaryEnergy(np.zeros((30, 3), f32).T)),
        ("unary None", lambda m: crf2d(m).setUnaryEnergy(None)),
        ("features wrong count", lambda m: crf2d(m).addPairwiseEnergy(np.zeros((2, 29), f32), 3)),
        ("features float64", lambda m: crf2d(m).addPairwiseEnergy(feats.astype(np.float64), 3)),
        ("compat 3-D", lambda m: crf2d(m).addPairwiseEnergy(feats, np.zeros((3, 3, 3), f32))),
        ("compat float64 vector", lambda m: crf2d(m).addPairwiseEnergy(feats, np.ones(3))),
        ("image float", lambda m: crf2d(m).addPairwiseBilateral(3, 3, img.astype(f32), 3)),
        ("image wrong size", lambda m: crf2d(m).addPairwiseBilateral(3, 3, np.zeros((5, 6, 3), np.uint8), 3)),
        ("image 4 channels", lambda m: crf2d(m).addPairwiseBilateral(3, 3, np.zeros((6, 5, 4), np.uint8), 3)),
        ("image 2-D", lambda m: crf2d(m).addPairwiseBilateral(3, 3, np.zeros((6, 5), np.uint8), 3)),
        ("iterations not an int", lambda m: crf2d(m).inference("3")),
        ("nvar not an int", lambda m: m.DenseCRF(2.5, 3)),  # pydensecrf truncates it to 2
    ]


PYDENSECRF_RAISES = len(bad_calls()) - 1


@pytest.mark.parametrize("case", range(len(bad_calls())))
def test_errors_name_the_argument(case):
    name, call = bad_calls()[case]
    with pytest.raises((ValueError, TypeError)) as info:
        call(dcrf)
    assert str(info.value).split(":")[0] in ("u", "features", "compat", "rgbim", "nvar", "niter"), (name, info.value)


@pytest.mark.parametrize("case", range(PYDENSECRF_RAISES))
def test_errors_of_the_same_kind_as_pydensecrf(case):
    real_dcrf, _ = real()
    name, call = bad_calls()[case]
    with pytest.raises((ValueError, TypeError)) as theirs:
        call(real_dcrf)
    with pytest.raises(theirs.type):
        call(dcrf)


def test_errors_where_pydensecrf_would_crash_or_overflow():
    f32 = np.float32
    crf = dcrf.DenseCRF(30, 3)
    with pytest.raises(ValueError, match="^features: .*int16"):
        crf.addPairwiseEnergy(np.linspace(0, 20000, 60, dtype=f32).reshape(2, 30), 3)  # keys beyond int16
    with pytest.raises(ValueError, match="^features: .*NaN"):
        crf.addPairwiseEnergy(np.full((2, 30), np.nan, f32), 3)
    with pytest.raises(ValueError, match="^features: 1 to 16"):
        crf.addPairwiseEnergy(np.zeros((17, 30), f32), 3)
    with pytest.raises(ValueError, match="^u: .*NaN"):
        crf.setUnaryEnergy(np.full((3, 30), np.inf, f32))
    with pytest.raises(ValueError, match="^compat: expected shape"):
        crf.addPairwiseEnergy(np.zeros((2, 30), f32), np.ones(4, f32))  # a diagonal of the wrong length
    with pytest.raises(ValueError, match="^compat: expected shape"):
        crf.addPairwiseEnergy(np.zeros((2, 30), f32), np.ones((3, 2), f32))
    with pytest.raises(ValueError, match="^u: "):
        crf.setUnary(dcrf.ConstUnary(np.zeros((3, 29), f32)))  # pydensecrf: no check, then a crash
    with pytest.raises(ValueError, match="^normalization: "):
        crf.addPairwiseEnergy(np.zeros((2, 30), f32), 3, normalization=7)
    with pytest.raises(ValueError, match="^sxy: "):
        dcrf.DenseCRF2D(5, 6, 3).addPairwiseGaussian(sxy=0, compat=3)
    with pytest.raises(ValueError, match="^nlabels: .* GiB"):
        dcrf.DenseCRF(2 ** 31 - 1, 2 ** 31 - 1)  # refused before anything is allocated
    Q, t1, t2 = crf.startInference()
    with pytest.raises(ValueError, match="^Q: "):
        crf.stepInference(np.zeros((3, 29), f32), t1, t2)
    with pytest.raises(TypeError, match="^Q: "):
        crf.klDivergence([[0.5]])


# ---------------------------------------------------------------------------------------------------
# utils

def test_utils_by_hand():
    p = np.array([[0.0, 0.25], [1.0, 0.75]], np.float32)
    np.testing.assert_allclose(utils.unary_from_softmax(p), -np.log(np.clip(p, 1e-5, 1)), rtol=1e-6)
    assert utils.unary_from_softmax(p).dtype == np.float32
    U = utils.unary_from_labels(np.array([[0, 1], [2, 1]]), 2, 0.7)
    np.testing.assert_allclose(U[:, 0], [np.log(2), np.log(2)], rtol=1e-6)  # 0: unsure, uniform
    np.testing.assert_allclose(U[:, 1], [-np.log(0.7), -np.log(0.3)], rtol=1e-6)  # label 1 is row 0
    np.testing.assert_allclose(U[:, 2], [-np.log(0.3), -np.log(0.7)], rtol=1e-6)
    g = utils.create_pairwise_gaussian((2, 4), (3, 5))
    assert g.shape == (2, 15)
    np.testing.assert_allclose(g[:, 7], [1 / 2, 2 / 4])  # (row 1, column 2)
    img = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2)
    b = utils.create_pairwise_bilateral((1, 2), (4, 8), img, chdim=2)
    assert b.shape == (4, 6)
    np.testing.assert_allclose(b[:, 4], [1, 1 / 2, img[1, 1, 0] / 4, img[1, 1, 1] / 8])


def test_utils_equal_pydensecrf():
    _, real_utils = real()
    rng = np.random.default_rng(7)
    sm = rng.dirichlet(np.ones(5), size=(6, 7)).transpose(2, 0, 1).astype(np.float32)
    sm[0, 0, 0] = 0
    with np.errstate(divide="ignore"):  # clip=None: -log(0) = inf, in both
        for kw in ({}, {"scale": 0.8}, {"clip": None}, {"scale": 0.5, "clip": 1e-3}):
            np.testing.assert_array_equal(utils.unary_from_softmax(sm, **kw), real_utils.unary_from_softmax(sm, **kw))
    np.testing.assert_array_equal(utils.softmax_to_unary(sm, 0.9), real_utils.softmax_to_unary(sm, 0.9))
    labels = rng.integers(0, 4, (6, 7))
    for zero_unsure in (True, False):
        np.testing.assert_array_equal(utils.unary_from_labels(labels, 4, 0.6, zero_unsure),
                                      real_utils.unary_from_labels(labels, 4, 0.6, zero_unsure))
    np.testing.assert_array_equal(utils.compute_unary(labels, 4), real_utils.compute_unary(labels, 4))
    np.testing.assert_array_equal(utils.create_pairwise_gaussian((3, 2, 5), (4, 5, 6)),
                                  real_utils.create_pairwise_gaussian((3, 2, 5), (4, 5, 6)))
    img = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    cases = (((3, 4, 5), 2, img), (7, 2, img), (7, -1, img[..., 0]), ((2, 3, 4), 0, img.transpose(2, 0, 1)))
    for schan, chdim, im in cases:
        np.testing.assert_array_equal(utils.create_pairwise_bilateral((2, 3), schan, im, chdim),
                                      real_utils.create_pairwise_bilateral((2, 3), schan, im, chdim))


# ---------------------------------------------------------------------------------------------------
# Against pydensecrf2

def both(fn):
    """fn(module) for pydensecrf2 and for ours."""
    real_dcrf, _ = real()
    return fn(real_dcrf), fn(dcrf)


def assert_same(a, b, atol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and b.dtype == np.float32
    assert np.abs(a - b).max() <= atol
    assert (a.argmax(0) == b.argmax(0)).all()


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("normalization", list(dcrf.NormalizationType))
def test_general_crf_matches_pydensecrf(d, normalization):
    """Three pairwise terms (Potts, diagonal, matrix compatibilities; CONST, DIAG and FULL kernels) on
    random features of dimension d, N a multiple of 4 or not."""
    rng = np.random.default_rng(d * 10 + int(normalization))
    N, L = (1000, 6) if d % 2 else (1003, 6)
    f = (rng.random((d, N)) * 4).astype(np.float32)
    U = rng.standard_normal((L, N)).astype(np.float32) * 2
    terms = [(f, 3.0, dcrf.CONST_KERNEL), ((f[::-1] * 0.6).astype(np.float32), rng.random(L).astype(np.float32),
                                          dcrf.DIAG_KERNEL),
             (np.ascontiguousarray(f[: max(1, d // 2)] * 1.5), rng.standard_normal((L, L)).astype(np.float32),
              dcrf.FULL_KERNEL)]

    def run(m):
        crf = m.DenseCRF(N, L)
        crf.setUnaryEnergy(U)
        for feats, compat, kernel in terms:
            crf.addPairwiseEnergy(np.ascontiguousarray(feats), compat, kernel=int(kernel),
                                  normalization=int(normalization))
        return crf.inference(5)

    assert_same(*both(run))


def test_step_inference_and_kl_match_pydensecrf():
    rng = np.random.default_rng(11)
    N, L = 777, 5
    U = rng.standard_normal((L, N)).astype(np.float32)
    f = (rng.random((4, N)) * 3).astype(np.float32)

    def run(m):
        crf = m.DenseCRF(N, L)
        crf.setUnaryEnergy(U)
        crf.addPairwiseEnergy(f, 4.0)
        crf.addPairwiseEnergy(np.ascontiguousarray(f[:2]), rng_matrix, normalization=m.NORMALIZE_AFTER)
        Q, t1, t2 = crf.startInference()
        out = [np.array(Q).copy(), crf.klDivergence(Q)]
        for _ in range(3):
            crf.stepInference(Q, t1, t2)  # pydensecrf's wrappers of tmp1/tmp2 keep their shape (0, 0)
            out += [np.array(Q).copy(), crf.klDivergence(Q)]
        return out

    rng_matrix = rng.standard_normal((L, L)).astype(np.float32)
    theirs, mine = both(run)
    for a, b in zip(theirs, mine):
        if isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-2)
        else:
            assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


def photographs():
    data = pytest.importorskip("skimage.data", reason="scikit-image (optional) provides the sample photographs")
    return {"astronaut": data.astronaut()[::3, ::3], "coffee": data.coffee()[::3, ::3],
            "chelsea": data.chelsea()[:161, :203]}  # 161 x 203: N % 4 != 0


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("L", [3, 7])
def test_dense_crf_2d_matches_pydensecrf_on_photographs(name, L):
    """The default configuration (fast kernel, or the general path for chelsea's odd size) and variants
    that take the general path: anisotropic scales, another normalisation, a diagonal compatibility, a
    bilateral term first, a third term."""
    img = np.ascontiguousarray(photographs()[name])
    H, W, _ = img.shape
    rng = np.random.default_rng(L)
    coarse = rng.standard_normal((L, H // 8 + 2, W // 8 + 2)).astype(np.float32) * 3
    logits = coarse[:, (np.arange(H) // 8), :][:, :, (np.arange(W) // 8)]
    probs = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    U = utils.unary_from_softmax(probs.astype(np.float32))
    variants = [
        lambda c, m: (c.addPairwiseGaussian(sxy=3, compat=3), c.addPairwiseBilateral(80, 13, img, 10)),
        lambda c, m: (c.addPairwiseGaussian(sxy=(3, 2), compat=3),
                      c.addPairwiseBilateral((60, 80), (13, 10, 20), img, 5, normalization=m.NORMALIZE_BEFORE)),
        lambda c, m: (c.addPairwiseBilateral(50, 20, img, np.full(L, -4, np.float32)),
                      c.addPairwiseGaussian(1, 3, kernel=m.CONST_KERNEL),
                      # unnormalised (K 1 ~ 10 here): larger messages amplify exp's last-bit differences
                      c.addPairwiseGaussian(1, 0.3, normalization=m.NO_NORMALIZATION)),
    ]
    for variant in variants:
        def run(m):
            crf = m.DenseCRF2D(W, H, L)
            crf.setUnaryEnergy(U)
            variant(crf, m)
            return crf.inference(10)

        assert_same(*both(run))


def test_dense_crf_2d_beyond_the_fast_kernels_keys_matches_pydensecrf():
    """srgb so small that the optimised kernel's packed keys would need more than 62 bits, but the keys
    stay within pydensecrf's int16: the general path runs it (hashed keys) with pydensecrf's results."""
    rng = np.random.default_rng(13)
    img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    U = rng.standard_normal((3, 24 * 32)).astype(np.float32)
    for srgb in (0.3, 0.1, 0.05):
        def run(m):
            crf = m.DenseCRF2D(32, 24, 3)
            crf.setUnaryEnergy(U)
            crf.addPairwiseGaussian(1, 3)
            crf.addPairwiseBilateral(1, srgb, img, 4)
            return crf.inference(3)

        assert_same(*both(run))


def test_logistic_unary_matches_pydensecrf():
    """LogisticUnary(L, f): the unary L @ f; setUnaryEnergy(u, f) as pydensecrf (u (nlabels, nvar), f
    (nvar, nvar))."""
    rng = np.random.default_rng(14)
    N, L, k = 60, 3, 5
    Lm, f = rng.standard_normal((L, k)).astype(np.float32), rng.standard_normal((k, N)).astype(np.float32)
    u, g = rng.standard_normal((L, N)).astype(np.float32), (rng.standard_normal((N, N)) * 0.2).astype(np.float32)
    feats = (rng.random((2, N)) * 3).astype(np.float32)

    def run(m, logistic):
        crf = m.DenseCRF(N, L)
        if logistic:
            crf.setUnary(m.LogisticUnary(Lm, f))
        else:
            crf.setUnaryEnergy(u, g)
        crf.addPairwiseEnergy(feats, 2.0)
        return crf.inference(3)

    for logistic in (True, False):
        assert_same(*both(lambda m: run(m, logistic)))


def test_const_unary_and_no_unary_match_pydensecrf():
    rng = np.random.default_rng(12)
    img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    U = rng.standard_normal((4, 480)).astype(np.float32)

    def run(m, unary):
        crf = m.DenseCRF2D(24, 20, 4)
        if unary:
            crf.setUnary(m.ConstUnary(U))
        crf.addPairwiseBilateral(5, 20, img, 3)
        return crf.inference(4)

    for unary in (True, False):
        assert_same(*both(lambda m: run(m, unary)))


# ---------------------------------------------------------------------------------------------------
# install() and the official runner

def test_install_and_uninstall():
    before = {n: sys.modules.get(n) for n in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils")}
    ours.install()
    try:
        import pydensecrf.densecrf as d
        from pydensecrf import utils as u

        assert d is dcrf and u is utils and ours.installed()
    finally:
        ours.uninstall()
    assert {n: sys.modules.get(n) for n in before} == before and not ours.installed()


CALLER = '''
"""A typical caller, written the way the official crf.py and others call pydensecrf."""
import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax


def dense_crf(image, probs):
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    q = d.inference(10)
    return np.array(q).reshape((c, h, w))
'''

SCRIPT = '''
import sys
import numpy as np
{prelude}
import caller

rng = np.random.default_rng(0)
image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
probs = rng.dirichlet(np.ones(4), size=(24, 32)).transpose(2, 0, 1).astype(np.float32)
np.save(sys.argv[1], caller.dense_crf(image, probs))
'''


def run_caller(tmp_path, prelude, runner):
    """Runs SCRIPT (importing CALLER) in a subprocess whose `import pydensecrf` fails (a broken package
    first on the path); returns (result, stderr)."""
    broken = tmp_path / "broken" / "pydensecrf"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this pydensecrf build is broken')\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "caller.py").write_text(CALLER)
    (work / "script.py").write_text(SCRIPT.format(prelude=prelude))
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "broken"), env["PYTHONPATH"]])
    out = tmp_path / "q.npy"
    proc = subprocess.run([sys.executable, *runner, "script.py", str(out)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.load(out), proc.stderr


def expected_caller_result():
    namespace = {}
    ours.install()
    try:
        exec(compile(CALLER, "caller", "exec"), namespace)
        exec(compile(SCRIPT.format(prelude="").replace("import caller", "").replace(
            "np.save(sys.argv[1], caller.dense_crf(image, probs))", "result = dense_crf(image, probs)"), "s", "exec"),
             namespace)
    finally:
        ours.uninstall()
    return namespace["result"]


def test_caller_runs_through_install_where_pydensecrf_is_broken(tmp_path):
    q, _ = run_caller(tmp_path, "import primaps_fast.pydensecrf\nprimaps_fast.pydensecrf.install()", [])
    assert q.shape == (4, 24, 32)
    np.testing.assert_array_equal(q, expected_caller_result())


def test_official_runner_stands_in_for_a_broken_pydensecrf(tmp_path):
    q, err = run_caller(tmp_path, "", ["-m", "primaps_fast.official"])
    assert "primaps_fast.pydensecrf stands in" in err
    np.testing.assert_array_equal(q, expected_caller_result())
