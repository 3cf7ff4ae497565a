// PriMaPs mask proposals on the GPU (the loop of csrc/principal_masks.cpp): the whole batch in one launch,
// one thread block per image running that image's whole proposal loop, so the host never waits inside
// the loop (no synchronisation per proposal round at all) and no Python runs per image or per round.
//
// The launcher (primaps_fast/cuda/principal_masks.py) scales each image by its power of two, and hands
// over the normalised features fn, the features y minus the image mean, that mean, and the first scatter
// S = y y^T (a batched float64 GEMM by torch/cuBLAS) with the channel sums of y. Per proposal round the
// block then
//   * finds v, the top eigenvector of cov = S / n - m m^T (m = sums / n), by Chebyshev-filtered block
//     subspace iteration (8 vectors, Rayleigh-Ritz with jacobi_eigen, warm-started from the previous
//     round's Ritz vectors) until the C++ backend's test ||A u - theta u|| <= 1e-7 theta holds; or, for a
//     degenerate covariance, the normalised mean (principal_masks.h);
//   * makes one fused pass for the cosines to v and the anchor (first maximum of |cos|), one for the
//     cosines to the anchor and their maximum, and one for the threshold, the proposal (owner, value) and
//     the update of the remaining set, which also lists the removed pixels in pixel order (a block scan);
//   * subtracts the removed pixels' outer products from S and their features from the sums, or recomputes
//     both from the remaining pixels when fewer remain (the C++ rule).
// Every reduction runs in a fixed order (no atomics), so the results do not change between runs.
#include "../principal_masks.h"
#include "common.cuh"

namespace {

using namespace primaps;
using namespace primaps::pm;
using primaps::gpu::Ptr;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / gpu::kWarp;
constexpr int kMaxDots = kBlockVectors;  // dot products per block reduction
constexpr int64_t kChunk = 512;           // pixels per float32 partial sum of the downdate (as the C++ SYRK)

// Doubles and floats of per-image workspace (the launcher allocates B times these).
__host__ __device__ inline int64_t work_doubles(int64_t C) { return 6 * kBlockVectors * C + 2 * C; }
__host__ __device__ inline int64_t work_floats(int64_t C, int64_t N) { return 2 * C + N + N * C; }

struct Args {
  const float* fn;       // (B, C, N) normalised features
  const float* y;        // (B, C, N) features minus the image mean
  const double* x_mean;  // (B, C) image mean
  double* S;             // (B, C, C) scatter of y over the remaining pixels (the launcher's first one)
  double* sums;          // (B, C) channel sums of y over the remaining pixels
  double* work;          // (B, work_doubles(C))
  float* fwork;          // (B, work_floats(C, N))
  int32_t* idx;          // (B, N) pixels of a downdate
  uint8_t* remaining;    // (B, N), 1 on entry
  int64_t* owner;        // (B, N), -1 on entry
  float* value;          // (B, N), 0 on entry
  int64_t* counts;       // (B,)
  int64_t C, N;
  float threshold, stop_fraction;
  int64_t max_masks;     // <= 0: no cap
};

// Shared memory of a block: reduction scratch and results, the Rayleigh-Ritz problem, the anchor search.
struct Shared {
  double part[kWarps][kMaxDots];
  double out[kMaxDots];
  double H[kBlockVectors * kBlockVectors], Q[kBlockVectors * kBlockVectors], lam[kBlockVectors];
  float best[kWarps];
  int64_t arg[kWarps];
  int count[kWarps];
};

// Sums over the block of the per-thread values vals[l], l < count (<= kMaxDots), in a fixed order (warp
// shuffles, then the warps in order); every thread gets them in sh.out. Ends with a barrier.
__device__ void block_sums(double* vals, int count, Shared& sh) {
  const int lane = threadIdx.x % gpu::kWarp, warp = threadIdx.x / gpu::kWarp;
#pragma unroll
  for (int l = 0; l < kMaxDots; ++l) {
    double v = vals[l];
    for (int offset = gpu::kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) sh.part[warp][l] = v;
  }
  __syncthreads();
  if (threadIdx.x < count) {
    double total = sh.part[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w) total += sh.part[w][threadIdx.x];
    sh.out[threadIdx.x] = total;
  }
  __syncthreads();
}

// sh.out[l] = sum_c X[l * stride + c] * y[c] for l < count (<= kMaxDots).
__device__ void block_dots(const double* X, int64_t stride, int count, const double* y, int64_t C, Shared& sh) {
  double acc[kMaxDots];
#pragma unroll
  for (int l = 0; l < kMaxDots; ++l) acc[l] = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const double yc = y[c];
#pragma unroll
    for (int l = 0; l < kMaxDots; ++l)
      if (l < count) acc[l] += X[l * stride + c] * yc;
  }
  block_sums(acc, count, sh);
}

// Y[l] = A X[l] for the b rows of X (b x C), A x = S x / n - mean (mean . x); S is symmetric, so thread i
// reads column i of S (row k, coalesced over i) for row i of the product.
__device__ void multiply(const double* S, const double* mean, double inv_n, int64_t C, int b, const double* X,
                         double* Y, Shared& sh) {
  block_dots(X, C, b, mean, C, sh);
  double mx[kBlockVectors];
#pragma unroll
  for (int l = 0; l < kBlockVectors; ++l) mx[l] = l < b ? sh.out[l] : 0.0;
  for (int64_t i = threadIdx.x; i < C; i += kThreads) {
    double acc[kBlockVectors];
#pragma unroll
    for (int l = 0; l < kBlockVectors; ++l) acc[l] = 0.0;
    for (int64_t k = 0; k < C; ++k) {
      const double s = S[k * C + i];
#pragma unroll
      for (int l = 0; l < kBlockVectors; ++l)
        if (l < b) acc[l] += s * X[l * C + k];
    }
#pragma unroll
    for (int l = 0; l < kBlockVectors; ++l)
      if (l < b) Y[l * C + i] = acc[l] * inv_n - mean[i] * mx[l];
  }
  __syncthreads();
}

// Orthonormalises the b rows of V (classical Gram-Schmidt, twice); a row that collapses is replaced by
// pseudo-random numbers from thread 0's rng (the C++ rule).
__device__ void orthonormalise(int b, int64_t C, double* V, Lcg& rng, Shared& sh) {
  for (int j = 0; j < b; ++j) {
    double* vj = V + j * C;
    for (int attempt = 0; attempt < 10; ++attempt) {
      block_dots(vj, 0, 1, vj, C, sh);
      const double before = sh.out[0];
      for (int pass = 0; pass < 2 && j > 0; ++pass) {
        block_dots(V, C, j, vj, C, sh);
        for (int64_t c = threadIdx.x; c < C; c += kThreads) {
          double x = vj[c];
          for (int i = 0; i < j; ++i) x -= sh.out[i] * V[i * C + c];
          vj[c] = x;
        }
        __syncthreads();
      }
      block_dots(vj, 0, 1, vj, C, sh);
      const double after = sh.out[0];
      if (after > 1e-20 * before && after > 0.0) {
        const double inv = 1.0 / sqrt(after);
        for (int64_t c = threadIdx.x; c < C; c += kThreads) vj[c] *= inv;
        __syncthreads();
        break;
      }
      if (threadIdx.x == 0)
        for (int64_t c = 0; c < C; ++c) vj[c] = rng.next();
      __syncthreads();
    }
  }
}

// Top eigenvector of cov by Chebyshev-filtered subspace iteration (the degree and the stopping test of
// principal_masks.h; the C++ kernel runs LOBPCG, one vector per product, which suits a CPU core better
// than a GPU block, and stops at the same test): from the warm block V (b x C), left holding the Ritz
// vectors; W, U, AU, Y1, Y2 are b x C scratch. Writes v.
__device__ void top_eigenvector(const double* S, const double* mean, double inv_n, int64_t C, int b, double* V,
                                double* W, double* U, double* AU, double* Y1, double* Y2, double* v, Lcg& rng,
                                Shared& sh) {
  orthonormalise(b, C, V, rng, sh);
  multiply(S, mean, inv_n, C, b, V, W, sh);
  for (int it = 0;; ++it) {
    for (int i = 0; i < b; ++i) {  // H = V^T W, row i
      block_dots(W, C, b, V + i * C, C, sh);
      if (threadIdx.x < b) sh.H[i * b + threadIdx.x] = sh.out[threadIdx.x];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      for (int i = 0; i < b; ++i)  // symmetrise (rounding)
        for (int j = i + 1; j < b; ++j)
          sh.H[i * b + j] = sh.H[j * b + i] = 0.5 * (sh.H[i * b + j] + sh.H[j * b + i]);
      jacobi_eigen(b, sh.H, sh.lam, sh.Q);
    }
    __syncthreads();
    // Ritz vectors U = Q^T V and A U = Q^T W, and the top residual.
    double r2 = 0.0;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      for (int j = 0; j < b; ++j) {
        double u = 0.0, au = 0.0;
        for (int i = 0; i < b; ++i) {
          u += sh.Q[i * b + j] * V[i * C + c];
          au += sh.Q[i * b + j] * W[i * C + c];
        }
        U[j * C + c] = u;
        AU[j * C + c] = au;
      }
      const double r = AU[c] - sh.lam[0] * U[c];
      r2 += r * r;
    }
    double sums[kMaxDots] = {r2};
    block_sums(sums, 1, sh);
    const double res = sqrt(sh.out[0]), theta = sh.lam[0], low = sh.lam[b - 1];
    if (eig_converged(res, theta) || it + 1 >= kMaxEigIterations) {
      for (int64_t c = threadIdx.x; c < C; c += kThreads) {
        for (int j = 0; j < b; ++j) V[j * C + c] = U[j * C + c];
        v[c] = U[c];
      }
      __syncthreads();
      return;
    }
    const int d = chebyshev_degree(res, theta, low);
    if (d == 0) {  // plain power step
      for (int64_t c = threadIdx.x; c < C; c += kThreads)
        for (int j = 0; j < b; ++j) V[j * C + c] = AU[j * C + c];
    } else {
      // Y_0 = U, Y_1 = s AU - U, Y_{j+1} = 2 (s A Y_j - Y_j) - Y_{j-1} with s = 2 / theta_low.
      const double s = 2.0 / low;
      double *y0 = U, *y1 = Y1, *y2 = Y2;
      for (int64_t c = threadIdx.x; c < C; c += kThreads)
        for (int j = 0; j < b; ++j) y1[j * C + c] = s * AU[j * C + c] - U[j * C + c];
      __syncthreads();
      for (int step = 2; step <= d; ++step) {
        multiply(S, mean, inv_n, C, b, y1, W, sh);
        for (int64_t c = threadIdx.x; c < C; c += kThreads)
          for (int j = 0; j < b; ++j) y2[j * C + c] = 2.0 * (s * W[j * C + c] - y1[j * C + c]) - y0[j * C + c];
        __syncthreads();
        double* t = y0;
        y0 = y1, y1 = y2, y2 = t;
      }
      for (int64_t c = threadIdx.x; c < C; c += kThreads)
        for (int j = 0; j < b; ++j) V[j * C + c] = y1[j * C + c];
    }
    __syncthreads();
    orthonormalise(b, C, V, rng, sh);
    multiply(S, mean, inv_n, C, b, V, W, sh);
  }
}

// Block reductions for the pixel passes; every thread gets the result. The anchor: the largest m, the
// smallest pixel index on ties (anchor_before), a = -1 when no pixel has m > 0.
__device__ void block_anchor(float& best, int64_t& a, Shared& sh) {
  for (int offset = gpu::kWarp / 2; offset > 0; offset /= 2) {
    const float ob = __shfl_down_sync(0xffffffffu, best, offset);
    const long long oa = __shfl_down_sync(0xffffffffu, static_cast<long long>(a), offset);
    if (anchor_before(ob, oa, best, a)) best = ob, a = oa;
  }
  const int lane = threadIdx.x % gpu::kWarp, warp = threadIdx.x / gpu::kWarp;
  if (lane == 0) sh.best[warp] = best, sh.arg[warp] = a;
  __syncthreads();
  best = sh.best[0], a = sh.arg[0];
  for (int w = 1; w < kWarps; ++w)
    if (anchor_before(sh.best[w], sh.arg[w], best, a)) best = sh.best[w], a = sh.arg[w];
  __syncthreads();
}

__device__ float block_max(float m, Shared& sh) {
  for (int offset = gpu::kWarp / 2; offset > 0; offset /= 2) m = fmaxf(m, __shfl_down_sync(0xffffffffu, m, offset));
  const int lane = threadIdx.x % gpu::kWarp, warp = threadIdx.x / gpu::kWarp;
  if (lane == 0) sh.best[warp] = m;
  __syncthreads();
  m = sh.best[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, sh.best[w]);
  __syncthreads();
  return m;
}

// Writes, in pixel order, the pixels p < N with flag(p) to idx; returns their number (a block scan per
// chunk of kThreads pixels: warp ballots, then the warps' counts in order).
template <typename Flag>
__device__ int64_t compact(int64_t N, Flag flag, int32_t* idx, Shared& sh) {
  const int lane = threadIdx.x % gpu::kWarp, warp = threadIdx.x / gpu::kWarp;
  int64_t total = 0;
  for (int64_t base = 0; base < N; base += kThreads) {
    const int64_t p = base + threadIdx.x;
    const bool f = p < N && flag(p);
    const unsigned ballot = __ballot_sync(0xffffffffu, f);
    if (lane == 0) sh.count[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, chunk = 0;
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? sh.count[w] : 0;
      chunk += sh.count[w];
    }
    if (f) idx[total + offset + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(p);
    total += chunk;
    __syncthreads();  // sh.count is rewritten by the next chunk
  }
  return total;
}

__global__ void __launch_bounds__(kThreads) proposals_kernel(Args a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x, C = a.C, N = a.N;
  const float* fn = a.fn + b * C * N;
  const float* y = a.y + b * C * N;
  const double* mu = a.x_mean + b * C;
  double* S = a.S + b * C * C;
  double* sums = a.sums + b * C;
  double* V = a.work + b * work_doubles(C);
  double *W = V + kBlockVectors * C, *U = W + kBlockVectors * C, *AU = U + kBlockVectors * C;
  double *Y1 = AU + kBlockVectors * C, *Y2 = Y1 + kBlockVectors * C, *mean = Y2 + kBlockVectors * C;
  double* vd = mean + C;
  float* v = a.fwork + b * work_floats(C, N);
  float *anchor = v + C, *sim = anchor + C, *G = sim + N;  // G: up to N rows of C features
  int32_t* idx = a.idx + b * N;
  uint8_t* rem = a.remaining + b * N;
  int64_t* owner = a.owner + b * N;
  float* value = a.value + b * N;
  const int bv = static_cast<int>(C < kBlockVectors ? C : kBlockVectors);

  Lcg rng{kLcgSeed};  // advanced by thread 0 only
  if (threadIdx.x == 0)
    for (int64_t i = 0; i < bv * C; ++i) V[i] = rng.next();
  __syncthreads();

  int64_t k = 0, n_rem = N;
  while (keep_going(N - n_rem, N, a.stop_fraction, k, a.max_masks)) {
    // Covariance of the remaining pixels and the degenerate test: trace, and sum of (mean + mu)^2.
    const double inv_n = 1.0 / static_cast<double>(n_rem);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      mean[c] = sums[c] * inv_n;
      vd[c] = S[c * C + c] * inv_n - mean[c] * mean[c];  // diagonal of cov
    }
    __syncthreads();
    double ones_part = 0.0, sq_part = 0.0;  // trace of cov, sum of (mean + mu)^2
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      ones_part += vd[c];
      const double m = mean[c] + mu[c];
      sq_part += m * m;
    }
    double parts[kMaxDots] = {ones_part, sq_part};
    block_sums(parts, 2, sh);
    const double trace = sh.out[0], nn = sh.out[1];
    __syncthreads();  // sh.out is reused below
    if (degenerate_covariance(trace, trace + nn)) {
      const double inv = 1.0 / fmax(sqrt(nn), 1e-12);
      for (int64_t c = threadIdx.x; c < C; c += kThreads) v[c] = static_cast<float>((mean[c] + mu[c]) * inv);
    } else {
      top_eigenvector(S, mean, inv_n, C, bv, V, W, U, AU, Y1, Y2, vd, rng, sh);
      for (int64_t c = threadIdx.x; c < C; c += kThreads) v[c] = static_cast<float>(vd[c]);
    }
    __syncthreads();

    // Cosine to v and the anchor (the sign fix of docs/design.md).
    float best = 0.0f;
    int64_t at = -1;
    for (int64_t p = threadIdx.x; p < N; p += kThreads) {
      if (!rem[p]) continue;
      float s = 0.0f;
      for (int64_t c = 0; c < C; ++c) s += v[c] * fn[c * N + p];
      if (anchor_before(fabsf(s), p, best, at)) best = fabsf(s), at = p;
    }
    block_anchor(best, at, sh);
    if (at < 0) break;  // v orthogonal to every remaining feature
    for (int64_t c = threadIdx.x; c < C; c += kThreads) anchor[c] = fn[c * N + at];
    __syncthreads();
    float mx = 0.0f;  // max over the remaining pixels (0 outside, as the official sim[~mask] = 0)
    for (int64_t p = threadIdx.x; p < N; p += kThreads) {
      if (!rem[p]) continue;
      float s = 0.0f;
      for (int64_t c = 0; c < C; ++c) s += anchor[c] * fn[c * N + p];
      sim[p] = s;
      mx = fmaxf(mx, s);
    }
    mx = block_max(mx, sh);
    if (!(mx > 0.0f)) break;  // anchor of (sub)denormal norm
    // The proposal, the remaining set and, in pixel order, the removed pixels.
    const float threshold = a.threshold;
    const int64_t kk = k;
    const int64_t removed = compact(
        N,
        [&](int64_t p) {
          if (!rem[p]) return false;
          const float val = proposal_value(sim[p], threshold, mx);
          if (!(val > 0.0f)) return false;
          owner[p] = kk;
          value[p] = val;
          rem[p] = 0;
          return true;
        },
        idx, sh);
    ++k;
    n_rem -= removed;
    if (n_rem == 0 || !keep_going(N - n_rem, N, a.stop_fraction, k, a.max_masks)) break;

    // S and the sums: subtract the removed pixels, or recompute from the remaining ones when fewer remain.
    const bool downdate = removed <= n_rem;
    const int64_t rows = downdate ? removed : compact(N, [&](int64_t p) { return rem[p] != 0; }, idx, sh);
    for (int64_t e = threadIdx.x; e < rows * C; e += kThreads) {
      const int64_t q = e / C, c = e % C;
      G[e] = y[c * N + idx[q]];
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      double s = 0.0;
      for (int64_t q = 0; q < rows; ++q) s += static_cast<double>(G[q * C + c]);
      sums[c] = downdate ? sums[c] - s : s;
    }
    for (int64_t e = threadIdx.x; e < C * C; e += kThreads) {
      const int64_t i = e / C, j = e % C;
      double acc = 0.0;
      for (int64_t q0 = 0; q0 < rows; q0 += kChunk) {
        const int64_t q1 = q0 + kChunk < rows ? q0 + kChunk : rows;
        float part = 0.0f;
        for (int64_t q = q0; q < q1; ++q) part = fmaf(G[q * C + i], G[q * C + j], part);
        acc += static_cast<double>(part);
      }
      S[e] = downdate ? S[e] - acc : acc;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) a.counts[b] = k;
}

// Every pointer: device memory of `device`, contiguous, shapes as in Args; the launcher initialises S, sums,
// remaining (1), owner (-1) and value (0).
void principal_masks(Ptr fn, Ptr y, Ptr x_mean, Ptr S, Ptr sums, Ptr work, Ptr fwork, Ptr idx, Ptr remaining,
                     Ptr owner, Ptr value, Ptr counts, int64_t B, int64_t C, int64_t N, double threshold,
                     double stop_fraction, int64_t max_masks, int device, Ptr stream) {
  const char* what = "principal_masks";
  gpu::require(B >= 0 && B <= 0x7fffffff, "features: expected 0 <= B < 2^31 images");
  gpu::require(C >= 1 && N >= 1, "features: empty channel or spatial size");
  gpu::require(N <= 0x7fffffff, "features: more than 2^31 - 1 pixels per image");
  gpu::require(threshold > 0.0 && threshold <= 1.0, "threshold: not in (0, 1]");
  gpu::require(stop_fraction > 0.0 && stop_fraction <= 1.0, "stop_fraction: not in (0, 1]");
  cudaStream_t s = gpu::prepare(device, stream, what);
  Args args{gpu::ptr<const float>(fn), gpu::ptr<const float>(y), gpu::ptr<const double>(x_mean),
            gpu::ptr<double>(S), gpu::ptr<double>(sums), gpu::ptr<double>(work), gpu::ptr<float>(fwork),
            gpu::ptr<int32_t>(idx), gpu::ptr<uint8_t>(remaining), gpu::ptr<int64_t>(owner),
            gpu::ptr<float>(value), gpu::ptr<int64_t>(counts), C, N, static_cast<float>(threshold),
            static_cast<float>(stop_fraction), max_masks};
  gpu::launch(what, proposals_kernel, dim3(static_cast<unsigned>(B)), dim3(kThreads), 0, s, args);
}

static Registrar reg([](py::module_& m) {
  m.def("principal_masks", &principal_masks, py::arg("fn"), py::arg("y"), py::arg("x_mean"), py::arg("S"),
        py::arg("sums"), py::arg("work"), py::arg("fwork"), py::arg("idx"), py::arg("remaining"), py::arg("owner"),
        py::arg("value"), py::arg("counts"), py::arg("B"), py::arg("C"), py::arg("N"), py::arg("threshold"),
        py::arg("stop_fraction"), py::arg("max_masks"), py::arg("device"), py::arg("stream"),
        "PriMaPs proposals of B images (one block each): owner (B, N) int64, value (B, N) float32, counts (B,).");
  m.def(
      "principal_masks_workspace",
      [](int64_t C, int64_t N) { return py::make_tuple(work_doubles(C), work_floats(C, N)); }, py::arg("C"),
      py::arg("N"), "Per-image workspace of principal_masks: (doubles, floats).");
});

}  // namespace
