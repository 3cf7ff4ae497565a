// PriMaPs pseudo-label post-processing on the GPU (official PriMaPs._get_pseudo after the proposal loop),
// the rules of the C++ kernel (mask_labels / mask_probs in csrc/pseudo_labels.cpp) in three launches:
//   gain_kernel:        3x3 median (median3x3.h) of the counts[b] proposals of every image, x10 and
//                       clamp (mask_logits.h) -> channels 1..counts[b] of logits (B, M + 1, h, w), and
//                       per-block sums and counts of the non-zero values;
//   log_softmax_kernel: the mean of the image's non-zero values (its blocks' sums in a fixed order),
//                       the background channel 0 and the log_softmax over masks of every pixel;
//   labels_kernel / probs_kernel: bilinear upsampling to (H, W) (bilinear.h, bit-identical to the C++
//                       kernel) fused with the first-maximum arg-max over masks (argmax.h; 0 becomes
//                       ignore_index), or with the softmax over masks the dense CRF starts from.
// Channels beyond counts[b] + 1 are never read; in probs they are zero.
#include "../argmax.h"
#include "../bilinear.h"
#include "../mask_logits.h"
#include "../median3x3.h"
#include "common.cuh"

namespace {

using namespace primaps;
using primaps::gpu::Ptr;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 2048;  // proposal values per block of gain_kernel

// The number of proposals of image b, clamped to [0, M] (the op passes counts in that range).
__device__ int64_t proposal_count(const int64_t* counts, int64_t b, int64_t M) {
  return min_hd(max_hd(counts[b], int64_t{0}), M);
}

__global__ void gain_kernel(const float* __restrict__ masks, const int64_t* __restrict__ counts,
                            float* __restrict__ logits, double* __restrict__ part_sum,
                            long long* __restrict__ part_count, int64_t M, int64_t h, int64_t w, int64_t chunks) {
  __shared__ double scratch[gpu::kWarp];
  __shared__ long long scratch_count[gpu::kWarp];
  const int64_t b = blockIdx.x / chunks, chunk = blockIdx.x % chunks, n = h * w;
  const int64_t end = min_hd(proposal_count(counts, b, M) * n, (chunk + 1) * kChunk);
  double sum = 0.0;
  long long count = 0;
  for (int64_t e = chunk * kChunk + threadIdx.x; e < end; e += blockDim.x) {
    const int64_t l = e / n, y = (e % n) / w, x = e % w;
    const float* plane = masks + (b * M + l) * n;
    const float* r0 = plane + reflect(y - 1, h) * w;
    const float* r1 = plane + y * w;
    const float* r2 = plane + reflect(y + 1, h) * w;
    const int64_t xl = reflect(x - 1, w), xr = reflect(x + 1, w);
    const float v = mask_gain(median_of_columns(column_triple(r0[xl], r1[xl], r2[xl]),
                                                column_triple(r0[x], r1[x], r2[x]),
                                                column_triple(r0[xr], r1[xr], r2[xr])));
    logits[(b * (M + 1) + l + 1) * n + y * w + x] = v;
    if (v != 0.0f) sum += v, ++count;
  }
  sum = gpu::block_sum(sum, scratch);
  count = gpu::block_sum(count, scratch_count);
  if (threadIdx.x == 0) part_sum[blockIdx.x] = sum, part_count[blockIdx.x] = count;
}

__global__ void log_softmax_kernel(float* __restrict__ logits, const int64_t* __restrict__ counts,
                                   const double* __restrict__ part_sum, const long long* __restrict__ part_count,
                                   int64_t M, int64_t n, int64_t chunks, int64_t pixel_blocks) {
  __shared__ double scratch[gpu::kWarp];
  __shared__ long long scratch_count[gpu::kWarp];
  const int64_t b = blockIdx.x / pixel_blocks, p = (blockIdx.x % pixel_blocks) * blockDim.x + threadIdx.x;
  double sum = 0.0;
  long long count = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x)
    sum += part_sum[b * chunks + c], count += part_count[b * chunks + c];
  sum = gpu::block_sum(sum, scratch);
  count = gpu::block_sum(count, scratch_count);
  if (p >= n) return;
  // mean of the non-zero gained values (0 when there is none; the official gives NaN)
  const float level = count ? static_cast<float>(sum / static_cast<double>(count)) : 0.0f;
  const int64_t m = proposal_count(counts, b, M);
  float* v = logits + b * (M + 1) * n + p;
  float s = 0.0f;
  for (int64_t l = 1; l <= m; ++l) s += v[l * n];
  v[0] = background(level, s);
  log_softmax_strided(v, m + 1, n);
}

__global__ void labels_kernel(const float* __restrict__ logits, const int64_t* __restrict__ counts,
                              int64_t* __restrict__ labels, int64_t B, int64_t M, int64_t h, int64_t w, int64_t H,
                              int64_t W, float scale_y, float scale_x, int64_t ignore) {
  const int64_t total = B * H * W, n = h * w;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / (H * W), y = (i / W) % H, x = i % W;
    const Taps ty = bilinear_taps(y, h, H, scale_y), tx = bilinear_taps(x, w, W, scale_x);
    const float* base = logits + b * (M + 1) * n;
    float best = bilinear(base, w, ty, tx);
    int64_t arg = 0;
    for (int64_t l = 1, L = proposal_count(counts, b, M) + 1; l < L; ++l)
      keep_first_max(bilinear(base + l * n, w, ty, tx), l, best, arg);
    labels[i] = arg == 0 ? ignore : arg;
  }
}

__global__ void probs_kernel(const float* __restrict__ logits, const int64_t* __restrict__ counts,
                             float* __restrict__ probs, int64_t B, int64_t M, int64_t h, int64_t w, int64_t H,
                             int64_t W, float scale_y, float scale_x) {
  const int64_t total = B * H * W, n = h * w, HW = H * W;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / HW, y = (i / W) % H, x = i % W, L = proposal_count(counts, b, M) + 1;
    const Taps ty = bilinear_taps(y, h, H, scale_y), tx = bilinear_taps(x, w, W, scale_x);
    const float* base = logits + b * (M + 1) * n;
    float mx = bilinear(base, w, ty, tx);
    for (int64_t l = 1; l < L; ++l) mx = max_hd(mx, bilinear(base + l * n, w, ty, tx));
    float sum = 0.0f;
    for (int64_t l = 0; l < L; ++l) sum += expf(bilinear(base + l * n, w, ty, tx) - mx);
    float* out = probs + b * (M + 1) * HW + y * W + x;
    for (int64_t l = 0; l < L; ++l) out[l * HW] = expf(bilinear(base + l * n, w, ty, tx) - mx) / sum;
    for (int64_t l = L; l <= M; ++l) out[l * HW] = 0.0f;
  }
}

void check_sizes(int64_t B, int64_t M, int64_t h, int64_t w) {
  gpu::require(B >= 1 && M >= 1 && h >= 1 && w >= 1, "masks: expected (B, M, h, w) with every size >= 1");
}

int64_t gain_chunks(int64_t M, int64_t h, int64_t w) { return (M * h * w + kChunk - 1) / kChunk; }

// masks float32 (B, M, h, w) raw proposals, counts int64 (B,) in [0, M] -> logits float32 (B, M + 1, h, w)
// (channels beyond counts[b] + 1 untouched); workspace part_sum float64 and part_count int64 of
// (B, gain_chunks(M, h, w)).
void mask_logits(Ptr masks, Ptr counts, Ptr logits, Ptr part_sum, Ptr part_count, int64_t B, int64_t M, int64_t h,
                 int64_t w, int device, Ptr stream) {
  const char* what = "pseudo_labels (mask logits)";
  check_sizes(B, M, h, w);
  cudaStream_t s = gpu::prepare(device, stream, what);
  const int64_t chunks = gain_chunks(M, h, w), pixel_blocks = (h * w + kThreads - 1) / kThreads;
  gpu::require(B * chunks < (int64_t{1} << 31) && B * pixel_blocks < (int64_t{1} << 31),
               "masks: too many values for one launch");
  gpu::launch(what, gain_kernel, static_cast<unsigned>(B * chunks), kThreads, 0, s, gpu::ptr<const float>(masks),
              gpu::ptr<const int64_t>(counts), gpu::ptr<float>(logits), gpu::ptr<double>(part_sum),
              gpu::ptr<long long>(part_count), M, h, w, chunks);
  gpu::launch(what, log_softmax_kernel, static_cast<unsigned>(B * pixel_blocks), kThreads, 0, s,
              gpu::ptr<float>(logits), gpu::ptr<const int64_t>(counts), gpu::ptr<const double>(part_sum),
              gpu::ptr<const long long>(part_count), M, h * w, chunks, pixel_blocks);
}

// crf=False: labels int64 (B, H, W) <- arg-max over masks of the upsampled logits, 0 -> ignore_index.
void mask_labels(Ptr logits, Ptr counts, Ptr labels, int64_t B, int64_t M, int64_t h, int64_t w, int64_t H, int64_t W,
                 int64_t ignore_index, int device, Ptr stream) {
  const char* what = "pseudo_labels (labels)";
  check_sizes(B, M, h, w);
  gpu::require(H >= 1 && W >= 1, "size: expected H, W >= 1");
  cudaStream_t s = gpu::prepare(device, stream, what);
  gpu::launch(what, labels_kernel, gpu::grid_for(B * H * W, kThreads), kThreads, 0, s, gpu::ptr<const float>(logits),
              gpu::ptr<const int64_t>(counts), gpu::ptr<int64_t>(labels), B, M, h, w, H, W, source_scale(h, H),
              source_scale(w, W), ignore_index);
}

// crf=True: probs float32 (B, M + 1, H, W) <- softmax over masks of the upsampled logits, zero beyond
// counts[b] + 1.
void mask_probs(Ptr logits, Ptr counts, Ptr probs, int64_t B, int64_t M, int64_t h, int64_t w, int64_t H, int64_t W,
                int device, Ptr stream) {
  const char* what = "pseudo_labels (probabilities)";
  check_sizes(B, M, h, w);
  gpu::require(H >= 1 && W >= 1, "size: expected H, W >= 1");
  cudaStream_t s = gpu::prepare(device, stream, what);
  gpu::launch(what, probs_kernel, gpu::grid_for(B * H * W, kThreads), kThreads, 0, s, gpu::ptr<const float>(logits),
              gpu::ptr<const int64_t>(counts), gpu::ptr<float>(probs), B, M, h, w, H, W, source_scale(h, H),
              source_scale(w, W));
}

static Registrar reg([](py::module_& m) {
  m.def("mask_logits_chunks", &gain_chunks, py::arg("M"), py::arg("h"), py::arg("w"),
        "Columns of the (B, chunks) workspaces of mask_logits.");
  m.def("mask_logits", &mask_logits, py::arg("masks"), py::arg("counts"), py::arg("logits"), py::arg("part_sum"),
        py::arg("part_count"), py::arg("B"), py::arg("M"), py::arg("h"), py::arg("w"), py::arg("device"),
        py::arg("stream"),
        "Raw proposals float32 (B, M, h, w) -> log-probabilities float32 (B, M + 1, h, w), background first "
        "(median filter, x10, clamp, background, log_softmax); workspaces float64 / int64 (B, chunks).");
  m.def("mask_labels", &mask_labels, py::arg("logits"), py::arg("counts"), py::arg("labels"), py::arg("B"),
        py::arg("M"), py::arg("h"), py::arg("w"), py::arg("H"), py::arg("W"), py::arg("ignore_index"),
        py::arg("device"), py::arg("stream"),
        "Upsampled arg-max over masks of mask_logits' output: int64 (B, H, W) ids, ignore_index for 0.");
  m.def("mask_probs", &mask_probs, py::arg("logits"), py::arg("counts"), py::arg("probs"), py::arg("B"), py::arg("M"),
        py::arg("h"), py::arg("w"), py::arg("H"), py::arg("W"), py::arg("device"), py::arg("stream"),
        "Upsampled softmax over masks of mask_logits' output: float32 (B, M + 1, H, W), zero beyond counts + 1.");
});

}  // namespace
