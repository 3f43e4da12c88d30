#pragma once
// Initial values of the attention op's parameters (the paper's identity initialisation).
#include "attention/spec.h"

namespace mta {

// Kernels: Wpre[h, cq-1, o] = 1, 0 elsewhere (same for Wpost); head mixing: identity; norm: 1;
// gate_w = 0, gate_b = 0 (a gate of 0.5 at start, learned from there).
// With identity kernels the layer equals standard attention (then the norm and gate, if enabled).
void init_attention_param_identity(const AttentionSpec& spec, const AttentionParamInfo& info, float* dst);
void init_attention_param_identity(const AttentionSpec& spec, const AttentionParamInfo& info, double* dst);

}  // namespace mta
