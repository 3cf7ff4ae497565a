// M-step loss of PriMaPs-EM: the official FocalLoss on bilinearly upsampled class scores, forward and
// backward fused with the upsampling, never storing the (B, K, H, W) upsampled scores.
//
// focal_confidence: per-image sums over pixels of softmax(up) (pass 1, for the class weights).
// focal_loss_grad: per-image sums of w_t * CE (pass 2) and, when requested, the gradient of
//   sum_pixels w_t * CE w.r.t. the low-resolution logits (the caller scales by grad_output / N):
//   dL/dup_k = w_t * (p_k - [k == t]) at non-ignored pixels, scattered back through the bilinear taps.
// Threads run over images; every image accumulates into its own buffers in a fixed order, so the
// results are deterministic. Upsampling as PyTorch's, to float32 rounding (see assign_pseudo_labels.cpp).
#include "common.h"

#include <cmath>
#include <cstring>

namespace {

using namespace primaps;

struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
};

Axis make_axis(int64_t in, int64_t out) {
  Axis a;
  a.i0.resize(out); a.i1.resize(out); a.l0.resize(out); a.l1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    float src = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    int64_t i0 = static_cast<int64_t>(src);
    if (i0 > in - 1) i0 = in - 1;
    const int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
    const float l1 = src - static_cast<float>(i0);
    a.i0[d] = i0; a.i1[d] = i1; a.l1[d] = l1; a.l0[d] = 1.f - l1;
  }
  return a;
}

// xs[(ys * W + x) * K + k]: width pass of one image's logits (K, h, w).
void width_pass(const float* L, int64_t K, int64_t h, int64_t w, const Axis& ax, int64_t W,
                std::vector<float>& xs) {
  xs.resize(static_cast<size_t>(h * W * K));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t ys = 0; ys < h; ++ys) {
      const float* row = L + (k * h + ys) * w;
      float* dst = xs.data() + ys * W * K + k;
      for (int64_t x = 0; x < W; ++x) {
        const float a = ax.l0[x] * row[ax.i0[x]];
        const float b = ax.l1[x] * row[ax.i1[x]];
        dst[x * K] = a + b;
      }
    }
}

struct Shapes {
  int64_t B, K, h, w, H, W;
};

// exp(x) for x <= 0 (within 2 ulp; exp(x) = 2^n * e^r, |r| <= ln2/2, degree-6 minimax polynomial for
// e^r, Cody-Waite reduction). Plain arithmetic and integer bit casts only, so the compiler vectorises
// loops that call it (std::exp would stay a scalar libm call without -ffast-math).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // 2^n stays a normal number; exp(-87) ~ 1.6e-38 is ~0 for softmax
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e = q * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// Upsampled scores of pixel (y, x) into u, their softmax into p (float32, as torch's softmax);
// returns the log-sum-exp.
inline float pixel_softmax(const std::vector<float>& xs, const Axis& ay, int64_t y, int64_t x,
                           int64_t K, int64_t W, float* __restrict u, float* __restrict p) {
  const float* __restrict a = xs.data() + (ay.i0[y] * W + x) * K;
  const float* __restrict c = xs.data() + (ay.i1[y] * W + x) * K;
  const float h0 = ay.l0[y], h1 = ay.l1[y];
  for (int64_t k = 0; k < K; ++k) {
    const float s = h0 * a[k];
    const float t = h1 * c[k];
    u[k] = s + t;
  }
  float mx = u[0];
  for (int64_t k = 1; k < K; ++k) mx = u[k] > mx ? u[k] : mx;
  for (int64_t k = 0; k < K; ++k) p[k] = exp_nonpositive(u[k] - mx);
  float z = 0.f;
  for (int64_t k = 0; k < K; ++k) z += p[k];
  const float inv = 1.f / z;
  for (int64_t k = 0; k < K; ++k) p[k] *= inv;
  return mx + std::log(z);
}

void focal_confidence(FloatArray logits, int64_t H, int64_t W, DoubleArray sums, int threads) {
  check_ndim(logits, 4, "logits");
  check_ndim(sums, 2, "sums");
  const int64_t B = logits.shape(0), K = logits.shape(1), h = logits.shape(2), w = logits.shape(3);
  if (sums.shape(0) != B || sums.shape(1) != K) throw std::invalid_argument("sums: expected (B, K)");
  if (K < 1 || h < 1 || w < 1 || H < 1 || W < 1) throw std::invalid_argument("focal_confidence: empty input");
  const float* L = logits.data();
  double* S = sums.mutable_data();
  const Axis ay = make_axis(h, H), ax = make_axis(w, W);
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    std::vector<float> xs, u(K), p(K);
    std::vector<double> acc(K, 0.0);
    width_pass(L + b * K * h * w, K, h, w, ax, W, xs);
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        pixel_softmax(xs, ay, y, x, K, W, u.data(), p.data());
        for (int64_t k = 0; k < K; ++k) acc[k] += p[k];
      }
    for (int64_t k = 0; k < K; ++k) S[b * K + k] = acc[k];
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
  const Axis ay = make_axis(h, H), ax = make_axis(w, W);
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    std::vector<float> xs, u(K), p(K);
    std::vector<double> gx;  // d/d xs, layout (h, W, K)
    if (with_grad) gx.assign(static_cast<size_t>(h * W * K), 0.0);
    width_pass(L + b * K * h * w, K, h, w, ax, W, xs);
    const int64_t* tb = T + b * H * W;
    double acc = 0.0;
    for (int64_t y = 0; y < H; ++y) {
      double* g0 = with_grad ? gx.data() + ay.i0[y] * W * K : nullptr;
      double* g1 = with_grad ? gx.data() + ay.i1[y] * W * K : nullptr;
      const double h0 = ay.l0[y], h1 = ay.l1[y];
      for (int64_t x = 0; x < W; ++x) {
        const int64_t t = tb[y * W + x];
        if (t == ignore_index) continue;
        const float lse = pixel_softmax(xs, ay, y, x, K, W, u.data(), p.data());
        const double wt = Wt[t];
        acc += wt * static_cast<double>(lse - u[t]);
        if (!with_grad) continue;
        p[t] -= 1.f;
        double* a = g0 + x * K;
        double* c = g1 + x * K;
        for (int64_t k = 0; k < K; ++k) {
          const double d = wt * p[k];
          a[k] += h0 * d;
          c[k] += h1 * d;
        }
      }
    }
    Lo[b] = acc;
    if (!with_grad) return;
    // Width pass transposed: grad[k, ys, x0] += w0 * gx, grad[k, ys, x1] += w1 * gx.
    std::vector<double> row(static_cast<size_t>(w));
    float* gb = G + b * K * h * w;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t ys = 0; ys < h; ++ys) {
        std::fill(row.begin(), row.end(), 0.0);
        const double* src = gx.data() + ys * W * K + k;
        for (int64_t x = 0; x < W; ++x) {
          const double v = src[x * K];
          row[ax.i0[x]] += ax.l0[x] * v;
          row[ax.i1[x]] += ax.l1[x] * v;
        }
        float* dst = gb + (k * h + ys) * w;
        for (int64_t xs0 = 0; xs0 < w; ++xs0) dst[xs0] = static_cast<float>(row[xs0]);
      }
  });
}

static Registrar reg([](py::module_& m) {
  m.def("focal_confidence", &focal_confidence, py::arg("logits"), py::arg("H"), py::arg("W"),
        py::arg("sums"), py::arg("threads"),
        "Per-image sums of softmax of the bilinearly upsampled logits, (B, K) float64.");
  m.def("focal_loss_grad", &focal_loss_grad, py::arg("logits"), py::arg("target"), py::arg("weight"),
        py::arg("ignore_index"), py::arg("loss"), py::arg("grad"), py::arg("with_grad"),
        py::arg("threads"),
        "Per-image sums of weighted CE on the upsampled logits and (optionally) their gradient.");
});

}  // namespace
