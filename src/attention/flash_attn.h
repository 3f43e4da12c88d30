#pragma once
// Fused causal softmax attention for the GPU (FlashAttention-2 algorithm), forward and backward.
//
// bf16 inputs and outputs, fp32 accumulation and fp32 softmax; tensor cores through mma.sync
// (m16n8k16 bf16). Written for sm_90 (H200) but uses only sm_80 instructions. No T x T tensor is ever
// stored in device memory: scores are recomputed tile by tile in registers.
//
// Conventions
//   * Layout: q, k, v, o, dout, dq, dk, dv are contiguous [B, H, T, D] bf16 (or strided: HeadLayout
//     below); lse is [B, H, T] fp32.
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

// Where the [T, D] matrix of each (batch, head) of an operand lives: element (b, h, t, c) at
// b * batch + h * head + t * row + c (elements). Every stride must be a non-negative multiple of 8
// (16-byte rows for the tile copies). contiguous_heads is [B, H, T, D]; token_major is the layout of a
// linear layer's output, rows of `width` elements (>= H * D) per token with head h at columns
// h * D .. h * D + D - 1, so q, k and v can be read from, and dq, dk, dv written into, one [B * T, 3C]
// matrix (width 3C, each operand at its offset), and o, dout used as [B * T, C] rows (width C).
struct HeadLayout {
  long long batch = 0, head = 0, row = 0;
};
HeadLayout contiguous_heads(int H, int T, int D);
HeadLayout token_major(int T, int D, long long width);

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

// The same with q, k, v (and dq, dk, dv) laid out as `in` and o (and dout) as `out` (lse and the scratch
// stay contiguous). With `grad_rope_cs` (null: none), dq and dk are also rotated back by RoPE, i.e. they
// are the gradients with respect to q and k BEFORE the rotation that made the given q, k: pair i of
// position t is multiplied by the transpose of the rotation (cos, sin) read from
// grad_rope_cs[2 * (t * D/2 + i)] and [... + 1] (cuda::RopeTable's layout, >= T positions of this D;
// 16-byte aligned). This is how the model's layers skip the copies to and from the head layout.
void flash_attn_forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o,
                        float* lse, int B, int H, int T, int D, const HeadLayout& in, const HeadLayout& out,
                        cudaStream_t s, float dropout = 0.0f, unsigned long long dropout_seed = 0);
void flash_attn_backward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                         const __nv_bfloat16* o, const __nv_bfloat16* dout, const float* lse,
                         __nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv, void* scratch,
                         int B, int H, int T, int D, const HeadLayout& in, const HeadLayout& out,
                         const float* grad_rope_cs, cudaStream_t s, float dropout = 0.0f,
                         unsigned long long dropout_seed = 0);

}  // namespace mta::cuda
