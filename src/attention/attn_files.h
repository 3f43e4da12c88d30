#pragma once
// The op on named tensors, as `mta attn` exposes it: validates a safetensors input against a spec
// (names, shapes, finiteness) and returns the output tensors (`out`, and with `dout` the gradients
// `grad_q`, `grad_k`, `grad_v`, `grad_<param>`). Computes in float64 when q is F64, else float32.
#include <string>
#include <vector>

#include "attention/spec.h"
#include "io/safetensors.h"

namespace mta {

enum class Device { Cpu, Cuda };
Device parse_device(const std::string& name);  // "cpu" | "cuda", InputError otherwise

// Throws InputError for anything that does not fit the spec. `warnings` receives the names of input
// tensors the spec does not use.
io::SafeTensors run_attention_tensors(const AttentionSpec& spec, const io::SafeTensors& in, Device device,
                                      std::vector<std::string>* warnings = nullptr);

}  // namespace mta
