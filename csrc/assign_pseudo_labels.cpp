// E-step of PriMaPs-EM: majority class of every pseudo mask under the argmax of the bilinearly
// upsampled class scores, without materialising the (B, K, H, W) upsampled scores.
//
// Upsampling follows PyTorch's bilinear, align_corners=False (taps and order of the products in
// bilinear.h, shared with the CUDA kernel): width inside, height outside, no FMA. PyTorch's own kernel
// may contract some of these into FMAs depending on the CPU, so the argmax agrees with
// F.interpolate(...).argmax(1) except at pixels whose top two scores tie to float32 rounding. Ties:
// argmax.h (the first class of the pixel's maximum, the smallest class of the mask's majority). The
// per-image pass is compiled for SSE2, AVX2 and AVX-512F, the best run (common.h): the same labels.
#include "common.h"

#include <cmath>

#include "argmax.h"
#include "bilinear.h"

namespace {

using namespace primaps;

// One image: logits L (K, h, w), mask ids mb (H, W) -> ob (H, W) the majority class of each id's pixels.
PRIMAPS_ALWAYS_INLINE void image_body(const float* L, const int64_t* mb, int64_t* ob, int64_t num_ids,
                                      int64_t ignore_index, int64_t K, int64_t h, int64_t w, const Axis& ay,
                                      const Axis& ax, int64_t H, int64_t W) {
  // The image's ids are checked before any of its pixels is written: never index past the table.
  for (int64_t i = 0; i < H * W; ++i)
    if (mb[i] != ignore_index && (mb[i] < 0 || mb[i] >= num_ids))
      throw std::invalid_argument("mask_ids: id out of range [0, num_ids)");
  std::vector<float> xs;
  width_pass(L, K, h, w, ax, W, xs);
  // Mask ids present in this image get a dense slot; slot -> K-class histogram.
  std::vector<int32_t> slot(static_cast<size_t>(num_ids), -1);
  std::vector<int64_t> hist;
  std::vector<float> best_v(static_cast<size_t>(W));
  std::vector<float> best(static_cast<size_t>(W));  // class id as float (exact below 2^24), so the
                                                    // selects stay float and the loop vectorises
  for (int64_t y = 0; y < H; ++y) {
    // Argmax over classes of the upsampled row, vectorised along the row (first maximum wins).
    const float hy0 = ay.l0[y], hy1 = ay.l1[y];
    float* __restrict bv = best_v.data();
    float* __restrict bi = best.data();
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict a = xs.data() + (ay.i0[y] * K + k) * W;
      const float* __restrict c = xs.data() + (ay.i1[y] * K + k) * W;
      const float kk = static_cast<float>(k);
      if (k == 0) {
        for (int64_t x = 0; x < W; ++x) bv[x] = lerp(hy0, a[x], hy1, c[x]), bi[x] = 0.f;
        continue;
      }
      for (int64_t x = 0; x < W; ++x) keep_first_max(lerp(hy0, a[x], hy1, c[x]), kk, bv[x], bi[x]);
    }
    for (int64_t x = 0; x < W; ++x) {
      const int64_t id = mb[y * W + x];
      if (id == ignore_index) continue;
      int32_t& s = slot[static_cast<size_t>(id)];
      if (s < 0) {
        s = static_cast<int32_t>(hist.size() / K);
        hist.resize(hist.size() + K, 0);
      }
      ++hist[static_cast<size_t>(s) * K + static_cast<int64_t>(bi[x])];
    }
  }
  // Majority per slot, the first (smallest) class on ties.
  std::vector<int64_t> winner(hist.size() / K);
  for (size_t s = 0; s < winner.size(); ++s) winner[s] = first_argmax(hist.data() + s * K, K);
  for (int64_t i = 0; i < H * W; ++i) {
    const int64_t id = mb[i];
    ob[i] = id == ignore_index ? ignore_index : winner[static_cast<size_t>(slot[static_cast<size_t>(id)])];
  }
}
PRIMAPS_SIMD_FUNCTION(image, image_body)

void assign_pseudo_labels(FloatArray logits, Int64Array mask_ids, Int64Array out, int64_t num_ids,
                          int64_t ignore_index, int threads) {
  check_ndim(logits, 4, "logits");
  check_ndim(mask_ids, 3, "mask_ids");
  check_ndim(out, 3, "out");
  const int64_t B = logits.shape(0), K = logits.shape(1), h = logits.shape(2), w = logits.shape(3);
  const int64_t H = mask_ids.shape(1), W = mask_ids.shape(2);
  if (mask_ids.shape(0) != B || out.shape(0) != B || out.shape(1) != H || out.shape(2) != W)
    throw std::invalid_argument("mask_ids/out: shapes do not match logits");
  if (K >= (int64_t{1} << 24)) throw std::invalid_argument("logits: too many classes (>= 2^24)");
  if (K < 1 || h < 1 || w < 1 || H < 1 || W < 1 || num_ids < 1)
    throw std::invalid_argument("assign_pseudo_labels: empty input");
  const float* L = logits.data();
  const int64_t* M = mask_ids.data();
  int64_t* O = out.mutable_data();
  const Axis ay(h, H), ax(w, W);
  {
    py::gil_scoped_release release;
    parallel_for(B, threads, [&](int64_t b) {
      image(L + b * K * h * w, M + b * H * W, O + b * H * W, num_ids, ignore_index, K, h, w, ay, ax, H, W);
    });
  }
}

static Registrar reg([](py::module_& m) {
  m.def("assign_pseudo_labels", &assign_pseudo_labels, py::arg("logits"), py::arg("mask_ids"),
        py::arg("out"), py::arg("num_ids"), py::arg("ignore_index"), py::arg("threads"),
        "Majority class of the upsampled argmax per (image, mask id); ignore_index elsewhere.");
});

}  // namespace
