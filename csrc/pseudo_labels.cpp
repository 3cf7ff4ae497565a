// PriMaPs pseudo-label post-processing (official PriMaPs._get_pseudo after the proposal loop):
// 3x3 median filter (reflect padding, median3x3.h) of every proposal, x10 and clamp to [0, 1], the
// background mask clamp(mean(non-zero values) - sum of masks, 0, 1) stacked first, log_softmax over masks, bilinear
// upsampling (align_corners=False) to the image size and either the arg-max (crf=False) or the softmax
// probabilities the dense CRF starts from. One image per thread, GIL released.
//
// Rounding follows PyTorch's CPU kernels where it decides ties: the bilinear weights and the order of
// the products are those of ATen's upsample_bilinear2d (bilinear.h: row interpolation first, then the
// two rows), so equal low-resolution logits give bit-identical upsampled values and the same first-max
// arg-max (argmax.h). The CUDA kernel shares these rules.
#include <cmath>
#include <limits>

#include "argmax.h"
#include "bilinear.h"
#include "common.h"
#include "mask_logits.h"
#include "median3x3.h"

// No FMA contraction in this file's plain loops: a vectorised loop body and its scalar tail must round
// alike, or identical features at different pixels would get different cosines (and ties would break
// by position). The explicit FMA intrinsics are unaffected.
#pragma GCC optimize("fp-contract=off")

namespace {

// Log-probabilities (m + 1, h, w) of one image from its m raw proposals (m, h, w): median filter, x10,
// clamp, background first, log_softmax over masks (mask_logits.h). m == 0 gives a single all-zero
// background channel.
void mask_logits(const float* props, int64_t m, int64_t h, int64_t w, float* logits) {
  const int64_t n = h * w;
  std::vector<float> scratch(3 * w);
  float* fg = logits + n;  // masks 1..m
  double nz_sum = 0.0;
  int64_t nz_count = 0;
  for (int64_t i = 0; i < m; ++i) {
    float* o = fg + i * n;
    primaps::median3x3(props + i * n, o, h, w, scratch.data(), scratch.data() + w, scratch.data() + 2 * w);
    for (int64_t p = 0; p < n; ++p) {
      const float v = primaps::mask_gain(o[p]);
      o[p] = v;
      if (v != 0.0f) nz_sum += v, ++nz_count;
    }
  }
  // mean of the non-zero filtered values (0 when there is none; the official gives NaN)
  const float level = nz_count ? static_cast<float>(nz_sum / static_cast<double>(nz_count)) : 0.0f;
  float* bg = logits;
  for (int64_t p = 0; p < n; ++p) {
    float s = 0.0f;
    for (int64_t i = 0; i < m; ++i) s += fg[i * n + p];
    bg[p] = primaps::background(level, s);
  }
  for (int64_t p = 0; p < n; ++p) primaps::log_softmax_strided(logits + p, m + 1, n);
}

// One output row y of channel `src` (h, w) upsampled to width W into row (W floats).
inline void upsample_row(const float* src, int64_t w, const primaps::Axis& ay, const primaps::Axis& ax,
                         int64_t y, int64_t W, float* row) {
  const float* s0 = src + ay.i0[y] * w;
  const float* s1 = src + ay.i1[y] * w;
  const float wy0 = ay.l0[y], wy1 = ay.l1[y];
  for (int64_t x = 0; x < W; ++x) {
    const int64_t a = ax.i0[x], b = ax.i1[x];
    row[x] = primaps::lerp(wy0, primaps::lerp(ax.l0[x], s0[a], ax.l1[x], s0[b]), wy1,
                           primaps::lerp(ax.l0[x], s1[a], ax.l1[x], s1[b]));
  }
}

void check_post_args(const primaps::FloatArray& masks, const primaps::Int64Array& counts) {
  primaps::check_ndim(masks, 4, "masks");
  primaps::check_ndim(counts, 1, "counts");
  if (counts.shape(0) != masks.shape(0)) throw std::invalid_argument("counts: expected shape (B,)");
  if (masks.shape(2) < 1 || masks.shape(3) < 1)
    throw std::invalid_argument("masks: empty spatial size");
  const int64_t* cnt = counts.data();
  for (int64_t b = 0; b < counts.shape(0); ++b)
    if (cnt[b] < 0 || cnt[b] > masks.shape(1))
      throw std::invalid_argument("counts: values must be in [0, M]");
}

// crf=False: labels (B, H, W) = arg-max over masks (first maximum) of the upsampled log-probabilities,
// with id 0 (background) replaced by ignore_index.
void mask_labels_cpu(primaps::FloatArray masks, primaps::Int64Array counts, primaps::Int64Array labels,
                     int64_t ignore_index, int threads) {
  check_post_args(masks, counts);
  primaps::check_ndim(labels, 3, "labels");
  const int64_t B = masks.shape(0), M = masks.shape(1), h = masks.shape(2), w = masks.shape(3);
  const int64_t H = labels.shape(1), W = labels.shape(2);
  if (labels.shape(0) != B || H < 1 || W < 1) throw std::invalid_argument("labels: bad shape");
  const float* in = masks.data();
  const int64_t* cnt = counts.data();
  int64_t* out = labels.mutable_data();
  py::gil_scoped_release release;
  const primaps::Axis ay(h, H), ax(w, W);
  primaps::parallel_for(B, threads, [&](int64_t b) {
    const int64_t L = cnt[b] + 1, n = h * w;
    std::vector<float> logits(L * n), row(W), best(W);
    mask_logits(in + b * M * n, cnt[b], h, w, logits.data());
    for (int64_t y = 0; y < H; ++y) {
      int64_t* o = out + (b * H + y) * W;
      upsample_row(logits.data(), w, ay, ax, y, W, best.data());
      std::fill(o, o + W, int64_t{0});
      for (int64_t l = 1; l < L; ++l) {
        upsample_row(logits.data() + l * n, w, ay, ax, y, W, row.data());
        for (int64_t x = 0; x < W; ++x) primaps::keep_first_max(row[x], l, best[x], o[x]);
      }
      for (int64_t x = 0; x < W; ++x)
        if (o[x] == 0) o[x] = ignore_index;
    }
  });
}

// crf=True: probs (B, M + 1, H, W) = softmax over masks of the upsampled log-probabilities, the
// unary the dense CRF starts from; channels >= counts[b] + 1 are zero.
void mask_probs_cpu(primaps::FloatArray masks, primaps::Int64Array counts, primaps::FloatArray probs,
                    int threads) {
  check_post_args(masks, counts);
  primaps::check_ndim(probs, 4, "probs");
  const int64_t B = masks.shape(0), M = masks.shape(1), h = masks.shape(2), w = masks.shape(3);
  const int64_t H = probs.shape(2), W = probs.shape(3);
  if (probs.shape(0) != B || probs.shape(1) != M + 1 || H < 1 || W < 1)
    throw std::invalid_argument("probs: expected shape (B, M + 1, H, W)");
  const float* in = masks.data();
  const int64_t* cnt = counts.data();
  float* out = probs.mutable_data();
  py::gil_scoped_release release;
  const primaps::Axis ay(h, H), ax(w, W);
  primaps::parallel_for(B, threads, [&](int64_t b) {
    const int64_t L = cnt[b] + 1, n = h * w, HW = H * W;
    std::vector<float> logits(L * n), mx(W), sum(W);
    mask_logits(in + b * M * n, cnt[b], h, w, logits.data());
    float* ob = out + b * (M + 1) * HW;
    std::fill(ob + L * HW, ob + (M + 1) * HW, 0.0f);
    for (int64_t y = 0; y < H; ++y) {
      for (int64_t l = 0; l < L; ++l)
        upsample_row(logits.data() + l * n, w, ay, ax, y, W, ob + l * HW + y * W);
      std::copy(ob + y * W, ob + y * W + W, mx.begin());
      for (int64_t l = 1; l < L; ++l) {
        const float* r = ob + l * HW + y * W;
        for (int64_t x = 0; x < W; ++x) mx[x] = std::max(mx[x], r[x]);
      }
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t l = 0; l < L; ++l) {
        float* r = ob + l * HW + y * W;
        for (int64_t x = 0; x < W; ++x) {
          r[x] = std::exp(r[x] - mx[x]);
          sum[x] += r[x];
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        float* r = ob + l * HW + y * W;
        for (int64_t x = 0; x < W; ++x) r[x] = r[x] / sum[x];
      }
    }
  });
}

static primaps::Registrar registrar([](py::module_& m) {
  m.def("mask_labels", &mask_labels_cpu, py::arg("masks"), py::arg("counts"), py::arg("labels"),
        py::arg("ignore_index"), py::arg("threads"),
        "PriMaPs post-processing without CRF: (B, M, h, w) proposals -> (B, H, W) int64 mask ids.");
  m.def("mask_probs", &mask_probs_cpu, py::arg("masks"), py::arg("counts"), py::arg("probs"),
        py::arg("threads"),
        "PriMaPs post-processing up to the CRF: (B, M, h, w) proposals -> (B, M + 1, H, W) softmax "
        "probabilities of the upsampled log-probabilities (background first).");
});

}  // namespace
