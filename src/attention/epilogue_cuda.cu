// See epilogue_cuda.h. The kernels are the materialized op's (epilogue.cuh), on one "head" of `rows`
// contiguous rows with bf16 storage and float arithmetic.
#include "attention/epilogue_cuda.h"

#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>

#include "attention/epilogue.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;

__global__ void float_to_bf16_kernel(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) y[i] = __float2bfloat16(x[i]);
}

// y + y_lo = x to ~16 bits of mantissa (y = bf16(x), y_lo = bf16(x - y)).
__global__ void float_to_bf16_split_kernel(const float* __restrict__ x, bf16* __restrict__ y, bf16* __restrict__ y_lo,
                                           long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const bf16 hi = __float2bfloat16(x[i]);
    y[i] = hi, y_lo[i] = __float2bfloat16(x[i] - __bfloat162float(hi));
  }
}

Epilogue<float> epilogue_of(const AttentionSpec& spec, const float* norm, const float* gate_w, const float* gate_b) {
  Epilogue<float> ep;
  ep.norm = spec.norm, ep.depth = spec.depth_scale_layer.has_value(), ep.gate = spec.gate;
  ep.ds = static_cast<float>(spec.depth_scale());
  ep.gn = norm, ep.gw = gate_w, ep.gb = gate_b;
  if ((ep.norm && !norm) || (ep.gate && (!gate_w || !gate_b)))
    throw std::invalid_argument("attn_epilogue: a parameter of an enabled option is missing");
  return ep;
}

void check_rows(long long rows, int D) {
  if (rows < 1 || rows > INT_MAX || D < 1) throw std::invalid_argument("attn_epilogue: bad rows or D");
}

size_t up(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

bool attn_epilogue_enabled(const AttentionSpec& spec) {
  return spec.norm || spec.gate || spec.depth_scale_layer.has_value();
}

AttentionSpec attn_core_spec(const AttentionSpec& spec) {
  AttentionSpec core = spec;
  core.norm = false, core.gate = false, core.depth_scale_layer.reset();
  return core;
}

void attn_epilogue_forward(const AttentionSpec& spec, const bf16* core, const float* norm, const float* gate_w,
                           const float* gate_b, bf16* out, long long rows, int D, cudaStream_t s) {
  check_rows(rows, D);
  const Epilogue<float> ep = epilogue_of(spec, norm, gate_w, gate_b);
  const int n = static_cast<int>(rows);
  epilogue_forward_kernel<float, bf16>
      <<<grid_for(rows, kWarpsPerBlock), kBlock, 0, s>>>(core, out, ep, D, n, 0, n, rows);
  MTA_CUDA_CHECK_LAUNCH("epilogue_forward_kernel");
}

size_t attn_epilogue_backward_scratch_bytes(long long rows, int D) {
  const size_t rd = static_cast<size_t>(rows) * D * sizeof(float);
  return 3 * up(rd) + up(static_cast<size_t>(rows) * sizeof(float)) + up((2 * static_cast<size_t>(D) + 1) * 8) +
         up(static_cast<size_t>(kColumnBlocks) * D * 8);
}

namespace {

// The backward from the core's output in bf16 or fp32 (TCore); dcore as bf16, or with dcore_lo as two
// bf16 parts.
template <typename TCore>
void epilogue_backward(const AttentionSpec& spec, const TCore* core, const bf16* dout, const float* norm,
                       const float* gate_w, const float* gate_b, bf16* dcore, bf16* dcore_lo, float* grad_norm,
                       float* grad_gate_w, float* grad_gate_b, void* scratch, long long rows, int D, cudaStream_t s) {
  check_rows(rows, D);
  const Epilogue<float> ep = epilogue_of(spec, norm, gate_w, gate_b);
  if ((ep.norm && !grad_norm) || (ep.gate && (!grad_gate_w || !grad_gate_b)))
    throw std::invalid_argument("attn_epilogue_backward: a gradient buffer of an enabled option is missing");
  const size_t rd = static_cast<size_t>(rows) * D * sizeof(float);
  char* base = static_cast<char*>(scratch);
  float* dobuf = reinterpret_cast<float*>(base);
  float* pn = reinterpret_cast<float*>(base + up(rd));
  float* pgw = reinterpret_cast<float*>(base + 2 * up(rd));
  float* pgb = reinterpret_cast<float*>(base + 3 * up(rd));
  double* acc = reinterpret_cast<double*>(base + 3 * up(rd) + up(static_cast<size_t>(rows) * sizeof(float)));
  double* colpart = reinterpret_cast<double*>(reinterpret_cast<char*>(acc) + up((2 * static_cast<size_t>(D) + 1) * 8));
  MTA_CUDA_CHECK(cudaMemsetAsync(acc, 0, (2 * static_cast<size_t>(D) + 1) * sizeof(double), s));
  const int n = static_cast<int>(rows);
  epilogue_backward_kernel<float, bf16, TCore>
      <<<grid_for(rows, kWarpsPerBlock), kBlock, 0, s>>>(core, dout, dobuf, pn, pgw, pgb, ep, D, n, 0, n, n, rows);
  MTA_CUDA_CHECK_LAUNCH("epilogue_backward_kernel");
  if (ep.norm) {
    column_sum<float>(pn, colpart, acc, rows, D, s);
    add_gradient_kernel<float><<<grid_for(D, kBlock), kBlock, 0, s>>>(grad_norm, acc, D);
  }
  if (ep.gate) {
    column_sum<float>(pgw, colpart, acc + D, rows, D, s);
    column_sum<float>(pgb, colpart, acc + 2 * D, rows, 1, s);
    add_gradient_kernel<float><<<grid_for(D, kBlock), kBlock, 0, s>>>(grad_gate_w, acc + D, D);
    add_gradient_kernel<float><<<1, kBlock, 0, s>>>(grad_gate_b, acc + 2 * D, 1);
  }
  MTA_CUDA_CHECK_LAUNCH("epilogue parameter gradients");
  if (dcore_lo)
    float_to_bf16_split_kernel<<<grid_for(rows * D, kBlock), kBlock, 0, s>>>(dobuf, dcore, dcore_lo, rows * D);
  else
    float_to_bf16_kernel<<<grid_for(rows * D, kBlock), kBlock, 0, s>>>(dobuf, dcore, rows * D);
  MTA_CUDA_CHECK_LAUNCH("float_to_bf16_kernel");
}

}  // namespace

void attn_epilogue_backward(const AttentionSpec& spec, const bf16* core, const bf16* dout, const float* norm,
                            const float* gate_w, const float* gate_b, bf16* dcore, float* grad_norm, float* grad_gate_w,
                            float* grad_gate_b, void* scratch, long long rows, int D, cudaStream_t s) {
  epilogue_backward(spec, core, dout, norm, gate_w, gate_b, dcore, nullptr, grad_norm, grad_gate_w, grad_gate_b,
                    scratch, rows, D, s);
}

void attn_epilogue_backward_split(const AttentionSpec& spec, const float* core32, const bf16* dout, const float* norm,
                                  const float* gate_w, const float* gate_b, bf16* dcore, bf16* dcore_lo,
                                  float* grad_norm, float* grad_gate_w, float* grad_gate_b, void* scratch,
                                  long long rows, int D, cudaStream_t s) {
  if (!dcore_lo) throw std::invalid_argument("attn_epilogue_backward_split: dcore_lo is null");
  epilogue_backward(spec, core32, dout, norm, gate_w, gate_b, dcore, dcore_lo, grad_norm, grad_gate_w, grad_gate_b,
                    scratch, rows, D, s);
}

}  // namespace mta::cuda
