#pragma once
// Fused causal softmax attention for the GPU (FlashAttention-2 algorithm), forward and backward.
//
// bf16 inputs and outputs, fp32 accumulation and fp32 softmax; tensor cores through mma.sync
// (m16n8k16 bf16). Written for sm_90 (H200) but uses only sm_80 instructions. No T x T tensor is ever
// stored in device memory: scores are recomputed tile by tile in registers.
//
// Conventions
//   * Layout: q, k, v, o, dout, dq, dk, dv are contiguous [B, H, T, D] bf16; lse is [B, H, T] fp32.
//   * Attention: o_i = sum_{j <= i} softmax_j(scale * q_i . k_j) v_j with scale = 1/sqrt(D) (causal:
//     query i sees keys 0..i).
//   * lse_i = log(sum_{j <= i} exp(scale * q_i . k_j)): the NATURAL log-sum-exp of row i of the SCALED
//     logits, so softmax weights are p_ij = exp(scale * q_i . k_j - lse_i). The backward pass expects
//     exactly the lse written by flash_attn_forward for the same q, k.
//   * D must be 64 or 128; B, H, T >= 1 (any T, not only multiples of the tile sizes).
//   * All pointers are DEVICE pointers; work is queued on stream `s` (the calls do not synchronize).
//     CUDA failures (also launch errors, checked with cudaGetLastError after every launch) throw
//     std::runtime_error("file:line: ..."); invalid arguments throw std::invalid_argument before any
//     device work.
//   * Attention dropout (training): with dropout = p > 0 the weights that meet v are dropped by the
//     mask every backend uses (mta::dropout_keep of (dropout_seed, b * H + h, i, j)), kept ones scaled
//     by 1 / (1 - p); lse stays that of the undropped weights. The backward pass regenerates the mask
//     from the same seed.
//   * Determinism: the forward pass is deterministic (the same inputs give bitwise-identical o, lse).
//     The backward pass accumulates dq with fp32 atomicAdd across key tiles, so dq may differ in the
//     last bits from run to run; dk and dv are deterministic.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace mta::cuda {

// Causal softmax attention, scale 1/sqrt(D): q, k, v, o [B, H, T, D] bf16 (contiguous), lse [B, H, T]
// fp32 (log-sum-exp of each row's scaled logits, saved for backward). D in {64, 128}.
void flash_attn_forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o,
                        float* lse, int B, int H, int T, int D, cudaStream_t s, float dropout = 0.0f,
                        unsigned long long dropout_seed = 0);

// Gradients given dout: dq, dk, dv [B, H, T, D] bf16 (overwritten). `scratch` holds at least
// flash_attn_backward_scratch_bytes(B, H, T, D) bytes: an fp32 dq accumulator [B, H, T, D] followed by
// delta_i = dot(dO_i, O_i) [B, H, T] fp32. The scratch must stay untouched until the work queued on `s`
// has finished; it needs no initialization.
size_t flash_attn_backward_scratch_bytes(int B, int H, int T, int D);
void flash_attn_backward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                         const __nv_bfloat16* o, const __nv_bfloat16* dout, const float* lse,
                         __nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv, void* scratch,
                         int B, int H, int T, int D, cudaStream_t s, float dropout = 0.0f,
                         unsigned long long dropout_seed = 0);

}  // namespace mta::cuda
