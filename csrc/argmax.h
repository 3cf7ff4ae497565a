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

// The majority of a mask's votes v[0..n) (pixels per class): the first class with the most votes, the votes
// for class `ignore_class` not counted (the official loop drops the votes equal to its ignore label, which
// matters when that label is a class id), or -1 when no class has a vote.
template <typename T>
PRIMAPS_HD int64_t majority_class(const T* v, int64_t n, int64_t ignore_class) {
  int64_t best = -1;
  T most = 0;
  for (int64_t k = 0; k < n; ++k)
    if (k != ignore_class && v[k] > most) most = v[k], best = k;
  return best;
}

}  // namespace primaps
