// Shared helpers for the primaps_fast kernels: buffer access, threading and op registration.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace primaps {

// C-contiguous numpy views; no forcecast, so a wrong dtype is an error rather than a silent copy.
using FloatArray = py::array_t<float, py::array::c_style>;
using DoubleArray = py::array_t<double, py::array::c_style>;
using Int64Array = py::array_t<int64_t, py::array::c_style>;
using Int32Array = py::array_t<int32_t, py::array::c_style>;
using UInt8Array = py::array_t<uint8_t, py::array::c_style>;

// Throws std::invalid_argument (ValueError in Python) unless `a` has exactly `dims` dimensions.
template <typename A>
inline void check_ndim(const A& a, py::ssize_t dims, const char* name) {
  if (a.ndim() != dims)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(dims) +
                                " dimensions, got " + std::to_string(a.ndim()));
}

// Runs fn(i) for i in [0, n) on `workers` threads (the caller's included): OpenMP's when `openmp` (and the
// module is built with it), else std::threads of their own. Work is handed out dynamically, one index at a
// time, so uneven items balance. The first exception thrown by any worker is rethrown in the caller after
// all workers have finished.
inline void run_workers(int64_t n, int workers, bool openmp, const std::function<void(int64_t)>& fn) {
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    for (int64_t i = next++; i < n; i = next++) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  };
#ifdef _OPENMP
  if (openmp) {
#pragma omp parallel num_threads(workers)
    work();
  } else
#endif
  {
    std::vector<std::thread> pool;
    pool.reserve(workers - 1);
    for (int t = 1; t < workers; ++t) pool.emplace_back(work);
    work();
    for (auto& th : pool) th.join();
  }
  if (error) std::rethrow_exception(error);
}

// Runs fn(i) for i in [0, n) on up to `threads` threads (the caller's included), as run_workers.
//
// The threads are OpenMP's, and the module links the libgomp that torch has already loaded (the same
// soname), so the kernels run on torch's own intra-op threads. With threads of their own they would
// compete with torch's, which spin for some milliseconds after every parallel torch op: on 2 cores that
// made a 4.7 ms kernel take 7.7 ms when it followed a torch op.
inline void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  run_workers(n, static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n))), true, fn);
}

// The items of a batch that can also split their own work: fn(i, inner) for i in [0, n), min(n, threads)
// items side by side, each with inner = threads / that many threads of its own (item_split). OpenMP gives a team
// started inside another team one thread (its default, which torch keeps), so when the items get more
// than one thread each they run on std::threads, each the master of its own OpenMP teams; otherwise on
// parallel_for's.
struct ItemSplit {
  int outer, inner;  // items side by side, threads of each
};
inline ItemSplit item_split(int64_t n, int threads) {
  threads = std::max(1, threads);
  const int outer = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, threads)));
  return {outer, std::max(1, threads / outer)};
}
inline void parallel_items(int64_t n, int threads, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  const ItemSplit split = item_split(n, threads);
  run_workers(n, split.outer, split.inner == 1, [&](int64_t i) { fn(i, split.inner); });
}

#ifndef __CUDACC__
// ---- SIMD variants chosen at run time (CPU kernels only)
// The hot loops of some kernels are compiled for the x86-64 baseline ("scalar": SSE2), AVX2 (with FMA) and
// AVX-512F, and each call runs the variant of isa_setting(): the best the CPU has, unless the set_isa
// binding (module.cpp) chose another for tests and measurements. The build has -ffp-contract=off and the
// loops reorder no floating-point sums, so every variant gives the same bits (tests/test_simd.py,
// test_principal_masks.py).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PRIMAPS_SIMD_VARIANTS 1
#else
#define PRIMAPS_SIMD_VARIANTS 0
#endif
// A loop body compiled into each variant: it (and the helpers it calls) must be inlined there.
#define PRIMAPS_ALWAYS_INLINE inline __attribute__((always_inline))

enum Isa : int { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

// The best variant this CPU runs.
inline int best_isa() {
#if PRIMAPS_SIMD_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
#endif
  return kIsaScalar;
}

// The variant the kernels run (best_isa() until set_isa changes it).
inline std::atomic<int>& isa_setting() {
  static std::atomic<int> level{best_isa()};
  return level;
}

// Whether the CPU has AVX-512VL, BW and DQ besides AVX-512F (every AVX-512 CPU but the Xeon Phi).
inline bool has_avx512vl() {
#if PRIMAPS_SIMD_VARIANTS
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq");
  }();
  return ok;
#else
  return false;
#endif
}

// PRIMAPS_SIMD_FUNCTION(name, body): defines name(args...), which calls the always-inline function `body`
// compiled for the variant of isa_setting(). PRIMAPS_SIMD_FUNCTION_VL(name, body): the same with the
// AVX-512 variant compiled for AVX-512VL too (AVX2 where the CPU lacks it), for bodies of 8-lane vectors:
// VL gives them 32 registers instead of 16, where AVX-512F alone compiles them slower (the focal loss's
// pixel loop: 30 % slower under AVX-512F, its 8-lane compares going through 16-lane ones; 1.05x-1.08x
// faster under VL, where its accumulators spill less).
#if PRIMAPS_SIMD_VARIANTS
#define PRIMAPS_SIMD_VARIANT(NAME, TARGET, BODY)                                                       \
  template <typename... A>                                                                             \
  __attribute__((target(TARGET))) void NAME(A&&... a) {                                                \
    BODY(std::forward<A>(a)...);                                                                       \
  }
// name(args...) running ON_AVX512, NAME##_avx2 or the baseline body by isa_setting()
#define PRIMAPS_SIMD_DISPATCH(NAME, BODY, ON_AVX512)                                                   \
  template <typename... A>                                                                             \
  void NAME(A&&... a) {                                                                                \
    const int level = primaps::isa_setting().load(std::memory_order_relaxed);                          \
    if (level == primaps::kIsaAvx512) return ON_AVX512(std::forward<A>(a)...);                         \
    if (level == primaps::kIsaAvx2) return NAME##_avx2(std::forward<A>(a)...);                         \
    BODY(std::forward<A>(a)...);                                                                       \
  }
#define PRIMAPS_SIMD_FUNCTION(NAME, BODY)                                                              \
  PRIMAPS_SIMD_VARIANT(NAME##_avx512, "avx512f", BODY)                                                 \
  PRIMAPS_SIMD_VARIANT(NAME##_avx2, "avx2", BODY)                                                      \
  PRIMAPS_SIMD_DISPATCH(NAME, BODY, NAME##_avx512)
#define PRIMAPS_SIMD_FUNCTION_VL(NAME, BODY)                                                           \
  PRIMAPS_SIMD_VARIANT(NAME##_avx512vl, "avx512f,avx512vl,avx512bw,avx512dq", BODY)                   \
  PRIMAPS_SIMD_VARIANT(NAME##_avx2, "avx2", BODY)                                                      \
  template <typename... A>                                                                             \
  void NAME##_avx512(A&&... a) {                                                                       \
    if (primaps::has_avx512vl()) return NAME##_avx512vl(std::forward<A>(a)...);                        \
    NAME##_avx2(std::forward<A>(a)...);                                                                \
  }                                                                                                    \
  PRIMAPS_SIMD_DISPATCH(NAME, BODY, NAME##_avx512)
#else
#define PRIMAPS_SIMD_FUNCTION(NAME, BODY)                                                              \
  template <typename... A>                                                                             \
  void NAME(A&&... a) {                                                                                \
    BODY(std::forward<A>(a)...);                                                                       \
  }
#define PRIMAPS_SIMD_FUNCTION_VL(NAME, BODY) PRIMAPS_SIMD_FUNCTION(NAME, BODY)
#endif
#endif  // __CUDACC__

// Each csrc/<op>.cpp registers its bindings with a static Registrar, so adding an op never
// touches a shared file:  static primaps::Registrar reg([](py::module_& m) { m.def(...); });
using RegisterFn = void (*)(py::module_&);
inline std::vector<RegisterFn>& registry() {
  static std::vector<RegisterFn> fns;
  return fns;
}
struct Registrar {
  explicit Registrar(RegisterFn fn) { registry().push_back(fn); }
};

}  // namespace primaps
