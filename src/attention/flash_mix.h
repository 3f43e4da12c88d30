#pragma once
// FlashMix: fused, IO-aware head mixing on the GPU (no T x T tensor in device memory). Work in
// progress (issue 5): the specs whose options are head mixing before and / or after the softmax
// (head_pre, head_post), nothing else; not yet used by the model or `mta attn` (they take the
// materialized path, mta_cuda.h). Design: docs/flash-mta.md ("one warp per head").
//
// Contract (docs/mta-semantics.md steps 1, 3, 4, 6, 7 with bf16 inputs):
//   S_y = q_y k_y^T / sqrt(D) with the future (j > i) set to 0;
//   C'_x = sum_y Mpre[x, y] S_y over x's head_pre group (C' = S without head_pre);
//   A_x = softmax_j(C'_x with the future set to -inf);  lse_x[i] = log sum_{j<=i} exp(C'_x[i, j]);
//   A3_x = sum_y Mpost[x, y] A_y over x's head_post group (A3 = A without head_post);  O_x = A3_x v_x.
// Precision: q k^T, the mixing and the softmax in fp32 (bf16 operands, fp32 accumulation); A3 rounded
// to bf16 for A3 v, as FlashAttention rounds P. Layout: q, k, v, o [B, H, T, D] bf16 contiguous;
// Mpre, Mpost [H / g, g, g] fp32 (nullptr when the option is off); lse [B, H, T] fp32. Device
// pointers; work is queued on `s`. Bad arguments throw std::invalid_argument before any device work.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention/spec.h"

namespace mta::cuda {

// Whether the fused forward computes this spec at head dim D: head_pre and / or head_post only, with
// coupled heads G = spec.coupled_heads() <= 16 at D = 64 (one warp per head of a group in one CTA) and,
// at D = 128, <= 8 in one CTA, else a cluster of 2 CTAs with half the heads each (one CTA's registers
// and shared memory do not hold more than 8 heads there; group_cluster.cuh; an odd group leaves one
// padding warp in the second CTA).
bool flash_mix_supported(const AttentionSpec& spec, int D);

void flash_mix_forward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, const float* head_pre, const float* head_post, __nv_bfloat16* o,
                       float* lse, int B, int T, cudaStream_t s);

// The backward pass covers the same specs as the forward pass.
bool flash_mix_backward_supported(const AttentionSpec& spec, int D);

// Gradients given dout and the lse of flash_mix_forward: dq, dk, dv [B, H, T, D] bf16 (overwritten);
// grad_head_pre / grad_head_post [H / g, g, g] fp32 are ADDED to (deterministic: fixed-order sums;
// dq is accumulated with fp32 atomics, so it is not bitwise reproducible). `scratch`:
// flash_mix_backward_scratch_bytes(B, H, T, D) bytes, untouched until the queued work ends.
size_t flash_mix_backward_scratch_bytes(int B, int H, int T, int D);
void flash_mix_backward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const float* head_pre, const float* head_post,
                        const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq, __nv_bfloat16* dk,
                        __nv_bfloat16* dv, float* grad_head_pre, float* grad_head_post, void* scratch, int B, int T,
                        cudaStream_t s);

}  // namespace mta::cuda
