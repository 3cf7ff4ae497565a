// E-step of PriMaPs-EM: majority class of every pseudo mask under the argmax of the bilinearly
// upsampled class scores, without materialising the (B, K, H, W) upsampled scores.
//
// Upsampling follows PyTorch's bilinear, align_corners=False (taps and order of the products in
// bilinear.h, shared with the CUDA kernel): width inside, height outside, no FMA. PyTorch's own kernel
// may contract some of these into FMAs depending on the CPU, so the argmax agrees with
// F.interpolate(...).argmax(1) except at pixels whose top two scores tie to float32 rounding. Ties:
// argmax.h (the first class of the pixel's maximum, the smallest class of the mask's majority). Classes
// that fall short of another over a whole source cell by a margin above float32 rounding are not
// upsampled at its pixels (cell_candidates): in smooth score maps ~3 of 27 classes are left per cell.
// The per-image pass is compiled for SSE2, AVX2 and AVX-512F, the best run (common.h): the same labels.
#include "common.h"

#include <algorithm>
#include <cmath>

#include "argmax.h"
#include "bilinear.h"
#include "vectors.h"

namespace {

using namespace primaps;

// The classes that can win a pixel of each source cell (a, b), in increasing order: for an image L
// (K, h, w), cell c's classes are cls[start[c] .. start[c + 1]). A pixel whose taps are rows {a, a + 1} and
// columns {b, b + 1} (clamped) upsamples each class to a convex combination of its four corners, computed
// with two rounded lerps: within ~7 float32 ulps of the largest corner magnitude of the corners' range. A
// class whose largest corner is below the largest smallest corner (of any class) by more than 2^-19 (32
// ulps) of the cell's largest magnitude is below that class at every pixel of the cell, so it is never
// the pixel's first maximum and is left out. In smooth score maps a cell keeps ~3 of 27 classes, and
// often one: then its pixels are not upsampled at all.
PRIMAPS_ALWAYS_INLINE void cell_candidates(const float* L, int64_t K, int64_t h, int64_t w,
                                           std::vector<int32_t>& start, std::vector<int32_t>& cls) {
  constexpr float kMargin = 1.0f / (1 << 19);
  std::vector<float> his(static_cast<size_t>(K));
  start.assign(1, 0);
  cls.clear();
  for (int64_t a = 0; a < h; ++a)
    for (int64_t b = 0; b < w; ++b) {
      const int64_t a1 = a + 1 < h ? a + 1 : a, b1 = b + 1 < w ? b + 1 : b;
      float top_lo = -INFINITY, magnitude = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float* P = L + k * h * w;
        const float c0 = P[a * w + b], c1 = P[a * w + b1], c2 = P[a1 * w + b], c3 = P[a1 * w + b1];
        const float lo = std::min(std::min(c0, c1), std::min(c2, c3));
        const float hi = std::max(std::max(c0, c1), std::max(c2, c3));
        magnitude = std::max(magnitude, std::max(std::fabs(lo), std::fabs(hi)));
        top_lo = std::max(top_lo, lo);
        his[k] = hi;
      }
      const float floor = top_lo - (kMargin * magnitude + 1e-30f);
      for (int64_t k = 0; k < K; ++k)
        if (his[k] >= floor) cls.push_back(static_cast<int32_t>(k));
      start.push_back(static_cast<int32_t>(cls.size()));
    }
}

// One image: logits L (K, h, w), mask ids mb (H, W) -> ob (H, W) the majority class of each id's pixels.
// The vote and the output go by runs of equal ids (and classes).
PRIMAPS_ALWAYS_INLINE void image_body(const float* L, const int64_t* mb, int64_t* ob, int64_t num_ids,
                                      int64_t ignore_index, int64_t K, int64_t h, int64_t w, const Axis& ay,
                                      const Axis& ax, int64_t H, int64_t W) {
  std::vector<float> xs;
  width_pass(L, K, h, w, ax, W, xs);
  std::vector<int32_t> start, cls;
  cell_candidates(L, K, h, w, start, cls);
  // Mask ids present in this image get a dense slot; slot -> K-class histogram.
  std::vector<int32_t> slot(static_cast<size_t>(num_ids), -1);
  std::vector<int64_t> hist;
  // Each pixel's argmax: in a cell with at most K / 4 candidates over those only, 8 lanes at a time and
  // whole vectors stored (a cell's spill past its pixels is rewritten by the cells after it; `best` has 8
  // floats of slack); along a run of cells with more, over every class, vectorised along the whole run.
  const int64_t sparse = std::max<int64_t>(1, K / 4);
  std::vector<float> best_v(static_cast<size_t>(W));
  std::vector<float> best(static_cast<size_t>(W + 8));  // class id as float (exact below 2^24), so the
                                                        // selects stay float and the loops vectorise
  for (int64_t y = 0; y < H; ++y) {
    const int32_t* cs = start.data() + ay.i0[y] * w;
    const float hy0 = ay.l0[y], hy1 = ay.l1[y];
    const float* r0 = xs.data() + ay.i0[y] * K * W;
    const float* r1 = xs.data() + ay.i1[y] * K * W;
    auto dense = [&](int64_t x) { return cs[ax.i0[x] + 1] - cs[ax.i0[x]] > sparse; };
    for (int64_t x0 = 0; x0 < W;) {
      int64_t x1 = x0 + 1;
      if (dense(x0)) {  // the pixels [x0, x1) of a run of dense cells
        while (x1 < W && dense(x1)) ++x1;
        float* __restrict bv = best_v.data() + x0;
        float* __restrict bi = best.data() + x0;
        const int64_t n = x1 - x0;
        for (int64_t k = 0; k < K; ++k) {
          const float* __restrict p = r0 + k * W + x0;
          const float* __restrict q = r1 + k * W + x0;
          const float kk = static_cast<float>(k);
          if (k == 0)
            for (int64_t x = 0; x < n; ++x) bv[x] = lerp(hy0, p[x], hy1, q[x]), bi[x] = 0.f;
          else
            for (int64_t x = 0; x < n; ++x) keep_first_max(lerp(hy0, p[x], hy1, q[x]), kk, bv[x], bi[x]);
        }
      } else {  // the pixels [x0, x1) of source column b
        const int64_t b = ax.i0[x0];
        while (x1 < W && ax.i0[x1] == b) ++x1;
        const int32_t* c = cls.data() + cs[b];
        const int64_t nc = cs[b + 1] - cs[b];
        auto up = [&](int64_t k, int64_t x) {  // lerp's products and sum, lane by lane
          return hy0 * load8(r0 + k * W + x) + hy1 * load8(r1 + k * W + x);
        };
        for (int64_t x = x0; x < x1; x += 8) {
          f32x8 bi = f32x8{} + static_cast<float>(c[0]);
          if (nc > 1) {
            f32x8 bv = up(c[0], x);
            for (int64_t j = 1; j < nc; ++j) {
              const f32x8 u = up(c[j], x);
              const i32x8 take = u > bv;  // the first maximum: only a larger value takes over
              bi = select(take, f32x8{} + static_cast<float>(c[j]), bi);
              bv = select(take, u, bv);
            }
          }
          store8(best.data() + x, bi);
        }
      }
      x0 = x1;
    }
    const int64_t* row = mb + y * W;
    for (int64_t x0 = 0; x0 < W;) {
      const int64_t id = row[x0];
      const float k = best[x0];
      int64_t x1 = x0 + 1;
      while (x1 < W && row[x1] == id && best[x1] == k) ++x1;
      if (id != ignore_index) {
        if (id < 0 || id >= num_ids)  // before any pixel of the image is written: never past the table
          throw std::invalid_argument("mask_ids: id out of range [0, num_ids)");
        int32_t& s = slot[static_cast<size_t>(id)];
        if (s < 0) {
          s = static_cast<int32_t>(hist.size() / K);
          hist.resize(hist.size() + K, 0);
        }
        hist[static_cast<size_t>(s) * K + static_cast<int64_t>(k)] += x1 - x0;
      }
      x0 = x1;
    }
  }
  // Majority per slot, the first (smallest) class on ties.
  std::vector<int64_t> winner(hist.size() / K);
  for (size_t s = 0; s < winner.size(); ++s) winner[s] = first_argmax(hist.data() + s * K, K);
  for (int64_t i = 0; i < H * W;) {
    const int64_t id = mb[i];
    const int64_t v = id == ignore_index ? ignore_index : winner[static_cast<size_t>(slot[static_cast<size_t>(id)])];
    int64_t j = i;
    do ob[j++] = v;
    while (j < H * W && mb[j] == id);
    i = j;
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
