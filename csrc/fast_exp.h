// exp and log without libm, written as plain arithmetic so that they vectorise: exp for float (in loops
// the compiler vectorises) and for 4- and 8-lane GCC/Clang vectors (the ISA's registers, or pairs of
// them), log for 4-lane vectors. Used by the softmaxes of the focal loss and the dense CRF, and the CRF's unary.
#pragma once

#include <cstdint>

#include "vectors.h"

namespace primaps {

// exp(x) for -87.33 <= x <= 88 (the caller clamps), within 1 ulp: exp(x) = 2^n * e^r, |r| <= ln2/2,
// Cody-Waite reduction with ln 2 in two parts, degree-6 polynomial for e^r (Cephes' expf); n in
// [-126, 127], so 2^n is the normal float built from its exponent bits.
template <typename F>
PRIMAPS_VECTOR_INLINE F exp_clamped(F x) {
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

// log(x) of 4 lanes of positive normal floats (the caller clamps), within 1 ulp: x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), log x = e ln 2 + log(m) with log(m) = t - t^2 / 2 + t^3 P(t), t = m - 1 and P
// of degree 8 (Cephes' logf), ln 2 in two parts.
PRIMAPS_VECTOR_INLINE f32x4 log_positive(f32x4 x) {
  const i32x4 bits = (i32x4)x;
  const f32x4 m = from_bits((bits & 0x807fffff) | 0x3f000000);  // in [0.5, 1)
  const i32x4 small = m < 0.707106781f;                          // -1 where m < sqrt(1/2)
  const f32x4 t = (small ? m + m : m) - 1.0f;
  const f32x4 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126 + small, f32x4);
  const f32x4 t2 = t * t;
  f32x4 p = t * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * t + 1.1676998740e-1f;
  p = p * t - 1.2420140846e-1f;
  p = p * t + 1.4249322787e-1f;
  p = p * t - 1.6668057665e-1f;
  p = p * t + 2.0000714765e-1f;
  p = p * t - 2.4999993993e-1f;
  p = p * t + 3.3333331174e-1f;
  f32x4 y = p * t * t2;
  y += e * -2.12194440e-4f;
  y += t2 * -0.5f;
  return (t + y) + e * 0.693359375f;
}

}  // namespace primaps
