// PRIMAPS_HD marks maths shared by the C++ (csrc/*.cpp, g++) and CUDA (csrc/cuda/*.cu, nvcc) kernels:
// __host__ __device__ under nvcc, nothing under a host compiler, so one copy of each rule serves both
// and the CPU tests cover it.
#pragma once

#ifdef __CUDACC__
#define PRIMAPS_HD __host__ __device__ __forceinline__
#else
#define PRIMAPS_HD inline
#endif

namespace primaps {

// float32 products and sums rounded one at a time. nvcc contracts a * b + c into an FMA by default,
// which rounds once instead of twice; where the GPU must give the CPU's bits (upsampled scores whose
// arg-max decides labels) the device code uses the IEEE intrinsics, which are never contracted. The
// host side is plain arithmetic (the x86-64 baseline has no FMA; pseudo_labels.cpp turns contraction
// off for the hosts that have one).
#ifdef __CUDA_ARCH__
PRIMAPS_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
PRIMAPS_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
PRIMAPS_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
#else
PRIMAPS_HD float mul_rn(float a, float b) { return a * b; }
PRIMAPS_HD float add_rn(float a, float b) { return a + b; }
PRIMAPS_HD float div_rn(float a, float b) { return a / b; }
#endif

// std::min / std::max semantics (the first argument on ties, so -0.0 and +0.0 keep their order),
// usable on the device.
template <typename T>
PRIMAPS_HD T min_hd(T a, T b) { return b < a ? b : a; }
template <typename T>
PRIMAPS_HD T max_hd(T a, T b) { return a < b ? b : a; }

}  // namespace primaps
