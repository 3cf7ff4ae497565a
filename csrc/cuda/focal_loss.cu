// M-step loss of PriMaPs-EM on the GPU: the official FocalLoss on bilinearly upsampled class scores,
// forward and backward fused with the upsampling (never the (B, K, H, W) upsampled scores), and
// deterministic: every sum is taken in a fixed order, with no floating-point atomics.
//
// One block per output row (b, y); its threads recompute the K upsampled scores of their pixels from the
// 4 source taps (bilinear.h) whenever they need them, so only per-pixel statistics live in shared memory.
//   confidence_kernel: per-row sums of softmax(up)_k                           -> conf (B, H, K)
//   weights_kernel:    w_k = focal_class_weight(sum over rows of conf)         -> weight (K)
//   loss_grad_kernel:  per-row sums of w_t * (logsumexp(up) - up_t)            -> loss (B, H)
//                      and, with the gradient, the row pass of d = w_t (softmax(up) - onehot(t)) back
//                      to the source columns: r[b, y, k, xs] = sum_x lx(x -> xs) d_k(y, x)
//   grad_kernel:       the column pass, grad[b, k, ys, xs] = sum_y ly(y -> ys) r[b, y, k, xs] / N.
// The transposed passes gather (each source column / row sums the outputs whose taps reach it, in
// increasing order) instead of scattering, which is what keeps them free of atomics.
#include "../bilinear.h"
#include "../focal_weights.h"
#include "common.cuh"

namespace {

using namespace primaps;
using primaps::gpu::Ptr;

constexpr int kRowThreads = 128;
constexpr int kThreads = 256;
constexpr int64_t kChunkFloats = 8192;  // 32 KiB of gradient values of one row per block

// The outputs d in [lo, hi] include every one whose taps reach source index s (taps are monotone in d:
// i0(d) in {s - 1, s}, widened by one for float rounding); the caller tests the taps themselves.
__device__ void reaching_outputs(int64_t s, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
  const double ratio = static_cast<double>(out) / static_cast<double>(in);
  lo = max_hd(int64_t{0}, static_cast<int64_t>(floor((s - 0.5) * ratio - 0.5)) - 1);
  hi = min_hd(out - 1, static_cast<int64_t>(ceil((s + 1.5) * ratio - 0.5)) + 1);
}

// log-sum-exp over the K upsampled scores of one pixel (exp of the scores minus their maximum).
__device__ float upsampled_lse(const float* L, int64_t K, int64_t hw, int64_t w, const Taps& ty, const Taps& tx) {
  float mx = bilinear(L, w, ty, tx);
  for (int64_t k = 1; k < K; ++k) mx = max_hd(mx, bilinear(L + k * hw, w, ty, tx));
  float z = 0.0f;
  for (int64_t k = 0; k < K; ++k) z += expf(bilinear(L + k * hw, w, ty, tx) - mx);
  return mx + logf(z);
}

__global__ void confidence_kernel(const float* __restrict__ logits, double* __restrict__ conf, int64_t K,
                                  int64_t h, int64_t w, int64_t H, int64_t W, float scale_y, float scale_x) {
  __shared__ double scratch[gpu::kWarp];
  float* lse = gpu::dynamic_shared<float>();  // (W,)
  const int64_t b = blockIdx.x / H, y = blockIdx.x % H, hw = h * w;
  const float* L = logits + b * K * hw;
  const Taps ty = bilinear_taps(y, h, H, scale_y);
  for (int64_t x = threadIdx.x; x < W; x += blockDim.x)
    lse[x] = upsampled_lse(L, K, hw, w, ty, bilinear_taps(x, w, W, scale_x));
  __syncthreads();
  for (int64_t k = 0; k < K; ++k) {
    double p = 0.0;
    for (int64_t x = threadIdx.x; x < W; x += blockDim.x)
      p += expf(bilinear(L + k * hw, w, ty, bilinear_taps(x, w, W, scale_x)) - lse[x]);
    p = gpu::block_sum(p, scratch);
    if (threadIdx.x == 0) conf[blockIdx.x * K + k] = p;
  }
}

// One block per class: weight[k] from the sum over rows of conf[:, k] (strided partial sums, then the
// block's fixed-order reduction).
__global__ void weights_kernel(const double* __restrict__ conf, float* __restrict__ weight, int64_t rows, int64_t K,
                               double num_pixels, float gamma) {
  __shared__ double scratch[gpu::kWarp];
  const int64_t k = blockIdx.x;
  double s = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) s += conf[r * K + k];
  s = gpu::block_sum(s, scratch);
  if (threadIdx.x == 0) weight[k] = focal_class_weight(s, num_pixels, gamma);
}

__global__ void loss_grad_kernel(const float* __restrict__ logits, const int64_t* __restrict__ target,
                                 const float* __restrict__ weight, double* __restrict__ loss, float* __restrict__ rows,
                                 int64_t K, int64_t h, int64_t w, int64_t H, int64_t W, float scale_y, float scale_x,
                                 int64_t ignore, bool with_grad, int64_t kc) {
  __shared__ double scratch[gpu::kWarp];
  float* lse = gpu::dynamic_shared<float>();  // (W,)
  float* wt = lse + W;                        // (W,), 0 at ignored pixels
  int* cls = reinterpret_cast<int*>(wt + W);  // (W,), -1 at ignored pixels
  float* d = reinterpret_cast<float*>(cls + W);  // (kc, W) with the gradient
  const int64_t b = blockIdx.x / H, y = blockIdx.x % H, hw = h * w;
  const float* L = logits + b * K * hw;
  const int64_t* T = target + (b * H + y) * W;
  const Taps ty = bilinear_taps(y, h, H, scale_y);
  double acc = 0.0;
  for (int64_t x = threadIdx.x; x < W; x += blockDim.x) {
    const int64_t t = T[x];
    const bool valid = t != ignore && t >= 0 && t < K;  // the op passes ids in [0, K) or ignore_index
    cls[x] = valid ? static_cast<int>(t) : -1;
    wt[x] = valid ? weight[t] : 0.0f;
    if (!valid) continue;
    const Taps tx = bilinear_taps(x, w, W, scale_x);
    lse[x] = upsampled_lse(L, K, hw, w, ty, tx);
    acc += static_cast<double>(wt[x]) * static_cast<double>(lse[x] - bilinear(L + t * hw, w, ty, tx));
  }
  acc = gpu::block_sum(acc, scratch);  // also orders the shared writes above before the reads below
  if (threadIdx.x == 0) loss[blockIdx.x] = acc;
  if (!with_grad) return;
  // Classes in chunks of kc, whose d (kc, W) fits in shared memory: all threads busy in both passes.
  float* r = rows + blockIdx.x * K * w;  // (K, w) of this row
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t n = min_hd(kc, K - k0);
    for (int64_t i = threadIdx.x; i < n * W; i += blockDim.x) {
      const int64_t k = k0 + i / W, x = i % W;
      float g = 0.0f;
      if (cls[x] >= 0) {
        const float p = expf(bilinear(L + k * hw, w, ty, bilinear_taps(x, w, W, scale_x)) - lse[x]);
        g = wt[x] * (cls[x] == k ? p - 1.0f : p);
      }
      d[i] = g;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n * w; i += blockDim.x) {
      const int64_t c = i / w, xs = i % w;
      const float* dc = d + c * W;
      int64_t lo, hi;
      reaching_outputs(xs, w, W, lo, hi);
      double sum = 0.0;
      for (int64_t x = lo; x <= hi; ++x) {
        const Taps tx = bilinear_taps(x, w, W, scale_x);
        if (tx.i0 == xs) sum += static_cast<double>(tx.l0) * dc[x];
        if (tx.i1 == xs) sum += static_cast<double>(tx.l1) * dc[x];
      }
      r[(k0 + c) * w + xs] = static_cast<float>(sum);
    }
    __syncthreads();  // d is rewritten for the next chunk
  }
}

__global__ void grad_kernel(const float* __restrict__ rows, float* __restrict__ grad, int64_t B, int64_t K, int64_t h,
                            int64_t w, int64_t H, float scale_y, double num_pixels) {
  const int64_t total = B * K * h * w;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t xs = i % w, ys = (i / w) % h, k = (i / (h * w)) % K, b = i / (K * h * w);
    int64_t lo, hi;
    reaching_outputs(ys, h, H, lo, hi);
    double sum = 0.0;
    for (int64_t y = lo; y <= hi; ++y) {
      const Taps ty = bilinear_taps(y, h, H, scale_y);
      const float v = rows[((b * H + y) * K + k) * w + xs];
      if (ty.i0 == ys) sum += static_cast<double>(ty.l0) * v;
      if (ty.i1 == ys) sum += static_cast<double>(ty.l1) * v;
    }
    grad[i] = static_cast<float>(sum / num_pixels);
  }
}

void check_sizes(int64_t B, int64_t K, int64_t h, int64_t w, int64_t H, int64_t W) {
  gpu::require(B >= 1 && K >= 1 && h >= 1 && w >= 1 && H >= 1 && W >= 1,
               "focal_loss: empty input (every size must be >= 1)");
  gpu::require(B * H < (int64_t{1} << 31), "target: too many rows (B * H) for one launch");
}

// conf float64 (B, H, K) <- per-row sums of the softmax; weight float32 (K,) <- the class weights.
void focal_weights(Ptr logits, Ptr conf, Ptr weight, int64_t B, int64_t K, int64_t h, int64_t w, int64_t H, int64_t W,
                   double gamma, int device, Ptr stream) {
  const char* what = "focal_loss (class weights)";
  check_sizes(B, K, h, w, H, W);
  cudaStream_t s = gpu::prepare(device, stream, what);
  const size_t smem = static_cast<size_t>(W) * sizeof(float);
  gpu::allow_shared_memory(confidence_kernel, smem, device, what, "the label width W");
  gpu::launch(what, confidence_kernel, static_cast<unsigned>(B * H), kRowThreads, smem, s,
              gpu::ptr<const float>(logits), gpu::ptr<double>(conf), K, h, w, H, W, source_scale(h, H),
              source_scale(w, W));
  gpu::launch(what, weights_kernel, static_cast<unsigned>(K), kThreads, 0, s, gpu::ptr<const double>(conf),
              gpu::ptr<float>(weight), B * H, K, static_cast<double>(B * H * W), static_cast<float>(gamma));
}

// loss float64 (B, H) <- per-row sums of w_t * CE; with_grad: rows float32 (B, H, K, w) workspace and
// grad float32 (B, K, h, w) <- d(sum of w_t * CE / num_pixels) / d logits (num_pixels: B H W, or the
// pixel count of a whole batch split across calls).
void focal_loss_grad(Ptr logits, Ptr target, Ptr weight, int64_t ignore_index, Ptr loss, Ptr rows, Ptr grad,
                     bool with_grad, int64_t B, int64_t K, int64_t h, int64_t w, int64_t H, int64_t W,
                     int64_t num_pixels, int device, Ptr stream) {
  const char* what = "focal_loss";
  check_sizes(B, K, h, w, H, W);
  gpu::require(num_pixels >= 1, "num_pixels: must be >= 1");
  cudaStream_t s = gpu::prepare(device, stream, what);
  // d takes kChunkFloats floats (at least one class); the per-pixel statistics 3 W words.
  const int64_t kc = with_grad ? max_hd(int64_t{1}, min_hd(K, kChunkFloats / W)) : 0;
  const size_t smem = static_cast<size_t>(W) * (2 * sizeof(float) + sizeof(int)) +
                      static_cast<size_t>(kc * W) * sizeof(float);
  gpu::allow_shared_memory(loss_grad_kernel, smem, device, what, "the label width W");
  const float sy = source_scale(h, H);
  gpu::launch(what, loss_grad_kernel, static_cast<unsigned>(B * H), kRowThreads, smem, s, gpu::ptr<const float>(logits),
              gpu::ptr<const int64_t>(target), gpu::ptr<const float>(weight), gpu::ptr<double>(loss),
              gpu::ptr<float>(rows), K, h, w, H, W, sy, source_scale(w, W), ignore_index, with_grad, kc);
  if (with_grad)
    gpu::launch(what, grad_kernel, gpu::grid_for(B * K * h * w, kThreads), kThreads, 0, s, gpu::ptr<const float>(rows),
                gpu::ptr<float>(grad), B, K, h, w, H, sy, static_cast<double>(num_pixels));
}

static Registrar reg([](py::module_& m) {
  m.def("focal_weights", &focal_weights, py::arg("logits"), py::arg("conf"), py::arg("weight"), py::arg("B"),
        py::arg("K"), py::arg("h"), py::arg("w"), py::arg("H"), py::arg("W"), py::arg("gamma"), py::arg("device"),
        py::arg("stream"),
        "Focal class weights float32 (K,) of the upsampled logits; conf: float64 (B, H, K) workspace.");
  m.def("focal_loss_grad", &focal_loss_grad, py::arg("logits"), py::arg("target"), py::arg("weight"),
        py::arg("ignore_index"), py::arg("loss"), py::arg("rows"), py::arg("grad"), py::arg("with_grad"), py::arg("B"),
        py::arg("K"), py::arg("h"), py::arg("w"), py::arg("H"), py::arg("W"), py::arg("num_pixels"), py::arg("device"),
        py::arg("stream"),
        "Per-row sums float64 (B, H) of the weighted CE and, with_grad, the gradient of the mean loss w.r.t. "
        "the logits, float32 (B, K, h, w); rows: float32 (B, H, K, w) workspace.");
});

}  // namespace
