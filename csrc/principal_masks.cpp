// PriMaPs mask proposals (official PriMaPs._get_pseudo loop, before the median filter), whole batch in
// one call, one image per thread, GIL released.
//
// Per image (features X: C x N, channel-major, N = h * w pixels):
//   * X times 2^-e, max |X| 2^-e in [0.5, 1) (exact): results do not depend on the scale of the features.
//   * Y = X - mean_image(X) (float32). Covariance is shift invariant; the shift removes the large common
//     component of SSL features, so S = Y^T Y loses no digits to cancellation when it is downdated.
//   * S (float64, C x C) and the channel sums of Y over the remaining pixels come from one SYRK; when a
//     proposal removes k pixels we subtract their SYRK, or, when fewer pixels remain than were removed,
//     recompute S from the remaining ones (cost min(k, n - k) * C^2 / 2 per proposal).
//   * v = top eigenvector of cov = S / n - m m^T (applied from the lower triangle of S, never formed) by
//     a locally optimal block method (LOBPCG: Rayleigh-Ritz on 8 Ritz vectors warm-started from the
//     previous proposal's, the top residual and the last step) until ||A u - theta u|| <= 1e-7 theta.
//   * The fused pass: normalised features (computed once), cosine to v, anchor = first remaining pixel
//     with the largest |cos| (the sign fix of docs/design.md), cosine to the anchor, threshold,
//     proposal, update of the remaining set.
// The rules (loop condition, degenerate test, anchor, threshold, convergence) are in principal_masks.h,
// shared with the CUDA kernel. Degenerate cases are defined as in primaps_fast/reference/principal_masks.py:
// trace(cov) <= 1e-10 E||x||^2 -> v = normalised mean; v orthogonal to all remaining features -> stop;
// no empty proposal is emitted.
//
// Output: proposals are disjoint, so the stack is returned as owner (B, h, w) int64 (proposal index or
// -1) and value (B, h, w) float32; stack_proposals then writes (B, M, h, w) once M = max(counts) is known.
//
// Cost per image at C = 384, N = 1600 (synthetic scenes, ~4 proposals): SYRK 119 M FMAs, downdates
// ~70 M FMAs (float32, ~75 GFMA/s on one AVX-512 core), eigen solver a few M float64 FMAs. Pure noise
// (one pixel per proposal, ~1500 proposals): ~8 + 30 products of one vector (C^2 = 0.15 M FMAs each)
// and as much again in Rayleigh-Ritz work per proposal.
#if defined(__x86_64__) || defined(_M_X64)
#define PRIMAPS_X86 1
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

// No FMA contraction in this file's plain loops: a vectorised loop body and its scalar tail must round
// alike, or identical features at different pixels would get different cosines (and ties would break
// by position). The explicit FMA intrinsics are unaffected.
#pragma GCC optimize("fp-contract=off")

#include "principal_masks.h"  // after the pragma: its rules round alike in every clone

namespace {

using namespace primaps::pm;

constexpr int kMaxSteps = 5000;  // eigen-solver steps before giving up (a safety net)

constexpr int64_t kChunk = 512;  // pixels per float32 partial sums (32 per AVX-512 lane) before float64
constexpr int64_t kPad = 16;     // pixel padding of packed buffers (one AVX-512 vector)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The float64 eigen solver and the per-pixel passes are plain loops that GCC vectorises: they are inlined
// into proposals_one_image, whose SIMD variants (common.h: AVX-512, AVX2, baseline x86-64, no
// -march=native) are chosen when called. No -ffast-math and no contraction: every variant rounds these
// loops alike.

// ---------------------------------------------------------------------------------------------------
// SYRK: S[i][j] += sign * sum_p Y[i][p] Y[j][p] for j <= i (lower triangle + diagonal blocks), Y packed
// as Cp x ld floats (Cp multiple of 4, ld multiple of 16, zero padded). Float32 FMAs over chunks of
// kChunk pixels, each 4x4 block of partial sums then added into float64.

#define PRIMAPS_SYRK_BODY(VEC, ZERO, LOAD, FMA, HSUM, WIDTH)                                   \
  for (int64_t p0 = 0; p0 < len; p0 += kChunk) {                                                 \
    const int64_t p1 = std::min<int64_t>(len, p0 + kChunk);                                      \
    for (int64_t ib = row0; ib < row1; ib += 4) {                                                 \
      const float* a0 = Y + (ib + 0) * ld;                                                        \
      const float* a1 = Y + (ib + 1) * ld;                                                        \
      const float* a2 = Y + (ib + 2) * ld;                                                        \
      const float* a3 = Y + (ib + 3) * ld;                                                        \
      for (int64_t jb = 0; jb <= ib; jb += 4) {                                                   \
        const float* b0 = Y + (jb + 0) * ld;                                                      \
        const float* b1 = Y + (jb + 1) * ld;                                                      \
        const float* b2 = Y + (jb + 2) * ld;                                                      \
        const float* b3 = Y + (jb + 3) * ld;                                                      \
        VEC c00 = ZERO, c01 = ZERO, c02 = ZERO, c03 = ZERO, c10 = ZERO, c11 = ZERO, c12 = ZERO,   \
            c13 = ZERO, c20 = ZERO, c21 = ZERO, c22 = ZERO, c23 = ZERO, c30 = ZERO, c31 = ZERO,   \
            c32 = ZERO, c33 = ZERO;                                                               \
        for (int64_t p = p0; p < p1; p += WIDTH) {                                                \
          VEC x0 = LOAD(a0 + p), x1 = LOAD(a1 + p), x2 = LOAD(a2 + p), x3 = LOAD(a3 + p);         \
          VEC y = LOAD(b0 + p);                                                                   \
          c00 = FMA(x0, y, c00); c10 = FMA(x1, y, c10); c20 = FMA(x2, y, c20); c30 = FMA(x3, y, c30); \
          y = LOAD(b1 + p);                                                                       \
          c01 = FMA(x0, y, c01); c11 = FMA(x1, y, c11); c21 = FMA(x2, y, c21); c31 = FMA(x3, y, c31); \
          y = LOAD(b2 + p);                                                                       \
          c02 = FMA(x0, y, c02); c12 = FMA(x1, y, c12); c22 = FMA(x2, y, c22); c32 = FMA(x3, y, c32); \
          y = LOAD(b3 + p);                                                                       \
          c03 = FMA(x0, y, c03); c13 = FMA(x1, y, c13); c23 = FMA(x2, y, c23); c33 = FMA(x3, y, c33); \
        }                                                                                         \
        double* s0 = S + (ib + 0) * Cp + jb;                                                      \
        double* s1 = S + (ib + 1) * Cp + jb;                                                      \
        double* s2 = S + (ib + 2) * Cp + jb;                                                      \
        double* s3 = S + (ib + 3) * Cp + jb;                                                      \
        s0[0] += sign * HSUM(c00); s0[1] += sign * HSUM(c01); s0[2] += sign * HSUM(c02); s0[3] += sign * HSUM(c03); \
        s1[0] += sign * HSUM(c10); s1[1] += sign * HSUM(c11); s1[2] += sign * HSUM(c12); s1[3] += sign * HSUM(c13); \
        s2[0] += sign * HSUM(c20); s2[1] += sign * HSUM(c21); s2[2] += sign * HSUM(c22); s2[3] += sign * HSUM(c23); \
        s3[0] += sign * HSUM(c30); s3[1] += sign * HSUM(c31); s3[2] += sign * HSUM(c32); s3[3] += sign * HSUM(c33); \
      }                                                                                           \
    }                                                                                             \
  }

#ifdef PRIMAPS_X86
__attribute__((target("avx2,fma"))) inline double hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return static_cast<double>(_mm_cvtss_f32(lo));
}

__attribute__((target("avx512f,avx2,fma"))) inline double hsum512(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum256(_mm256_add_ps(lo, hi));
}

__attribute__((target("avx512f,avx2,fma"))) void syrk_avx512(const float* Y, int64_t ld, int64_t Cp,
                                                              int64_t len, double* S, double sign,
                                                              int64_t row0, int64_t row1) {
  PRIMAPS_SYRK_BODY(__m512, _mm512_setzero_ps(), _mm512_loadu_ps, _mm512_fmadd_ps, hsum512, 16)
}

__attribute__((target("avx2,fma"))) void syrk_avx2(const float* Y, int64_t ld, int64_t Cp,
                                                    int64_t len, double* S, double sign, int64_t row0,
                                                    int64_t row1) {
  PRIMAPS_SYRK_BODY(__m256, _mm256_setzero_ps(), _mm256_loadu_ps, _mm256_fmadd_ps, hsum256, 8)
}

#endif  // PRIMAPS_X86

inline float scalar_fma(float a, float b, float c) { return std::fma(a, b, c); }
inline double scalar_hsum(float v) { return static_cast<double>(v); }
inline float scalar_load(const float* p) { return *p; }

void syrk_scalar(const float* Y, int64_t ld, int64_t Cp, int64_t len, double* S, double sign,
                 int64_t row0, int64_t row1) {
  PRIMAPS_SYRK_BODY(float, 0.0f, scalar_load, scalar_fma, scalar_hsum, 1)
}
#undef PRIMAPS_SYRK_BODY

// Rows [row0, row1) (multiples of 4) of S: disjoint row ranges can run on different threads.
using SyrkFn = void (*)(const float*, int64_t, int64_t, int64_t, double*, double, int64_t, int64_t);

// ---------------------------------------------------------------------------------------------------
// Small dense linear algebra in float64 for the eigen solver.

// Dot product with 8 independent partial sums (a fixed order, so every ISA clone rounds the same;
// the compiler vectorises the lanes).
inline double dot(const double* x, const double* y, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[c + l] * y[c + l];
  for (; c < n; ++c) acc[c & 7] += x[c] * y[c];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Sum of n floats in float64, 8 independent partial sums (vectorised, ISA-independent rounding).
inline double sum_floats(const float* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int l = 0; l < 8; ++l) acc[l] += static_cast<double>(x[c + l]);
  for (; c < n; ++c) acc[c & 7] += static_cast<double>(x[c]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Orthonormalises the b rows (length C) of V in place (modified Gram-Schmidt, twice); a row that
// collapses (rank-deficient matrix) is replaced by a fresh pseudo-random vector.
PRIMAPS_ALWAYS_INLINE void orthonormalise(int b, int64_t C, double* V, Lcg& rng) {
  for (int j = 0; j < b; ++j) {
    double* vj = V + j * C;
    for (int attempt = 0;; ++attempt) {
      const double before = dot(vj, vj, C);
      for (int pass = 0; pass < 2; ++pass) {
        for (int i = 0; i < j; ++i) {
          const double* vi = V + i * C;
          const double d = dot(vi, vj, C);
          for (int64_t c = 0; c < C; ++c) vj[c] -= d * vi[c];
        }
      }
      const double after = dot(vj, vj, C);
      if (after > 1e-20 * before && after > 0.0) {
        const double inv = 1.0 / std::sqrt(after);
        for (int64_t c = 0; c < C; ++c) vj[c] *= inv;
        break;
      }
      if (attempt > 8) throw std::runtime_error("principal_masks: eigen solver lost orthogonality");
      for (int64_t c = 0; c < C; ++c) vj[c] = rng.next();
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// y = S x for the symmetric S stored as the lower triangle of a Cp x Cp row-major array (the SYRK's):
// each stored S_ik (k < i) serves both y_i += S_ik x_k and y_k += S_ik x_i. The dot of row i runs in 8
// lanes (k mod 8). The AVX2 kernel and its scalar twin make the same FMAs in the same order, so every
// ISA gives the same bits.

#ifdef PRIMAPS_X86
__attribute__((target("avx2,fma"))) void symv_avx2(const double* S, int64_t Cp, int64_t C, const double* x,
                                                   double* y) {
  std::fill(y, y + C, 0.0);
  for (int64_t i = 0; i < C; ++i) {
    const double* row = S + i * Cp;
    const __m256d xi = _mm256_set1_pd(x[i]);
    __m256d a0 = _mm256_setzero_pd(), a1 = a0;
    int64_t k = 0;
    for (; k + 8 <= i; k += 8) {
      const __m256d r0 = _mm256_loadu_pd(row + k), r1 = _mm256_loadu_pd(row + k + 4);
      a0 = _mm256_fmadd_pd(r0, _mm256_loadu_pd(x + k), a0);
      a1 = _mm256_fmadd_pd(r1, _mm256_loadu_pd(x + k + 4), a1);
      _mm256_storeu_pd(y + k, _mm256_fmadd_pd(r0, xi, _mm256_loadu_pd(y + k)));
      _mm256_storeu_pd(y + k + 4, _mm256_fmadd_pd(r1, xi, _mm256_loadu_pd(y + k + 4)));
    }
    double acc[8];
    _mm256_storeu_pd(acc, a0);
    _mm256_storeu_pd(acc + 4, a1);
    for (; k < i; ++k) {
      acc[k & 7] = std::fma(row[k], x[k], acc[k & 7]);
      y[k] = std::fma(row[k], x[i], y[k]);
    }
    y[i] += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + row[i] * x[i];
  }
}
#endif  // PRIMAPS_X86

void symv_scalar(const double* S, int64_t Cp, int64_t C, const double* x, double* y) {
  std::fill(y, y + C, 0.0);
  for (int64_t i = 0; i < C; ++i) {
    const double* row = S + i * Cp;
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= i; k += 8)
      for (int l = 0; l < 8; ++l) {
        acc[l] = std::fma(row[k + l], x[k + l], acc[l]);
        y[k + l] = std::fma(row[k + l], x[i], y[k + l]);
      }
    for (; k < i; ++k) {
      acc[k & 7] = std::fma(row[k], x[k], acc[k & 7]);
      y[k] = std::fma(row[k], x[i], y[k]);
    }
    y[i] += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + row[i] * x[i];
  }
}

using SymvFn = void (*)(const double*, int64_t, int64_t, const double*, double*);

// The SYRK and symmetric-product kernels of the SIMD variant in use (common.h: isa_setting()).
SyrkFn syrk_kernel() {
#ifdef PRIMAPS_X86
  const int isa = primaps::isa_setting().load(std::memory_order_relaxed);
  if (isa == primaps::kIsaAvx512) return syrk_avx512;
  if (isa == primaps::kIsaAvx2) return syrk_avx2;
#endif
  return syrk_scalar;
}

SymvFn symv_kernel() {
#ifdef PRIMAPS_X86
  if (primaps::isa_setting().load(std::memory_order_relaxed) >= primaps::kIsaAvx2) return symv_avx2;
#endif
  return symv_scalar;
}

// The SYRK of a whole image on `threads` threads (threads > 1 only when the batch has fewer images
// than threads): row blocks split so every part has about the same share of the triangle.
void syrk_rows(const float* Y, int64_t ld, int64_t Cp, int64_t len, double* S, double sign, int threads) {
  if (threads <= 1 || len * Cp * Cp < (int64_t{1} << 22)) {  // small updates: not worth a thread
    syrk_kernel()(Y, ld, Cp, len, S, sign, 0, Cp);
    return;
  }
  std::vector<int64_t> bounds{0};
  for (int t = 1; t < threads; ++t)  // rows up to r hold a share (r / Cp)^2 of the triangle
    bounds.push_back(std::min(Cp, round_up(static_cast<int64_t>(Cp * std::sqrt(double(t) / threads)), 4)));
  bounds.push_back(Cp);
  primaps::parallel_for(threads, threads, [&](int64_t t) {
    if (bounds[t] < bounds[t + 1]) syrk_kernel()(Y, ld, Cp, len, S, sign, bounds[t], bounds[t + 1]);
  });
}

// ---------------------------------------------------------------------------------------------------
// The covariance of the remaining pixels as an operator, A x = S x / n - m (m . x): S is the float64
// scatter of the shifted features (its lower triangle, in the Cp x Cp array the SYRK writes), m their
// mean. A is never formed, and the 0.5 C^2 doubles of the triangle stay in the L2 cache while the
// eigen solver runs (a full A, 1.2 MB at C = 384, does not fit and made every product a trip to L3).
struct Covariance {
  const double* S;
  int64_t Cp, C;
  const double* mean;
  double inv_n;
};

// y = A x.
PRIMAPS_ALWAYS_INLINE void apply(const Covariance& A, const double* x, double* y) {
  const int64_t C = A.C;
  symv_kernel()(A.S, A.Cp, C, x, y);
  const double mx = dot(A.mean, x, C);
  for (int64_t c = 0; c < C; ++c) y[c] = y[c] * A.inv_n - A.mean[c] * mx;
}

// Buffers of the eigen solver, rows of length C: the basis Q and A Q (up to b + 2 rows; its first b
// rows, the Ritz vectors, are the warm start of the next proposal), the next basis Qn and A Qn, the
// search direction P and A P.
struct EigenWork {
  int b;
  std::vector<double> Q, AQ, Qn, AQn, P, AP;
  EigenWork(int b_, int64_t C)
      : b(b_), Q(static_cast<size_t>(b_ + 2) * C), AQ(Q.size()), Qn(Q.size()), AQn(Q.size()), P(C), AP(C) {}
};

// out_j = sum_i Z[i][j] in_i for j < cols (in: rows of length C, Z: m x m row-major).
PRIMAPS_ALWAYS_INLINE void combine(int m, int cols, int64_t C, const double* Z, const double* in, double* out) {
  std::fill(out, out + static_cast<size_t>(cols) * C, 0.0);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < m; ++i) {
      const double z = Z[i * m + j];
      const double* x = in + i * C;
      double* o = out + j * C;
      for (int64_t c = 0; c < C; ++c) o[c] += z * x[c];
    }
}

// x -= (x . q) q and ax -= (x . q) aq for the n rows q of Q (and aq of AQ), twice (the A-images follow
// the vector, so A x is never recomputed). Returns ||x|| after.
PRIMAPS_ALWAYS_INLINE double orthogonalise(int n, int64_t C, const double* Q, const double* AQ, double* x, double* ax) {
  for (int pass = 0; pass < 2; ++pass)
    for (int i = 0; i < n; ++i) {
      const double d = dot(Q + i * C, x, C);
      for (int64_t c = 0; c < C; ++c) x[c] -= d * Q[i * C + c];
      if (ax != nullptr)
        for (int64_t c = 0; c < C; ++c) ax[c] -= d * AQ[i * C + c];
    }
  return std::sqrt(dot(x, x, C));
}

// Top eigenvector v of the covariance A by a locally optimal block method (LOBPCG with a thick block):
// Rayleigh-Ritz on the basis [U, r, P], U the b top Ritz vectors (warm-started from the previous
// proposal's), r the residual of the top one and P its last step; converged when the top residual
// ||A u - theta u|| <= 1e-7 theta (principal_masks.h). One product with A per step (A r; the other
// images follow by linear combination), b at the start of a proposal. On noise features, where the top
// of the spectrum is flat (theta_1 / theta_8 ~ 1.06) and every proposal removes one pixel, this takes
// ~30 products of one vector per proposal where Chebyshev-filtered subspace iteration took ~28 products
// of 8 and plain subspace iteration did not converge in 300.
PRIMAPS_ALWAYS_INLINE void top_eigenvector(const Covariance& A, EigenWork& ws, Lcg& rng, double* v) {
  const int b = ws.b;
  const int64_t C = A.C;
  double H[kMaxRitz * kMaxRitz], Z[kMaxRitz * kMaxRitz], lam[kMaxRitz];
  double *P = ws.P.data(), *AP = ws.AP.data();
  orthonormalise(b, C, ws.Q.data(), rng);
  for (int j = 0; j < b; ++j) apply(A, ws.Q.data() + j * C, ws.AQ.data() + j * C);
  int m = b;
  for (int step = 0;; ++step) {
    double *Q = ws.Q.data(), *AQ = ws.AQ.data(), *Qn = ws.Qn.data(), *AQn = ws.AQn.data();
    // H = Q^T A Q. After the first step rows 0..b-1 of Q are the Ritz vectors of the last step, whose
    // block of H is diag(lam) (up to rounding): only the rows of the new directions are computed.
    const int fresh = step == 0 ? 0 : b;
    for (int i = 0; i < fresh; ++i)
      for (int j = 0; j < fresh; ++j) H[i * m + j] = i == j ? lam[i] : 0.0;
    for (int i = fresh; i < m; ++i)
      for (int j = 0; j <= i; ++j)
        H[i * m + j] = H[j * m + i] = 0.5 * (dot(Q + i * C, AQ + j * C, C) + dot(Q + j * C, AQ + i * C, C));
    jacobi_eigen(m, H, lam, Z);
    combine(m, b, C, Z, Q, Qn);  // the Ritz vectors open the next basis
    combine(m, b, C, Z, AQ, AQn);
    double* r = Qn + b * C;
    for (int64_t c = 0; c < C; ++c) r[c] = AQn[c] - lam[0] * Qn[c];
    const double res = std::sqrt(dot(r, r, C));
    if (eig_converged(res, lam[0]) || step + 1 >= kMaxSteps) {
      std::copy(Qn, Qn + C, v);
      ws.Q.swap(ws.Qn);
      ws.AQ.swap(ws.AQn);
      return;
    }
    // P: the top Ritz vector's part on the directions added last step (rows b.. of Q).
    const bool has_p = m > b;
    if (has_p) {
      std::fill(P, P + C, 0.0);
      std::fill(AP, AP + C, 0.0);
      for (int i = b; i < m; ++i) {
        const double z = Z[i * m];
        for (int64_t c = 0; c < C; ++c) P[c] += z * Q[i * C + c];
        for (int64_t c = 0; c < C; ++c) AP[c] += z * AQ[i * C + c];
      }
    }
    // Next basis: the Ritz vectors, r / |r| (orthogonal to them up to rounding), P orthogonalised.
    const double rn = orthogonalise(b, C, Qn, nullptr, r, nullptr);
    for (int64_t c = 0; c < C; ++c) r[c] /= rn;
    apply(A, r, AQn + b * C);
    m = b + 1;
    if (has_p) {
      const double before = std::sqrt(dot(P, P, C));
      const double after = orthogonalise(b + 1, C, Qn, AQn, P, AP);
      if (after > 1e-8 * before && after > 0.0) {
        for (int64_t c = 0; c < C; ++c) Qn[m * C + c] = P[c] / after, AQn[m * C + c] = AP[c] / after;
        ++m;
      }
    }
    ws.Q.swap(ws.Qn);
    ws.AQ.swap(ws.AQn);
  }
}

struct Params {
  float threshold;
  float stop_fraction;
  int64_t max_masks;  // <= 0: no cap
};

PRIMAPS_ALWAYS_INLINE void proposals_one_image_body(const float* X, int64_t C, int64_t N, const Params& prm,
                                        int64_t* owner, float* value, int64_t* count, int inner_threads) {
  const int64_t Cp = round_up(C, 4);
  const int64_t Np = round_up(N, kPad);
  // Finiteness and the largest |value|, then the image times 2^-e with max |x| 2^-e in [0.5, 1): exact
  // (a float64 product of a float32 and a power of two, rounded once back to float32), and the results
  // no longer depend on the scale of the features (no underflow of products for tiny features, no
  // overflow of float32 sums of squares for huge ones). The scaled image goes to fn, normalised below.
  float big = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < C * N; ++i) {
    const float a = std::abs(X[i]);
    finite &= a <= std::numeric_limits<float>::max();
    big = a > big ? a : big;
  }
  if (!finite) throw std::invalid_argument("features: contains NaN or Inf");
  int exponent = 0;
  if (big > 0.0f) std::frexp(big, &exponent);
  const double scale = std::ldexp(1.0, -exponent);
  std::vector<float> fn(static_cast<size_t>(C * N));
  for (int64_t i = 0; i < C * N; ++i) fn[i] = static_cast<float>(static_cast<double>(X[i]) * scale);
  // Image mean (float64) and shifted features Y (Cp x Np, zero padded).
  std::vector<double> mu(C);
  std::vector<float> Y(static_cast<size_t>(Cp * Np), 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = fn.data() + c * N;
    mu[c] = sum_floats(xc, N) / static_cast<double>(N);
    float* yc = Y.data() + c * Np;
    for (int64_t p = 0; p < N; ++p) yc[p] = static_cast<float>(static_cast<double>(xc[p]) - mu[c]);
  }
  // Normalised features (F.normalize: x / max(||x||, 1e-12)), computed once, in place.
  std::vector<double> nrm2(N, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = fn.data() + c * N;
    for (int64_t p = 0; p < N; ++p) nrm2[p] += static_cast<double>(xc[p]) * xc[p];
  }
  std::vector<float> norm(N);
  for (int64_t p = 0; p < N; ++p) norm[p] = static_cast<float>(std::max(std::sqrt(nrm2[p]), 1e-12));
  for (int64_t c = 0; c < C; ++c) {
    float* fc = fn.data() + c * N;
    for (int64_t p = 0; p < N; ++p) fc[p] /= norm[p];
  }

  // S and channel sums over all pixels.
  std::vector<double> S(static_cast<size_t>(Cp * Cp), 0.0);
  syrk_rows(Y.data(), Np, Cp, Np, S.data(), 1.0, inner_threads);
  std::vector<double> sum(C, 0.0);
  for (int64_t c = 0; c < C; ++c) sum[c] = sum_floats(Y.data() + c * Np, N);

  std::vector<uint8_t> remaining(N, 1);
  int64_t n_rem = N;
  std::vector<double> mean(C), vd(C);
  std::vector<float> v(C), cos(N), sim(N), anchor(C), G;
  std::vector<int64_t> idx;
  EigenWork ws(static_cast<int>(std::min<int64_t>(kBlockVectors, C)), C);
  Lcg rng{kLcgSeed};
  for (size_t i = 0; i < static_cast<size_t>(ws.b) * C; ++i) ws.Q[i] = rng.next();

  for (int64_t p = 0; p < N; ++p) owner[p] = -1, value[p] = 0.0f;
  int64_t k = 0;
  while (keep_going(N - n_rem, N, prm.stop_fraction, k, prm.max_masks)) {
    // Covariance of the remaining pixels (shifted coordinates) and the degenerate test.
    const double inv_n = 1.0 / static_cast<double>(n_rem);
    double trace = 0.0, mean_sq = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = sum[c] * inv_n;
      trace += S[c * Cp + c] * inv_n - mean[c] * mean[c];
      const double m = mean[c] + mu[c];
      mean_sq += m * m;
    }
    mean_sq += trace;
    if (degenerate_covariance(trace, mean_sq)) {
      double nn = 0.0;
      for (int64_t c = 0; c < C; ++c) nn += (mean[c] + mu[c]) * (mean[c] + mu[c]);
      const double inv = 1.0 / std::max(std::sqrt(nn), 1e-12);
      for (int64_t c = 0; c < C; ++c) v[c] = static_cast<float>((mean[c] + mu[c]) * inv);
    } else {
      top_eigenvector(Covariance{S.data(), Cp, C, mean.data(), inv_n}, ws, rng, vd.data());
      for (int64_t c = 0; c < C; ++c) v[c] = static_cast<float>(vd[c]);
    }
    // Cosine to v and the anchor (the sign fix of docs/design.md).
    std::fill(cos.begin(), cos.end(), 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float vc = v[c];
      const float* fc = fn.data() + c * N;
      for (int64_t p = 0; p < N; ++p) cos[p] += vc * fc[p];
    }
    int64_t a = -1;
    float best = 0.0f;
    for (int64_t p = 0; p < N; ++p)
      if (remaining[p] && anchor_before(std::abs(cos[p]), p, best, a)) best = std::abs(cos[p]), a = p;
    if (a < 0) break;  // v orthogonal to every remaining feature (e.g. all of them zero)
    for (int64_t c = 0; c < C; ++c) anchor[c] = fn[c * N + a];
    std::fill(sim.begin(), sim.end(), 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float ac = anchor[c];
      const float* fc = fn.data() + c * N;
      for (int64_t p = 0; p < N; ++p) sim[p] += ac * fc[p];
    }
    float mx = 0.0f;  // max over all pixels, 0 outside remaining (as the official sim[~mask] = 0)
    for (int64_t p = 0; p < N; ++p)
      if (remaining[p]) mx = std::max(mx, sim[p]);
    if (!(mx > 0.0f)) break;  // anchor of (sub)denormal norm: its self-similarity underflows
    idx.clear();
    for (int64_t p = 0; p < N; ++p) {
      if (!remaining[p]) continue;
      const float val = proposal_value(sim[p], prm.threshold, mx);
      if (!(val > 0.0f)) continue;
      owner[p] = k;
      value[p] = val;
      remaining[p] = 0;
      idx.push_back(p);
    }
    ++k;
    const int64_t removed = static_cast<int64_t>(idx.size());
    n_rem -= removed;
    // Update S and the sums unless the loop ends here.
    if (n_rem == 0 || !keep_going(N - n_rem, N, prm.stop_fraction, k, prm.max_masks)) break;
    const bool downdate = removed <= n_rem;
    if (!downdate) {
      idx.clear();
      for (int64_t p = 0; p < N; ++p)
        if (remaining[p]) idx.push_back(p);
    }
    const int64_t kk = static_cast<int64_t>(idx.size());
    const int64_t kp = round_up(kk, kPad);
    G.assign(static_cast<size_t>(Cp * kp), 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float* yc = Y.data() + c * Np;
      float* gc = G.data() + c * kp;
      for (int64_t j = 0; j < kk; ++j) gc[j] = yc[idx[j]];
      const double s = sum_floats(gc, kk);
      sum[c] = downdate ? sum[c] - s : s;
    }
    if (!downdate) std::fill(S.begin(), S.end(), 0.0);
    syrk_rows(G.data(), kp, Cp, kp, S.data(), downdate ? -1.0 : 1.0, inner_threads);
  }
  *count = k;
}
PRIMAPS_SIMD_FUNCTION(proposals_one_image, proposals_one_image_body)

void principal_masks_cpu(primaps::FloatArray features, primaps::Int64Array owner,
                         primaps::FloatArray value, primaps::Int64Array counts, double threshold,
                         double stop_fraction, int64_t max_masks, int threads) {
  primaps::check_ndim(features, 4, "features");
  primaps::check_ndim(owner, 3, "owner");
  primaps::check_ndim(value, 3, "value");
  primaps::check_ndim(counts, 1, "counts");
  const int64_t B = features.shape(0), C = features.shape(1), h = features.shape(2),
                w = features.shape(3);
  if (C < 1 || h < 1 || w < 1) throw std::invalid_argument("features: empty channel or spatial size");
  for (int d = 0; d < 3; ++d) {
    const int64_t want = d == 0 ? B : (d == 1 ? h : w);
    if (owner.shape(d) != want || value.shape(d) != want)
      throw std::invalid_argument("owner/value: expected shape (B, h, w) of features");
  }
  if (counts.shape(0) != B) throw std::invalid_argument("counts: expected shape (B,)");
  if (!(threshold > 0.0 && threshold <= 1.0)) throw std::invalid_argument("threshold: not in (0, 1]");
  if (!(stop_fraction > 0.0 && stop_fraction <= 1.0))
    throw std::invalid_argument("stop_fraction: not in (0, 1]");
  const float* X = features.data();
  int64_t* own = owner.mutable_data();
  float* val = value.mutable_data();
  int64_t* cnt = counts.mutable_data();
  const Params prm{static_cast<float>(threshold), static_cast<float>(stop_fraction), max_masks};
  const int64_t N = h * w;
  py::gil_scoped_release release;
  primaps::parallel_items(B, threads, [&](int64_t i, int inner) {
    proposals_one_image(X + i * C * N, C, N, prm, own + i * N, val + i * N, cnt + i, inner);
  });
}

// masks (B, M, h, w) = the disjoint proposals (owner, value) stacked, zero elsewhere.
void stack_proposals_cpu(primaps::Int64Array owner, primaps::FloatArray value, primaps::FloatArray masks) {
  primaps::check_ndim(owner, 3, "owner");
  primaps::check_ndim(value, 3, "value");
  primaps::check_ndim(masks, 4, "masks");
  const int64_t B = owner.shape(0), N = owner.shape(1) * owner.shape(2), M = masks.shape(1);
  if (masks.shape(0) != B || masks.shape(2) * masks.shape(3) != N || value.size() != B * N)
    throw std::invalid_argument("masks: expected shape (B, M, h, w) of owner (B, h, w)");
  const int64_t* own = owner.data();
  const float* val = value.data();
  float* out = masks.mutable_data();
  py::gil_scoped_release release;
  std::fill(out, out + B * M * N, 0.0f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < N; ++p) {
      const int64_t k = own[b * N + p];
      if (k >= M) throw std::invalid_argument("masks: fewer rows than proposals");
      if (k >= 0) out[(b * M + k) * N + p] = val[b * N + p];
    }
}

static primaps::Registrar registrar([](py::module_& m) {
  m.def("stack_proposals", &stack_proposals_cpu, py::arg("owner"), py::arg("value"), py::arg("masks"),
        "Scatter disjoint proposals owner/value (B, h, w) into masks (B, M, h, w).");
  m.def("principal_masks", &principal_masks_cpu, py::arg("features"), py::arg("owner"),
        py::arg("value"), py::arg("counts"), py::arg("threshold"), py::arg("stop_fraction"),
        py::arg("max_masks"), py::arg("threads"),
        "PriMaPs proposals of a (B, C, h, w) float32 batch into owner (B, h, w) int64 (proposal index "
        "or -1), value (B, h, w) float32 and counts (B,) int64.");
});

}  // namespace
