// M-step loss of PriMaPs-EM: the official FocalLoss on bilinearly upsampled class scores, forward and
// backward fused with the upsampling, never storing the (B, K, H, W) upsampled scores.
//
// focal_confidence: per-image sums over pixels of softmax(up) (pass 1, for the class weights).
// focal_loss_grad: per-image sums of w_t * CE (pass 2) and, when requested, the gradient of
//   sum_pixels w_t * CE w.r.t. the low-resolution logits (the caller scales by grad_output / N):
//   dL/dup_k = w_t * (p_k - [k == t]) at non-ignored pixels, scattered back through the bilinear taps.
// focal_class_weights: the class weights from the pass-1 sums (focal_weights.h, shared with CUDA).
// Threads run over images; every image accumulates into its own buffers in a fixed order, so the
// results are deterministic. Upsampling as PyTorch's, to float32 rounding (bilinear.h). The per-image
// passes are compiled for SSE2, AVX2 and AVX-512F, the best run (common.h, PRIMAPS_SIMD_FUNCTION): the
// same bits in every variant.
#include "common.h"

#include <cmath>

#include "bilinear.h"
#include "fast_exp.h"
#include "focal_weights.h"

namespace {

using namespace primaps;

// One output row y at a time, vectorised along the row: the upsampled scores u (K, W), their
// exponentials e = exp(u - max) (K, W), the partition sums z (W) and the row maxima mx (W).
struct RowSoftmax {
  std::vector<float> u, e, mx, z;
  RowSoftmax(int64_t K, int64_t W) : u(K * W), e(K * W), mx(W), z(W) {}

  PRIMAPS_ALWAYS_INLINE void compute(const std::vector<float>& xs, const Axis& ay, int64_t y, int64_t K, int64_t W) {
    const float h0 = ay.l0[y], h1 = ay.l1[y];
    float* __restrict mxp = mx.data();
    float* __restrict zp = z.data();
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict a = xs.data() + (ay.i0[y] * K + k) * W;
      const float* __restrict c = xs.data() + (ay.i1[y] * K + k) * W;
      float* __restrict uk = u.data() + k * W;
      for (int64_t x = 0; x < W; ++x) uk[x] = lerp(h0, a[x], h1, c[x]);
      if (k == 0) {
        for (int64_t x = 0; x < W; ++x) mxp[x] = uk[x];
      } else {
        for (int64_t x = 0; x < W; ++x) mxp[x] = uk[x] > mxp[x] ? uk[x] : mxp[x];
      }
    }
    for (int64_t x = 0; x < W; ++x) zp[x] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict uk = u.data() + k * W;
      float* __restrict ek = e.data() + k * W;
      for (int64_t x = 0; x < W; ++x) {
        const float v = uk[x] - mxp[x];
        ek[x] = v > -87.0f ? v : -87.0f;  // exp(-87) ~ 1.6e-38: ~0 next to exp(0) = 1
      }
      for (int64_t x = 0; x < W; ++x) ek[x] = exp_nonpositive(ek[x]);
      for (int64_t x = 0; x < W; ++x) zp[x] += ek[x];
    }
    for (int64_t x = 0; x < W; ++x) zp[x] = 1.f / zp[x];  // z holds 1 / sum from here on
  }
};

// Pass 1 of one image L (K, h, w): S (K,) = the sums over its pixels of softmax(up).
PRIMAPS_ALWAYS_INLINE void confidence_body(const float* L, int64_t K, int64_t h, int64_t w, const Axis& ay,
                                           const Axis& ax, int64_t H, int64_t W, double* S) {
  std::vector<float> xs;
  RowSoftmax row(K, W);
  std::vector<double> acc(static_cast<size_t>(K * W), 0.0);  // per (class, column) sums
  width_pass(L, K, h, w, ax, W, xs);
  for (int64_t y = 0; y < H; ++y) {
    row.compute(xs, ay, y, K, W);
    const float* __restrict inv = row.z.data();
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict ek = row.e.data() + k * W;
      double* __restrict ak = acc.data() + k * W;
      for (int64_t x = 0; x < W; ++x) ak[x] += static_cast<double>(ek[x] * inv[x]);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t x = 0; x < W; ++x) s += acc[k * W + x];
    S[k] = s;
  }
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
    row.compute(xs, ay, y, K, W);
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
  m.def("focal_loss_grad", &focal_loss_grad, py::arg("logits"), py::arg("target"), py::arg("weight"),
        py::arg("ignore_index"), py::arg("loss"), py::arg("grad"), py::arg("with_grad"),
        py::arg("threads"),
        "Per-image sums of weighted CE on the upsampled logits and (optionally) their gradient.");
});

}  // namespace
