#pragma once
// exp for the CPU hot loops (softmax, SwiGLU): a form the compiler vectorizes.
//
// std::exp(float) is a call into libm that GCC does not vectorize without -ffast-math; in the toy
// models' training step the SwiGLU and softmax exps alone were ~15% of the time. exp_vec<float> is
// branch-free and call-free, so a loop over it becomes AVX2 code: Cody-Waite range reduction
// x = n ln2 + r (|r| <= ln2/2, n rounded with the 1.5 * 2^23 trick) and Cephes' degree-6 polynomial
// for exp(r), then 2^n from the exponent bits. Relative error below 2e-7 (about 2 ulp) for
// x in [-86.5, 88.7]; below that it returns 0 (std::exp: under 3e-38), above it +inf; NaN stays NaN.
// exp_vec<double> is std::exp: the float64 path only serves the finite-difference tests.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace mta {

template <typename T>
inline T exp_vec(T x) {
  return std::exp(x);
}

template <>
inline float exp_vec<float>(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = kLn2Hi + kLn2Lo
  constexpr float kRound = 12582912.0f;                            // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLo = -86.5f, kHi = 88.7f;     // the range computed; outside it, see below
  const float t = x * kLog2e + kRound;           // n + kRound, n = round(x / ln 2), in [-125, 128] in range
  const float n = t - kRound;
  const uint32_t ni = std::bit_cast<uint32_t>(t) - std::bit_cast<uint32_t>(kRound);  // unsigned: no UB outside
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as 2^(n-1) * 2, so that n = 128 (x near 88.7) does not overflow the exponent field.
  const float scaled = p * std::bit_cast<float>((ni + 126u) << 23) * 2.0f;
  // Out of range (where `scaled` is garbage): 0 below, +inf above, chosen with integer masks; a float
  // ?: or min/max clamp here keeps GCC (without -ffast-math) from vectorizing the caller's loop. A NaN
  // x compares false both ways and stays NaN.
  const uint32_t under = 0u - static_cast<uint32_t>(x < kLo), over = 0u - static_cast<uint32_t>(x > kHi);
  const uint32_t bits = std::bit_cast<uint32_t>(scaled) & ~under;
  return std::bit_cast<float>((bits & ~over) | (over & std::bit_cast<uint32_t>(std::numeric_limits<float>::infinity())));
}

}  // namespace mta
