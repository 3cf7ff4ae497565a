// PriMaPs mask proposals (official PriMaPs._get_pseudo loop, before the median filter), whole batch in
// one call, one image per thread, GIL released.
//
// Per image (features X: C x N, channel-major, N = h * w pixels):
//   * Y = X - mean_image(X) (float32). Covariance is shift invariant; the shift removes the large common
//     component of SSL features, so S = Y^T Y loses no digits to cancellation when it is downdated.
//   * S (float64, C x C) and the channel sums of Y over the remaining pixels come from one SYRK; when a
//     proposal removes k pixels we subtract their SYRK, or, when fewer pixels remain than were removed,
//     recompute S from the remaining ones (cost min(k, n - k) * C^2 / 2 per proposal).
//   * v = top eigenvector of cov = S / n - m m^T by block subspace iteration (8 vectors, Rayleigh-Ritz,
//     warm-started from the previous proposal) until the residual ||A u - theta u|| <= 1e-7 theta.
//   * The fused pass: normalised features (computed once), cosine to v, anchor = first remaining pixel
//     with the largest |cos| (the sign fix of docs/design.md), cosine to the anchor, threshold,
//     proposal, update of the remaining set.
// Degenerate cases are defined as in primaps_fast/reference/principal_masks.py: trace(cov) <= 1e-10 E||x||^2
// -> v = normalised mean; v orthogonal to all remaining features -> stop; no empty proposal is emitted.
//
// Output: proposals are disjoint, so the stack is returned as owner (B, h, w) int64 (proposal index or
// -1) and value (B, h, w) float32; stack_proposals then writes (B, M, h, w) once M = max(counts) is known.
//
// Cost per image at C = 384, N = 1600 (synthetic scenes, ~4 proposals): SYRK 119 M FMAs, downdates
// ~70 M FMAs (float32, ~75 GFMA/s on one AVX-512 core), block products ~30 M float64 FMAs.
#if defined(__x86_64__) || defined(_M_X64)
#define PRIMAPS_X86 1
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>

#include "common.h"

// No FMA contraction in this file's plain loops: a vectorised loop body and its scalar tail must round
// alike, or identical features at different pixels would get different cosines (and ties would break
// by position). The explicit FMA intrinsics are unaffected.
#pragma GCC optimize("fp-contract=off")

namespace {

constexpr int kBlockVectors = 8;           // subspace size of the eigen solver
constexpr int kMaxEigIterations = 300;     // cap for flat spectra (the reference is not converged there)
constexpr double kEigTol = 1e-7;           // residual tolerance, relative to the top eigenvalue
constexpr double kDegenerateRtol = 1e-10;  // DEGENERATE_RTOL of primaps_fast/common.py
constexpr int64_t kChunk = 512;            // pixels per float32 partial sums (32 per AVX-512 lane) before float64
constexpr float kMaxAbs = 1e15f;            // larger features overflow float32 sums of squares
constexpr int64_t kPad = 16;               // pixel padding of packed buffers (one AVX-512 vector)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The float64 eigen solver and the per-pixel passes are plain loops that GCC vectorises; compile them
// for AVX-512, AVX2 and baseline x86-64 and pick at load time (no -march=native). No -ffast-math and
// no contraction: every clone rounds these loops alike.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PRIMAPS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PRIMAPS_CLONES
#endif

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

// Deterministic pseudo-random numbers in [-1, 1) (an LCG): start vectors must not depend on a seed.
struct Lcg {
  uint64_t state;
  double next() {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(state >> 11) * (2.0 / 9007199254740992.0) - 1.0;
  }
};

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

// Cyclic Jacobi eigen-decomposition of the symmetric b x b matrix H (destroyed). Eigenvalues sorted in
// descending order into lam, eigenvectors as columns of Q (row-major b x b).
void jacobi_eigen(int b, double* H, double* lam, double* Q) {
  double Qw[kBlockVectors * kBlockVectors];
  for (int i = 0; i < b; ++i)
    for (int j = 0; j < b; ++j) Qw[i * b + j] = (i == j) ? 1.0 : 0.0;
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int i = 0; i < b; ++i) {
      diag += H[i * b + i] * H[i * b + i];
      for (int j = i + 1; j < b; ++j) off += H[i * b + j] * H[i * b + j];
    }
    if (off <= 1e-30 * diag || off == 0.0) break;
    for (int p = 0; p < b; ++p) {
      for (int q = p + 1; q < b; ++q) {
        const double apq = H[p * b + q];
        if (apq == 0.0) continue;
        // Rotation of columns p, q by phi with tan(2 phi) = 2 a_pq / (a_qq - a_pp) zeroes a_pq.
        const double phi = 0.5 * std::atan2(2.0 * apq, H[q * b + q] - H[p * b + p]);
        const double c = std::cos(phi), s = std::sin(phi);
        for (int k = 0; k < b; ++k) {
          const double kp = H[k * b + p], kq = H[k * b + q];
          H[k * b + p] = c * kp - s * kq;
          H[k * b + q] = s * kp + c * kq;
        }
        for (int k = 0; k < b; ++k) {
          const double pk = H[p * b + k], qk = H[q * b + k];
          H[p * b + k] = c * pk - s * qk;
          H[q * b + k] = s * pk + c * qk;
        }
        H[p * b + q] = H[q * b + p] = 0.0;
        for (int k = 0; k < b; ++k) {
          const double kp = Qw[k * b + p], kq = Qw[k * b + q];
          Qw[k * b + p] = c * kp - s * kq;
          Qw[k * b + q] = s * kp + c * kq;
        }
      }
    }
  }
  int order[kBlockVectors];
  for (int i = 0; i < b; ++i) order[i] = i;
  for (int i = 1; i < b; ++i)  // stable insertion sort, descending eigenvalue
    for (int j = i; j > 0 && H[order[j] * b + order[j]] > H[order[j - 1] * b + order[j - 1]]; --j)
      std::swap(order[j], order[j - 1]);
  for (int j = 0; j < b; ++j) {
    lam[j] = H[order[j] * b + order[j]];
    for (int i = 0; i < b; ++i) Q[i * b + j] = Qw[i * b + order[j]];
  }
}

// Orthonormalises the b rows (length C) of V in place (modified Gram-Schmidt, twice); a row that
// collapses (rank-deficient matrix) is replaced by a fresh pseudo-random vector.
PRIMAPS_CLONES void orthonormalise(int b, int64_t C, double* V, Lcg& rng) {
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

// W = A V for a block of exactly 8 vectors stored transposed: Vt, Wt are C x 8 (one 8-double row per
// channel, i.e. one AVX-512 register). Four rows of A at a time: per k one load of Vt[k], four
// broadcasts of A[i..i+3][k] and four FMAs; A is read once per product.
#ifdef PRIMAPS_X86
__attribute__((target("avx512f"))) void multiply8_avx512(int64_t C, const double* A, const double* Vt,
                                                         double* Wt) {
  int64_t i = 0;
  for (; i + 4 <= C; i += 4) {
    const double *a0 = A + i * C, *a1 = a0 + C, *a2 = a1 + C, *a3 = a2 + C;
    __m512d c0 = _mm512_setzero_pd(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t k = 0; k < C; ++k) {
      const __m512d vk = _mm512_loadu_pd(Vt + k * 8);
      c0 = _mm512_fmadd_pd(_mm512_set1_pd(a0[k]), vk, c0);
      c1 = _mm512_fmadd_pd(_mm512_set1_pd(a1[k]), vk, c1);
      c2 = _mm512_fmadd_pd(_mm512_set1_pd(a2[k]), vk, c2);
      c3 = _mm512_fmadd_pd(_mm512_set1_pd(a3[k]), vk, c3);
    }
    _mm512_storeu_pd(Wt + (i + 0) * 8, c0);
    _mm512_storeu_pd(Wt + (i + 1) * 8, c1);
    _mm512_storeu_pd(Wt + (i + 2) * 8, c2);
    _mm512_storeu_pd(Wt + (i + 3) * 8, c3);
  }
  for (; i < C; ++i) {
    __m512d c0 = _mm512_setzero_pd();
    for (int64_t k = 0; k < C; ++k)
      c0 = _mm512_fmadd_pd(_mm512_set1_pd(A[i * C + k]), _mm512_loadu_pd(Vt + k * 8), c0);
    _mm512_storeu_pd(Wt + i * 8, c0);
  }
}

__attribute__((target("avx2,fma"))) void multiply8_avx2(int64_t C, const double* A, const double* Vt,
                                                        double* Wt) {
  for (int64_t i = 0; i < C; i += 2) {
    const int64_t rows = std::min<int64_t>(2, C - i);
    const double* a0 = A + i * C;
    const double* a1 = A + (i + rows - 1) * C;  // == a0 for a last odd row (result discarded)
    __m256d c00 = _mm256_setzero_pd(), c01 = c00, c10 = c00, c11 = c00;
    for (int64_t k = 0; k < C; ++k) {
      const __m256d lo = _mm256_loadu_pd(Vt + k * 8), hi = _mm256_loadu_pd(Vt + k * 8 + 4);
      const __m256d x0 = _mm256_set1_pd(a0[k]), x1 = _mm256_set1_pd(a1[k]);
      c00 = _mm256_fmadd_pd(x0, lo, c00);
      c01 = _mm256_fmadd_pd(x0, hi, c01);
      c10 = _mm256_fmadd_pd(x1, lo, c10);
      c11 = _mm256_fmadd_pd(x1, hi, c11);
    }
    _mm256_storeu_pd(Wt + i * 8, c00);
    _mm256_storeu_pd(Wt + i * 8 + 4, c01);
    if (rows == 2) {
      _mm256_storeu_pd(Wt + (i + 1) * 8, c10);
      _mm256_storeu_pd(Wt + (i + 1) * 8 + 4, c11);
    }
  }
}

#endif  // PRIMAPS_X86

void multiply8_scalar(int64_t C, const double* A, const double* Vt, double* Wt) {
  for (int64_t i = 0; i < C; ++i) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = 0; k < C; ++k)
      for (int l = 0; l < 8; ++l) acc[l] = std::fma(A[i * C + k], Vt[k * 8 + l], acc[l]);
    for (int l = 0; l < 8; ++l) Wt[i * 8 + l] = acc[l];
  }
}

using Multiply8Fn = void (*)(int64_t, const double*, const double*, double*);

// Kernel selection: the best the CPU supports, or (tests) a lower ISA chosen with set_isa.
#ifdef PRIMAPS_X86
bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

std::string best_isa() {
  __builtin_cpu_init();
  return has_avx512() ? "avx512" : (has_avx2() ? "avx2" : "scalar");
}
#else
std::string best_isa() { return "scalar"; }
#endif

std::string current_isa = best_isa();
SyrkFn syrk = nullptr;
Multiply8Fn multiply8 = nullptr;

std::string set_isa(const std::string& isa) {
  const std::string want = isa == "auto" ? best_isa() : isa;
  if (want == "scalar") {
    syrk = syrk_scalar, multiply8 = multiply8_scalar;
#ifdef PRIMAPS_X86
  } else if (want == "avx512" && has_avx512()) {
    syrk = syrk_avx512, multiply8 = multiply8_avx512;
  } else if (want == "avx2" && has_avx2()) {
    syrk = syrk_avx2, multiply8 = multiply8_avx2;
#endif
  } else {
    throw std::invalid_argument("isa: expected 'auto', 'scalar' or one this CPU supports "
                                "(best: " + best_isa() + "), got '" + isa + "'");
  }
  current_isa = want;
  return current_isa;
}

const std::string initial_isa = set_isa("auto");

// The SYRK of a whole image on `threads` threads (threads > 1 only when the batch has fewer images
// than threads): row blocks split so every part has about the same share of the triangle.
void syrk_rows(const float* Y, int64_t ld, int64_t Cp, int64_t len, double* S, double sign, int threads) {
  if (threads <= 1 || len * Cp * Cp < (int64_t{1} << 22)) {  // small updates: not worth a thread
    syrk(Y, ld, Cp, len, S, sign, 0, Cp);
    return;
  }
  std::vector<int64_t> bounds{0};
  for (int t = 1; t < threads; ++t)  // rows up to r hold a share (r / Cp)^2 of the triangle
    bounds.push_back(std::min(Cp, round_up(static_cast<int64_t>(Cp * std::sqrt(double(t) / threads)), 4)));
  bounds.push_back(Cp);
  primaps::parallel_for(threads, threads, [&](int64_t t) {
    if (bounds[t] < bounds[t + 1]) syrk(Y, ld, Cp, len, S, sign, bounds[t], bounds[t + 1]);
  });
}

// W (b x C) = V (b x C) A (C x C symmetric, row-major, full); T is C x 8 scratch when b == 8.
PRIMAPS_CLONES void multiply_block(int b, int64_t C, const double* A, const double* V, double* W,
                                   double* T) {
  if (b == kBlockVectors) {
    double* Vt = T;
    double* Wt = T + C * kBlockVectors;
    for (int j = 0; j < b; ++j)
      for (int64_t c = 0; c < C; ++c) Vt[c * 8 + j] = V[j * C + c];
    multiply8(C, A, Vt, Wt);
    for (int j = 0; j < b; ++j)
      for (int64_t c = 0; c < C; ++c) W[j * C + c] = Wt[c * 8 + j];
    return;
  }
  std::fill(W, W + b * C, 0.0);  // small C (< 8 channels)
  for (int64_t k = 0; k < C; ++k) {
    const double* ak = A + k * C;
    for (int j = 0; j < b; ++j) {
      const double vjk = V[j * C + k];
      double* wj = W + j * C;
      for (int64_t c = 0; c < C; ++c) wj[c] += vjk * ak[c];  // row k of A = column k (symmetric)
    }
  }
}

// Top eigenvector of the symmetric PSD matrix A (C x C) by block subspace iteration with
// Rayleigh-Ritz, warm-started from the rows of V (b x C, orthonormal or arbitrary). Writes v (C).
PRIMAPS_CLONES void top_eigenvector(int64_t C, const double* A, int b, std::vector<double>& V, Lcg& rng,
                     std::vector<double>& W, double* v) {
  double H[kBlockVectors * kBlockVectors], Q[kBlockVectors * kBlockVectors], lam[kBlockVectors];
  std::vector<double> U(static_cast<size_t>(b) * C), T(2 * kBlockVectors * C);
  orthonormalise(b, C, V.data(), rng);
  for (int it = 0;; ++it) {
    multiply_block(b, C, A, V.data(), W.data(), T.data());
    for (int i = 0; i < b; ++i)
      for (int j = 0; j < b; ++j) {
        H[i * b + j] = dot(V.data() + i * C, W.data() + j * C, C);
      }
    for (int i = 0; i < b; ++i)  // symmetrise (rounding)
      for (int j = i + 1; j < b; ++j) H[i * b + j] = H[j * b + i] = 0.5 * (H[i * b + j] + H[j * b + i]);
    jacobi_eigen(b, H, lam, Q);
    // Ritz vectors U = Q^T V and A U = Q^T W; residual of the top pair.
    std::fill(U.begin(), U.end(), 0.0);
    std::fill(v, v + C, 0.0);
    for (int j = 0; j < b; ++j) {
      double* uj = U.data() + j * C;
      for (int i = 0; i < b; ++i) {
        const double q = Q[i * b + j];
        const double* wi = W.data() + i * C;
        for (int64_t c = 0; c < C; ++c) uj[c] += q * wi[c];  // next subspace: A times Ritz vectors
      }
    }
    for (int i = 0; i < b; ++i) {
      const double q = Q[i * b];
      const double* vi = V.data() + i * C;
      for (int64_t c = 0; c < C; ++c) v[c] += q * vi[c];
    }
    double res = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double r = U[c] - lam[0] * v[c];
      res += r * r;
    }
    if (std::sqrt(res) <= kEigTol * std::abs(lam[0]) || it + 1 >= kMaxEigIterations) {
      // keep the Ritz vectors as the warm start of the next proposal
      for (int j = 0; j < b; ++j)
        for (int64_t c = 0; c < C; ++c) {
          double u = 0.0;
          for (int i = 0; i < b; ++i) u += Q[i * b + j] * V[i * C + c];
          U[j * C + c] = u;
        }
      V.swap(U);
      return;
    }
    V.swap(U);
    orthonormalise(b, C, V.data(), rng);
  }
}

// ---------------------------------------------------------------------------------------------------

struct Params {
  float threshold;
  float stop_fraction;
  int64_t max_masks;  // <= 0: no cap
};

PRIMAPS_CLONES void proposals_one_image(const float* X, int64_t C, int64_t N, const Params& prm, int64_t* owner,
                         float* value, int64_t* count, int inner_threads) {
  const int64_t Cp = round_up(C, 4);
  const int64_t Np = round_up(N, kPad);
  // Image mean (float64) and shifted features Y (Cp x Np, zero padded).
  std::vector<double> mu(C);
  std::vector<float> Y(static_cast<size_t>(Cp * Np), 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = X + c * N;
    const double s = sum_floats(xc, N);
    // A float64 sum of float32 values cannot overflow: it is finite iff every value is finite.
    if (!std::isfinite(s)) throw std::invalid_argument("features: contains NaN or Inf");
    float big = 0.0f;
    for (int64_t p = 0; p < N; ++p) big = std::max(big, std::abs(xc[p]));
    if (big > kMaxAbs)
      throw std::invalid_argument("features: |value| above 1e15 (float32 sums of squares would overflow)");
    mu[c] = s / static_cast<double>(N);
    float* yc = Y.data() + c * Np;
    for (int64_t p = 0; p < N; ++p) yc[p] = static_cast<float>(static_cast<double>(xc[p]) - mu[c]);
  }
  // Normalised features (F.normalize: x / max(||x||, 1e-12)), computed once.
  std::vector<double> nrm2(N, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = X + c * N;
    for (int64_t p = 0; p < N; ++p) nrm2[p] += static_cast<double>(xc[p]) * xc[p];
  }
  std::vector<float> norm(N);
  for (int64_t p = 0; p < N; ++p) norm[p] = static_cast<float>(std::max(std::sqrt(nrm2[p]), 1e-12));
  std::vector<float> fn(static_cast<size_t>(C * N));
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = X + c * N;
    float* fc = fn.data() + c * N;
    for (int64_t p = 0; p < N; ++p) fc[p] = xc[p] / norm[p];
  }

  // S and channel sums over all pixels.
  std::vector<double> S(static_cast<size_t>(Cp * Cp), 0.0);
  syrk_rows(Y.data(), Np, Cp, Np, S.data(), 1.0, inner_threads);
  std::vector<double> sum(C, 0.0);
  for (int64_t c = 0; c < C; ++c) sum[c] = sum_floats(Y.data() + c * Np, N);

  std::vector<uint8_t> remaining(N, 1);
  int64_t n_rem = N;
  std::vector<double> A(static_cast<size_t>(C * C)), mean(C), vd(C);
  std::vector<float> v(C), cos(N), sim(N), anchor(C), G;
  std::vector<int64_t> idx;
  const int b = static_cast<int>(std::min<int64_t>(kBlockVectors, C));
  std::vector<double> V(static_cast<size_t>(b) * C), W(static_cast<size_t>(b) * C);
  Lcg rng{0x9E3779B97F4A7C15ULL};
  for (auto& x : V) x = rng.next();

  for (int64_t p = 0; p < N; ++p) owner[p] = -1, value[p] = 0.0f;
  int64_t k = 0;
  while (static_cast<float>(N - n_rem) / static_cast<float>(N) < prm.stop_fraction) {
    if (prm.max_masks > 0 && k >= prm.max_masks) break;
    // Covariance of the remaining pixels (shifted coordinates) and the degenerate test.
    const double inv_n = 1.0 / static_cast<double>(n_rem);
    double trace = 0.0, mean_sq = 0.0;
    for (int64_t c = 0; c < C; ++c) mean[c] = sum[c] * inv_n;
    for (int64_t i0 = 0; i0 < C; i0 += 16)  // 16 x 16 tiles: the mirrored writes stay in cache
      for (int64_t j0 = 0; j0 <= i0; j0 += 16)
        for (int64_t i = i0; i < std::min(C, i0 + 16); ++i)
          for (int64_t j = j0; j < std::min(i + 1, j0 + 16); ++j)
            A[i * C + j] = A[j * C + i] = S[i * Cp + j] * inv_n - mean[i] * mean[j];
    for (int64_t c = 0; c < C; ++c) {
      trace += A[c * C + c];
      const double m = mean[c] + mu[c];
      mean_sq += m * m;
    }
    mean_sq += trace;
    if (trace <= kDegenerateRtol * mean_sq) {
      double nn = 0.0;
      for (int64_t c = 0; c < C; ++c) nn += (mean[c] + mu[c]) * (mean[c] + mu[c]);
      const double inv = 1.0 / std::max(std::sqrt(nn), 1e-12);
      for (int64_t c = 0; c < C; ++c) v[c] = static_cast<float>((mean[c] + mu[c]) * inv);
    } else {
      top_eigenvector(C, A.data(), b, V, rng, W, vd.data());
      for (int64_t c = 0; c < C; ++c) v[c] = static_cast<float>(vd[c]);
    }
    // Cosine to v; anchor = first remaining pixel with the largest |cos| (sign fix).
    std::fill(cos.begin(), cos.end(), 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float vc = v[c];
      const float* fc = fn.data() + c * N;
      for (int64_t p = 0; p < N; ++p) cos[p] += vc * fc[p];
    }
    int64_t a = -1;
    float best = 0.0f;
    for (int64_t p = 0; p < N; ++p) {
      if (!remaining[p]) continue;
      const float m = std::abs(cos[p]);
      if (m > best) best = m, a = p;
    }
    if (a < 0) break;  // v orthogonal to every remaining feature (e.g. all of them zero)
    for (int64_t c = 0; c < C; ++c) anchor[c] = fn[c * N + a];
    std::fill(sim.begin(), sim.end(), 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float ac = anchor[c];
      const float* fc = fn.data() + c * N;
      for (int64_t p = 0; p < N; ++p) sim[p] += ac * fc[p];
    }
    float mx = 0.0f;  // max over all pixels, 0 outside remaining (as the official sim[~mask] = 0)
    for (int64_t p = 0; p < N; ++p) {
      if (!remaining[p]) sim[p] = 0.0f;
      mx = std::max(mx, sim[p]);
    }
    if (!(mx > 0.0f)) break;  // anchor of (sub)denormal norm: its self-similarity underflows
    const float cut = prm.threshold * mx;
    idx.clear();
    for (int64_t p = 0; p < N; ++p) {
      if (!remaining[p] || sim[p] < cut) continue;
      const float val = sim[p] / mx;
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
    if (n_rem == 0 || !(static_cast<float>(N - n_rem) / static_cast<float>(N) < prm.stop_fraction) ||
        (prm.max_masks > 0 && k >= prm.max_masks))
      break;
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
  const int inner = static_cast<int>(std::max<int64_t>(1, threads / std::max<int64_t>(B, 1)));
  primaps::parallel_for(B, threads, [&](int64_t i) {
    proposals_one_image(X + i * C * N, C, N, prm, own + i * N, val + i * N, cnt + i, inner);
  });
}

// masks (B, M, h, w) = the disjoint proposals (owner, value) stacked, zero elsewhere. Done here rather
// than with torch ops so no OpenMP pool wakes up (its spinning threads would slow the next kernel call).
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
  m.def("principal_masks_isa", &set_isa, py::arg("isa"),
        "Testing hook: selects the SYRK / block-product kernels ('auto', 'avx512', 'avx2', 'scalar') "
        "for principal_masks and returns the one in use. Not thread-safe: do not call during a run.");
  m.def("principal_masks", &principal_masks_cpu, py::arg("features"), py::arg("owner"),
        py::arg("value"), py::arg("counts"), py::arg("threshold"), py::arg("stop_fraction"),
        py::arg("max_masks"), py::arg("threads"),
        "PriMaPs proposals of a (B, C, h, w) float32 batch into owner (B, h, w) int64 (proposal index "
        "or -1), value (B, h, w) float32 and counts (B,) int64.");
});

}  // namespace
