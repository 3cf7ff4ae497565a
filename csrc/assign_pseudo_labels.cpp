// E-step of PriMaPs-EM: majority class of every pseudo mask under the argmax of the bilinearly
// upsampled class scores, without materialising the (B, K, H, W) upsampled scores.
//
// Upsampling follows PyTorch's bilinear, align_corners=False: src = scale * (dst + 0.5) - 0.5 clamped
// at 0 (scale = in / out in float), i0 = floor(src), i1 = i0 + 1 unless at the last row/column, and
// the value h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d) (width inside, height outside, no FMA).
// PyTorch's own kernel may contract some of these into FMAs depending on the CPU, so the argmax agrees
// with F.interpolate(...).argmax(1) except at pixels whose top two scores tie to float32 rounding.
#include "common.h"

#include <cmath>

#include "bilinear.h"

namespace {

using namespace primaps;

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
  // Ids are checked before any pixel is written: never index past the table.
  for (int64_t i = 0, n = B * H * W; i < n; ++i)
    if (M[i] != ignore_index && (M[i] < 0 || M[i] >= num_ids))
      throw std::invalid_argument("mask_ids: id out of range [0, num_ids)");
  const Axis ay = make_axis(h, H), ax = make_axis(w, W);
  {
    py::gil_scoped_release release;
    parallel_for(B, threads, [&](int64_t b) {
      std::vector<float> xs;
      width_pass(L + b * K * h * w, K, h, w, ax, W, xs);
      // Mask ids present in this image get a dense slot; slot -> K-class histogram.
      std::vector<int32_t> slot(static_cast<size_t>(num_ids), -1);
      std::vector<int64_t> hist;
      const int64_t* mb = M + b * H * W;
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
            for (int64_t x = 0; x < W; ++x) {
              const float p = hy0 * a[x];
              const float q = hy1 * c[x];
              bv[x] = p + q;
              bi[x] = 0.f;
            }
            continue;
          }
          for (int64_t x = 0; x < W; ++x) {
            const float p = hy0 * a[x];
            const float q = hy1 * c[x];
            const float v = p + q;
            const float take = static_cast<float>(v > bv[x]);  // 1 or 0: exact blend of small ints
            bi[x] = bi[x] + take * (kk - bi[x]);
            bv[x] = v > bv[x] ? v : bv[x];
          }
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
      std::vector<int64_t> winner(hist.size() / (K ? K : 1));
      for (size_t s = 0; s < winner.size(); ++s) {
        const int64_t* hs = hist.data() + s * K;
        int64_t best = 0;
        for (int64_t k = 1; k < K; ++k)
          if (hs[k] > hs[best]) best = k;
        winner[s] = best;
      }
      int64_t* ob = O + b * H * W;
      for (int64_t i = 0; i < H * W; ++i) {
        const int64_t id = mb[i];
        ob[i] = id == ignore_index ? ignore_index : winner[static_cast<size_t>(slot[static_cast<size_t>(id)])];
      }
    });
  }
}

static Registrar reg([](py::module_& m) {
  m.def("assign_pseudo_labels", &assign_pseudo_labels, py::arg("logits"), py::arg("mask_ids"),
        py::arg("out"), py::arg("num_ids"), py::arg("ignore_index"), py::arg("threads"),
        "Majority class of the upsampled argmax per (image, mask id); ignore_index elsewhere.");
});

}  // namespace
