// Per-pixel rules of the official post-processing of PriMaPs proposals (PriMaPs._get_pseudo after the
// proposal loop), shared by csrc/pseudo_labels.cpp and its CUDA kernel: the x10 gain and clamp of every
// median-filtered proposal, the background clamp(level - sum of masks, 0, 1), and the log_softmax over
// the masks of one pixel.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace primaps {

// A median-filtered proposal value, x10 and clamped to [0, 1].
PRIMAPS_HD float mask_gain(float median) { return min_hd(max_hd(mul_rn(median, 10.0f), 0.0f), 1.0f); }

// Background of a pixel: level (mean of the image's non-zero gained values) minus the sum of its masks
// (added in mask order, as torch's sum(dim=0)), clamped to [0, 1].
PRIMAPS_HD float background(float level, float mask_sum) { return min_hd(max_hd(level - mask_sum, 0.0f), 1.0f); }

// v[l * stride] <- log_softmax over l < L of v[l * stride]: max, sum of exp in order, then v - max - log(sum).
PRIMAPS_HD void log_softmax_strided(float* v, int64_t L, int64_t stride) {
  float mx = v[0];
  for (int64_t l = 1; l < L; ++l) mx = max_hd(mx, v[l * stride]);
  float s = 0.0f;
  for (int64_t l = 0; l < L; ++l) s = add_rn(s, expf(v[l * stride] - mx));
  const float ls = logf(s);
  for (int64_t l = 0; l < L; ++l) v[l * stride] = v[l * stride] - mx - ls;
}

}  // namespace primaps
