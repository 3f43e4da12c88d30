#pragma once
// FlashMTA: fused, IO-aware Multi-Token Attention on the GPU (no T x T tensor in device memory).
// Work in progress (issue 5): this first kernel covers the specs whose only option is the
// pre-softmax key-query convolution (`kq_pre`, cq <= 8, ck <= 15, any pad): the paper's toy
// configuration and the kq-only benchmark case. Every other spec goes through the materialized path
// (mta_cuda.h). Design and cost model: docs/flash-mta.md.
//
// Contract (docs/mta-semantics.md steps 1, 2, 4, 7 with bf16 inputs):
//   S = q k^T / sqrt(D);  S0 = S with the future (j > i) set to 0;
//   C[i,j] = sum_{a<cq, c<ck} W[h,a,c] S0[i-(cq-1)+a, j-o+c]   (zero outside the sequence);
//   O = softmax_j(C with the future set to -inf) v;  lse_i = log sum_{j<=i} exp(C[i,j]) (natural log).
// Training: opt.dropout drops entries of the attention weights before they meet v, with the mask every
// backend uses (dropout_keep, attention_op.h); the backward pass regenerates it.
// Precision: q k^T in bf16 with fp32 accumulation; S0 tiles and W are rounded to fp16 for the
// convolution, which runs on the tensor cores (fp32 accumulation); softmax in fp32; P rounded to bf16
// for P v, as in FlashAttention. Layout: q, k, v, o [B, H, T, D] bf16 contiguous; W [H, cq, ck] fp32;
// lse [B, H, T] fp32. Device pointers; work is queued on `s`. Bad arguments throw
// std::invalid_argument before any device work; CUDA failures throw std::runtime_error.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "attention/attention_op.h"
#include "attention/spec.h"

namespace mta::cuda {

// Whether the fused path computes this spec at head dim D (else use the materialized path).
bool flash_mta_supported(const AttentionSpec& spec, int D);

void flash_mta_forward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, const float* kq_pre_w, __nv_bfloat16* o, float* lse, int B, int T,
                       const AttnOptions& opt, cudaStream_t s);

// Gradients given dout, o and lse of flash_mta_forward: dq, dk, dv [B, H, T, D] bf16 (overwritten);
// grad_kq_pre [H, cq, ck] fp32 is ADDED to (fp32 atomics: not bitwise deterministic, nor are dq, dk).
// `scratch`: flash_mta_backward_scratch_bytes(B, H, T, D) bytes, untouched until the queued work ends.
size_t flash_mta_backward_scratch_bytes(int B, int H, int T, int D);
void flash_mta_backward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const float* kq_pre_w, const __nv_bfloat16* o,
                        const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq, __nv_bfloat16* dk,
                        __nv_bfloat16* dv, float* grad_kq_pre, void* scratch, int B, int T, const AttnOptions& opt,
                        cudaStream_t s);

}  // namespace mta::cuda
