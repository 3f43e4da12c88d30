#pragma once
// Device code shared by the fused attention kernels (flash_attn.cu, flash_mta.cu, flash_mix.cu): the
// forward pass's per-tile steps (mask, online softmax, attention dropout, P V, epilogue), the row dot
// products delta_i = dO_i . O_i and the conversion of fp32 gradient accumulators to bf16. Internal to those two files (unnamed
// namespace: each includes its own copy).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "attention/attention_op.h"
#include "attention/mma_sm80.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

// ---- The forward pass's per-tile steps, shared by flash_fwd_kernel and the FlashMTA forward. A warp
// holds the logits of its 16 query rows x BN keys in mma accumulator layout (acc_s), its output rows
// (acc_o, D columns) and per row half r (row g, row g + 8) the running max (log2 domain) and this
// thread's part of the running sum.

// Second causal mask (key > query) and the sequence end (key >= T), only where the tile can need it.
template <int BN>
__device__ __forceinline__ void mask_future(float (&acc_s)[BN / 8][4], int n0, int row_w, int T, int lane) {
  const int g = lane >> 2, t = lane & 3;
  if (n0 + BN > row_w + 1 || n0 + BN > T) {
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + 8 * j + 2 * t + (e & 1), row = row_w + g + 8 * (e >> 1);
        if (col > row || col >= T) acc_s[j][e] = -INFINITY;
      }
  }
}

// Online softmax: x = acc_s * scale_log2, new running max, rescale of the sum and of acc_o, and
// acc_s replaced by exp2(x - max). A row is spread over the 4 lanes of a quad.
template <int BN, int D>
__device__ __forceinline__ void online_softmax(float (&acc_s)[BN / 8][4], float (&row_max)[2], float (&row_sum)[2],
                                               float (&acc_o)[D / 8][4], float scale_log2) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(acc_s[j][2 * r], acc_s[j][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(row_max[r], mx * scale_log2);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
    const float alpha = exp2f(row_max[r] - m_use);          // exp2(-inf) = 0 on the first visit
    row_max[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        const float p = exp2f(fmaf(acc_s[j][e], scale_log2, -m_use));
        acc_s[j][e] = p;
        sum += p;
      }
    row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) acc_o[j][2 * r] *= alpha, acc_o[j][2 * r + 1] *= alpha;
  }
}

// acc_o += P V: P (fp32 accumulator fragments) becomes the bf16 A operand directly; cV is the key
// tile's values in shared memory ([BN][S] bf16).
template <int BN, int D, int S>
__device__ __forceinline__ void accumulate_pv(const float (&acc_s)[BN / 8][4], const __nv_bfloat16* cV,
                                              float (&acc_o)[D / 8][4], int lane) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    const uint32_t a[4] = {mma::pack_bf16(acc_s[2 * kk][0], acc_s[2 * kk][1]),
                           mma::pack_bf16(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                           mma::pack_bf16(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                           mma::pack_bf16(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t b[4];
      mma::ldmatrix_x4_trans(b, cV + mma::bkn_offset(lane, kk * 16, dn * 16, S));
      mma::mma_bf16(acc_o[2 * dn], a, b[0], b[1]);
      mma::mma_bf16(acc_o[2 * dn + 1], a, b[2], b[3]);
    }
  }
}

// Epilogue: normalize, write lse (natural log-sum-exp of the logits as scaled into the log2 domain
// by the caller), stage the warp's 16 output rows in sO (16 rows of stride S, read only by this warp)
// and store them to o (rows row_w .., `o_stride` elements apart: a multiple of 8) with 16-byte writes.
template <int D, int S>
__device__ __forceinline__ void store_output_rows(const float (&acc_o)[D / 8][4], const float (&row_max)[2],
                                                  const float (&row_sum)[2], __nv_bfloat16* sO, __nv_bfloat16* o,
                                                  float* lse, int row_w, int T, int lane, long long o_stride = D) {
  const int g = lane >> 2, t = lane & 3;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int row = row_w + g + 8 * r;
    if (t == 0 && row < T) lse[row] = l > 0.f ? row_max[r] * mma::kLn2 + logf(l) : -INFINITY;
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(sO + (g + 8 * r) * S + 8 * j + 2 * t) =
          mma::pack_bf16(acc_o[j][2 * r] * inv[r], acc_o[j][2 * r + 1] * inv[r]);
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, row = row_w + r;
    if (row < T)
      *reinterpret_cast<uint4*>(o + row * o_stride + col) =
          *reinterpret_cast<const uint4*>(sO + r * S + col);
  }
}

// Attention dropout on a warp's 16 x BN weights (rows row_w .., keys n0 ..), in place: kept entries
// scaled by 1 / (1 - p), the others 0, with the mask of every other backend (dropout_keep of
// (seed, bh, i, j)); entries outside the causal triangle are left as they are (0 there).
template <int BN>
__device__ __forceinline__ void apply_dropout(float (&acc)[BN / 8][4], long long bh, int T, int row_w, int n0, float p,
                                              unsigned long long seed, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float keep_scale = 1.0f / (1.0f - p);
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = row_w + g + 8 * (e >> 1), col = n0 + 8 * j + 2 * t + (e & 1);
      if (row < T && col <= row) acc[j][e] *= dropout_keep(seed, bh, T, row, col, p) ? keep_scale : 0.f;
    }
}

// The dropout factor of weight (row, col) in the backward pass: 1 without dropout or outside the causal
// part, else 0 or 1 / (1 - p) by the same mask as apply_dropout.
__device__ __forceinline__ float dropout_factor(long long bh, int T, int row, int col, float p, unsigned long long seed) {
  if (p <= 0.f || row >= T || col > row) return 1.f;
  return dropout_keep(seed, bh, T, row, col, p) ? 1.0f / (1.0f - p) : 0.f;
}

// delta_i = sum_d dO[i,d] * O[i,d] in fp32 (one warp per row). Row i = bh * T + t of [B, H, T] lives at
// b * batch + h * head + t * row_stride (elements) in o and dout: contiguous rows with T = rows, H = 1,
// row_stride = D.
template <int D>
__global__ void flash_bwd_preprocess_kernel(const __nv_bfloat16* __restrict__ o, const __nv_bfloat16* __restrict__ dout,
                                            float* __restrict__ delta, long long rows, int T, int H, long long batch,
                                            long long head, long long row_stride) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together (rows are per warp)
  const long long bh = row / T;
  const long long off = (bh / H) * batch + (bh % H) * head + (row % T) * row_stride;
  const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(o + off);
  const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(dout + off);
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

// o and dout as [B, H, T, D] with the given strides (elements); rows = B * H * T.
template <int D>
void launch_row_dot(const __nv_bfloat16* o, const __nv_bfloat16* dout, float* delta, long long rows, int T, int H,
                    long long batch, long long head, long long row_stride, cudaStream_t s) {
  constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
  const long long blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT_MAX) throw std::invalid_argument("attention backward: B * H * T too large");
  if (blocks == 0) return;
  flash_bwd_preprocess_kernel<D>
      <<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(o, dout, delta, rows, T, H, batch, head, row_stride);
  MTA_CUDA_CHECK_LAUNCH("flash_bwd_preprocess_kernel");
}

// Contiguous rows of D.
template <int D>
void launch_row_dot(const __nv_bfloat16* o, const __nv_bfloat16* dout, float* delta, long long rows, cudaStream_t s) {
  if (rows > INT_MAX) throw std::invalid_argument("attention backward: B * H * T too large");
  launch_row_dot<D>(o, dout, delta, rows, static_cast<int>(std::max<long long>(rows, 1)), 1, 0, 0, D, s);
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
