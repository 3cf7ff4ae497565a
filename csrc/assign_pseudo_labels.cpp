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
// often one, and then its pixels are not upsampled at all. A cell's pixels of one mask id take their votes
// from the argmax's counts; the labels are written 16 (or 4) at a time where the id stays the same. The
// per-image pass is compiled for SSE2, AVX2 and AVX-512F, the best run (common.h): the same labels.
#include "common.h"

#include <algorithm>
#include <cmath>

#include "argmax.h"
#include "bilinear.h"
#include "vectors.h"

namespace {

using namespace primaps;

constexpr int64_t kRows = 16;  // the most output rows of a band held at once

// Working memory of one image.
struct Scratch {
  std::vector<float> his, top, mag;  // cell_candidates: corner maxima (K, w + 8); top minimum, magnitude (w + 8)
  std::vector<int32_t> bits;         // ((K + 31) / 32, w + 8): each cell's candidate classes as bits
  std::vector<int32_t> cand;         // (K): one cell's candidates, increasing
  std::vector<float> xs;             // (K, 2, 8): the width pass of a cell's candidates over 8 columns
  std::vector<int32_t> counts;       // (K, 8): per candidate, lane by lane, the block pixels it wins
  std::vector<int32_t> classes;      // (kRows, W + 8): the argmax of the pixels of blocks with several ids
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
  // Cells b < nv by 8 lanes with b + 1 < w (the last 8 overlapping earlier ones: max is idempotent), the
  // others one by one.
  const int64_t nv = w > 8 ? w - 1 : 0;
  const int64_t a2 = std::min(a1 + 1, h - 1);  // the next band's new row: fetched ahead, classes h * w apart
  for (int64_t k = 0; k < K; ++k) {
    const float* r0 = L + (k * h + a) * w;
    const float* r1 = L + (k * h + a1) * w;
    for (int64_t b = 0; b < w; b += 16) __builtin_prefetch(L + (k * h + a2) * w + b);
    __builtin_prefetch(L + (k * h + a2) * w + w - 1);
    float* hi_k = s.his.data() + k * ws;
    for (int64_t i = 0; i < nv; i += 8) {
      const int64_t b = std::min(i, nv - 8);
      const f32x8 c0 = load8(r0 + b), c1 = load8(r0 + b + 1), c2 = load8(r1 + b), c3 = load8(r1 + b + 1);
      const f32x8 lo = vmin(vmin(c0, c1), vmin(c2, c3)), hi = vmax(vmax(c0, c1), vmax(c2, c3));
      store8(hi_k + b, hi);
      store8(s.top.data() + b, vmax(load8(s.top.data() + b), lo));
      store8(s.mag.data() + b, vmax(load8(s.mag.data() + b), vmax(-lo, hi)));  // max |corner|: lo <= hi
    }
    for (int64_t b = nv; b < w; ++b) {
      const int64_t b1 = b + 1 < w ? b + 1 : b;
      const float c0 = r0[b], c1 = r0[b1], c2 = r1[b], c3 = r1[b1];
      const float lo = std::min(std::min(c0, c1), std::min(c2, c3));
      const float hi = std::max(std::max(c0, c1), std::max(c2, c3));
      hi_k[b] = hi;
      s.top[b] = std::max(s.top[b], lo);
      s.mag[b] = std::max(s.mag[b], std::max(-lo, hi));
    }
  }
  s.bits.resize(static_cast<size_t>((K + 31) / 32 * ws));
  for (int64_t b = 0; b < w; b += 8) {  // lanes past w: never read
    const f32x8 floor = load8(s.top.data() + b) - (kMargin * load8(s.mag.data() + b) + 1e-30f);
    for (int64_t word = 0; word < (K + 31) / 32; ++word) {
      i32x8 bits = {};
      for (int64_t k = 32 * word; k < std::min(K, 32 * word + 32); ++k)
        bits |= (load8(s.his.data() + k * ws + b) >= floor) & static_cast<int32_t>(1u << (k % 32));
      store8(s.bits.data() + word * ws + b, bits);
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

// Lane l < min(n, 8): all ones where p[l] == id, else 0.
PRIMAPS_ALWAYS_INLINE i32x8 lanes_equal(const int64_t* p, int64_t n, int64_t id) {
  if (n >= 8)
    return __builtin_shufflevector(__builtin_convertvector(load4(p) == id, i32x4),
                                   __builtin_convertvector(load4(p + 4) == id, i32x4), 0, 1, 2, 3, 4, 5, 6, 7);
  i32x8 m = {};
  for (int64_t l = 0; l < n; ++l) m[l] = p[l] == id ? -1 : 0;
  return m;
}

// The argmax at the pixels of rows [y0, y0 + nr) and columns [x0, x1) of one cell (source rows a, a1,
// columns b, b1) over its candidates s.cand[0 .. nc), nc >= 2; NC > 0 when nc == NC (the width pass and the
// counts then stay in registers), else 0. With `store`, into s.classes[r * (W + 8) + x] (whole vectors: the
// spill past x1 lands on columns of later cells, written before they are read, or in the slack), returning
// the one class of all those pixels or -1 when they have several. Otherwise the pixels each candidate wins
// are added to votes[cand[i]]: all of them, or with `ids` (the mask ids of row y0, rows W apart) those
// whose id is `id`.
template <bool store, int NC>
PRIMAPS_ALWAYS_INLINE int32_t cell_argmax(int64_t nc, const float* L, int64_t h, int64_t w, int64_t a, int64_t a1,
                                          int64_t b, int64_t b1, const Axis& ay, const float* l0,
                                          const float* l1, int64_t y0, int64_t nr, int64_t x0, int64_t x1,
                                          int64_t W, int64_t* votes, const int64_t* ids, int64_t id,
                                          Scratch& s) {
  constexpr int kHeld = NC > 0 ? NC : 1;
  const int64_t m = NC > 0 ? NC : nc;
  const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const int32_t* c = s.cand.data();
  f32x8 held[2 * kHeld];  // NC > 0: the width pass of candidate i, source rows a and a1, at 2i and 2i + 1
  i32x8 tally[kHeld] = {};
  auto put = [&](int64_t j, f32x8 v) { NC > 0 ? void(held[j] = v) : store8(s.xs.data() + 8 * j, v); };
  auto get = [&](int64_t j) { return NC > 0 ? held[j] : load8(s.xs.data() + 8 * j); };
  int32_t* counts = s.counts.data();
  if (!store && NC == 0) std::fill(counts, counts + 8 * nc, 0);
  i32x8 differ = {};
  int32_t first = -1;
  for (int64_t x = x0; x < x1; x += 8) {
    const f32x8 w0 = load8(l0 + x), w1 = load8(l1 + x);
    for (int64_t i = 0; i < m; ++i) {  // the width pass of both source rows (lerp's products and sum)
      const float* P = L + c[i] * h * w;
      put(2 * i, w0 * P[a * w + b] + w1 * P[a * w + b1]);
      put(2 * i + 1, w0 * P[a1 * w + b] + w1 * P[a1 * w + b1]);
    }
    const i32x8 inside = lane < static_cast<int32_t>(x1 - x);
    for (int64_t r = 0; r < nr; ++r) {
      const float hy0 = ay.l0[y0 + r], hy1 = ay.l1[y0 + r];
      f32x8 bv = hy0 * get(0) + hy1 * get(1);
      i32x8 bi = i32x8{} + c[0];
      for (int64_t i = 1; i < m; ++i) {
        const f32x8 u = hy0 * get(2 * i) + hy1 * get(2 * i + 1);
        const i32x8 take = u > bv;  // the first maximum: only a larger value takes over
        bi = select(take, i32x8{} + c[i], bi);
        bv = select(take, u, bv);
      }
      if (store) {
        store8(s.classes.data() + r * (W + 8) + x, bi);
        if (first < 0) first = bi[0];
        differ |= inside & (bi ^ first);
      } else {
        const i32x8 counted = ids ? lanes_equal(ids + r * W + x, x1 - x, id) : inside;
        for (int64_t i = 0; i < m; ++i) {  // lanes of equal classes are -1
          const i32x8 won = counted & (bi == c[i]);
          if (NC > 0)
            tally[i] -= won;
          else
            store8(counts + 8 * i, load8(counts + 8 * i) - won);
        }
      }
    }
  }
  if (!store) {
    for (int64_t i = 0; i < m; ++i) {
      const i32x8 t = NC > 0 ? tally[i] : load8(counts + 8 * i);
      votes[c[i]] += t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
    }
    return -1;
  }
  int32_t any = 0;
  for (int l = 0; l < 8; ++l) any |= differ[l];
  return any ? -1 : first;
}

// cell_argmax with the candidates' count as a constant where there are 2 to 4 (most cells).
template <bool store, typename... A>
PRIMAPS_ALWAYS_INLINE int32_t cell_argmax_of(int64_t nc, A&&... a) {
  switch (nc) {
    case 2: return cell_argmax<store, 2>(nc, a...);
    case 3: return cell_argmax<store, 3>(nc, a...);
    case 4: return cell_argmax<store, 4>(nc, a...);
    default: return cell_argmax<store, 0>(nc, a...);
  }
}

// Whether the pixels of rows [0, nr) (W apart) and columns [0, n) at p all equal id (`or_other` = id: a
// single value) or the value or_other: 4 ids per comparison, reduced after the first row (most blocks that
// fail do there) and after the last.
PRIMAPS_ALWAYS_INLINE bool all_in(const int64_t* p, int64_t W, int64_t nr, int64_t n, int64_t id, int64_t or_other) {
  i64x4 d = {};
  int64_t rest = 0;
  for (int64_t r = 0; r < nr; ++r, p += W) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const i64x4 v = load4(p + i);
      d |= ~((v == id) | (v == or_other));
    }
    for (; i < n; ++i) rest |= p[i] != id && p[i] != or_other;
    if (r == 0 && (d[0] | d[1] | d[2] | d[3] | rest)) return false;
  }
  return !(d[0] | d[1] | d[2] | d[3] | rest);
}

// How many of p[0 .. n) equal id.
PRIMAPS_ALWAYS_INLINE int64_t count_equal(const int64_t* p, int64_t n, int64_t id) {
  i64x4 m = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) m -= load4(p + i) == id;
  int64_t count = m[0] + m[1] + m[2] + m[3];
  for (; i < n; ++i) count += p[i] == id;
  return count;
}

// One image: logits L (K, h, w), mask ids mb (H, W) -> ob (H, W) the majority class of each id's pixels
// (majority_class: the votes for ignore_class not counted, ignore_class for a mask without votes).
//
// A band of up to kRows output rows of one source row pair goes block by block, a block being its pixels
// of one cell. A block of one mask id takes its votes straight from the argmax (the pixels each candidate
// wins, or all of them for a cell of one candidate; nothing when the id is ignore_index); a block of
// several ids from the stored argmax, by runs of one id and class along each row; a block of one id and
// some ignored pixels as one of one id, counting the pixels of that id only. Every id is checked there,
// before any label is written.
PRIMAPS_ALWAYS_INLINE void image_body(const float* L, const int64_t* mb, int64_t* ob, int64_t num_ids,
                                      int64_t ignore_index, int64_t ignore_class, int64_t K, int64_t h, int64_t w,
                                      const Axis& ay, const Axis& ax, int64_t H, int64_t W) {
  const std::vector<int64_t> bands = tap_runs(ay, H), cells = tap_runs(ax, W);
  const int64_t nx = static_cast<int64_t>(cells.size()) - 1;
  std::vector<float> l0(static_cast<size_t>(W + 8), 0.f), l1(static_cast<size_t>(W + 8), 0.f);
  std::copy(ax.l0.begin(), ax.l0.end(), l0.begin());
  std::copy(ax.l1.begin(), ax.l1.end(), l1.begin());
  Scratch s;
  s.cand.resize(static_cast<size_t>(K));
  s.xs.resize(static_cast<size_t>(16 * K));
  s.counts.resize(static_cast<size_t>(8 * K));
  s.classes.resize(static_cast<size_t>(kRows * (W + 8)));
  // Mask ids present in this image get a dense slot (the table grows up to num_ids as larger ids come);
  // slot -> K-class histogram.
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
  for (size_t band = 0; band + 1 < bands.size(); ++band) {
    const int64_t a = ay.i0[bands[band]], a1 = ay.i1[bands[band]];
    cell_candidates(L, K, h, w, a, a1, s);
    for (int64_t y0 = bands[band]; y0 < bands[band + 1]; y0 += kRows) {
      const int64_t nr = std::min(kRows, bands[band + 1] - y0);
      const int64_t* rows = mb + y0 * W;
      for (int64_t j = 0; j < nx; ++j) {
        const int64_t x0 = cells[j], x1 = cells[j + 1], b = ax.i0[x0], b1 = ax.i1[x0];
        const int64_t n = x1 - x0;
        // The block's id: the one of all its pixels (`pure`), or of all but some ignored (`clean`).
        int64_t id = rows[x0];
        const bool pure = all_in(rows + x0, W, nr, n, id, id);
        if (pure && id == ignore_index) continue;
        bool clean = true;
        if (!pure) {
          for (int64_t e = 0; e < nr * n && id == ignore_index; ++e) id = rows[e / n * W + x0 + e % n];
          clean = all_in(rows + x0, W, nr, n, id, ignore_index);
        }
        const int64_t nc = candidates_of(b, K, w, s);
        if (clean) {
          const int32_t v = slot_of(id);  // before hist.data(): it may grow hist
          int64_t* votes = hist.data() + static_cast<int64_t>(v) * K;
          if (nc > 1)
            cell_argmax_of<false>(nc, L, h, w, a, a1, b, b1, ay, l0.data(), l1.data(), y0, nr, x0, x1, W, votes,
                                  pure ? nullptr : rows, id, s);
          else if (pure)
            votes[s.cand[0]] += nr * n;
          else
            for (int64_t r = 0; r < nr; ++r) votes[s.cand[0]] += count_equal(rows + r * W + x0, n, id);
          continue;
        }
        const int32_t k1 = nc == 1 ? s.cand[0]
                                   : cell_argmax_of<true>(nc, L, h, w, a, a1, b, b1, ay, l0.data(), l1.data(), y0, nr,
                                                          x0, x1, W, nullptr, nullptr, 0, s);
        for (int64_t r = 0; r < nr; ++r) {  // by runs of one id and one class
          const int64_t* row = rows + r * W;
          const int32_t* classes = s.classes.data() + r * (W + 8);
          for (int64_t x = x0; x < x1;) {
            const int64_t run_id = row[x], start = x;
            const int32_t k = k1 >= 0 ? k1 : classes[x];
            while (++x < x1 && row[x] == run_id && (k1 >= 0 || classes[x] == k)) {
            }
            const int32_t v = slot_of(run_id);
            if (v >= 0) hist[static_cast<size_t>(v) * K + k] += x - start;
          }
        }
      }
    }
  }
  // Majority per slot (argmax.h; ignore_class for a mask without votes); then the labels, 16 or 4 pixels at a
  // time while the id stays the same.
  std::vector<int64_t> winner(hist.size() / K);
  for (size_t v = 0; v < winner.size(); ++v) {
    const int64_t k = majority_class(hist.data() + v * K, K, ignore_class);
    winner[v] = k < 0 ? ignore_class : k;
  }
  auto label_of = [&](int64_t id) {
    return id == ignore_index ? ignore_index : winner[static_cast<size_t>(slot[static_cast<size_t>(id)])];
  };
  const int64_t n = H * W;
  int64_t id = mb[0], label = label_of(id), i = 0;
  auto four = [&](int64_t i) {  // pixels i .. i + 3
    const i64x4 d = load4(mb + i) ^ id;
    if (!(d[0] | d[1] | d[2] | d[3])) return store4(ob + i, i64x4{} + label);
    for (int64_t e = i; e < i + 4; ++e) {
      if (mb[e] != id) id = mb[e], label = label_of(id);
      ob[e] = label;
    }
  };
  for (; i + 16 <= n; i += 16) {  // one reduction for 16 pixels of the same id
    const i64x4 d = (load4(mb + i) ^ id) | (load4(mb + i + 4) ^ id) | (load4(mb + i + 8) ^ id) |
                    (load4(mb + i + 12) ^ id);
    if (d[0] | d[1] | d[2] | d[3])
      for (int64_t e = i; e < i + 16; e += 4) four(e);
    else
      for (int64_t e = i; e < i + 16; e += 4) store4(ob + e, i64x4{} + label);
  }
  for (; i + 4 <= n; i += 4) four(i);
  for (; i < n; ++i) {
    if (mb[i] != id) id = mb[i], label = label_of(id);
    ob[i] = label;
  }
}
PRIMAPS_SIMD_FUNCTION(image, image_body)

void assign_pseudo_labels(FloatArray logits, Int64Array mask_ids, Int64Array out, int64_t num_ids,
                          int64_t ignore_index, int64_t ignore_class, int threads) {
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
      image(L + b * K * h * w, M + b * H * W, O + b * H * W, num_ids, ignore_index, ignore_class, K, h, w, ay, ax,
            H, W);
    });
  }
}

static Registrar reg([](py::module_& m) {
  m.def("assign_pseudo_labels", &assign_pseudo_labels, py::arg("logits"), py::arg("mask_ids"),
        py::arg("out"), py::arg("num_ids"), py::arg("ignore_index"), py::arg("ignore_class"), py::arg("threads"),
        "Majority class of the upsampled argmax per (image, mask id), votes for ignore_class not counted "
        "(ignore_class for a mask without votes); ignore_index where the id is ignore_index. Ids are checked as "
        "they are read: a negative one other than ignore_index raises ValueError, one >= num_ids IndexError.");
});

}  // namespace
