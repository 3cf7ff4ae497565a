// The class weights of the official FocalLoss: w_k = (1 - mean over all pixels of softmax(up)_k) ** gamma,
// detached. Shared by the C++ op (via focal_class_weights) and the CUDA kernel.
#pragma once

#include <cmath>

#include "host_device.h"

namespace primaps {

// From the float64 sum of class k's softmax over all num_pixels pixels, in float32 as the official code
// (a float32 mean, then pow). gamma == 2 (the default) is a product, as torch's pow does it, so the
// CPU, the GPU and torch agree bit for bit there; other exponents go through powf.
PRIMAPS_HD float focal_class_weight(double prob_sum, double num_pixels, float gamma) {
  const float base = 1.0f - static_cast<float>(prob_sum / num_pixels);
  return gamma == 2.0f ? mul_rn(base, base) : powf(base, gamma);
}

}  // namespace primaps
