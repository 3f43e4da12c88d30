#pragma once
// The attention op's tensors and parameters, shared by every backend.
//
// Layout: q, k, v, out, dout and their gradients are contiguous [B, H, T, D] (row-major).
// Parameters follow the semantics page: kq_pre/kq_post [H, cq, ck], head_pre/head_post [H/g, g, g],
// norm [D], gate_w [D], gate_b [1]. A pointer is only read when the spec enables its option.
#include "attention/spec.h"

// The dropout hash below is also called from CUDA kernels (attention/mta_cuda.cu): the same code on
// both sides, so the GPU's masks equal the CPU's bit for bit.
#ifdef __CUDACC__
#define MTA_HOST_DEVICE __host__ __device__
#else
#define MTA_HOST_DEVICE
#endif

namespace mta {

struct AttnDims {
  int B = 1, H = 1, T = 1, D = 1;
  int Dv = 0;  // value (and output) head dim when it differs from D (DIFF attention); 0 means D
  int dv() const { return Dv ? Dv : D; }
  long long numel() const { return 1LL * B * H * T * D; }       // of q and k
  long long numel_v() const { return 1LL * B * H * T * dv(); }  // of v and out
};

// Training-time options that are not part of the layer's function (the AttentionSpec).
struct AttnOptions {
  // Dropout on the final attention weights A3 (before A3 @ V), as the model applies it. The mask is a
  // pure function of (seed, batch*heads, i, j), so backward (and the GPU path) regenerate it exactly.
  float dropout = 0.0f;
  unsigned long long dropout_seed = 0;
  // The GPU's materialized op in float32 only (mta_cuda.h), for callers whose q and k hold bf16 values
  // (the model): the products whose bf16 operands are exact (S = Q K^T) or rounded as FlashAttention
  // rounds them (dS for dQ, dK) run on tensor cores with fp32 accumulation. W V, dV and dA3 stay
  // float32: rounding W or an epilogue's dO there cost the head-mixing gradients their precision where
  // they are small differences. The CPU and the fused kernels ignore it.
  bool bf16_products = false;
  // The GPU's fused kq_pre kernel only (flash_mta.h): when not null, a device word that its forward pass
  // sets to 1 (atomicOr) if a scaled logit or a kq_pre weight lies beyond fp16's range (|x| > 65504),
  // where that kernel's output is no longer MTA's (infinities in its fp16 operands). The caller zeroes
  // it and reads it back; the model turns it into a clear error instead of a bare NaN loss.
  unsigned int* fp16_overflow = nullptr;
};

// A uniform number in [0, 1) that is a pure function of (seed, counter): splitmix64. Dropout masks
// come from it, so they are regenerated (not stored) for backward and are the same on every backend.
MTA_HOST_DEVICE inline double hash_uniform(unsigned long long seed, unsigned long long counter) {
  unsigned long long x = seed + (counter + 1) * 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return static_cast<double>(x >> 11) * (1.0 / 9007199254740992.0);
}

// Keep decision of attention dropout for entry (bh, i, j) of the T x T weights.
MTA_HOST_DEVICE inline bool dropout_keep(unsigned long long seed, long long bh, int T, int i, int j, float p) {
  return hash_uniform(seed, (static_cast<unsigned long long>(bh) * T + i) * T + j) >= p;
}

template <typename T>
struct AttnParams {
  const T* kq_pre = nullptr;
  const T* head_pre = nullptr;
  const T* kq_post = nullptr;
  const T* head_post = nullptr;
  const T* norm = nullptr;
  const T* gate_w = nullptr;
  const T* gate_b = nullptr;
};

// Parameter gradients. Backends ADD into these (so a model can accumulate over micro-batches);
// a null pointer for an enabled option is an error.
template <typename T>
struct AttnParamGrads {
  T* kq_pre = nullptr;
  T* head_pre = nullptr;
  T* kq_post = nullptr;
  T* head_post = nullptr;
  T* norm = nullptr;
  T* gate_w = nullptr;
  T* gate_b = nullptr;
};

// AttnParams<T> or AttnParamGrads<T> with each pointer taken from lookup(name), name as in
// attention_params() ("kq_pre", ..., "gate_b"); lookup returns nullptr for a disabled option.
template <typename Pointers, typename Lookup>
Pointers attn_pointers(Lookup&& lookup) {
  Pointers p;
  p.kq_pre = lookup("kq_pre");
  p.head_pre = lookup("head_pre");
  p.kq_post = lookup("kq_post");
  p.head_post = lookup("head_post");
  p.norm = lookup("norm");
  p.gate_w = lookup("gate_w");
  p.gate_b = lookup("gate_b");
  return p;
}

constexpr double kGroupNormEps = 1e-5;

// The checks every backend makes before any work: a valid spec, and tensors whose heads and head
// dim match it (InputError otherwise).
void check_attention_args(const AttentionSpec& spec, const AttnDims& dims);

}  // namespace mta
