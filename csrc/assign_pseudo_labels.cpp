// E-step of PriMaPs-EM: majority class of every pseudo mask under the argmax of the bilinearly
// upsampled class scores, without materialising the (B, K, H, W) upsampled scores.
//
// Upsampling follows PyTorch's bilinear, align_corners=False (taps and order of the products in
// bilinear.h, shared with the CUDA kernel): width inside, height outside, no FMA. PyTorch's own kernel
// may contract some of these into FMAs depending on the CPU, so the argmax agrees with
// F.interpolate(...).argmax(1) except at pixels whose top two scores tie to float32 rounding. Ties:
// argmax.h (the first class of the pixel's maximum, the smallest class of the mask's majority).
//
// An image goes by cells: the output pixels whose taps are the source rows {a, a1} and columns {b, b1}.
// Classes that fall short of another over a whole cell by a margin above float32 rounding are not
// upsampled at its pixels (cell_candidates): in smooth score maps ~3 of 27 classes are left per cell,
// often one, and then its pixels are not upsampled at all. The mask ids are read once, as runs per row;
// a cell's pixels of one id take their votes from the argmax's counts, and the labels are written by the
// runs. The per-image pass is compiled for SSE2, AVX2 and AVX-512F, the best run (common.h): the same
// labels.
#include "common.h"

#include <algorithm>
#include <cmath>

#include "argmax.h"
#include "bilinear.h"
#include "vectors.h"

namespace {

using namespace primaps;

constexpr int64_t kRows = 16;                           // the most output rows of a band held at once
constexpr int32_t kMixed = INT32_MIN, kUnset = INT32_MIN + 1;  // Scratch::block: several ids, not yet seen

// Working memory of one image.
struct Scratch {
  std::vector<float> his, top, mag;  // cell_candidates: corner maxima (K, w + 8), max minimum and magnitude (w + 8)
  std::vector<int32_t> bits;         // ((K + 31) / 32, w + 8): each cell's candidate classes as bits
  std::vector<int32_t> cand;         // (K): one cell's candidates, increasing
  std::vector<float> xs;             // (K, 2, 8): the width pass of a cell's candidates over 8 columns
  std::vector<int32_t> counts;       // (K, 8): per candidate, lane by lane, the block pixels it wins
  std::vector<int32_t> classes;      // (kRows, W + 8): the argmax of the pixels of blocks with several ids
  std::vector<int32_t> block;        // per cell: the slot of its block's one mask id (-1: ignored), or kMixed
  std::vector<int64_t> stop;         // the id runs of the rows held: the end of each, its slot,
  std::vector<int32_t> stop_slot;    // and the first run of each row (kRows + 1)
  std::vector<size_t> row_first;
};

// The classes that can win a pixel of each cell (a, b), b in [0, w), of the source rows a and a1, as bits
// (s.bits[word * (w + 8) + b], class k at bit k % 32 of word k / 32). A pixel of the cell (taps rows {a, a1},
// columns {b, b1} with b1 <= b + 1) upsamples each class to a convex combination of those corners,
// computed with two rounded lerps: within ~7 float32 ulps of the largest corner magnitude of the
// corners' range. A class whose largest corner (of rows a, a1 and columns b, min(b + 1, w - 1)) is below
// the largest smallest corner (of any class) by more than 2^-19 (32 ulps) of the largest magnitude is
// below that class at every pixel of the cell, so it is never the pixel's first maximum and is left out.
// Vectorised along b; min and max are exact, so the lanes give the scalar rule's bits.
PRIMAPS_ALWAYS_INLINE void cell_candidates(const float* L, int64_t K, int64_t h, int64_t w, int64_t a, int64_t a1,
                                           Scratch& s) {
  constexpr float kMargin = 1.0f / (1 << 19);
  const int64_t ws = w + 8;
  s.his.resize(static_cast<size_t>(K * ws));
  s.top.assign(static_cast<size_t>(ws), -INFINITY);
  s.mag.assign(static_cast<size_t>(ws), 0.f);
  const int64_t wv = (w - 1) / 8 * 8;  // cells b < wv: 8 lanes with b + 1 < w
  for (int64_t k = 0; k < K; ++k) {
    const float* r0 = L + (k * h + a) * w;
    const float* r1 = L + (k * h + a1) * w;
    float* hi_k = s.his.data() + k * ws;
    for (int64_t b = 0; b < wv; b += 8) {
      const f32x8 c0 = load8(r0 + b), c1 = load8(r0 + b + 1), c2 = load8(r1 + b), c3 = load8(r1 + b + 1);
      const f32x8 lo = vmin(vmin(c0, c1), vmin(c2, c3)), hi = vmax(vmax(c0, c1), vmax(c2, c3));
      store8(hi_k + b, hi);
      store8(s.top.data() + b, vmax(load8(s.top.data() + b), lo));
      store8(s.mag.data() + b, vmax(load8(s.mag.data() + b), vmax(-lo, hi)));  // max |corner|: lo <= hi
    }
    for (int64_t b = wv; b < w; ++b) {
      const int64_t b1 = b + 1 < w ? b + 1 : b;
      const float c0 = r0[b], c1 = r0[b1], c2 = r1[b], c3 = r1[b1];
      const float lo = std::min(std::min(c0, c1), std::min(c2, c3)), hi = std::max(std::max(c0, c1), std::max(c2, c3));
      hi_k[b] = hi;
      s.top[b] = std::max(s.top[b], lo);
      s.mag[b] = std::max(s.mag[b], std::max(-lo, hi));
    }
  }
  s.bits.assign(static_cast<size_t>((K + 31) / 32 * ws), 0);
  for (int64_t b = 0; b < w; b += 8) {  // lanes past w: never read
    const f32x8 floor = load8(s.top.data() + b) - (kMargin * load8(s.mag.data() + b) + 1e-30f);
    for (int64_t k = 0; k < K; ++k) {
      int32_t* word = s.bits.data() + k / 32 * ws + b;
      const i32x8 keep = load8(s.his.data() + k * ws + b) >= floor;
      store8(word, load8(word) | (keep & static_cast<int32_t>(1u << (k % 32))));
    }
  }
}

// The candidates of cell b into s.cand, increasing; returns how many.
PRIMAPS_ALWAYS_INLINE int64_t candidates_of(int64_t b, int64_t K, int64_t w, Scratch& s) {
  int64_t n = 0;
  for (int64_t word = 0; word < (K + 31) / 32; ++word)
    for (uint32_t m = static_cast<uint32_t>(s.bits[word * (w + 8) + b]); m; m &= m - 1)
      s.cand[n++] = static_cast<int32_t>(32 * word + __builtin_ctz(m));
  return n;
}

// The argmax at the pixels of rows [y0, y0 + nr) and columns [x0, x1) of one cell (source rows a, a1,
// columns b, b1) over its candidates s.cand[0 .. nc), nc >= 2. With `store`, into
// s.classes[r * (W + 8) + x] (whole vectors: the spill past x1 is rewritten by the cells after it or lands
// in the slack), returning the one class of all those pixels or -1 when they have several; otherwise the
// pixels each candidate wins, added to votes[cand[i]].
template <bool store>
PRIMAPS_ALWAYS_INLINE int32_t cell_argmax(const float* L, int64_t h, int64_t w, int64_t a, int64_t a1, int64_t b,
                                          int64_t b1, int64_t nc, const Axis& ay, const float* l0,
                                          const float* l1, int64_t y0, int64_t nr, int64_t x0, int64_t x1,
                                          int64_t W, int64_t* votes, Scratch& s) {
  const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const int32_t* c = s.cand.data();
  float* xs = s.xs.data();
  int32_t* counts = s.counts.data();
  if (!store) std::fill(counts, counts + 8 * nc, 0);
  i32x8 differ = {};
  int32_t first = -1;
  for (int64_t x = x0; x < x1; x += 8) {
    const f32x8 w0 = load8(l0 + x), w1 = load8(l1 + x);
    for (int64_t i = 0; i < nc; ++i) {  // the width pass of both source rows (lerp's products and sum)
      const float* P = L + c[i] * h * w;
      store8(xs + 16 * i, w0 * P[a * w + b] + w1 * P[a * w + b1]);
      store8(xs + 16 * i + 8, w0 * P[a1 * w + b] + w1 * P[a1 * w + b1]);
    }
    const i32x8 inside = lane < static_cast<int32_t>(x1 - x);
    for (int64_t r = 0; r < nr; ++r) {
      const float hy0 = ay.l0[y0 + r], hy1 = ay.l1[y0 + r];
      f32x8 bv = hy0 * load8(xs) + hy1 * load8(xs + 8);
      i32x8 bi = i32x8{} + c[0];
      for (int64_t i = 1; i < nc; ++i) {
        const f32x8 u = hy0 * load8(xs + 16 * i) + hy1 * load8(xs + 16 * i + 8);
        const i32x8 take = u > bv;  // the first maximum: only a larger value takes over
        bi = select(take, i32x8{} + c[i], bi);
        bv = select(take, u, bv);
      }
      if (store) {
        store8(s.classes.data() + r * (W + 8) + x, bi);
        if (first < 0) first = bi[0];
        differ |= inside & (bi ^ first);
      } else {
        for (int64_t i = 0; i < nc; ++i)  // lanes of equal classes are -1
          store8(counts + 8 * i, load8(counts + 8 * i) - (inside & (bi == c[i])));
      }
    }
  }
  if (!store) {
    for (int64_t i = 0; i < nc; ++i) {
      int64_t n = 0;
      for (int l = 0; l < 8; ++l) n += counts[8 * i + l];
      votes[c[i]] += n;
    }
    return -1;
  }
  int32_t any = 0;
  for (int l = 0; l < 8; ++l) any |= differ[l];
  return any ? -1 : first;
}

// The first index after x of a value other than row[x] in row[0 .. n), or n: 16 ids per comparison.
PRIMAPS_ALWAYS_INLINE int64_t run_end(const int64_t* row, int64_t x, int64_t n) {
  const int64_t id = row[x];
  for (++x; x + 16 <= n; x += 16) {
    const i64x4 d = ((load4(row + x) ^ id) | (load4(row + x + 4) ^ id)) |
                    ((load4(row + x + 8) ^ id) | (load4(row + x + 12) ^ id));
    if (d[0] | d[1] | d[2] | d[3]) break;
  }
  while (x < n && row[x] == id) ++x;
  return x;
}

// One image: logits L (K, h, w), mask ids mb (H, W) -> ob (H, W) the majority class of each id's pixels.
//
// Row by row, a band of up to kRows output rows of one source row pair is split into blocks, its pixels of
// one cell. The ids are read first, as runs per row; a block of one id takes its votes straight from the
// argmax (the pixels each candidate wins, or all of them for a cell of one candidate; nothing for ignored
// blocks), a block of several ids from the stored argmax along each row's runs.
PRIMAPS_ALWAYS_INLINE void image_body(const float* L, const int64_t* mb, int64_t* ob, int64_t num_ids,
                                      int64_t ignore_index, int64_t K, int64_t h, int64_t w, const Axis& ay,
                                      const Axis& ax, int64_t H, int64_t W) {
  const std::vector<int64_t> bands = tap_runs(ay, H), cells = tap_runs(ax, W);
  const int64_t nx = static_cast<int64_t>(cells.size()) - 1;
  std::vector<int32_t> cell_of(static_cast<size_t>(W));
  for (int64_t j = 0; j < nx; ++j) std::fill(cell_of.begin() + cells[j], cell_of.begin() + cells[j + 1], j);
  std::vector<float> l0(static_cast<size_t>(W + 8), 0.f), l1(static_cast<size_t>(W + 8), 0.f);
  std::copy(ax.l0.begin(), ax.l0.end(), l0.begin());
  std::copy(ax.l1.begin(), ax.l1.end(), l1.begin());
  Scratch s;
  s.cand.resize(static_cast<size_t>(K));
  s.xs.resize(static_cast<size_t>(16 * K));
  s.counts.resize(static_cast<size_t>(8 * K));
  s.classes.resize(static_cast<size_t>(kRows * (W + 8)));
  s.row_first.resize(kRows + 1);
  std::vector<size_t> cursor(kRows);  // per row held: its first run not left of the current cell
  // Mask ids present in this image get a dense slot (the table grows up to num_ids as larger ids come);
  // slot -> K-class histogram. Ids are checked here, before any pixel of the image is written.
  std::vector<int32_t> slot;
  std::vector<int64_t> hist;
  auto slot_of = [&](int64_t id) -> int32_t {  // -1 for ignore_index
    if (id == ignore_index) return -1;
    if (id < 0)
      throw std::invalid_argument("mask_ids: negative ids (other than ignore_index=" + std::to_string(ignore_index) +
                                  ") are not allowed");
    if (id >= num_ids) throw std::out_of_range("mask_ids: id out of range [0, num_ids)");
    if (static_cast<size_t>(id) >= slot.size())
      slot.resize(std::min<size_t>(std::max<size_t>(2 * slot.size(), id + 1), num_ids), -1);
    int32_t& v = slot[static_cast<size_t>(id)];
    if (v < 0) {
      v = static_cast<int32_t>(hist.size() / K);
      hist.resize(hist.size() + K, 0);
    }
    return v;
  };
  // The image in raster order as runs of equal ids: the end of each (flat index) and its slot.
  std::vector<int64_t> image_stop;
  std::vector<int32_t> image_slot;
  int64_t last_id = 0;
  for (size_t band = 0; band + 1 < bands.size(); ++band) {
    const int64_t a = ay.i0[bands[band]], a1 = ay.i1[bands[band]];
    cell_candidates(L, K, h, w, a, a1, s);
    for (int64_t y0 = bands[band]; y0 < bands[band + 1]; y0 += kRows) {
      const int64_t nr = std::min(kRows, bands[band + 1] - y0);
      // The ids: runs of each row, and the one slot of each block.
      s.block.assign(static_cast<size_t>(nx), kUnset);
      s.stop.clear();
      s.stop_slot.clear();
      for (int64_t r = 0; r < nr; ++r) {
        s.row_first[r] = s.stop.size();
        const int64_t* row = mb + (y0 + r) * W;
        for (int64_t p0 = 0, p1; p0 < W; p0 = p1) {
          const int64_t id = row[p0];
          p1 = run_end(row, p0, W);
          const int32_t v = slot_of(id);
          s.stop.push_back(p1);
          s.stop_slot.push_back(v);
          if (!image_stop.empty() && id == last_id)
            image_stop.back() = (y0 + r) * W + p1;
          else
            image_stop.push_back((y0 + r) * W + p1), image_slot.push_back(v), last_id = id;
          for (int64_t j = cell_of[p0]; j < nx && cells[j] < p1; ++j) {
            int32_t& one = s.block[j];
            const bool whole = cells[j] >= p0 && cells[j + 1] <= p1;
            one = whole && (one == kUnset || one == v) ? v : kMixed;
          }
        }
      }
      s.row_first[nr] = s.stop.size();
      // The votes, block by block.
      for (int64_t r = 0; r < nr; ++r) cursor[r] = s.row_first[r];
      for (int64_t j = 0; j < nx; ++j) {
        const int64_t x0 = cells[j], x1 = cells[j + 1], b = ax.i0[x0], b1 = ax.i1[x0];
        const int32_t one = s.block[j];
        if (one == -1) continue;  // ignored pixels only
        const int64_t nc = candidates_of(b, K, w, s);
        if (one != kMixed) {
          int64_t* votes = hist.data() + static_cast<int64_t>(one) * K;
          if (nc == 1)
            votes[s.cand[0]] += nr * (x1 - x0);
          else
            cell_argmax<false>(L, h, w, a, a1, b, b1, nc, ay, l0.data(), l1.data(), y0, nr, x0, x1, W, votes, s);
          continue;
        }
        const int32_t k1 = nc == 1 ? s.cand[0]
                                   : cell_argmax<true>(L, h, w, a, a1, b, b1, nc, ay, l0.data(), l1.data(), y0,
                                                       nr, x0, x1, W, nullptr, s);
        for (int64_t r = 0; r < nr; ++r) {  // along the runs of each row
          const int32_t* classes = s.classes.data() + r * (W + 8);
          size_t& i = cursor[r];
          while (s.stop[i] <= x0) ++i;
          for (size_t q = i; q < s.row_first[r + 1]; ++q) {
            const int64_t o0 = std::max(q == s.row_first[r] ? 0 : s.stop[q - 1], x0), o1 = std::min(s.stop[q], x1);
            if (o0 >= x1) break;
            const int32_t v = s.stop_slot[q];
            if (v < 0) continue;
            int64_t* votes = hist.data() + static_cast<int64_t>(v) * K;
            if (k1 >= 0) {
              votes[k1] += o1 - o0;
              continue;
            }
            for (int64_t x = o0; x < o1;) {  // by runs of one class
              const int32_t k = classes[x];
              const int64_t start = x;
              while (++x < o1 && classes[x] == k) {
              }
              votes[k] += x - start;
            }
          }
        }
      }
    }
  }
  // Majority per slot, the first (smallest) class on ties; then the labels, run by run.
  std::vector<int64_t> winner(hist.size() / K);
  for (size_t v = 0; v < winner.size(); ++v) winner[v] = first_argmax(hist.data() + v * K, K);
  int64_t begin = 0;
  for (size_t i = 0; i < image_stop.size(); begin = image_stop[i++]) {
    const int32_t v = image_slot[i];
    std::fill(ob + begin, ob + image_stop[i], v < 0 ? ignore_index : winner[static_cast<size_t>(v)]);
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
        "Majority class of the upsampled argmax per (image, mask id); ignore_index elsewhere. Ids are checked as "
        "they are read: a negative one other than ignore_index raises ValueError, one >= num_ids IndexError.");
});

}  // namespace
