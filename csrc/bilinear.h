// Bilinear upsampling taps with PyTorch's align_corners=False rule, shared by the kernels that fuse
// the upsampling of class scores (E-step, focal loss) instead of materialising (B, K, H, W).
#pragma once

#include <cstdint>
#include <vector>

namespace primaps {

struct Axis {  // source taps of every output index along one axis
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
};

inline Axis make_axis(int64_t in, int64_t out) {
  Axis a;
  a.i0.resize(out); a.i1.resize(out); a.l0.resize(out); a.l1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    float src = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    int64_t i0 = static_cast<int64_t>(src);
    if (i0 > in - 1) i0 = in - 1;
    const int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
    const float l1 = src - static_cast<float>(i0);
    a.i0[d] = i0; a.i1[d] = i1; a.l1[d] = l1; a.l0[d] = 1.f - l1;
  }
  return a;
}

// xs[(ys * K + k) * W + x] = w0 * L[k, ys, x0] + w1 * L[k, ys, x1]: the width pass for one image.
inline void width_pass(const float* L, int64_t K, int64_t h, int64_t w, const Axis& ax, int64_t W,
                std::vector<float>& xs) {
  xs.resize(static_cast<size_t>(h * K * W));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t ys = 0; ys < h; ++ys) {
      const float* row = L + (k * h + ys) * w;
      float* dst = xs.data() + (ys * K + k) * W;
      for (int64_t x = 0; x < W; ++x) {
        const float a = ax.l0[x] * row[ax.i0[x]];
        const float b = ax.l1[x] * row[ax.i1[x]];
        dst[x] = a + b;
      }
    }
}

}  // namespace primaps
