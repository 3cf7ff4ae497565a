// M-step loss of PriMaPs-EM: the official FocalLoss on bilinearly upsampled class scores, forward and
// backward fused with the upsampling, never storing the (B, K, H, W) upsampled scores.
//
// One pass (what focal_loss runs): focal_target_classes reads the target (the classes present in each
// image, the count of bad values); focal_moments computes every upsampled softmax once and gives the
// per-image softmax sums (for the class weights), the per-class sums of CE and the gradient's per-class
// moments at feature resolution; focal_combine weighs the moments into the gradient.
// Two passes (when the moments would be too large, and the softmax sums of class_stats):
// focal_confidence gives the softmax sums; focal_loss_grad the per-image sums of w_t * CE and, when
// requested, the gradient of sum_pixels w_t * CE w.r.t. the low-resolution logits (the caller scales by
// grad_output / N): dL/dup_k = w_t * (p_k - [k == t]) at non-ignored pixels, scattered back through the
// bilinear taps. focal_class_weights: the class weights from the sums (focal_weights.h, shared with CUDA).
// Threads run over images; every image accumulates into its own buffers in a fixed order, so the
// results are deterministic. Upsampling as PyTorch's, to float32 rounding (bilinear.h). The per-image
// passes are compiled for SSE2, AVX2 and AVX-512F, the best run (common.h, PRIMAPS_SIMD_FUNCTION): the
// same bits in every variant.
#include "common.h"

#include <cmath>
#include <cstring>

#include "bilinear.h"
#include "fast_exp.h"
#include "focal_weights.h"

namespace {

using namespace primaps;

// K rounded up to 8: the class axis of the moments and of the transposed probabilities (focal_loss.py
// allocates the moments with it).
inline int64_t padded_classes(int64_t K) { return (K + 7) / 8 * 8; }

// One output row y at a time, vectorised along the row: for the columns [x0, x0 + n) the upsampled
// scores u (K, n), their exponentials e = exp(u - max) (K, n), the row maxima mx (n) and z (n) = 1 / the
// partition sums (ProbSums::add turns e into the probabilities, in the loop that sums them). The upsampling
// and the maximum share one loop; the exp has a loop of its own, which every SIMD variant vectorises (fused
// with the clamp and the sum, the SSE2 and AVX2 variants ran it 1.6x-2.7x slower). The one-pass kernel
// runs it on chunks of kChunk columns (bounded buffers at any width).
struct RowSoftmax {
  std::vector<float> u, e, mx, z;
  // e has its rows padded to a multiple of 8 with zeros (transpose_probabilities reads them)
  RowSoftmax(int64_t K, int64_t n) : u(K * n), e(padded_classes(K) * n, 0.f), mx(n), z(n) {}

  PRIMAPS_ALWAYS_INLINE void compute(const std::vector<float>& xs, const Axis& ay, int64_t y, int64_t K, int64_t W,
                                     int64_t x0, int64_t n) {
    const float h0 = ay.l0[y], h1 = ay.l1[y];
    float* __restrict mxp = mx.data();
    float* __restrict zp = z.data();
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict a = xs.data() + (ay.i0[y] * K + k) * W + x0;
      const float* __restrict c = xs.data() + (ay.i1[y] * K + k) * W + x0;
      float* __restrict uk = u.data() + k * n;
      for (int64_t x = 0; x < n; ++x) {
        const float v = lerp(h0, a[x], h1, c[x]);
        uk[x] = v;
        mxp[x] = k == 0 || v > mxp[x] ? v : mxp[x];
      }
    }
    for (int64_t x = 0; x < n; ++x) zp[x] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict uk = u.data() + k * n;
      float* __restrict ek = e.data() + k * n;
      for (int64_t x = 0; x < n; ++x) {
        const float v = uk[x] - mxp[x];
        ek[x] = v > -87.0f ? v : -87.0f;  // exp(-87) ~ 1.6e-38: ~0 next to exp(0) = 1
      }
      for (int64_t x = 0; x < n; ++x) ek[x] = exp_nonpositive(ek[x]);
      for (int64_t x = 0; x < n; ++x) zp[x] += ek[x];
    }
    for (int64_t x = 0; x < n; ++x) zp[x] = 1.f / zp[x];  // z holds 1 / sum from here on
  }
};

// Per-class sums of the probabilities over the pixels of one image, one rule for both kernels: per
// (class, column), float32 sums of 8 rows at a time added to float64 ones, then the columns in order.
struct ProbSums {
  std::vector<float> part;
  std::vector<double> acc;
  int64_t K, W, rows = 0;
  ProbSums(int64_t K, int64_t W) : part(K * W, 0.f), acc(K * W, 0.0), K(K), W(W) {}

  // The probabilities of the columns [x0, x0 + n) of the current row, from a RowSoftmax of them: its e
  // (K, n) times its z (n), written back to e (the probabilities from here on) and added.
  PRIMAPS_ALWAYS_INLINE void add(RowSoftmax& row, int64_t x0, int64_t n) {
    const float* __restrict zp = row.z.data();
    for (int64_t k = 0; k < K; ++k) {
      float* __restrict ek = row.e.data() + k * n;
      float* __restrict sk = part.data() + k * W + x0;
      for (int64_t x = 0; x < n; ++x) {
        const float p = ek[x] * zp[x];
        ek[x] = p;
        sk[x] += p;
      }
    }
  }
  PRIMAPS_ALWAYS_INLINE void end_row() {
    if (++rows % 8 == 0) flush();
  }
  PRIMAPS_ALWAYS_INLINE void flush() {
    const float* __restrict sp = part.data();
    double* __restrict ap = acc.data();
    for (int64_t i = 0; i < K * W; ++i) ap[i] += static_cast<double>(sp[i]);
    std::fill(part.begin(), part.end(), 0.f);
  }
  PRIMAPS_ALWAYS_INLINE void finish(double* S) {
    flush();
    for (int64_t k = 0; k < K; ++k) {
      double sum = 0.0;
      for (int64_t x = 0; x < W; ++x) sum += acc[k * W + x];
      S[k] = sum;
    }
  }
};

constexpr int64_t kChunk = 128;  // columns per RowSoftmax of the one-pass kernel

// Pass 1 of one image L (K, h, w): S (K,) = the sums over its pixels of softmax(up).
PRIMAPS_ALWAYS_INLINE void confidence_body(const float* L, int64_t K, int64_t h, int64_t w, const Axis& ay,
                                           const Axis& ax, int64_t H, int64_t W, double* S) {
  std::vector<float> xs;
  RowSoftmax row(K, W);
  ProbSums sums(K, W);
  width_pass(L, K, h, w, ax, W, xs);
  for (int64_t y = 0; y < H; ++y) {
    row.compute(xs, ay, y, K, W, 0, W);
    sums.add(row, 0, W);
    sums.end_row();
  }
  sums.finish(S);
}
PRIMAPS_SIMD_FUNCTION(confidence_image, confidence_body)

void focal_confidence(FloatArray logits, int64_t H, int64_t W, DoubleArray sums, int threads) {
  check_ndim(logits, 4, "logits");
  check_ndim(sums, 2, "sums");
  const int64_t B = logits.shape(0), K = logits.shape(1), h = logits.shape(2), w = logits.shape(3);
  if (sums.shape(0) != B || sums.shape(1) != K) throw std::invalid_argument("sums: expected (B, K)");
  if (K < 1 || h < 1 || w < 1 || H < 1 || W < 1) throw std::invalid_argument("focal_confidence: empty input");
  const float* L = logits.data();
  double* S = sums.mutable_data();
  const Axis ay(h, H), ax(w, W);
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) { confidence_image(L + b * K * h * w, K, h, w, ay, ax, H, W, S + b * K); });
}

// weight (K,) from sums (B, K): the per-image sums added in image order, then focal_class_weight.
void focal_class_weights(DoubleArray sums, double num_pixels, float gamma, FloatArray weight) {
  check_ndim(sums, 2, "sums");
  check_ndim(weight, 1, "weight");
  const int64_t B = sums.shape(0), K = sums.shape(1);
  if (weight.shape(0) != K) throw std::invalid_argument("weight: expected shape (K,) of sums (B, K)");
  if (!(num_pixels > 0)) throw std::invalid_argument("num_pixels: must be > 0");
  const double* S = sums.data();
  float* Wt = weight.mutable_data();
  for (int64_t k = 0; k < K; ++k) {
    double total = 0.0;
    for (int64_t b = 0; b < B; ++b) total += S[b * K + k];
    Wt[k] = focal_class_weight(total, num_pixels, gamma);
  }
}

// Pass 2 of one image L (K, h, w) with target T (H, W): *loss = sum over pixels of Wt[t] * CE and, when
// G is not null, G (K, h, w) = its gradient w.r.t. L.
PRIMAPS_ALWAYS_INLINE void grad_body(const float* L, const int64_t* tb, const float* Wt, int64_t ignore_index,
                                     int64_t K, int64_t h, int64_t w, const Axis& ay, const Axis& ax, int64_t H,
                                     int64_t W, double* loss, float* gb) {
  const bool with_grad = gb != nullptr;
  std::vector<float> xs, wt(W), d(W);
  std::vector<int64_t> tc(W);
  RowSoftmax row(K, W);
  std::vector<double> gx;  // d/d xs, layout (h, K, W)
  if (with_grad) gx.assign(static_cast<size_t>(h * K * W), 0.0);
  width_pass(L, K, h, w, ax, W, xs);
  double acc = 0.0;
  for (int64_t y = 0; y < H; ++y) {
    row.compute(xs, ay, y, K, W, 0, W);
    const float* inv = row.z.data();
    bool any = false;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t t = tb[y * W + x];
      if (t == ignore_index) {  // weight 0: no loss, no gradient
        wt[x] = 0.f;
        tc[x] = -1;
        continue;
      }
      any = true;
      wt[x] = Wt[t];
      tc[x] = t;
      const float lse = row.mx[x] - std::log(inv[x]);
      acc += static_cast<double>(wt[x]) * static_cast<double>(lse - row.u[t * W + x]);
    }
    if (!with_grad || !any) continue;
    const double h0 = ay.l0[y], h1 = ay.l1[y];
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict ek = row.e.data() + k * W;
      float* __restrict dp = d.data();
      const float* __restrict wp = wt.data();
      for (int64_t x = 0; x < W; ++x) dp[x] = wp[x] * (ek[x] * inv[x]);
      for (int64_t x = 0; x < W; ++x)
        if (tc[x] == k) dp[x] = wp[x] * (ek[x] * inv[x] - 1.f);
      double* __restrict g0 = gx.data() + (ay.i0[y] * K + k) * W;
      for (int64_t x = 0; x < W; ++x) g0[x] += h0 * static_cast<double>(dp[x]);
      double* __restrict g1 = gx.data() + (ay.i1[y] * K + k) * W;
      for (int64_t x = 0; x < W; ++x) g1[x] += h1 * static_cast<double>(dp[x]);
    }
  }
  *loss = acc;
  if (!with_grad) return;
  // Width pass transposed: grad[k, ys, x0] += w0 * gx, grad[k, ys, x1] += w1 * gx.
  std::vector<double> out_row(static_cast<size_t>(w));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t ys = 0; ys < h; ++ys) {
      std::fill(out_row.begin(), out_row.end(), 0.0);
      const double* src = gx.data() + (ys * K + k) * W;
      for (int64_t x = 0; x < W; ++x) {
        out_row[ax.i0[x]] += ax.l0[x] * src[x];
        out_row[ax.i1[x]] += ax.l1[x] * src[x];
      }
      float* dst = gb + (k * h + ys) * w;
      for (int64_t i = 0; i < w; ++i) dst[i] = static_cast<float>(out_row[i]);
    }
}
PRIMAPS_SIMD_FUNCTION(grad_image, grad_body)

// Every slot (focal_target_classes) below R, the slots the moments hold: never past them.
inline void check_slots(const int32_t* slot, int64_t n, int64_t R) {
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] >= R) throw std::invalid_argument("slot: a slot beyond the moments' R");
}

// y[0:n] += a * x[0:n].
PRIMAPS_ALWAYS_INLINE void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

// dT (n, Kp) = the probabilities p (K, n) of a row chunk transposed (Kp = K rounded up to 8; p's rows
// padded with zeros to Kp), in 8 x 8 tiles of vector shuffles.
typedef float f32x8 __attribute__((vector_size(32)));
PRIMAPS_ALWAYS_INLINE void transpose_probabilities(const float* p, int64_t n, int64_t Kp, float* dT) {
  const int64_t n8 = n / 8 * 8;
  for (int64_t k0 = 0; k0 < Kp; k0 += 8) {
    for (int64_t x0 = 0; x0 < n8; x0 += 8) {
      f32x8 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) std::memcpy(&r[i], p + (k0 + i) * n + x0, sizeof r[i]);
      for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
      }
      for (int j = 0; j < 4; ++j) {
        const f32x8 lo = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        const f32x8 hi = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        std::memcpy(dT + (x0 + j) * Kp + k0, &lo, sizeof lo);
        std::memcpy(dT + (x0 + j + 4) * Kp + k0, &hi, sizeof hi);
      }
    }
    for (int64_t x = n8; x < n; ++x)
      for (int64_t k = k0; k < k0 + 8; ++k) dT[x * Kp + k] = p[k * n + x];
  }
}

// The classes present in each image's target, and its bad values: slot (B, K) int32 = the rank of class
// c among the classes of image b's target, -1 where absent; bad (B,) int64 = the count of values neither
// in [0, K) nor ignore_index. The first read of the target; the moments are kept for present classes only.
void focal_target_classes(Int64Array target, int64_t ignore_index, Int32Array slot, Int64Array bad, int threads) {
  check_ndim(target, 3, "target");
  check_ndim(slot, 2, "slot");
  check_ndim(bad, 1, "bad");
  const int64_t B = target.shape(0), n = target.shape(1) * target.shape(2), K = slot.shape(1);
  if (slot.shape(0) != B || bad.shape(0) != B) throw std::invalid_argument("slot/bad: expected (B, K) and (B,)");
  const int64_t* T = target.data();
  int32_t* Sl = slot.mutable_data();
  int64_t* bp = bad.mutable_data();
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    std::vector<uint8_t> seen(K, 0);
    int64_t n_bad = 0;
    for (const int64_t *t = T + b * n, *end = t + n; t != end; ++t) {
      if (*t == ignore_index) continue;
      if (*t < 0 || *t >= K)
        ++n_bad;
      else
        seen[*t] = 1;
    }
    int32_t rank = 0;
    for (int64_t c = 0; c < K; ++c) Sl[b * K + c] = seen[c] ? rank++ : -1;
    bp[b] = n_bad;
  });
}

// The one-pass form of image L (K, h, w) with target T (H, W), for when the class weights are not known
// yet (they depend on the softmax sums of the whole batch): S (K,) as confidence_body (the same rule),
// C (K,) with C[c] = the sum over the pixels of target c of CE, and, when M is not null, the moments
// M (h, w, R, Kp) float32 with M[iy, ix, slot[c], k] = the sum over the pixels of target c of
// tap(iy, ix) * (p_k - [k == c]) (R slots, Kp = K rounded up to 8, zeros beyond K), so that the
// gradient of sum_pixels w_t * CE w.r.t. L[k, iy, ix] is sum_c w_c M[iy, ix, slot[c], k] (focal_combine).
// Pixels whose target is ignore_index, outside [0, K) or without a slot contribute nothing (the caller
// refuses bad targets: focal_target_classes).
PRIMAPS_ALWAYS_INLINE void moments_body(const float* L, const int64_t* tb, const int32_t* slot, int64_t ignore_index,
                                        int64_t K, int64_t R, int64_t h, int64_t w, const Axis& ay, const Axis& ax,
                                        int64_t H, int64_t W, double* S, double* C, float* M) {
  const int64_t Kp = padded_classes(K);
  std::vector<float> xs, inv4(kChunk, 1.f), log_inv(kChunk), dT, ring;
  // The moments of source rows `held` and held + 1 accumulate in a ring of two rows (cache-resident); a
  // row is written to M once no later output row taps it.
  const int64_t row_size = w * R * Kp;
  int64_t held = 0;
  auto write_row = [&](int64_t iy) {
    float* part = ring.data() + (iy & 1) * row_size;
    std::copy(part, part + row_size, M + iy * row_size);
    std::fill(part, part + row_size, 0.f);
  };
  if (M != nullptr) {
    dT.resize(static_cast<size_t>(kChunk * Kp));
    ring.assign(static_cast<size_t>(2 * row_size), 0.f);
  }
  int64_t tc[kChunk];
  RowSoftmax row(K, kChunk);
  ProbSums sums(K, W);
  width_pass(L, K, h, w, ax, W, xs);
  for (int64_t k = 0; k < K; ++k) C[k] = 0.0;
  for (int64_t y = 0; y < H; ++y) {
    const int64_t iy0 = ay.i0[y], iy1 = ay.i1[y];
    const float h0 = ay.l0[y], h1 = ay.l1[y];
    float *r0 = nullptr, *r1 = nullptr;  // the ring rows of source rows iy0 and iy1
    if (M != nullptr) {
      for (; held < iy0; ++held) write_row(held);
      r0 = ring.data() + (iy0 & 1) * row_size;
      r1 = ring.data() + (iy1 & 1) * row_size;
    }
    for (int64_t x0 = 0; x0 < W; x0 += kChunk) {
      const int64_t n = std::min(kChunk, W - x0);
      row.compute(xs, ay, y, K, W, x0, n);
      std::copy(row.z.begin(), row.z.begin() + n, inv4.begin());  // log(1 / sum), four lanes at a time
      std::fill(inv4.begin() + n, inv4.end(), 1.f);
      for (int64_t x = 0; x < kChunk; x += 4) store4(log_inv.data() + x, log_positive(load4(inv4.data() + x)));
      const int64_t* tr = tb + y * W + x0;
      for (int64_t x = 0; x < n; ++x) {
        const int64_t t = tr[x];
        tc[x] = t != ignore_index && t >= 0 && t < K && slot[t] >= 0 ? t : -1;
        if (tc[x] >= 0) C[t] += static_cast<double>((row.mx[x] - log_inv[x]) - row.u[t * n + x]);  // lse - up_t
      }
      sums.add(row, x0, n);
      if (M == nullptr) continue;
      transpose_probabilities(row.e.data(), n, Kp, dT.data());
      // p_t - 1 at the target, in a pass of its own: a vector load right after a scalar store to the same
      // bytes would wait for the store
      for (int64_t x = 0; x < n; ++x)
        if (tc[x] >= 0) dT[x * Kp + tc[x]] -= 1.f;
      for (int64_t x = 0; x < n; ++x) {
        if (tc[x] < 0) continue;
        const float* d = dT.data() + x * Kp;
        const int64_t s = slot[tc[x]];
        const int64_t c0 = (ax.i0[x0 + x] * R + s) * Kp, c1 = (ax.i1[x0 + x] * R + s) * Kp;
        const float l0 = ax.l0[x0 + x], l1 = ax.l1[x0 + x];
        axpy(r0 + c0, h0 * l0, d, Kp);
        axpy(r0 + c1, h0 * l1, d, Kp);
        axpy(r1 + c0, h1 * l0, d, Kp);
        axpy(r1 + c1, h1 * l1, d, Kp);
      }
    }
    sums.end_row();
  }
  if (M != nullptr)
    for (; held < h; ++held) write_row(held);
  sums.finish(S);
}
PRIMAPS_SIMD_FUNCTION(moments_image, moments_body)

// One pass over the batch: sums (B, K) f64, class_loss (B, K) f64 and, when with_grad, moments
// (B, h, w, R, Kp) f32 for the slots (B, K) of focal_target_classes (R >= the classes of any image).
void focal_moments(FloatArray logits, Int64Array target, Int32Array slot, int64_t ignore_index, DoubleArray sums,
                   DoubleArray class_loss, FloatArray moments, bool with_grad, int threads) {
  check_ndim(logits, 4, "logits");
  check_ndim(target, 3, "target");
  check_ndim(slot, 2, "slot");
  check_ndim(sums, 2, "sums");
  check_ndim(class_loss, 2, "class_loss");
  const int64_t B = logits.shape(0), K = logits.shape(1), h = logits.shape(2), w = logits.shape(3);
  const int64_t H = target.shape(1), W = target.shape(2);
  if (target.shape(0) != B || slot.shape(0) != B || slot.shape(1) != K || sums.shape(0) != B ||
      sums.shape(1) != K || class_loss.shape(0) != B || class_loss.shape(1) != K)
    throw std::invalid_argument("target/slot/sums/class_loss: shapes do not match logits");
  if (K < 1 || h < 1 || w < 1 || H < 1 || W < 1) throw std::invalid_argument("focal_loss: empty input");
  const int32_t* Sl = slot.data();
  int64_t R = 0;
  if (with_grad) {
    check_ndim(moments, 5, "moments");
    R = moments.shape(3);
    const int64_t want[5] = {B, h, w, R, padded_classes(K)};
    for (int d = 0; d < 5; ++d)
      if (moments.shape(d) != want[d]) throw std::invalid_argument("moments: expected (B, h, w, R, Kp)");
    check_slots(Sl, B * K, R);
  }
  const float* L = logits.data();
  const int64_t* T = target.data();
  double *Sp = sums.mutable_data(), *Cp = class_loss.mutable_data();
  float* Mp = with_grad ? moments.mutable_data() : nullptr;
  const Axis ay(h, H), ax(w, W);
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    moments_image(L + b * K * h * w, T + b * H * W, Sl + b * K, ignore_index, K, R, h, w, ay, ax, H, W, Sp + b * K,
                  Cp + b * K, Mp == nullptr ? nullptr : Mp + b * h * w * R * padded_classes(K));
  });
}

// grad (B, K, h, w) = sum_c weight[c] * moments[b, iy, ix, slot[b, c], k] / num_pixels over the classes
// with a slot, summed in float64 (moments and slot as focal_moments and focal_target_classes write them).
void focal_combine(FloatArray moments, Int32Array slot, FloatArray weight, double num_pixels, FloatArray grad,
                   int threads) {
  check_ndim(moments, 5, "moments");
  check_ndim(slot, 2, "slot");
  check_ndim(weight, 1, "weight");
  check_ndim(grad, 4, "grad");
  const int64_t B = moments.shape(0), h = moments.shape(1), w = moments.shape(2), R = moments.shape(3);
  const int64_t Kp = moments.shape(4), K = weight.shape(0);
  if (Kp != padded_classes(K) || slot.shape(0) != B || slot.shape(1) != K || grad.shape(0) != B ||
      grad.shape(1) != K || grad.shape(2) != h || grad.shape(3) != w)
    throw std::invalid_argument("moments/slot/weight/grad: expected (B, h, w, R, Kp), (B, K), (K,), (B, K, h, w)");
  if (!(num_pixels > 0)) throw std::invalid_argument("num_pixels: must be > 0");
  const float* Mp = moments.data();
  const int32_t* Sl = slot.data();
  check_slots(Sl, B * K, R);
  const float* Wt = weight.data();
  float* G = grad.mutable_data();
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    std::vector<double> acc(Kp);
    const int32_t* sb = Sl + b * K;
    for (int64_t j = 0; j < h * w; ++j) {
      const float* m = Mp + (b * h * w + j) * R * Kp;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t c = 0; c < K; ++c) {
        if (sb[c] < 0) continue;
        const double wc = Wt[c];
        const float* __restrict mc = m + sb[c] * Kp;
        double* __restrict ap = acc.data();
        for (int64_t k = 0; k < Kp; ++k) ap[k] += wc * static_cast<double>(mc[k]);
      }
      for (int64_t k = 0; k < K; ++k) G[(b * K + k) * h * w + j] = static_cast<float>(acc[k] / num_pixels);
    }
  });
}

// loss[b] = sum over pixels of image b of weight[t] * (lse - up_t); grad (B, K, h, w) or empty.
void focal_loss_grad(FloatArray logits, Int64Array target, FloatArray weight, int64_t ignore_index,
                     DoubleArray loss, FloatArray grad, bool with_grad, int threads) {
  check_ndim(logits, 4, "logits");
  check_ndim(target, 3, "target");
  check_ndim(weight, 1, "weight");
  check_ndim(loss, 1, "loss");
  const int64_t B = logits.shape(0), K = logits.shape(1), h = logits.shape(2), w = logits.shape(3);
  const int64_t H = target.shape(1), W = target.shape(2);
  if (target.shape(0) != B || weight.shape(0) != K || loss.shape(0) != B)
    throw std::invalid_argument("target/weight/loss: shapes do not match logits");
  if (with_grad) {
    check_ndim(grad, 4, "grad");
    for (int d = 0; d < 4; ++d)
      if (grad.shape(d) != logits.shape(d)) throw std::invalid_argument("grad: shape must equal logits");
  }
  if (K < 1 || h < 1 || w < 1 || H < 1 || W < 1) throw std::invalid_argument("focal_loss: empty input");
  const float* L = logits.data();
  const int64_t* T = target.data();
  for (int64_t i = 0, n = B * H * W; i < n; ++i)
    if (T[i] != ignore_index && (T[i] < 0 || T[i] >= K))
      throw std::invalid_argument("target: class id out of range [0, K)");
  const float* Wt = weight.data();
  double* Lo = loss.mutable_data();
  float* G = with_grad ? grad.mutable_data() : nullptr;
  const Axis ay(h, H), ax(w, W);
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    grad_image(L + b * K * h * w, T + b * H * W, Wt, ignore_index, K, h, w, ay, ax, H, W, Lo + b,
               with_grad ? G + b * K * h * w : nullptr);
  });
}

static Registrar reg([](py::module_& m) {
  m.def("focal_confidence", &focal_confidence, py::arg("logits"), py::arg("H"), py::arg("W"),
        py::arg("sums"), py::arg("threads"),
        "Per-image sums of softmax of the bilinearly upsampled logits, (B, K) float64.");
  m.def("focal_class_weights", &focal_class_weights, py::arg("sums"), py::arg("num_pixels"),
        py::arg("gamma"), py::arg("weight"),
        "Focal class weights (1 - sum_b sums[b, k] / num_pixels) ** gamma, float32 (K,).");
  m.def("focal_target_classes", &focal_target_classes, py::arg("target"), py::arg("ignore_index"), py::arg("slot"),
        py::arg("bad"), py::arg("threads"),
        "Slots (B, K) int32 of the classes present in each image's target and its bad-value counts (B,).");
  m.def("focal_moments", &focal_moments, py::arg("logits"), py::arg("target"), py::arg("slot"),
        py::arg("ignore_index"), py::arg("sums"), py::arg("class_loss"), py::arg("moments"), py::arg("with_grad"),
        py::arg("threads"),
        "One pass: softmax sums, per-class CE sums and the gradient moments (B, h, w, R, Kp).");
  m.def("focal_combine", &focal_combine, py::arg("moments"), py::arg("slot"), py::arg("weight"),
        py::arg("num_pixels"), py::arg("grad"), py::arg("threads"),
        "The gradient (B, K, h, w) from the moments and the class weights, divided by num_pixels.");
  m.def("focal_loss_grad", &focal_loss_grad, py::arg("logits"), py::arg("target"), py::arg("weight"),
        py::arg("ignore_index"), py::arg("loss"), py::arg("grad"), py::arg("with_grad"),
        py::arg("threads"),
        "Per-image sums of weighted CE on the upsampled logits and (optionally) their gradient.");
});

}  // namespace
