// The rules of the PriMaPs proposal loop, shared by the C++ (principal_masks.cpp) and CUDA
// (cuda/principal_masks.cu) kernels: the loop condition, the degenerate-covariance test, the anchor and
// threshold rules, the eigen solvers' convergence test, the Chebyshev degree (CUDA's solver), the small
// Jacobi eigen-solver of the Rayleigh-Ritz steps and the start vectors. primaps_fast/reference/principal_masks.py
// states the same rules in PyTorch; the Triton backend (primaps_fast/triton/principal_masks.py) restates
// them in Python.
//
// principal_masks.cpp includes this header after `#pragma GCC optimize("fp-contract=off")`, so every
// ISA clone of its callers rounds these functions alike.
#pragma once

#include <math.h>
#include <stdint.h>

#include "host_device.h"

namespace primaps {
namespace pm {

constexpr int kBlockVectors = 8;           // Ritz block of the eigen solvers
constexpr int kMaxRitz = 16;               // largest Rayleigh-Ritz problem (jacobi_eigen)
constexpr double kEigTol = 1e-7;           // residual ||A u - theta u|| <= kEigTol * theta: converged
constexpr int kMaxEigIterations = 200;     // Chebyshev Rayleigh-Ritz steps before giving up (a safety net)
constexpr int kMaxDegree = 16;             // Chebyshev degree cap per Rayleigh-Ritz step
constexpr double kMaxAmplification = 1e12; // cap of T_d at the top Ritz value: the block keeps its rank
constexpr double kDegenerateRtol = 1e-10;  // DEGENERATE_RTOL of primaps_fast/common.py

// Deterministic pseudo-random numbers in [-1, 1) (an LCG): the eigen solvers' start vectors (and the
// replacement of a vector that collapses) must not depend on a seed.
struct Lcg {
  uint64_t state;
  PRIMAPS_HD double next() {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(state >> 11) * (2.0 / 9007199254740992.0) - 1.0;
  }
};
constexpr uint64_t kLcgSeed = 0x9E3779B97F4A7C15ULL;

// The loop goes on while the removed fraction, in float32 as the official loop, is below stop_fraction
// and fewer than max_masks proposals exist (max_masks <= 0: no cap).
PRIMAPS_HD bool keep_going(int64_t removed, int64_t N, float stop_fraction, int64_t k, int64_t max_masks) {
  if (max_masks > 0 && k >= max_masks) return false;
  return static_cast<float>(removed) / static_cast<float>(N) < stop_fraction;
}

// Covariance of the remaining features ~0 (identical features, one pixel, all zero): trace(cov) at most
// kDegenerateRtol times their mean squared norm (both float64). v is then their normalised mean.
PRIMAPS_HD bool degenerate_covariance(double trace, double mean_sq) { return trace <= kDegenerateRtol * mean_sq; }

// Anchor = the remaining pixel with the largest |cos(v, f_p)|, the first (row-major) on ties: true when
// pixel p with |cos| m comes before the current candidate (best, a); (0, -1) is "none yet", so a pixel
// with cos 0 never anchors.
PRIMAPS_HD bool anchor_before(float m, int64_t p, float best, int64_t a) {
  return m > best || (m == best && m > 0.0f && p < a);
}

// Proposal value of a remaining pixel with cosine sim to the anchor, mx = max of sim over the remaining
// pixels (> 0): sim / mx where sim >= threshold * mx, else 0. The pixel joins the proposal iff > 0.
PRIMAPS_HD float proposal_value(float sim, float threshold, float mx) {
  return sim >= threshold * mx ? sim / mx : 0.0f;
}

PRIMAPS_HD bool eig_converged(double residual, double theta) { return residual <= kEigTol * fabs(theta); }

// Degree d of the Chebyshev filter T_d(2 A / low - I) applied to the Ritz block after a Rayleigh-Ritz
// step with top Ritz value theta, lowest Ritz value low and top residual `residual`. The filter is
// bounded by 1 on [0, low] (A is PSD) and is T_d(x0), x0 = 2 theta / low - 1, at theta: d is the degree
// that shrinks the residual to the tolerance if it is contamination from below low, capped so that the
// block keeps its rank. 0 means a plain power step (A V), used when the block's spectrum is already
// well separated (low <= 1e-3 theta) or flat (low ~ theta), where the filter has nothing to gain.
PRIMAPS_HD int chebyshev_degree(double residual, double theta, double low) {
  if (!(low > 1e-3 * theta) || !(theta > low * (1.0 + 1e-9))) return 0;
  const double x0 = 2.0 * theta / low - 1.0;
  const double rate = acosh(x0);  // log of the growth of T_d(x0) per degree
  const double want = residual / (kEigTol * theta);
  double d = ceil(acosh(want > 1.0 ? want : 1.0) / rate);
  const double cap = floor(acosh(kMaxAmplification) / rate);
  if (d > cap) d = cap;
  if (d > kMaxDegree) d = kMaxDegree;
  return d < 1.0 ? 1 : static_cast<int>(d);
}

// Cyclic Jacobi eigen-decomposition of the symmetric b x b matrix H (destroyed), b <= kMaxRitz.
// Eigenvalues in descending order into lam, eigenvectors as the columns of Q (row-major b x b).
PRIMAPS_HD void jacobi_eigen(int b, double* H, double* lam, double* Q) {
  double Qw[kMaxRitz * kMaxRitz];
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
        // Rotation of columns p, q that zeroes a_pq: t = tan(phi) is the smaller root of
        // t^2 + 2 theta t - 1 = 0, theta = (a_qq - a_pp) / (2 a_pq) (no trigonometric calls).
        const double theta = (H[q * b + q] - H[p * b + p]) / (2.0 * apq);
        const double t = (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
        const double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
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
  int order[kMaxRitz];
  for (int i = 0; i < b; ++i) order[i] = i;
  for (int i = 1; i < b; ++i)  // stable insertion sort, descending eigenvalue
    for (int j = i; j > 0 && H[order[j] * b + order[j]] > H[order[j - 1] * b + order[j - 1]]; --j) {
      const int t = order[j];
      order[j] = order[j - 1];
      order[j - 1] = t;
    }
  for (int j = 0; j < b; ++j) {
    lam[j] = H[order[j] * b + order[j]];
    for (int i = 0; i < b; ++i) Q[i * b + j] = Qw[i * b + order[j]];
  }
}

}  // namespace pm
}  // namespace primaps
