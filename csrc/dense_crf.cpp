// Dense CRF: the mean field of pydensecrf (Krähenbühl's "v2" code), batched, GIL released.
//
// Same arithmetic as pydensecrf's SSE path, step by step (shared/CRF.md): float32 elevation,
// round half to even, strict-< rank, barycentric weights with wrap-around, splat in pixel order,
// one-ring blur along axes 0..d, slice with alpha, symmetric normalisation computed through the
// lattice, Potts -w, parallel update, softmax with the max subtracted (a vectorised Cephes expf, as
// Eigen's exp in pydensecrf). Vertices are numbered in order of first appearance, like pydensecrf's
// hash table; no sum depends on the numbering anyway (each vertex accumulates its pixels in pixel
// order; blur and slice are per vertex and per pixel), so results match pydensecrf up to the last
// bits of exp/log.
//
// Data structures: keys packed into 64 bits with a range check (no int16 overflow); vertices from
// an open-addressing table filled in pixel order, with a last-key cache per remainder (raster
// coherence); splat as a gather over a vertex -> (pixel, weight) CSR list (deterministic, no
// atomics); blur neighbours by table lookup; slice fused with the Potts update and the softmax.
// Label rows are padded to a multiple of 4 lanes and every lane loop is written with 4-lane vectors
// (SSE2 on x86-64); per lane the operations and their order are pydensecrf's. The Gaussian lattice
// depends only on the grid and is built once per batch. Threads: one image per thread, or inside
// the image (elevation, keys, neighbours, splat/blur/slice split by rows) when the batch has fewer
// images than threads.
#include "common.h"
#include "fast_exp.h"

#include <array>
#include <cmath>
#include <future>
#include <limits>
#include <chrono>

namespace {

using primaps::f32x4;
using primaps::i32x4;
using primaps::load4;
using primaps::parallel_for;
using primaps::store4;

// Runs fn(begin, end) over [0, n) split into `threads` contiguous chunks.
template <typename F>
void chunked(int64_t n, int threads, const F& fn) {
  if (threads <= 1 || n < 4096) {
    fn(int64_t(0), n);
    return;
  }
  parallel_for(threads, threads, [&](int64_t t) {
    int64_t b = n * t / threads, e = n * (t + 1) / threads;
    fn(b, e);
  });
}

struct Lattice {
  int d = 0;
  int64_t N = 0, M = 0;
  std::vector<int32_t> offset;  // (N, d+1) vertex ids by remainder
  std::vector<float> bary;      // (N, d+1) barycentric weights
  std::vector<int64_t> start;   // (M+1) CSR over (pixel, weight), pixels ascending in a vertex
  std::vector<int32_t> pix;
  std::vector<float> wgt;
  std::vector<int32_t> nbr;     // (d+1, M, 2): n1, n2; M = the zero row
  std::vector<float> norm;      // (N) 1/sqrt(K 1 + 1e-20)
};

// Open-addressing table (linear probing) from packed lattice key to vertex id, ids numbered in
// order of first insertion, as pydensecrf's hash table numbers its vertices. Keys are < 2^62. The
// probed array holds only the keys (8 bytes a slot); the ids sit in a parallel array.
class VertexTable {
 public:
  explicit VertexTable(int64_t expected) {
    int bits = 10;
    while ((int64_t(1) << bits) < 2 * expected) ++bits;
    resize(bits);
  }
  // The id of `key`, inserted with the next id when new.
  int32_t insert(uint64_t key) {
    uint64_t h = hash(key);
    for (; slot_key_[h] != key; h = (h + 1) & mask_) {
      if (slot_key_[h] == kEmpty) {
        slot_key_[h] = key;
        slot_id_[h] = static_cast<int32_t>(keys.size());
        keys.push_back(key);
        if (2 * keys.size() > slot_key_.size()) resize(bits_ + 1);
        return static_cast<int32_t>(keys.size() - 1);
      }
    }
    return slot_id_[h];
  }
  // The id of `key`, or `absent`.
  int32_t find(uint64_t key, int32_t absent) const {
    for (uint64_t h = hash(key);; h = (h + 1) & mask_) {
      if (slot_key_[h] == key) return slot_id_[h];
      if (slot_key_[h] == kEmpty) return absent;
    }
  }
  std::vector<uint64_t> keys;  // by id

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  uint64_t hash(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ull) >> (64 - bits_); }
  void resize(int bits) {
    bits_ = bits;
    mask_ = (uint64_t(1) << bits) - 1;
    slot_key_.assign(size_t(1) << bits, kEmpty);
    slot_id_.assign(size_t(1) << bits, -1);
    for (size_t id = 0; id < keys.size(); ++id) {
      uint64_t h = hash(keys[id]);
      while (slot_key_[h] != kEmpty) h = (h + 1) & mask_;
      slot_key_[h] = keys[id];
      slot_id_[h] = static_cast<int32_t>(id);
    }
  }
  std::vector<uint64_t> slot_key_;
  std::vector<int32_t> slot_id_;
  uint64_t mask_ = 0;
  int bits_ = 0;
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

// Builds the lattice of features feat (N, d), pixel-major float32: elevation (threads over pixels),
// keys packed into 64 bits, vertices by a hash table in pixel order, the CSR list for the splat,
// blur neighbours by lookup.
template <int d>
void build_lattice(Lattice& lat, const std::vector<float>& feat, int64_t N, int threads) {
  constexpr int D = d + 1;
  if (N * D > INT32_MAX) throw std::invalid_argument("images: too many pixels");
  lat.d = d;
  lat.N = N;
  lat.offset.resize(N * D);
  lat.bary.resize(N * D);
  std::vector<int32_t> rem(N * D);
  std::vector<int8_t> rk(N * D);
  const float inv_std = static_cast<float>(std::sqrt(2.0 / 3.0) * D);
  float sf[d];
  for (int i = 0; i < d; ++i) sf[i] = static_cast<float>(1.0 / std::sqrt(double((i + 2) * (i + 1))) * inv_std);
  // Elevation, with the range of each key coordinate per chunk of pixels.
  const int chunks = std::max(1, threads);
  std::vector<std::array<int32_t, d>> lo_c(chunks), hi_c(chunks);
  std::atomic<bool> too_large{false};
  parallel_for(chunks, threads, [&](int64_t c) {
    const int64_t b = N * c / chunks, e = N * (c + 1) / chunks;
    std::array<int32_t, d>& lo = lo_c[c];
    std::array<int32_t, d>& hi = hi_c[c];
    lo.fill(INT32_MAX);
    hi.fill(INT32_MIN);
    for (int64_t k = b; k < e; ++k) {
      if (!elevate<d>(&feat[k * d], sf, &rem[k * D], &rk[k * D], &lat.bary[k * D])) {
        too_large = true;
        return;
      }
      for (int i = 0; i < d; ++i) {
        lo[i] = std::min(lo[i], rem[k * D + i]);
        hi[i] = std::max(hi[i], rem[k * D + i]);
      }
    }
  });
  if (too_large)
    throw std::invalid_argument("features: lattice coordinates too large (sxy/srgb too small for these inputs)");
  // Key layout: each coordinate's range, widened so the blur neighbours' keys pack without carries.
  int64_t lo[d];
  int shift[d];
  int bits = 0;
  for (int i = 0; i < d; ++i) {
    int64_t l = INT32_MAX, h = INT32_MIN;
    for (int c = 0; c < chunks; ++c) {
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
  if (bits > 62)
    throw std::invalid_argument("features: lattice keys need " + std::to_string(bits) +
                                " bits (> 62): the image is too large or sxy/srgb too small");
  // Vertex r of a pixel: r0 + r on the coordinates of rank <= d - r, r - (d+1) on the others.
  auto key_of = [&](int64_t k, int r) {
    uint64_t key = 0;
    for (int i = 0; i < d; ++i) {
      int c = rk[k * D + i] <= d - r ? r : r - D;
      key += static_cast<uint64_t>(rem[k * D + i] + c - lo[i]) << shift[i];
    }
    return key;
  };
  std::vector<uint64_t> keys(N * D);
  chunked(N, threads, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      for (int r = 0; r < D; ++r) keys[k * D + r] = key_of(k, r);
  });
  // Vertices in order of first appearance; consecutive pixels mostly repeat a remainder's vertex.
  VertexTable table(N * D / 8);
  std::vector<int64_t> count;
  uint64_t last_key[D];
  int32_t last_id[D];
  for (int r = 0; r < D; ++r) last_key[r] = ~uint64_t(0);
  for (int64_t k = 0; k < N; ++k) {
    for (int r = 0; r < D; ++r) {
      const uint64_t key = keys[k * D + r];
      if (key != last_key[r]) {
        last_key[r] = key;
        last_id[r] = table.insert(key);
        if (last_id[r] == static_cast<int32_t>(count.size())) count.push_back(0);
      }
      lat.offset[k * D + r] = last_id[r];
      ++count[last_id[r]];
    }
  }
  const int64_t M = static_cast<int64_t>(table.keys.size());
  lat.M = M;
  // CSR over (pixel, weight) by vertex; filled in pixel order, so pixels ascend within a vertex.
  lat.start.assign(M + 1, 0);
  for (int64_t v = 0; v < M; ++v) lat.start[v + 1] = lat.start[v] + count[v];
  lat.pix.resize(N * D);
  lat.wgt.resize(N * D);
  std::vector<int64_t>& cursor = count;
  std::copy(lat.start.begin(), lat.start.end() - 1, cursor.begin());
  for (int64_t i = 0; i < N * D; ++i) {
    const int64_t dst = cursor[lat.offset[i]]++;
    lat.pix[dst] = static_cast<int32_t>(i / D);
    lat.wgt[dst] = lat.bary[i];
  }
  // Blur neighbours along axis j: n1 = key - 1 on every coordinate + (d+1) on axis j, n2 the
  // opposite, so u = n1(v) exactly when v = n2(u): one lookup per pair. Absent ones point at the
  // zero row M.
  lat.nbr.assign(D * M * 2, static_cast<int32_t>(M));
  uint64_t unit = 0;
  for (int i = 0; i < d; ++i) unit += uint64_t(1) << shift[i];
  parallel_for(D, threads, [&](int64_t j) {
    const uint64_t delta = (j < d ? (uint64_t(D) << shift[j]) : 0) - unit;
    int32_t* out = &lat.nbr[j * M * 2];
    for (int64_t v = 0; v < M; ++v) {
      const int32_t u = table.find(table.keys[v] + delta, static_cast<int32_t>(M));
      out[2 * v] = u;
      if (u != M) out[2 * int64_t(u) + 1] = static_cast<int32_t>(v);
    }
  });
}

// Blur along axes 0..d in place (double buffer), V values per vertex; row M stays zero.
// SEQ: pydensecrf's scalar path (1-2 channels), which adds 0.5 * (n1 + n2) in double; otherwise
// V is a multiple of 4 and each lane does the float arithmetic of pydensecrf's SSE path.
template <bool SEQ, int VS>
void blur(const Lattice& lat, std::vector<float>& vals, std::vector<float>& tmp, int Vdyn, int threads) {
  const int V = VS ? VS : Vdyn;
  const int64_t M = lat.M;
  for (int j = 0; j <= lat.d; ++j) {
    const int32_t* nb = &lat.nbr[j * M * 2];
    const float* src = vals.data();
    float* dst = tmp.data();
    chunked(M, threads, [&](int64_t b, int64_t e) {
      for (int64_t v = b; v < e; ++v) {
        const float* o = src + v * V;
        const float* a = src + int64_t(nb[2 * v]) * V;
        const float* c = src + int64_t(nb[2 * v + 1]) * V;
        float* n = dst + v * V;
        if constexpr (SEQ) {
          for (int l = 0; l < V; ++l) n[l] = static_cast<float>(o[l] + 0.5 * (a[l] + c[l]));
        } else {
          for (int l = 0; l < V; l += 4) store4(n + l, load4(o + l) + 0.5f * (load4(a + l) + load4(c + l)));
        }
      }
    });
    std::swap(vals, tmp);
  }
}

void compute_norm(Lattice& lat, int threads) {
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
  blur<true, 1>(lat, vals, tmp, 1, threads);
  const float alpha = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-lat.d)));
  lat.norm.resize(N);
  chunked(N, threads, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      float s = 0.f;
      for (int r = 0; r < D; ++r) s += lat.bary[k * D + r] * vals[lat.offset[k * D + r]] * alpha;
      lat.norm[k] = static_cast<float>(1.0 / std::sqrt(double(s) + 1e-20));
    }
  });
}

// exp of four lanes x <= 0, 0 below -87.33 (where expf leaves the normal floats) and for -inf.
inline f32x4 exp4_nonpositive(f32x4 x) {
  const f32x4 lo = f32x4{} - 87.33f;
  return x < lo ? f32x4{} : primaps::exp_nonpositive(x < lo ? lo : x);
}

// Softmax of the first L lanes of t (nv vectors) into q (max subtracted, divided by the sum); the
// padding lanes enter as -inf, so they come out 0.
inline void softmax_lanes(const f32x4* t, float* q, int L, int nv) {
  const i32x4 lane = {0, 1, 2, 3};
  const f32x4 lowest = f32x4{} - std::numeric_limits<float>::infinity();
  f32x4 m = lowest;
  for (int i = 0; i < nv; ++i) {
    f32x4 x = lane + 4 * i < L ? t[i] : lowest;
    m = m > x ? m : x;
  }
  const float mx = std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
  f32x4 sum = {};
  for (int i = 0; i < nv; ++i) {
    f32x4 e = exp4_nonpositive((lane + 4 * i < L ? t[i] : lowest) - mx);
    sum += e;
    store4(q + 4 * i, e);
  }
  const float s = (sum[0] + sum[1]) + (sum[2] + sum[3]);
  for (int i = 0; i < nv; ++i) store4(q + 4 * i, load4(q + 4 * i) / s);
}

struct Params {
  int iterations;
  float pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat;
};

struct Timing {
  double build = 0, iterate = 0;
  int64_t m_gauss = 0, m_bilateral = 0;
};

// Splat norm*Q over the CSR list into vals (M+1, V); Q is (N, V), V a multiple of 4, labels padded
// with zeros. With a compile-time width the accumulator row lives in registers.
template <int VS>
void splat(const Lattice& lat, const std::vector<float>& Q, int Vdyn, std::vector<float>& vals, int threads) {
  const int V = VS ? VS : Vdyn, nv = V / 4;
  chunked(lat.M, threads, [&](int64_t b, int64_t e) {
    f32x4 local[VS ? VS / 4 : 1];
    std::vector<f32x4> heap(VS ? 0 : nv);
    f32x4* acc = VS ? local : heap.data();
    for (int64_t v = b; v < e; ++v) {
      for (int i = 0; i < nv; ++i) acc[i] = f32x4{};
      for (int64_t j = lat.start[v]; j < lat.start[v + 1]; ++j) {
        const int64_t p = lat.pix[j];
        const float w = lat.wgt[j], nm = lat.norm[p];
        const float* q = &Q[p * V];
        for (int i = 0; i < nv; ++i) acc[i] += w * (load4(q + 4 * i) * nm);
      }
      for (int i = 0; i < nv; ++i) store4(&vals[v * V + 4 * i], acc[i]);
    }
  });
}

// s (nv vectors) = alpha * the barycentric interpolation of vals at pixel k. SEQ multiplies in
// pydensecrf's scalar order, (w * v) * alpha; the SSE path folds w * alpha first.
template <bool SEQ>
inline void slice_into(const Lattice& lat, const std::vector<float>& vals, int64_t k, int nv, float alpha,
                       f32x4* s) {
  const int D = lat.d + 1;
  for (int i = 0; i < nv; ++i) s[i] = f32x4{};
  for (int r = 0; r < D; ++r) {
    const float w = lat.bary[k * D + r];
    const float* v = &vals[int64_t(lat.offset[k * D + r]) * nv * 4];
    if constexpr (SEQ) {
      for (int i = 0; i < nv; ++i) s[i] += w * load4(v + 4 * i) * alpha;
    } else {
      const float wa = w * alpha;
      for (int i = 0; i < nv; ++i) s[i] += wa * load4(v + 4 * i);
    }
  }
}

// Q, -U and the lattice values are stored pixel/vertex-major with the labels padded to V lanes
// (zeros), so the inner loops have a compile-time width; softmax uses the L real labels only.
template <bool SEQ, int VS>
void mean_field(const Lattice* const* lats, const float* compat, const float* unary, float* out, int64_t N, int L,
                int Vdyn, int iterations, int threads) {
  const int V = VS ? VS : Vdyn;
  std::vector<float> negu(N * V, 0.f), Q(N * V, 0.f);
  for (int l = 0; l < L; ++l)
    for (int64_t k = 0; k < N; ++k) negu[k * V + l] = -unary[l * N + k];
  chunked(N, threads, [&](int64_t b, int64_t e) {
    std::vector<f32x4> t(V / 4);
    for (int64_t k = b; k < e; ++k) {
      for (int i = 0; i < V / 4; ++i) t[i] = load4(&negu[k * V + 4 * i]);
      softmax_lanes(t.data(), &Q[k * V], L, V / 4);
    }
  });
  std::vector<float> vals[2], tmp[2];
  for (int g = 0; g < 2 && iterations > 0; ++g) {
    vals[g].assign((lats[g]->M + 1) * V, 0.f);
    tmp[g].assign((lats[g]->M + 1) * V, 0.f);
  }
  const float alpha0 = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-lats[0]->d)));
  const float alpha1 = 1.0f / (1 + std::pow(2.0f, static_cast<float>(-lats[1]->d)));
  // (Fusing the next bilateral splat into the update pass as a pixel-order scatter keeps the sums
  // exact, but the scatter added more to the update than the separate CSR gather costs: +15 ms vs
  // 12 ms per clean 320x320 image, 7 labels. Numbering vertices in Morton order of their keys did not
  // speed up the blur and slowed splat and slice: first-appearance order stays.)
  for (int it = 0; it < iterations; ++it) {
    for (int g = 0; g < 2; ++g) {
      splat<VS>(*lats[g], Q, V, vals[g], threads);
      blur<SEQ, VS>(*lats[g], vals[g], tmp[g], V, threads);
    }
    chunked(N, threads, [&](int64_t b, int64_t e) {
      const int nv = V / 4;
      f32x4 local[2][VS ? VS / 4 : 1];
      std::vector<f32x4> heap(VS ? 0 : 2 * nv);
      f32x4* sp = VS ? local[0] : heap.data();
      f32x4* tp = VS ? local[1] : heap.data() + nv;
      for (int64_t k = b; k < e; ++k) {
        for (int i = 0; i < nv; ++i) tp[i] = load4(&negu[k * V + 4 * i]);
        for (int g = 0; g < 2; ++g) {
          slice_into<SEQ>(*lats[g], vals[g], k, nv, g == 0 ? alpha0 : alpha1, sp);
          const float nm = lats[g]->norm[k];
          const float mw = -compat[g];
          for (int i = 0; i < nv; ++i) tp[i] = tp[i] - mw * (sp[i] * nm);
        }
        softmax_lanes(tp, &Q[k * V], L, nv);
      }
    });
  }
  for (int l = 0; l < L; ++l)
    for (int64_t k = 0; k < N; ++k) out[l * N + k] = Q[k * V + l];
}

template <bool SEQ>
void mean_field_any(const Lattice* const* lats, const float* compat, const float* unary, float* out, int64_t N, int L,
                    int iterations, int threads) {
  if (L <= 4)
    mean_field<SEQ, 4>(lats, compat, unary, out, N, L, 4, iterations, threads);
  else if (L <= 8)
    mean_field<SEQ, 8>(lats, compat, unary, out, N, L, 8, iterations, threads);
  else if (L <= 12)
    mean_field<SEQ, 12>(lats, compat, unary, out, N, L, 12, iterations, threads);
  else if (L <= 16)
    mean_field<SEQ, 16>(lats, compat, unary, out, N, L, 16, iterations, threads);
  else
    mean_field<SEQ, 0>(lats, compat, unary, out, N, L, (L + 3) / 4 * 4, iterations, threads);
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

// One image; `gauss` yields the Gaussian lattice of the (H, W) grid, shared by the batch and built
// while the first images build their bilateral lattices.
void crf_image(const uint8_t* img, const float* unary, float* out, int64_t H, int64_t W, int L, const Params& p,
               const std::shared_future<const Lattice*>& gauss_future, int threads, Timing* timing) {
  const int64_t N = H * W;
  auto t0 = std::chrono::steady_clock::now();
  Lattice bil;
  if (p.iterations > 0) {
    build_lattice<5>(bil, crf_features(img, H, W, p.bi_sxy, p.bi_srgb), N, threads);
    compute_norm(bil, threads);
  }
  const Lattice& gauss = *gauss_future.get();
  const Lattice* lats[2] = {&gauss, &bil};
  auto t1 = std::chrono::steady_clock::now();
  const float compat[2] = {p.pos_compat, p.bi_compat};
  if (L <= 2)  // pydensecrf filters 1-2 channels with its scalar code path
    mean_field_any<true>(lats, compat, unary, out, N, L, p.iterations, threads);
  else
    mean_field_any<false>(lats, compat, unary, out, N, L, p.iterations, threads);
  if (timing) {
    auto t2 = std::chrono::steady_clock::now();
    timing->build = std::chrono::duration<double>(t1 - t0).count();
    timing->iterate = std::chrono::duration<double>(t2 - t1).count();
    timing->m_gauss = gauss.M;
    timing->m_bilateral = bil.M;
  }
}

void dense_crf(const primaps::UInt8Array& images, const primaps::FloatArray& unary,
               const primaps::Int64Array& labels, primaps::FloatArray& out, int iterations, float pos_sxy,
               float pos_compat, float bi_sxy, float bi_srgb, float bi_compat, int threads,
               py::object timings) {
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
  std::vector<Timing> tm(B);
  {
    py::gil_scoped_release release;
    threads = std::max(1, threads);
    // The Gaussian lattice depends only on (H, W, pos_sxy): built once for the batch, on its own
    // thread, at the same time as the first bilateral lattices (it is needed only by the mean field).
    // gauss_future is destroyed first and, as the last reference to an async state, waits for the task.
    Lattice gauss;
    std::shared_future<const Lattice*> gauss_future = std::async(std::launch::async, [&]() -> const Lattice* {
      if (iterations > 0) {
        build_lattice<2>(gauss, crf_features(nullptr, H, W, pos_sxy, 0.f), H * W, 1);
        compute_norm(gauss, 1);
      }
      return &gauss;
    }).share();
    const int outer = static_cast<int>(std::min<int64_t>(threads, B));
    const int inner = std::max(1, threads / outer);
    parallel_for(B, outer, [&](int64_t b) {
      crf_image(img + b * 3 * H * W, un + start[b], o + start[b], H, W, static_cast<int>(lab[b]), p,
                gauss_future, inner, &tm[b]);
    });
  }
  if (!timings.is_none()) {
    py::list lst = timings.cast<py::list>();
    for (int64_t b = 0; b < B; ++b) {
      py::dict dct;
      dct["build_s"] = tm[b].build;
      dct["iterations_s"] = tm[b].iterate;
      dct["vertices_gaussian"] = tm[b].m_gauss;
      dct["vertices_bilateral"] = tm[b].m_bilateral;
      lst.append(dct);
    }
  }
}

primaps::Registrar reg([](py::module_& m) {
  m.def("dense_crf", &dense_crf, py::arg("images"), py::arg("unary"), py::arg("labels"), py::arg("out"),
        py::arg("iterations"), py::arg("pos_sxy"), py::arg("pos_compat"), py::arg("bi_sxy"), py::arg("bi_srgb"),
        py::arg("bi_compat"), py::arg("threads"), py::arg("timings") = py::none(),
        "Dense CRF (pydensecrf v2 mean field) of a batch: images uint8 (B,3,H,W), unary float32 flat "
        "(sum_b L_b*H*W, each (L_b,H,W)), labels int64 (B,) = L_b, out like unary. timings: optional list "
        "that receives per-image dicts (build/iteration seconds, lattice vertex counts).");
});

}  // namespace
