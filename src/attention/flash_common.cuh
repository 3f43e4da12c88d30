#pragma once
// Kernels shared by the fused attention backward passes (flash_attn.cu, flash_mta.cu): the row dot
// products delta_i = dO_i . O_i and the conversion of fp32 gradient accumulators to bf16. Internal to
// those two files (unnamed namespace: each includes its own copy).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <stdexcept>

#include "attention/mma_sm80.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

// delta_i = sum_d dO[i,d] * O[i,d] in fp32 (one warp per row).
template <int D>
__global__ void flash_bwd_preprocess_kernel(const __nv_bfloat16* __restrict__ o, const __nv_bfloat16* __restrict__ dout,
                                            float* __restrict__ delta, long long rows) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together (rows are per warp)
  const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(o + row * D);
  const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(dout + row * D);
  float acc = 0.f;
#pragma unroll
  for (int c = lane; c < D / 2; c += 32) {
    const float2 a = __bfloat1622float2(o2[c]), b = __bfloat1622float2(d2[c]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc;
}

// out = bf16(scale * acc), 4 elements per thread per step (n is a multiple of 4).
__global__ void flash_bwd_convert_dq_kernel(const float* __restrict__ acc, __nv_bfloat16* __restrict__ out, long long n4,
                                            float scale) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(acc)[i];
    uint2 packed;
    packed.x = mma::pack_bf16(a.x * scale, a.y * scale);
    packed.y = mma::pack_bf16(a.z * scale, a.w * scale);
    reinterpret_cast<uint2*>(out)[i] = packed;
  }
}

template <int D>
void launch_row_dot(const __nv_bfloat16* o, const __nv_bfloat16* dout, float* delta, long long rows, cudaStream_t s) {
  constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
  const long long blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT_MAX) throw std::invalid_argument("attention backward: B * H * T too large");
  flash_bwd_preprocess_kernel<D><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(o, dout, delta, rows);
  MTA_CUDA_CHECK_LAUNCH("flash_bwd_preprocess_kernel");
}

// n: a multiple of 4; acc 16-byte and out 8-byte aligned.
inline void launch_convert_accum(const float* acc, __nv_bfloat16* out, long long n, float scale, cudaStream_t s) {
  constexpr int kThreads = 256;
  const long long n4 = n / 4;
  const long long blocks = std::min<long long>((n4 + kThreads - 1) / kThreads, 1 << 16);
  if (blocks == 0) return;
  flash_bwd_convert_dq_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(acc, out, n4, scale);
  MTA_CUDA_CHECK_LAUNCH("flash_bwd_convert_dq_kernel");
}

}  // namespace
}  // namespace mta::cuda
