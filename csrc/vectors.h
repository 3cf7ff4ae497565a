// GCC/Clang vectors of 4 and 8 lanes for the CPU kernels (a register, or a pair of them, in each SIMD
// variant of common.h): unaligned loads and stores, bit casts, and lane selects written as bit operations
// (GCC turns a vector ?: into a loop over the lanes in some variants).
#pragma once

#include <cstdint>
#include <cstring>

namespace primaps {

// Everything here is always inlined: the SIMD variants of the kernels compile it for their ISA.
#define PRIMAPS_VECTOR_INLINE inline __attribute__((always_inline))

typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

// Unaligned loads and stores of a vector V of the lanes at p: one rule, named by lane count and type below.
template <typename V, typename T>
PRIMAPS_VECTOR_INLINE V load_lanes(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename T>
PRIMAPS_VECTOR_INLINE void store_lanes(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
PRIMAPS_VECTOR_INLINE f32x4 load4(const float* p) { return load_lanes<f32x4>(p); }
PRIMAPS_VECTOR_INLINE f32x8 load8(const float* p) { return load_lanes<f32x8>(p); }
PRIMAPS_VECTOR_INLINE i32x8 load8(const int32_t* p) { return load_lanes<i32x8>(p); }
PRIMAPS_VECTOR_INLINE i64x4 load4(const int64_t* p) { return load_lanes<i64x4>(p); }
PRIMAPS_VECTOR_INLINE void store4(float* p, f32x4 v) { store_lanes(p, v); }
PRIMAPS_VECTOR_INLINE void store8(float* p, f32x8 v) { store_lanes(p, v); }
PRIMAPS_VECTOR_INLINE void store8(int32_t* p, i32x8 v) { store_lanes(p, v); }
PRIMAPS_VECTOR_INLINE void store4(int64_t* p, i64x4 v) { store_lanes(p, v); }

PRIMAPS_VECTOR_INLINE int32_t to_int(float n) { return static_cast<int32_t>(n); }
PRIMAPS_VECTOR_INLINE i32x4 to_int(f32x4 n) { return __builtin_convertvector(n, i32x4); }
PRIMAPS_VECTOR_INLINE i32x8 to_int(f32x8 n) { return __builtin_convertvector(n, i32x8); }
PRIMAPS_VECTOR_INLINE float from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// a cast between same-size vectors keeps the bits
PRIMAPS_VECTOR_INLINE f32x4 from_bits(i32x4 bits) { return (f32x4)bits; }
PRIMAPS_VECTOR_INLINE f32x8 from_bits(i32x8 bits) { return (f32x8)bits; }

// mask ? a : b lane by lane (mask lanes all ones or all zeros), and the lane-wise maximum and minimum.
template <typename V, typename I>
PRIMAPS_VECTOR_INLINE V select(I mask, V a, V b) {
  return (V)((mask & (I)a) | (~mask & (I)b));
}
template <typename V>
PRIMAPS_VECTOR_INLINE V vmax(V a, V b) {
  return select(a > b, a, b);
}
template <typename V>
PRIMAPS_VECTOR_INLINE V vmin(V a, V b) {
  return select(a < b, a, b);
}

}  // namespace primaps
