// PRIMAPS_HD marks maths shared by the C++ (csrc/*.cpp, g++) and CUDA (csrc/cuda/*.cu, nvcc) kernels:
// __host__ __device__ under nvcc, nothing under a host compiler, so one copy of each rule serves both
// and the CPU tests cover it.
#pragma once

#ifdef __CUDACC__
#define PRIMAPS_HD __host__ __device__ __forceinline__
#else
#define PRIMAPS_HD inline
#endif
