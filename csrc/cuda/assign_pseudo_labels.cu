// E-step of PriMaPs-EM on the GPU: majority class of every pseudo mask under the argmax of the bilinearly
// upsampled class scores, never materialising the (B, K, H, W) upsampled scores.
//
// One pass over the pixels (vote_kernel): each thread upsamples the K scores of its pixel with the taps
// and the rounding of bilinear.h (bit-identical to the C++ kernel), takes the first maximum (argmax.h)
// and votes for (mask id, class) in a histogram in shared memory (one atomic per distinct vote of a
// warp), which each block then adds to the image's histogram in global memory (integer atomics: the
// counts, hence the result, do not depend on the order). When num_ids * K counts do not fit in shared
// memory, the votes go to global memory directly. Then winner_kernel takes the majority of every (image, id)
// histogram (argmax.h: the smallest class on ties, ignore_class's votes not counted) and write_kernel
// writes it to the mask's pixels.
#include "../argmax.h"
#include "../bilinear.h"
#include "common.cuh"

namespace {

using namespace primaps;
using primaps::gpu::Ptr;

constexpr int kThreads = 256;
constexpr int kPixelsPerThread = 8;                          // a block votes kThreads * 8 pixels
constexpr int64_t kTile = int64_t{kThreads} * kPixelsPerThread;
constexpr int64_t kSharedBins = 8192;                       // 32 KiB of int32 counts per block

__global__ void vote_kernel(const float* __restrict__ logits, const int64_t* __restrict__ ids,
                            int* __restrict__ hist, int64_t K, int64_t h, int64_t w, int64_t H, int64_t W,
                            int64_t num_ids, int64_t ignore, float scale_y, float scale_x, int64_t tiles,
                            bool shared_hist) {
  const int64_t b = blockIdx.x / tiles, tile = blockIdx.x % tiles, bins = num_ids * K;
  int* image_hist = hist + b * bins;
  int* counts = shared_hist ? gpu::dynamic_shared<int>() : image_hist;
  if (shared_hist) {
    for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) counts[i] = 0;
    __syncthreads();
  }
  const int64_t hw = h * w;
  const float* L = logits + b * K * hw;
  const int64_t* M = ids + b * H * W;
  for (int j = 0; j < kPixelsPerThread; ++j) {  // every lane runs every step (the warp votes together)
    const int64_t p = tile * kTile + int64_t{j} * blockDim.x + threadIdx.x;  // coalesced over threads
    const int64_t id = p < H * W ? M[p] : ignore;
    long long bin = -1;  // (id, class) of this lane's vote; -1: no vote
    if (id != ignore && id >= 0 && id < num_ids) {  // the op passes ids in [0, num_ids) or ignore
      const Taps ty = bilinear_taps(p / W, h, H, scale_y), tx = bilinear_taps(p % W, w, W, scale_x);
      float best = bilinear(L, w, ty, tx);
      int cls = 0;
      for (int k = 1; k < K; ++k) keep_first_max(bilinear(L + k * hw, w, ty, tx), k, best, cls);
      bin = id * K + cls;
    }
    // Neighbouring pixels mostly vote alike: one atomic per distinct bin of the warp, by its first lane.
    const unsigned peers = __match_any_sync(0xffffffffu, bin);
    if (bin >= 0 && (threadIdx.x % gpu::kWarp) == static_cast<unsigned>(__ffs(peers) - 1))
      atomicAdd(counts + bin, __popc(peers));
  }
  if (shared_hist) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < bins; i += blockDim.x)
      if (counts[i]) atomicAdd(image_hist + i, counts[i]);
  }
}

// winner[s] = the majority class of hist[s, :K] for every (image, id) slot s (argmax.h), -1 without votes.
__global__ void winner_kernel(const int* __restrict__ hist, int* __restrict__ winner, int64_t slots, int64_t K,
                              int64_t ignore_class) {
  for (int64_t s = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; s < slots; s += int64_t{gridDim.x} * blockDim.x)
    winner[s] = static_cast<int>(majority_class(hist + s * K, K, ignore_class));
}

__global__ void write_kernel(const int64_t* __restrict__ ids, const int* __restrict__ winner,
                             int64_t* __restrict__ out, int64_t B, int64_t HW, int64_t num_ids, int64_t ignore,
                             int64_t ignore_class) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < B * HW; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t id = ids[i];
    if (id == ignore || id < 0 || id >= num_ids) {
      out[i] = ignore;
    } else {
      const int k = winner[(i / HW) * num_ids + id];
      out[i] = k < 0 ? ignore_class : k;
    }
  }
}

// logits float32 (B, K, h, w); ids int64 (B, H, W) in [0, num_ids) or ignore_index; out int64 (B, H, W);
// votes for ignore_class not counted (ignore_class for a mask without votes); workspace: hist int32
// (B, num_ids, K) zero-filled, winner int32 (B, num_ids).
void assign_pseudo_labels(Ptr logits, Ptr ids, Ptr out, Ptr hist, Ptr winner, int64_t B, int64_t K, int64_t h,
                          int64_t w, int64_t H, int64_t W, int64_t num_ids, int64_t ignore_index, int64_t ignore_class,
                          int device, Ptr stream) {
  const char* what = "assign_pseudo_labels";
  gpu::require(B >= 1 && K >= 1 && h >= 1 && w >= 1 && H >= 1 && W >= 1,
               "assign_pseudo_labels: empty input (every size must be >= 1)");
  gpu::require(num_ids >= 1, "num_ids: must be >= 1");
  gpu::require(K < (int64_t{1} << 24), "logits: too many classes (>= 2^24)");
  cudaStream_t s = gpu::prepare(device, stream, what);
  const int64_t tiles = (H * W + kTile - 1) / kTile;
  gpu::require(B * tiles < (int64_t{1} << 31), "mask_ids: too many pixels for one launch");
  const bool shared_hist = num_ids * K <= kSharedBins;
  const size_t smem = shared_hist ? static_cast<size_t>(num_ids * K) * sizeof(int) : 0;
  gpu::launch(what, vote_kernel, static_cast<unsigned>(B * tiles), kThreads, smem, s, gpu::ptr<const float>(logits),
              gpu::ptr<const int64_t>(ids), gpu::ptr<int>(hist), K, h, w, H, W, num_ids, ignore_index,
              source_scale(h, H), source_scale(w, W), tiles, shared_hist);
  gpu::launch(what, winner_kernel, gpu::grid_for(B * num_ids, kThreads), kThreads, 0, s, gpu::ptr<const int>(hist),
              gpu::ptr<int>(winner), B * num_ids, K, ignore_class);
  gpu::launch(what, write_kernel, gpu::grid_for(B * H * W, kThreads), kThreads, 0, s, gpu::ptr<const int64_t>(ids),
              gpu::ptr<const int>(winner), gpu::ptr<int64_t>(out), B, H * W, num_ids, ignore_index, ignore_class);
}

static Registrar reg([](py::module_& m) {
  m.def("assign_pseudo_labels", &assign_pseudo_labels, py::arg("logits"), py::arg("mask_ids"), py::arg("out"),
        py::arg("hist"), py::arg("winner"), py::arg("B"), py::arg("K"), py::arg("h"), py::arg("w"), py::arg("H"),
        py::arg("W"), py::arg("num_ids"), py::arg("ignore_index"), py::arg("ignore_class"), py::arg("device"),
        py::arg("stream"),
        "Majority class of the upsampled argmax per (image, mask id), votes for ignore_class not counted "
        "(ignore_class for a mask without votes); ignore_index where the id is ignore_index. Workspace: "
        "hist int32 (B, num_ids, K) zero-filled, winner int32 (B, num_ids).");
});

}  // namespace
