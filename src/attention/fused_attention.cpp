// See fused_attention.h.
#include "attention/fused_attention.h"

#include <stdexcept>

#include "attention/epilogue_cuda.h"
#include "attention/flash_kq_layer.h"
#include "attention/flash_mix.h"
#include "attention/flash_mta.h"

namespace mta::cuda {
namespace {

size_t up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Which core kernels compute spec's options apart from the epilogue, both passes. KqLayer: the kq
// convolutions with head mixing (flash_kq_layer.h).
enum class Core { None, KqPre, Mix, KqLayer };
Core core_of(const AttentionSpec& spec, int D, float dropout) {
  const AttentionSpec core = attn_core_spec(spec);
  if (flash_mta_supported(core, D)) return Core::KqPre;
  if (flash_mix_supported(core, D) && dropout <= 0.0f) return Core::Mix;
  if (flash_kq_layer_backward_supported(core, D) && dropout <= 0.0f) return Core::KqLayer;
  return Core::None;
}

size_t core_backward_scratch_bytes(Core which, const AttentionSpec& cs, int B, int T) {
  const int H = cs.heads, D = cs.head_dim;
  if (which == Core::KqPre) return flash_mta_backward_scratch_bytes(B, H, T, D);
  if (which == Core::Mix) return flash_mix_backward_scratch_bytes(B, H, T, D);
  return flash_kq_layer_backward_workspace_floats(cs, B, T) * sizeof(float);
}

}  // namespace

bool fused_attention_supported(const AttentionSpec& spec, int D, float dropout) {
  return core_of(spec, D, dropout) != Core::None;
}

bool fused_attention_is_kq_layer(const AttentionSpec& spec, int D, float dropout) {
  return core_of(spec, D, dropout) == Core::KqLayer;
}

bool fused_attention_fp16_logits(const AttentionSpec& spec, int D, float dropout) {
  return core_of(spec, D, dropout) == Core::KqPre;
}

bool fused_attention_has_epilogue(const AttentionSpec& spec) { return attn_epilogue_enabled(spec); }

size_t fused_attention_core32_floats(const AttentionSpec& spec, int B, int T) {
  const int D = spec.head_dim;
  if (!attn_epilogue_enabled(spec) || core_of(spec, D, 0.0f) != Core::KqLayer) return 0;
  return static_cast<size_t>(B) * spec.heads * T * D;
}

void fused_attention_forward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const AttnParams<float>& p, __nv_bfloat16* core,
                             __nv_bfloat16* o, float* lse, int B, int T, const AttnOptions& opt, cudaStream_t s,
                             float* core32) {
  const int D = spec.head_dim;
  const Core which = core_of(spec, D, opt.dropout);
  if (which == Core::None) throw std::invalid_argument("fused_attention_forward: spec not covered");
  const AttentionSpec cs = attn_core_spec(spec);
  const bool epi = attn_epilogue_enabled(spec);
  const long long rows = static_cast<long long>(B) * spec.heads * T;
  if (which == Core::KqLayer && epi && core32) {  // the core's output in fp32 only, the epilogue from it
    flash_kq_layer_forward(cs, q, k, v, p.kq_pre, p.head_pre, p.kq_post, p.head_post, nullptr, lse, B, T, s, core32);
    attn_epilogue_forward(spec, static_cast<const float*>(core32), p.norm, p.gate_w, p.gate_b, o, rows, D, s);
    return;
  }
  if (epi && !core) throw std::invalid_argument("fused_attention_forward: the epilogue needs the core buffer");
  __nv_bfloat16* out = epi ? core : o;
  if (which == Core::KqPre)
    flash_mta_forward(cs, q, k, v, p.kq_pre, out, lse, B, T, opt, s);
  else if (which == Core::Mix)
    flash_mix_forward(cs, q, k, v, p.head_pre, p.head_post, out, lse, B, T, s);
  else
    flash_kq_layer_forward(cs, q, k, v, p.kq_pre, p.head_pre, p.kq_post, p.head_post, out, lse, B, T, s);
  if (epi) attn_epilogue_forward(spec, static_cast<const __nv_bfloat16*>(core), p.norm, p.gate_w, p.gate_b, o, rows, D, s);
}

size_t fused_attention_backward_scratch_bytes(const AttentionSpec& spec, int B, int T) {
  const int H = spec.heads, D = spec.head_dim;
  const long long rows = static_cast<long long>(B) * H * T;
  const Core which = core_of(spec, D, 0.0f);
  if (which == Core::None) throw std::invalid_argument("fused_attention_backward_scratch_bytes: spec not covered");
  const size_t core = core_backward_scratch_bytes(which, attn_core_spec(spec), B, T);
  if (!attn_epilogue_enabled(spec)) return core;
  // dcore, and for the kq layers its bf16 remainder
  const size_t dcore = up(static_cast<size_t>(rows) * D * 2) * (which == Core::KqLayer ? 2 : 1);
  return up(core) + up(attn_epilogue_backward_scratch_bytes(rows, D)) + dcore;
}

void fused_attention_backward(const AttentionSpec& spec, const __nv_bfloat16* q, const __nv_bfloat16* k,
                              const __nv_bfloat16* v, const AttnParams<float>& p, const __nv_bfloat16* core_out,
                              const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq, __nv_bfloat16* dk,
                              __nv_bfloat16* dv, const AttnParamGrads<float>& g, void* scratch, int B, int T,
                              const AttnOptions& opt, cudaStream_t s, const float* core32) {
  const int H = spec.heads, D = spec.head_dim;
  const Core which = core_of(spec, D, opt.dropout);
  if (which == Core::None) throw std::invalid_argument("fused_attention_backward: spec not covered");
  const AttentionSpec cs = attn_core_spec(spec);
  const long long rows = static_cast<long long>(B) * H * T;
  char* base = static_cast<char*>(scratch);
  const size_t core_bytes = core_backward_scratch_bytes(which, cs, B, T);
  const __nv_bfloat16* dcore = dout;
  const __nv_bfloat16* dcore_lo = nullptr;
  if (attn_epilogue_enabled(spec)) {
    void* epi_scratch = base + up(core_bytes);
    auto* d = reinterpret_cast<__nv_bfloat16*>(base + up(core_bytes) + up(attn_epilogue_backward_scratch_bytes(rows, D)));
    if (which == Core::KqLayer) {
      if (!core32) throw std::invalid_argument("fused_attention_backward: a kq layer with an epilogue needs core32");
      auto* d_lo = d + up(static_cast<size_t>(rows) * D * 2) / 2;
      attn_epilogue_backward_split(spec, core32, dout, p.norm, p.gate_w, p.gate_b, d, d_lo, g.norm, g.gate_w,
                                   g.gate_b, epi_scratch, rows, D, s);
      dcore_lo = d_lo;
    } else {
      attn_epilogue_backward(spec, core_out, dout, p.norm, p.gate_w, p.gate_b, d, g.norm, g.gate_w, g.gate_b,
                             epi_scratch, rows, D, s);
    }
    dcore = d;
  }
  if (which == Core::KqPre)
    flash_mta_backward(cs, q, k, v, p.kq_pre, core_out, dcore, lse, dq, dk, dv, g.kq_pre, base, B, T, opt, s);
  else if (which == Core::Mix)
    flash_mix_backward(cs, q, k, v, p.head_pre, p.head_post, dcore, lse, dq, dk, dv, g.head_pre, g.head_post, base, B,
                       T, s);
  else
    flash_kq_layer_backward(cs, q, k, v, dcore, p.kq_pre, p.head_pre, p.kq_post, p.head_post, lse, dq, dk, dv, g.kq_pre,
                            g.head_pre, g.kq_post, g.head_post, reinterpret_cast<float*>(base), B, T, s, dcore_lo);
}

}  // namespace mta::cuda
