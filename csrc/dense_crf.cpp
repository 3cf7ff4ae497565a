// Dense CRF: the mean field of pydensecrf (Krähenbühl's "v2" code), batched, GIL released.
//
// Same arithmetic as pydensecrf's SSE path, step by step (docs/dense_crf.md; the lattices:
// dense_crf_lattice.h): splat in raster order, one-ring blur along axes 0..d, slice with alpha,
// symmetric normalisation computed through the lattice, Potts -w, parallel update, softmax with the
// max subtracted (a vectorised Cephes expf, as Eigen's exp in pydensecrf). No sum depends on how
// vertices or pixels are numbered (each vertex accumulates its pixels in raster order; blur and slice
// are per vertex and per pixel), so results match pydensecrf up to the last bits of exp/log, and do
// not depend on the thread count.
//
// The time goes into moving label rows through the lattices (memory, not arithmetic), so the layout
// is chosen for locality:
// - vertices in key order: a blur pass reads its neighbours from a window of a few slabs of the most
//   significant key coordinate;
// - the Gaussian term runs in raster order (its vertices come row by row); so does the bilateral
//   term, unless its lattice is large (textured images), where its pixels go in the order of their
//   simplices and the update pass exchanges one row per pixel with the Gaussian's raster order;
// - the update pass prefetches the rows it gathers (bilateral slice, exchange) a few pixels ahead, and
//   takes the softmax of 4 pixels at once (lanes = pixels);
// - the arrays sit on transparent huge pages (dense_crf_lattice.h: HugePageAllocator).
// Measured and dropped (320 px, 7 labels, one thread, interleaved runs): fusing the splat and all
// blur axes into one wavefront with ring buffers (+11 % on a photo, +19 % on a textured scene: the
// blur neighbours reach 2.8k-13.5k vertices, so the rings do not stay in L2); the Gaussian term as a
// row pipeline on its grid (slower than the lattice passes); moving the exchange rows through
// band-ordered slots (+12-24 %); prefetching the blur's rows, and the splat's on lattices in the order of
// their vertices (textured scenes: those streams are nearly sequential); radix-sort digits of 11 bits
// instead of 8 (one pass fewer: -10 % to +5 % of the build); vertices numbered in the order the raster
// scan first touches them, as pydensecrf's hash table does (+10 % on photographs, +70 % on textured
// scenes: the blur loses its locality); the Gaussian slice inside the update pass on photographs (no
// gain beyond the noise); smaller label chunks (see kChunk); on one thread, the splat pushed from the
// update pass, which holds each new row (update and splats +5 % on a photo with 3 labels, +50 % with
// 27: a vertex's pushes from neighbouring pixels wait on each other's stores); a pool keeping buffers
// mapped between calls (tried as glibc malloc without mmap or trimming: -3.4 % to +0.6 %, the noise);
// rows moved as 8-lane vectors in a build for AVX2 (the same bits; 0.84x-0.89x with 27 labels, 0.85x
// with 7) and rows padded to 16 or 32 lanes so that fewer of them straddle cache lines (0.96x-1.02x
// with 27 labels, 0.78x with 11); non-temporal stores for the blur's output rows when a chunk's values
// exceed 8 MiB (0.96x-1.00x).
// Label rows are padded to a multiple of 4 lanes (4-lane vectors, SSE2 on x86-64; the padding lanes
// of -U are -inf), in chunks of up to 32 lanes; per lane the operations and their order are
// pydensecrf's. Threads: one image per thread, or one image on a team of threads that split vertices
// and pixels into fixed ranges.
#include "dense_crf_lattice.h"
#include "fast_exp.h"

#include <condition_variable>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace primaps::dense_crf;
using primaps::f32x4;
using primaps::i32x4;
using primaps::load4;
using primaps::parallel_for;
using primaps::store4;

// Label rows: 64-byte aligned, so a row of up to 16 floats spans as few cache lines as it can.
using Rows = Buffer<float>;

// The update pass's gathers are latency-bound and their addresses are known a few pixels ahead:
// prefetch the row of V floats at p. So are the splat's on a lattice whose pixels are in raster order
// (photographs): a bilateral vertex gathers pixels from all over the image. (The blur's neighbour
// streams, and the splat's on lattices in vertex order, are nearly sequential: prefetching did not pay.)
constexpr int64_t kPrefetchAhead = 8;
inline void prefetch_row(const float* p, int V) {
  for (int o = 0; o < V; o += 16) __builtin_prefetch(p + o);
  __builtin_prefetch(p + V - 1);
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

// Runs body(t, T, barrier) on a team of up to T threads (the caller's included; OpenMP's, as in
// primaps::parallel_for): body gets the team's actual size, which OpenMP may make smaller than asked.
// body must not throw.
template <typename F>
void team(int T, const F& body) {
#ifdef _OPENMP
  std::unique_ptr<Barrier> barrier;
#pragma omp parallel num_threads(T)
  {
#pragma omp single
    barrier = std::make_unique<Barrier>(omp_get_num_threads());  // the single's end is a barrier
    body(omp_get_thread_num(), omp_get_num_threads(), *barrier);
  }
#else
  Barrier barrier(T);
  std::vector<std::thread> pool;
  for (int t = 1; t < T; ++t) pool.emplace_back([&, t] { body(t, T, barrier); });
  body(0, T, barrier);
  for (auto& th : pool) th.join();
#endif
}

// exp of four lanes x <= 0, 0 below -87.33 (where expf leaves the normal floats) and for -inf.
inline f32x4 exp4_nonpositive(f32x4 x) {
  const f32x4 lo = f32x4{} - 87.33f;
  return x < lo ? f32x4{} : primaps::exp_clamped(x < lo ? lo : x);
}

// The mean field updates pixels in groups of 4, with the label rows transposed so that the lanes are
// the group's pixels: the softmax's max, exp and sums then run on independent vectors (per pixel, one
// dependency chain of shuffles, exp and divide was the update pass's bottleneck), and labels that are
// only padding are skipped.
constexpr int kGroup = 4;

// Transposes the 4x4 block v[0..3] in place (rows become lanes).
inline void transpose4(f32x4* v) {
  const f32x4 t0 = __builtin_shuffle(v[0], v[1], i32x4{0, 4, 1, 5});
  const f32x4 t1 = __builtin_shuffle(v[0], v[1], i32x4{2, 6, 3, 7});
  const f32x4 t2 = __builtin_shuffle(v[2], v[3], i32x4{0, 4, 1, 5});
  const f32x4 t3 = __builtin_shuffle(v[2], v[3], i32x4{2, 6, 3, 7});
  v[0] = __builtin_shuffle(t0, t2, i32x4{0, 1, 4, 5});
  v[1] = __builtin_shuffle(t0, t2, i32x4{2, 3, 6, 7});
  v[2] = __builtin_shuffle(t1, t3, i32x4{0, 1, 4, 5});
  v[3] = __builtin_shuffle(t1, t3, i32x4{2, 3, 6, 7});
}

// Softmax over labels of 4 pixels at once, in place on X[j] (j < 4 nv, lanes = pixels): the max
// subtracted, exp, divided by the sum; per pixel the operations and their order are pydensecrf's SSE
// code: lane sums s_l = q_l + q_{l+4} + ... (in order), then (s0 + s1) + (s2 + s3). Labels j >= L (the
// padding, -inf) come out 0.
inline void softmax_pixels(f32x4* X, int L, int nv) {
  f32x4 m = X[0];
  for (int j = 1; j < L; ++j) m = m > X[j] ? m : X[j];
  f32x4 s[4] = {};
  for (int j = 0; j < L; ++j) {
    X[j] = exp4_nonpositive(X[j] - m);
    s[j & 3] += X[j];
  }
  const f32x4 sum = (s[0] + s[1]) + (s[2] + s[3]);
  for (int j = 0; j < L; ++j) X[j] = X[j] / sum;
  for (int j = L; j < 4 * nv; ++j) X[j] = f32x4{};
}

// The lattice passes work on rows of C vectors (one chunk: CW = 4 C lanes).
// Splat rows qn (Q * norm, by position) over the CSR list into vals, vertices [b, e); kPrefetch:
// prefetch the row kSplatAhead entries ahead (photographs, 27 labels: 1.06x-1.09x per call; 3 and 7
// labels: 0.95x-1.05x, the noise).
constexpr int64_t kSplatAhead = 16;
template <int C, bool kPrefetch>
inline void splat(const Lattice& lat, const float* qn, float* vals, int64_t b, int64_t e) {
  constexpr int CW = 4 * C;
  f32x4 acc[C];
  const int64_t jend = lat.start[e] - kSplatAhead;
  for (int64_t v = b; v < e; ++v) {
    for (int i = 0; i < C; ++i) acc[i] = f32x4{};
    for (int64_t j = lat.start[v]; j < lat.start[v + 1]; ++j) {
      if (kPrefetch && j < jend) prefetch_row(qn + int64_t(lat.pix[j + kSplatAhead]) * CW, CW);
      const float w = lat.wgt[j];
      const float* q = qn + int64_t(lat.pix[j]) * CW;
      for (int i = 0; i < C; ++i) acc[i] += w * load4(q + 4 * i);
    }
    for (int i = 0; i < C; ++i) store4(vals + v * CW + 4 * i, acc[i]);
  }
}

// s (C vectors) = alpha * the barycentric interpolation of vals at position k: s += w * v * alpha per
// corner. SEQ multiplies in pydensecrf's scalar order, (w * v) * alpha; the SSE path folds w * alpha
// first.
template <bool SEQ, int C>
inline void slice_into(const Lattice& lat, const float* vals, int64_t k, float alpha, f32x4* s) {
  const int D = lat.d + 1;
  for (int i = 0; i < C; ++i) s[i] = f32x4{};
  for (int r = 0; r < D; ++r) {
    const float w = lat.bary[k * D + r];
    const float* v = vals + int64_t(lat.offset[k * D + r]) * 4 * C;
    if constexpr (SEQ) {
      for (int i = 0; i < C; ++i) s[i] += w * load4(v + 4 * i) * alpha;
    } else {
      const float wa = w * alpha;
      for (int i = 0; i < C; ++i) s[i] += wa * load4(v + 4 * i);
    }
  }
}

// One blur step n = o + 0.5 (a + c) over C vectors; SEQ in double per lane, as pydensecrf's scalar path.
template <bool SEQ, int C>
inline void blur_row(float* n, const float* o, const float* a, const float* c) {
  for (int i = 0; i < C; ++i) {
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

struct Params {
  int iterations;
  float clip, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat;
  bool unary;  // probs holds the unary U itself (-U is exact), not probabilities
};

// -U = log(clip(p, clip, 1)) of 4 probabilities (pydensecrf's unary_from_softmax, negated), or -p when
// p is the unary.
inline f32x4 neg_unary(f32x4 p, const Params& params) {
  if (params.unary) return -p;
  const float clip = params.clip;
  const f32x4 lo = f32x4{} + clip, one = f32x4{} + 1.0f;
  p = p < lo ? lo : p;
  return primaps::log_positive(p > one ? one : p);
}

// Rows of more than kChunk vectors (32 labels) are split into chunks of kChunk vectors, each pass
// running chunk by chunk. Chunks are as wide as they can be: the passes cost per row (index loads,
// gathers) more than per byte, so smaller chunks were slower (27 labels in chunks of 8 lanes, one thread:
// lattice passes +50 %, update pass +120 %; of 16 lanes: +10 % and +20 %).
constexpr int kChunk = 8;

// The mean field of one image. The bilateral term runs over its pixel order (positions), the
// Gaussian term over raster order. Label rows are nv = C * nc vectors (labels padded with -inf in -U,
// so their Q is 0), stored chunk-major: chunk c (C vectors, CW lanes) of row i of an array with R rows
// at [(c * R + i) * CW]. Per iteration and chunk: splat both lattices, blur both axis by axis, slice
// the Gaussian term; then one pass over the positions slices the bilateral term (every chunk),
// updates Q and writes the next Q * norm rows of both terms (the Gaussian's at the pixel's raster
// row). The team splits every pass into fixed ranges.
template <bool SEQ, int C>
void mean_field(const Lattice& gauss, const Lattice& bil, const Params& p, const float* probs, float* out, int L,
                int nc, int threads) {
  constexpr int CW = 4 * C;
  const int nv = C * nc, V = 4 * nv;
  const int64_t N = bil.N, Mb = bil.M, Mg = gauss.M;
  const int32_t* raster = bil.raster.data();
  // negu: row-major, the others chunk-major. Zero-filled, unlike the lattice's arrays: the passes write
  // them in a scattered order (qn_g at raster pixels in the bilateral order), and without the fill a
  // textured 320 px image with 27 labels ran up to 9 % slower (other rows: no change beyond the noise).
  Rows negu(N * V, 0.f), qn_b(N * V, 0.f), qn_g(N * V, 0.f), slice_g(N * V, 0.f);
  Rows vg[2] = {Rows(nc * (Mg + 1) * CW, 0.f), Rows(nc * (Mg + 1) * CW, 0.f)};
  Rows vb[2] = {Rows(nc * (Mb + 1) * CW, 0.f), Rows(nc * (Mb + 1) * CW, 0.f)};
  const float alpha_g = 1.0f / (1 + std::pow(2.0f, -2.0f));
  const float alpha_b = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-bil.d)));
  const float mw_g = -p.pos_compat, mw_b = -p.bi_compat;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int T = std::max(1, std::min<int>(threads, static_cast<int>(N / 2048) + 1));
  team(T, [&](int t, int T, Barrier& bar) {
    std::vector<f32x4> tl(kGroup * nv), X(4 * nv);
    f32x4 sl[C];
    auto [pb, pe] = part(N, t, T);
    auto [gb, ge] = part(Mg, t, T);
    auto [bb, be] = part(Mb, t, T);
    // Blur step along axis j of chunk c of lat's values, vertices [b, e): buf[cur] -> buf[1 - cur].
    auto blur_axis = [&](const Lattice& lat, Rows* buf, int c, int j, int cur, int64_t b, int64_t e) {
      const float* o = &buf[cur][c * (lat.M + 1) * CW];
      float* n = &buf[1 - cur][c * (lat.M + 1) * CW];
      const int32_t* nb = &lat.nbr[j * lat.M * 2];  // outside the loop: the stores to n might alias lat
      for (int64_t v = b; v < e; ++v)
        blur_row<SEQ, C>(n + v * CW, o + v * CW, o + int64_t(nb[2 * v]) * CW, o + int64_t(nb[2 * v + 1]) * CW);
    };
    // Softmax of the group of rows tl (positions p0..p0+g) and its outputs: the next splats' rows
    // (Q * norm, each term's), or (last) Q itself.
    auto emit = [&](int64_t p0, int g, bool last) {
      for (int p = g; p < kGroup; ++p)  // unused lanes: copies of the first pixel
        for (int i = 0; i < nv; ++i) tl[p * nv + i] = tl[i];
      for (int i = 0; i < nv; ++i) {
        for (int p = 0; p < kGroup; ++p) X[4 * i + p] = tl[p * nv + i];
        transpose4(&X[4 * i]);
      }
      softmax_pixels(X.data(), L, nv);
      if (last) {
        for (int p = 0; p < g; ++p)
          for (int l = 0; l < L; ++l) out[l * N + raster[p0 + p]] = X[l][p];
        return;
      }
      for (int i = 0; i < nv; ++i) transpose4(&X[4 * i]);
      for (int p = 0; p < g; ++p) {
        const int64_t pos = p0 + p, k = raster[pos];
        const float nb = bil.norm[pos], ng = gauss.norm[k];
        for (int c = 0; c < nc; ++c)
          for (int i = 0; i < C; ++i) {
            const f32x4 q = X[4 * (c * C + i) + p];
            store4(&qn_b[(c * N + pos) * CW + 4 * i], q * nb);
            store4(&qn_g[(c * N + k) * CW + 4 * i], q * ng);
          }
      }
    };
    for (int64_t p0 = pb; p0 < pe; p0 += kGroup) {
      const int g = static_cast<int>(std::min<int64_t>(kGroup, pe - p0));
      int64_t k[kGroup];  // the group's pixels (unused lanes: the first one)
      for (int q = 0; q < kGroup; ++q) k[q] = raster[p0 + (q < g ? q : 0)];
      for (int l = 0; l < V; ++l) {
        const float* pl = probs + l * N;
        const f32x4 x = l < L ? neg_unary(f32x4{pl[k[0]], pl[k[1]], pl[k[2]], pl[k[3]]}, p) : f32x4{} + neg_inf;
        for (int q = 0; q < g; ++q) negu[(p0 + q) * V + l] = x[q];
      }
      for (int q = 0; q < g; ++q)
        for (int i = 0; i < nv; ++i) tl[q * nv + i] = load4(&negu[(p0 + q) * V + 4 * i]);
      emit(p0, g, false);
    }
    bar.wait();
    for (int it = 0; it < p.iterations; ++it) {
      for (int c = 0; c < nc; ++c) {
        float* const g0 = &vg[0][c * (Mg + 1) * CW];
        float* const b0 = &vb[0][c * (Mb + 1) * CW];
        splat<C, false>(gauss, &qn_g[c * N * CW], g0, gb, ge);  // vertices row by row: nearly sequential
        if (bil.raster_order)
          splat<C, true>(bil, &qn_b[c * N * CW], b0, bb, be);
        else
          splat<C, false>(bil, &qn_b[c * N * CW], b0, bb, be);
        bar.wait();
        for (int j = 0, cur = 0; j <= bil.d; ++j, cur = 1 - cur) {
          if (j <= 2) blur_axis(gauss, vg, c, j, cur, gb, ge);
          blur_axis(bil, vb, c, j, cur, bb, be);
          bar.wait();
        }
        const float* g1 = &vg[1][c * (Mg + 1) * CW];  // after 3 axes the Gaussian values are in buffer 1
        for (int64_t k = pb; k < pe; ++k) {
          slice_into<SEQ, C>(gauss, g1, k, alpha_g, sl);
          for (int i = 0; i < C; ++i) store4(&slice_g[(c * N + k) * CW + 4 * i], sl[i] * gauss.norm[k]);
        }
      }
      bar.wait();
      const bool last = it + 1 == p.iterations;
      const float* fb = vb[0].data();  // after 6 axes
      for (int64_t p0 = pb; p0 < pe; p0 += kGroup) {
        const int g = static_cast<int>(std::min<int64_t>(kGroup, pe - p0));
        for (int p = 0; p < g; ++p) {
          const int64_t pos = p0 + p;
          if (pos + kPrefetchAhead < N) {
            const int64_t ahead = pos + kPrefetchAhead, k2 = raster[ahead];
            for (int c = 0; c < nc; ++c) {
              prefetch_row(&slice_g[(c * N + k2) * CW], CW);
              prefetch_row(&qn_g[(c * N + k2) * CW], CW);
              for (int r = 0; r <= bil.d; ++r)
                prefetch_row(&fb[(c * (Mb + 1) + bil.offset[ahead * (bil.d + 1) + r]) * CW], CW);
            }
          }
          const int64_t k = raster[pos];
          const float nm = bil.norm[pos];
          f32x4* row = &tl[p * nv];
          for (int c = 0; c < nc; ++c) {
            slice_into<SEQ, C>(bil, fb + c * (Mb + 1) * CW, pos, alpha_b, sl);
            for (int i = 0; i < C; ++i) {
              const int iv = c * C + i;
              row[iv] = load4(&negu[pos * V + 4 * iv]) - mw_g * load4(&slice_g[(c * N + k) * CW + 4 * i]);
              row[iv] = row[iv] - mw_b * (sl[i] * nm);
            }
          }
        }
        emit(p0, g, last);
      }
      bar.wait();
    }
  });
}

// The mean field with rows of nv = (L + 3) / 4 vectors: one chunk of nv vectors up to kChunk, else
// chunks of kChunk. L <= 2 takes pydensecrf's scalar arithmetic (SEQ), which it uses for 1-2 channels.
void mean_field_any(const Lattice& gauss, const Lattice& bil, const Params& p, const float* probs, float* out,
                    int L, int threads) {
  const int nv = (L + 3) / 4;
  switch (L <= 2 ? 0 : nv) {
    case 0: return mean_field<true, 1>(gauss, bil, p, probs, out, L, 1, threads);
    case 1: return mean_field<false, 1>(gauss, bil, p, probs, out, L, 1, threads);
    case 2: return mean_field<false, 2>(gauss, bil, p, probs, out, L, 1, threads);
    case 3: return mean_field<false, 3>(gauss, bil, p, probs, out, L, 1, threads);
    case 4: return mean_field<false, 4>(gauss, bil, p, probs, out, L, 1, threads);
    case 5: return mean_field<false, 5>(gauss, bil, p, probs, out, L, 1, threads);
    case 6: return mean_field<false, 6>(gauss, bil, p, probs, out, L, 1, threads);
    case 7: return mean_field<false, 7>(gauss, bil, p, probs, out, L, 1, threads);
    default: return mean_field<false, kChunk>(gauss, bil, p, probs, out, L, (nv + kChunk - 1) / kChunk, threads);
  }
}

void build_bilateral(Lattice& bil, const uint8_t* img, int64_t H, int64_t W, const Params& p, int threads) {
  build_lattice<5>(bil, crf_features(img, H, W, p.bi_sxy, p.bi_srgb), H * W, 2 * H * W, threads);
  compute_norm(bil, threads);
}

// Q without pairwise terms (no iterations, or one label): softmax(-U) per pixel, 4 pixels at a time.
void softmax_only(const float* probs, const Params& p, float* out, int64_t N, int L, int threads) {
  const int nv = (L + 3) / 4;
  chunked(N, threads, [&](int64_t b, int64_t e) {
    std::vector<f32x4> X(4 * nv);
    for (int64_t k = b; k < e; k += kGroup) {
      const int g = static_cast<int>(std::min<int64_t>(kGroup, e - k));
      for (int l = 0; l < L; ++l) {  // unused lanes: the first pixel
        const float* pl = probs + l * N + k;
        X[l] = neg_unary(f32x4{pl[0], pl[g > 1], pl[g > 2 ? 2 : 0], pl[g > 3 ? 3 : 0]}, p);
      }
      softmax_pixels(X.data(), L, nv);
      for (int l = 0; l < L; ++l)
        for (int p = 0; p < g; ++p) out[l * N + k + p] = X[l][p];
    }
  });
}

// One image: its bilateral lattice (on build_threads), then the mean field (on threads). `gauss`
// yields the Gaussian lattice of the (H, W) grid, shared by the batch.
void crf_image(const uint8_t* img, const float* probs, float* out, int64_t H, int64_t W, int L, const Params& p,
               const std::shared_future<const Lattice*>& gauss_future, int build_threads, int threads) {
  if (p.iterations == 0 || L == 1) return softmax_only(probs, p, out, H * W, L, threads);
  Lattice bil;
  build_bilateral(bil, img, H, W, p, build_threads);
  const Lattice& gauss = *gauss_future.get();
  mean_field_any(gauss, bil, p, probs, out, L, threads);
}

// The Gaussian lattice of the last (H, W, pos_sxy) a call used, kept for the next call (a pipeline
// sees one image size) when it takes at most kKeepGaussianBytes.
constexpr size_t kKeepGaussianBytes = size_t(64) << 20;
struct KeptGaussian {
  std::mutex mutex;
  int64_t H = 0, W = 0;
  float sxy = 0.f;
  std::shared_ptr<const Lattice> lattice;
};
KeptGaussian& kept() {
  static KeptGaussian k;
  return k;
}

std::shared_ptr<const Lattice> kept_gaussian(int64_t H, int64_t W, float sxy) {
  KeptGaussian& k = kept();
  std::lock_guard<std::mutex> lock(k.mutex);
  return k.H == H && k.W == W && k.sxy == sxy ? k.lattice : nullptr;
}

void keep_gaussian(const std::shared_ptr<const Lattice>& lat, int64_t H, int64_t W, float sxy) {
  if (lat->bytes() > kKeepGaussianBytes) return;
  KeptGaussian& k = kept();
  std::lock_guard<std::mutex> lock(k.mutex);
  k.H = H, k.W = W, k.sxy = sxy, k.lattice = lat;
}

// Index of the first non-finite value of x[0..n), or n.
int64_t first_nonfinite(const float* x, int64_t n) {
  constexpr int64_t kBlock = 4096;  // a branch per block: the test of a block vectorises
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    uint32_t bad = 0;
    for (int64_t i = b; i < e; ++i) {
      uint32_t u;
      std::memcpy(&u, x + i, sizeof u);
      bad |= (u & 0x7f800000u) == 0x7f800000u;
    }
    if (bad)
      for (int64_t i = b; i < e; ++i)
        if (!std::isfinite(x[i])) return i;
  }
  return n;
}

void dense_crf(const primaps::UInt8Array& images, const primaps::FloatArray& probs,
               const primaps::Int64Array& labels, primaps::FloatArray& out, int iterations, float clip,
               float pos_sxy, float pos_compat, float bi_sxy, float bi_srgb, float bi_compat, int threads,
               bool unary) {
  primaps::check_ndim(images, 4, "images");
  primaps::check_ndim(probs, 1, "probs");
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
  if (probs.shape(0) != start[B] || out.shape(0) != start[B])
    throw std::invalid_argument("probs/out: size does not match the label counts");
  if (!(clip > 0 && clip <= 1)) throw std::invalid_argument("clip: expected 0 < clip <= 1");
  if (H * W * 6 > INT32_MAX) throw std::invalid_argument("images: too many pixels");
  const Params p{iterations, clip, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat, unary};
  const uint8_t* img = images.data();
  const float* pr = probs.data();
  float* o = out.mutable_data();
  py::gil_scoped_release release;
  // NaN and Inf would pass the clip unnoticed (pydensecrf clips them too), so they are refused.
  for (int64_t b = 0; b < B; ++b)
    if (first_nonfinite(pr + start[b], start[b + 1] - start[b]) < start[b + 1] - start[b])
      throw std::invalid_argument("probs[" + std::to_string(b) + "]: contains NaN or Inf");
  threads = std::max(1, threads);
  const primaps::ItemSplit split = primaps::item_split(B, threads);  // as parallel_items runs the images
  const int outer = split.outer, inner = split.inner;
  // The Gaussian lattice depends only on (H, W, pos_sxy): the one the previous call kept, or built
  // once for the batch, at the same time as the first bilateral lattices when there are threads to
  // spare (a single image gives it half of them). gauss_future is destroyed first and, as the last
  // reference to an async state, waits for the task.
  const bool any = iterations > 0 && *std::max_element(lab, lab + B) > 1;
  std::shared_ptr<const Lattice> gauss = any ? kept_gaussian(H, W, pos_sxy) : std::make_shared<const Lattice>();
  const bool build = !gauss;
  const int gauss_threads = outer == 1 ? std::max(1, inner / 2) : 1;
  std::shared_future<const Lattice*> gauss_future =
      std::async(threads > 1 && build ? std::launch::async : std::launch::deferred, [&]() -> const Lattice* {
        if (build) {
          auto built = std::make_shared<Lattice>();
          build_gaussian(*built, H, W, pos_sxy, gauss_threads);
          keep_gaussian(built, H, W, pos_sxy);
          gauss = std::move(built);
        }
        return gauss.get();
      }).share();
  const int build_threads = outer == 1 && threads > 1 && build ? std::max(1, inner - gauss_threads) : inner;
  primaps::parallel_items(B, threads, [&](int64_t b, int) {
    crf_image(img + b * 3 * H * W, pr + start[b], o + start[b], H, W, static_cast<int>(lab[b]), p, gauss_future,
              build_threads, inner);
  });
}

// Vertex counts of the Gaussian lattice and of each image's bilateral lattice, as the kernel builds
// them (for benchmarks and tests).
py::tuple dense_crf_lattice_sizes(const primaps::UInt8Array& images, float pos_sxy, float bi_sxy, float bi_srgb,
                                  int threads) {
  primaps::check_ndim(images, 4, "images");
  if (images.shape(1) != 3) throw std::invalid_argument("images: expected 3 channels");
  if (!(pos_sxy > 0 && bi_sxy > 0 && bi_srgb > 0)) throw std::invalid_argument("sxy/srgb: expected > 0");
  const int64_t B = images.shape(0), H = images.shape(2), W = images.shape(3);
  if (H * W * 6 > INT32_MAX) throw std::invalid_argument("images: too many pixels");
  const Params p{1, 1.f, pos_sxy, 0.f, bi_sxy, bi_srgb, 0.f, false};
  std::vector<int64_t> sizes(B);
  Lattice gauss;
  {
    py::gil_scoped_release release;
    threads = std::max(1, threads);
    build_gaussian(gauss, H, W, pos_sxy, threads);
    for (int64_t b = 0; b < B; ++b) {
      Lattice bil;
      build_bilateral(bil, images.data() + b * 3 * H * W, H, W, p, threads);
      sizes[b] = bil.M;
    }
  }
  py::list bilateral;
  for (int64_t m : sizes) bilateral.append(m);
  return py::make_tuple(gauss.M, bilateral);
}

// pydensecrf's DenseKernel::filter on a lattice of any dimension: values (N, V) by position, times
// pre (N) when given; Permutohedral::compute, alpha * slice(blur(splat(.))), the blur along axes 0..d,
// or d..0 when reverse (the transpose); times post (N) when given, then times scale: out (N, V). V <= 2
// takes pydensecrf's scalar arithmetic (SEQ), as it does; wider rows go through in chunks of C vectors,
// padded with zero lanes.
template <bool SEQ, int C>
void lattice_filter(const Lattice& lat, const float* in, const float* pre, const float* post, float scale, float* out,
                    int V, int nc, bool reverse, int threads) {
  constexpr int CW = 4 * C;
  const int64_t N = lat.N, M = lat.M;
  Rows qn(N * CW), vals[2] = {Rows((M + 1) * CW, 0.f), Rows((M + 1) * CW, 0.f)};  // row M: zero
  const float alpha = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-lat.d)));
  for (int c = 0; c < nc; ++c) {
    const int l0 = c * CW, lanes = std::min(CW, V - l0);
    chunked(N, threads, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        for (int l = 0; l < CW; ++l) {
          const float x = l < lanes ? in[k * V + l0 + l] : 0.f;
          qn[k * CW + l] = pre ? x * pre[k] : x;
        }
    });
    chunked(M, threads, [&](int64_t b, int64_t e) { splat<C, true>(lat, qn.data(), vals[0].data(), b, e); });
    int cur = 0;
    for (int s = 0; s <= lat.d; ++s, cur = 1 - cur) {
      const int32_t* nb = &lat.nbr[(reverse ? lat.d - s : s) * M * 2];
      const float* o = vals[cur].data();
      float* n = vals[1 - cur].data();
      chunked(M, threads, [&](int64_t b, int64_t e) {
        for (int64_t v = b; v < e; ++v)
          blur_row<SEQ, C>(n + v * CW, o + v * CW, o + int64_t(nb[2 * v]) * CW, o + int64_t(nb[2 * v + 1]) * CW);
      });
    }
    chunked(N, threads, [&](int64_t b, int64_t e) {
      f32x4 sl[C];
      for (int64_t k = b; k < e; ++k) {
        slice_into<SEQ, C>(lat, vals[cur].data(), k, alpha, sl);
        for (int l = 0; l < lanes; ++l) {
          const float x = sl[l / 4][l % 4];
          out[k * V + l0 + l] = (post ? x * post[k] : x) * scale;
        }
      }
    });
  }
}

// pydensecrf's expAndNormalize of the rows of x (N, L), in place: the max subtracted, exp, divided by
// the sum (softmax_pixels, 4 rows at a time).
void softmax_rows(primaps::FloatArray& x, int threads) {
  primaps::check_ndim(x, 2, "x");
  const int64_t N = x.shape(0);
  const int L = static_cast<int>(x.shape(1)), nv = (L + 3) / 4;
  float* p = x.mutable_data();
  py::gil_scoped_release release;
  chunked(N, std::max(1, threads), [&](int64_t b, int64_t e) {
    std::vector<f32x4> X(4 * nv);
    for (int64_t k = b; k < e; k += kGroup) {
      const int g = static_cast<int>(std::min<int64_t>(kGroup, e - k));
      const float* r[kGroup];  // the group's rows (unused lanes: the first one)
      for (int q = 0; q < kGroup; ++q) r[q] = p + (k + (q < g ? q : 0)) * L;
      for (int l = 0; l < L; ++l) X[l] = f32x4{r[0][l], r[1][l], r[2][l], r[3][l]};
      softmax_pixels(X.data(), L, nv);
      for (int q = 0; q < g; ++q)
        for (int l = 0; l < L; ++l) p[(k + q) * L + l] = X[l][q];
    }
  });
}

// The lattice of pydensecrf's DenseKernel for features (N, d), d in 1..kMaxDim, built as pydensecrf
// builds it (its padding lanes included: build_lattice's phantom), positions in raster order. Keys
// whose coordinates (or their blur neighbours') leave int16 are refused: pydensecrf's short keys
// would wrap there and merge distant vertices.
constexpr int kMaxDim = 16;
class PermutohedralLattice {
 public:
  PermutohedralLattice(const primaps::FloatArray& features, int threads) {
    primaps::check_ndim(features, 2, "features");
    const int64_t N = features.shape(0);
    const int d = static_cast<int>(features.shape(1));
    if (N < 1) throw std::invalid_argument("features: expected at least one point");
    if (d < 1 || d > kMaxDim)
      throw std::invalid_argument("features: expected 1 to " + std::to_string(kMaxDim) + " dimensions, got " +
                                  std::to_string(d));
    if (first_nonfinite(features.data(), N * d) < N * d) throw std::invalid_argument("features: contains NaN or Inf");
    Buffer<float> feat(features.data(), features.data() + N * d);
    {
      py::gil_scoped_release release;
      build<1>(d, feat, N, std::max(1, threads));
    }
    if (lat_.rem_lo - 2 * d < -32768 || lat_.rem_hi + 2 * d > 32767)
      throw std::invalid_argument(
          "features: lattice coordinates outside pydensecrf's int16 keys (the features are too large: "
          "their standard deviations, sxy or srgb, too small)");
  }
  int64_t points() const { return lat_.N; }
  int64_t vertices() const { return lat_.M; }
  int dim() const { return lat_.d; }

  // K 1 (N,) through the lattice (pydensecrf's norm before it is inverted).
  primaps::FloatArray filter_ones(int threads) const {
    primaps::FloatArray out(lat_.N);
    Buffer<float> k1;
    {
      py::gil_scoped_release release;
      k1 = primaps::dense_crf::filter_ones(lat_, std::max(1, threads));
    }
    std::copy(k1.begin(), k1.end(), out.mutable_data());
    return out;
  }

  // out (N, V) = (post * filter(pre * values)) * scale, values (N, V); pre/post (N) or None;
  // reverse: the transpose (blur axes in reverse order).
  void filter(const primaps::FloatArray& values, primaps::FloatArray& out, bool reverse, const py::object& pre,
              const py::object& post, float scale, int threads) const {
    primaps::check_ndim(values, 2, "values");
    primaps::check_ndim(out, 2, "out");
    if (values.shape(0) != lat_.N || out.shape(0) != lat_.N || out.shape(1) != values.shape(1))
      throw std::invalid_argument("values: expected (" + std::to_string(lat_.N) + ", V) rows and out alike");
    const int V = static_cast<int>(values.shape(1)), nv = (V + 3) / 4;
    if (V < 1) throw std::invalid_argument("values: expected at least one column");
    primaps::FloatArray pre_a, post_a;  // kept alive while the filter runs
    auto scale_of = [&](const py::object& o, primaps::FloatArray& a, const char* name) -> const float* {
      if (o.is_none()) return nullptr;
      a = o.cast<primaps::FloatArray>();
      primaps::check_ndim(a, 1, name);
      if (a.shape(0) != lat_.N) throw std::invalid_argument(std::string(name) + ": expected one value per point");
      return a.data();
    };
    const float *pr = scale_of(pre, pre_a, "pre"), *po = scale_of(post, post_a, "post");
    const float* in = values.data();
    float* o = out.mutable_data();
    py::gil_scoped_release release;
    const int T = std::max(1, threads);
    switch (V <= 2 ? 0 : nv) {
      case 0: return lattice_filter<true, 1>(lat_, in, pr, po, scale, o, V, 1, reverse, T);
      case 1: return lattice_filter<false, 1>(lat_, in, pr, po, scale, o, V, 1, reverse, T);
      case 2: return lattice_filter<false, 2>(lat_, in, pr, po, scale, o, V, 1, reverse, T);
      case 3: return lattice_filter<false, 3>(lat_, in, pr, po, scale, o, V, 1, reverse, T);
      case 4: return lattice_filter<false, 4>(lat_, in, pr, po, scale, o, V, 1, reverse, T);
      case 5: return lattice_filter<false, 5>(lat_, in, pr, po, scale, o, V, 1, reverse, T);
      case 6: return lattice_filter<false, 6>(lat_, in, pr, po, scale, o, V, 1, reverse, T);
      case 7: return lattice_filter<false, 7>(lat_, in, pr, po, scale, o, V, 1, reverse, T);
      default:
        return lattice_filter<false, kChunk>(lat_, in, pr, po, scale, o, V, (nv + kChunk - 1) / kChunk, reverse, T);
    }
  }

 private:
  template <int d>
  void build(int dim, const Buffer<float>& feat, int64_t N, int threads) {
    if constexpr (d <= kMaxDim) {
      if (dim != d) return build<d + 1>(dim, feat, N, threads);
      build_lattice<d>(lat_, feat, N, INT64_MAX, threads, N % 4 != 0, true);
    }
  }
  Lattice lat_;
};

primaps::Registrar reg([](py::module_& m) {
  m.def("dense_crf", &dense_crf, py::arg("images"), py::arg("probs"), py::arg("labels"), py::arg("out"),
        py::arg("iterations"), py::arg("clip"), py::arg("pos_sxy"), py::arg("pos_compat"), py::arg("bi_sxy"),
        py::arg("bi_srgb"), py::arg("bi_compat"), py::arg("threads"), py::arg("unary") = false,
        "Dense CRF (pydensecrf v2 mean field) of a batch: images uint8 (B,3,H,W), probabilities float32 flat "
        "(sum_b L_b*H*W, each (L_b,H,W), finite; the unary is -log(clip(p, clip, 1)), or probs itself when "
        "unary), labels int64 (B,) = L_b, out like probs.");
  m.def("dense_crf_lattice_sizes", &dense_crf_lattice_sizes, py::arg("images"), py::arg("pos_sxy"),
        py::arg("bi_sxy"), py::arg("bi_srgb"), py::arg("threads"),
        "Vertex counts (gaussian, [bilateral per image]) of the lattices dense_crf builds for uint8 (B,3,H,W) images.");
  py::class_<PermutohedralLattice>(m, "PermutohedralLattice",
                                   "pydensecrf's permutohedral lattice of float32 features (N, d), d in 1..16.")
      .def(py::init<const primaps::FloatArray&, int>(), py::arg("features"), py::arg("threads"))
      .def_property_readonly("points", &PermutohedralLattice::points)
      .def_property_readonly("vertices", &PermutohedralLattice::vertices)
      .def_property_readonly("dim", &PermutohedralLattice::dim)
      .def("filter_ones", &PermutohedralLattice::filter_ones, py::arg("threads"), "K 1: float32 (N,)")
      .def("filter", &PermutohedralLattice::filter, py::arg("values"), py::arg("out"), py::arg("reverse"),
           py::arg("pre") = py::none(), py::arg("post") = py::none(), py::arg("scale") = 1.0f,
           py::arg("threads") = 1,
           "out (N, V) float32 = (post * filter(pre * values)) * scale for values (N, V) float32, pre/post (N,) "
           "float32 or None; reverse: the transpose");
  m.def("softmax_rows", &softmax_rows, py::arg("x"), py::arg("threads"),
        "pydensecrf's expAndNormalize of each row of float32 (N, L), in place.");
});

}  // namespace
