// The one compiled module, primaps_fast._C: collects the bindings every csrc/<op>.cpp registers.
#include "common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "primaps_fast C++ kernels (CPU). Buffers are C-contiguous numpy views of torch tensors.";
  for (auto fn : primaps::registry()) fn(m);
  // The SIMD variant of the kernels that have several (common.h): 0 baseline (SSE2), 1 AVX2, 2 AVX-512F.
  m.def("best_simd", &primaps::best_simd, "The best SIMD variant this CPU runs.");
  m.def("simd", [] { return primaps::simd_setting().load(); }, "The SIMD variant the kernels run.");
  m.def("set_simd", [](int level) {
    if (level < 0 || level > primaps::best_simd())
      throw std::invalid_argument("level: expected a SIMD variant in [0, " + std::to_string(primaps::best_simd()) +
                                  "] (0 baseline, 1 AVX2, 2 AVX-512F, up to what this CPU runs), got " +
                                  std::to_string(level));
    primaps::simd_setting().store(level);
  }, py::arg("level"), "Run the kernels' SIMD variant `level` (tests and measurements; the same bits in each).");
}
