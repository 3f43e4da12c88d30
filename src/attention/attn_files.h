#pragma once
// The op on named tensors, as `mta attn` exposes it: validates a safetensors input against a spec
// (names, shapes, finiteness) and returns the output tensors (`out`, and with `dout` the gradients
// `grad_q`, `grad_k`, `grad_v`, `grad_<param>`). Computes in float64 when q is F64, else float32 --
// except on the GPU, where F32 input of a spec the fused kernels cover runs them (bf16 inputs, fp32
// accumulation; metadata compute_dtype "BF16", impl "fused") unless `impl` says materialized.
#include <string>
#include <vector>

#include "attention/spec.h"
#include "io/safetensors.h"

namespace mta {

enum class Device { Cpu, Cuda };
Device parse_device(const std::string& name);  // "cpu" | "cuda", InputError otherwise

// The CUDA path: auto = fused where the fused kernels cover the spec and the input is F32, else
// materialized; fused = the fused kernels or an InputError; materialized = the T x T path (F32 or F64).
enum class AttnImpl { Auto, Fused, Materialized };
AttnImpl parse_attn_impl(const std::string& name);  // "auto" | "fused" | "materialized"

// Throws InputError for anything that does not fit the spec. `warnings` receives the names of input
// tensors the spec does not use.
io::SafeTensors run_attention_tensors(const AttentionSpec& spec, const io::SafeTensors& in, Device device,
                                      std::vector<std::string>* warnings = nullptr,
                                      AttnImpl impl = AttnImpl::Auto);

}  // namespace mta
