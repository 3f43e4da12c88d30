// CUDA path of Multi-Token Attention, materialized: the T x T score matrices of a chunk of units live
// in device memory and every stage of docs/mta-semantics.md is its own kernel (or cuBLAS call),
// mirroring attention/mta_cpu.cpp stage by stage. See mta_cuda.h for the contract.
//
// Conventions (the same as the CPU reference): the T x T matrices are row-major, one per head of the
// chunk, stored back to back; a row block holds only some of their rows (Geom, Span below). Every
// stage writes whole rows of its output (0 in the future part j > i, up to the block's last key) and
// reads its inputs only in their causal part (j <= i) and in rows the block has computed, so no stage
// depends on what another left in the future part or in another block's rows. Chunk head x is global (batch*heads) index bh0 + x; a chunk always starts at
// a unit boundary (a multiple of spec.coupled_heads()), so the heads of a mixing group are consecutive
// inside the chunk.
#include "attention/mta_cuda.h"
#include "attention/epilogue.cuh"
#include "attention/row_blocks.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
#include "cuda/layers.h"
#include "cuda/phase_timer.h"

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
// Row blocks. The op walks the query rows in blocks (Op::R rows each): a block's T x T matrices hold
// only the rows it needs (its own rows plus halos for the key-query convolutions) and the key columns
// up to its last row, so device memory is O(rows per block x T) per head, not O(T^2), and the causal
// future past the block is neither stored nor computed.

// Where a block's matrices live: chunk head x, global row i (base <= i < base + cap), column j (< n)
// at buf[(x * cap + i - base) * n + j].
struct Geom {
  int n, base, cap;
  __host__ __device__ long long at(long long x, int i, int j) const {
    return (x * cap + (i - base)) * static_cast<long long>(n) + j;
  }
  __host__ __device__ long long per_head() const { return static_cast<long long>(cap) * n; }
};

// The rows [ra, rb) and the columns [0, cols) that a stage writes (the future part as 0).
struct Span {
  int ra, rb, cols;
  __host__ __device__ int rows() const { return rb - ra; }
  __host__ __device__ long long size(long long heads) const { return heads * (rb - ra) * static_cast<long long>(cols); }
};

// Element idx of a span over several heads -> (head x, row i, column j).
__device__ inline void span_pos(const Span& s, long long idx, long long& x, int& i, int& j) {
  const long long per = static_cast<long long>(s.rb - s.ra) * s.cols;
  x = idx / per;
  const long long r = idx % per;
  i = s.ra + static_cast<int>(r / s.cols);
  j = static_cast<int>(r % s.cols);
}

// ---------------------------------------------------------------------------------------------
// Stage kernels (docs/mta-semantics.md steps 1-7), each over a Span of the chunk's heads.

// 1. The first causal mask: the future part of the logits set to 0. Block (row sp.ra + blockIdx.x,
// chunk head blockIdx.y): only the row's future columns are touched.
template <typename T>
__global__ void mask_future_kernel(T* s, Geom g, Span sp) {
  const int i = sp.ra + static_cast<int>(blockIdx.x);
  T* row = s + g.at(blockIdx.y, i, 0);
  for (int j = i + 1 + static_cast<int>(threadIdx.x); j < sp.cols; j += blockDim.x) row[j] = T(0);
}

// Key-query convolution (steps 2 and 5) and its adjoint, on 32 x 32 output tiles: a block stages the
// tile's input window (the tile plus its halo of cq - 1 rows and ck - 1 columns) in shared memory,
// zero where the input is outside the sequence or in its future part, so the inner loop has no
// branches and every input element is read from device memory once per tile instead of cq * ck times.
// Block (column tile, row tile, chunk head x), kConvTile x kConvRowsPerPass threads.
constexpr int kConvTile = 32;
constexpr int kConvRowsPerPass = kBlock / kConvTile;  // 8: each thread computes 4 rows of its column
constexpr int kMaxCq = 8, kMaxCk = 15;                // the sizes the tiled kernels take
constexpr int kHaloRows = kConvTile + kMaxCq - 1, kHaloCols = kConvTile + kMaxCk - 1;

// Stages src rows r0 + r (r < rows), columns c0 + c (c < cols) of chunk head x into win (row pitch
// kHaloCols): 0 where the element is outside the sequence, in its future part (c0 + c > r0 + r), or
// in a row outside [rlo, rhi) (rows another block owns, or rows the buffer does not hold).
// W (the window's element type) may be wider than T: the values are converted once as they are staged.
// kPitch: the window's row pitch (elements).
template <typename T, typename W = T, int kPitch = kHaloCols>
__device__ inline void stage_causal_window(const T* __restrict__ src, Geom g, long long x, W* win, int r0, int c0,
                                           int rows, int cols, int rlo, int rhi) {
  for (int t = threadIdx.y * blockDim.x + threadIdx.x; t < rows * cols; t += blockDim.x * blockDim.y) {
    const int r = t / cols, c = t % cols;
    const int i = r0 + r, j = c0 + c;
    win[r * kPitch + c] = (i >= rlo && i < rhi && j >= 0 && j <= i) ? static_cast<W>(src[g.at(x, i, j)]) : W(0);
  }
}

// The convolution (kAdjoint = false): out[x][i][j] = sum_{a,c} W[h][a][c] * in[x][i-(cq-1)+a][j-o+c]
// for j <= i (0 in the future), reading `in` only in its causal part; W is [H][cq][ck], h the global
// head of chunk head x. Its adjoint with respect to the input (kAdjoint = true): out[x][ii][jj]
// (jj <= ii) = sum_{a,c} W[h][a][c] * in[x][ii+(cq-1)-a][jj+o-c]. Summed in the CPU's order (a, then
// c); the zeros staged for skipped inputs add nothing. `in` holds valid rows [in_lo, in_hi) (rows
// outside the sequence are 0); the caller makes sure the span reads no other rows of the sequence.
template <typename T, bool kAdjoint>
__global__ void __launch_bounds__(kBlock) conv_tile_kernel(const T* __restrict__ in, T* __restrict__ out,
                                                           const T* __restrict__ W, int cq, int ck, int o, Geom g,
                                                           Span sp, int in_lo, int in_hi, int H, long long bh0) {
  __shared__ T win[kHaloRows * kHaloCols];
  __shared__ T w[kMaxCq * kMaxCk];
  const long long x = blockIdx.z;
  const int i0 = sp.ra + blockIdx.y * kConvTile, j0 = blockIdx.x * kConvTile;
  if (j0 > i0 + kConvTile - 1) {  // wholly in the future
    for (int r = threadIdx.y; r < kConvTile; r += kConvRowsPerPass) {
      const int i = i0 + r, j = j0 + threadIdx.x;
      if (i < sp.rb && j < sp.cols) out[g.at(x, i, j)] = T(0);
    }
    return;
  }
  const int h = static_cast<int>((bh0 + x) % H);
  for (int t = threadIdx.y * blockDim.x + threadIdx.x; t < cq * ck; t += kBlock) w[t] = W[static_cast<long long>(h) * cq * ck + t];
  // The window: input rows i0 - (cq-1) .. i0 + 31 and columns j0 - o .. j0 + 31 - o + ck - 1 (forward);
  // rows i0 .. i0 + 31 + cq - 1 and columns j0 + o - (ck-1) .. j0 + 31 + o (adjoint).
  if (kAdjoint)
    stage_causal_window(in, g, x, win, i0, j0 + o - (ck - 1), kConvTile + cq - 1, kConvTile + ck - 1, in_lo, in_hi);
  else
    stage_causal_window(in, g, x, win, i0 - (cq - 1), j0 - o, kConvTile + cq - 1, kConvTile + ck - 1, in_lo, in_hi);
  __syncthreads();
  // Each thread's 4 rows (threadIdx.y + 8k) of its column at once, so one read of a weight serves 4
  // products (2 shared-memory reads per FMA before, 1.25 now). Every output keeps the same order of
  // terms (a, then c) and the same fused multiply-adds as one row at a time: the results are
  // bitwise those of the first version.
  constexpr int kRowsPerThread = kConvTile / kConvRowsPerPass;
  T acc[kRowsPerThread];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) acc[k] = T(0);
  for (int a = 0; a < cq; ++a)
    for (int c = 0; c < ck; ++c) {
      const T wv = w[a * ck + c];
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int r = threadIdx.y + k * kConvRowsPerPass;
        // Adjoint: input row i + (cq-1) - a is window row r + (cq-1) - a; column j + o - c is window
        // column threadIdx.x + (ck-1) - c.
        const T val = kAdjoint ? win[(r + cq - 1 - a) * kHaloCols + threadIdx.x + ck - 1 - c]
                               : win[(r + a) * kHaloCols + threadIdx.x + c];
        acc[k] += wv * val;
      }
    }
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int r = threadIdx.y + k * kConvRowsPerPass, i = i0 + r, j = j0 + threadIdx.x;
    if (i < sp.rb && j < sp.cols) out[g.at(x, i, j)] = j <= i ? acc[k] : T(0);
  }
}

// Head mixing (steps 3 and 6) over the causal part: out[x][i][j] = sum_y M[grp][xg][y] * in[x-xg+y][i][j]
// with hx = global head of x, grp = hx / g, xg = hx % g; M is [H/g][g][g]. With `transpose`, M[grp][y][xg]
// (the adjoint, used by backward). One thread per (group of the chunk, position): it reads the g
// inputs once and writes the g outputs, instead of each output re-reading all g inputs. Block
// (row sp.ra + blockIdx.x / col_blocks, kBlock columns from (blockIdx.x % col_blocks) * kBlock; group
// blockIdx.y of the chunk), the group's g x g weights read once into shared memory. (Measured as fast
// as the earlier grid-stride loop over flat indices, and 16-byte loads did not help either: the
// kernel is bound by its 2g memory streams, bench/RESULTS.md session 5.) Every output sums y = 0, 1, ...
constexpr int kMaxGroup = 16;  // the largest group the register-cached form takes
template <typename T>
__global__ void __launch_bounds__(kBlock) mix_heads_kernel(const T* __restrict__ in, T* __restrict__ out,
                                                           const T* __restrict__ M, int gsize, Geom g, Span sp, int H,
                                                           long long bh0, bool transpose, int col_blocks) {
  __shared__ T m[kMaxGroup * kMaxGroup];
  const int i = sp.ra + static_cast<int>(blockIdx.x / col_blocks);
  const int j = static_cast<int>(blockIdx.x % col_blocks) * kBlock + threadIdx.x;
  const long long x0 = static_cast<long long>(blockIdx.y) * gsize;  // first chunk head of the group
  const int grp = static_cast<int>((bh0 + x0) % H) / gsize;
  const T* mg = M + static_cast<long long>(grp) * gsize * gsize;
  for (int t = threadIdx.x; t < gsize * gsize; t += kBlock) {
    const int xg = t / gsize, y = t % gsize;
    m[xg * kMaxGroup + y] = transpose ? mg[y * gsize + xg] : mg[xg * gsize + y];
  }
  __syncthreads();
  if (j >= sp.cols) return;
  if (j > i) {
    for (int xg = 0; xg < gsize; ++xg) out[g.at(x0 + xg, i, j)] = T(0);
    return;
  }
  T v[kMaxGroup];
#pragma unroll
  for (int y = 0; y < kMaxGroup; ++y) v[y] = y < gsize ? in[g.at(x0 + y, i, j)] : T(0);
  for (int xg = 0; xg < gsize; ++xg) {
    T acc = T(0);
#pragma unroll
    for (int y = 0; y < kMaxGroup; ++y)
      if (y < gsize) acc += m[xg * kMaxGroup + y] * v[y];
    out[g.at(x0 + xg, i, j)] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Generic forms of the convolution and mixing stages, one thread per output element, for kernels
// larger than the tiled kernels take (cq > 8, ck > 15, g > 16: the spec allows them; the paper uses
// none). Same contracts as above; total = sp.size(chunk heads).

template <typename T, bool kAdjoint>
__global__ void conv_generic_kernel(const T* __restrict__ in, T* __restrict__ out, const T* __restrict__ W, int cq,
                                    int ck, int o, Geom g, Span sp, int in_lo, int in_hi, int H, long long bh0,
                                    long long total) {
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    long long x;
    int i, j;
    span_pos(sp, idx, x, i, j);
    T acc = T(0);
    if (j <= i) {
      const T* w = W + static_cast<long long>((bh0 + x) % H) * cq * ck;
      for (int a = 0; a < cq; ++a) {
        const int ii = kAdjoint ? i + (cq - 1) - a : i - (cq - 1) + a;
        if (ii < in_lo || ii >= in_hi) continue;
        for (int c = 0; c < ck; ++c) {
          const int jj = kAdjoint ? j + o - c : j - o + c;
          if (jj < 0 || jj > ii) continue;
          acc += w[a * ck + c] * in[g.at(x, ii, jj)];
        }
      }
    }
    out[g.at(x, i, j)] = acc;
  }
}

template <typename T>
__global__ void mix_heads_generic_kernel(const T* __restrict__ in, T* __restrict__ out, const T* __restrict__ M,
                                         int gsize, Geom g, Span sp, int H, long long bh0, bool transpose,
                                         long long total) {
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    long long x;
    int i, j;
    span_pos(sp, idx, x, i, j);
    T acc = T(0);
    if (j <= i) {
      const int hx = static_cast<int>((bh0 + x) % H);
      const int grp = hx / gsize, xg = hx % gsize;
      const T* m = M + static_cast<long long>(grp) * gsize * gsize;
      for (int y = 0; y < gsize; ++y) {
        const T w = transpose ? m[y * gsize + xg] : m[xg * gsize + y];
        acc += w * in[g.at(x - xg + y, i, j)];
      }
    }
    out[g.at(x, i, j)] = acc;
  }
}

// 4. Causal row softmax in place, in T's precision: one warp per row of the span (rows = heads *
// sp.rows()); the future part (up to sp.cols) is written as 0.
template <typename T>
__global__ void softmax_rows_kernel(T* a, Geom g, Span sp, long long rows) {
  const int lane = threadIdx.x & 31;
  for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
    const int i = sp.ra + static_cast<int>(r % sp.rows());
    T* p = a + g.at(r / sp.rows(), i, 0);
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
    for (int j = lane; j < sp.cols; j += 32) p[j] = j <= i ? p[j] * inv : T(0);
  }
}

// Softmax backward in place: d = A * (d - <d, A>) over j <= i, 0 in the future. One warp per row.
template <typename T>
__global__ void softmax_backward_kernel(const T* __restrict__ a, T* __restrict__ d, Geom g, Span sp, long long rows) {
  const int lane = threadIdx.x & 31;
  for (long long r = global_thread() >> 5; r < rows; r += grid_threads() >> 5) {
    const int i = sp.ra + static_cast<int>(r % sp.rows());
    const long long off = g.at(r / sp.rows(), i, 0);
    const T* ar = a + off;
    T* dr = d + off;
    T dot = T(0);
    for (int j = lane; j <= i; j += 32) dot += dr[j] * ar[j];
    dot = warp_sum(dot);
    for (int j = lane; j < sp.cols; j += 32) dr[j] = j <= i ? ar[j] * (dr[j] - dot) : T(0);
  }
}

// Attention dropout on A3 (forward): w = A3 * keep / (1 - p) over j <= i, 0 elsewhere. The mask is
// mta::dropout_keep of global (batch*heads) index bh0 + x, the CPU's.
template <typename T>
__global__ void dropout_kernel(const T* __restrict__ a3, T* __restrict__ w, Geom g, Span sp, long long bh0,
                               unsigned long long seed, float p, T keep_scale, long long total) {
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    long long x;
    int i, j;
    span_pos(sp, idx, x, i, j);
    const long long e = g.at(x, i, j);
    w[e] = (j <= i && dropout_keep(seed, bh0 + x, g.n, i, j, p)) ? a3[e] * keep_scale : T(0);
  }
}

// The gradient dA3 = dO V^T restricted to the causal part and, with dropout, through the mask. Block
// (row sp.ra + blockIdx.x, chunk head blockIdx.y), as mask_future_kernel.
template <typename T>
__global__ void grad_mask_kernel(T* d, Geom g, Span sp, long long bh0, bool dropout, unsigned long long seed, float p,
                                 T keep_scale) {
  const long long x = blockIdx.y;
  const int i = sp.ra + static_cast<int>(blockIdx.x);
  T* row = d + g.at(x, i, 0);
  for (int j = dropout ? static_cast<int>(threadIdx.x) : i + 1 + static_cast<int>(threadIdx.x); j < sp.cols;
       j += blockDim.x) {
    if (j > i)
      row[j] = T(0);
    else
      row[j] *= dropout_keep(seed, bh0 + x, g.n, i, j, p) ? keep_scale : T(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic parameter-gradient reductions: no atomics. Stage 1 writes one double partial per
// block; stage 2 sums the partials in a fixed order and adds into a double accumulator. Stage 1 sums
// over the rows [r0, r1) that the row block owns, so every (i, j) is counted once.

// Rows of the causal part that one block of a weight-gradient kernel covers.
int rows_per_tile(int n) { return std::max(1, 8192 / n); }

// Convolution weight gradient, stage 1, for cq <= 8, ck <= 15: block (strip of 32 owned rows, chunk
// head x) walks the causal 32 x 32 tiles of its rows, staging the tile of dout and the window of `in`
// it meets (as conv_tile_kernel), and sums dout[x][i][j] * in[x][i-(cq-1)+a][j-o+c] for every tap
// (a, c) at once: warp w owns taps w, w + 8, ...; lane = column. Each input is read from device memory
// once per tile instead of once per tap. The window is staged in double (converted once per element),
// so each term is one double FMA. It is bound by its shared-memory reads (one 8-byte read per FMA);
// conv_fixed.cuh has the register-blocked form for the paper's sizes. partial[(x * cq*ck + ac) * strips + strip].
constexpr int kMaxTapsPerWarp = (kMaxCq * kMaxCk + kConvRowsPerPass - 1) / kConvRowsPerPass;  // 15
template <typename T>
__global__ void __launch_bounds__(kBlock) conv_weight_grad_kernel(const T* __restrict__ in, const T* __restrict__ dout,
                                                                  double* __restrict__ partial, int cq, int ck, int o,
                                                                  Geom g, int r0, int r1, int in_lo, int in_hi) {
  __shared__ double win[kHaloRows * kHaloCols];
  __shared__ T dtile[kConvTile * kHaloCols];
  const int strip = blockIdx.x;
  const long long x = blockIdx.y;
  const int i0 = r0 + strip * kConvTile, C = cq * ck, lane = threadIdx.x, warp = threadIdx.y;
  int off[kMaxTapsPerWarp];  // window offset of each of this warp's taps
#pragma unroll
  for (int t = 0; t < kMaxTapsPerWarp; ++t) {
    const int ac = warp + kConvRowsPerPass * t;
    off[t] = ac < C ? (ac / ck) * kHaloCols + ac % ck : 0;
  }
  double acc[kMaxTapsPerWarp] = {};
  for (int j0 = 0; j0 <= i0 + kConvTile - 1 && j0 < g.n; j0 += kConvTile) {
    __syncthreads();  // the previous tile's reads are done
    stage_causal_window(dout, g, x, dtile, i0, j0, kConvTile, kConvTile, r0, r1);
    stage_causal_window(in, g, x, win, i0 - (cq - 1), j0 - o, kConvTile + cq - 1, kConvTile + ck - 1, in_lo, in_hi);
    __syncthreads();
    for (int r = 0; r < kConvTile; ++r) {
      const double d = static_cast<double>(dtile[r * kHaloCols + lane]);
      const double* wrow = win + r * kHaloCols + lane;
#pragma unroll
      for (int t = 0; t < kMaxTapsPerWarp; ++t)
        if (warp + kConvRowsPerPass * t < C) acc[t] = fma(d, wrow[off[t]], acc[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxTapsPerWarp; ++t) {
    const int ac = warp + kConvRowsPerPass * t;
    const double v = warp_sum(acc[t]);
    if (ac < C && lane == 0) partial[(x * C + ac) * gridDim.x + strip] = v;
  }
}

// The same two kernels for the paper's kernel sizes, compiled for them (float32).
#include "attention/conv_fixed.cuh"

// Head-mixing weight gradient, stage 1, for g <= 16: block (chunk head x, tile of owned rows) sums
// dout[x][i][j] * in[x-xg+y][i][j] over its rows and j <= i for every y of x's group at once (dout read
// once, not g times). Blocks are numbered with x fastest (blockIdx.x = tile * nh + x), so the g blocks
// of one group and tile, which read the same inputs, run close together and share them in L2.
// partial[(x * g + y) * tiles + tile].
template <typename T>
__global__ void __launch_bounds__(kBlock) mix_weight_grad_kernel(const T* __restrict__ in, const T* __restrict__ dout,
                                                                 double* __restrict__ partial, int gsize, Geom g, int r0,
                                                                 int r1, int H, long long bh0, int nh, int rows_tile,
                                                                 int tiles) {
  __shared__ double red[kMaxGroup][kWarpsPerBlock];
  const long long x = blockIdx.x % nh;
  const int tile = static_cast<int>(blockIdx.x / nh);
  const int xg = static_cast<int>((bh0 + x) % H) % gsize;
  const int i0 = r0 + tile * rows_tile, i1 = min(r1, i0 + rows_tile);
  double s[kMaxGroup] = {};
  // Row by row over the causal columns only (no 64-bit division per element, no idle threads on the
  // masked future).
  for (int i = i0; i < i1; ++i)
    for (int j = threadIdx.x; j <= i && j < g.n; j += blockDim.x) {
      const T av = dout[g.at(x, i, j)];
#pragma unroll
      for (int y = 0; y < kMaxGroup; ++y)
        if (y < gsize) s[y] += static_cast<double>(av * in[g.at(x - xg + y, i, j)]);
    }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int y = 0; y < kMaxGroup; ++y) {
    const double v = warp_sum(s[y]);
    if (y < gsize && lane == 0) red[y][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < gsize) {
    double v = 0.0;
    for (int w = 0; w < kWarpsPerBlock; ++w) v += red[threadIdx.x][w];
    partial[(x * gsize + threadIdx.x) * tiles + tile] = v;
  }
}

// Head-mixing weight gradient, stage 1, for g <= 8: block (group u of the chunk, tile of owned rows);
// each thread takes positions and sums all g x g terms dout[x0+x][i][j] * in[x0+y][i][j] of its
// group, so every value is read once (the form above reads each input once per member of the group).
// A thread's sums are in T: a tile holds ~8192 positions (rows_per_tile), so each float sum has ~32
// terms (~1e-7 relative); they are converted to double for the sums over threads and tiles. (Double
// accumulators, 128 registers for g = 8, held one block per SM and ran at ~3% of the FP64 rate.)
// Chunks start at a unit, so x0 = u * g is a group's first head. partial[(x * g + y) * tiles + tile],
// as the form above. kG: the group size rounded up to 2, 4 or 8.
constexpr int kMaxPairGroup = 8;
template <typename T, int kG>
__global__ void __launch_bounds__(kBlock) mix_weight_grad_pairs_kernel(const T* __restrict__ in, const T* __restrict__ dout,
                                                                       double* __restrict__ partial, int gsize, Geom g,
                                                                       int r0, int r1, int groups, int rows_tile,
                                                                       int tiles) {
  __shared__ double red[kG * kG][kWarpsPerBlock];
  const long long u = blockIdx.x % groups, x0 = u * gsize;
  const int tile = static_cast<int>(blockIdx.x / groups);
  const int i0 = r0 + tile * rows_tile, i1 = min(r1, i0 + rows_tile);
  T s[kG][kG] = {};
  for (int i = i0; i < i1; ++i)
    for (int j = threadIdx.x; j <= i && j < g.n; j += blockDim.x) {
      T dv[kG], iv[kG];
#pragma unroll
      for (int x = 0; x < kG; ++x) {
        dv[x] = x < gsize ? dout[g.at(x0 + x, i, j)] : T(0);
        iv[x] = x < gsize ? in[g.at(x0 + x, i, j)] : T(0);
      }
#pragma unroll
      for (int x = 0; x < kG; ++x)
#pragma unroll
        for (int y = 0; y < kG; ++y) s[x][y] = fma(dv[x], iv[y], s[x][y]);
    }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int x = 0; x < kG; ++x)
#pragma unroll
    for (int y = 0; y < kG; ++y) {
      const double v = warp_sum(static_cast<double>(s[x][y]));
      if (lane == 0) red[x * kG + y][warp] = v;
    }
  __syncthreads();
  for (int p = threadIdx.x; p < gsize * gsize; p += blockDim.x) {
    const int x = p / gsize, y = p % gsize;
    double v = 0.0;
    for (int w = 0; w < kWarpsPerBlock; ++w) v += red[x * kG + y][w];
    partial[((x0 + x) * gsize + y) * tiles + tile] = v;
  }
}

// Generic forms (cq > 8, ck > 15, g > 16). Convolution weight gradient, stage 1: block (tile, a*ck+c, x)
// sums dout[x][i][j] * in[x][i-(cq-1)+a][j-o+c] over its owned rows i and j <= i (inputs read only
// where causal). partial[(x * cq*ck + ac) * tiles + tile].
template <typename T>
__global__ void conv_weight_grad_generic_kernel(const T* __restrict__ in, const T* __restrict__ dout,
                                                double* __restrict__ partial, int cq, int ck, int o, Geom g, int r0,
                                                int r1, int rows_tile) {
  const int tile = blockIdx.x, ac = blockIdx.y;
  const long long x = blockIdx.z;
  const int a = ac / ck, c = ac % ck, shift = c - o;
  const int i0 = r0 + tile * rows_tile, i1 = min(r1, i0 + rows_tile);
  const long long count = static_cast<long long>(i1 - i0) * g.n;
  double s = 0.0;
  for (long long t = threadIdx.x; t < count; t += blockDim.x) {
    const int i = i0 + static_cast<int>(t / g.n), j = static_cast<int>(t % g.n);
    if (j > i) continue;
    const int ii = i - (cq - 1) + a;
    if (ii < 0) continue;
    const int jj = j + shift;
    if (jj < 0 || jj > ii) continue;
    s += static_cast<double>(dout[g.at(x, i, j)] * in[g.at(x, ii, jj)]);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[(x * gridDim.y + ac) * gridDim.x + tile] = s;
}

// Head-mixing weight gradient, generic form: block (tile, y, x) sums dout[x][i][j] * in[x-xg+y][i][j]
// over its owned rows and j <= i. partial[(x * g + y) * tiles + tile].
template <typename T>
__global__ void mix_weight_grad_generic_kernel(const T* __restrict__ in, const T* __restrict__ dout,
                                               double* __restrict__ partial, int gsize, Geom g, int r0, int r1, int H,
                                               long long bh0, int rows_tile) {
  const int tile = blockIdx.x, y = blockIdx.y;
  const long long x = blockIdx.z;
  const int xg = static_cast<int>((bh0 + x) % H) % gsize;
  const int i0 = r0 + tile * rows_tile, i1 = min(r1, i0 + rows_tile);
  const long long count = static_cast<long long>(i1 - i0) * g.n;
  double s = 0.0;
  for (long long t = threadIdx.x; t < count; t += blockDim.x) {
    const int i = i0 + static_cast<int>(t / g.n), j = static_cast<int>(t % g.n);
    if (j > i) continue;
    s += static_cast<double>(dout[g.at(x, i, j)] * in[g.at(x - xg + y, i, j)]);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[(x * gsize + y) * gridDim.x + tile] = s;
}

// Stage 2 of both: acc[h][col] += sum over the chunk's heads x of global head h and over the tiles of
// partial[(x * C + col) * tiles + tile]: one warp per (h, col), lane l taking the (x, tile) pairs
// l, l + 32, ... in ascending order, then the fixed shuffle tree (deterministic). (One thread per
// (h, col), the first version, ran as a single block: ~0.1 ms per call.)
__global__ void reduce_head_partials_kernel(const double* __restrict__ partial, double* __restrict__ acc, int nh, int C,
                                            int tiles, int H, long long bh0) {
  const long long total = static_cast<long long>(H) * C;
  const int lane = threadIdx.x & 31;
  for (long long idx = global_thread() >> 5; idx < total; idx += grid_threads() >> 5) {
    const int h = static_cast<int>(idx / C), col = static_cast<int>(idx % C);
    const int x0 = static_cast<int>(((h - bh0 % H) % H + H) % H);
    const int nx = x0 < nh ? (nh - x0 + H - 1) / H : 0;  // heads x0, x0 + H, ... < nh
    double s = 0.0;
    for (long long e = lane; e < static_cast<long long>(nx) * tiles; e += 32) {
      const long long x = x0 + (e / tiles) * H, t = e % tiles;
      s += partial[(x * C + col) * tiles + t];
    }
    s = warp_sum(s);
    if (lane == 0) acc[idx] += s;
  }
}


// ---------------------------------------------------------------------------------------------
// Host side.

// Workspace bytes of the current (then last) op call on this thread: mta_last_workspace_bytes().
thread_local size_t t_workspace_bytes = 0;

// The op's device workspace: one grow-only buffer per device and role, kept between calls. A training
// step calls the op twice per MTA layer, and allocating and freeing its gigabytes each time (cudaFree
// synchronizes the device) costs more than some of the work. Calls on a device hold its handle's mutex
// (DeviceState below), so one call at a time uses a device's buffers, and each call drains its stream
// before returning, so the next call may reuse them. Kept for the process, as the cuBLAS handle.
class Workspace {
 public:
  void* get(size_t bytes) {
    t_workspace_bytes += bytes;
    if (bytes > cap_) {
      if (p_) CUDA_CHECK(cudaFree(p_));
      p_ = nullptr, cap_ = 0;
      CUDA_CHECK(cudaMalloc(&p_, bytes));
      cap_ = bytes;
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};

// On every exit of an op call, normal or by exception, the stream is drained before the workspace its
// work uses can be handed to the next call.
struct StreamDrain {
  cudaStream_t s;
  ~StreamDrain() { cudaStreamSynchronize(s); }
};

// One cuBLAS handle and the workspace buffers per device, created on first use and kept for the
// process (destroying them at exit could run after the CUDA runtime has shut down). Calls on one device
// hold its mutex.
struct BlasHandle {
  cublasHandle_t h = nullptr;
  std::mutex m;
  Workspace mats, acc;  // the op's matrices and partial sums; the backward pass's gradient accumulators
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
// C = alpha * op(A) @ op(B) + beta * C, op(A) is M x K, op(B) is K x N. cuBLAS is column-major, and a row-major
// matrix is its transpose in column-major, so this computes C^T = op(B)^T op(A)^T.
template <typename T>
void gemm_rm(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, long long sA,
             const T* B, int ldb, long long sB, T* C, int ldc, long long sC, int batch, T beta = T(0)) {
  if (M <= 0 || N <= 0) return;
  CUBLAS_CHECK(gemm_strided_batched<T>(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                                       &alpha, B, ldb, sB, A, lda, sA, &beta, C, ldc, sC, batch));
}

// gemm_rm with bf16 operands and a float32 result (tensor cores, fp32 accumulation): the products of
// AttnOptions::bf16_products.
using bf16 = __nv_bfloat16;
void gemm16_rm(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, float alpha, const bf16* A, int lda,
               long long sA, const bf16* B, int ldb, long long sB, float* C, int ldc, long long sC, int batch,
               float beta = 0.0f) {
  if (M <= 0 || N <= 0) return;
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                                          &alpha, B, CUDA_R_16BF, ldb, sB, A, CUDA_R_16BF, lda, sA, &beta, C,
                                          CUDA_R_32F, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// p + o for a bf16 copy that may be absent (no arithmetic on a null pointer).
inline const bf16* off16(const bf16* p, long long o) { return p ? p + o : nullptr; }

// A span's rows of chunk head blockIdx.y as bf16 for gemm16_rm (block per row, as mask_future_kernel),
// at the same offsets in dst (a buffer of the same geometry). Whole tensors go through
// cuda::cast_to_bf16 (cuda/layers.h).
__global__ void cast_span_bf16_kernel(const float* __restrict__ src, bf16* __restrict__ dst, Geom g, Span sp) {
  const long long off = g.at(blockIdx.y, sp.ra + static_cast<int>(blockIdx.x), 0);
  for (int j = threadIdx.x; j < sp.cols; j += blockDim.x) dst[off + j] = __float2bfloat16(src[off + j]);
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

// Everything one op call shares between its chunks and row blocks.
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
  T scale;
  bool epi;
  Epilogue<T> ep;
  // Row blocks: R owned rows each; hq, hp = the query halos of kq_pre and kq_post (cq - 1, or 0).
  // A block holds rows from r0 - (hq + hp) to r1 (forward) or r1 + hq + hp (backward): cap rows.
  int R = 0, hq = 0, hp = 0, cap = 0;
  int part_cols = 1;  // partial sums per (head, weight-gradient column): the most strips / tiles of a block
  int wgrad_cols = 0;  // the largest C of the weight-gradient partials (cq*ck or g), 0 when none
  PhaseTimer* prof = nullptr;  // MTA_CUDA_PROFILE=1: time by stage (op_profiler())
  // The compile-time-size convolution kernels (conv_fixed.cuh) where they exist; MTA_CUDA_GENERIC_CONV=1
  // takes the runtime-size forms instead (the tests compare the two).
  const bool fixed_conv = [] {
    const char* e = std::getenv("MTA_CUDA_GENERIC_CONV");
    return !(e && e[0] == '1');
  }();
  void mark(const char* name) const {
    if (prof) prof->mark((std::string(backward ? "bwd " : "fwd ") + name).c_str(), stream);
  }

  // Per-chunk buffers, sized for chunk_units units; the views alias as on the CPU.
  T *s0 = nullptr, *c = nullptr, *a = nullptr, *a2 = nullptr, *a3 = nullptr, *w = nullptr;
  T *g0 = nullptr, *g1 = nullptr;                                           // backward: ping-pong gradients
  T *obuf = nullptr, *dobuf = nullptr, *pn = nullptr, *pgw = nullptr, *pgb = nullptr;  // backward epilogue
  double* partial = nullptr;                                                // weight-gradient partials
  // AttnOptions::bf16_products (float32 only): bf16 copies of q and k (whole tensors, made once per
  // call); a row block's dS goes as bf16 into the free ping-pong gradient buffer (cast_span).
  bool use_bf16 = false;
  bf16 *q16 = nullptr, *k16 = nullptr;
  double* colpart = nullptr;  // the epilogue's column-sum partials (kColumnBlocks x Dv)

  // One row block (attention/row_blocks.h) and where its rows live.
  struct Block : RowBlock {
    Geom g;
  };
  Block block(int r0) const {
    Block b;
    static_cast<RowBlock&>(b) = row_block(n, R, hq, hp, r0, backward);
    b.g = Geom{n, b.base, cap};
    return b;
  }

  Op(const AttentionSpec& s, const AttnDims& d, const AttnParams<T>& params, const AttnOptions& o, cudaStream_t st,
     cublasHandle_t h, Workspace& ws, bool bwd)
      : spec(s), dims(d), opt(o), p(params), stream(st), blas(h), backward(bwd) {
    n = dims.T, D = dims.D, Dv = dims.dv(), H = dims.H, G = spec.coupled_heads();
    units = dims.B * (H / G);
    scale = T(1) / std::sqrt(T(D));
    epi = epilogue_enabled(spec);
    ep.norm = spec.norm, ep.depth = spec.depth_scale_layer.has_value(), ep.gate = spec.gate;
    ep.ds = static_cast<T>(spec.depth_scale());
    ep.gn = p.norm, ep.gw = p.gate_w, ep.gb = p.gate_b;
    if (spec.kq_pre) hq = spec.kq_pre->q - 1, wgrad_cols = std::max(wgrad_cols, spec.kq_pre->q * spec.kq_pre->k);
    if (spec.kq_post) hp = spec.kq_post->q - 1, wgrad_cols = std::max(wgrad_cols, spec.kq_post->q * spec.kq_post->k);
    if (spec.head_pre) wgrad_cols = std::max(wgrad_cols, spec.head_pre->group);
    if (spec.head_post) wgrad_cols = std::max(wgrad_cols, spec.head_post->group);
    const int halo = row_block_capacity(n, 0, hq, hp, backward);

    // The T x T matrices of a chunk stay under the budget: first the rows per block, then the units.
    use_bf16 = opt.bf16_products && std::is_same_v<T, float>;
    const int mats = 1 + !!spec.kq_pre + !!spec.head_pre + !!spec.kq_post + !!spec.head_post + (opt.dropout > 0.0f) +
                     (backward ? 2 : 0);
    const long long budget = workspace_budget();
    const long long row_bytes = static_cast<long long>(mats) * G * n * static_cast<long long>(sizeof(T));
    R = row_block_rows(n, std::max(1LL, budget / row_bytes - halo));
    cap = row_block_capacity(n, R, hq, hp, backward);
    part_cols = std::max((R + kConvTile - 1) / kConvTile, (R + rows_per_tile(n) - 1) / rows_per_tile(n));
    const int erows = std::min(n, R + (backward ? hq + hp : 0));  // rows of the backward epilogue buffers
    long long per_head = mats * static_cast<long long>(cap) * n * static_cast<long long>(sizeof(T));
    if (backward && epi) per_head += (4LL * erows * Dv + erows) * static_cast<long long>(sizeof(T));
    if (backward) per_head += static_cast<long long>(wgrad_cols) * part_cols * static_cast<long long>(sizeof(double));
    const long long per_unit = per_head * G;
    long long cu = std::max(1LL, budget / per_unit);
    cu = std::min<long long>(cu, units);
    cu = std::min<long long>(cu, std::max(1, 16384 / G));  // cuBLAS batch and grid.z stay small
    chunk_units = static_cast<int>(cu);

    // The buffers, carved out of the device's workspace: `carve` lays them out from `base` and returns
    // the bytes they take; it runs once to size the workspace and once to place them.
    const long long heads = static_cast<long long>(chunk_units) * G;
    auto carve = [&](uintptr_t base) {
      size_t off = 0;
      auto alloc = [&](long long count, size_t elem) -> void* {
        void* r = reinterpret_cast<void*>(base + off);
        off += (static_cast<size_t>(count) * elem + 255) / 256 * 256;
        return r;
      };
      auto mat = [&]() { return static_cast<T*>(alloc(heads * cap * static_cast<long long>(n), sizeof(T))); };
      s0 = mat();
      c = spec.kq_pre ? mat() : s0;
      a = spec.head_pre ? mat() : c;  // softmax runs in place on a (C is not needed later without head_pre)
      a2 = spec.kq_post ? mat() : a;
      a3 = spec.head_post ? mat() : a2;
      w = opt.dropout > 0.0f ? mat() : a3;
      if (backward) {
        g0 = mat(), g1 = mat();
        if (epi) {
          obuf = static_cast<T*>(alloc(heads * erows * Dv, sizeof(T)));
          dobuf = static_cast<T*>(alloc(heads * erows * Dv, sizeof(T)));
          if (spec.norm) pn = static_cast<T*>(alloc(heads * erows * Dv, sizeof(T)));
          if (spec.gate) {
            pgw = static_cast<T*>(alloc(heads * erows * Dv, sizeof(T)));
            pgb = static_cast<T*>(alloc(heads * erows, sizeof(T)));
          }
          colpart = static_cast<double*>(alloc(static_cast<long long>(kColumnBlocks) * Dv, sizeof(double)));
        }
        if (wgrad_cols) partial = static_cast<double*>(alloc(heads * wgrad_cols * part_cols, sizeof(double)));
      }
      if (use_bf16) {
        const long long all = static_cast<long long>(dims.B) * H * n;
        q16 = static_cast<bf16*>(alloc(all * D, sizeof(bf16)));
        k16 = static_cast<bf16*>(alloc(all * D, sizeof(bf16)));
      }
      return off;
    };
    carve(reinterpret_cast<uintptr_t>(ws.get(carve(0))));
  }

  // Rows per block: MTA_CUDA_ROW_BLOCK when set (the tests use it), else a quarter of T (rounded up to
  // 32) once T > 256 -- the blocks skip most of the causal future, and smaller blocks only add
  // launches and halo rows -- and never more than `fit` rows (the budget).
  static int row_block_rows(int n, long long fit) {
    long long r = n <= 256 ? n : ((n + 3) / 4 + kConvTile - 1) / kConvTile * kConvTile;
    if (const char* e = std::getenv("MTA_CUDA_ROW_BLOCK")) {
      char* end = nullptr;
      const long long v = std::strtoll(e, &end, 10);
      if (end != e && v > 0) r = v;
    }
    r = std::min(r, std::max(fit, static_cast<long long>(kConvTile)));
    return static_cast<int>(std::clamp<long long>(r, 1, n));
  }

  unsigned grid_span(const Span& sp, long long heads) const { return grid_for(sp.size(heads), kBlock); }
  unsigned grid_rows(long long rows) const { return grid_for(rows, kWarpsPerBlock); }

  // The whole q and k as bf16 (once per call).
  void cast_inputs(const T* q, const T* k) const {
    if constexpr (std::is_same_v<T, float>) {
      if (!use_bf16) return;
      const long long all = static_cast<long long>(dims.B) * H * n * D;
      cast_to_bf16(q, q16, all, stream), cast_to_bf16(k, k16, all, stream);
    }
  }
  // gemm_rm, or with bf16_products gemm16_rm on the bf16 copies A16, B16 (same offsets as A, B) when
  // the caller gives them.
  void mm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, const bf16* A16, int lda, long long sA,
          const T* B, const bf16* B16, int ldb, long long sB, T* C, int ldc, long long sC, int batch,
          T beta = T(0)) const {
    if constexpr (std::is_same_v<T, float>) {
      if (use_bf16 && A16 && B16)
        return gemm16_rm(blas, ta, tb, M, N, K, alpha, A16, lda, sA, B16, ldb, sB, C, ldc, sC, batch, beta);
    }
    gemm_rm<T>(blas, ta, tb, M, N, K, alpha, A, lda, sA, B, ldb, sB, C, ldc, sC, batch, beta);
  }
  // A span of a chunk matrix as bf16 into dst, a chunk matrix buffer (at the same element offsets: the
  // bf16 copy takes half of its bytes).
  void cast_span(const T* src, T* dst, const Block& b, Span sp, int nh) const {
    if constexpr (std::is_same_v<T, float>) {
      if (sp.rows() <= 0) return;
      cast_span_bf16_kernel<<<dim3(sp.rows(), nh), kBlock, 0, stream>>>(src, reinterpret_cast<bf16*>(dst), b.g, sp);
      CUDA_CHECK_LAUNCH("cast_span_bf16_kernel");
    }
  }

  // The tiled kernels take the paper's sizes (cq <= 8, ck <= 15, g <= 16); larger ones the generic forms.
  static bool tiled(const KqConv& kc) { return kc.q <= kMaxCq && kc.k <= kMaxCk; }
  // The convolution (or its adjoint) of `in`, whose rows [in_lo, in_hi) are valid, into the span of out.
  template <bool kAdjoint>
  void conv(const T* in, T* out, const T* W, const KqConv& kc, const Block& b, Span sp, int in_lo, int in_hi,
            long long bh0, int nh) {
    if (sp.rows() <= 0) return;
    if constexpr (std::is_same_v<T, float>) {
      const bool fixed = fixed_conv && with_fixed_conv(kc.q, kc.k, [&]<int CQ, int CK>() {
        const dim3 grid((sp.cols + kFixCols - 1) / kFixCols, (sp.rows() + kFixRows - 1) / kFixRows, nh);
        conv_fixed_kernel<CQ, CK, kAdjoint><<<grid, kBlock, 0, stream>>>(in, out, W, kc.key_offset(), b.g, sp, in_lo,
                                                                         in_hi, H, bh0);
      });
      if (fixed) {
        CUDA_CHECK_LAUNCH("conv_fixed_kernel");
        return;
      }
    }
    if (tiled(kc)) {
      const dim3 grid((sp.cols + kConvTile - 1) / kConvTile, (sp.rows() + kConvTile - 1) / kConvTile, nh);
      conv_tile_kernel<T, kAdjoint><<<grid, dim3(kConvTile, kConvRowsPerPass), 0, stream>>>(
          in, out, W, kc.q, kc.k, kc.key_offset(), b.g, sp, in_lo, in_hi, H, bh0);
    } else {
      conv_generic_kernel<T, kAdjoint><<<grid_span(sp, nh), kBlock, 0, stream>>>(
          in, out, W, kc.q, kc.k, kc.key_offset(), b.g, sp, in_lo, in_hi, H, bh0, sp.size(nh));
    }
    CUDA_CHECK_LAUNCH("conv_tile_kernel");
  }
  void mix(const T* in, T* out, const T* M, int gs, bool transpose, const Block& b, Span sp, long long bh0, int nh) {
    if (sp.rows() <= 0) return;
    if (gs <= kMaxGroup) {
      const int col_blocks = (sp.cols + kBlock - 1) / kBlock;
      const dim3 grid(static_cast<unsigned>(static_cast<long long>(sp.rows()) * col_blocks),
                      static_cast<unsigned>(nh / gs));
      mix_heads_kernel<T><<<grid, kBlock, 0, stream>>>(in, out, M, gs, b.g, sp, H, bh0, transpose, col_blocks);
    } else
      mix_heads_generic_kernel<T><<<grid_span(sp, nh), kBlock, 0, stream>>>(in, out, M, gs, b.g, sp, H, bh0, transpose,
                                                                            sp.size(nh));
    CUDA_CHECK_LAUNCH("mix_heads_kernel");
  }
  T keep_scale() const { return T(1) / (T(1) - static_cast<T>(opt.dropout)); }

  // The forward pass of the chunk's heads bh0 .. bh0+nh-1 for block b, up to the weights that multiply
  // V (w): S0 for rows [base, end), C, C' and A for rows [r0 - hp, end), A2, A3 and w for [r0, end).
  void scores(const T* q, const T* k, const Block& b, long long bh0, int nh) {
    const long long hs = static_cast<long long>(n) * D, stride = b.g.per_head();
    // 1. Logits S = s Q K^T, future set to 0.
    const long long qoff = bh0 * hs + static_cast<long long>(b.base) * D;
    mm(false, true, b.end - b.base, b.end, D, scale, q + qoff, off16(q16, qoff), D, hs, k + bh0 * hs,
       off16(k16, bh0 * hs), D, hs, s0, n, stride, nh);
    const Span all{b.base, b.end, b.end};
    if (all.rows() > 0) mask_future_kernel<T><<<dim3(all.rows(), nh), kBlock, 0, stream>>>(s0, b.g, all);
    CUDA_CHECK_LAUNCH("mask_future_kernel");
    mark("scores QK^T");
    const Span pre{b.pre, b.end, b.end};
    // 2. Key-query convolution before softmax.
    if (spec.kq_pre) {
      conv<false>(s0, c, p.kq_pre, *spec.kq_pre, b, pre, b.base, b.end, bh0, nh);
      mark("scores kq_pre");
    }
    // 3. Head mixing before softmax.
    if (spec.head_pre) {
      mix(c, a, p.head_pre, spec.head_pre->group, false, b, pre, bh0, nh);
      mark("scores head_pre");
    }
    // 4. Softmax (the second mask: the future part is excluded and written as 0).
    const long long rows = static_cast<long long>(nh) * pre.rows();
    softmax_rows_kernel<T><<<grid_rows(rows), kBlock, 0, stream>>>(a, b.g, pre, rows);
    CUDA_CHECK_LAUNCH("softmax_rows_kernel");
    mark("scores softmax");
    const Span post{b.r0, b.end, b.end};
    // 5. Key-query convolution after softmax, future 0.
    if (spec.kq_post) {
      conv<false>(a, a2, p.kq_post, *spec.kq_post, b, post, pre.ra, b.end, bh0, nh);
      mark("scores kq_post");
    }
    // 6. Head mixing after softmax.
    if (spec.head_post) {
      mix(a2, a3, p.head_post, spec.head_post->group, false, b, post, bh0, nh);
      mark("scores head_post");
    }
    // Attention dropout on A3.
    if (opt.dropout > 0.0f) {
      dropout_kernel<T><<<grid_span(post, nh), kBlock, 0, stream>>>(a3, w, b.g, post, bh0, opt.dropout_seed,
                                                                    opt.dropout, keep_scale(), post.size(nh));
      CUDA_CHECK_LAUNCH("dropout_kernel");
      mark("scores dropout");
    }
  }

  void forward_chunk(const T* q, const T* k, const T* v, T* out, long long bh0, int nh) {
    const long long hsv = static_cast<long long>(n) * Dv;
    for (int r0 = 0; r0 < n; r0 += R) {
      const Block b = block(r0);
      scores(q, k, b, bh0, nh);
      // 7. O = W V for the block's rows (keys up to its last row).
      gemm_rm<T>(blas, false, false, b.r1 - b.r0, Dv, b.r1, T(1), w + b.g.at(0, b.r0, 0), n, b.g.per_head(),
                 v + bh0 * hsv, Dv, hsv, out + bh0 * hsv + static_cast<long long>(b.r0) * Dv, Dv, hsv, nh);
      // 8-10. Epilogue, in place.
      if (epi) {
        const long long rows = static_cast<long long>(nh) * (b.r1 - b.r0);
        epilogue_forward_kernel<T, T><<<grid_rows(rows), kBlock, 0, stream>>>(out + bh0 * hsv, out + bh0 * hsv, ep,
                                                                               Dv, n, b.r0, b.r1 - b.r0, rows);
        CUDA_CHECK_LAUNCH("epilogue_forward_kernel");
      }
      mark("W V + epilogue");
    }
  }

  // Weight gradients over the block's owned rows, stage 1 and 2: acc [H][C] += this chunk's terms.
  // `in` holds valid rows [in_lo, b.end).
  void conv_weight_grad(const T* in, const T* dout, const KqConv& kc, double* acc, const Block& b, int in_lo,
                        long long bh0, int nh) {
    const int C = kc.q * kc.k;
    if constexpr (std::is_same_v<T, float>) {
      const int strips = (b.r1 - b.r0 + kFixRows - 1) / kFixRows;  // as below: the partials' layout
      const bool fixed = fixed_conv && with_fixed_conv(kc.q, kc.k, [&]<int CQ, int CK>() {
        conv_weight_grad_fixed_kernel<CQ, CK><<<dim3(strips, nh), 32 * CQ, 0, stream>>>(
            in, dout, partial, kc.key_offset(), b.g, b.r0, b.r1, in_lo, b.end);
      });
      if (fixed) {
        CUDA_CHECK_LAUNCH("conv_weight_grad_fixed_kernel");
        reduce_partials(acc, C, bh0, nh, strips);
        return;
      }
    }
    if (tiled(kc)) {
      const int strips = (b.r1 - b.r0 + kConvTile - 1) / kConvTile;
      conv_weight_grad_kernel<T><<<dim3(strips, nh), dim3(kConvTile, kConvRowsPerPass), 0, stream>>>(
          in, dout, partial, kc.q, kc.k, kc.key_offset(), b.g, b.r0, b.r1, in_lo, b.end);
      CUDA_CHECK_LAUNCH("conv_weight_grad_kernel");
      reduce_partials(acc, C, bh0, nh, strips);
    } else {
      const int rt = rows_per_tile(n), tiles = (b.r1 - b.r0 + rt - 1) / rt;
      conv_weight_grad_generic_kernel<T><<<dim3(tiles, C, nh), kBlock, 0, stream>>>(
          in, dout, partial, kc.q, kc.k, kc.key_offset(), b.g, b.r0, b.r1, rt);
      CUDA_CHECK_LAUNCH("conv_weight_grad_generic_kernel");
      reduce_partials(acc, C, bh0, nh, tiles);
    }
  }
  void mix_weight_grad(const T* in, const T* dout, int gs, double* acc, const Block& b, long long bh0, int nh) {
    const int rt = rows_per_tile(n), tiles = (b.r1 - b.r0 + rt - 1) / rt;
    if (gs <= kMaxPairGroup) {
      const int groups = nh / gs;
      const unsigned blocks = static_cast<unsigned>(static_cast<long long>(tiles) * groups);
      auto pairs = [&](auto kernel) {
        kernel<<<blocks, kBlock, 0, stream>>>(in, dout, partial, gs, b.g, b.r0, b.r1, groups, rt, tiles);
        CUDA_CHECK_LAUNCH("mix_weight_grad_pairs_kernel");
      };
      if (gs <= 2)
        pairs(mix_weight_grad_pairs_kernel<T, 2>);
      else if (gs <= 4)
        pairs(mix_weight_grad_pairs_kernel<T, 4>);
      else
        pairs(mix_weight_grad_pairs_kernel<T, 8>);
    } else if (gs <= kMaxGroup) {
      mix_weight_grad_kernel<T><<<static_cast<unsigned>(static_cast<long long>(tiles) * nh), kBlock, 0, stream>>>(
          in, dout, partial, gs, b.g, b.r0, b.r1, H, bh0, nh, rt, tiles);
      CUDA_CHECK_LAUNCH("mix_weight_grad_kernel");
    } else {
      mix_weight_grad_generic_kernel<T><<<dim3(tiles, gs, nh), kBlock, 0, stream>>>(in, dout, partial, gs, b.g, b.r0,
                                                                                     b.r1, H, bh0, rt);
      CUDA_CHECK_LAUNCH("mix_weight_grad_generic_kernel");
    }
    reduce_partials(acc, gs, bh0, nh, tiles);
  }
  void reduce_partials(double* acc, int C, long long bh0, int nh, int count) {
    reduce_head_partials_kernel<<<grid_for(static_cast<long long>(H) * C, kWarpsPerBlock), kBlock, 0, stream>>>(
        partial, acc, nh, C, count, H, bh0);
    CUDA_CHECK_LAUNCH("reduce_head_partials_kernel");
  }
  void column_sum(const T* part, double* acc, long long rows, int cols) {
    cuda::column_sum<T>(part, colpart, acc, rows, cols, stream);
    CUDA_CHECK_LAUNCH("column_sum");
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

size_t mta_last_workspace_bytes() { return t_workspace_bytes; }

namespace {
// MTA_CUDA_PROFILE=1: the op's GPU time by stage, one timeline per call, printed at exit. Calls on a
// device are serialized, and profiling is for single-device runs (mta bench, mta train).
PhaseTimer* op_profiler() {
  static PhaseTimer prof("one per call of the materialized MTA op; summed over its row blocks and chunks");
  return prof.on() ? &prof : nullptr;
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
  t_workspace_bytes = 0;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  BlasHandle& bh = blas_handle(device);
  std::lock_guard<std::mutex> lock(bh.m);
  CUBLAS_CHECK(cublasSetStream(bh.h, stream));

  Op<T> op(spec, dims, params, opt, stream, bh.h, bh.mats, /*backward=*/false);
  StreamDrain drain{stream};
  op.prof = op_profiler();
  if (op.prof) op.prof->begin(stream);
  op.cast_inputs(q, k);
  for (int u0 = 0; u0 < op.units; u0 += op.chunk_units) {
    const int nu = std::min(op.chunk_units, op.units - u0);
    op.forward_chunk(q, k, v, out, static_cast<long long>(u0) * op.G, nu * op.G);
  }
  if (op.prof) op.prof->collect();
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
  t_workspace_bytes = 0;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  BlasHandle& bh = blas_handle(device);
  std::lock_guard<std::mutex> lock(bh.m);
  CUBLAS_CHECK(cublasSetStream(bh.h, stream));

  Op<T> op(spec, dims, p, opt, stream, bh.h, bh.mats, /*backward=*/true);
  op.prof = op_profiler();
  const int H = op.H, n = op.n, D = op.D, Dv = op.Dv;
  const long long hs = static_cast<long long>(n) * D, hsv = static_cast<long long>(n) * Dv;
  const int cpre = spec.kq_pre ? spec.kq_pre->q * spec.kq_pre->k : 0;
  const int cpost = spec.kq_post ? spec.kq_post->q * spec.kq_post->k : 0;
  const int gpre = spec.head_pre ? spec.head_pre->group : 0;
  const int gpost = spec.head_post ? spec.head_post->group : 0;

  // Double accumulators of the parameter gradients, in one buffer.
  const long long n_acc = static_cast<long long>(H) * (cpre + cpost + gpre + gpost) + (spec.norm ? Dv : 0) +
                          (spec.gate ? Dv + 1 : 0);
  double* acc_base = static_cast<double*>(bh.acc.get(static_cast<size_t>(std::max(1LL, n_acc)) * sizeof(double)));
  GradAcc acc;
  {
    double* cur = acc_base;
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
  if (n_acc) CUDA_CHECK(cudaMemsetAsync(acc_base, 0, static_cast<size_t>(n_acc) * sizeof(double), stream));
  if (op.prof) op.prof->begin(stream);
  op.cast_inputs(q, k);

  for (int u0 = 0; u0 < op.units; u0 += op.chunk_units) {
    const int nu = std::min(op.chunk_units, op.units - u0);
    const int nh = nu * op.G;
    const long long bh0 = static_cast<long long>(u0) * op.G;
    // dK and dV collect the terms of every row block (beta = 1 products); dQ rows are written once.
    CUDA_CHECK(cudaMemsetAsync(dk + bh0 * hs, 0, static_cast<size_t>(nh * hs) * sizeof(T), stream));
    CUDA_CHECK(cudaMemsetAsync(dv + bh0 * hsv, 0, static_cast<size_t>(nh * hsv) * sizeof(T), stream));
    for (int r0 = 0; r0 < n; r0 += op.R) {
      const auto b = op.block(r0);
      const long long stride = b.g.per_head();
      const int nr = b.end - r0;  // rows [r0, end): the owned rows and the halo the adjoints read
      op.scores(q, k, b, bh0, nh);

      // Through the epilogue: dO of A3 @ V, and the epilogue's parameter-gradient terms (owned rows).
      const T* dO = dout + bh0 * hsv + static_cast<long long>(r0) * Dv;
      long long dO_stride = hsv;
      if (op.epi) {
        gemm_rm<T>(op.blas, false, false, nr, Dv, b.end, T(1), op.w + b.g.at(0, r0, 0), n, stride, v + bh0 * hsv, Dv,
                   hsv, op.obuf, Dv, static_cast<long long>(nr) * Dv, nh);
        const long long rows = static_cast<long long>(nh) * nr;
        epilogue_backward_kernel<T, T><<<op.grid_rows(rows), kBlock, 0, stream>>>(
            op.obuf, dout + bh0 * hsv, op.dobuf, op.pn, op.pgw, op.pgb, op.ep, Dv, n, r0, nr, b.r1, rows);
        CUDA_CHECK_LAUNCH("epilogue_backward_kernel");
        if (spec.norm) op.column_sum(op.pn, acc.norm, rows, Dv);
        if (spec.gate) op.column_sum(op.pgw, acc.gw, rows, Dv), op.column_sum(op.pgb, acc.gb, rows, 1);
        dO = op.dobuf, dO_stride = static_cast<long long>(nr) * Dv;
        op.mark("epilogue");
      }
      // 7. dV += W^T dO over the owned rows, dA3 = dO V^T for rows [r0, end) (causal, through the
      // dropout mask).
      // (float32 products with bf16_products too: rounding W or an epilogue's dO here costs the mixing
      // gradients their precision where they are small differences -- ModelCuda at near-uniform
      // attention measured 6-60% errors in head_post's gradient.)
      gemm_rm<T>(op.blas, true, false, b.r1, Dv, b.r1 - r0, T(1), op.w + b.g.at(0, r0, 0), n, stride, dO, Dv, dO_stride,
                 dv + bh0 * hsv, Dv, hsv, nh, T(1));
      gemm_rm<T>(op.blas, false, true, nr, b.end, Dv, T(1), dO, Dv, dO_stride, v + bh0 * hsv, Dv, hsv,
                 op.g0 + b.g.at(0, r0, 0), n, stride, nh);
      const Span post{r0, b.end, b.end};
      if (post.rows() > 0)
        grad_mask_kernel<T><<<dim3(post.rows(), nh), kBlock, 0, stream>>>(op.g0, b.g, post, bh0, opt.dropout > 0.0f,
                                                                        opt.dropout_seed, opt.dropout, op.keep_scale());
      CUDA_CHECK_LAUNCH("grad_mask_kernel");
      op.mark("dV, dA3");
      T* cur = op.g0;
      T* other = op.g1;
      // 6. Head mixing after softmax: weight gradient, then dA2 = M^T-mix of dA3.
      if (spec.head_post) {
        op.mix_weight_grad(op.a2, cur, gpost, acc.head_post, b, bh0, nh);
        op.mix(cur, other, p.head_post, gpost, /*transpose=*/true, b, post, bh0, nh);
        std::swap(cur, other);
        op.mark("head_post");
      }
      // 5. Key-query convolution after softmax: dA for rows [r0, endA) reads dA2 rows up to endA - 1 + hp.
      int endA = b.end;
      if (spec.kq_post) {
        const KqConv& kc = *spec.kq_post;
        op.conv_weight_grad(op.a, cur, kc, acc.kq_post, b, b.pre, bh0, nh);
        endA = b.endA;
        op.template conv<true>(cur, other, p.kq_post, kc, b, Span{r0, endA, b.end}, r0, b.end, bh0, nh);
        std::swap(cur, other);
        op.mark("kq_post");
      }
      // 4. Softmax, in place: dC' = A * (dA - <dA, A>).
      const Span pre{r0, endA, b.end};
      const long long prow = static_cast<long long>(nh) * pre.rows();
      softmax_backward_kernel<T><<<op.grid_rows(prow), kBlock, 0, stream>>>(op.a, cur, b.g, pre, prow);
      CUDA_CHECK_LAUNCH("softmax_backward_kernel");
      op.mark("softmax");
      // 3. Head mixing before softmax.
      if (spec.head_pre) {
        op.mix_weight_grad(op.c, cur, gpre, acc.head_pre, b, bh0, nh);
        op.mix(cur, other, p.head_pre, gpre, /*transpose=*/true, b, pre, bh0, nh);
        std::swap(cur, other);
        op.mark("head_pre");
      }
      // 2. Key-query convolution before softmax (its input S0 is zero in the future part): dS0 for the
      // owned rows reads dC rows up to r1 - 1 + hq < endA.
      if (spec.kq_pre) {
        const KqConv& kc = *spec.kq_pre;
        op.conv_weight_grad(op.s0, cur, kc, acc.kq_pre, b, b.base, bh0, nh);
        op.template conv<true>(cur, other, p.kq_pre, kc, b, Span{r0, b.r1, b.end}, r0, endA, bh0, nh);
        std::swap(cur, other);
        op.mark("kq_pre");
      }
      // 1. dq = s dS K for the owned rows, dk += s dS^T Q (dS is zero in the future part).
      // With bf16_products dS as bf16 (as FlashAttention rounds it) into `other`, free now.
      if (op.use_bf16) op.cast_span(cur, other, b, Span{r0, b.r1, b.r1}, nh);
      const bf16* const m16 = op.use_bf16 ? reinterpret_cast<const bf16*>(other) + b.g.at(0, r0, 0) : nullptr;
      const long long qoff = bh0 * hs + static_cast<long long>(r0) * D;
      op.mm(false, false, b.r1 - r0, D, b.r1, op.scale, cur + b.g.at(0, r0, 0), m16, n, stride, k + bh0 * hs,
            off16(op.k16, bh0 * hs), D, hs, dq + qoff, D, hs, nh);
      op.mm(true, false, b.r1, D, b.r1 - r0, op.scale, cur + b.g.at(0, r0, 0), m16, n, stride, q + qoff,
            off16(op.q16, qoff), D, hs, dk + bh0 * hs, D, hs, nh, T(1));
      op.mark("dQ, dK");
    }
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
  if (op.prof) op.mark("parameter gradients"), op.prof->collect();
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
