// CUDA path of Multi-Token Attention, materialized: the T x T score matrices of a chunk of units live
// in device memory and every stage of docs/mta-semantics.md is its own kernel (or cuBLAS call),
// mirroring attention/mta_cpu.cpp stage by stage. See mta_cuda.h for the contract.
//
// Conventions (the same as the CPU reference): square T x T matrices are row-major, one per head of
// the chunk, stored back to back. Every stage writes its whole output matrix (0 in the future part
// j > i) and reads its inputs only in their causal part (j <= i), so no stage depends on what another
// left in the future part. Chunk head x is global (batch*heads) index bh0 + x; a chunk always starts at
// a unit boundary (a multiple of spec.coupled_heads()), so the heads of a mixing group are consecutive
// inside the chunk.
#include "attention/mta_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "util/error.h"

#include "cuda/check.h"

namespace mta::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Error checking: every CUDA and cuBLAS call goes through these; a failure throws
// std::runtime_error naming the file, the line, the call and the reason.


void check_cublas(cublasStatus_t st, const char* what, const char* file, int line) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": cuBLAS error in " + what + ": " +
                             cublasGetStatusString(st));
}

#define CUDA_CHECK(expr) check_cuda((expr), #expr, __FILE__, __LINE__)
#define CUBLAS_CHECK(expr) check_cublas((expr), #expr, __FILE__, __LINE__)
// After every kernel launch: a bad launch configuration is reported here, not at the next sync.
#define CUDA_CHECK_LAUNCH(name) check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)

// ---------------------------------------------------------------------------------------------
// Device helpers.

constexpr int kBlock = 256;          // threads per block of every kernel
constexpr int kWarpsPerBlock = kBlock / 32;

__device__ inline float dev_exp(float x) { return expf(x); }
__device__ inline double dev_exp(double x) { return exp(x); }
__device__ inline float dev_sqrt(float x) { return sqrtf(x); }
__device__ inline double dev_sqrt(double x) { return sqrt(x); }

template <typename V>
__device__ inline V warp_sum(V v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename V>
__device__ inline V warp_max(V v) {
  for (int off = 16; off > 0; off >>= 1) {
    const V o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

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
unsigned grid_for(long long work, long long per_block) {
  const long long g = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(std::clamp<long long>(g, 1, 1 << 20));
}

// ---------------------------------------------------------------------------------------------
// Stage kernels. `total` = heads * n * n elements; element idx is (head x, row i, column j).

// 1. The first causal mask: the future part of the logits set to 0.
template <typename T>
__global__ void mask_future_kernel(T* s, int n, long long total) {
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int j = static_cast<int>(idx % n);
    const int i = static_cast<int>((idx / n) % n);
    if (j > i) s[idx] = T(0);
  }
}

// Key-query convolution (steps 2 and 5) and its adjoint, on 32 x 32 output tiles: a block stages the
// tile's input window (the tile plus its halo of cq - 1 rows and ck - 1 columns) in shared memory,
// zero where the input is outside the sequence or in its future part, so the inner loop has no
// branches and every input element is read from device memory once per tile instead of cq * ck times.
// Block (column tile, row tile, chunk head x), kConvTile x kConvRowsPerPass threads.
constexpr int kConvTile = 32;
constexpr int kConvRowsPerPass = kBlock / kConvTile;  // 8: each thread computes 4 rows of its column
constexpr int kMaxCq = 8, kMaxCk = 15;                // the spec's limits (spec.cpp validate)
constexpr int kHaloRows = kConvTile + kMaxCq - 1, kHaloCols = kConvTile + kMaxCk - 1;

// Stages in[x][r0 + r][c0 + c] for r < rows, c < cols into win (row pitch kHaloCols), 0 where the
// element is outside the matrix or in its future part (c0 + c > r0 + r).
template <typename T>
__device__ inline void stage_causal_window(const T* __restrict__ src, T* win, int r0, int c0, int rows, int cols,
                                           int n) {
  for (int t = threadIdx.y * blockDim.x + threadIdx.x; t < rows * cols; t += blockDim.x * blockDim.y) {
    const int r = t / cols, c = t % cols;
    const int i = r0 + r, j = c0 + c;
    win[r * kHaloCols + c] = (i >= 0 && i < n && j >= 0 && j <= i) ? src[static_cast<long long>(i) * n + j] : T(0);
  }
}

// The convolution (kAdjoint = false): out[x][i][j] = sum_{a,c} W[h][a][c] * in[x][i-(cq-1)+a][j-o+c]
// for j <= i (0 in the future), reading `in` only in its causal part; W is [H][cq][ck], h the global
// head of chunk head x. Its adjoint with respect to the input (kAdjoint = true): out[x][ii][jj]
// (jj <= ii) = sum_{a,c} W[h][a][c] * in[x][ii+(cq-1)-a][jj+o-c]. Summed in the CPU's order (a, then
// c); the zeros staged for skipped inputs add nothing.
template <typename T, bool kAdjoint>
__global__ void __launch_bounds__(kBlock) conv_tile_kernel(const T* __restrict__ in, T* __restrict__ out,
                                                           const T* __restrict__ W, int cq, int ck, int o, int n, int H,
                                                           long long bh0) {
  __shared__ T win[kHaloRows * kHaloCols];
  __shared__ T w[kMaxCq * kMaxCk];
  const long long x = blockIdx.z;
  const int i0 = blockIdx.y * kConvTile, j0 = blockIdx.x * kConvTile;
  const long long nn = static_cast<long long>(n) * n;
  T* dst = out + x * nn;
  if (j0 > i0 + kConvTile - 1) {  // wholly in the future
    for (int r = threadIdx.y; r < kConvTile; r += kConvRowsPerPass) {
      const int i = i0 + r, j = j0 + threadIdx.x;
      if (i < n && j < n) dst[static_cast<long long>(i) * n + j] = T(0);
    }
    return;
  }
  const int h = static_cast<int>((bh0 + x) % H);
  for (int t = threadIdx.y * blockDim.x + threadIdx.x; t < cq * ck; t += kBlock) w[t] = W[static_cast<long long>(h) * cq * ck + t];
  // The window: input rows i0 - (cq-1) .. i0 + 31 and columns j0 - o .. j0 + 31 - o + ck - 1 (forward);
  // rows i0 .. i0 + 31 + cq - 1 and columns j0 + o - (ck-1) .. j0 + 31 + o (adjoint).
  if (kAdjoint)
    stage_causal_window(in + x * nn, win, i0, j0 + o - (ck - 1), kConvTile + cq - 1, kConvTile + ck - 1, n);
  else
    stage_causal_window(in + x * nn, win, i0 - (cq - 1), j0 - o, kConvTile + cq - 1, kConvTile + ck - 1, n);
  __syncthreads();
  for (int r = threadIdx.y; r < kConvTile; r += kConvRowsPerPass) {
    const int i = i0 + r, j = j0 + threadIdx.x;
    if (i >= n || j >= n) continue;
    T acc = T(0);
    if (j <= i)
      for (int a = 0; a < cq; ++a) {
        if (kAdjoint) {
          // input row i + (cq-1) - a is window row r + (cq-1) - a; column j + o - c is window column
          // threadIdx.x + (ck-1) - c.
          const T* row = win + (r + cq - 1 - a) * kHaloCols + threadIdx.x + ck - 1;
          for (int c = 0; c < ck; ++c) acc += w[a * ck + c] * row[-c];
        } else {
          const T* row = win + (r + a) * kHaloCols + threadIdx.x;
          for (int c = 0; c < ck; ++c) acc += w[a * ck + c] * row[c];
        }
      }
    dst[static_cast<long long>(i) * n + j] = acc;
  }
}

// Head mixing (steps 3 and 6) over the causal part: out[x][i][j] = sum_y M[grp][xg][y] * in[x-xg+y][i][j]
// with hx = global head of x, grp = hx / g, xg = hx % g; M is [H/g][g][g]. With `transpose`, M[grp][y][xg]
// (the adjoint, used by backward). One thread per (group of the chunk, position): it reads the g
// inputs once and writes the g outputs, instead of each output re-reading all g inputs.
constexpr int kMaxGroup = 16;  // H <= 16 heads per mixing group (the semantics page's limit)
template <typename T>
__global__ void mix_heads_kernel(const T* __restrict__ in, T* __restrict__ out, const T* __restrict__ M, int g, int n,
                                 int H, long long bh0, bool transpose, long long total) {
  const long long nn = static_cast<long long>(n) * n;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const long long within = idx % nn;
    const int j = static_cast<int>(within % n);
    const int i = static_cast<int>(within / n);
    const long long x0 = (idx / nn) * g;  // first chunk head of the group
    if (j > i) {
      for (int xg = 0; xg < g; ++xg) out[(x0 + xg) * nn + within] = T(0);
      continue;
    }
    T v[kMaxGroup];
#pragma unroll
    for (int y = 0; y < kMaxGroup; ++y) v[y] = y < g ? in[(x0 + y) * nn + within] : T(0);
    const int grp = static_cast<int>((bh0 + x0) % H) / g;
    const T* m = M + static_cast<long long>(grp) * g * g;
    for (int xg = 0; xg < g; ++xg) {
      T acc = T(0);
#pragma unroll
      for (int y = 0; y < kMaxGroup; ++y)
        if (y < g) acc += (transpose ? m[y * g + xg] : m[xg * g + y]) * v[y];
      out[(x0 + xg) * nn + within] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Generic forms of the convolution and mixing stages, one thread per output element, for kernels
// larger than the tiled kernels take (cq > 8, ck > 15, g > 16: the spec allows them; the paper uses
// none).

// Key-query convolution, generic form (steps 2 and 5): out[x][i][j] = sum_{a,c} W[h][a][c] * in[x][i-(cq-1)+a][j-o+c]
// for j <= i (0 in the future), reading `in` only in its causal part. W is [H][cq][ck], h the global
// head of chunk head x. Summed in the CPU's order (a, then c).
template <typename T>
__global__ void conv_forward_generic_kernel(const T* __restrict__ in, T* __restrict__ out, const T* __restrict__ W, int cq,
                                    int ck, int o, int n, int H, long long bh0, long long total) {
  const long long nn = static_cast<long long>(n) * n;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int j = static_cast<int>(idx % n);
    const int i = static_cast<int>((idx / n) % n);
    const long long x = idx / nn;
    T acc = T(0);
    if (j <= i) {
      const int h = static_cast<int>((bh0 + x) % H);
      const T* w = W + static_cast<long long>(h) * cq * ck;
      const T* src = in + x * nn;
      for (int a = 0; a < cq; ++a) {
        const int ii = i - (cq - 1) + a;
        if (ii < 0) continue;
        const T* row = src + static_cast<long long>(ii) * n;
        for (int c = 0; c < ck; ++c) {
          const int jj = j - o + c;
          if (jj < 0 || jj > ii) continue;
          acc += w[a * ck + c] * row[jj];
        }
      }
    }
    out[idx] = acc;
  }
}

// Adjoint of conv_forward_generic_kernel with respect to its input: din[x][ii][jj] (jj <= ii) =
// sum_{a,c} W[h][a][c] * dout[x][ii+(cq-1)-a][jj+o-c], reading dout only where it is causal.
template <typename T>
__global__ void conv_input_grad_generic_kernel(const T* __restrict__ dout, T* __restrict__ din, const T* __restrict__ W,
                                       int cq, int ck, int o, int n, int H, long long bh0, long long total) {
  const long long nn = static_cast<long long>(n) * n;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int jj = static_cast<int>(idx % n);
    const int ii = static_cast<int>((idx / n) % n);
    const long long x = idx / nn;
    T acc = T(0);
    if (jj <= ii) {
      const int h = static_cast<int>((bh0 + x) % H);
      const T* w = W + static_cast<long long>(h) * cq * ck;
      const T* src = dout + x * nn;
      for (int a = 0; a < cq; ++a) {
        const int i = ii + (cq - 1) - a;
        if (i >= n) continue;
        const T* row = src + static_cast<long long>(i) * n;
        for (int c = 0; c < ck; ++c) {
          const int j = jj + o - c;
          if (j < 0 || j > i) continue;
          acc += w[a * ck + c] * row[j];
        }
      }
    }
    din[idx] = acc;
  }
}

// Head mixing (steps 3 and 6) over the causal part: out[x][i][j] = sum_y M[grp][xg][y] * in[x-xg+y][i][j]
// with hx = global head of x, grp = hx / g, xg = hx % g; M is [H/g][g][g]. With `transpose`, M[grp][y][xg]
// (the adjoint, used by backward).
template <typename T>
__global__ void mix_heads_generic_kernel(const T* __restrict__ in, T* __restrict__ out, const T* __restrict__ M, int g, int n,
                                 int H, long long bh0, bool transpose, long long total) {
  const long long nn = static_cast<long long>(n) * n;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const long long within = idx % nn;
    const int j = static_cast<int>(within % n);
    const int i = static_cast<int>(within / n);
    const long long x = idx / nn;
    T acc = T(0);
    if (j <= i) {
      const int hx = static_cast<int>((bh0 + x) % H);
      const int grp = hx / g, xg = hx % g;
      const T* m = M + static_cast<long long>(grp) * g * g;
      const T* src = in + (x - xg) * nn + within;
      for (int y = 0; y < g; ++y) {
        const T w = transpose ? m[y * g + xg] : m[xg * g + y];
        acc += w * src[y * nn];
      }
    }
    out[idx] = acc;
  }
}

// 4. Causal row softmax in place, in T's precision: one warp per row (rows = heads * n); the future
// part is written as 0.
template <typename T>
__global__ void softmax_rows_kernel(T* a, int n, long long rows) {
  const int lane = threadIdx.x & 31;
  for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
    const int i = static_cast<int>(r % n);
    T* p = a + r * n;
    T m = -INFINITY;
    for (int j = lane; j <= i; j += 32) m = p[j] > m ? p[j] : m;
    m = warp_max(m);
    T sum = T(0);
    for (int j = lane; j <= i; j += 32) {
      const T e = dev_exp(p[j] - m);
      p[j] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    const T inv = T(1) / sum;
    for (int j = lane; j < n; j += 32) p[j] = j <= i ? p[j] * inv : T(0);
  }
}

// Softmax backward in place: d = A * (d - <d, A>) over j <= i, 0 in the future. One warp per row.
template <typename T>
__global__ void softmax_backward_kernel(const T* __restrict__ a, T* __restrict__ d, int n, long long rows) {
  const int lane = threadIdx.x & 31;
  for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
    const int i = static_cast<int>(r % n);
    const T* ar = a + r * n;
    T* dr = d + r * n;
    T dot = T(0);
    for (int j = lane; j <= i; j += 32) dot += dr[j] * ar[j];
    dot = warp_sum(dot);
    for (int j = lane; j < n; j += 32) dr[j] = j <= i ? ar[j] * (dr[j] - dot) : T(0);
  }
}

// Attention dropout on A3 (forward): w = A3 * keep / (1 - p) over j <= i, 0 elsewhere. The mask is
// mta::dropout_keep of global (batch*heads) index bh0 + x, the CPU's.
template <typename T>
__global__ void dropout_kernel(const T* __restrict__ a3, T* __restrict__ w, int n, long long bh0,
                               unsigned long long seed, float p, T keep_scale, long long total) {
  const long long nn = static_cast<long long>(n) * n;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int j = static_cast<int>(idx % n);
    const int i = static_cast<int>((idx / n) % n);
    const long long x = idx / nn;
    w[idx] = (j <= i && dropout_keep(seed, bh0 + x, n, i, j, p)) ? a3[idx] * keep_scale : T(0);
  }
}

// The gradient dA3 = dO V^T restricted to the causal part and, with dropout, through the mask.
template <typename T>
__global__ void grad_mask_kernel(T* d, int n, long long bh0, bool dropout, unsigned long long seed, float p,
                                 T keep_scale, long long total) {
  const long long nn = static_cast<long long>(n) * n;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int j = static_cast<int>(idx % n);
    const int i = static_cast<int>((idx / n) % n);
    if (j > i) {
      d[idx] = T(0);
    } else if (dropout) {
      const long long x = idx / nn;
      d[idx] *= dropout_keep(seed, bh0 + x, n, i, j, p) ? keep_scale : T(0);
    }
  }
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

// 8-10. Group norm, depth scaling, gate, in place on rows of length Dv (rows = heads * n). One warp per row.
template <typename T>
__global__ void epilogue_forward_kernel(T* out, Epilogue<T> ep, int Dv, long long rows) {
  const int lane = threadIdx.x & 31;
  for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
    T* o = out + r * Dv;
    T rr = T(1);
    if (ep.norm) {
      T ms = T(0);
      for (int e = lane; e < Dv; e += 32) ms += o[e] * o[e];
      ms = warp_sum(ms);
      rr = T(1) / dev_sqrt(ms / T(Dv) + T(kGroupNormEps));
    }
    // The value after norm and depth scaling, recomputed where needed (each lane owns its e's).
    auto scaled = [&](int e) {
      T val = ep.norm ? o[e] * rr * ep.gn[e] : o[e];
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
      o[e] = val;
    }
  }
}

// Backward of the epilogue for rows of length Dv: o = A3 @ V (recomputed), dout the incoming
// gradient; writes d(A3 @ V) into dobuf and each row's parameter-gradient terms into pn [rows][Dv]
// (norm), pgw [rows][Dv] and pgb [rows] (gate), summed later in a fixed order. Mirrors
// epilogue_backward_row of the CPU reference.
template <typename T>
__global__ void epilogue_backward_kernel(const T* __restrict__ obuf, const T* __restrict__ dout, T* __restrict__ dobuf,
                                         T* __restrict__ pn, T* __restrict__ pgw, T* __restrict__ pgb, Epilogue<T> ep,
                                         int Dv, long long rows) {
  const int lane = threadIdx.x & 31;
  for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
    const T* o = obuf + r * Dv;
    const T* g = dout + r * Dv;
    T* d = dobuf + r * Dv;
    T rr = T(1);
    if (ep.norm) {
      T ms = T(0);
      for (int e = lane; e < Dv; e += 32) ms += o[e] * o[e];
      ms = warp_sum(ms);
      rr = T(1) / dev_sqrt(ms / T(Dv) + T(kGroupNormEps));
    }
    auto scaled = [&](int e) {  // nrm * ds, as the CPU's scl
      const T nrm = ep.norm ? o[e] * rr * ep.gn[e] : o[e];
      return nrm * ep.ds;
    };
    if (ep.gate) {
      T zl = T(0), dz = T(0);
      for (int e = lane; e < Dv; e += 32) {
        const T s = scaled(e);
        zl += s * ep.gw[e];
        dz += g[e] * s;
      }
      zl = warp_sum(zl) + ep.gb[0];
      dz = warp_sum(dz);
      const T z = T(1) / (T(1) + dev_exp(-zl));
      const T dzl = dz * z * (T(1) - z);
      for (int e = lane; e < Dv; e += 32) {
        d[e] = g[e] * z + dzl * ep.gw[e];
        pgw[r * Dv + e] = dzl * scaled(e);
      }
      if (lane == 0) pgb[r] = dzl;
    } else {
      for (int e = lane; e < Dv; e += 32) d[e] = g[e];
    }
    if (ep.depth)
      for (int e = lane; e < Dv; e += 32) d[e] *= ep.ds;
    if (ep.norm) {
      T uo = T(0);
      for (int e = lane; e < Dv; e += 32) {
        pn[r * Dv + e] = d[e] * o[e] * rr;
        const T u = d[e] * ep.gn[e];
        d[e] = u;
        uo += u * o[e];
      }
      uo = warp_sum(uo);
      const T c = rr * rr * rr * uo / T(Dv);
      for (int e = lane; e < Dv; e += 32) d[e] = rr * d[e] - o[e] * c;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic parameter-gradient reductions: no atomics. Stage 1 writes one double partial per
// block; stage 2 sums the partials in a fixed order and adds into a double accumulator.

// Rows of the causal part that one block of a weight-gradient kernel covers.
int rows_per_tile(int n) { return std::max(1, 8192 / n); }
int tiles_for(int n) { return (n + rows_per_tile(n) - 1) / rows_per_tile(n); }

// Convolution weight gradient, stage 1, for cq <= 8, ck <= 15: block (strip of 32 rows, chunk head x)
// walks the causal 32 x 32 tiles of its rows, staging the tile of dout and the window of `in` it meets
// (as conv_tile_kernel), and sums dout[x][i][j] * in[x][i-(cq-1)+a][j-o+c] for every tap (a, c) at
// once: warp w owns taps w, w + 8, ...; lane = column. Each input is read from device memory once per
// tile instead of once per tap. partial[(x * cq*ck + ac) * strips + strip].
constexpr int kMaxTapsPerWarp = (kMaxCq * kMaxCk + kConvRowsPerPass - 1) / kConvRowsPerPass;  // 15
template <typename T>
__global__ void __launch_bounds__(kBlock) conv_weight_grad_kernel(const T* __restrict__ in, const T* __restrict__ dout,
                                                                  double* __restrict__ partial, int cq, int ck, int o,
                                                                  int n) {
  __shared__ T win[kHaloRows * kHaloCols];
  __shared__ T dtile[kConvTile * kHaloCols];
  const int strip = blockIdx.x;
  const long long x = blockIdx.y;
  const int i0 = strip * kConvTile, C = cq * ck, lane = threadIdx.x, warp = threadIdx.y;
  const long long nn = static_cast<long long>(n) * n;
  int off[kMaxTapsPerWarp];  // window offset of each of this warp's taps
#pragma unroll
  for (int t = 0; t < kMaxTapsPerWarp; ++t) {
    const int ac = warp + kConvRowsPerPass * t;
    off[t] = ac < C ? (ac / ck) * kHaloCols + ac % ck : 0;
  }
  double acc[kMaxTapsPerWarp] = {};
  for (int j0 = 0; j0 <= i0 + kConvTile - 1 && j0 < n; j0 += kConvTile) {
    __syncthreads();  // the previous tile's reads are done
    stage_causal_window(dout + x * nn, dtile, i0, j0, kConvTile, kConvTile, n);
    stage_causal_window(in + x * nn, win, i0 - (cq - 1), j0 - o, kConvTile + cq - 1, kConvTile + ck - 1, n);
    __syncthreads();
    for (int r = 0; r < kConvTile; ++r) {
      const T d = dtile[r * kHaloCols + lane];
      const T* wrow = win + r * kHaloCols + lane;
#pragma unroll
      for (int t = 0; t < kMaxTapsPerWarp; ++t)
        if (warp + kConvRowsPerPass * t < C) acc[t] += static_cast<double>(d * wrow[off[t]]);
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxTapsPerWarp; ++t) {
    const int ac = warp + kConvRowsPerPass * t;
    const double v = warp_sum(acc[t]);
    if (ac < C && lane == 0) partial[(x * C + ac) * gridDim.x + strip] = v;
  }
}

// Head-mixing weight gradient, stage 1, for g <= 16: block (chunk head x, tile) sums
// dout[x][i][j] * in[x-xg+y][i][j] over its rows and j <= i for every y of x's group at once (dout read
// once, not g times). Blocks are numbered with x fastest (blockIdx.x = tile * nh + x), so the g blocks
// of one group and tile, which read the same inputs, run close together and share them in L2.
// partial[(x * g + y) * tiles + tile].
template <typename T>
__global__ void __launch_bounds__(kBlock) mix_weight_grad_kernel(const T* __restrict__ in, const T* __restrict__ dout,
                                                                 double* __restrict__ partial, int g, int n, int H,
                                                                 long long bh0, int nh, int rows_tile, int tiles) {
  __shared__ double red[kMaxGroup][kWarpsPerBlock];
  const long long x = blockIdx.x % nh;
  const int tile = static_cast<int>(blockIdx.x / nh);
  const int xg = static_cast<int>((bh0 + x) % H) % g;
  const long long nn = static_cast<long long>(n) * n;
  const T* a = dout + x * nn;
  const T* b = in + (x - xg) * nn;
  const int i0 = tile * rows_tile, i1 = min(n, i0 + rows_tile);
  const long long count = static_cast<long long>(i1 - i0) * n;
  double s[kMaxGroup] = {};
  for (long long t = threadIdx.x; t < count; t += blockDim.x) {
    const int i = i0 + static_cast<int>(t / n), j = static_cast<int>(t % n);
    if (j > i) continue;
    const long long e = static_cast<long long>(i) * n + j;
    const T av = a[e];
#pragma unroll
    for (int y = 0; y < kMaxGroup; ++y)
      if (y < g) s[y] += static_cast<double>(av * b[y * nn + e]);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int y = 0; y < kMaxGroup; ++y) {
    const double v = warp_sum(s[y]);
    if (y < g && lane == 0) red[y][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < g) {
    double v = 0.0;
    for (int w = 0; w < kWarpsPerBlock; ++w) v += red[threadIdx.x][w];
    partial[(x * g + threadIdx.x) * tiles + tile] = v;
  }
}

// Generic forms (cq > 8, ck > 15, g > 16). Convolution weight gradient, stage 1: block (tile, a*ck+c, x) sums
// dout[x][i][j] * in[x][i-(cq-1)+a][j-o+c] over its rows i and j <= i (inputs read only where causal).
// partial[(x * cq*ck + ac) * tiles + tile].
template <typename T>
__global__ void conv_weight_grad_generic_kernel(const T* __restrict__ in, const T* __restrict__ dout, double* __restrict__ partial,
                                        int cq, int ck, int o, int n, int rows_tile) {
  const int tile = blockIdx.x, ac = blockIdx.y;
  const long long x = blockIdx.z;
  const int a = ac / ck, c = ac % ck, shift = c - o;
  const long long nn = static_cast<long long>(n) * n;
  const T* src = in + x * nn;
  const T* dd = dout + x * nn;
  const int i0 = tile * rows_tile, i1 = min(n, i0 + rows_tile);
  const long long count = static_cast<long long>(i1 - i0) * n;
  double s = 0.0;
  for (long long t = threadIdx.x; t < count; t += blockDim.x) {
    const int i = i0 + static_cast<int>(t / n), j = static_cast<int>(t % n);
    if (j > i) continue;
    const int ii = i - (cq - 1) + a;
    if (ii < 0) continue;
    const int jj = j + shift;
    if (jj < 0 || jj > ii) continue;
    s += static_cast<double>(dd[static_cast<long long>(i) * n + j] * src[static_cast<long long>(ii) * n + jj]);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[(x * gridDim.y + ac) * gridDim.x + tile] = s;
}

// Head-mixing weight gradient, stage 1: block (tile, y, x) sums dout[x][i][j] * in[x-xg+y][i][j] over
// its rows and j <= i. partial[(x * g + y) * tiles + tile].
template <typename T>
__global__ void mix_weight_grad_generic_kernel(const T* __restrict__ in, const T* __restrict__ dout, double* __restrict__ partial,
                                       int g, int n, int H, long long bh0, int rows_tile) {
  const int tile = blockIdx.x, y = blockIdx.y;
  const long long x = blockIdx.z;
  const int xg = static_cast<int>((bh0 + x) % H) % g;
  const long long nn = static_cast<long long>(n) * n;
  const T* a = dout + x * nn;
  const T* b = in + (x - xg + y) * nn;
  const int i0 = tile * rows_tile, i1 = min(n, i0 + rows_tile);
  const long long count = static_cast<long long>(i1 - i0) * n;
  double s = 0.0;
  for (long long t = threadIdx.x; t < count; t += blockDim.x) {
    const int i = i0 + static_cast<int>(t / n), j = static_cast<int>(t % n);
    if (j > i) continue;
    const long long e = static_cast<long long>(i) * n + j;
    s += static_cast<double>(a[e] * b[e]);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[(x * g + y) * gridDim.x + tile] = s;
}

// Stage 2 of both: acc[h][col] += sum over the chunk's heads x of global head h (ascending x), then
// over tiles (ascending), of partial[(x * C + col) * tiles + tile]. One thread per (h, col).
__global__ void reduce_head_partials_kernel(const double* __restrict__ partial, double* __restrict__ acc, int nh, int C,
                                            int tiles, int H, long long bh0) {
  const long long total = static_cast<long long>(H) * C;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int h = static_cast<int>(idx / C), col = static_cast<int>(idx % C);
    const int x0 = static_cast<int>(((h - bh0 % H) % H + H) % H);
    double s = 0.0;
    for (int x = x0; x < nh; x += H)
      for (int t = 0; t < tiles; ++t) s += partial[(static_cast<long long>(x) * C + col) * tiles + t];
    acc[idx] += s;
  }
}

// acc[col] += sum over rows (ascending within each thread, then a fixed tree) of part[r * cols + col].
// One block per column.
template <typename T>
__global__ void column_sum_kernel(const T* __restrict__ part, double* __restrict__ acc, long long rows, int cols) {
  const int col = blockIdx.x;
  double s = 0.0;
  for (long long r = threadIdx.x; r < rows; r += blockDim.x) s += static_cast<double>(part[r * cols + col]);
  s = block_sum(s);
  if (threadIdx.x == 0) acc[col] += s;
}

// grads[i] += (T) acc[i]: the caller's gradient, rounded once as the CPU does.
template <typename T>
__global__ void add_gradient_kernel(T* __restrict__ grad, const double* __restrict__ acc, long long count) {
  for (long long idx = global_thread(); idx < count; idx += grid_threads()) grad[idx] += static_cast<T>(acc[idx]);
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Device memory owned by one op call.
class DeviceMem {
 public:
  DeviceMem() = default;
  explicit DeviceMem(size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMalloc(&p_, bytes));
  }
  ~DeviceMem() {
    if (p_) cudaFree(p_);  // errors ignored: a destructor must not throw
  }
  DeviceMem(DeviceMem&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  DeviceMem& operator=(DeviceMem&&) = delete;
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  template <typename U>
  U* as() const {
    return static_cast<U*>(p_);
  }

 private:
  void* p_ = nullptr;
};

// Declared after the op's DeviceMem objects: on every exit, normal or by exception, the stream is
// drained before the memory its work uses is freed.
struct StreamDrain {
  cudaStream_t s;
  ~StreamDrain() { cudaStreamSynchronize(s); }
};

// One cuBLAS handle per device, created on first use and kept for the process (destroying it at exit
// could run after the CUDA runtime has shut down). Calls on one device hold its mutex.
struct BlasHandle {
  cublasHandle_t h = nullptr;
  std::mutex m;
};

BlasHandle& blas_handle(int device) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<BlasHandle>> handles;
  std::lock_guard<std::mutex> lock(mu);
  std::unique_ptr<BlasHandle>& e = handles[device];
  if (!e) {
    auto fresh = std::make_unique<BlasHandle>();
    CUBLAS_CHECK(cublasCreate(&fresh->h));
    // Plain IEEE float/double products: no TF32 or other reduced-precision tensor-core math.
    CUBLAS_CHECK(cublasSetMathMode(fresh->h, CUBLAS_DEFAULT_MATH));
    e = std::move(fresh);
  }
  return *e;
}

template <typename T>
cublasStatus_t gemm_strided_batched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                    const T* alpha, const T* A, int lda, long long sA, const T* B, int ldb,
                                    long long sB, const T* beta, T* C, int ldc, long long sC, int batch);
template <>
cublasStatus_t gemm_strided_batched<float>(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                           int k, const float* alpha, const float* A, int lda, long long sA,
                                           const float* B, int ldb, long long sB, const float* beta, float* C, int ldc,
                                           long long sC, int batch) {
  return cublasSgemmStridedBatched(h, ta, tb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch);
}
template <>
cublasStatus_t gemm_strided_batched<double>(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                            int k, const double* alpha, const double* A, int lda, long long sA,
                                            const double* B, int ldb, long long sB, const double* beta, double* C,
                                            int ldc, long long sC, int batch) {
  return cublasDgemmStridedBatched(h, ta, tb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch);
}

// Row-major batched GEMM, as util/blas.h's gemm for each of `batch` matrices (strides in elements):
// C = alpha * op(A) @ op(B), op(A) is M x K, op(B) is K x N. cuBLAS is column-major, and a row-major
// matrix is its transpose in column-major, so this computes C^T = op(B)^T op(A)^T.
template <typename T>
void gemm_rm(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, long long sA,
             const T* B, int ldb, long long sB, T* C, int ldc, long long sC, int batch) {
  const T beta = T(0);
  CUBLAS_CHECK(gemm_strided_batched<T>(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                                       &alpha, B, ldb, sB, A, lda, sA, &beta, C, ldc, sC, batch));
}


bool epilogue_enabled(const AttentionSpec& s) { return s.norm || s.depth_scale_layer || s.gate; }

// Workspace budget for the chunk's T x T matrices: 2 GiB, or MTA_CUDA_WORKSPACE_MB when set (a small
// value forces several chunks: the tests use it).
long long workspace_budget() {
  long long mb = 2048;
  if (const char* e = std::getenv("MTA_CUDA_WORKSPACE_MB")) {
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (end != e && v > 0) mb = v;
  }
  return mb << 20;
}

// Everything one op call shares between its chunks.
template <typename T>
struct Op {
  const AttentionSpec& spec;
  AttnDims dims;
  AttnOptions opt;
  const AttnParams<T>& p;
  cudaStream_t stream;
  cublasHandle_t blas;
  bool backward;
  int n, D, Dv, H, G, units, chunk_units;
  long long nn;
  T scale;
  bool epi;
  Epilogue<T> ep;
  int tiles = 1;   // row tiles of the generic weight-gradient kernels and the mixing one
  int strips = 1;  // 32-row strips of the tiled convolution weight gradient
  int wgrad_cols = 0;  // the largest C of the weight-gradient partials (cq*ck or g), 0 when none

  // Per-chunk buffers, sized for chunk_units units; the views alias as on the CPU.
  std::vector<DeviceMem> mem;
  T *s0 = nullptr, *c = nullptr, *a = nullptr, *a2 = nullptr, *a3 = nullptr, *w = nullptr;
  T *g0 = nullptr, *g1 = nullptr;                                           // backward: ping-pong gradients
  T *obuf = nullptr, *dobuf = nullptr, *pn = nullptr, *pgw = nullptr, *pgb = nullptr;  // backward epilogue
  double* partial = nullptr;                                                // weight-gradient partials

  Op(const AttentionSpec& s, const AttnDims& d, const AttnParams<T>& params, const AttnOptions& o, cudaStream_t st,
     cublasHandle_t h, bool bwd)
      : spec(s), dims(d), opt(o), p(params), stream(st), blas(h), backward(bwd) {
    n = dims.T, D = dims.D, Dv = dims.dv(), H = dims.H, G = spec.coupled_heads();
    units = dims.B * (H / G);
    nn = static_cast<long long>(n) * n;
    scale = T(1) / std::sqrt(T(D));
    epi = epilogue_enabled(spec);
    ep.norm = spec.norm, ep.depth = spec.depth_scale_layer.has_value(), ep.gate = spec.gate;
    ep.ds = static_cast<T>(spec.depth_scale());
    ep.gn = p.norm, ep.gw = p.gate_w, ep.gb = p.gate_b;
    tiles = tiles_for(n);
    strips = (n + kConvTile - 1) / kConvTile;
    if (spec.kq_pre) wgrad_cols = std::max(wgrad_cols, spec.kq_pre->q * spec.kq_pre->k);
    if (spec.kq_post) wgrad_cols = std::max(wgrad_cols, spec.kq_post->q * spec.kq_post->k);
    if (spec.head_pre) wgrad_cols = std::max(wgrad_cols, spec.head_pre->group);
    if (spec.head_post) wgrad_cols = std::max(wgrad_cols, spec.head_post->group);

    // Chunk size: the T x T matrices (and the smaller per-head buffers) of a chunk stay under the budget.
    const int mats = 1 + !!spec.kq_pre + !!spec.head_pre + !!spec.kq_post + !!spec.head_post + (opt.dropout > 0.0f) +
                     (backward ? 2 : 0);
    long long per_head = mats * nn * static_cast<long long>(sizeof(T));
    if (backward && epi) per_head += (4LL * n * Dv + n) * static_cast<long long>(sizeof(T));
    if (backward) per_head += static_cast<long long>(wgrad_cols) * std::max(tiles, strips) * static_cast<long long>(sizeof(double));
    const long long per_unit = per_head * G;
    long long cu = std::max(1LL, workspace_budget() / per_unit);
    cu = std::min<long long>(cu, units);
    cu = std::min<long long>(cu, std::max(1, 16384 / G));  // cuBLAS batch and grid.z stay small
    chunk_units = static_cast<int>(cu);

    const long long heads = static_cast<long long>(chunk_units) * G;
    auto alloc = [&](long long count, size_t elem) -> void* {
      mem.emplace_back(static_cast<size_t>(count) * elem);
      return mem.back().template as<void>();
    };
    auto mat = [&]() { return static_cast<T*>(alloc(heads * nn, sizeof(T))); };
    s0 = mat();
    c = spec.kq_pre ? mat() : s0;
    a = spec.head_pre ? mat() : c;  // softmax runs in place on a (C is not needed later without head_pre)
    a2 = spec.kq_post ? mat() : a;
    a3 = spec.head_post ? mat() : a2;
    w = opt.dropout > 0.0f ? mat() : a3;
    if (backward) {
      g0 = mat(), g1 = mat();
      if (epi) {
        obuf = static_cast<T*>(alloc(heads * n * Dv, sizeof(T)));
        dobuf = static_cast<T*>(alloc(heads * n * Dv, sizeof(T)));
        if (spec.norm) pn = static_cast<T*>(alloc(heads * n * Dv, sizeof(T)));
        if (spec.gate) {
          pgw = static_cast<T*>(alloc(heads * n * Dv, sizeof(T)));
          pgb = static_cast<T*>(alloc(heads * n, sizeof(T)));
        }
      }
      if (wgrad_cols) partial = static_cast<double*>(alloc(heads * wgrad_cols * std::max(tiles, strips), sizeof(double)));
    }
  }

  long long elems(int nh) const { return static_cast<long long>(nh) * nn; }
  unsigned grid_elems(int nh) const { return grid_for(elems(nh), kBlock); }
  unsigned grid_rows(long long rows) const { return grid_for(rows, kWarpsPerBlock); }

  // The tiled kernels take the paper's sizes (cq <= 8, ck <= 15, g <= 16); larger ones the generic forms.
  static bool tiled(const KqConv& kc) { return kc.q <= kMaxCq && kc.k <= kMaxCk; }
  dim3 conv_grid(int nh) const {
    const unsigned t = static_cast<unsigned>((n + kConvTile - 1) / kConvTile);
    return dim3(t, t, static_cast<unsigned>(nh));
  }
  void conv_forward(const T* in, T* out, const T* W, const KqConv& kc, long long bh0, int nh) {
    if (tiled(kc))
      conv_tile_kernel<T, false><<<conv_grid(nh), dim3(kConvTile, kConvRowsPerPass), 0, stream>>>(
          in, out, W, kc.q, kc.k, kc.key_offset(), n, H, bh0);
    else
      conv_forward_generic_kernel<T><<<grid_elems(nh), kBlock, 0, stream>>>(in, out, W, kc.q, kc.k, kc.key_offset(),
                                                                            n, H, bh0, elems(nh));
    CUDA_CHECK_LAUNCH("conv_forward_kernel");
  }
  void conv_input_grad(const T* dout, T* din, const T* W, const KqConv& kc, long long bh0, int nh) {
    if (tiled(kc))
      conv_tile_kernel<T, true><<<conv_grid(nh), dim3(kConvTile, kConvRowsPerPass), 0, stream>>>(
          dout, din, W, kc.q, kc.k, kc.key_offset(), n, H, bh0);
    else
      conv_input_grad_generic_kernel<T><<<grid_elems(nh), kBlock, 0, stream>>>(dout, din, W, kc.q, kc.k,
                                                                               kc.key_offset(), n, H, bh0, elems(nh));
    CUDA_CHECK_LAUNCH("conv_input_grad_kernel");
  }
  void mix(const T* in, T* out, const T* M, int g, bool transpose, long long bh0, int nh) {
    if (g <= kMaxGroup)
      mix_heads_kernel<T><<<grid_for(elems(nh / g), kBlock), kBlock, 0, stream>>>(in, out, M, g, n, H, bh0, transpose,
                                                                                 elems(nh / g));
    else
      mix_heads_generic_kernel<T><<<grid_elems(nh), kBlock, 0, stream>>>(in, out, M, g, n, H, bh0, transpose, elems(nh));
    CUDA_CHECK_LAUNCH("mix_heads_kernel");
  }
  T keep_scale() const { return T(1) / (T(1) - static_cast<T>(opt.dropout)); }

  // The forward pass of the chunk's heads bh0 .. bh0+nh-1 up to the weights that multiply V (w).
  void scores(const T* q, const T* k, long long bh0, int nh) {
    const long long hs = static_cast<long long>(n) * D;
    // 1. Logits S = s Q K^T, future set to 0.
    gemm_rm<T>(blas, false, true, n, n, D, scale, q + bh0 * hs, D, hs, k + bh0 * hs, D, hs, s0, n, nn, nh);
    mask_future_kernel<T><<<grid_elems(nh), kBlock, 0, stream>>>(s0, n, elems(nh));
    CUDA_CHECK_LAUNCH("mask_future_kernel");
    // 2. Key-query convolution before softmax.
    if (spec.kq_pre) conv_forward(s0, c, p.kq_pre, *spec.kq_pre, bh0, nh);
    // 3. Head mixing before softmax.
    if (spec.head_pre) mix(c, a, p.head_pre, spec.head_pre->group, false, bh0, nh);
    // 4. Softmax (the second mask: the future part is excluded and written as 0).
    softmax_rows_kernel<T><<<grid_rows(nh * static_cast<long long>(n)), kBlock, 0, stream>>>(a, n, nh * static_cast<long long>(n));
    CUDA_CHECK_LAUNCH("softmax_rows_kernel");
    // 5. Key-query convolution after softmax, future 0.
    if (spec.kq_post) conv_forward(a, a2, p.kq_post, *spec.kq_post, bh0, nh);
    // 6. Head mixing after softmax.
    if (spec.head_post) mix(a2, a3, p.head_post, spec.head_post->group, false, bh0, nh);
    // Attention dropout on A3.
    if (opt.dropout > 0.0f) {
      dropout_kernel<T><<<grid_elems(nh), kBlock, 0, stream>>>(a3, w, n, bh0, opt.dropout_seed, opt.dropout,
                                                               keep_scale(), elems(nh));
      CUDA_CHECK_LAUNCH("dropout_kernel");
    }
  }

  void forward_chunk(const T* q, const T* k, const T* v, T* out, long long bh0, int nh) {
    scores(q, k, bh0, nh);
    const long long hsv = static_cast<long long>(n) * Dv;
    // 7. O = W V.
    gemm_rm<T>(blas, false, false, n, Dv, n, T(1), w, n, nn, v + bh0 * hsv, Dv, hsv, out + bh0 * hsv, Dv, hsv, nh);
    // 8-10. Epilogue, in place.
    if (epi) {
      const long long rows = static_cast<long long>(nh) * n;
      epilogue_forward_kernel<T><<<grid_rows(rows), kBlock, 0, stream>>>(out + bh0 * hsv, ep, Dv, rows);
      CUDA_CHECK_LAUNCH("epilogue_forward_kernel");
    }
  }

  // Weight gradients, stage 1 and 2: acc [H][C] += this chunk's terms.
  void conv_weight_grad(const T* in, const T* dout, const KqConv& kc, double* acc, long long bh0, int nh) {
    const int C = kc.q * kc.k;
    if (tiled(kc)) {
      conv_weight_grad_kernel<T><<<dim3(strips, nh), dim3(kConvTile, kConvRowsPerPass), 0, stream>>>(
          in, dout, partial, kc.q, kc.k, kc.key_offset(), n);
      CUDA_CHECK_LAUNCH("conv_weight_grad_kernel");
      reduce_partials(acc, C, bh0, nh, strips);
    } else {
      conv_weight_grad_generic_kernel<T><<<dim3(tiles, C, nh), kBlock, 0, stream>>>(in, dout, partial, kc.q, kc.k,
                                                                                     kc.key_offset(), n, rows_per_tile(n));
      CUDA_CHECK_LAUNCH("conv_weight_grad_generic_kernel");
      reduce_partials(acc, C, bh0, nh, tiles);
    }
  }
  void mix_weight_grad(const T* in, const T* dout, int g, double* acc, long long bh0, int nh) {
    if (g <= kMaxGroup) {
      mix_weight_grad_kernel<T><<<static_cast<unsigned>(static_cast<long long>(tiles) * nh), kBlock, 0, stream>>>(
          in, dout, partial, g, n, H, bh0, nh, rows_per_tile(n), tiles);
      CUDA_CHECK_LAUNCH("mix_weight_grad_kernel");
    } else {
      mix_weight_grad_generic_kernel<T><<<dim3(tiles, g, nh), kBlock, 0, stream>>>(in, dout, partial, g, n, H, bh0,
                                                                                    rows_per_tile(n));
      CUDA_CHECK_LAUNCH("mix_weight_grad_generic_kernel");
    }
    reduce_partials(acc, g, bh0, nh, tiles);
  }
  void reduce_partials(double* acc, int C, long long bh0, int nh, int count) {
    reduce_head_partials_kernel<<<grid_for(static_cast<long long>(H) * C, kBlock), kBlock, 0, stream>>>(
        partial, acc, nh, C, count, H, bh0);
    CUDA_CHECK_LAUNCH("reduce_head_partials_kernel");
  }
  void column_sum(const T* part, double* acc, long long rows, int cols) {
    column_sum_kernel<T><<<cols, kBlock, 0, stream>>>(part, acc, rows, cols);
    CUDA_CHECK_LAUNCH("column_sum_kernel");
  }
};

// Parameter-gradient accumulators in double, one device buffer, zeroed at the start of backward.
struct GradAcc {
  double *kq_pre = nullptr, *head_pre = nullptr, *kq_post = nullptr, *head_post = nullptr;
  double *norm = nullptr, *gw = nullptr, *gb = nullptr;
};

void clear_stale_error() { (void)cudaGetLastError(); }

void require_device() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    clear_stale_error();
    throw std::runtime_error(std::string("CUDA: no usable device (cudaGetDeviceCount: ") + cudaGetErrorString(err) + ")");
  }
  if (count == 0) throw std::runtime_error("CUDA: no device found");
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    clear_stale_error();
    return 0;
  }
  return count;
}

template <typename T>
void mta_forward(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const T* v,
                 const AttnParams<T>& params, T* out, const AttnOptions& opt, cudaStream_t stream) {
  check_attention_args(spec, dims);
  require_device();
  clear_stale_error();
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  BlasHandle& bh = blas_handle(device);
  std::lock_guard<std::mutex> lock(bh.m);
  CUBLAS_CHECK(cublasSetStream(bh.h, stream));

  Op<T> op(spec, dims, params, opt, stream, bh.h, /*backward=*/false);
  StreamDrain drain{stream};
  for (int u0 = 0; u0 < op.units; u0 += op.chunk_units) {
    const int nu = std::min(op.chunk_units, op.units - u0);
    op.forward_chunk(q, k, v, out, static_cast<long long>(u0) * op.G, nu * op.G);
  }
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

template <typename T>
void mta_backward(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const T* v,
                  const AttnParams<T>& p, const T* dout, T* dq, T* dk, T* dv, const AttnParamGrads<T>& grads,
                  const AttnOptions& opt, cudaStream_t stream) {
  check_attention_args(spec, dims);
  auto need = [](bool on, const T* ptr, const char* name) {
    if (on && !ptr) throw std::invalid_argument(std::string("mta_backward: missing gradient buffer for ") + name);
  };
  need(spec.kq_pre.has_value(), grads.kq_pre, "kq_pre");
  need(spec.head_pre.has_value(), grads.head_pre, "head_pre");
  need(spec.kq_post.has_value(), grads.kq_post, "kq_post");
  need(spec.head_post.has_value(), grads.head_post, "head_post");
  need(spec.norm, grads.norm, "norm");
  need(spec.gate, grads.gate_w, "gate_w");
  need(spec.gate, grads.gate_b, "gate_b");
  require_device();
  clear_stale_error();
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  BlasHandle& bh = blas_handle(device);
  std::lock_guard<std::mutex> lock(bh.m);
  CUBLAS_CHECK(cublasSetStream(bh.h, stream));

  Op<T> op(spec, dims, p, opt, stream, bh.h, /*backward=*/true);
  const int H = op.H, n = op.n, D = op.D, Dv = op.Dv;
  const long long nn = op.nn, hs = static_cast<long long>(n) * D, hsv = static_cast<long long>(n) * Dv;
  const int cpre = spec.kq_pre ? spec.kq_pre->q * spec.kq_pre->k : 0;
  const int cpost = spec.kq_post ? spec.kq_post->q * spec.kq_post->k : 0;
  const int gpre = spec.head_pre ? spec.head_pre->group : 0;
  const int gpost = spec.head_post ? spec.head_post->group : 0;

  // Double accumulators of the parameter gradients, in one buffer.
  const long long n_acc = static_cast<long long>(H) * (cpre + cpost + gpre + gpost) + (spec.norm ? Dv : 0) +
                          (spec.gate ? Dv + 1 : 0);
  DeviceMem acc_mem(static_cast<size_t>(std::max(1LL, n_acc)) * sizeof(double));
  GradAcc acc;
  {
    double* cur = acc_mem.as<double>();
    auto take = [&](long long count) {
      double* r = count ? cur : nullptr;
      cur += count;
      return r;
    };
    acc.kq_pre = take(static_cast<long long>(H) * cpre);
    acc.kq_post = take(static_cast<long long>(H) * cpost);
    acc.head_pre = take(static_cast<long long>(H) * gpre);
    acc.head_post = take(static_cast<long long>(H) * gpost);
    acc.norm = take(spec.norm ? Dv : 0);
    acc.gw = take(spec.gate ? Dv : 0);
    acc.gb = take(spec.gate ? 1 : 0);
  }
  StreamDrain drain{stream};
  if (n_acc) CUDA_CHECK(cudaMemsetAsync(acc_mem.as<double>(), 0, static_cast<size_t>(n_acc) * sizeof(double), stream));

  for (int u0 = 0; u0 < op.units; u0 += op.chunk_units) {
    const int nu = std::min(op.chunk_units, op.units - u0);
    const int nh = nu * op.G;
    const long long bh0 = static_cast<long long>(u0) * op.G;
    const long long rows = static_cast<long long>(nh) * n;
    op.scores(q, k, bh0, nh);

    // Through the epilogue: dO of A3 @ V, and the epilogue's parameter-gradient terms.
    const T* dO = dout + bh0 * hsv;
    if (op.epi) {
      gemm_rm<T>(op.blas, false, false, n, Dv, n, T(1), op.w, n, nn, v + bh0 * hsv, Dv, hsv, op.obuf, Dv, hsv, nh);
      epilogue_backward_kernel<T><<<op.grid_rows(rows), kBlock, 0, stream>>>(op.obuf, dO, op.dobuf, op.pn, op.pgw,
                                                                              op.pgb, op.ep, Dv, rows);
      CUDA_CHECK_LAUNCH("epilogue_backward_kernel");
      if (spec.norm) op.column_sum(op.pn, acc.norm, rows, Dv);
      if (spec.gate) op.column_sum(op.pgw, acc.gw, rows, Dv), op.column_sum(op.pgb, acc.gb, rows, 1);
      dO = op.dobuf;
    }
    // 7. dV = W^T dO, dA3 = dO V^T (causal part, through the dropout mask).
    gemm_rm<T>(op.blas, true, false, n, Dv, n, T(1), op.w, n, nn, dO, Dv, hsv, dv + bh0 * hsv, Dv, hsv, nh);
    gemm_rm<T>(op.blas, false, true, n, n, Dv, T(1), dO, Dv, hsv, v + bh0 * hsv, Dv, hsv, op.g0, n, nn, nh);
    grad_mask_kernel<T><<<op.grid_elems(nh), kBlock, 0, stream>>>(op.g0, n, bh0, opt.dropout > 0.0f, opt.dropout_seed,
                                                                  opt.dropout, op.keep_scale(), op.elems(nh));
    CUDA_CHECK_LAUNCH("grad_mask_kernel");
    T* cur = op.g0;
    T* other = op.g1;
    // 6. Head mixing after softmax: weight gradient, then dA2 = M^T-mix of dA3.
    if (spec.head_post) {
      op.mix_weight_grad(op.a2, cur, gpost, acc.head_post, bh0, nh);
      op.mix(cur, other, p.head_post, gpost, /*transpose=*/true, bh0, nh);
      std::swap(cur, other);
    }
    // 5. Key-query convolution after softmax.
    if (spec.kq_post) {
      const KqConv& kc = *spec.kq_post;
      op.conv_weight_grad(op.a, cur, kc, acc.kq_post, bh0, nh);
      op.conv_input_grad(cur, other, p.kq_post, kc, bh0, nh);
      std::swap(cur, other);
    }
    // 4. Softmax, in place: dC' = A * (dA - <dA, A>).
    softmax_backward_kernel<T><<<op.grid_rows(rows), kBlock, 0, stream>>>(op.a, cur, n, rows);
    CUDA_CHECK_LAUNCH("softmax_backward_kernel");
    // 3. Head mixing before softmax.
    if (spec.head_pre) {
      op.mix_weight_grad(op.c, cur, gpre, acc.head_pre, bh0, nh);
      op.mix(cur, other, p.head_pre, gpre, /*transpose=*/true, bh0, nh);
      std::swap(cur, other);
    }
    // 2. Key-query convolution before softmax (its input S0 is zero in the future part).
    if (spec.kq_pre) {
      const KqConv& kc = *spec.kq_pre;
      op.conv_weight_grad(op.s0, cur, kc, acc.kq_pre, bh0, nh);
      op.conv_input_grad(cur, other, p.kq_pre, kc, bh0, nh);
      std::swap(cur, other);
    }
    // 1. dq = s dS K, dk = s dS^T Q (dS is zero in the future part).
    gemm_rm<T>(op.blas, false, false, n, D, n, op.scale, cur, n, nn, k + bh0 * hs, D, hs, dq + bh0 * hs, D, hs, nh);
    gemm_rm<T>(op.blas, true, false, n, D, n, op.scale, cur, n, nn, q + bh0 * hs, D, hs, dk + bh0 * hs, D, hs, nh);
  }

  // Add the totals into the caller's gradients, each rounded once to T.
  auto put = [&](T* dst, const double* src, long long count, const char* name) {
    if (!count) return;
    add_gradient_kernel<T><<<grid_for(count, kBlock), kBlock, 0, stream>>>(dst, src, count);
    check_cuda(cudaGetLastError(), name, __FILE__, __LINE__);
  };
  put(grads.kq_pre, acc.kq_pre, spec.kq_pre ? static_cast<long long>(H) * cpre : 0, "add_gradient_kernel (kq_pre)");
  put(grads.kq_post, acc.kq_post, spec.kq_post ? static_cast<long long>(H) * cpost : 0, "add_gradient_kernel (kq_post)");
  put(grads.head_pre, acc.head_pre, spec.head_pre ? static_cast<long long>(H) * gpre : 0,
      "add_gradient_kernel (head_pre)");
  put(grads.head_post, acc.head_post, spec.head_post ? static_cast<long long>(H) * gpost : 0,
      "add_gradient_kernel (head_post)");
  put(grads.norm, acc.norm, spec.norm ? Dv : 0, "add_gradient_kernel (norm)");
  put(grads.gate_w, acc.gw, spec.gate ? Dv : 0, "add_gradient_kernel (gate_w)");
  put(grads.gate_b, acc.gb, spec.gate ? 1 : 0, "add_gradient_kernel (gate_b)");
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

template void mta_forward<float>(const AttentionSpec&, const AttnDims&, const float*, const float*, const float*,
                                 const AttnParams<float>&, float*, const AttnOptions&, cudaStream_t);
template void mta_forward<double>(const AttentionSpec&, const AttnDims&, const double*, const double*, const double*,
                                  const AttnParams<double>&, double*, const AttnOptions&, cudaStream_t);
template void mta_backward<float>(const AttentionSpec&, const AttnDims&, const float*, const float*, const float*,
                                  const AttnParams<float>&, const float*, float*, float*, float*,
                                  const AttnParamGrads<float>&, const AttnOptions&, cudaStream_t);
template void mta_backward<double>(const AttentionSpec&, const AttnDims&, const double*, const double*, const double*,
                                   const AttnParams<double>&, const double*, double*, double*, double*,
                                   const AttnParamGrads<double>&, const AttnOptions&, cudaStream_t);

}  // namespace mta::cuda
