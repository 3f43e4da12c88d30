#pragma once
// CUDA path of Multi-Token Attention: a straightforward, materialized implementation (the fused
// kernel is later work). Computes exactly docs/mta-semantics.md with the CPU reference's semantics
// (attention/mta_cpu.h): the same stages, the same rounding precision (T throughout, softmax
// included), the same attention-dropout masks (mta::dropout_keep), parameter gradients summed in
// double in a fixed order (deterministic: no atomics) and then ADDED into the caller's buffers.
//
// Work is split into units of (batch, block of spec.coupled_heads() heads) as on the CPU, and the query
// rows into row blocks (a quarter of T once T > 256, fewer when the budget requires; MTA_CUDA_ROW_BLOCK
// overrides): a block holds its rows plus the halo rows its key-query convolutions need (cq - 1 above
// per convolution; in the backward pass as many below), and only the key columns up to its last row.
// Units are processed in chunks sized so that a chunk's block matrices stay under about 2 GiB
// (MTA_CUDA_WORKSPACE_MB), so device memory is O(chunk * rows per block * T), never O(T^2) of the
// whole batch; row blocks also skip the causal future past each block (about a third of the work).
//
// All tensor and parameter pointers are DEVICE pointers. Work is issued on `stream`; each call
// synchronizes `stream` before returning, so outputs are ready when the call returns. The workspace
// is one device buffer per device, allocated on first use, grown when a call needs more and kept for
// the process (about the budget above: allocating and freeing it per call cost more than some of the
// work in training). CUDA and cuBLAS failures throw std::runtime_error
// ("file:line: what: reason"); an invalid spec or shape throws mta::InputError (before any device
// work), a missing gradient buffer std::invalid_argument. One cuBLAS handle per device is created on
// first use; calls on the same device are serialized by a mutex.
#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention/attention_op.h"

namespace mta::cuda {

// q, k [B,H,T,D]; v and out [B,H,T,Dv] (Dv = D unless dims.Dv is set). T = float or double.
template <typename T>
void mta_forward(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const T* v,
                 const AttnParams<T>& params, T* out, const AttnOptions& opt = {}, cudaStream_t stream = 0);

// Gradients of sum(out * dout): dq, dk, dv are overwritten; parameter gradients are added into grads.
// Recomputes the forward pass per chunk and row block (no activations are kept between forward and
// backward).
template <typename T>
void mta_backward(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const T* v,
                  const AttnParams<T>& params, const T* dout, T* dq, T* dk, T* dv, const AttnParamGrads<T>& grads,
                  const AttnOptions& opt = {}, cudaStream_t stream = 0);

// Device bytes of workspace the last mta_forward / mta_backward call on this thread used: what a
// benchmark adds to its own buffers for the peak.
size_t mta_last_workspace_bytes();

// Number of CUDA devices, 0 when there is none or the driver cannot be reached (never throws).
int device_count();

}  // namespace mta::cuda
