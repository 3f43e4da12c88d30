#pragma once
// The epilogue of an attention layer (docs/mta-semantics.md steps 8-10: group norm, depth scaling,
// gate) on the output of a fused attention core (flash_mta.h, flash_mix.h), on the GPU: rows of D
// values, bf16 in and out, fp32 arithmetic (the materialized op's epilogue kernels, epilogue.cuh).
// The backward pass ADDS the parameter gradients, summed in a fixed order (deterministic). Device
// pointers; work is queued on `s`.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention/spec.h"

namespace mta::cuda {

// Whether the spec has an epilogue (norm, depth scaling or gate).
bool attn_epilogue_enabled(const AttentionSpec& spec);
// The spec without its epilogue: what a fused core computes before attn_epilogue_forward.
AttentionSpec attn_core_spec(const AttentionSpec& spec);

// out = epilogue(core), rows x D ([B, H, T, D] flattened); norm, gate_w [D], gate_b [1] fp32 (nullptr
// when off). core and out may be the same buffer.
void attn_epilogue_forward(const AttentionSpec& spec, const __nv_bfloat16* core, const float* norm, const float* gate_w,
                           const float* gate_b, __nv_bfloat16* out, long long rows, int D, cudaStream_t s);

// The same from the core's output in fp32 (flash_kq_layer_forward's o32), which the kq layers keep for
// the backward (below) and so need not keep in bf16 as well.
void attn_epilogue_forward(const AttentionSpec& spec, const float* core32, const float* norm, const float* gate_w,
                           const float* gate_b, __nv_bfloat16* out, long long rows, int D, cudaStream_t s);

// dcore = d epilogue / d core applied to dout; grad_norm, grad_gate_w, grad_gate_b are added to.
// `scratch`: attn_epilogue_backward_scratch_bytes(rows, D) bytes (per-block partial sums: a few hundred
// KB whatever the rows; no per-row buffer). D <= 256.
size_t attn_epilogue_backward_scratch_bytes(long long rows, int D);
void attn_epilogue_backward(const AttentionSpec& spec, const __nv_bfloat16* core, const __nv_bfloat16* dout,
                            const float* norm, const float* gate_w, const float* gate_b, __nv_bfloat16* dcore,
                            float* grad_norm, float* grad_gate_w, float* grad_gate_b, void* scratch, long long rows,
                            int D, cudaStream_t s);

// The same from the core's output in fp32 (flash_kq_layer_forward's o32), with dcore written as two bf16
// parts (dcore + dcore_lo = the fp32 gradient to ~16 bits of mantissa). The norm leaves dcore nearly
// orthogonal to the core's output, and the kq layers' post-mixing and kq_post gradients sum what is
// left: from bf16 core and dcore they measured 6% and 14% off the CPU's at near-uniform attention
// (ModelCuda.MtaFusedMixAndEpilogueMatchCpu, session 8).
void attn_epilogue_backward_split(const AttentionSpec& spec, const float* core32, const __nv_bfloat16* dout,
                                  const float* norm, const float* gate_w, const float* gate_b,
                                  __nv_bfloat16* dcore, __nv_bfloat16* dcore_lo, float* grad_norm,
                                  float* grad_gate_w, float* grad_gate_b, void* scratch, long long rows, int D,
                                  cudaStream_t s);

}  // namespace mta::cuda
