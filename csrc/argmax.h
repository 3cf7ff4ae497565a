// The tie rule of every arg-max of the pipeline (the class of a pixel, the mask of a pixel, the majority
// vote of a mask): the first maximum wins, i.e. the smallest index among equal values, as torch.argmax
// (and torch.mode on the CPU, which the official E-step uses).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace primaps {

// Running arg-max over indices visited in increasing order: only a strictly larger value takes over.
// Written as two selects so that a loop over pixels vectorises.
template <typename T, typename I>
PRIMAPS_HD void keep_first_max(T v, I i, T& best, I& best_i) {
  const bool take = v > best;
  best_i = take ? i : best_i;
  best = take ? v : best;
}

// Index of the first maximum of v[0..n), n >= 1 (a histogram of votes).
template <typename T>
PRIMAPS_HD int64_t first_argmax(const T* v, int64_t n) {
  int64_t best = 0;
  for (int64_t k = 1; k < n; ++k)
    if (v[k] > v[best]) best = k;
  return best;
}

}  // namespace primaps
