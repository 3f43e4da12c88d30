#pragma once
// Warp-wide sums (and maxima) over the 32 lanes in a fixed butterfly order (every lane gets the
// result), shared by the CUDA layers (layers.cu), the materialized MTA op and the epilogue
// (epilogue.cuh), FlashMix's reductions (flash_mix.cu) and the kq layers (flash_kq_layer_*.cu). Internal
// to each file that includes it (unnamed namespace).
#include <cuda_runtime.h>

namespace mta::cuda {
namespace {

template <typename V>
__device__ inline V warp_sum(V v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Maximum over the 32 lanes (every lane gets it).
template <typename V>
__device__ inline V warp_max(V v) {
  for (int off = 16; off > 0; off >>= 1) {
    const V o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Sum over the 4 lanes of a quad (lanes 4g .. 4g + 3: one row of an mma accumulator tile), in a fixed
// order; every lane of the quad gets the result.
__device__ inline float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace
}  // namespace mta::cuda
