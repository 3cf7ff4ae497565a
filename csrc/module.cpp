// The one compiled module, primaps_fast._C: collects the bindings every csrc/<op>.cpp registers.
#include "common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "primaps_fast C++ kernels (CPU). Buffers are C-contiguous numpy views of torch tensors.";
  for (auto fn : primaps::registry()) fn(m);
}
