// The CUDA module, primaps_fast._C_cuda: collects the bindings every csrc/cuda/<op>.cu registers (as
// csrc/module.cpp does for the CPU). Importing it needs no GPU: nothing here touches the device.
#include "common.cuh"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "primaps_fast CUDA kernels: device pointers, sizes, device index and stream from Python.";
  for (auto fn : primaps::registry()) fn(m);
}
