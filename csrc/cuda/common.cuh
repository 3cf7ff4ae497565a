// Shared by the CUDA kernels (csrc/cuda/<op>.cu, module primaps_fast._C_cuda): launches, errors and
// block reductions. Kernels take device pointers as integers (tensor.data_ptr()), sizes, the device
// index and the CUDA stream handle (torch.cuda.current_stream().cuda_stream) from Python, which
// allocates every output and workspace with torch; so the build needs no torch headers. This module
// links its own (static) CUDA runtime: it selects the tensors' device itself on every call.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common.h"

namespace primaps {
namespace gpu {

using Ptr = uintptr_t;  // a device address from Python

template <typename T>
T* ptr(Ptr p) {
  return reinterpret_cast<T*>(p);
}

// A CUDA error as a RuntimeError naming the kernel: "primaps_fast CUDA <what>: <CUDA's message>".
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("primaps_fast CUDA ") + what + ": " + cudaGetErrorString(err) +
                             " (" + cudaGetErrorName(err) + ")");
}

// A ValueError naming the argument.
inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Makes `device` current for this thread and returns the caller's stream.
inline cudaStream_t prepare(int device, Ptr stream, const char* what) {
  require(device >= 0, std::string(what) + ": device index must be >= 0");
  check(cudaSetDevice(device), what);
  return reinterpret_cast<cudaStream_t>(stream);
}

// Dynamic shared memory near or above the default 48 KiB per block (which also holds the kernel's static
// shared memory, at most kStaticShared bytes here) needs an opt-in per kernel, up to the device's limit.
constexpr size_t kStaticShared = 1024;

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, int device, const char* what, const char* why) {
  if (bytes + kStaticShared <= 48 * 1024) return;
  int limit = 0;
  check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), what);
  require(bytes + kStaticShared <= static_cast<size_t>(limit),
          std::string(what) + ": " + why + " needs " + std::to_string(bytes) + " bytes of shared memory, " +
              "this GPU has " + std::to_string(limit) + " per block");
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        what);
}

// Launches kernel on stream and reports a bad launch at once; a fault inside the kernel surfaces at the
// next synchronising call, as for torch's own kernels. Empty grids launch nothing.
template <typename... Params, typename... Args>
void launch(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
            cudaStream_t stream, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
  check(cudaGetLastError(), what);
}

// Blocks for n items with `threads` threads a block, for grid-stride loops (a 1-D grid stays far
// below its 2^31 - 1 limit; beyond 2^20 blocks each thread takes several items).
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

// The block's dynamic shared memory (the launch's smem bytes), as T.
template <typename T>
__device__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return reinterpret_cast<T*>(dynamic_shared_bytes);
}

constexpr int kWarp = 32;

// Sum over the block of every thread's v, in a fixed order (warp shuffles, then the warp sums in warp
// order), so the result is the same on every run. Every thread of the block must call it; all get the
// sum. scratch: kWarp values of shared memory. blockDim.x must be a multiple of 32.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
  for (int i = 1; i < warps; ++i) total += scratch[i];
  return total;
}

}  // namespace gpu
}  // namespace primaps
