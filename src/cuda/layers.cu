// CUDA kernels of the Transformer's non-attention layers (see layers.h for the contract). Each kernel
// mirrors its CPU counterpart in src/model/layers_cpu.cpp (or, for the embedding, the cross-entropy and
// AdamW, the loops in src/model/model.cpp and src/train/optimizer.cpp) with fp32 math; bf16 only
// enters as a storage type (inputs are widened to fp32, outputs rounded to nearest even).
//
// Written for clarity first: element-wise kernels are grid-stride loops over 16-byte vectors (scalar
// when a pointer is not aligned for that, plus a scalar tail); row kernels use one warp or one block
// per row. Every reduction is in a fixed order that depends only on the shapes, so all kernels are
// deterministic run to run (the embedding gradient too: see embedding_backward).
//
// Rounding that must equal the CPU's bit for bit (the dropout mask and its scaling, AdamW) uses the
// explicitly rounded intrinsics (__fmul_rn, __fadd_rn, ...), which nvcc never contracts into FMAs.
#include "cuda/layers.h"

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/attention_op.h"  // hash_uniform (MTA_HOST_DEVICE): the dropout masks of every backend

#include "cuda/check.h"
#include "cuda/warp_reduce.cuh"

namespace mta::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Error checking: a failure throws std::runtime_error naming the file, the line, the call and the
// reason.


#define CUDA_CHECK(expr) check_cuda((expr), #expr, __FILE__, __LINE__)
// After every kernel launch: a bad launch configuration is reported here, not at the next sync.
#define CUDA_CHECK_LAUNCH(name) check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)

void require(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("mta::cuda::") + fn + ": " + what);
}

// ---------------------------------------------------------------------------------------------
// Device helpers.

constexpr int kBlock = 256;  // threads per block of the element-wise and column kernels
constexpr int kWarps = kBlock / 32;

__device__ inline long long global_thread() { return blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; }
__device__ inline long long grid_threads() { return static_cast<long long>(gridDim.x) * blockDim.x; }

unsigned grid_for(long long work, long long per_block) {
  const long long g = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(std::clamp<long long>(g, 1, 1 << 16));
}

// Sum over a block of kBlock threads in a fixed order; the result is returned to every thread.
// Uses `sh` (kWarps + 1 values of shared memory); a __syncthreads() guards its reuse.
template <typename V>
__device__ inline V block_sum(V v, V* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V t = lane < kWarps ? sh[lane] : V(0);
    t = warp_sum(t);
    if (lane == 0) sh[kWarps] = t;
  }
  __syncthreads();
  return sh[kWarps];
}

__device__ inline float to_f(bf16 x) { return __bfloat162float(x); }
__device__ inline bf16 to_bf(float x) { return __float2bfloat16_rn(x); }

// V consecutive elements, loaded and stored as one (up to 16-byte) access.
template <int V, typename T>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <int V, typename T>
__device__ inline Pack<V, T> load(const T* p) {
  return *reinterpret_cast<const Pack<V, T>*>(p);
}
template <int V, typename T>
__device__ inline void store(T* p, const Pack<V, T>& x) {
  *reinterpret_cast<Pack<V, T>*>(p) = x;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Element-wise driver: op.apply<V>(i) handles elements [i, i + V). Vectors of V elements over the
// first n / V * V elements, then a scalar tail.
template <int V, typename Op>
__global__ void elementwise_kernel(Op op, long long n) {
  const long long nv = n / V;
  for (long long j = global_thread(); j < nv; j += grid_threads()) op.template apply<V>(j * V);
  const long long t = nv * V + global_thread();
  if (t < n) op.template apply<1>(t);
}

// Launches op over n elements with vectors of V when `vec_ok` (every pointer aligned to V elements),
// else element by element.
template <int V, typename Op>
void launch_elementwise(const Op& op, long long n, bool vec_ok, cudaStream_t s, const char* name) {
  if (n <= 0) return;
  if (vec_ok) {
    elementwise_kernel<V><<<grid_for(n / V + 1, kBlock), kBlock, 0, s>>>(op, n);
  } else {
    elementwise_kernel<1><<<grid_for(n, kBlock), kBlock, 0, s>>>(op, n);
  }
  check_cuda(cudaGetLastError(), (std::string("launch of ") + name + " kernel").c_str(), __FILE__, __LINE__);
}

// The CPU's dropout factor of element i: keep ? 1 / (1 - p) : 0 (float, as dropout_apply<float>).
__device__ inline float dropout_factor(uint64_t seed, long long i, float p, float scale) {
  return hash_uniform(seed, static_cast<unsigned long long>(i)) >= p ? scale : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Embedding.

// One block per row, threads over the C columns.
__global__ void embedding_forward_kernel(const int32_t* __restrict__ tokens, const float* __restrict__ E,
                                         float* __restrict__ x, int N, int C) {
  for (int n = blockIdx.x; n < N; n += gridDim.x) {
    const float* src = E + static_cast<long long>(tokens[n]) * C;
    float* dst = x + static_cast<long long>(n) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dst[c] = src[c];
  }
}

__global__ void iota_kernel(int32_t* v, int n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) v[i] = static_cast<int32_t>(i);
}

// keys: the tokens sorted (stably: equal tokens keep their positions' order), rows: the positions in
// that order. One block per sorted index i; the block at the start of a run of equal tokens adds the
// run's rows into dE in position order, exactly the CPU's serial sequence of additions.
__global__ void embedding_backward_kernel(const int32_t* __restrict__ keys, const int32_t* __restrict__ rows,
                                          const float* __restrict__ dx, float* __restrict__ dE, int N, int C) {
  for (int i = blockIdx.x; i < N; i += gridDim.x) {
    const int32_t tok = keys[i];
    if (i > 0 && keys[i - 1] == tok) continue;  // not the start of a run
    float* dst = dE + static_cast<long long>(tok) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      float acc = dst[c];
      for (int j = i; j < N && keys[j] == tok; ++j) acc += dx[static_cast<long long>(rows[j]) * C + c];
      dst[c] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: one warp per row.

__global__ void rmsnorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w, bf16* __restrict__ y,
                                       float* __restrict__ rstd, int N, int C, float eps) {
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  for (long long n = global_thread() >> 5; n < N; n += warps) {
    const float* xr = x + n * C;
    bf16* yr = y + n * C;
    float ms = 0.0f;
    for (int c = lane; c < C; c += 32) ms += xr[c] * xr[c];
    ms = warp_sum(ms);
    const float r = 1.0f / sqrtf(ms / static_cast<float>(C) + eps);
    if (lane == 0) rstd[n] = r;
    for (int c = lane; c < C; c += 32) yr[c] = to_bf(xr[c] * r * w[c]);
  }
}

// dx_acc[n, c] += r dy w - x r^3 (sum_c dy w x) / C.
__global__ void rmsnorm_backward_dx_kernel(const bf16* __restrict__ dy, const float* __restrict__ x,
                                           const float* __restrict__ w, const float* __restrict__ rstd,
                                           float* __restrict__ dx_acc, int N, int C) {
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
  for (long long n = global_thread() >> 5; n < N; n += warps) {
    const float* xr = x + n * C;
    const bf16* dyr = dy + n * C;
    float* dxr = dx_acc + n * C;
    const float r = rstd[n];
    float dot = 0.0f;
    for (int c = lane; c < C; c += 32) dot += to_f(dyr[c]) * w[c] * xr[c];
    dot = warp_sum(dot);
    const float k = r * r * r * dot / static_cast<float>(C);
    for (int c = lane; c < C; c += 32) dxr[c] += r * to_f(dyr[c]) * w[c] - xr[c] * k;
  }
}

// dw partial sums: part[chunk, c] = sum over the chunk's rows of dy x r (rows in order).
constexpr int kRmsRowsPerChunk = 64;
int rms_chunks(int N) { return (N + kRmsRowsPerChunk - 1) / kRmsRowsPerChunk; }

__global__ void rmsnorm_backward_dw_partial_kernel(const bf16* __restrict__ dy, const float* __restrict__ x,
                                                   const float* __restrict__ rstd, float* __restrict__ part, int N,
                                                   int C) {
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  const int chunk = blockIdx.x;
  if (c >= C) return;
  const int n0 = chunk * kRmsRowsPerChunk, n1 = min(N, n0 + kRmsRowsPerChunk);
  float acc = 0.0f;
  for (int n = n0; n < n1; ++n) {
    const long long i = static_cast<long long>(n) * C + c;
    acc += to_f(dy[i]) * x[i] * rstd[n];
  }
  part[static_cast<long long>(chunk) * C + c] = acc;
}

// dw[c] += sum over chunks (in chunk order) of part[chunk, c].
__global__ void column_sum_add_kernel(const float* __restrict__ part, float* __restrict__ dw, int rows, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.0f;
  for (int r = 0; r < rows; ++r) acc += part[static_cast<long long>(r) * C + c];
  dw[c] += acc;
}

// ---------------------------------------------------------------------------------------------
// Head layout and RoPE. Element (b, t, h, e) of [B, T, H, d] <-> (b, h, t, e) of [B, H, T, d]. A thread
// handles P consecutive pairs (2P elements) of one row; the rotation of pair i of position t is by
// angle t * theta^(-2i/d), computed in double then rounded to float as rope_apply<float> does, either
// in the kernel or once into a table (rope_table_kernel, the same function) that the kernel reads. The
// token-major side has `ld` elements between consecutive tokens (ld >= H * d; H * d when dense).

// cos and sin of pair i's angle at position t, rounded to float.
__device__ inline void rope_cos_sin(int t, int i, int d, double theta, float& c, float& s) {
  const double ang = t * pow(theta, -2.0 * i / d);
  double sd, cd;
  sincos(ang, &sd, &cd);
  c = static_cast<float>(cd), s = static_cast<float>(sd);
}

__global__ void rope_table_kernel(float* __restrict__ cs, int T, int d, double theta) {
  const int half = d / 2;
  const long long total = static_cast<long long>(T) * half;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int t = static_cast<int>(idx / half), i = static_cast<int>(idx % half);
    float c, s;
    rope_cos_sin(t, i, d, theta, c, s);
    cs[2 * idx] = c;
    cs[2 * idx + 1] = s;
  }
}

// Rotates the P pairs of v by their (cos, sin) in cs (by the transpose when `inverse`), rounding to bf16
// once. Negating the rounded sine equals rounding the negated one.
template <int P>
__device__ inline void rotate_pairs(Pack<2 * P, bf16>& v, const Pack<2 * P, float>& cs, bool inverse) {
#pragma unroll
  for (int q = 0; q < P; ++q) {
    const float c = cs.v[2 * q], s = inverse ? -cs.v[2 * q + 1] : cs.v[2 * q + 1];
    const float a = to_f(v.v[2 * q]), bb = to_f(v.v[2 * q + 1]);
    v.v[2 * q] = to_bf(a * c - bb * s);
    v.v[2 * q + 1] = to_bf(a * s + bb * c);
  }
}

// `tab`: null (compute the rotations) or a table of >= T positions for this d and theta.
template <int P>
__global__ void heads_kernel(const bf16* __restrict__ in, bf16* __restrict__ out, int B, int T, int H, int d,
                             long long ld, bool rope, double theta, const float* __restrict__ tab, bool inverse,
                             bool to_heads) {
  const int groups = d / (2 * P);  // per row
  const long long total = static_cast<long long>(B) * T * H * groups;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int gi = static_cast<int>(idx % groups);
    long long row = idx / groups;  // (b, t, h) in the tokens-major order
    const int h = static_cast<int>(row % H);
    const int t = static_cast<int>((row / H) % T);
    const int b = static_cast<int>(row / (static_cast<long long>(H) * T));
    const long long tok_off = (static_cast<long long>(b) * T + t) * ld + static_cast<long long>(h) * d + 2 * P * gi;
    const long long head_off = ((static_cast<long long>(b) * H + h) * T + t) * d + 2 * P * gi;
    Pack<2 * P, bf16> v = load<2 * P>(in + (to_heads ? tok_off : head_off));
    if (rope) {
      Pack<2 * P, float> cs;  // (cos, sin) of the P pairs
      if (tab) {
        cs = load<2 * P>(tab + 2 * (static_cast<long long>(t) * (d / 2) + P * gi));
      } else {
#pragma unroll
        for (int q = 0; q < P; ++q) rope_cos_sin(t, P * gi + q, d, theta, cs.v[2 * q], cs.v[2 * q + 1]);
      }
      rotate_pairs<P>(v, cs, inverse);
    }
    store<2 * P>(out + (to_heads ? head_off : tok_off), v);
  }
}

// RoPE in place on token-major rows: columns 0 .. H*d - 1 of each of the B*T rows (row stride ld) hold H
// heads of d; 4 pairs per thread, rotations from the table (the same arithmetic as heads_kernel, so the
// values are those to_heads would have written).
__global__ void rope_rows_kernel(bf16* __restrict__ x, int T, long long rows, int H, int d, long long ld,
                                 const float* __restrict__ tab) {
  constexpr int P = 4;
  const int groups = H * d / (2 * P);  // per row
  const long long total = rows * groups;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const long long row = idx / groups;
    const int col = static_cast<int>(idx % groups) * 2 * P, t = static_cast<int>(row % T);
    bf16* p = x + row * ld + col;
    Pack<2 * P, bf16> v = load<2 * P>(p);
    rotate_pairs<P>(v, load<2 * P>(tab + 2 * (static_cast<long long>(t) * (d / 2) + (col % d) / 2)), false);
    store<2 * P>(p, v);
  }
}

// Odd d (no RoPE): one element per thread.
__global__ void heads_scalar_kernel(const bf16* __restrict__ in, bf16* __restrict__ out, int B, int T, int H, int d,
                                    long long ld, bool to_heads) {
  const long long total = static_cast<long long>(B) * T * H * d;
  for (long long idx = global_thread(); idx < total; idx += grid_threads()) {
    const int e = static_cast<int>(idx % d);
    const long long row = idx / d;
    const int h = static_cast<int>(row % H);
    const int t = static_cast<int>((row / H) % T);
    const int b = static_cast<int>(row / (static_cast<long long>(H) * T));
    const long long tok_off = (static_cast<long long>(b) * T + t) * ld + static_cast<long long>(h) * d + e;
    const long long head_off = ((static_cast<long long>(b) * H + h) * T + t) * d + e;
    if (to_heads)
      out[head_off] = in[tok_off];
    else
      out[tok_off] = in[head_off];
  }
}

void launch_heads(const bf16* in, bf16* out, int B, int T, int H, int d, long long row_stride, bool rope,
                  double theta, const RopeTable* table, bool inverse, bool to_heads, cudaStream_t s, const char* fn) {
  require(B >= 0 && T >= 0 && H >= 0 && d >= 1, fn, "B, T, H must be >= 0 and d >= 1");
  require(!rope || d % 2 == 0, fn, "RoPE needs an even head dimension (got d = " + std::to_string(d) + ")");
  const long long hd = static_cast<long long>(H) * d;
  require(row_stride == 0 || row_stride >= hd, fn,
          "row_stride must be 0 (dense) or >= H * d (got " + std::to_string(row_stride) + ", H * d = " +
              std::to_string(hd) + ")");
  const long long ld = row_stride == 0 ? hd : row_stride;
  const long long total = static_cast<long long>(B) * T * H * d;
  if (total == 0) return;
  const float* tab = nullptr;
  if (rope && table) {
    require(table->cs != nullptr && table->d == d && table->theta == theta && table->T >= T, fn,
            "the RoPE table (T = " + std::to_string(table->T) + ", d = " + std::to_string(table->d) + ", theta = " +
                std::to_string(table->theta) + ") does not cover T = " + std::to_string(T) + ", d = " +
                std::to_string(d) + ", theta = " + std::to_string(theta));
    require(aligned(table->cs, 32), fn, "the RoPE table must be 32-byte aligned");
    tab = table->cs;
  }
  // A vector of 2P elements stays aligned on the token-major side only if every row start is: ld a
  // multiple of 2P too.
  if (d % 8 == 0 && ld % 8 == 0 && aligned(in, 16) && aligned(out, 16)) {
    heads_kernel<4><<<grid_for(total / 8, kBlock), kBlock, 0, s>>>(in, out, B, T, H, d, ld, rope, theta, tab,
                                                                   inverse, to_heads);
    CUDA_CHECK_LAUNCH("heads_kernel<4>");
  } else if (d % 2 == 0 && ld % 2 == 0 && aligned(in, 4) && aligned(out, 4)) {
    heads_kernel<1><<<grid_for(total / 2, kBlock), kBlock, 0, s>>>(in, out, B, T, H, d, ld, rope, theta, tab,
                                                                   inverse, to_heads);
    CUDA_CHECK_LAUNCH("heads_kernel<1>");
  } else {
    require(!rope, fn, "RoPE needs bf16 pointers aligned to 4 bytes and an even row_stride");
    heads_scalar_kernel<<<grid_for(total, kBlock), kBlock, 0, s>>>(in, out, B, T, H, d, ld, to_heads);
    CUDA_CHECK_LAUNCH("heads_scalar_kernel");
  }
}

// ---------------------------------------------------------------------------------------------
// Element-wise ops.

__device__ inline float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

// SwiGLU on V elements; shared by the dense and the row-strided ops (the same arithmetic).
template <int V>
__device__ inline Pack<V, bf16> swiglu_fwd_pack(const Pack<V, bf16>& av, const Pack<V, bf16>& bv) {
  Pack<V, bf16> gv;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float x = to_f(av.v[k]);
    gv.v[k] = to_bf(x * sigmoid(x) * to_f(bv.v[k]));
  }
  return gv;
}
template <int V>
__device__ inline void swiglu_bwd_pack(const Pack<V, bf16>& gv, const Pack<V, bf16>& av, const Pack<V, bf16>& bv,
                                       Pack<V, bf16>& dav, Pack<V, bf16>& dbv) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float x = to_f(av.v[k]), y = to_f(bv.v[k]), d = to_f(gv.v[k]);
    const float sig = sigmoid(x);
    dbv.v[k] = to_bf(d * (x * sig));
    dav.v[k] = to_bf(d * y * sig * (1.0f + x * (1.0f - sig)));
  }
}

struct SwigluFwd {
  const bf16 *a, *b;
  bf16* g;
  template <int V>
  __device__ void apply(long long i) const {
    store<V>(g + i, swiglu_fwd_pack<V>(load<V>(a + i), load<V>(b + i)));
  }
};

struct SwigluBwd {
  const bf16 *dg, *a, *b;
  bf16 *da, *db;
  template <int V>
  __device__ void apply(long long i) const {
    Pack<V, bf16> dav, dbv;
    swiglu_bwd_pack<V>(load<V>(dg + i), load<V>(a + i), load<V>(b + i), dav, dbv);
    store<V>(da + i, dav);
    store<V>(db + i, dbv);
  }
};

// Row-strided: i indexes the dense [rows, cols] g / dg; a, b, da, db have row stride ld. A vector of V
// never spans two rows (the launcher vectorizes only when cols % V == 0).
struct SwigluFwdStrided {
  const bf16 *a, *b;
  bf16* g;
  long long ld;
  int cols;
  template <int V>
  __device__ void apply(long long i) const {
    const long long r = i / cols, j = r * ld + (i - r * cols);
    store<V>(g + i, swiglu_fwd_pack<V>(load<V>(a + j), load<V>(b + j)));
  }
};

struct SwigluBwdStrided {
  const bf16 *dg, *a, *b;
  bf16 *da, *db;
  long long ld;
  int cols;
  template <int V>
  __device__ void apply(long long i) const {
    const long long r = i / cols, j = r * ld + (i - r * cols);
    Pack<V, bf16> dav, dbv;
    swiglu_bwd_pack<V>(load<V>(dg + i), load<V>(a + j), load<V>(b + j), dav, dbv);
    store<V>(da + j, dav);
    store<V>(db + j, dbv);
  }
};

// out = x + y * factor (the CPU's `tmp *= factor` then `x + tmp`, each rounded: no FMA).
struct ResidualDropout {
  const float *x, *y;
  float* out;
  float p, scale;
  uint64_t seed;
  bool drop;
  template <int V>
  __device__ void apply(long long i) const {
    const Pack<V, float> xv = load<V>(x + i), yv = load<V>(y + i);
    Pack<V, float> ov;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float t = drop ? __fmul_rn(yv.v[k], dropout_factor(seed, i + k, p, scale)) : yv.v[k];
      ov.v[k] = __fadd_rn(xv.v[k], t);
    }
    store<V>(out + i, ov);
  }
};

struct DropoutToBf16 {
  const float* x;
  bf16* y;
  float p, scale;
  uint64_t seed;
  bool drop;
  template <int V>
  __device__ void apply(long long i) const {
    const Pack<V, float> xv = load<V>(x + i);
    Pack<V, bf16> yv;
#pragma unroll
    for (int k = 0; k < V; ++k)
      yv.v[k] = to_bf(drop ? __fmul_rn(xv.v[k], dropout_factor(seed, i + k, p, scale)) : xv.v[k]);
    store<V>(y + i, yv);
  }
};

// AdamW, term by term as AdamW::update (src/train/optimizer.cpp) with each operation rounded.
struct AdamWOp {
  float *p, *m, *v;
  bf16* pb;
  const float* g;
  const uint8_t* decay;
  float b1, b2, one_minus_b1, one_minus_b2, eps, decay_factor, step_size, inv_sqrt_bc2;
  template <int V>
  __device__ void apply(long long i) const {
    Pack<V, float> pv = load<V>(p + i), mv = load<V>(m + i), vv = load<V>(v + i);
    const Pack<V, float> gv = load<V>(g + i);
    const Pack<V, uint8_t> dv = load<V>(decay + i);
    Pack<V, bf16> bv;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float gi = gv.v[k];
      const float mi = __fadd_rn(__fmul_rn(b1, mv.v[k]), __fmul_rn(one_minus_b1, gi));
      const float vi = __fadd_rn(__fmul_rn(b2, vv.v[k]), __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
      float pi = pv.v[k];
      if (dv.v[k]) pi = __fsub_rn(pi, __fmul_rn(decay_factor, pi));
      pi = __fsub_rn(pi, __fdiv_rn(__fmul_rn(step_size, mi), __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_sqrt_bc2), eps)));
      mv.v[k] = mi, vv.v[k] = vi, pv.v[k] = pi;
      bv.v[k] = to_bf(pi);
    }
    store<V>(p + i, pv);
    store<V>(m + i, mv);
    store<V>(v + i, vv);
    if (pb) store<V>(pb + i, bv);
  }
};

struct Scale {
  float* g;
  float f;
  template <int V>
  __device__ void apply(long long i) const {
    Pack<V, float> x = load<V>(g + i);
#pragma unroll
    for (int k = 0; k < V; ++k) x.v[k] = __fmul_rn(x.v[k], f);
    store<V>(g + i, x);
  }
};

struct CastToBf16 {
  const float* x;
  bf16* y;
  template <int V>
  __device__ void apply(long long i) const {
    const Pack<V, float> xv = load<V>(x + i);
    Pack<V, bf16> yv;
#pragma unroll
    for (int k = 0; k < V; ++k) yv.v[k] = to_bf(xv.v[k]);
    store<V>(y + i, yv);
  }
};

struct CastToF32 {
  const bf16* x;
  float* y;
  template <int V>
  __device__ void apply(long long i) const {
    const Pack<V, bf16> xv = load<V>(x + i);
    Pack<V, float> yv;
#pragma unroll
    for (int k = 0; k < V; ++k) yv.v[k] = to_f(xv.v[k]);
    store<V>(y + i, yv);
  }
};

// ---------------------------------------------------------------------------------------------
// Cross-entropy: one block per row, two passes over the row: (1) the maximum, its lowest index and the
// sum of exponentials together (each thread keeps a running maximum and rescales its partial sum when
// the maximum grows, the "online softmax"), (2) the gradient. The logits are read in vectors of VEC
// floats (VEC = 4 when V % 4 == 0 and the pointers are aligned for it).
//
// Before, a separate first pass found the maximum and a second summed exp(x - max): one more read of
// the [R, V] fp32 logits (R * V * 4 bytes; 2.1 GB per step at B * T = 16384, V = 32000). The online
// sum rounds differently (one extra rounding per rescale); the loss is still within the GPU test's
// 1e-5 of the CPU's double-precision sum.

struct MaxIdx {
  float v;
  int i;
};

// The better of two candidates: the larger value, the lower index on ties (the CPU keeps the first
// maximum, since it replaces only on a strictly larger value).
__device__ inline MaxIdx better(MaxIdx a, MaxIdx b) {
  if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
  return a;
}

// Adds logit x (index c) to a thread's running maximum `mi` (mi.i < 0: none yet) and its sum
// `part` of exp(logit - mi.v). Indices arrive in increasing order, so a strictly larger value is
// needed to move the maximum (the lowest index wins ties). -inf logits add 0 (also while the maximum
// is -inf, where exp(x - max) would be NaN); NaN propagates into the sum.
__device__ inline void ce_add(float x, int c, MaxIdx& mi, float& part) {
  if (mi.i < 0) {
    mi = MaxIdx{x, c};
    part = x == -INFINITY ? 0.0f : 1.0f;
  } else if (x > mi.v) {
    part = part * expf(mi.v - x) + 1.0f;
    mi = MaxIdx{x, c};
  } else {
    part += x == -INFINITY ? 0.0f : expf(x - mi.v);
  }
}

template <int VEC>
__global__ void cross_entropy_kernel(const float* __restrict__ logits, const int32_t* __restrict__ targets,
                                     const float* __restrict__ weights, float grad_scale, float* __restrict__ loss,
                                     int32_t* __restrict__ argmax, bf16* __restrict__ dlogits, int R, int V) {
  __shared__ MaxIdx sh_mi[kWarps];
  __shared__ MaxIdx sh_best;
  __shared__ float sh_sum[kWarps + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nvec = V / VEC;  // VEC divides V
  for (int r = blockIdx.x; r < R; r += gridDim.x) {
    const float* lg = logits + static_cast<long long>(r) * V;
    // Pass 1. A thread's first element seeds its maximum (not -inf), so a row of -inf still yields
    // index 0 like the CPU; a thread without elements offers (-inf, V), which loses every tie.
    MaxIdx mi{-INFINITY, -1};
    float part = 0.0f;
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
      const Pack<VEC, float> x = load<VEC>(lg + static_cast<long long>(j) * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ce_add(x.v[k], j * VEC + k, mi, part);
    }
    if (mi.i < 0) mi.i = V;
    const float my_max = mi.v;
    for (int off = 16; off > 0; off >>= 1) {
      const MaxIdx o{__shfl_xor_sync(0xffffffffu, mi.v, off), __shfl_xor_sync(0xffffffffu, mi.i, off)};
      mi = better(mi, o);
    }
    __syncthreads();  // shared memory of the previous row
    if (lane == 0) sh_mi[warp] = mi;
    __syncthreads();
    if (threadIdx.x == 0) {
      MaxIdx b = sh_mi[0];
      for (int k = 1; k < kWarps; ++k) b = better(b, sh_mi[k]);
      sh_best = b;
    }
    __syncthreads();
    const MaxIdx best = sh_best;
    const float m = best.v;
    // Each thread's sum rescaled to the row's maximum (a thread with only -inf or no logits adds 0).
    const float sum = block_sum(part == 0.0f ? 0.0f : part * expf(my_max - m), sh_sum);
    const float w = weights[r];
    if (threadIdx.x == 0) {
      if (argmax) argmax[r] = best.i;
      if (loss) {
        const double lt = w != 0.0f ? static_cast<double>(lg[targets[r]]) : 0.0;
        loss[r] = w != 0.0f ? static_cast<float>(w * (m + log(static_cast<double>(sum)) - lt)) : 0.0f;
      }
    }
    if (dlogits) {  // pass 2
      bf16* dr = dlogits + static_cast<long long>(r) * V;
      const float s = w * grad_scale;
      const float inv = static_cast<float>(1.0 / static_cast<double>(sum));
      const int tgt = w != 0.0f ? targets[r] : -1;
      for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
        const Pack<VEC, float> x = load<VEC>(lg + static_cast<long long>(j) * VEC);
        Pack<VEC, bf16> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float d = s * expf(x.v[k] - m) * inv;
          if (j * VEC + k == tgt) d -= s;
          o.v[k] = to_bf(d);
        }
        store<VEC>(dr + static_cast<long long>(j) * VEC, o);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sum of squares: fixed grid (a function of n only) of per-block double sums, then one block sums
// those in order.

constexpr int kSsqMaxBlocks = 1024;
int ssq_blocks(long long n) {
  return static_cast<int>(std::clamp<long long>((n + 8 * kBlock - 1) / (8 * kBlock), 1, kSsqMaxBlocks));
}

__global__ void sum_squares_partial_kernel(const float* __restrict__ g, long long n, double* __restrict__ part) {
  __shared__ double sh[kWarps + 1];
  double acc = 0.0;
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const double x = g[i];
    acc += x * x;
  }
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

__global__ void sum_partials_kernel(const double* __restrict__ part, int count, double* __restrict__ out) {
  __shared__ double sh[kWarps + 1];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += part[i];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) *out = acc;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers.

void embedding_forward(const int32_t* tokens, const float* E, float* x, int N, int C, cudaStream_t s) {
  require(N >= 0 && C >= 0, "embedding_forward", "N and C must be >= 0");
  if (N == 0 || C == 0) return;
  embedding_forward_kernel<<<grid_for(N, 1), std::min(kBlock, ((C + 31) / 32) * 32), 0, s>>>(tokens, E, x, N, C);
  CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

// Deterministic, and bit for bit the CPU's serial scatter-add: the positions are sorted by token
// (a stable radix sort keeps equal tokens in position order), then each run of equal tokens is added
// into its row of dE in that order by one block. Temporary memory comes from the stream-ordered
// allocator (cudaMallocAsync) and is released on the stream.
void embedding_backward(const int32_t* tokens, const float* dx, float* dE, int N, int C, cudaStream_t s) {
  require(N >= 0 && C >= 0, "embedding_backward", "N and C must be >= 0");
  if (N == 0 || C == 0) return;
  size_t sort_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, tokens, static_cast<int32_t*>(nullptr),
                                             static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), N,
                                             0, 32, s));
  const size_t arr = (static_cast<size_t>(N) * sizeof(int32_t) + 255) / 256 * 256;
  char* mem = nullptr;
  CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&mem), 3 * arr + sort_bytes, s));
  int32_t* keys = reinterpret_cast<int32_t*>(mem);
  int32_t* rows_in = reinterpret_cast<int32_t*>(mem + arr);
  int32_t* rows = reinterpret_cast<int32_t*>(mem + 2 * arr);
  void* sort_tmp = mem + 3 * arr;
  try {
    iota_kernel<<<grid_for(N, kBlock), kBlock, 0, s>>>(rows_in, N);
    CUDA_CHECK_LAUNCH("iota_kernel");
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, tokens, keys, rows_in, rows, N, 0, 32, s));
    embedding_backward_kernel<<<grid_for(N, 1), std::min(kBlock, ((C + 31) / 32) * 32), 0, s>>>(keys, rows, dx, dE,
                                                                                                  N, C);
    CUDA_CHECK_LAUNCH("embedding_backward_kernel");
  } catch (...) {
    cudaFreeAsync(mem, s);
    throw;
  }
  CUDA_CHECK(cudaFreeAsync(mem, s));
}

void rmsnorm_forward(const float* x, const float* w, bf16* y, float* rstd, int N, int C, float eps, cudaStream_t s) {
  require(N >= 0 && C >= 1, "rmsnorm_forward", "N must be >= 0 and C >= 1");
  if (N == 0) return;
  rmsnorm_forward_kernel<<<grid_for(N, kWarps), kBlock, 0, s>>>(x, w, y, rstd, N, C, eps);
  CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

size_t rmsnorm_backward_scratch_floats(int N, int C) {
  return N > 0 && C > 0 ? static_cast<size_t>(rms_chunks(N)) * static_cast<size_t>(C) : 0;
}

void rmsnorm_backward(const bf16* dy, const float* x, const float* w, const float* rstd, float* dx_acc, float* dw,
                      float* scratch, int N, int C, cudaStream_t s) {
  require(N >= 0 && C >= 1, "rmsnorm_backward", "N must be >= 0 and C >= 1");
  if (N == 0) return;
  require(scratch != nullptr, "rmsnorm_backward", "scratch is null");
  rmsnorm_backward_dx_kernel<<<grid_for(N, kWarps), kBlock, 0, s>>>(dy, x, w, rstd, dx_acc, N, C);
  CUDA_CHECK_LAUNCH("rmsnorm_backward_dx_kernel");
  const int chunks = rms_chunks(N);
  require((C + kBlock - 1) / kBlock <= 65535, "rmsnorm_backward", "C too large");
  const dim3 grid(chunks, (C + kBlock - 1) / kBlock);
  rmsnorm_backward_dw_partial_kernel<<<grid, kBlock, 0, s>>>(dy, x, rstd, scratch, N, C);
  CUDA_CHECK_LAUNCH("rmsnorm_backward_dw_partial_kernel");
  column_sum_add_kernel<<<(C + kBlock - 1) / kBlock, kBlock, 0, s>>>(scratch, dw, chunks, C);
  CUDA_CHECK_LAUNCH("column_sum_add_kernel");
}

size_t rope_table_floats(int T, int d) { return T > 0 && d > 0 ? static_cast<size_t>(T) * (d / 2) * 2 : 0; }

RopeTable make_rope_table(float* cs, int T, int d, double theta, cudaStream_t s) {
  require(T >= 0 && d >= 2 && d % 2 == 0, "make_rope_table", "need T >= 0 and an even d >= 2");
  require(T == 0 || (cs != nullptr && aligned(cs, 32)), "make_rope_table", "cs must be a 32-byte aligned buffer");
  if (T > 0) {
    rope_table_kernel<<<grid_for(static_cast<long long>(T) * (d / 2), kBlock), kBlock, 0, s>>>(cs, T, d, theta);
    CUDA_CHECK_LAUNCH("rope_table_kernel");
  }
  return RopeTable{cs, T, d, theta};
}

void to_heads(const bf16* x, bf16* y, int B, int T, int H, int d, bool rope, double theta, cudaStream_t s,
              long long row_stride, const RopeTable* table) {
  launch_heads(x, y, B, T, H, d, row_stride, rope, theta, table, /*inverse=*/false, /*to_heads=*/true, s, "to_heads");
}

void from_heads(const bf16* y, bf16* x, int B, int T, int H, int d, bool rope, double theta, cudaStream_t s,
                long long row_stride, const RopeTable* table) {
  launch_heads(y, x, B, T, H, d, row_stride, rope, theta, table, /*inverse=*/true, /*to_heads=*/false, s,
               "from_heads");
}

void rope_rows(bf16* x, int B, int T, int H, int d, long long row_stride, const RopeTable& table, cudaStream_t s) {
  const char* fn = "rope_rows";
  require(B >= 0 && T >= 0 && H >= 0 && d >= 8 && d % 8 == 0, fn, "need B, T, H >= 0 and d a multiple of 8");
  require(row_stride >= static_cast<long long>(H) * d && row_stride % 8 == 0, fn,
          "row_stride must be >= H * d and a multiple of 8 (got " + std::to_string(row_stride) + ")");
  require(aligned(x, 16), fn, "x must be 16-byte aligned");
  require(table.cs != nullptr && table.d == d && table.T >= T && aligned(table.cs, 32), fn,
          "the RoPE table (T = " + std::to_string(table.T) + ", d = " + std::to_string(table.d) +
              ") does not cover T = " + std::to_string(T) + ", d = " + std::to_string(d));
  const long long rows = static_cast<long long>(B) * T, total = rows * H * d / 8;
  if (total == 0) return;
  rope_rows_kernel<<<grid_for(total, kBlock), kBlock, 0, s>>>(x, T, rows, H, d, row_stride, table.cs);
  CUDA_CHECK_LAUNCH("rope_rows_kernel");
}

void swiglu_forward(const bf16* a, const bf16* b, bf16* g, long long n, cudaStream_t s) {
  const bool vec = aligned(a, 16) && aligned(b, 16) && aligned(g, 16);
  launch_elementwise<8>(SwigluFwd{a, b, g}, n, vec, s, "swiglu_forward");
}

void swiglu_backward(const bf16* dg, const bf16* a, const bf16* b, bf16* da, bf16* db, long long n, cudaStream_t s) {
  const bool vec = aligned(dg, 16) && aligned(a, 16) && aligned(b, 16) && aligned(da, 16) && aligned(db, 16);
  launch_elementwise<8>(SwigluBwd{dg, a, b, da, db}, n, vec, s, "swiglu_backward");
}

void swiglu_forward_strided(const bf16* a, const bf16* b, long long ld, bf16* g, int rows, int cols, cudaStream_t s) {
  require(rows >= 0 && cols >= 0 && ld >= cols, "swiglu_forward_strided", "need rows, cols >= 0 and ld >= cols");
  const bool vec = cols % 8 == 0 && ld % 8 == 0 && aligned(a, 16) && aligned(b, 16) && aligned(g, 16);
  launch_elementwise<8>(SwigluFwdStrided{a, b, g, ld, cols}, static_cast<long long>(rows) * cols, vec, s,
                        "swiglu_forward_strided");
}

void swiglu_backward_strided(const bf16* dg, const bf16* a, const bf16* b, long long ld, bf16* da, bf16* db, int rows,
                             int cols, cudaStream_t s) {
  require(rows >= 0 && cols >= 0 && ld >= cols, "swiglu_backward_strided", "need rows, cols >= 0 and ld >= cols");
  const bool vec = cols % 8 == 0 && ld % 8 == 0 && aligned(dg, 16) && aligned(a, 16) && aligned(b, 16) &&
                   aligned(da, 16) && aligned(db, 16);
  launch_elementwise<8>(SwigluBwdStrided{dg, a, b, da, db, ld, cols}, static_cast<long long>(rows) * cols, vec, s,
                        "swiglu_backward_strided");
}

void residual_dropout_forward(const float* x, const float* y, float* out, long long n, float p, uint64_t seed,
                              cudaStream_t s) {
  const bool drop = p > 0.0f;
  const float scale = 1.0f / (1.0f - p);
  const bool vec = aligned(x, 16) && aligned(y, 16) && aligned(out, 16);
  launch_elementwise<4>(ResidualDropout{x, y, out, p, scale, seed, drop}, n, vec, s, "residual_dropout_forward");
}

void dropout_to_bf16(const float* dout, bf16* dy, long long n, float p, uint64_t seed, cudaStream_t s) {
  const bool drop = p > 0.0f;
  const float scale = 1.0f / (1.0f - p);
  const bool vec = aligned(dout, 16) && aligned(dy, 8);
  launch_elementwise<4>(DropoutToBf16{dout, dy, p, scale, seed, drop}, n, vec, s, "dropout_to_bf16");
}

void cross_entropy(const float* logits, const int32_t* targets, const float* weights, float grad_scale, float* loss,
                   int32_t* argmax, bf16* dlogits, int R, int V, cudaStream_t s) {
  require(R >= 0 && V >= 1, "cross_entropy", "R must be >= 0 and V >= 1");
  if (R == 0) return;
  // Rows start 16-byte aligned (logits) and 8-byte aligned (dlogits) when V % 4 == 0.
  if (V % 4 == 0 && aligned(logits, 16) && (!dlogits || aligned(dlogits, 8))) {
    cross_entropy_kernel<4><<<grid_for(R, 1), kBlock, 0, s>>>(logits, targets, weights, grad_scale, loss, argmax,
                                                              dlogits, R, V);
    CUDA_CHECK_LAUNCH("cross_entropy_kernel<4>");
  } else {
    cross_entropy_kernel<1><<<grid_for(R, 1), kBlock, 0, s>>>(logits, targets, weights, grad_scale, loss, argmax,
                                                              dlogits, R, V);
    CUDA_CHECK_LAUNCH("cross_entropy_kernel<1>");
  }
}

void adamw_update(float* p, bf16* p_bf16, const float* g, float* m, float* v, const uint8_t* decay, long long n,
                  double lr, float beta1, float beta2, float eps, double weight_decay, double bc1, double bc2,
                  cudaStream_t s) {
  require(n >= 0, "adamw_update", "n must be >= 0");
  if (n == 0) return;
  require(p && g && m && v && decay, "adamw_update", "p, g, m, v and decay must not be null");
  // The scalars exactly as AdamW::update forms them (double, then rounded to float once).
  AdamWOp op{};
  op.p = p, op.m = m, op.v = v, op.pb = p_bf16, op.g = g, op.decay = decay;
  op.b1 = beta1, op.b2 = beta2;
  op.one_minus_b1 = 1.0f - beta1, op.one_minus_b2 = 1.0f - beta2;
  op.eps = eps;
  op.decay_factor = static_cast<float>(lr * weight_decay);
  op.step_size = static_cast<float>(lr / bc1);
  op.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const bool vec = aligned(p, 16) && aligned(m, 16) && aligned(v, 16) && aligned(g, 16) && aligned(decay, 4) &&
                   aligned(p_bf16, 8);
  launch_elementwise<4>(op, n, vec, s, "adamw_update");
}

size_t sum_squares_scratch_doubles(long long n) { return static_cast<size_t>(ssq_blocks(n)); }

void sum_squares(const float* g, long long n, double* out, double* scratch, cudaStream_t s) {
  require(n >= 0, "sum_squares", "n must be >= 0");
  require(scratch != nullptr, "sum_squares", "scratch is null");
  const int blocks = ssq_blocks(n);
  sum_squares_partial_kernel<<<blocks, kBlock, 0, s>>>(g, n, scratch);
  CUDA_CHECK_LAUNCH("sum_squares_partial_kernel");
  sum_partials_kernel<<<1, kBlock, 0, s>>>(scratch, blocks, out);
  CUDA_CHECK_LAUNCH("sum_partials_kernel");
}

void scale(float* g, long long n, float factor, cudaStream_t s) {
  launch_elementwise<4>(Scale{g, factor}, n, aligned(g, 16), s, "scale");
}

void cast_to_bf16(const float* x, bf16* y, long long n, cudaStream_t s) {
  launch_elementwise<4>(CastToBf16{x, y}, n, aligned(x, 16) && aligned(y, 8), s, "cast_to_bf16");
}

void cast_to_f32(const bf16* x, float* y, long long n, cudaStream_t s) {
  launch_elementwise<4>(CastToF32{x, y}, n, aligned(x, 8) && aligned(y, 16), s, "cast_to_f32");
}

}  // namespace mta::cuda
