// exp without libm, written as plain arithmetic so that it vectorises: for float (in loops the
// compiler vectorises) and for 4-lane GCC/Clang vectors (SSE2 on x86-64, NEON on arm64). Used by the
// softmaxes of the focal loss and the dense CRF.
#pragma once

#include <cstdint>
#include <cstring>

namespace primaps {

typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

inline f32x4 load4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, f32x4 v) { std::memcpy(p, &v, sizeof v); }

inline int32_t to_int(float n) { return static_cast<int32_t>(n); }
inline i32x4 to_int(f32x4 n) { return __builtin_convertvector(n, i32x4); }
inline float from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline f32x4 from_bits(i32x4 bits) { return (f32x4)bits; }  // a cast between same-size vectors keeps the bits

// exp(x) for -87.33 <= x <= 0 (the caller clamps), within 1 ulp: exp(x) = 2^n * e^r, |r| <= ln2/2,
// Cody-Waite reduction with ln 2 in two parts, degree-6 polynomial for e^r (Cephes' expf).
template <typename F>
inline F exp_nonpositive(F x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const F n = (x * 1.44269504088896341f + magic) - magic;
  const F r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  F q = r * 1.9875691500e-4f + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const F e = q * r * r + r + 1.0f;
  return e * from_bits((to_int(n) + 127) << 23);
}

}  // namespace primaps
