// 3x3 median filter of PriMaPs proposals on the GPU (official MedianPool2d(3, 1, 1), reflect padding),
// the rule of median3x3.h: one output pixel per thread, its three column triples sorted from the 9
// neighbours (read through the L1 cache, which the overlapping windows of neighbouring threads share).
#include "../median3x3.h"
#include "common.cuh"

namespace {

using namespace primaps;
using primaps::gpu::Ptr;

constexpr int kThreads = 256;

__global__ void median_filter_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t planes,
                                     int64_t h, int64_t w) {
  const int64_t n = h * w, total = planes * n;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = i / n, y = (i % n) / w, x = i % w;
    const float* plane = in + p * n;
    const float* r0 = plane + reflect(y - 1, h) * w;
    const float* r1 = plane + y * w;
    const float* r2 = plane + reflect(y + 1, h) * w;
    const int64_t xl = reflect(x - 1, w), xr = reflect(x + 1, w);
    const Triple l = column_triple(__ldg(r0 + xl), __ldg(r1 + xl), __ldg(r2 + xl));
    const Triple c = column_triple(__ldg(r0 + x), __ldg(r1 + x), __ldg(r2 + x));
    const Triple r = column_triple(__ldg(r0 + xr), __ldg(r1 + xr), __ldg(r2 + xr));
    out[i] = median_of_columns(l, c, r);
  }
}

// masks, out: float32 (planes, h, w) contiguous on `device`.
void median_filter(Ptr masks, Ptr out, int64_t planes, int64_t h, int64_t w, int device, Ptr stream) {
  const char* what = "median_filter";
  gpu::require(planes >= 0 && h >= 1 && w >= 1, "masks: expected planes >= 0 and h, w >= 1");
  cudaStream_t s = gpu::prepare(device, stream, what);
  gpu::launch(what, median_filter_kernel, gpu::grid_for(planes * h * w, kThreads), kThreads, 0, s,
               gpu::ptr<const float>(masks), gpu::ptr<float>(out), planes, h, w);
}

static Registrar reg([](py::module_& m) {
  m.def("median_filter", &median_filter, py::arg("masks"), py::arg("out"), py::arg("planes"), py::arg("h"),
        py::arg("w"), py::arg("device"), py::arg("stream"),
        "3x3 median, reflect padding, of every (h, w) plane of float32 (planes, h, w) device memory.");
});

}  // namespace
