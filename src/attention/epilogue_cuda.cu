// See epilogue_cuda.h. The kernels are the materialized op's (epilogue.cuh), on one "head" of `rows`
// contiguous rows with bf16 storage and float arithmetic.
#include "attention/epilogue_cuda.h"

#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "attention/epilogue.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;

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

}  // namespace

bool attn_epilogue_enabled(const AttentionSpec& spec) {
  return spec.norm || spec.gate || spec.depth_scale_layer.has_value();
}

AttentionSpec attn_core_spec(const AttentionSpec& spec) {
  AttentionSpec core = spec;
  core.norm = false, core.gate = false, core.depth_scale_layer.reset();
  return core;
}

namespace {

template <typename TIn>
void epilogue_forward(const AttentionSpec& spec, const TIn* core, const float* norm, const float* gate_w,
                      const float* gate_b, bf16* out, long long rows, int D, cudaStream_t s) {
  check_rows(rows, D);
  const Epilogue<float> ep = epilogue_of(spec, norm, gate_w, gate_b);
  const int n = static_cast<int>(rows);
  epilogue_forward_kernel<float, bf16, TIn>
      <<<grid_for(rows, kWarpsPerBlock), kBlock, 0, s>>>(core, out, ep, D, n, 0, n, rows);
  MTA_CUDA_CHECK_LAUNCH("epilogue_forward_kernel");
}

}  // namespace

void attn_epilogue_forward(const AttentionSpec& spec, const bf16* core, const float* norm, const float* gate_w,
                           const float* gate_b, bf16* out, long long rows, int D, cudaStream_t s) {
  epilogue_forward(spec, core, norm, gate_w, gate_b, out, rows, D, s);
}

void attn_epilogue_forward(const AttentionSpec& spec, const float* core32, const float* norm, const float* gate_w,
                           const float* gate_b, bf16* out, long long rows, int D, cudaStream_t s) {
  epilogue_forward(spec, core32, norm, gate_w, gate_b, out, rows, D, s);
}

// The backward keeps no per-row buffer: each block sums its rows' parameter-gradient terms itself.
// Blocks own fixed ranges of rows and warps fixed rows within them, so the sums are in a fixed order
// (deterministic, independent of the GPU). Before this, the rows' terms went to three rows x D fp32
// buffers and the gradient in fp32 to a fourth, 4 x rows x D x 4 bytes of scratch: at the paper LM's
// layer (B = 2, H = 16, T = 4096, D = 64) 134 MB, most of the fused kq layer's memory above SDPA's.
constexpr int kRowBlocks = kColumnBlocks;  // blocks of the backward (fixed: the sums' order)
constexpr int kMaxLanes = 8;               // values per lane: D <= 32 * kMaxLanes

size_t attn_epilogue_backward_scratch_bytes(long long rows, int D) {
  (void)rows;
  return static_cast<size_t>(kRowBlocks) * (2 * D + 1) * sizeof(double);
}

namespace {

// d core of rows [r0, r1) of block b, a warp per row, written as bf16 (and its remainder as bf16 in
// dcore_lo, when non-null); partial[b][0, D): the block's sum of the norm weight's gradient terms,
// [D, 2D): the gate weight's, [2D]: the gate bias's. The arithmetic of each row is
// epilogue_backward_kernel's (epilogue.cuh), which mirrors the CPU reference.
template <typename TCore>
__global__ void __launch_bounds__(kBlock) epilogue_backward_rows_kernel(
    const TCore* __restrict__ core, const bf16* __restrict__ dout, bf16* __restrict__ dcore,
    bf16* __restrict__ dcore_lo, double* __restrict__ partial, Epilogue<float> ep, int D, long long rows) {
  __shared__ double sh[kWarpsPerBlock][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long per = (rows + gridDim.x - 1) / gridDim.x;
  const long long r0 = blockIdx.x * per, r1 = min(rows, r0 + per);
  double an[kMaxLanes] = {}, aw[kMaxLanes] = {}, ab = 0.0;
  for (long long r = r0 + warp; r < r1; r += kWarpsPerBlock) {
    const TCore* orow = core + r * D;
    const bf16* grow = dout + r * D;
    float o[kMaxLanes], g[kMaxLanes], d[kMaxLanes];  // zero past D
#pragma unroll
    for (int u = 0; u < kMaxLanes; ++u) {
      const int e = lane + 32 * u;
      o[u] = e < D ? static_cast<float>(orow[e]) : 0.f;
      g[u] = e < D ? __bfloat162float(grow[e]) : 0.f;
      d[u] = 0.f;
    }
    float rr = 1.f;
    if (ep.norm) {
      float ms = 0.f;
#pragma unroll
      for (int u = 0; u < kMaxLanes; ++u) ms += o[u] * o[u];
      rr = 1.f / sqrtf(warp_sum(ms) / static_cast<float>(D) + static_cast<float>(kGroupNormEps));
    }
    auto scaled = [&](int u) {  // nrm * ds, as the CPU's scl
      const int e = lane + 32 * u;
      return (ep.norm ? o[u] * rr * ep.gn[e] : o[u]) * ep.ds;
    };
    if (ep.gate) {
      float zl = 0.f, dz = 0.f;
#pragma unroll
      for (int u = 0; u < kMaxLanes; ++u)
        if (lane + 32 * u < D) {
          const float sv = scaled(u);
          zl += sv * ep.gw[lane + 32 * u];
          dz += g[u] * sv;
        }
      zl = warp_sum(zl) + ep.gb[0];
      dz = warp_sum(dz);
      const float z = 1.f / (1.f + expf(-zl)), dzl = dz * z * (1.f - z);
#pragma unroll
      for (int u = 0; u < kMaxLanes; ++u)
        if (lane + 32 * u < D) {
          d[u] = g[u] * z + dzl * ep.gw[lane + 32 * u];
          aw[u] += static_cast<double>(dzl * scaled(u));
        }
      ab += static_cast<double>(dzl);  // the same in every lane; lane 0's is kept
    } else {
#pragma unroll
      for (int u = 0; u < kMaxLanes; ++u) d[u] = g[u];
    }
    if (ep.depth)
#pragma unroll
      for (int u = 0; u < kMaxLanes; ++u) d[u] *= ep.ds;
    if (ep.norm) {
      float uo = 0.f;
#pragma unroll
      for (int u = 0; u < kMaxLanes; ++u)
        if (lane + 32 * u < D) {
          an[u] += static_cast<double>(d[u] * o[u] * rr);
          d[u] *= ep.gn[lane + 32 * u];
          uo += d[u] * o[u];
        }
      const float c = rr * rr * rr * warp_sum(uo) / static_cast<float>(D);
#pragma unroll
      for (int u = 0; u < kMaxLanes; ++u) d[u] = rr * d[u] - o[u] * c;
    }
#pragma unroll
    for (int u = 0; u < kMaxLanes; ++u) {
      const int e = lane + 32 * u;
      if (e >= D) continue;
      const bf16 hi = __float2bfloat16(d[u]);
      dcore[r * D + e] = hi;
      if (dcore_lo) dcore_lo[r * D + e] = __float2bfloat16(d[u] - __bfloat162float(hi));
    }
  }
  // The block's sums over its warps, in warp order, column panel by column panel.
  double* out = partial + static_cast<size_t>(blockIdx.x) * (2 * D + 1);
  auto block_columns = [&](const double (&acc)[kMaxLanes], int base) {
#pragma unroll
    for (int u = 0; u < kMaxLanes; ++u) {
      if (32 * u >= D) break;
      sh[warp][lane] = acc[u];
      __syncthreads();
      if (warp == 0 && lane + 32 * u < D) {
        double t = 0.0;
        for (int w = 0; w < kWarpsPerBlock; ++w) t += sh[w][lane];
        out[base + lane + 32 * u] = t;
      }
      __syncthreads();
    }
  };
  if (ep.norm) block_columns(an, 0);
  if (ep.gate) {
    block_columns(aw, D);
    if (lane == 0) sh[warp][0] = ab;
    __syncthreads();
    if (threadIdx.x == 0) {
      double t = 0.0;
      for (int w = 0; w < kWarpsPerBlock; ++w) t += sh[w][0];
      out[2 * D] = t;
    }
  }
}

// grad[c] += the blocks' partials of column c summed in block order, rounded once to float.
__global__ void epilogue_grads_finish_kernel(const double* __restrict__ partial, int blocks, int D, bool norm,
                                             bool gate, float* __restrict__ grad_norm, float* __restrict__ grad_gate_w,
                                             float* __restrict__ grad_gate_b) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c > 2 * D || (c < D && !norm) || (c >= D && !gate)) return;
  double t = 0.0;
  for (int b = 0; b < blocks; ++b) t += partial[static_cast<size_t>(b) * (2 * D + 1) + c];
  float* dst = c < D ? grad_norm + c : c < 2 * D ? grad_gate_w + (c - D) : grad_gate_b;
  *dst += static_cast<float>(t);
}

// The backward from the core's output in bf16 or fp32 (TCore); dcore as bf16, or with dcore_lo as two
// bf16 parts.
template <typename TCore>
void epilogue_backward(const AttentionSpec& spec, const TCore* core, const bf16* dout, const float* norm,
                       const float* gate_w, const float* gate_b, bf16* dcore, bf16* dcore_lo, float* grad_norm,
                       float* grad_gate_w, float* grad_gate_b, void* scratch, long long rows, int D, cudaStream_t s) {
  check_rows(rows, D);
  if (D > 32 * kMaxLanes)
    throw std::invalid_argument("attn_epilogue_backward: D above " + std::to_string(32 * kMaxLanes));
  const Epilogue<float> ep = epilogue_of(spec, norm, gate_w, gate_b);
  if ((ep.norm && !grad_norm) || (ep.gate && (!grad_gate_w || !grad_gate_b)))
    throw std::invalid_argument("attn_epilogue_backward: a gradient buffer of an enabled option is missing");
  auto* partial = static_cast<double*>(scratch);
  epilogue_backward_rows_kernel<TCore>
      <<<kRowBlocks, kBlock, 0, s>>>(core, dout, dcore, dcore_lo, partial, ep, D, rows);
  MTA_CUDA_CHECK_LAUNCH("epilogue_backward_rows_kernel");
  if (ep.norm || ep.gate) {
    epilogue_grads_finish_kernel<<<(2 * D + 1 + kBlock - 1) / kBlock, kBlock, 0, s>>>(
        partial, kRowBlocks, D, ep.norm, ep.gate, grad_norm, grad_gate_w, grad_gate_b);
    MTA_CUDA_CHECK_LAUNCH("epilogue_grads_finish_kernel");
  }
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
