// 3x3 median filter of PriMaPs proposals (official MedianPool2d(kernel_size=3, stride=1, padding=1)):
// every (h, w) plane independently, reflect padding, one plane per thread, GIL released.
#include <cmath>
#include <limits>

#include "common.h"
#include "median3x3.h"

namespace {

void median_filter_cpu(primaps::FloatArray input, primaps::FloatArray output, int threads) {
  primaps::check_ndim(input, 3, "masks");
  primaps::check_ndim(output, 3, "out");
  const int64_t P = input.shape(0), h = input.shape(1), w = input.shape(2);
  if (output.shape(0) != P || output.shape(1) != h || output.shape(2) != w)
    throw std::invalid_argument("out: expected the shape of masks");
  if (h < 1 || w < 1) throw std::invalid_argument("masks: empty spatial size");
  const float* in = input.data();
  float* out = output.mutable_data();
  py::gil_scoped_release release;
  primaps::parallel_for(P, threads, [&](int64_t p) {
    // NaN/Inf checked in the kernel's own read of the plane rather than by a separate pass in Python
    const float* x = in + p * h * w;
    bool finite = true;
    for (int64_t i = 0; i < h * w; ++i) finite &= std::abs(x[i]) <= std::numeric_limits<float>::max();
    if (!finite) throw std::invalid_argument("masks: contains NaN or Inf");
    std::vector<float> scratch(3 * w);
    primaps::median3x3(in + p * h * w, out + p * h * w, h, w, scratch.data(), scratch.data() + w,
              scratch.data() + 2 * w);
  });
}

static primaps::Registrar registrar([](py::module_& m) {
  m.def("median_filter", &median_filter_cpu, py::arg("masks"), py::arg("out"), py::arg("threads"),
        "3x3 median filter with reflect padding of every (h, w) plane of a (P, h, w) float32 array.");
});

}  // namespace
