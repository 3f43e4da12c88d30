#pragma once
// The fused kq layer (the paper LM's layers that combine the key-query convolutions with head mixing),
// built pass by pass in the order of docs/flash-mta.md ("What comes next", item 1); the window
// arithmetic is replayed on the CPU by tests/oracle/replay_kq_layer*.py. The forward (pass 1, the row
// statistics of the mixed, convolved logits; pass 2, the output) and the backward (kernel P for the
// post side and delta, kernel Q for the pre side), at head dim 64 and 128.
// Coupled heads G = spec.coupled_heads() <= 16, one warp per head: a group runs in one CTA where it
// fits (pass 1: 16 heads at D = 64, 8 at D = 128; pass 2: 8; the backward: 8 at D = 64, 4 at D = 128,
// which keeps the Q and dO rows in shared memory), else on a cluster of the fewest CTAs that hold it
// (group_cluster.cuh): 16 heads take 2 CTAs at D = 64, 4 in the backward at D = 128; where they do not
// split the group evenly (e.g. 11 or 13 heads) the last CTA's last warps are padding that writes nothing.
//
// Pass 1 (docs/mta-semantics.md steps 1-4, up to the softmax's normalizer, with bf16 q, k):
//   S = q k^T / sqrt(D);  S0 = S with the future (j > i) set to 0;
//   C_y[i, j] = sum_{a<cq, c<ck} Wpre[y, a, c] S0_y[i-(cq-1)+a, j-o+c]   (zero outside the sequence);
//   C'_x = sum_y Mpre[x, y] C_y over x's head_pre group (C' = C without head_pre);
//   lse_x[i] = log sum_{j<=i} exp(C'_x[i, j])   (natural log).
// Precision: q k^T with fp32 accumulation (bf16 operands, exact products), the convolution in fp32 on
// CUDA cores (no fp16 operand, unlike flash_mta.h), the mixing as two bf16 terms per value (hi + lo) on
// tensor cores with fp32 accumulation (FlashMix's head_mix_mma.cuh), the softmax statistics in fp32.
// Layout: q, k [B, H, T, D] bf16 contiguous; Wpre [H, cq, ck] fp32 (nullptr without kq_pre); Mpre [H / g, g, g] fp32 (nullptr
// without head_pre); lse [B, H, T] fp32. Device pointers; work is queued on `s`. Bad arguments throw
// std::invalid_argument before any device work.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention/spec.h"

namespace mta::cuda {

// Whether pass 1 computes this spec at head dim D: kq_pre or kq_post (each cq <= 8, ck <= 15, any pad)
// with or without head_pre, whatever the later steps (they do not change lse), and coupled heads G <= 16.
// Without kq_pre the kernels run the identity 1 x 1 convolution in its place (weights pointer null),
// exact in fp32: the layers with kq_post but no kq_pre.
bool flash_kq_layer_lse_supported(const AttentionSpec& spec, int D);

void flash_kq_layer_lse(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const float* kq_pre, const float* head_pre, float* lse, int B, int T, cudaStream_t s);

// The forward pass, pass 1 then pass 2 (steps 1-7): A = softmax(C' with the future at -inf) through
// lse; A2 = kq_post's convolution of A (identity without kq_post), the future set to 0;
// A3 = the head_post mix of A2 (A2 without head_post); o = A3 v, A3 rounded to bf16 for the product.
// o is the core's output (before norm, depth scaling and gate: epilogue_cuda.h); lse is pass 1's;
// o32 (optional, [B, H, T, D] fp32): o unrounded, for an epilogue's backward; with o32, o may be null
// (the fp32 rows alone).
// Supported: flash_kq_layer_lse_supported, kq_post (if any) with cq <= 8, ck <= 15, and at most 8
// coupled heads per CTA (pass 2 keeps two windows per head in shared memory): larger groups (up to 16)
// run on a cluster of CTAs that exchange the mixing inputs through distributed shared memory.
// No attention dropout.
bool flash_kq_layer_forward_supported(const AttentionSpec& spec, int D);
void flash_kq_layer_forward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                            const __nv_bfloat16* v, const float* kq_pre, const float* head_pre, const float* kq_post,
                            const float* head_post, __nv_bfloat16* o, float* lse, int B, int T, cudaStream_t s,
                            float* o32 = nullptr);

// The main backward pass's post side, kernel P (tests/oracle/replay_kq_layer_backward.py, kernel_p):
// adds into dv_acc [B, H, T, D] fp32 (the caller zeroes it and converts it) the value gradient
// A3^T dout, and into grad_kq_post [H, cq, ck] and grad_head_post [H / g, g, g] the post-side
// parameter gradients (per-CTA partials in `workspace`, flash_kq_layer_post_grads_workspace_floats
// floats, reduced over the CTAs in a fixed order). lse is pass 1's. It also writes delta [B, H, T] fp32,
// the row term that kernel Q subtracts (dC' = A (dA - delta)): delta_x[i] = sum_j A_x[i, j] dA_x[i, j] with
// dA3 = dout v^T, dA2 = the head_post^T mix of dA3 with the future set to 0, dA = the transposed kq_post
// convolution of dA2 (identity without kq_post), from its kq_post weight-gradient terms (session 13;
// before, a pass of its own; tests/oracle/replay_kq_layer_backward.py).
// What the forward supports. dout_lo (optional): dout's bf16 remainder (dout + dout_lo = an fp32
// gradient, as an epilogue's backward gives it: epilogue_cuda.h), used by dA3 = dout V^T, whose
// post-side gradients are sums of what the norm leaves of dout (delta then includes it too).
bool flash_kq_layer_post_grads_supported(const AttentionSpec& spec, int D);
size_t flash_kq_layer_post_grads_workspace_floats(const AttentionSpec& spec, int B, int T);
void flash_kq_layer_post_grads(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                               const __nv_bfloat16* v, const __nv_bfloat16* dout, const float* kq_pre,
                               const float* head_pre, const float* kq_post, const float* head_post, const float* lse,
                               float* dv_acc, float* grad_kq_post, float* grad_head_post, float* delta,
                               float* workspace, int B, int T, cudaStream_t s, const __nv_bfloat16* dout_lo = nullptr);

// The main backward pass's pre side, kernel Q (replay_kq_layer_backward.py, kernel_q_own_rows): writes dq
// [B, H, T, D] bf16 (zeroing it first on `s`: two query tiles add into the rows they share), adds dS0^T q
// into dk_acc [B, H, T, D] fp32 (zeroed by the caller) and the pre-side parameter gradients into
// grad_kq_pre, grad_head_pre (per-CTA partials in `workspace`, the same size as kernel P's, which leaves
// room for kernel Q's V maximum; not used by both at once). delta from kernel P, lse from pass 1. dout_lo
// (optional) as for kernel P: dA3 = (dout + dout_lo) v^T with fp16 operands (the sum rounded to 11
// significant bits, each dO row and V tile scaled by a power of two), so that dA agrees with the dA
// behind kernel P's delta.
bool flash_kq_layer_backward_supported(const AttentionSpec& spec, int D);
void flash_kq_layer_pre_grads(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                              const __nv_bfloat16* v, const __nv_bfloat16* dout, const float* kq_pre,
                              const float* head_pre, const float* kq_post, const float* head_post, const float* lse,
                              const float* delta, __nv_bfloat16* dq, float* dk_acc, float* grad_kq_pre,
                              float* grad_head_pre, float* workspace, int B, int T, cudaStream_t s,
                              const __nv_bfloat16* dout_lo = nullptr);

// The whole backward of the layer core (steps 1-7) from dout (the core's output gradient) and pass 1's
// lse: kernel P (with delta), kernel Q, then dk and dv from their fp32 accumulators. dq, dk, dv are
// written (bf16); the parameter gradients (those of enabled options: non-null) are added to; dout_lo as
// for kernels P and Q.
// `workspace`: flash_kq_layer_backward_workspace_floats floats (delta, one fp32 accumulator of q's size
// for dv, then dk, the partials). Supported: flash_kq_layer_backward_supported (what the forward
// supports).
size_t flash_kq_layer_backward_workspace_floats(const AttentionSpec& spec, int B, int T);
void flash_kq_layer_backward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const __nv_bfloat16* dout, const float* kq_pre,
                             const float* head_pre, const float* kq_post, const float* head_post, const float* lse,
                             __nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv, float* grad_kq_pre,
                             float* grad_head_pre, float* grad_kq_post, float* grad_head_post, float* workspace, int B,
                             int T, cudaStream_t s, const __nv_bfloat16* dout_lo = nullptr);

}  // namespace mta::cuda
