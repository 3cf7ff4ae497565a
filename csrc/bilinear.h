// Bilinear resampling with PyTorch's align_corners=False rule, shared by every kernel that fuses the
// upsampling of low-resolution scores (E-step, focal loss, pseudo-label post-processing) on the CPU
// (csrc/*.cpp) and on the GPU (csrc/cuda/*.cu): one copy of the taps and of the order of the products,
// so that equal inputs give bit-identical upsampled values on both.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "host_device.h"

namespace primaps {

// in / out rounded to float32, as ATen's area_pixel_compute_scale.
PRIMAPS_HD float source_scale(int64_t in, int64_t out) {
  return div_rn(static_cast<float>(in), static_cast<float>(out));
}

// Source taps of one output index: value = l0 * v[i0] + l1 * v[i1].
struct Taps {
  int64_t i0, i1;
  float l0, l1;
};

// ATen's area_pixel_compute_source_index and guard_index_and_lambda: src = scale * (d + 0.5) - 0.5
// clamped at 0, i0 = floor(src) (at most in - 1), i1 = i0 + 1 except on the last index, l1 = src - i0
// in [0, 1]. Equal sizes take ATen's copy path (i1 = i0, l1 = 0).
PRIMAPS_HD Taps bilinear_taps(int64_t d, int64_t in, int64_t out, float scale) {
  Taps t;
  if (in == out) {
    t.i0 = t.i1 = d;
    t.l0 = 1.0f;
    t.l1 = 0.0f;
    return t;
  }
  float src = add_rn(mul_rn(scale, add_rn(static_cast<float>(d), 0.5f)), -0.5f);
  if (src < 0.0f) src = 0.0f;
  t.i0 = min_hd(static_cast<int64_t>(src), in - 1);  // truncation is floor: src >= 0
  t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  t.l1 = min_hd(max_hd(src - static_cast<float>(t.i0), 0.0f), 1.0f);
  t.l0 = 1.0f - t.l1;
  return t;
}

// l0 * a + l1 * b with each product rounded (no FMA): one axis of the interpolation.
PRIMAPS_HD float lerp(float l0, float a, float l1, float b) { return add_rn(mul_rn(l0, a), mul_rn(l1, b)); }

// The upsampled value at one output pixel of an (h, w) plane in ATen's order: along the rows of the two
// source rows first, then between them.
PRIMAPS_HD float bilinear(const float* plane, int64_t w, const Taps& ty, const Taps& tx) {
  const float* r0 = plane + ty.i0 * w;
  const float* r1 = plane + ty.i1 * w;
  return lerp(ty.l0, lerp(tx.l0, r0[tx.i0], tx.l1, r0[tx.i1]), ty.l1, lerp(tx.l0, r1[tx.i0], tx.l1, r1[tx.i1]));
}

// Host: the taps of every output index along one axis, computed once per call.
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
  Axis(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out) {
    const float scale = source_scale(in, out);
    for (int64_t d = 0; d < out; ++d) {
      const Taps t = bilinear_taps(d, in, out, scale);
      i0[d] = t.i0, i1[d] = t.i1, l0[d] = t.l0, l1[d] = t.l1;
    }
  }
};

// The output indices [0, n) of `ax` in runs that share their taps i0 (hence i1): the first index of
// each run, then n. Along the width of an upsampling these are the output columns of one source cell.
inline std::vector<int64_t> tap_runs(const Axis& ax, int64_t n) {
  std::vector<int64_t> first;
  for (int64_t d = 0; d < n; ++d)
    if (d == 0 || ax.i0[d] != ax.i0[d - 1]) first.push_back(d);
  first.push_back(n);
  return first;
}

}  // namespace primaps
