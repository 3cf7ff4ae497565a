// The 3x3 median with reflect padding (official MedianPool2d(3, 1, 1)), shared by the median_filter op
// and the fused post-processing of pseudo_labels, on the CPU (median3x3 below) and the GPU (one pixel
// per thread: column_triple and median_of_columns).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace primaps {

// Exact median of 9 values arranged as three triples: with (lo, md, hi) of each triple, the median is
// med3(max(lo...), med3(md...), min(hi...)) (sorting the triples, then the columns of the 3x3 table,
// puts the median at the centre of the anti-diagonal).
PRIMAPS_HD float med3(float a, float b, float c) { return max_hd(min_hd(a, b), min_hd(max_hd(a, b), c)); }

PRIMAPS_HD int64_t reflect(int64_t i, int64_t n) {
  if (n == 1) return 0;  // a 1-pixel axis cannot be reflected: the pixel itself (replicate)
  if (i < 0) return -i;
  if (i >= n) return 2 * n - 2 - i;
  return i;
}

struct Triple {
  float lo, md, hi;
};

// The sorted vertical triple (rows y - 1, y, y + 1) of one column.
PRIMAPS_HD Triple column_triple(float a, float b, float c) {
  return {min_hd(min_hd(a, b), c), med3(a, b, c), max_hd(max_hd(a, b), c)};
}

// The median of the 3x3 window from the triples of its left, centre and right columns.
PRIMAPS_HD float median_of_columns(const Triple& l, const Triple& x, const Triple& r) {
  const float mx_lo = max_hd(max_hd(l.lo, x.lo), r.lo);
  const float mn_hi = min_hd(min_hd(l.hi, x.hi), r.hi);
  return med3(mx_lo, med3(l.md, x.md, r.md), mn_hi);
}

// out (h, w) = 3x3 median of in (h, w), reflect padding; scratch lo/md/hi of w floats each (the column
// triples of a row are computed once and shared by the three windows that use them).
inline void median3x3(const float* in, float* out, int64_t h, int64_t w, float* lo, float* md, float* hi) {
  for (int64_t y = 0; y < h; ++y) {
    const float* r0 = in + reflect(y - 1, h) * w;
    const float* r1 = in + y * w;
    const float* r2 = in + reflect(y + 1, h) * w;
    for (int64_t x = 0; x < w; ++x) {  // sort every vertical triple
      const Triple t = column_triple(r0[x], r1[x], r2[x]);
      lo[x] = t.lo, md[x] = t.md, hi[x] = t.hi;
    }
    float* o = out + y * w;
    auto combine = [&](int64_t x, int64_t l, int64_t r) {
      o[x] = median_of_columns({lo[l], md[l], hi[l]}, {lo[x], md[x], hi[x]}, {lo[r], md[r], hi[r]});
    };
    combine(0, reflect(-1, w), reflect(1, w));
    for (int64_t x = 1; x < w - 1; ++x) combine(x, x - 1, x + 1);  // branch-free: vectorised
    if (w > 1) combine(w - 1, reflect(w - 2, w), reflect(w, w));
  }
}

}  // namespace primaps
