// The one compiled module, primaps_fast._C: collects the bindings every csrc/<op>.cpp registers.
#include "common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "primaps_fast C++ kernels (CPU). Buffers are C-contiguous numpy views of torch tensors.";
  for (auto fn : primaps::registry()) fn(m);
  // Python callables on the kernels' threads (torch's OpenMP threads, common.h): the EM heads' BLAS tasks,
  // which on threads of their own would compete with torch's spinning pool.
  m.def("run_tasks", [](const py::function& fn, int64_t n, int threads) {
    py::gil_scoped_release release;
    primaps::parallel_for(n, threads, [&](int64_t i) {
      py::gil_scoped_acquire acquire;
      fn(i);
    });
  }, py::arg("fn"), py::arg("n"), py::arg("threads"),
        "Calls fn(i) for i in range(n) on up to `threads` threads, each call holding the GIL (fn should "
        "release it, as torch ops do); the first exception is raised after all calls have ended.");
  // The SIMD variant of the kernels that have several (common.h).
  m.def("isa", [] { return std::string(primaps::kIsaNames[primaps::isa_setting().load()]); },
        "The SIMD variant the C++ kernels run: 'scalar' (SSE2), 'avx2' or 'avx512'.");
  m.def("set_isa", [](const std::string& isa) {
    const int best = primaps::best_isa();
    int level = isa == "auto" ? best : -1;
    for (int i = 0; i <= best; ++i)
      if (isa == primaps::kIsaNames[i]) level = i;
    if (level < 0)
      throw std::invalid_argument("isa: expected 'auto', 'scalar' or one this CPU supports (best: " +
                                  std::string(primaps::kIsaNames[best]) + "), got '" + isa + "'");
    primaps::isa_setting().store(level);
    return std::string(primaps::kIsaNames[level]);
  }, py::arg("isa"),
        "Selects the SIMD variant of the C++ kernels ('auto': the best this CPU runs; the same bits in each; "
        "for tests and measurements, not during a call) and returns the one in use.");
}
