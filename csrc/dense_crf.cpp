// Dense CRF: the mean field of pydensecrf (Krähenbühl's "v2" code), batched, GIL released.
//
// Same arithmetic as pydensecrf's SSE path, step by step: float32 elevation, round half to even,
// strict-< rank, barycentric weights with wrap-around, splat in pixel order, one-ring blur along
// axes 0..d, slice with alpha, symmetric normalisation computed through the lattice, Potts -w,
// parallel update, softmax with the max subtracted (a vectorised Cephes expf, as Eigen's exp in
// pydensecrf). No sum depends on how vertices or pixels are numbered (each vertex accumulates its
// pixels in raster order; blur and slice are per vertex and per pixel), so results match pydensecrf
// up to the last bits of exp/log, and do not depend on the thread count.
//
// Layout, chosen for memory locality (the time goes into moving label rows):
// - Vertices are numbered in order of their packed keys (a stable radix sort of every pixel's d+1
//   keys, which also yields the splat's CSR list with pixels ascending). The blur neighbours of
//   vertex v along an axis are key(v) + const, so over v in order they are monotone streams (found by
//   a merge); the working set of a blur pass is a few slabs of the most significant key coordinate.
// - The bilateral term runs over the pixels sorted by their simplex (the order of their remainder-0
//   vertex), so the vertices a run of pixels slices from or splats into are near each other too.
// - The Gaussian term depends only on the grid and is built once per batch; it runs in raster order
//   (its keys are packed so that key order is nearly raster order), and the update pass exchanges one
//   row per pixel between the two orders.
// Label rows are padded to a multiple of 4 lanes (4-lane vectors, SSE2 on x86-64); per lane the
// operations and their order are pydensecrf's. Threads: one image per thread, or one image on a team
// of threads that split vertices and pixels into fixed ranges.
#include "common.h"
#include "fast_exp.h"

#include <array>
#include <cmath>
#include <condition_variable>
#include <future>
#include <limits>

#ifdef CRF_PROFILE
#include <ctime>
double crf_prof_[32];
inline double crf_now_() { timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec + 1e-9 * ts.tv_nsec; }
int crf_knob_[8] = {16, 0, 0, 0, 0, 0, 0, 0};
#define PROF_T0 double prof_t_ = crf_now_();
#define PROF(i) { double n_ = crf_now_(); crf_prof_[i] += n_ - prof_t_; prof_t_ = n_; }
#else
#define PROF_T0
#define PROF(i) {}
#endif
namespace {

using primaps::f32x4;
using primaps::i32x4;
using primaps::load4;
using primaps::parallel_for;
using primaps::store4;

// [begin, end) of part t of [0, n) split into T contiguous parts.
inline std::pair<int64_t, int64_t> part(int64_t n, int t, int T) { return {n * t / T, n * (t + 1) / T}; }

// Runs fn(begin, end) over [0, n) split into `threads` contiguous parts.
template <typename F>
void chunked(int64_t n, int threads, const F& fn) {
  if (threads <= 1 || n < 4096) {
    fn(int64_t(0), n);
    return;
  }
  parallel_for(threads, threads, [&](int64_t t) {
    auto [b, e] = part(n, static_cast<int>(t), threads);
    fn(b, e);
  });
}

// A barrier for a fixed team: spins briefly (phases are short), then sleeps.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const uint64_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        gen_.store(gen + 1, std::memory_order_release);
      }
      cv_.notify_all();
      return;
    }
    for (int i = 0; i < 20000; ++i)
      if (gen_.load(std::memory_order_acquire) != gen) return;
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != gen; });
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<uint64_t> gen_{0};
  std::mutex mutex_;
  std::condition_variable cv_;
};

// Runs body(t, T, barrier) on T threads (the caller's included). body must not throw.
template <typename F>
void team(int T, const F& body) {
  Barrier barrier(T);
  std::vector<std::thread> pool;
  for (int t = 1; t < T; ++t) pool.emplace_back([&, t] { body(t, T, barrier); });
  body(0, T, barrier);
  for (auto& th : pool) th.join();
}

// Stable LSD radix sort of (key, idx) by key, keys < 2^bits; 8-bit digits, digits on which every key
// agrees are skipped. Fixed parts per thread, so the result does not depend on the thread count.
void radix_sort(std::vector<uint64_t>& key, std::vector<uint32_t>& idx, int bits, int threads) {
  const int64_t n = static_cast<int64_t>(key.size());
  const int T = n < 65536 ? 1 : std::max(1, threads);
  std::vector<uint64_t> key2(n);
  std::vector<uint32_t> idx2(n);
  std::vector<std::array<int64_t, 256>> hist(T);
  for (int shift = 0; shift < bits; shift += 8) {
    parallel_for(T, T, [&](int64_t t) {
      auto [b, e] = part(n, static_cast<int>(t), T);
      std::array<int64_t, 256>& h = hist[t];
      h.fill(0);
      for (int64_t i = b; i < e; ++i) ++h[(key[i] >> shift) & 255];
    });
    int64_t total[256] = {};
    for (int t = 0; t < T; ++t)
      for (int g = 0; g < 256; ++g) total[g] += hist[t][g];
    if (std::count(total, total + 256, n) == 1) continue;  // one digit value: the pass is the identity
    int64_t run = 0;
    for (int g = 0; g < 256; ++g)
      for (int t = 0; t < T; ++t) {
        const int64_t c = hist[t][g];
        hist[t][g] = run;
        run += c;
      }
    parallel_for(T, T, [&](int64_t t) {
      auto [b, e] = part(n, static_cast<int>(t), T);
      std::array<int64_t, 256>& h = hist[t];
      for (int64_t i = b; i < e; ++i) {
        const int64_t dst = h[(key[i] >> shift) & 255]++;
        key2[dst] = key[i];
        idx2[dst] = idx[i];
      }
    });
    key.swap(key2);
    idx.swap(idx2);
  }
}

// A permutohedral lattice over N pixels. Pixels are numbered in the lattice's pixel order: raster
// order, or (sorted = true) the order of each pixel's remainder-0 vertex, raster within a vertex;
// `raster` maps a position to its raster pixel.
struct Lattice {
  int d = 0;
  int64_t N = 0, M = 0;
  std::vector<int32_t> raster;  // (N) raster pixel at each position (sorted lattices only)
  std::vector<int32_t> offset;  // (N, d+1) vertex ids by remainder, by position
  std::vector<float> bary;      // (N, d+1) barycentric weights, by position
  std::vector<int64_t> start;   // (M+1) CSR over (position, weight), raster order within a vertex
  std::vector<int32_t> pix;
  std::vector<float> wgt;
  std::vector<int32_t> nbr;     // (d+1, M, 2): n1, n2; M = the zero row
  std::vector<float> norm;      // (N) 1/sqrt(K 1 + 1e-20), by position
};

// Elevates pixel features f (d floats) onto the lattice with pydensecrf's SSE arithmetic: the
// remainder-0 vertex r0 (d+1 coordinates, multiples of d+1), the rank of each coordinate and the
// barycentric weights. sf: the per-axis elevation scales. False when a coordinate is beyond the
// range where float32 rounding is exact (|v| >= 2^22).
template <int d>
inline bool elevate(const float* f, const float* sf, int32_t* r0_out, int8_t* rank_out, float* bary) {
  constexpr int D = d + 1;
  const float invd = 1.0f / D, dp1 = static_cast<float>(D);
  float el[D], r0[D], rank[D], bc[D + 1];
  float sm = 0.f;
  for (int j = d; j > 0; --j) {
    float cf = f[j - 1] * sf[j - 1];
    el[j] = sm - static_cast<float>(j) * cf;
    sm += cf;
  }
  el[0] = sm;
  float sum = 0.f;
  bool ok = true;
  for (int i = 0; i < D; ++i) {
    float x = invd * el[i];
    ok = ok && std::fabs(x) < 4194304.f;
    float v = (x + 12582912.f) - 12582912.f;  // round half to even, as cvtps2dq (exact for |x| < 2^22)
    r0[i] = v * dp1;
    sum += v;
  }
  if (!ok) return false;
  for (int i = 0; i < D; ++i) rank[i] = 0.f;
  for (int i = 0; i < d; ++i) {
    float di = el[i] - r0[i];
    for (int j = i + 1; j < D; ++j) {
      float c = (di < el[j] - r0[j]) ? 1.f : 0.f;
      rank[i] += c;
      rank[j] += 1.f - c;
    }
  }
  for (int i = 0; i < D; ++i) {
    rank[i] += sum;
    float fix = (rank[i] < 0.f ? dp1 : 0.f) - (rank[i] >= dp1 ? dp1 : 0.f);
    rank[i] += fix;
    r0[i] += fix;
  }
  for (int i = 0; i < D + 1; ++i) bc[i] = 0.f;
  for (int i = 0; i < D; ++i) {
    float v = (el[i] - r0[i]) * invd;
    int p = d - static_cast<int>(rank[i]);
    bc[p] += v;
    bc[p + 1] -= v;
  }
  bc[0] += 1.f + bc[D];
  for (int i = 0; i < D; ++i) {
    r0_out[i] = static_cast<int32_t>(r0[i]);
    rank_out[i] = static_cast<int8_t>(rank[i]);
    bary[i] = bc[i];
  }
  return true;
}

// Builds the lattice of features feat (N, d), raster order: elevation, keys packed into 64 bits
// (coordinates 1..d, coordinate d most significant: any d coordinates of a vertex determine it), a
// stable radix sort of the N (d+1) keys (vertex ids in key order, the CSR list in raster order within
// a vertex), blur neighbours by merging the sorted keys with key + delta. sorted: number the pixels
// in the order of their remainder-0 vertex.
template <int d>
void build_lattice(Lattice& lat, const std::vector<float>& feat, int64_t N, bool sorted, int threads) {
  constexpr int D = d + 1;
  constexpr int P0 = d == 5 ? 0 : 10;
  PROF_T0
  if (N * D > INT32_MAX) throw std::invalid_argument("images: too many pixels");
  lat.d = d;
  lat.N = N;
  std::vector<int32_t> rem(N * D);
  std::vector<int8_t> rk(N * D);
  std::vector<float> bary(N * D);
  const float inv_std = static_cast<float>(std::sqrt(2.0 / 3.0) * D);
  float sf[d];
  for (int i = 0; i < d; ++i) sf[i] = static_cast<float>(1.0 / std::sqrt(double((i + 2) * (i + 1))) * inv_std);
  // Elevation, with the range of each key coordinate per part of the pixels.
  const int parts = std::max(1, threads);
  std::vector<std::array<int32_t, D>> lo_c(parts), hi_c(parts);
  std::atomic<bool> too_large{false};
  parallel_for(parts, threads, [&](int64_t c) {
    auto [b, e] = part(N, static_cast<int>(c), parts);
    std::array<int32_t, D>& lo = lo_c[c];
    std::array<int32_t, D>& hi = hi_c[c];
    lo.fill(INT32_MAX);
    hi.fill(INT32_MIN);
    for (int64_t k = b; k < e; ++k) {
      if (!elevate<d>(&feat[k * d], sf, &rem[k * D], &rk[k * D], &bary[k * D])) {
        too_large = true;
        return;
      }
      for (int i = 1; i < D; ++i) {
        lo[i] = std::min(lo[i], rem[k * D + i]);
        hi[i] = std::max(hi[i], rem[k * D + i]);
      }
    }
  });
  PROF(P0 + 0)
  if (too_large)
    throw std::invalid_argument("features: lattice coordinates too large (sxy/srgb too small for these inputs)");
  // Key layout: each coordinate's range, widened so the blur neighbours' keys pack without carries.
  int64_t lo[D];
  int shift[D];
  int bits = 0;
  for (int i = 1; i < D; ++i) {
    int64_t l = INT32_MAX, h = INT32_MIN;
    for (int c = 0; c < parts; ++c) {
      l = std::min<int64_t>(l, lo_c[c][i]);
      h = std::max<int64_t>(h, hi_c[c][i]);
    }
    lo[i] = l - 3 * D;  // canonical offsets lie in [-d, d], neighbours add at most d+1
    h += 3 * D;
    int w = 0;
    while ((int64_t(1) << w) <= h - lo[i] && w < 63) ++w;
    shift[i] = bits;
    bits += w;
  }
#ifdef CRF_PROFILE
  if (getenv("CRF_BITS")) fprintf(stderr, "d=%d bits=%d\n", d, bits);
#endif
  if (bits > 62)
    throw std::invalid_argument("features: lattice keys need " + std::to_string(bits) +
                                " bits (> 62): the image is too large or sxy/srgb too small");
  // Vertex r of a pixel: r0 + r on the coordinates of rank <= d - r, r - (d+1) on the others.
  const int64_t n = N * D;
  std::vector<uint64_t> keys(n);
  std::vector<uint32_t> idx(n);
  chunked(N, threads, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      for (int r = 0; r < D; ++r) {
        uint64_t key = 0;
        for (int i = 1; i < D; ++i) {
          const int c = rk[k * D + i] <= d - r ? r : r - D;
          key += static_cast<uint64_t>(rem[k * D + i] + c - lo[i]) << shift[i];
        }
        keys[k * D + r] = key;
        idx[k * D + r] = static_cast<uint32_t>(k * D + r);
      }
  });
  rem = {};
  rk = {};
  PROF(P0 + 1)
  radix_sort(keys, idx, bits, threads);
  PROF(P0 + 2)
  // Vertex ids: runs of equal keys.
  std::vector<uint64_t> vkey;
  lat.start.clear();
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || keys[i] != keys[i - 1]) {
      vkey.push_back(keys[i]);
      lat.start.push_back(i);
    }
  const int64_t M = static_cast<int64_t>(vkey.size());
  lat.M = M;
  lat.start.push_back(n);
  keys = {};
  // Pixel positions: raster order, or the order of the remainder-0 entries in the sorted list.
  std::vector<int32_t> pos(N);
  if (sorted) {
    lat.raster.resize(N);
    int64_t p = 0;
    for (int64_t i = 0; i < n; ++i)
      if (idx[i] % D == 0) {
        lat.raster[p] = static_cast<int32_t>(idx[i] / D);
        pos[idx[i] / D] = static_cast<int32_t>(p++);
      }
  } else {
    lat.raster.resize(N);
    for (int64_t k = 0; k < N; ++k) pos[k] = lat.raster[k] = static_cast<int32_t>(k);
  }
  PROF(P0 + 3)
  lat.offset.resize(n);
  lat.bary.resize(n);
  lat.pix.resize(n);
  lat.wgt.resize(n);
  chunked(M, threads, [&](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; ++v)
      for (int64_t i = lat.start[v]; i < lat.start[v + 1]; ++i) {
        const int64_t k = idx[i] / D, r = idx[i] % D;
        lat.offset[int64_t(pos[k]) * D + r] = static_cast<int32_t>(v);
        lat.bary[int64_t(pos[k]) * D + r] = bary[idx[i]];
        lat.pix[i] = pos[k];
        lat.wgt[i] = bary[idx[i]];
      }
  });
  PROF(P0 + 4)
  // Blur neighbours along axis j: n1 = key - 1 on every coordinate + (d+1) on axis j, n2 the
  // opposite, so u = n1(v) exactly when v = n2(u): one merge per axis. Absent ones point at the zero
  // row M.
  lat.nbr.assign(D * M * 2, static_cast<int32_t>(M));
  uint64_t unit = 0;
  for (int i = 1; i < D; ++i) unit += uint64_t(1) << shift[i];
  const int mparts = M < 65536 ? 1 : std::max(1, threads);
  parallel_for(D * mparts, threads, [&](int64_t job) {
    const int j = static_cast<int>(job / mparts);
    auto [b, e] = part(M, static_cast<int>(job % mparts), mparts);
    const uint64_t delta = (j > 0 ? (uint64_t(D) << shift[j]) : 0) - unit;
    int32_t* out = &lat.nbr[j * M * 2];
    if (b == e) return;
    int64_t u = std::lower_bound(vkey.begin(), vkey.end(), vkey[b] + delta) - vkey.begin();
    for (int64_t v = b; v < e; ++v) {
      const uint64_t target = vkey[v] + delta;
      while (u < M && vkey[u] < target) ++u;
      if (u < M && vkey[u] == target) {
        out[2 * v] = static_cast<int32_t>(u);
        out[2 * u + 1] = static_cast<int32_t>(v);
      }
    }
  });
  PROF(P0 + 5)
}

// norm = 1 / sqrt(K 1 + 1e-20), K 1 through the lattice with pydensecrf's scalar path (one
// channel: the blur adds 0.5 (n1 + n2) in double).
void compute_norm(Lattice& lat, int threads) {
  PROF_T0
  const int64_t M = lat.M, N = lat.N;
  const int D = lat.d + 1;
  std::vector<float> vals(M + 1, 0.f), tmp(M + 1, 0.f);
  chunked(M, threads, [&](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; ++v) {
      float s = 0.f;
      for (int64_t i = lat.start[v]; i < lat.start[v + 1]; ++i) s += lat.wgt[i] * 1.0f;
      vals[v] = s;
    }
  });
  for (int j = 0; j <= lat.d; ++j) {
    const int32_t* nb = &lat.nbr[j * M * 2];
    chunked(M, threads, [&](int64_t b, int64_t e) {
      for (int64_t v = b; v < e; ++v)
        tmp[v] = static_cast<float>(vals[v] + 0.5 * (vals[nb[2 * v]] + vals[nb[2 * v + 1]]));
    });
    vals.swap(tmp);
  }
  const float alpha = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-lat.d)));
  lat.norm.resize(N);
  chunked(N, threads, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      float s = 0.f;
      for (int r = 0; r < D; ++r) s += lat.bary[k * D + r] * vals[lat.offset[k * D + r]] * alpha;
      lat.norm[k] = static_cast<float>(1.0 / std::sqrt(double(s) + 1e-20));
    }
  });
  PROF(lat.d == 5 ? 6 : 16)
}

// exp of four lanes x <= 0, 0 below -87.33 (where expf leaves the normal floats) and for -inf.
inline f32x4 exp4_nonpositive(f32x4 x) {
  const f32x4 lo = f32x4{} - 87.33f;
  return x < lo ? f32x4{} : primaps::exp_nonpositive(x < lo ? lo : x);
}

// Softmax of t (nv vectors) into q: max subtracted, divided by the sum (summed as pydensecrf's SSE
// code, (s0 + s1) + (s2 + s3) over the lane sums). Padding lanes hold -inf, so they come out 0.
inline void softmax_lanes(const f32x4* t, f32x4* q, int nv) {
  f32x4 m = t[0];
  for (int i = 1; i < nv; ++i) m = m > t[i] ? m : t[i];
  f32x4 r = __builtin_shuffle(m, i32x4{2, 3, 0, 1});
  m = m > r ? m : r;
  r = __builtin_shuffle(m, i32x4{1, 0, 3, 2});
  m = m > r ? m : r;  // every lane holds the max
  f32x4 sum = {};
  for (int i = 0; i < nv; ++i) {
    q[i] = exp4_nonpositive(t[i] - m);
    sum += q[i];
  }
  sum += __builtin_shuffle(sum, i32x4{1, 0, 3, 2});
  sum += __builtin_shuffle(sum, i32x4{2, 3, 0, 1});  // every lane holds (s0 + s1) + (s2 + s3)
  for (int i = 0; i < nv; ++i) q[i] = q[i] / sum;
}

// Splat rows qn (Q * norm, by position) over the CSR list into vals, vertices [b, e).
template <int NV>
inline void splat(const Lattice& lat, const float* qn, float* vals, int V, int64_t b, int64_t e) {
  const int nv = NV ? NV : V / 4;
  f32x4 acc[NV ? NV : 64];
  for (int64_t v = b; v < e; ++v) {
    for (int i = 0; i < nv; ++i) acc[i] = f32x4{};
    for (int64_t j = lat.start[v]; j < lat.start[v + 1]; ++j) {
      const float w = lat.wgt[j];
      const float* q = qn + int64_t(lat.pix[j]) * V;
      for (int i = 0; i < nv; ++i) acc[i] += w * load4(q + 4 * i);
    }
    for (int i = 0; i < nv; ++i) store4(vals + v * V + 4 * i, acc[i]);
  }
}

// s += w * v * alpha over nv vectors. SEQ multiplies in pydensecrf's scalar order, (w * v) * alpha;
// the SSE path folds w * alpha first.
template <bool SEQ, int NV>
inline void slice_add(f32x4* s, float w, float alpha, const float* v, int nv_dyn) {
  const int nv = NV ? NV : nv_dyn;
  if constexpr (SEQ) {
    for (int i = 0; i < nv; ++i) s[i] += w * load4(v + 4 * i) * alpha;
  } else {
    const float wa = w * alpha;
    for (int i = 0; i < nv; ++i) s[i] += wa * load4(v + 4 * i);
  }
}

// s (nv vectors) = alpha * the barycentric interpolation of vals at position k.
template <bool SEQ, int NV>
inline void slice_into(const Lattice& lat, const float* vals, int64_t k, int V, float alpha, f32x4* s) {
  const int D = lat.d + 1, nv = NV ? NV : V / 4;
  for (int i = 0; i < nv; ++i) s[i] = f32x4{};
  for (int r = 0; r < D; ++r)
    slice_add<SEQ, NV>(s, lat.bary[k * D + r], alpha, vals + int64_t(lat.offset[k * D + r]) * V, nv);
}

// One blur step n = o + 0.5 (a + c) over nv vectors; SEQ in double per lane, as pydensecrf's scalar path.
template <bool SEQ, int NV>
inline void blur_row(float* n, const float* o, const float* a, const float* c, int nv_dyn) {
  const int nv = NV ? NV : nv_dyn;
  for (int i = 0; i < nv; ++i) {
    const f32x4 vo = load4(o + 4 * i), va = load4(a + 4 * i), vc = load4(c + 4 * i);
    if constexpr (SEQ) {  // the float sum n1 + n2, then 0.5 * it + o in double
      typedef double f64x2 __attribute__((vector_size(16)));
      typedef float f32x2 __attribute__((vector_size(8)));
      const f32x4 ac = va + vc;
      const f32x2 lo_o = {vo[0], vo[1]}, hi_o = {vo[2], vo[3]}, lo_s = {ac[0], ac[1]}, hi_s = {ac[2], ac[3]};
      const f64x2 lo = __builtin_convertvector(lo_o, f64x2) + 0.5 * __builtin_convertvector(lo_s, f64x2);
      const f64x2 hi = __builtin_convertvector(hi_o, f64x2) + 0.5 * __builtin_convertvector(hi_s, f64x2);
      const f32x2 l2 = __builtin_convertvector(lo, f32x2), h2 = __builtin_convertvector(hi, f32x2);
      store4(n + 4 * i, f32x4{l2[0], l2[1], h2[0], h2[1]});
    } else {
      store4(n + 4 * i, vo + 0.5f * (va + vc));
    }
  }
}

// The Gaussian lattice of an H x W grid, built without sorting: the remainder-k points of the 2-d
// permutohedral lattice are i (1,1,-2) + j (2,-1,-1); row R = 2i + j follows y and column j / 2
// follows x, so vertices numbered row by row come in nearly raster order, and every blur neighbour
// is a fixed (row, column) step. Entries no pixel touches are not vertices. False when the grid
// would be much larger than the lattice (sxy well below 1).
bool build_grid_lattice(Lattice& lat, int64_t H, int64_t W, float sxy, int threads) {
  const int64_t N = H * W;
  const float inv_std = static_cast<float>(std::sqrt(2.0 / 3.0) * 3);
  const float sf[2] = {static_cast<float>(1.0 / std::sqrt(2.0) * inv_std),
                       static_cast<float>(1.0 / std::sqrt(6.0) * inv_std)};
  std::vector<int32_t> Rv(N * 3), Jv(N * 3);
  lat.bary.resize(N * 3);
  std::atomic<bool> too_large{false};
  chunked(N, threads, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const float f[2] = {static_cast<float>(k % W) / sxy, static_cast<float>(k / W) / sxy};
      int32_t rem[3];
      int8_t rk[3];
      if (!elevate<2>(f, sf, rem, rk, &lat.bary[k * 3])) {
        too_large = true;
        return;
      }
      for (int r = 0; r < 3; ++r) {
        const int32_t k0 = rem[0] + (rk[0] <= 2 - r ? r : r - 3), k1 = rem[1] + (rk[1] <= 2 - r ? r : r - 3);
        const int32_t j = (k0 - k1) / 3, i = k1 + j;
        Rv[k * 3 + r] = 2 * i + j;
        Jv[k * 3 + r] = j;
      }
    }
  });
  if (too_large) return false;
  const int64_t Rmin = *std::min_element(Rv.begin(), Rv.end()), Rmax = *std::max_element(Rv.begin(), Rv.end());
  const int64_t jmin = *std::min_element(Jv.begin(), Jv.end()), jmax = *std::max_element(Jv.begin(), Jv.end());
  const int64_t rows = Rmax - Rmin + 1, width = ((jmax - jmin) >> 1) + 3;  // a free column at each end
  if (rows * width > 4 * N + 4096) return false;
  // Vertex ids: the touched entries, row by row.
  std::vector<int32_t> id(rows * width, 0), cell(N * 3);
  for (int64_t i = 0; i < N * 3; ++i) {
    cell[i] = static_cast<int32_t>((Rv[i] - Rmin) * width + ((Jv[i] - jmin) >> 1) + 1);
    id[cell[i]] = 1;
  }
  int64_t M = 0;
  for (auto& x : id) x = x ? static_cast<int32_t>(M++) : -1;
  lat.d = 2;
  lat.N = N;
  lat.M = M;
  lat.raster.resize(N);
  for (int64_t k = 0; k < N; ++k) lat.raster[k] = static_cast<int32_t>(k);
  lat.offset.resize(N * 3);
  lat.start.assign(M + 1, 0);
  for (int64_t i = 0; i < N * 3; ++i) {
    lat.offset[i] = id[cell[i]];
    ++lat.start[lat.offset[i] + 1];
  }
  for (int64_t v = 0; v < M; ++v) lat.start[v + 1] += lat.start[v];
  // CSR filled in raster order, so pixels ascend within a vertex.
  lat.pix.resize(N * 3);
  lat.wgt.resize(N * 3);
  std::vector<int64_t> cursor(lat.start.begin(), lat.start.end() - 1);
  for (int64_t i = 0; i < N * 3; ++i) {
    const int64_t dst = cursor[lat.offset[i]]++;
    lat.pix[dst] = static_cast<int32_t>(i / 3);
    lat.wgt[dst] = lat.bary[i];
  }
  // Blur neighbours: n1 = key - 1 + 3 e_j is (row, j) + (1, 1), (1, -1), (-2, 0) for j = 0, 1, 2 and n2
  // the opposite. A row's entries have j = jmin + parity + 2 (column - 1) with parity = (R - jmin) & 1,
  // so a step dj moves the column by floor((parity + dj) / 2).
  const int dR[3] = {1, 1, -2}, dJ[3] = {1, -1, 0};
  lat.nbr.assign(3 * M * 2, static_cast<int32_t>(M));
  for (int64_t R = 0; R < rows; ++R) {
    const int par = static_cast<int>((R + Rmin - jmin) & 1);
    for (int64_t c = 1; c + 1 < width; ++c) {
      const int32_t v = id[R * width + c];
      if (v < 0) continue;
      for (int j = 0; j < 3; ++j)
        for (int side = 0; side < 2; ++side) {
          const int64_t R2 = R + (side ? -dR[j] : dR[j]), c2 = c + ((par + (side ? -dJ[j] : dJ[j])) >> 1);
          if (R2 >= 0 && R2 < rows && id[R2 * width + c2] >= 0) lat.nbr[(j * M + v) * 2 + side] = id[R2 * width + c2];
        }
    }
  }
  return true;
}

struct Params {
  int iterations;
  float pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat;
};

// The mean field of one image. The bilateral term runs over its pixel order (positions), the
// Gaussian term over raster order; rows are V lanes (labels padded with -inf in -U, so their Q is 0).
// Per iteration: splat both lattices, blur both axis by axis, slice the Gaussian term, then one pass
// over the positions slices the bilateral term, updates Q and writes the next Q * norm rows of both
// terms (the Gaussian's at the pixel's raster row).
template <bool SEQ, int NV>
void mean_field(const Lattice& gauss, const Lattice& bil, const Params& p, const float* unary, float* out, int L,
                int V, int threads) {
  const int64_t N = bil.N, Mb = bil.M, Mg = gauss.M;
  const int nv = NV ? NV : V / 4;
  const int32_t* raster = bil.raster.data();
  std::vector<float> negu(N * V), qn_b(N * V), qn_g(N * V), slice_g(N * V);
  std::vector<float> vg[2] = {std::vector<float>((Mg + 1) * V, 0.f), std::vector<float>((Mg + 1) * V, 0.f)};
  std::vector<float> vb[2] = {std::vector<float>((Mb + 1) * V, 0.f), std::vector<float>((Mb + 1) * V, 0.f)};
  const float alpha_g = 1.0f / (1 + std::pow(2.0f, -2.0f));
  const float alpha_b = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-bil.d)));
  const float mw_g = -p.pos_compat, mw_b = -p.bi_compat;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int T = std::max(1, std::min<int>(threads, static_cast<int>(N / 2048) + 1));
  team(T, [&](int t, int T, Barrier& bar) {
    f32x4 tl[NV ? NV : 64], sl[NV ? NV : 64], q[NV ? NV : 64];
    PROF_T0
    auto [pb, pe] = part(N, t, T);
    auto [gb, ge] = part(Mg, t, T);
    auto [bb, be] = part(Mb, t, T);
    // Q = softmax(t) at a position: the next splats' rows, or (last) Q itself.
    auto emit = [&](int64_t pos, int64_t k, bool last) {
      softmax_lanes(tl, q, nv);
      if (last) {
        for (int l = 0; l < L; ++l) out[l * N + k] = q[l / 4][l % 4];
        return;
      }
      const float nb = bil.norm[pos], ng = gauss.norm[k];
      for (int i = 0; i < nv; ++i) {
        store4(&qn_b[pos * V + 4 * i], q[i] * nb);
        store4(&qn_g[k * V + 4 * i], q[i] * ng);
      }
    };
    for (int64_t pos = pb; pos < pe; ++pos) {
      const int64_t k = raster[pos];
      for (int l = 0; l < V; ++l) negu[pos * V + l] = l < L ? -unary[l * N + k] : neg_inf;
      for (int i = 0; i < nv; ++i) tl[i] = load4(&negu[pos * V + 4 * i]);
      emit(pos, k, false);
    }
    bar.wait();
    if (t == 0) PROF(20)
    for (int it = 0; it < p.iterations; ++it) {
      splat<NV>(gauss, qn_g.data(), vg[0].data(), V, gb, ge);
      if (t == 0) PROF(21)
      splat<NV>(bil, qn_b.data(), vb[0].data(), V, bb, be);
      if (t == 0) PROF(22)
      bar.wait();
      for (int j = 0, cur = 0; j <= bil.d; ++j, cur = 1 - cur) {
        if (j <= 2)
          for (int64_t v = gb; v < ge; ++v) {
            const int32_t* nb = &gauss.nbr[(j * Mg + v) * 2];
            blur_row<SEQ, NV>(&vg[1 - cur][v * V], &vg[cur][v * V], &vg[cur][int64_t(nb[0]) * V],
                              &vg[cur][int64_t(nb[1]) * V], nv);
          }
        if (t == 0) PROF(23)
        for (int64_t v = bb; v < be; ++v) {
          const int32_t* nb = &bil.nbr[(j * Mb + v) * 2];
          blur_row<SEQ, NV>(&vb[1 - cur][v * V], &vb[cur][v * V], &vb[cur][int64_t(nb[0]) * V],
                            &vb[cur][int64_t(nb[1]) * V], nv);
        }
        if (t == 0) PROF(24)
        bar.wait();
      }
      for (int64_t k = pb; k < pe; ++k) {  // after 3 axes the Gaussian values are in buffer 1
        slice_into<SEQ, NV>(gauss, vg[1].data(), k, V, alpha_g, sl);
        for (int i = 0; i < nv; ++i) store4(&slice_g[k * V + 4 * i], sl[i] * gauss.norm[k]);
      }
      bar.wait();
      if (t == 0) PROF(25)
      const bool last = it + 1 == p.iterations;
      const float* fb = vb[0].data();  // after 6 axes
      for (int64_t pos = pb; pos < pe; ++pos) {
        const int64_t k = raster[pos];
        for (int i = 0; i < nv; ++i) tl[i] = load4(&negu[pos * V + 4 * i]) - mw_g * load4(&slice_g[k * V + 4 * i]);
        slice_into<SEQ, NV>(bil, fb, pos, V, alpha_b, sl);
        const float nm = bil.norm[pos];
        for (int i = 0; i < nv; ++i) tl[i] = tl[i] - mw_b * (sl[i] * nm);
        emit(pos, k, last);
      }
      if (t == 0) PROF(26)
      bar.wait();
    }
  });
}

template <bool SEQ>
void mean_field_any(const Lattice& gauss, const Lattice& bil, const Params& p, const float* unary, float* out,
                    int L, int threads) {
  const int V = (L + 3) / 4 * 4;
  switch (V / 4) {
    case 1: return mean_field<SEQ, 1>(gauss, bil, p, unary, out, L, V, threads);
    case 2: return mean_field<SEQ, 2>(gauss, bil, p, unary, out, L, V, threads);
    case 3: return mean_field<SEQ, 3>(gauss, bil, p, unary, out, L, V, threads);
    case 4: return mean_field<SEQ, 4>(gauss, bil, p, unary, out, L, V, threads);
    case 5: return mean_field<SEQ, 5>(gauss, bil, p, unary, out, L, V, threads);
    case 6: return mean_field<SEQ, 6>(gauss, bil, p, unary, out, L, V, threads);
    case 7: return mean_field<SEQ, 7>(gauss, bil, p, unary, out, L, V, threads);
    case 8: return mean_field<SEQ, 8>(gauss, bil, p, unary, out, L, V, threads);
    default: return mean_field<SEQ, 0>(gauss, bil, p, unary, out, L, V, threads);
  }
}

// Features of pydensecrf's DenseCRF2D: (x/sxy, y/sxy) and, with an image, its channels / srgb.
std::vector<float> crf_features(const uint8_t* img, int64_t H, int64_t W, float sxy, float srgb) {
  const int64_t N = H * W;
  const int d = img ? 5 : 2;
  std::vector<float> f(N * d);
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const int64_t k = y * W + x;
      f[k * d + 0] = static_cast<float>(x) / sxy;
      f[k * d + 1] = static_cast<float>(y) / sxy;
      if (img)
        for (int c = 0; c < 3; ++c) f[k * d + 2 + c] = static_cast<float>(img[c * N + k]) / srgb;
    }
  return f;
}

void build_gaussian(Lattice& gauss, int64_t H, int64_t W, float sxy, int threads) {
  if (!build_grid_lattice(gauss, H, W, sxy, threads))
    build_lattice<2>(gauss, crf_features(nullptr, H, W, sxy, 0.f), H * W, false, threads);
  compute_norm(gauss, threads);
}

void build_bilateral(Lattice& bil, const uint8_t* img, int64_t H, int64_t W, const Params& p, int threads) {
#ifdef CRF_PROFILE
  build_lattice<5>(bil, crf_features(img, H, W, p.bi_sxy, p.bi_srgb), H * W, !crf_knob_[1], threads);
#else
  build_lattice<5>(bil, crf_features(img, H, W, p.bi_sxy, p.bi_srgb), H * W, true, threads);
#endif
  compute_norm(bil, threads);
}

// Q without pairwise terms (no iterations, or one label): softmax(-U) per pixel.
void softmax_only(const float* unary, float* out, int64_t N, int L, int threads) {
  const int nv = (L + 3) / 4;
  chunked(N, threads, [&](int64_t b, int64_t e) {
    std::vector<f32x4> t(nv), q(nv);
    for (int64_t k = b; k < e; ++k) {
      for (int l = 0; l < 4 * nv; ++l) t[l / 4][l % 4] = l < L ? -unary[l * N + k] : -std::numeric_limits<float>::infinity();
      softmax_lanes(t.data(), q.data(), nv);
      for (int l = 0; l < L; ++l) out[l * N + k] = q[l / 4][l % 4];
    }
  });
}

// One image: its bilateral lattice (on build_threads), then the mean field (on threads). `gauss`
// yields the Gaussian lattice of the (H, W) grid, shared by the batch.
void crf_image(const uint8_t* img, const float* unary, float* out, int64_t H, int64_t W, int L, const Params& p,
               const std::shared_future<const Lattice*>& gauss_future, int build_threads, int threads) {
  if (p.iterations == 0 || L == 1) return softmax_only(unary, out, H * W, L, threads);
  Lattice bil;
  build_bilateral(bil, img, H, W, p, build_threads);
  const Lattice& gauss = *gauss_future.get();
  if (L <= 2)  // pydensecrf filters 1-2 channels with its scalar code path
    mean_field_any<true>(gauss, bil, p, unary, out, L, threads);
  else
    mean_field_any<false>(gauss, bil, p, unary, out, L, threads);
}

void dense_crf(const primaps::UInt8Array& images, const primaps::FloatArray& unary,
               const primaps::Int64Array& labels, primaps::FloatArray& out, int iterations, float pos_sxy,
               float pos_compat, float bi_sxy, float bi_srgb, float bi_compat, int threads) {
  primaps::check_ndim(images, 4, "images");
  primaps::check_ndim(unary, 1, "unary");
  primaps::check_ndim(labels, 1, "labels");
  primaps::check_ndim(out, 1, "out");
  const int64_t B = images.shape(0), H = images.shape(2), W = images.shape(3);
  if (images.shape(1) != 3) throw std::invalid_argument("images: expected 3 channels");
  if (labels.shape(0) != B) throw std::invalid_argument("labels: expected one count per image");
  if (iterations < 0) throw std::invalid_argument("iterations: expected >= 0");
  if (!(pos_sxy > 0 && bi_sxy > 0 && bi_srgb > 0))
    throw std::invalid_argument("sxy/srgb: expected > 0");
  const int64_t* lab = labels.data();
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (lab[b] < 1 || lab[b] > 1 << 20) throw std::invalid_argument("labels: expected counts >= 1");
    start[b + 1] = start[b] + lab[b] * H * W;
  }
  if (unary.shape(0) != start[B] || out.shape(0) != start[B])
    throw std::invalid_argument("unary/out: size does not match the label counts");
  if (H * W * 6 > INT32_MAX) throw std::invalid_argument("images: too many pixels");
  const Params p{iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat};
  const uint8_t* img = images.data();
  const float* un = unary.data();
  float* o = out.mutable_data();
  py::gil_scoped_release release;
  threads = std::max(1, threads);
  const int outer = static_cast<int>(std::min<int64_t>(threads, B));
  const int inner = std::max(1, threads / outer);
  // The Gaussian lattice depends only on (H, W, pos_sxy): built once for the batch, at the same time
  // as the first bilateral lattices when there are threads to spare (a single image gives it half of
  // them). gauss_future is destroyed first and, as the last reference to an async state, waits for
  // the task.
  Lattice gauss;
  const bool any = iterations > 0 && *std::max_element(lab, lab + B) > 1;
  const int gauss_threads = outer == 1 ? std::max(1, inner / 2) : 1;
  std::shared_future<const Lattice*> gauss_future =
      std::async(threads > 1 ? std::launch::async : std::launch::deferred, [&]() -> const Lattice* {
        if (any) build_gaussian(gauss, H, W, pos_sxy, gauss_threads);
        return &gauss;
      }).share();
  const int build_threads = outer == 1 && threads > 1 ? std::max(1, inner - gauss_threads) : inner;
  parallel_for(B, outer, [&](int64_t b) {
    crf_image(img + b * 3 * H * W, un + start[b], o + start[b], H, W, static_cast<int>(lab[b]), p, gauss_future,
              build_threads, inner);
  });
}

primaps::Registrar reg([](py::module_& m) {
#ifdef CRF_PROFILE
  m.def("knob", [](int i, int v) { crf_knob_[i] = v; });
  m.def("prof", []() { py::list l; for (int i = 0; i < 32; ++i) { l.append(crf_prof_[i]); crf_prof_[i] = 0; } return l; });
#endif
  m.def("dense_crf", &dense_crf, py::arg("images"), py::arg("unary"), py::arg("labels"), py::arg("out"),
        py::arg("iterations"), py::arg("pos_sxy"), py::arg("pos_compat"), py::arg("bi_sxy"), py::arg("bi_srgb"),
        py::arg("bi_compat"), py::arg("threads"),
        "Dense CRF (pydensecrf v2 mean field) of a batch: images uint8 (B,3,H,W), unary float32 flat "
        "(sum_b L_b*H*W, each (L_b,H,W)), labels int64 (B,) = L_b, out like unary.");
});

}  // namespace
