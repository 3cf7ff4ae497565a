// Dense CRF lattices: the permutohedral lattices of pydensecrf (Krähenbühl's "v2" code), those of its
// DenseCRF2D and, for primaps_fast.pydensecrf, those of features of any dimension d (build_lattice<d>),
// built for memory locality. Used by dense_crf.cpp.
//
// Same arithmetic as pydensecrf's SSE path: float32 elevation, round half to even, strict-< rank,
// barycentric weights with wrap-around, keys exact (packed into 64 bits with a range check, so no
// int16 overflow). Vertices are numbered in order of their packed keys: a hash table finds the
// distinct keys of every pixel's d+1 vertices and a radix sort orders them (vertex_ids); the splat's
// CSR list is placed by counting, with pixels in raster order; the blur neighbours of vertex v along
// an axis, key(v) + const, form monotone streams found by one merge per axis. The Gaussian lattice of
// a grid is built without sorting (build_grid_lattice); keys too wide to pack (many dimensions) go
// through a hash table of their coordinates (hashed_vertices).
#pragma once

#include "common.h"
#include "fast_exp.h"

#include <sys/mman.h>

#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>

namespace primaps {
namespace dense_crf {

// The lattices' arrays and the mean field's rows: 64-byte aligned, uninitialised unless filled; those
// of 2 MiB or more 2 MiB aligned and asked for transparent huge pages. The passes gather from all over
// arrays of tens of MB: with 4 KiB pages most gathers also missed the TLB, and the first touch of each
// page faulted (measured: 15-25 % of the time outside the iterations, up to 20 % of an iteration).
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHuge = size_t(2) << 20;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  static size_t alignment(size_t bytes) { return bytes >= kHuge ? kHuge : 64; }
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    void* p = ::operator new(bytes, std::align_val_t(alignment(bytes)));
#ifdef MADV_HUGEPAGE
    if (bytes >= kHuge) madvise(p, (bytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);  // advice only
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) { ::operator delete(p, std::align_val_t(alignment(n * sizeof(T)))); }
  // Buffer<T>(n) and resize(n) leave the elements uninitialised (every user writes them all first),
  // so no pass over the memory zeroes it; Buffer<T>(n, value) still fills.
  template <typename U, typename... A>
  void construct(U* p, A&&... a) {
    if constexpr (sizeof...(A) == 0)
      ::new (static_cast<void*>(p)) U;
    else
      ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, HugePageAllocator<T>>;

// [begin, end) of part t of [0, n) split into T contiguous parts.
inline std::pair<int64_t, int64_t> part(int64_t n, int t, int T) { return {n * t / T, n * (t + 1) / T}; }

// Runs fn(begin, end) over [0, n) split into `threads` contiguous parts.
template <typename F>
inline void chunked(int64_t n, int threads, const F& fn) {
  if (threads <= 1 || n < 4096) {
    fn(int64_t(0), n);
    return;
  }
  parallel_for(threads, threads, [&](int64_t t) {
    auto [b, e] = part(n, static_cast<int>(t), threads);
    fn(b, e);
  });
}

// Stable LSD radix sort of (key, idx)[0, n) by the bits [0, bits) of key (bits <= 64, n < 2^32),
// 8-bit digits, the histograms of all digits counted in one pass, a digit on which every key agrees
// skipped; tk, ti: scratch of n entries.
inline void lsd_sort(uint64_t* key, uint32_t* idx, int64_t n, int bits, uint64_t* tk, uint32_t* ti) {
  const int digits = (bits + 7) / 8;
  uint32_t count[8][256] = {};
  for (int64_t i = 0; i < n; ++i)
    for (int g = 0; g < digits; ++g) ++count[g][(key[i] >> (8 * g)) & 255];
  bool in_scratch = false;
  for (int g = 0; g < digits; ++g) {
    uint32_t* c = count[g];
    if (std::count(c, c + 256, uint32_t(n)) == 1) continue;  // one digit value: the identity
    uint32_t sum = 0;
    for (int x = 0; x < 256; ++x) sum += std::exchange(c[x], sum);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t dst = c[(key[i] >> (8 * g)) & 255]++;
      tk[dst] = key[i];
      ti[dst] = idx[i];
    }
    std::swap(key, tk);
    std::swap(idx, ti);
    in_scratch = !in_scratch;
  }
  if (in_scratch) {  // the result is in the caller's scratch: copy it back
    std::copy(key, key + n, tk);
    std::copy(idx, idx + n, ti);
  }
}

// Stable radix sort of (key, idx) by key, keys < 2^bits: one pass on the top 8 bits splits the
// entries into 256 buckets (parts of the input per thread, in order), then each bucket is sorted on
// the remaining bits by lsd_sort while it sits in the cache (buckets of ~2k keys at 640 px), so
// only the first pass streams the whole array through memory. Buckets go to threads in a fixed
// order: the result does not depend on the thread count.
inline void radix_sort(Buffer<uint64_t>& key, Buffer<uint32_t>& idx, int bits, int threads) {
  const int64_t n = static_cast<int64_t>(key.size());
  Buffer<uint64_t> key2(n);
  Buffer<uint32_t> idx2(n);
  if (bits <= 8) {
    lsd_sort(key.data(), idx.data(), n, bits, key2.data(), idx2.data());
    return;
  }
  const int T = n < 65536 ? 1 : std::max(1, threads), top = bits - 8;
  std::vector<std::array<int64_t, 256>> hist(T);
  parallel_for(T, T, [&](int64_t t) {
    auto [b, e] = part(n, static_cast<int>(t), T);
    std::array<int64_t, 256>& h = hist[t];
    h.fill(0);
    for (int64_t i = b; i < e; ++i) ++h[key[i] >> top];
  });
  int64_t bucket[257] = {};
  for (int g = 0; g < 256; ++g) {
    bucket[g + 1] = bucket[g];
    for (int t = 0; t < T; ++t) {
      const int64_t c = hist[t][g];
      hist[t][g] = bucket[g + 1];
      bucket[g + 1] += c;
    }
  }
  parallel_for(T, T, [&](int64_t t) {
    auto [b, e] = part(n, static_cast<int>(t), T);
    std::array<int64_t, 256>& h = hist[t];
    for (int64_t i = b; i < e; ++i) {
      const int64_t dst = h[key[i] >> top]++;
      key2[dst] = key[i];
      idx2[dst] = idx[i];
    }
  });
  parallel_for(256, T, [&](int64_t g) {
    const int64_t b = bucket[g], m = bucket[g + 1] - b;
    lsd_sort(&key2[b], &idx2[b], m, top, &key[b], &idx[b]);  // key/idx are free: their ranges serve as scratch
  });
  key.swap(key2);
  idx.swap(idx2);
}

// A permutohedral lattice over N pixels. Pixels are numbered in the lattice's pixel order: raster
// order, or (large lattices) the order of each pixel's remainder-0 vertex, raster within a vertex;
// `raster` maps a position to its raster pixel.
struct Lattice {
  int d = 0;
  int64_t N = 0, M = 0;
  Buffer<int32_t> raster;  // (N) raster pixel at each position
  Buffer<int32_t> offset;  // (N, d+1) vertex ids by remainder, by position
  Buffer<float> bary;      // (N, d+1) barycentric weights, by position
  Buffer<int64_t> start;   // (M+1) CSR over (position, weight), raster order within a vertex
  Buffer<int32_t> pix;
  Buffer<float> wgt;
  Buffer<int32_t> nbr;     // (d+1, M, 2): n1, n2; M = the zero row
  Buffer<float> norm;      // (N) 1/sqrt(K 1 + 1e-20), by position
  bool raster_order = true;  // positions are the raster pixels (raster[k] == k)
  int32_t rem_lo = 0, rem_hi = 0;  // range of the remainder-0 coordinates 0..d-1 (pydensecrf's keys: +-d)

  size_t bytes() const {
    auto of = [](const auto& v) { return v.size() * sizeof(v[0]); };
    return of(raster) + of(offset) + of(bary) + of(start) + of(pix) + of(wgt) + of(nbr) + of(norm);
  }
};

// Vertex ids of the entries keys[0, n) (each in [1, 2^bits), bits <= 62): vid[i] = the rank of keys[i]
// among the distinct keys, which are returned in increasing order; start (M+1) = the CSR offsets of
// the entries [0, counted) grouped by vertex. A hash table (linear probing, at least 1.5 n slots, 0 = empty,
// inserts by compare-and-swap so that threads share it) gives each entry its key's slot, the lookups
// prefetched a few entries ahead; the occupied slots sorted by key (radix_sort) number the vertices.
// Neighbouring pixels share most of their vertices, so most lookups find a slot still in the cache:
// this is cheaper than sorting all n entries (about 6 per key on photographs, 2 on textured scenes). Where a
// key lands in the table depends on the threads' timing; the ids do not.
inline Buffer<uint64_t> vertex_ids(const uint64_t* keys, int64_t n, int64_t counted, int bits, uint32_t* vid,
                                   Buffer<int64_t>& start, int threads) {
  int log2 = 10;
  while ((int64_t(1) << log2) < n + n / 2) ++log2;
  const int64_t slots = int64_t(1) << log2;
  Buffer<uint64_t> table(slots, 0);
  auto home = [&](uint64_t key) { return (key * 0x9E3779B97F4A7C15ull) >> (64 - log2); };
  constexpr int64_t kAhead = 16;
  auto insert = [&](auto shared, int64_t b, int64_t e) {  // shared: other threads insert at the same time
    for (int64_t i = b; i < e; ++i) {
      if (i + kAhead < e) __builtin_prefetch(&table[home(keys[i + kAhead])]);
      const uint64_t key = keys[i];
      uint64_t h = home(key);
      for (;;) {
        if constexpr (decltype(shared)::value) {
          uint64_t seen = __atomic_load_n(&table[h], __ATOMIC_RELAXED);
          if (seen == 0 &&
              !__atomic_compare_exchange_n(&table[h], &seen, key, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            continue;  // another thread took the slot: look again
          if (seen == 0 || seen == key) break;
        } else {
          if (table[h] == 0) table[h] = key;
          if (table[h] == key) break;
        }
        h = (h + 1) & (slots - 1);
      }
      vid[i] = static_cast<uint32_t>(h);
    }
  };
  if (threads <= 1 || n < 4096)
    insert(std::false_type{}, 0, n);
  else
    chunked(n, threads, [&](int64_t b, int64_t e) { insert(std::true_type{}, b, e); });
  // The occupied slots, part by part; sorted by key.
  const int parts = std::max(1, threads);
  std::vector<int64_t> used(parts + 1, 0);
  parallel_for(parts, threads, [&](int64_t t) {
    auto [b, e] = part(slots, static_cast<int>(t), parts);
    used[t + 1] = e - b - std::count(&table[b], &table[0] + e, uint64_t(0));
  });
  for (int t = 0; t < parts; ++t) used[t + 1] += used[t];
  const int64_t M = used[parts];
  Buffer<uint64_t> vkey(M);
  Buffer<uint32_t> slot(M);
  parallel_for(parts, threads, [&](int64_t t) {
    auto [b, e] = part(slots, static_cast<int>(t), parts);
    for (int64_t h = b, o = used[t]; h < e; ++h)
      if (table[h]) vkey[o] = table[h], slot[o++] = static_cast<uint32_t>(h);
  });
  radix_sort(vkey, slot, bits, threads);
  chunked(M, threads, [&](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; ++v) table[slot[v]] = static_cast<uint64_t>(v);
  });
  // Entries to vertex ids, counted per vertex (per part, then summed).
  std::vector<Buffer<uint32_t>> count(parts);
  parallel_for(parts, threads, [&](int64_t t) {
    auto [b, e] = part(n, static_cast<int>(t), parts);
    Buffer<uint32_t>& c = count[t];
    c.assign(M + 1, 0);
    for (int64_t i = b; i < e; ++i) {
      if (i + kAhead < e) __builtin_prefetch(&table[vid[i + kAhead]]);
      vid[i] = static_cast<uint32_t>(table[vid[i]]);
      c[vid[i] + 1] += i < counted;
    }
  });
  start.assign(M + 1, 0);
  for (int t = 0; t < parts; ++t)
    for (int64_t v = 0; v <= M; ++v) start[v] += count[t][v];
  for (int64_t v = 0; v < M; ++v) start[v + 1] += start[v];
  return vkey;
}

// Elevates the features of 4 pixels (lanes; f[i]: feature i) onto the lattice with pydensecrf's SSE
// arithmetic: the remainder-0 vertex r0 (d+1 coordinates, multiples of d+1), the rank of each
// coordinate and the barycentric weights, as floats. sf: the per-axis elevation scales. Per lane the
// operations and their order are pydensecrf's; the weights' scatter by rank, bc[d - rank] += v and
// bc[d - rank + 1] -= v, is written as bc[p] = v(rank d-p) - v(rank d-p+1): each entry gets one of each,
// and a - b is the same float in either order from 0. False when a coordinate is beyond the range where
// float32 rounding is exact (|v| >= 2^22).
template <int d>
inline bool elevate4(const f32x4* f, const float* sf, f32x4* r0, f32x4* rank, f32x4* bary) {
  constexpr int D = d + 1;
  const float invd = 1.0f / D, dp1 = static_cast<float>(D);
  const f32x4 zero{}, one = zero + 1.f;
  auto select = [&](i32x4 m, f32x4 a) { return (f32x4)(m & (i32x4)a); };  // a where m, else +0
  f32x4 el[D];
  f32x4 sm = zero;
  for (int j = d; j > 0; --j) {
    const f32x4 cf = f[j - 1] * sf[j - 1];
    el[j] = sm - static_cast<float>(j) * cf;
    sm += cf;
  }
  el[0] = sm;
  f32x4 sum = zero;
  i32x4 bad{};
  for (int i = 0; i < D; ++i) {
    const f32x4 x = invd * el[i];
    bad |= (x >= 4194304.f) | (x <= -4194304.f) | (x != x);
    const f32x4 v = (x + 12582912.f) - 12582912.f;  // round half to even, as cvtps2dq (exact for |x| < 2^22)
    r0[i] = v * dp1;
    sum += v;
  }
  if (bad[0] | bad[1] | bad[2] | bad[3]) return false;
  for (int i = 0; i < D; ++i) rank[i] = zero;
  for (int i = 0; i < d; ++i) {
    const f32x4 di = el[i] - r0[i];
    for (int j = i + 1; j < D; ++j) {
      const f32x4 c = select(di < el[j] - r0[j], one);
      rank[i] += c;
      rank[j] += one - c;
    }
  }
  for (int i = 0; i < D; ++i) {
    rank[i] += sum;
    const f32x4 fix = select(rank[i] < 0.f, zero + dp1) - select(rank[i] >= dp1, zero + dp1);
    rank[i] += fix;
    r0[i] += fix;
  }
  f32x4 plus[D];  // plus[p]: v of the coordinate of rank d - p
  for (int p = 0; p < D; ++p) plus[p] = zero;
  for (int i = 0; i < D; ++i) {
    const f32x4 v = (el[i] - r0[i]) * invd;
    for (int p = 0; p < D; ++p) plus[p] += select(rank[i] == static_cast<float>(d - p), v);
  }
  const f32x4 last = zero - plus[d];
  bary[0] = plus[0] + (1.f + last);
  for (int p = 1; p < D; ++p) bary[p] = plus[p] - plus[p - 1];
  return true;
}

// elevate4 on pixels [k, k + g) (g <= 4) of features feat (N, d): the remainder-0 vertex and the
// ranks as integers, the weights into bary, each (g, d+1).
template <int d>
inline bool elevate_pixels(const float* feat, int64_t k, int g, const float* sf, int32_t* r0_out, int8_t* rank_out,
                           float* bary_out) {
  constexpr int D = d + 1;
  f32x4 f[d], r0[D], rank[D], bary[D];
  for (int i = 0; i < d; ++i)
    for (int l = 0; l < 4; ++l) f[i][l] = feat[(k + std::min(l, g - 1)) * d + i];
  if (!elevate4<d>(f, sf, r0, rank, bary)) return false;
  for (int l = 0; l < g; ++l)
    for (int i = 0; i < D; ++i) {
      r0_out[l * D + i] = static_cast<int32_t>(r0[i][l]);
      rank_out[l * D + i] = static_cast<int8_t>(rank[i][l]);
      bary_out[l * D + i] = bary[i][l];
    }
  return true;
}

// Vertex ids, the CSR offsets of the entries [0, counted) and the blur neighbours (as Lattice::nbr) of
// the entries' vertices when their packed keys would need more than 62 bits (many feature dimensions):
// each vertex keyed by its coordinates 0..d-1, as pydensecrf keys it, the distinct keys numbered in the
// order the entries first reach them through a hash table (linear probing), the neighbours found by
// lookups. Entry q is vertex q % (d+1) of point q / (d+1) (rem, rk: as in build_lattice). Returns M.
template <int d>
int64_t hashed_vertices(const int32_t* rem, const int8_t* rk, int64_t n, int64_t counted, int32_t* vid,
                        Buffer<int64_t>& start, Buffer<int32_t>& nbr, int threads) {
  constexpr int D = d + 1;
  int log2 = 10;
  while ((int64_t(1) << log2) < n + n / 2) ++log2;
  const uint64_t mask = (uint64_t(1) << log2) - 1;
  Buffer<int32_t> table(mask + 1, -1);
  std::vector<int32_t> keys;  // (M, d)
  auto slot_of = [&](const int32_t* k) {  // the slot of key k, or the empty slot where it would go
    uint64_t h = 0;
    for (int i = 0; i < d; ++i) h = (h ^ static_cast<uint32_t>(k[i])) * 0x9E3779B97F4A7C15ull;
    for (h = ((h ^ (h >> 32)) * 0x9E3779B97F4A7C15ull) >> (64 - log2);; h = (h + 1) & mask) {  // the high bits
      const int32_t e = table[h];
      if (e < 0 || std::equal(k, k + d, &keys[int64_t(e) * d])) return h;
    }
  };
  int64_t M = 0;
  int32_t key[d];
  for (int64_t q = 0; q < n; ++q) {
    const int64_t k = q / D;
    const int r = static_cast<int>(q % D);
    for (int i = 0; i < d; ++i) key[i] = rem[k * D + i] + (rk[k * D + i] <= d - r ? r : r - D);
    const uint64_t h = slot_of(key);
    if (table[h] < 0) {
      table[h] = static_cast<int32_t>(M++);
      keys.insert(keys.end(), key, key + d);
    }
    vid[q] = table[h];
  }
  start.assign(M + 1, 0);
  for (int64_t q = 0; q < counted; ++q) ++start[vid[q] + 1];
  for (int64_t v = 0; v < M; ++v) start[v + 1] += start[v];
  // n1 = key - 1 on every coordinate + (d+1) on axis j, n2 = key + 1 - (d+1) on axis j (axis d is not
  // in the key); absent ones are the zero row M.
  nbr.resize(D * M * 2);
  chunked(M, threads, [&](int64_t b, int64_t e) {
    int32_t n1[d], n2[d];
    for (int64_t v = b; v < e; ++v)
      for (int j = 0; j < D; ++j) {
        for (int i = 0; i < d; ++i) n1[i] = keys[v * d + i] - 1, n2[i] = keys[v * d + i] + 1;
        if (j < d) n1[j] += D, n2[j] -= D;
        const int32_t e1 = table[slot_of(n1)], e2 = table[slot_of(n2)];
        nbr[(j * M + v) * 2] = e1 < 0 ? static_cast<int32_t>(M) : e1;
        nbr[(j * M + v) * 2 + 1] = e2 < 0 ? static_cast<int32_t>(M) : e2;
      }
  });
  return M;
}

// Builds the lattice of features feat (N, d), raster order: elevation, keys packed into 64 bits
// (coordinates 1..d, coordinate d most significant: any d coordinates of a vertex determine it),
// vertex ids in key order (vertex_ids), the CSR list in raster order within a vertex, blur
// neighbours by merging the sorted keys with key + delta; keys that do not fit 62 bits go through
// hashed_vertices when `hashed` (else they are refused). `phantom` adds the vertices of the zero
// feature vector, which no pixel splats into or slices from: pydensecrf's SSE path elevates pixels 4
// at a time and, when N is not a multiple of 4, inserts the padding lanes (features 0) into its
// lattice, where the blur passes values through them. With more than sort_above
// vertices, the pixels are numbered in the order of their remainder-0 vertex: on large lattices a run
// of pixels then slices from and splats into nearby vertices (textured scenes, ~3 vertices per
// pixel: up to 9 % faster at 320-480 px); on smaller ones raster order is faster (photographs, 0.6-1.1
// vertices per pixel: 3-27 % faster, no exchange with the Gaussian term's raster order).
template <int d>
void build_lattice(Lattice& lat, const Buffer<float>& feat, int64_t N, int64_t sort_above, int threads,
                   bool phantom = false, bool hashed = false) {
  constexpr int D = d + 1;
  if ((N + 1) * D > INT32_MAX) throw std::invalid_argument("images: too many pixels");
  lat.d = d;
  lat.N = N;
  const int64_t P = N + phantom;  // the points: the pixels, then the phantom
  Buffer<int32_t> rem(P * D);
  Buffer<int8_t> rk(P * D);
  Buffer<float> bary(P * D);
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
    for (int64_t k = b; k < e; k += 4) {
      const int g = static_cast<int>(std::min<int64_t>(4, e - k));
      if (!elevate_pixels<d>(feat.data(), k, g, sf, &rem[k * D], &rk[k * D], &bary[k * D])) {
        too_large = true;
        return;
      }
      for (int64_t q = k * D; q < (k + g) * D; ++q) {
        lo[q % D] = std::min(lo[q % D], rem[q]);
        hi[q % D] = std::max(hi[q % D], rem[q]);
      }
    }
  });
  if (phantom) {
    const float zero[d] = {};
    elevate_pixels<d>(zero, 0, 1, sf, &rem[N * D], &rk[N * D], &bary[N * D]);
    for (int i = 0; i < D; ++i) {
      lo_c[0][i] = std::min(lo_c[0][i], rem[N * D + i]);
      hi_c[0][i] = std::max(hi_c[0][i], rem[N * D + i]);
    }
  }
  if (too_large)
    throw std::invalid_argument("features: lattice coordinates too large (sxy/srgb too small for these inputs)");
  lat.rem_lo = INT32_MAX, lat.rem_hi = INT32_MIN;
  for (int c = 0; c < parts; ++c)
    for (int i = 0; i < d; ++i) {
      lat.rem_lo = std::min(lat.rem_lo, lo_c[c][i]);
      lat.rem_hi = std::max(lat.rem_hi, hi_c[c][i]);
    }
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
  // Vertex r of a pixel: r0 + r on the coordinates of rank <= d - r, r - (d+1) on the others. From r
  // to r + 1 every coordinate gains 1 except the one of rank d - r, which loses d.
  const int64_t n = N * D, n_all = P * D;
  const bool packed = bits <= 62;
  if (!packed && !hashed)
    throw std::invalid_argument("features: lattice keys need " + std::to_string(bits) +
                                " bits (> 62): the image is too large or sxy/srgb too small");
  uint64_t unit = 0;  // 1 on every packed coordinate
  if (packed)
    for (int i = 1; i < D; ++i) unit += uint64_t(1) << shift[i];
  Buffer<int32_t> vid(n_all);
  Buffer<uint64_t> vkey;
  if (packed) {
    Buffer<uint64_t> keys(n_all);
    chunked(P, threads, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        uint64_t key = 0, step[D] = {};  // step[q]: D on the coordinate of rank q (none for coordinate 0)
        for (int i = 1; i < D; ++i) {
          key += static_cast<uint64_t>(rem[k * D + i] - lo[i]) << shift[i];
          step[rk[k * D + i]] = uint64_t(D) << shift[i];
        }
        for (int r = 0; r < D; ++r) {
          keys[k * D + r] = key;
          key += unit - step[d - r];
        }
      }
    });
    // Vertex ids in key order, and the CSR offsets.
    vkey = vertex_ids(keys.data(), n_all, n, bits, reinterpret_cast<uint32_t*>(vid.data()), lat.start, threads);
    lat.M = static_cast<int64_t>(vkey.size());
  } else {
    lat.M = hashed_vertices<d>(rem.data(), rk.data(), n_all, n, vid.data(), lat.start, lat.nbr, threads);
  }
  rem = {};
  rk = {};
  vid.resize(n);
  bary.resize(n);
  const int64_t M = lat.M;
  // Pixel positions: raster order, or pixels by the id of their remainder-0 vertex, raster within one.
  const bool in_raster = M <= sort_above;
  lat.raster_order = in_raster;
  lat.raster.resize(N);
  Buffer<int32_t> pos(N);
  if (in_raster) {
    for (int64_t k = 0; k < N; ++k) pos[k] = lat.raster[k] = static_cast<int32_t>(k);
  } else {
    Buffer<int32_t> first(M + 1, 0);
    for (int64_t k = 0; k < N; ++k) ++first[vid[k * D] + 1];
    for (int64_t v = 0; v < M; ++v) first[v + 1] += first[v];
    for (int64_t k = 0; k < N; ++k) {
      pos[k] = first[vid[k * D]]++;
      lat.raster[pos[k]] = static_cast<int32_t>(k);
    }
  }
  // The CSR list in raster order within a vertex: each part of the vertices scans all entries.
  lat.pix.resize(n);
  lat.wgt.resize(n);
  const int vparts = M < 65536 ? 1 : std::max(1, threads);  // also the parts of the neighbour merges
  parallel_for(vparts, threads, [&](int64_t t) {
    auto [b, e] = part(M, static_cast<int>(t), vparts);
    Buffer<int32_t> cursor(lat.start.begin() + b, lat.start.begin() + e);  // n < 2^31
    for (int64_t i = 0; i < n; ++i) {
      if (i + 16 < n && vid[i + 16] >= b && vid[i + 16] < e) __builtin_prefetch(&cursor[vid[i + 16] - b]);
      const int64_t v = vid[i];
      if (v < b || v >= e) continue;
      const int64_t dst = cursor[v - b]++;
      lat.pix[dst] = pos[i / D];
      lat.wgt[dst] = bary[i];
    }
  });
  // Vertex ids and weights by position.
  if (in_raster) {
    lat.offset = std::move(vid);
    lat.bary = std::move(bary);
  } else {
    lat.offset.resize(n);
    lat.bary.resize(n);
    chunked(N, threads, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        for (int r = 0; r < D; ++r) {
          lat.offset[int64_t(pos[k]) * D + r] = vid[k * D + r];
          lat.bary[int64_t(pos[k]) * D + r] = bary[k * D + r];
        }
    });
  }
  // Blur neighbours along axis j: n1 = key - 1 on every coordinate + (d+1) on axis j, n2 = key - that
  // step, each found by one branch-free merge of the sorted keys with themselves shifted by the step.
  // Absent ones point at the zero row M.
  if (!packed) return;
  lat.nbr.resize(D * M * 2);
  parallel_for(D * 2 * vparts, threads, [&](int64_t job) {
    const int j = static_cast<int>(job / (2 * vparts)), side = static_cast<int>(job / vparts % 2);
    auto [b, e] = part(M, static_cast<int>(job % vparts), vparts);
    const uint64_t step = (j > 0 ? (uint64_t(D) << shift[j]) : 0) - unit, delta = side ? uint64_t(0) - step : step;
    int32_t* out = &lat.nbr[j * M * 2 + side];
    if (b == e) return;
    // For each v in [b, e): the u with vkey[u] == vkey[v] + delta. The last value written for a v is
    // the right one: u stops at the first key >= the target. Each merge is a chain of dependent loads,
    // so the range runs as kChains merges in step.
    constexpr int kChains = 4;
    int64_t v[kChains], ve[kChains], u[kChains];
    for (int c = 0; c < kChains; ++c) {
      std::tie(v[c], ve[c]) = part(e - b, c, kChains);
      v[c] += b, ve[c] += b;
      u[c] = v[c] < ve[c] ? std::lower_bound(vkey.begin(), vkey.end(), vkey[v[c]] + delta) - vkey.begin() : M;
    }
    auto active = [&](int c) { return v[c] < ve[c] && u[c] < M; };
    auto advance = [&](int c) {
      const uint64_t target = vkey[v[c]] + delta, key = vkey[u[c]];
      out[2 * v[c]] = key == target ? static_cast<int32_t>(u[c]) : static_cast<int32_t>(M);
      v[c] += key >= target;
      u[c] += key <= target;
    };
    while (active(0) && active(1) && active(2) && active(3))
      for (int c = 0; c < kChains; ++c) advance(c);
    for (int c = 0; c < kChains; ++c) {
      while (active(c)) advance(c);
      for (; v[c] < ve[c]; ++v[c]) out[2 * v[c]] = static_cast<int32_t>(M);
    }
  });
}

// K 1 (N, by position): the lattice filter of ones with pydensecrf's scalar path (one channel: the
// blur adds 0.5 (n1 + n2) in double, the slice sums (w * v) * alpha).
inline Buffer<float> filter_ones(const Lattice& lat, int threads) {
  const int64_t M = lat.M, N = lat.N;
  const int D = lat.d + 1;
  Buffer<float> vals(M + 1, 0.f), tmp(M + 1, 0.f);
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
  Buffer<float> out(N);
  chunked(N, threads, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      float s = 0.f;
      for (int r = 0; r < D; ++r) s += lat.bary[k * D + r] * vals[lat.offset[k * D + r]] * alpha;
      out[k] = s;
    }
  });
  return out;
}

// norm = 1 / sqrt(K 1 + 1e-20) (pydensecrf's NORMALIZE_SYMMETRIC).
inline void compute_norm(Lattice& lat, int threads) {
  lat.norm = filter_ones(lat, threads);
  chunked(lat.N, threads, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) lat.norm[k] = static_cast<float>(1.0 / std::sqrt(double(lat.norm[k]) + 1e-20));
  });
}

// The Gaussian lattice of an H x W grid, built without sorting: the remainder-k points of the 2-d
// permutohedral lattice are i (1,1,-2) + j (2,-1,-1); row R = 2i + j follows y and column j / 2
// follows x, so vertices numbered row by row come in nearly raster order, and every blur neighbour
// is a fixed (row, column) step. Entries no pixel touches are not vertices. False when the grid
// would be much larger than the lattice (sxy well below 1).
inline bool build_grid_lattice(Lattice& lat, int64_t H, int64_t W, float sxy, int threads) {
  const int64_t N = H * W;
  const float inv_std = static_cast<float>(std::sqrt(2.0 / 3.0) * 3);
  const float sf[2] = {static_cast<float>(1.0 / std::sqrt(2.0) * inv_std),
                       static_cast<float>(1.0 / std::sqrt(6.0) * inv_std)};
  Buffer<int32_t> Rv(N * 3), Jv(N * 3);
  lat.bary.resize(N * 3);
  std::atomic<bool> too_large{false};
  chunked(N, threads, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; k += 4) {
      const int g = static_cast<int>(std::min<int64_t>(4, e - k));
      float f[4 * 2];
      for (int l = 0; l < g; ++l) {
        f[2 * l] = static_cast<float>((k + l) % W) / sxy;
        f[2 * l + 1] = static_cast<float>((k + l) / W) / sxy;
      }
      int32_t rem[4 * 3];
      int8_t rk[4 * 3];
      if (!elevate_pixels<2>(f, 0, g, sf, rem, rk, &lat.bary[k * 3])) {
        too_large = true;
        return;
      }
      for (int q = 0; q < 3 * g; ++q) {
        const int at = q / 3 * 3, r = q % 3;  // pixel k + q / 3, its vertex r
        const int32_t k0 = rem[at] + (rk[at] <= 2 - r ? r : r - 3);
        const int32_t k1 = rem[at + 1] + (rk[at + 1] <= 2 - r ? r : r - 3);
        const int32_t j = (k0 - k1) / 3, i = k1 + j;
        Rv[k * 3 + q] = 2 * i + j;
        Jv[k * 3 + q] = j;
      }
    }
  });
  if (too_large) return false;
  const int64_t Rmin = *std::min_element(Rv.begin(), Rv.end()), Rmax = *std::max_element(Rv.begin(), Rv.end());
  const int64_t jmin = *std::min_element(Jv.begin(), Jv.end()), jmax = *std::max_element(Jv.begin(), Jv.end());
  const int64_t rows = Rmax - Rmin + 1, width = ((jmax - jmin) >> 1) + 3;  // a free column at each end
  if (rows * width > 4 * N + 4096) return false;
  // Vertex ids: the touched entries, row by row.
  Buffer<int32_t> id(rows * width, 0), cell(N * 3);
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
  Buffer<int64_t> cursor(lat.start.begin(), lat.start.end() - 1);
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

// Features of pydensecrf's DenseCRF2D: (x/sxy, y/sxy) and, with an image, its channels / srgb.
inline Buffer<float> crf_features(const uint8_t* img, int64_t H, int64_t W, float sxy, float srgb) {
  const int64_t N = H * W;
  const int d = img ? 5 : 2;
  Buffer<float> f(N * d);
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

inline void build_gaussian(Lattice& gauss, int64_t H, int64_t W, float sxy, int threads) {
  if (!build_grid_lattice(gauss, H, W, sxy, threads))
    build_lattice<2>(gauss, crf_features(nullptr, H, W, sxy, 0.f), H * W, INT64_MAX, threads);
  compute_norm(gauss, threads);
}

}  // namespace dense_crf
}  // namespace primaps
