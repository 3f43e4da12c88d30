#pragma once
// The attention op's tensors and parameters, shared by every backend.
//
// Layout: q, k, v, out, dout and their gradients are contiguous [B, H, T, D] (row-major).
// Parameters follow the semantics page: kq_pre/kq_post [H, cq, ck], head_pre/head_post [H/g, g, g],
// norm [D], gate_w [D], gate_b [1]. A pointer is only read when the spec enables its option.
#include "attention/spec.h"

namespace mta {

struct AttnDims {
  int B = 1, H = 1, T = 1, D = 1;
  long long numel() const { return 1LL * B * H * T * D; }
};

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

constexpr double kGroupNormEps = 1e-5;

}  // namespace mta
