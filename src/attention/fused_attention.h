#pragma once
// The fused GPU path of an MTA layer, as one call per pass: the core kernels for the options apart
// from the epilogue -- kq_pre alone (flash_mta.h), head mixing alone (flash_mix.h), or the kq
// convolutions with head mixing (flash_kq_layer.h; the backward at head dim 64 only) -- then the
// epilogue kernels for norm, depth scaling and gate (epilogue_cuda.h). Used by the CUDA model,
// `mta attn --device cuda` and `mta bench attn --device cuda --impl fused`. bf16 q, k, v, o
// [B, H, T, D]; parameters and their gradients fp32 (device pointers, AttnParams / AttnParamGrads);
// parameter gradients are ADDED to. Work is queued on `s`.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention/attention_op.h"
#include "attention/spec.h"

namespace mta::cuda {

// Whether the fused path computes this spec at head dim D, with attention dropout `dropout` (the
// head-mixing kernels have none yet).
bool fused_attention_supported(const AttentionSpec& spec, int D, float dropout = 0.0f);

// Whether the fused forward runs the kq-layer kernels (kq convolutions with head mixing,
// flash_kq_layer.h: up to 16 coupled heads, no dropout) for this spec.
bool fused_attention_is_kq_layer(const AttentionSpec& spec, int D, float dropout = 0.0f);

// Whether the fused forward of this spec holds the scaled logits and the kq_pre weights as fp16
// operands (the kq_pre kernel, flash_mta.h), so that its inputs must pass fused_range.h's check. The
// kq-layer and head-mixing kernels keep logits in fp32.
bool fused_attention_fp16_logits(const AttentionSpec& spec, int D, float dropout = 0.0f);

// The core's output, which the backward pass needs: with an epilogue, `core` ([B, H, T, D] bf16,
// caller-owned) receives it; without one it is `o` itself and `core` may be null.
bool fused_attention_has_epilogue(const AttentionSpec& spec);

// The kq layers with an epilogue keep the core's output in fp32 for the backward instead (`core32`,
// fused_attention_core32_floats(spec, B, T) floats, caller-owned; 0: not needed; `core` is then not
// written and may be null, and the epilogue reads core32). Their post-side gradients sum what the norm
// leaves of the core's gradient, which is nearly orthogonal to the core's output: from bf16 copies they
// measured 6-14% off at near-uniform attention (epilogue_cuda.h). Without core32 (a forward alone) the
// kq layers use `core` like the other cores.
size_t fused_attention_core32_floats(const AttentionSpec& spec, int B, int T);

void fused_attention_forward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const AttnParams<float>& p, __nv_bfloat16* core,
                             __nv_bfloat16* o, float* lse, int B, int T, const AttnOptions& opt, cudaStream_t s,
                             float* core32 = nullptr);

// `core_out`: the core's output of the forward pass (`core` with an epilogue, else `o`; not read by a kq
// layer with an epilogue, which reads core32); `scratch`:
// fused_attention_backward_scratch_bytes(spec, B, T) bytes.
size_t fused_attention_backward_scratch_bytes(const AttentionSpec& spec, int B, int T);
void fused_attention_backward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                              const __nv_bfloat16* v, const AttnParams<float>& p, const __nv_bfloat16* core_out,
                              const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq, __nv_bfloat16* dk,
                              __nv_bfloat16* dv, const AttnParamGrads<float>& g, void* scratch, int B, int T,
                              const AttnOptions& opt, cudaStream_t s, const float* core32 = nullptr);

}  // namespace mta::cuda
