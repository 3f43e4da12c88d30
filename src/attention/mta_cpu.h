#pragma once
// CPU reference of Multi-Token Attention: the source of truth every other path is checked against.
//
// Computes exactly docs/mta-semantics.md, forward and backward, for every AttentionSpec. fp32 (or
// fp64, used by the finite-difference tests) throughout, softmax included. Work is split into
// independent units of (batch, block of heads coupled by head mixing); each unit holds its T x T
// score matrices only while it runs (O(coupled_heads * T^2) memory per unit in flight, never for the
// whole batch). Units run in parallel over OpenMP threads; when there are fewer units than threads,
// the heads and rows inside a unit are spread over the threads instead.
#include "attention/attention_op.h"

namespace mta::cpu {

// q, k [B,H,T,D]; v and out [B,H,T,Dv] (Dv = D unless dims.Dv is set).
template <typename T>
void mta_forward(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const T* v,
                 const AttnParams<T>& params, T* out, const AttnOptions& opt = {});

// Gradients of sum(out * dout): dq, dk, dv are overwritten; parameter gradients are added into grads.
// Recomputes the forward pass per unit (no activations are kept between forward and backward).
template <typename T>
void mta_backward(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const T* v,
                  const AttnParams<T>& params, const T* dout, T* dq, T* dk, T* dv, const AttnParamGrads<T>& grads,
                  const AttnOptions& opt = {});

}  // namespace mta::cpu
