// The 3x3 median with reflect padding (official MedianPool2d(3, 1, 1)), shared by the median_filter op
// and the fused post-processing of pseudo_labels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace primaps {

// Exact median of 9 values arranged as three triples: with (lo, md, hi) of each triple, the median is
// med3(max(lo...), med3(md...), min(hi...)) (sorting the triples, then the columns of the 3x3 table,
// puts the median at the centre of the anti-diagonal).
inline float med3(float a, float b, float c) {
  return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

inline int64_t reflect(int64_t i, int64_t n) {
  if (n == 1) return 0;  // a 1-pixel axis cannot be reflected: the pixel itself (replicate)
  if (i < 0) return -i;
  if (i >= n) return 2 * n - 2 - i;
  return i;
}

// out (h, w) = 3x3 median of in (h, w), reflect padding; scratch lo/md/hi of w floats each.
inline void median3x3(const float* in, float* out, int64_t h, int64_t w, float* lo, float* md, float* hi) {
  for (int64_t y = 0; y < h; ++y) {
    const float* r0 = in + reflect(y - 1, h) * w;
    const float* r1 = in + y * w;
    const float* r2 = in + reflect(y + 1, h) * w;
    for (int64_t x = 0; x < w; ++x) {  // sort every vertical triple
      const float a = r0[x], b = r1[x], c = r2[x];
      lo[x] = std::min(std::min(a, b), c);
      hi[x] = std::max(std::max(a, b), c);
      md[x] = med3(a, b, c);
    }
    float* o = out + y * w;
    auto combine = [&](int64_t x, int64_t l, int64_t r) {
      const float mx_lo = std::max(std::max(lo[l], lo[x]), lo[r]);
      const float mn_hi = std::min(std::min(hi[l], hi[x]), hi[r]);
      o[x] = med3(mx_lo, med3(md[l], md[x], md[r]), mn_hi);
    };
    combine(0, reflect(-1, w), reflect(1, w));
    for (int64_t x = 1; x < w - 1; ++x) combine(x, x - 1, x + 1);  // branch-free: vectorised
    if (w > 1) combine(w - 1, reflect(w - 2, w), reflect(w, w));
  }
}

}  // namespace primaps
