// M-step loss of PriMaPs-EM: the official FocalLoss on bilinearly upsampled class scores, forward and
// backward fused with the upsampling, never storing the (B, K, H, W) upsampled scores.
//
// One kernel, focal_moments, walks the pixels of each image once: the softmax of the upsampled scores at
// every pixel, its per-image sums (for the class weights), the per-class sums of CE and, when asked, the
// gradient's moments at feature resolution, per moment slot. focal_target_classes reads the target first
// (the classes present in each image, the count of bad values); focal_combine weighs the moments into the
// gradient; focal_confidence is focal_moments without a target (the softmax sums alone). Python runs one
// pass with a slot per present class (the class weights, which need the sums of the whole batch, applied
// afterwards) or, when those moments would be too large, two: the sums, then one slot that holds every
// class with its weight applied as it accumulates (ops/focal_loss.py). focal_class_weights: the class
// weights from the sums (focal_weights.h, shared with CUDA).
//
// Pixel-major: a pixel's classes are Kp = K rounded up to 8 lanes, in f32x8 chunks (zeros beyond K). On a
// block of output pixels with the same four bilinear taps (a segment of columns times a segment of rows,
// segments()) the upsampled score of a class is bilinear in (x, y), so its exponential is geometric along a
// row, and the row's first value and ratio are geometric from row to row: four exps per class and block
// (exp(u - m) at its first pixel, the ratio along its first row, and the factors of the two from one row to
// the next; m the block's largest corner), then a product per pixel and two per row and segment (at most
// kSegment of each; on random inputs the sums, losses and gradient stay as close to a float64 computation,
// ~1e-5, as with an exp per pixel). Segments of one column, and blocks where a class's corner lies more than
// kSpread below m or the ratio's factor passes exp(+-kSpread), take an exp per pixel and class of
// u - (the pixel's max), as the reference does. The CE uses the target's upsampled score as PyTorch rounds
// it (bilinear.h). Threads run over images; every image accumulates into its own buffers in a fixed order, so
// the results are deterministic, and the same bits in every SIMD variant (common.h: SSE2, AVX2 and AVX-512
// with VL).
#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <type_traits>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "bilinear.h"
#include "fast_exp.h"
#include "focal_weights.h"
#include "vectors.h"

namespace {

using namespace primaps;

// K rounded up to 8: the class axis of the moments (focal_loss.py allocates them with it).
inline int64_t padded_classes(int64_t K) { return (K + 7) / 8 * 8; }

constexpr int64_t kSegment = 16;  // the most columns (rows) one geometric recurrence runs over
constexpr float kSpread = 80.f;   // exp(-80) ~ 1.8e-35: every term of a recurrence a normal float

// The first index of each segment of the n output columns (or rows) of axis ax, then n: consecutive ones with
// the same taps (i0, i1) on which the weight l1 is affine, at most kSegment of them. ATen clamps the ones
// before the first source centre to l1 = 0: a segment also starts where l1 leaves or reaches 0.
std::vector<int64_t> segments(const Axis& ax, int64_t n) {
  std::vector<int64_t> start;
  for (int64_t x = 0; x < n; ++x)
    if (x == 0 || ax.i0[x] != ax.i0[x - 1] || ax.i1[x] != ax.i1[x - 1] ||
        (ax.l1[x - 1] == 0.f) != (ax.l1[x] == 0.f) || x - start.back() == kSegment)
      start.push_back(x);
  start.push_back(n);
  return start;
}

// The Kp lanes of a pixel as chunks of 8: NC in registers, or, for NC = 0 (K > 32), any number on the heap.
template <int NC, typename V = f32x8>
struct Lanes {
  alignas(32) V v[NC] = {};  // alignas: in a template argument, GCC drops the vectors' alignment
  explicit Lanes(int) {}
  PRIMAPS_ALWAYS_INLINE V& operator[](int c) { return v[c]; }
};
template <typename V>
struct Lanes<0, V> {  // aligned by hand, as above
  static constexpr std::align_val_t kAlign{64};
  V* v;
  explicit Lanes(int nc) : v(static_cast<V*>(::operator new(sizeof(V) * nc, kAlign))) {
    for (int c = 0; c < nc; ++c) new (v + c) V();
  }
  ~Lanes() { ::operator delete(v, kAlign); }
  Lanes(const Lanes&) = delete;
  Lanes& operator=(const Lanes&) = delete;
  PRIMAPS_ALWAYS_INLINE V& operator[](int c) { return v[c]; }
};

// The sum and the maximum of 8 lanes, in a fixed order of pairs.
PRIMAPS_ALWAYS_INLINE float hsum8(f32x8 v) {
  const f32x4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const f32x4 b = a + __builtin_shufflevector(a, a, 2, 3, 0, 1);
  return b[0] + b[1];
}
PRIMAPS_ALWAYS_INLINE float hmax8(f32x8 v) {
  const f32x4 a = vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7));
  const f32x4 b = vmax(a, __builtin_shufflevector(a, a, 2, 3, 0, 1));
  return b[0] > b[1] ? b[0] : b[1];
}

// u (Kp lanes) = the upsampled scores at column x of an output row between the width-passed source rows
// a and b (W, Kp) with weights h0, h1: lerp lane by lane (the products rounded, then the sum).
template <int NC>
PRIMAPS_ALWAYS_INLINE void upsampled(const float* a, const float* b, float h0, float h1, int64_t x, int nc,
                                     Lanes<NC>& u) {
  const int64_t Kp = 8 * nc;
  for (int c = 0; c < nc; ++c) u[c] = h0 * load8(a + x * Kp + 8 * c) + h1 * load8(b + x * Kp + 8 * c);
}

// exp(max(d, -87)) on the classes (valid lanes), 0 beyond them.
PRIMAPS_ALWAYS_INLINE f32x8 exp_of_classes(f32x8 d, i32x8 valid) {
  const f32x8 lo = f32x8{} - 87.f;
  return from_bits(valid & (i32x8)exp_clamped(select(valid, vmax(d, lo), lo)));
}

// The width pass of source row ys of lt (h, w, Kp) into dst (W, Kp): lerp of the two source columns of
// each output column, lane by lane (lerp's products and sum, bilinear.h).
PRIMAPS_ALWAYS_INLINE void width_pass_row(const float* lt, int64_t ys, int64_t w, const Axis& ax, int64_t W,
                                          int nc, float* dst) {
  const int64_t Kp = 8 * nc;
  for (int64_t x = 0; x < W; ++x) {
    const float* a = lt + (ys * w + ax.i0[x]) * Kp;
    const float* b = lt + (ys * w + ax.i1[x]) * Kp;
    const float l0 = ax.l0[x], l1 = ax.l1[x];
    for (int c = 0; c < nc; ++c) store8(dst + x * Kp + 8 * c, l0 * load8(a + 8 * c) + l1 * load8(b + 8 * c));
  }
}

// The moments of one run of pixels of target class t in one segment (source columns with moment cells
// c0, c1 = i0 * R, i1 * R) added to the ring rows r0, r1 of the output row's source rows: a0, a1 = the
// sums of l0 * p and l1 * p over the run, w0, w1 = those of l0 and l1 (the one-hot part of p - [k == t]);
// each times factor[t] and the row weights h0, h1, into slot slot[t].
template <int NC>
PRIMAPS_ALWAYS_INLINE void add_moments(int64_t t, const int32_t* slot, const float* factor, int nc, Lanes<NC>& a0,
                                       Lanes<NC>& a1, float w0, float w1, float h0, float h1, float* r0, float* r1,
                                       int64_t c0, int64_t c1) {
  const int64_t Kp = 8 * nc;
  // -w0, -w1 on lane t, as one-hot vectors (a lane chosen at run time would keep a0 and a1 in memory)
  const i32x8 lane = i32x8{0, 1, 2, 3, 4, 5, 6, 7} - static_cast<int32_t>(t);
  for (int c = 0; c < nc; ++c) {
    const i32x8 hot = lane + 8 * c == 0;
    a0[c] -= select(hot, f32x8{} + w0, f32x8{});
    a1[c] -= select(hot, f32x8{} + w1, f32x8{});
  }
  const float f0 = h0 * factor[t], f1 = h1 * factor[t];
  float* m00 = r0 + (c0 + slot[t]) * Kp;
  float* m01 = r0 + (c1 + slot[t]) * Kp;
  float* m10 = r1 + (c0 + slot[t]) * Kp;
  float* m11 = r1 + (c1 + slot[t]) * Kp;
  for (int c = 0; c < nc; ++c) {
    store8(m00 + 8 * c, load8(m00 + 8 * c) + f0 * a0[c]);
    store8(m01 + 8 * c, load8(m01 + 8 * c) + f0 * a1[c]);
    store8(m10 + 8 * c, load8(m10 + 8 * c) + f1 * a0[c]);
    store8(m11 + 8 * c, load8(m11 + 8 * c) + f1 * a1[c]);
  }
}

// Denormal floats flushed to zero on this thread while it lives (x86: MXCSR's FTZ and DAZ bits). Scores
// more than ~87 apart make probabilities and moments below the normal floats, and each operation on one
// costs a microcode assist: 7x slower on such inputs. They are below 1.2e-38, so zero changes nothing.
struct FlushDenormals {
#if defined(__SSE__)
  const unsigned csr = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(csr | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(csr); }
#endif
};

// Whether a pixel of target t adds CE and moments: a class in [0, K) with a slot (not ignore_index).
PRIMAPS_ALWAYS_INLINE bool counted(int64_t t, int64_t ignore_index, int64_t K, const int32_t* slot) {
  return t != ignore_index && t >= 0 && t < K && slot[t] >= 0;
}

// One image L (K, h, w), Kp = 8 * NC lanes (NC = 0: any), with target T (H, W) or none (tb null: the softmax
// sums alone). S (K,) = the sums over its pixels of softmax(up), float32 over 16 columns of a row at a time,
// added to float64 ones. With a target, C (K,) with C[c] = the sum over the pixels of target c of CE and,
// when M is not null, the moments M (h, w, R, Kp) float32: M[iy, ix, s, k] = the sum over the pixels whose
// target c has slot[c] = s of factor[c] * tap(iy, ix) * (p_k - [k == c]) (zeros beyond K). The gradient of
// sum_pixels w_t * CE w.r.t. L[k, iy, ix] is then sum_c w_c M[iy, ix, slot[c], k] for unit factors and a
// slot per class, or M[iy, ix, 0, k] for factors w and one slot for all (focal_combine either way).
// Pixels whose target is ignore_index, outside [0, K) or without a slot add no CE and no moments (the caller
// refuses bad targets: focal_target_classes).
template <int NC>
PRIMAPS_ALWAYS_INLINE void moments_body(std::integral_constant<int, NC>, const float* L, const int64_t* tb,
                                        const int32_t* slot, const float* factor, int64_t ignore_index, int64_t K,
                                        int64_t R, int64_t h, int64_t w, const Axis& ay, const Axis& ax,
                                        const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                                        int64_t H, int64_t W, double* S, double* C, float* M) {
  const FlushDenormals flush;
  const int nc = NC > 0 ? NC : static_cast<int>(padded_classes(K) / 8);
  const int64_t Kp = 8 * static_cast<int64_t>(nc);
  std::vector<float> lt(static_cast<size_t>(h * w * Kp), 0.f);  // L pixel-major, (h, w, Kp)
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < h * w; ++i) lt[i * Kp + k] = L[k * h * w + i];
  // The width pass of the two source rows an output row taps, (W, Kp) each, at index ys & 1.
  std::vector<float> src(static_cast<size_t>(2 * W * Kp));
  int64_t src_row[2] = {-1, -1};
  // The moments of source rows `held` and held + 1 accumulate in a ring of two rows (cache-resident); a row
  // is written to M once no later output row taps it.
  const int64_t row_size = w * R * Kp;
  std::vector<float> ring;
  if (M != nullptr) ring.assign(static_cast<size_t>(2 * row_size), 0.f);
  int64_t held = 0;
  auto write_row = [&](int64_t iy) {
    float* part = ring.data() + (iy & 1) * row_size;
    std::copy(part, part + row_size, M + iy * row_size);
    std::fill(part, part + row_size, 0.f);
  };
  // per column of the current row: the partition sum, the score it is relative to, log-sum-exp (padded
  // to 4 lanes)
  const int64_t W4 = (W + 3) / 4 * 4;
  std::vector<float> s_row(W4, 1.f), m_row(W4, 0.f), lse(W4);
  std::vector<double> acc(Kp, 0.0);
  // Per column segment, over the rows of the current row segment: whether it is geometric, the score m its
  // exponentials are relative to, and (Kp lanes each) exp(u - m) at its first column, the ratio along the
  // row, and what the two are multiplied by from one row to the next.
  const size_t n_cols = cols.size() - 1;
  std::vector<uint8_t> geo(n_cols);
  std::vector<float> seg_m(n_cols), recur(n_cols * 4 * Kp);
  int64_t row_end = 0;  // the end of the current row segment
  float part_out[8];
  Lanes<NC, i32x8> valid(nc);
  for (int c = 0; c < nc; ++c)
    for (int l = 0; l < 8; ++l) valid[c][l] = 8 * c + l < K ? -1 : 0;
  Lanes<NC> ua(nc), ub(nc), va(nc), vb(nc), e(nc), ratio(nc), p(nc), part(nc), a0(nc), a1(nc);
  if (C != nullptr)
    for (int64_t k = 0; k < K; ++k) C[k] = 0.0;
  const f32x8 lowest = f32x8{} - std::numeric_limits<float>::infinity();
  for (int64_t y = 0; y < H; ++y) {
    const int64_t iy0 = ay.i0[y], iy1 = ay.i1[y];
    const float h0 = ay.l0[y], h1 = ay.l1[y];
    for (const int64_t ys : {iy0, iy1})
      if (src_row[ys & 1] != ys) {
        src_row[ys & 1] = ys;
        width_pass_row(lt.data(), ys, w, ax, W, nc, src.data() + (ys & 1) * W * Kp);
      }
    const float* a = src.data() + (iy0 & 1) * W * Kp;
    const float* b = src.data() + (iy1 & 1) * W * Kp;
    float *r0 = nullptr, *r1 = nullptr;  // the ring rows of source rows iy0 and iy1
    if (M != nullptr) {
      for (; held < iy0; ++held) write_row(held);
      r0 = ring.data() + (iy0 & 1) * row_size;
      r1 = ring.data() + (iy1 & 1) * row_size;
    }
    const int64_t* tr = tb == nullptr ? nullptr : tb + y * W;
    const bool first_row = y == row_end;  // of a row segment: the recurrences start there
    const int64_t y_last = first_row ? *std::upper_bound(rows.begin(), rows.end(), y) - 1 : 0;
    if (first_row) row_end = y_last + 1;
    for (size_t j = 0; j < n_cols; ++j) {
      const int64_t xa = cols[j], xb = cols[j + 1];
      const int64_t c0 = ax.i0[xa] * R, c1 = ax.i1[xa] * R;
      float* rec = recur.data() + j * 4 * Kp;  // first, ratio, their factors from row to row
      if (first_row) {
        // The scores are bilinear in (x, y) over the block of the column and row segments: geometric along
        // the row and from row to row where they spread at most kSpread from its largest corner, m.
        bool g = xb - xa > 1;
        if (g) {
          const float l0 = ay.l0[y_last], l1 = ay.l1[y_last];
          upsampled(a, b, h0, h1, xa, nc, ua);
          upsampled(a, b, h0, h1, xb - 1, nc, ub);
          upsampled(a, b, l0, l1, xa, nc, va);
          upsampled(a, b, l0, l1, xb - 1, nc, vb);
          const float ix = 1.f / static_cast<float>(xb - xa - 1);
          const float iy = y_last > y ? 1.f / static_cast<float>(y_last - y) : 0.f;
          f32x8 hi = lowest, lo = -lowest, bend = f32x8{};  // bend: the largest |exponent| of the ratio's factor
          for (int c = 0; c < nc; ++c) {
            hi = select(valid[c], vmax(hi, vmax(vmax(ua[c], ub[c]), vmax(va[c], vb[c]))), hi);
            lo = select(valid[c], vmin(lo, vmin(vmin(ua[c], ub[c]), vmin(va[c], vb[c]))), lo);
            vb[c] = ((vb[c] - va[c]) - (ub[c] - ua[c])) * (ix * iy);
            bend = select(valid[c], vmax(bend, vmax(vb[c], -vb[c])), bend);
          }
          const float m = hmax8(hi);
          g = m + hmax8(-lo) <= kSpread && hmax8(bend) <= kSpread;  // m - the lowest corner
          if (g) {
            seg_m[j] = m;
            for (int c = 0; c < nc; ++c) {
              store8(rec + 8 * c, exp_of_classes(ua[c] - m, valid[c]));
              store8(rec + Kp + 8 * c, exp_clamped((ub[c] - ua[c]) * ix));  // 1 beyond K
              store8(rec + 2 * Kp + 8 * c, exp_clamped((va[c] - ua[c]) * iy));
              store8(rec + 3 * Kp + 8 * c, exp_clamped(vb[c]));
            }
          }
        }
        geo[j] = g;
      } else if (geo[j]) {
        for (int64_t i = 0; i < 2 * Kp; i += 8) store8(rec + i, load8(rec + i) * load8(rec + 2 * Kp + i));
      }
      const bool geometric = geo[j];
      const float m = geometric ? seg_m[j] : 0.f;
      if (geometric)
        for (int c = 0; c < nc; ++c) {
          e[c] = load8(rec + 8 * c);
          ratio[c] = load8(rec + Kp + 8 * c);
        }
      int64_t cur = -1;  // the target class of the run whose moments a0, a1 hold
      float w0 = 0.f, w1 = 0.f;
      for (int64_t x = xa; x < xb; ++x) {
        float mx = m;
        if (!geometric) {
          upsampled(a, b, h0, h1, x, nc, p);
          f32x8 v = lowest;
          for (int c = 0; c < nc; ++c) v = select(valid[c], vmax(v, p[c]), v);
          mx = hmax8(v);
          for (int c = 0; c < nc; ++c) e[c] = exp_of_classes(p[c] - mx, valid[c]);
        }
        f32x8 total = e[0];
        for (int c = 1; c < nc; ++c) total += e[c];
        const float s = hsum8(total), z = 1.f / s;
        for (int c = 0; c < nc; ++c) {
          p[c] = e[c] * z;
          part[c] += p[c];
        }
        if (geometric)
          for (int c = 0; c < nc; ++c) e[c] *= ratio[c];
        s_row[x] = s;
        m_row[x] = mx;
        if ((x & 15) == 15 || x == W - 1)
          for (int c = 0; c < nc; ++c) {
            store8(part_out, part[c]);
            for (int l = 0; l < 8; ++l) acc[8 * c + l] += static_cast<double>(part_out[l]);
            part[c] = f32x8{};
          }
        if (M == nullptr) continue;
        const int64_t t = tr[x];
        if (!counted(t, ignore_index, K, slot)) continue;
        if (t != cur) {
          if (cur >= 0) add_moments(cur, slot, factor, nc, a0, a1, w0, w1, h0, h1, r0, r1, c0, c1);
          cur = t;
          for (int c = 0; c < nc; ++c) a0[c] = a1[c] = f32x8{};
          w0 = w1 = 0.f;
        }
        const float l0 = ax.l0[x], l1 = ax.l1[x];
        for (int c = 0; c < nc; ++c) {
          a0[c] += l0 * p[c];
          a1[c] += l1 * p[c];
        }
        w0 += l0;
        w1 += l1;
      }
      if (cur >= 0) add_moments(cur, slot, factor, nc, a0, a1, w0, w1, h0, h1, r0, r1, c0, c1);
    }
    if (tr == nullptr) continue;
    for (int64_t x = 0; x < W4; x += 4)
      store4(lse.data() + x, load4(m_row.data() + x) + log_positive(load4(s_row.data() + x)));
    int64_t cur = -1;  // the CE of a run of pixels of one target class, summed before it is added to C
    double run = 0.0;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t t = tr[x];
      if (!counted(t, ignore_index, K, slot)) continue;
      if (t != cur) {
        if (cur >= 0) C[cur] += run;
        cur = t;
        run = 0.0;
      }
      run += static_cast<double>(lse[x] - lerp(h0, a[x * Kp + t], h1, b[x * Kp + t]));  // lse - up_t
    }
    if (cur >= 0) C[cur] += run;
  }
  if (M != nullptr)
    for (; held < h; ++held) write_row(held);
  for (int64_t k = 0; k < K; ++k) S[k] = acc[k];
}
PRIMAPS_SIMD_FUNCTION_VL(moments_image, moments_body)

// moments_image on the chunk count of K's Kp (in registers up to K = 32).
template <typename... A>
void moments_of_image(int64_t K, A&&... a) {
  switch (padded_classes(K) / 8) {
    case 1:
      return moments_image(std::integral_constant<int, 1>{}, std::forward<A>(a)...);
    case 2:
      return moments_image(std::integral_constant<int, 2>{}, std::forward<A>(a)...);
    case 3:
      return moments_image(std::integral_constant<int, 3>{}, std::forward<A>(a)...);
    case 4:
      return moments_image(std::integral_constant<int, 4>{}, std::forward<A>(a)...);
    default:
      return moments_image(std::integral_constant<int, 0>{}, std::forward<A>(a)...);
  }
}

// sums (B, K) float64 = the per-image sums of softmax(up) (focal_moments without a target).
void focal_confidence(FloatArray logits, int64_t H, int64_t W, DoubleArray sums, int threads) {
  check_ndim(logits, 4, "logits");
  check_ndim(sums, 2, "sums");
  const int64_t B = logits.shape(0), K = logits.shape(1), h = logits.shape(2), w = logits.shape(3);
  if (sums.shape(0) != B || sums.shape(1) != K) throw std::invalid_argument("sums: expected (B, K)");
  if (K < 1 || h < 1 || w < 1 || H < 1 || W < 1) throw std::invalid_argument("focal_confidence: empty input");
  const float* L = logits.data();
  double* S = sums.mutable_data();
  const Axis ay(h, H), ax(w, W);
  const std::vector<int64_t> rows = segments(ay, H), cols = segments(ax, W);
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    moments_of_image(K, L + b * K * h * w, nullptr, nullptr, nullptr, int64_t{0}, K, int64_t{0}, h, w, ay, ax, rows,
                     cols, H, W, S + b * K, nullptr, nullptr);
  });
}

// weight (K,) from sums (B, K): the per-image sums added in image order, then focal_class_weight.
void focal_class_weights(DoubleArray sums, double num_pixels, float gamma, FloatArray weight) {
  check_ndim(sums, 2, "sums");
  check_ndim(weight, 1, "weight");
  const int64_t B = sums.shape(0), K = sums.shape(1);
  if (weight.shape(0) != K) throw std::invalid_argument("weight: expected shape (K,) of sums (B, K)");
  if (!(num_pixels > 0)) throw std::invalid_argument("num_pixels: must be > 0");
  const double* S = sums.data();
  float* Wt = weight.mutable_data();
  for (int64_t k = 0; k < K; ++k) {
    double total = 0.0;
    for (int64_t b = 0; b < B; ++b) total += S[b * K + k];
    Wt[k] = focal_class_weight(total, num_pixels, gamma);
  }
}

// Every slot (focal_target_classes) below R, the slots the moments hold: never past them.
inline void check_slots(const int32_t* slot, int64_t n, int64_t R) {
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] >= R) throw std::invalid_argument("slot: a slot beyond the moments' R");
}

// The classes present in each image's target, and its bad values: slot (B, K) int32 = the rank of class
// c among the classes of image b's target, -1 where absent; bad (B,) int64 = the count of values neither
// in [0, K) nor ignore_index. The first read of the target; the moments are kept for present classes only.
void focal_target_classes(Int64Array target, int64_t ignore_index, Int32Array slot, Int64Array bad, int threads) {
  check_ndim(target, 3, "target");
  check_ndim(slot, 2, "slot");
  check_ndim(bad, 1, "bad");
  const int64_t B = target.shape(0), n = target.shape(1) * target.shape(2), K = slot.shape(1);
  if (slot.shape(0) != B || bad.shape(0) != B) throw std::invalid_argument("slot/bad: expected (B, K) and (B,)");
  const int64_t* T = target.data();
  int32_t* Sl = slot.mutable_data();
  int64_t* bp = bad.mutable_data();
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    std::vector<uint8_t> seen(K, 0);
    int64_t n_bad = 0;
    for (const int64_t *t = T + b * n, *end = t + n; t != end; ++t) {
      if (*t == ignore_index) continue;
      if (*t < 0 || *t >= K)
        ++n_bad;
      else
        seen[*t] = 1;
    }
    int32_t rank = 0;
    for (int64_t c = 0; c < K; ++c) Sl[b * K + c] = seen[c] ? rank++ : -1;
    bp[b] = n_bad;
  });
}

// One pass over the batch: sums (B, K) f64, class_loss (B, K) f64 and, when with_grad, moments
// (B, h, w, R, Kp) f32 for the slots (B, K) (R >= the slots of any image) and the factors (K,) of
// moments_body.
void focal_moments(FloatArray logits, Int64Array target, Int32Array slot, FloatArray factor, int64_t ignore_index,
                   DoubleArray sums, DoubleArray class_loss, FloatArray moments, bool with_grad, int threads) {
  check_ndim(logits, 4, "logits");
  check_ndim(target, 3, "target");
  check_ndim(slot, 2, "slot");
  check_ndim(factor, 1, "factor");
  check_ndim(sums, 2, "sums");
  check_ndim(class_loss, 2, "class_loss");
  const int64_t B = logits.shape(0), K = logits.shape(1), h = logits.shape(2), w = logits.shape(3);
  const int64_t H = target.shape(1), W = target.shape(2);
  if (target.shape(0) != B || slot.shape(0) != B || slot.shape(1) != K || factor.shape(0) != K ||
      sums.shape(0) != B || sums.shape(1) != K || class_loss.shape(0) != B || class_loss.shape(1) != K)
    throw std::invalid_argument("target/slot/factor/sums/class_loss: shapes do not match logits");
  if (K < 1 || h < 1 || w < 1 || H < 1 || W < 1) throw std::invalid_argument("focal_loss: empty input");
  const int32_t* Sl = slot.data();
  int64_t R = 0;
  if (with_grad) {
    check_ndim(moments, 5, "moments");
    R = moments.shape(3);
    const int64_t want[5] = {B, h, w, R, padded_classes(K)};
    for (int d = 0; d < 5; ++d)
      if (moments.shape(d) != want[d]) throw std::invalid_argument("moments: expected (B, h, w, R, Kp)");
    check_slots(Sl, B * K, R);
  }
  const float* L = logits.data();
  const int64_t* T = target.data();
  const float* F = factor.data();
  double *Sp = sums.mutable_data(), *Cp = class_loss.mutable_data();
  float* Mp = with_grad ? moments.mutable_data() : nullptr;
  const Axis ay(h, H), ax(w, W);
  const std::vector<int64_t> rows = segments(ay, H), cols = segments(ax, W);
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    float* Mb = Mp == nullptr ? nullptr : Mp + b * h * w * R * padded_classes(K);
    moments_of_image(K, L + b * K * h * w, T + b * H * W, Sl + b * K, F, ignore_index, K, R, h, w, ay, ax, rows,
                     cols, H, W, Sp + b * K, Cp + b * K, Mb);
  });
}

// grad (B, K, h, w) = sum_c weight[c] * moments[b, iy, ix, slot[b, c], k] / num_pixels over the classes
// with a slot, summed in float64 (moments and slot as focal_moments and focal_target_classes write them).
void focal_combine(FloatArray moments, Int32Array slot, FloatArray weight, double num_pixels, FloatArray grad,
                   int threads) {
  check_ndim(moments, 5, "moments");
  check_ndim(slot, 2, "slot");
  check_ndim(weight, 1, "weight");
  check_ndim(grad, 4, "grad");
  const int64_t B = moments.shape(0), h = moments.shape(1), w = moments.shape(2), R = moments.shape(3);
  const int64_t Kp = moments.shape(4), K = weight.shape(0);
  if (Kp != padded_classes(K) || slot.shape(0) != B || slot.shape(1) != K || grad.shape(0) != B ||
      grad.shape(1) != K || grad.shape(2) != h || grad.shape(3) != w)
    throw std::invalid_argument("moments/slot/weight/grad: expected (B, h, w, R, Kp), (B, K), (K,), (B, K, h, w)");
  if (!(num_pixels > 0)) throw std::invalid_argument("num_pixels: must be > 0");
  const float* Mp = moments.data();
  const int32_t* Sl = slot.data();
  check_slots(Sl, B * K, R);
  const float* Wt = weight.data();
  float* G = grad.mutable_data();
  py::gil_scoped_release release;
  parallel_for(B, threads, [&](int64_t b) {
    std::vector<double> acc(Kp);
    const int32_t* sb = Sl + b * K;
    for (int64_t j = 0; j < h * w; ++j) {
      const float* m = Mp + (b * h * w + j) * R * Kp;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t c = 0; c < K; ++c) {
        if (sb[c] < 0) continue;
        const double wc = Wt[c];
        const float* __restrict mc = m + sb[c] * Kp;
        double* __restrict ap = acc.data();
        for (int64_t k = 0; k < Kp; ++k) ap[k] += wc * static_cast<double>(mc[k]);
      }
      for (int64_t k = 0; k < K; ++k) G[(b * K + k) * h * w + j] = static_cast<float>(acc[k] / num_pixels);
    }
  });
}

static Registrar reg([](py::module_& m) {
  m.def("focal_confidence", &focal_confidence, py::arg("logits"), py::arg("H"), py::arg("W"),
        py::arg("sums"), py::arg("threads"),
        "Per-image sums of softmax of the bilinearly upsampled logits, (B, K) float64.");
  m.def("focal_class_weights", &focal_class_weights, py::arg("sums"), py::arg("num_pixels"),
        py::arg("gamma"), py::arg("weight"),
        "Focal class weights (1 - sum_b sums[b, k] / num_pixels) ** gamma, float32 (K,).");
  m.def("focal_target_classes", &focal_target_classes, py::arg("target"), py::arg("ignore_index"), py::arg("slot"),
        py::arg("bad"), py::arg("threads"),
        "Slots (B, K) int32 of the classes present in each image's target and its bad-value counts (B,).");
  m.def("focal_moments", &focal_moments, py::arg("logits"), py::arg("target"), py::arg("slot"), py::arg("factor"),
        py::arg("ignore_index"), py::arg("sums"), py::arg("class_loss"), py::arg("moments"), py::arg("with_grad"),
        py::arg("threads"),
        "One pass: softmax sums, per-class CE sums and the gradient moments (B, h, w, R, Kp).");
  m.def("focal_combine", &focal_combine, py::arg("moments"), py::arg("slot"), py::arg("weight"),
        py::arg("num_pixels"), py::arg("grad"), py::arg("threads"),
        "The gradient (B, K, h, w) from the moments and the class weights, divided by num_pixels.");
});

}  // namespace
