#pragma once
// One attention layer timed on the GPU (`mta bench attn --device cuda`): bf16 inputs drawn at random
// on the device (never zeros), the layer's parameters at identity plus noise, forward and backward
// each timed with CUDA events (median of `reps` after `warmup`), and the device memory the layer
// used: every buffer it reads or writes, scratch included (the fused kernels allocate nothing else;
// the materialized op's own workspace is added).
#include <nlohmann/json.hpp>
#include <string>

#include "attention/spec.h"

namespace mta::cuda {

// impl: "flash" (standard attention only), "fused" (fused_attention.h; fused_attention_supported) or
// "materialized" (mta_cuda.h in float32, every spec; the same input values).
// forward_only: the backward is not run (bwd_ms and fwd_bwd_ms null). Throws InputError for an impl
// that does not cover the spec.
nlohmann::json bench_attention(const AttentionSpec& spec, int B, int T, const std::string& impl, int reps, int warmup,
                               bool forward_only = false);

}  // namespace mta::cuda
