#pragma once
// bfloat16 as raw bits on the host (no CUDA headers): float -> bf16 rounds to nearest even, as
// __float2bfloat16 does for finite values; used where host code feeds or reads the bf16 GPU kernels.
#include <cstdint>
#include <cstring>

namespace mta {

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace mta
