#pragma once
// Device code shared by the materialized MTA op (mta_cuda.cu) and the fused paths' epilogue
// (epilogue_cuda.cu): warp and block reductions, grid-stride helpers, the epilogue of
// docs/mta-semantics.md steps 8-10 (group norm, depth scaling, gate) on rows of length Dv, and the
// deterministic column sums of its parameter-gradient terms. Internal to those files (unnamed
// namespace: each includes its own copy).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "attention/attention_op.h"
#include "cuda/warp_reduce.cuh"

namespace mta::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Device helpers.

constexpr int kBlock = 256;          // threads per block of every kernel
constexpr int kWarpsPerBlock = kBlock / 32;

__device__ inline float dev_exp(float x) { return expf(x); }
__device__ inline double dev_exp(double x) { return exp(x); }
__device__ inline float dev_sqrt(float x) { return sqrtf(x); }
__device__ inline double dev_sqrt(double x) { return sqrt(x); }

// Sum over the block (blockDim.x == kBlock) in a fixed order; the result is valid in thread 0. Call
// at most once per kernel, from every thread of the block.
__device__ inline double block_sum(double v) {
  __shared__ double partial[kWarpsPerBlock];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarpsPerBlock ? partial[threadIdx.x] : 0.0;
  if (warp == 0) v = warp_sum(v);
  return v;
}

__device__ inline long long global_thread() { return blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; }
__device__ inline long long grid_threads() { return static_cast<long long>(gridDim.x) * blockDim.x; }

// Grid of a grid-stride loop over `work` items (threads, or warps for the row kernels).
inline unsigned grid_for(long long work, long long per_block) {
  const long long g = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(std::clamp<long long>(g, 1, 1 << 20));
}

// The epilogue's switches and parameters (device pointers).
template <typename T>
struct Epilogue {
  bool norm = false, depth = false, gate = false;
  T ds = T(1);  // static_cast<T>(spec.depth_scale()), 1 when depth scaling is off
  const T* gn = nullptr;
  const T* gw = nullptr;
  const T* gb = nullptr;
};

// 1 / sqrt(mean(o^2) + eps) of a row of length Dv read through o(e), one warp per row (all lanes get it).
template <typename T, typename Row>
__device__ inline T inv_rms(const Row& o, int Dv, int lane) {
  T ms = T(0);
  for (int e = lane; e < Dv; e += 32) ms += o(e) * o(e);
  ms = warp_sum(ms);
  return T(1) / dev_sqrt(ms / T(Dv) + T(kGroupNormEps));
}

// 8-10. Group norm, depth scaling, gate on rows of length Dv: rows [ra, ra + nr) of each head of `in`
// into the same rows of `out` (both [heads][n][Dv], rows = heads * nr; in == out works in place), in
// T's precision (TIo: the rows' storage type; TIn: the input's, when it differs). One warp per row.
template <typename T, typename TIo, typename TIn = TIo>
__global__ void epilogue_forward_kernel(const TIn* in, TIo* out, Epilogue<T> ep, int Dv, int n, int ra, int nr,
                                        long long rows) {
  const int lane = threadIdx.x & 31;
  for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
    const long long off = ((r / nr) * n + ra + r % nr) * Dv;
    const TIn* src = in + off;
    TIo* dst = out + off;
    auto o = [&](int e) { return static_cast<T>(src[e]); };
    const T rr = ep.norm ? inv_rms<T>(o, Dv, lane) : T(1);
    // The value after norm and depth scaling, recomputed where needed (each lane owns its e's).
    auto scaled = [&](int e) {
      T val = ep.norm ? o(e) * rr * ep.gn[e] : o(e);
      if (ep.depth) val *= ep.ds;
      return val;
    };
    T z = T(1);
    if (ep.gate) {
      T zl = T(0);
      for (int e = lane; e < Dv; e += 32) zl += scaled(e) * ep.gw[e];
      zl = warp_sum(zl) + ep.gb[0];
      z = T(1) / (T(1) + dev_exp(-zl));
    }
    for (int e = lane; e < Dv; e += 32) {
      T val = scaled(e);
      if (ep.gate) val *= z;
      dst[e] = static_cast<TIo>(val);
    }
  }
}

// Backward of the epilogue for rows [ra, ra + nr) of each head: o = the epilogue's input (compact
// [heads][nr][Dv]), dout the incoming gradient ([heads][n][Dv]); writes d(input) into dobuf (compact, in
// T) and each row's parameter-gradient terms into pn [rows][Dv] (norm), pgw [rows][Dv] and pgb [rows]
// (gate), summed later in a fixed order; rows at or past `owned_end` (the next block's) write zero
// terms. Mirrors epilogue_backward_row of the CPU reference.
template <typename T, typename TIo, typename TObuf = TIo>
__global__ void epilogue_backward_kernel(const TObuf* __restrict__ obuf, const TIo* __restrict__ dout,
                                         T* __restrict__ dobuf, T* __restrict__ pn, T* __restrict__ pgw,
                                         T* __restrict__ pgb, Epilogue<T> ep, int Dv, int n, int ra, int nr,
                                         int owned_end, long long rows) {
  const int lane = threadIdx.x & 31;
  for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
    const int i = ra + static_cast<int>(r % nr);
    const bool owned = i < owned_end;
    const TObuf* ob = obuf + r * Dv;
    const TIo* gb = dout + ((r / nr) * n + i) * Dv;
    auto o = [&](int e) { return static_cast<T>(ob[e]); };
    auto g = [&](int e) { return static_cast<T>(gb[e]); };
    T* d = dobuf + r * Dv;
    const T rr = ep.norm ? inv_rms<T>(o, Dv, lane) : T(1);
    auto scaled = [&](int e) {  // nrm * ds, as the CPU's scl
      const T nrm = ep.norm ? o(e) * rr * ep.gn[e] : o(e);
      return nrm * ep.ds;
    };
    if (ep.gate) {
      T zl = T(0), dz = T(0);
      for (int e = lane; e < Dv; e += 32) {
        const T s = scaled(e);
        zl += s * ep.gw[e];
        dz += g(e) * s;
      }
      zl = warp_sum(zl) + ep.gb[0];
      dz = warp_sum(dz);
      const T z = T(1) / (T(1) + dev_exp(-zl));
      const T dzl = dz * z * (T(1) - z);
      for (int e = lane; e < Dv; e += 32) {
        d[e] = g(e) * z + dzl * ep.gw[e];
        pgw[r * Dv + e] = owned ? dzl * scaled(e) : T(0);
      }
      if (lane == 0) pgb[r] = owned ? dzl : T(0);
    } else {
      for (int e = lane; e < Dv; e += 32) d[e] = g(e);
    }
    if (ep.depth)
      for (int e = lane; e < Dv; e += 32) d[e] *= ep.ds;
    if (ep.norm) {
      T uo = T(0);
      for (int e = lane; e < Dv; e += 32) {
        pn[r * Dv + e] = owned ? d[e] * o(e) * rr : T(0);
        const T u = d[e] * ep.gn[e];
        d[e] = u;
        uo += u * o(e);
      }
      uo = warp_sum(uo);
      const T c = rr * rr * rr * uo / T(Dv);
      for (int e = lane; e < Dv; e += 32) d[e] = rr * d[e] - o(e) * c;
    }
  }
}

// acc[col] += sum over rows of part[r * cols + col], deterministic, in two stages: kColumnBlocks
// blocks each sum a contiguous range of rows with coalesced reads (a thread = a row lane and a column;
// ascending rows per thread, then the lanes in order) into partial[block * cols + col]; then one
// thread per column adds the blocks' partials in block order. (One block per column, the first
// version, read a column at a stride of cols floats and left all but a few SMs idle: 0.2-0.3 ms per
// call at 262k rows, ~11 ms of a 35M LM MTA step.)
constexpr int kColumnBlocks = 264;  // 2 per SM of an H200
template <typename T>
__global__ void column_partial_kernel(const T* __restrict__ part, double* __restrict__ partial, long long rows,
                                      int cols) {
  __shared__ double sh[kBlock];
  const long long per = (rows + gridDim.x - 1) / gridDim.x;
  const long long r0 = blockIdx.x * per, r1 = min(rows, r0 + per);
  for (int c0 = 0; c0 < cols; c0 += kBlock) {  // panels of up to kBlock columns
    const int width = min(kBlock, cols - c0), lanes = kBlock / width;
    const int c = threadIdx.x % width, lr = threadIdx.x / width;
    double s = 0.0;
    if (lr < lanes)
      for (long long r = r0 + lr; r < r1; r += lanes) s += static_cast<double>(part[r * cols + c0 + c]);
    sh[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x < width) {
      double t = 0.0;
      for (int l = 0; l < lanes; ++l) t += sh[l * width + threadIdx.x];
      partial[blockIdx.x * static_cast<long long>(cols) + c0 + threadIdx.x] = t;
    }
    __syncthreads();
  }
}
__global__ void column_finish_kernel(const double* __restrict__ partial, double* __restrict__ acc, int blocks,
                                     int cols) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double s = 0.0;
  for (int b = 0; b < blocks; ++b) s += partial[static_cast<long long>(b) * cols + c];
  acc[c] += s;
}
// partial: kColumnBlocks * cols doubles of scratch, free once the two kernels (queued on s) ran.
template <typename T>
void column_sum(const T* part, double* partial, double* acc, long long rows, int cols, cudaStream_t s) {
  column_partial_kernel<T><<<kColumnBlocks, kBlock, 0, s>>>(part, partial, rows, cols);
  column_finish_kernel<<<(cols + kBlock - 1) / kBlock, kBlock, 0, s>>>(partial, acc, kColumnBlocks, cols);
}

// grads[i] += (T) acc[i]: the caller's gradient, rounded once as the CPU does.
template <typename T>
__global__ void add_gradient_kernel(T* __restrict__ grad, const double* __restrict__ acc, long long count) {
  for (long long idx = global_thread(); idx < count; idx += grid_threads()) grad[idx] += static_cast<T>(acc[idx]);
}

}  // namespace
}  // namespace mta::cuda
