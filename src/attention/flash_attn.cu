// Fused causal attention (FlashAttention-2 algorithm), bf16 in/out, fp32 accumulation. See
// flash_attn.h for the contract. Layout of this file: error checking, device primitives (inline PTX:
// cp.async, ldmatrix, mma.sync), tile traits, the kernels (forward; backward preprocess, main, dq
// conversion), then the host launch code.
//
// Fragment conventions (PTX ISA, mma.m16n8k16 with .bf16 operands; lane = 4 * g + t, g = lane / 4,
// t = lane % 4):
//   A (16 x 16, row-major), 4 x b32:  a0 = A[g][2t..2t+1],   a1 = A[g+8][2t..2t+1],
//                                     a2 = A[g][2t+8..+9],   a3 = A[g+8][2t+8..+9]
//   B (16 x 8, k x n),      2 x b32:  b0 = B[2t..2t+1][g],   b1 = B[2t+8..+9][g]
//   C (16 x 8, fp32),       4 x f32:  c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// The lower-indexed element of a pair sits in the low 16 bits of the b32 register.
// ldmatrix.x4 loads four 8 x 8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and
// register i of every lane receives matrix i's element pair (row g, columns 2t, 2t+1), or with .trans
// the pair (rows 2t, 2t+1, column g), i.e. the pair of the transposed matrix.
//
// Shared-memory tiles are row-major with rows padded by 8 bf16 (16 bytes): the 8 row addresses of one
// ldmatrix phase then fall into 8 distinct groups of 4 banks (no bank conflicts, no swizzle needed).
#include "attention/flash_attn.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/check.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;

// ---------------------------------------------------------------------------------------------
// Error checking: every CUDA call and every launch (cudaGetLastError) goes through these.

#define FA_CHECK(expr) MTA_CUDA_CHECK(expr)
#define FA_CHECK_LAUNCH(name) MTA_CUDA_CHECK_LAUNCH(name)

void fa_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flash_attn: " + what);
}

// ---------------------------------------------------------------------------------------------
// Device primitives.

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 reads nothing and fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// c += a * b (16 x 8 x 16, fp32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one b32 holding two bf16 (lo in the low half), round to nearest even.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Address offsets (in elements) of this lane's ldmatrix.x4 row for the three operand patterns used.
// All tiles are row-major with `stride` elements per row; (r0, c0) is the 16 x 16 block's corner.
//  * A operand, stored row-major (rows = M, cols = K), non-trans: matrices (rows 0-7|8-15) x (cols 0-7|8-15)
//    in the order a0 a1 a2 a3.
__device__ __forceinline__ int a_offset(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 15)) * stride + c0 + (lane >> 4) * 8;
}
//  * B operand stored as [n][k] (e.g. K for Q K^T), non-trans: gives {b0, b1} of n-block r0..r0+7 in
//    registers 0, 1 and of n-block r0+8..r0+15 in registers 2, 3 (k = c0..c0+15).
__device__ __forceinline__ int bnk_offset(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + (lane >> 4) * 8) * stride + c0 + ((lane >> 3) & 1) * 8;
}
//  * B operand stored as [k][n] (e.g. V for P V), with .trans: k = r0..r0+15, gives {b0, b1} of
//    n-block c0..c0+7 in registers 0, 1 and of n-block c0+8..c0+15 in registers 2, 3.
__device__ __forceinline__ int bkn_offset(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + c0 + (lane >> 4) * 8;
}
//  * A operand stored transposed, as [k][m] (dS^T for dS K), with .trans: m = c0..c0+15, k = r0..r0+15.
__device__ __forceinline__ int at_offset(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + (lane >> 4) * 8) * stride + c0 + ((lane >> 3) & 1) * 8;
}

// Copies a kRows x kD bf16 tile (global rows contiguous, kD elements each) into shared memory with
// row stride `stride`; rows >= rows_valid are zero-filled (and not read). The tile's row 0 must be a
// valid row (it is also the dummy source address of zero-filled chunks).
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile_async(bf16* smem, int stride, const bf16* gmem, int rows_valid, int tid) {
  constexpr int kChunksPerRow = kD / 8;  // 16-byte chunks
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int c = tid; c < kChunks; c += kThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = r < rows_valid;
    const bf16* src = ok ? gmem + static_cast<size_t>(r) * kD + col : gmem;
    cp_async_16(smem + r * stride + col, src, ok ? 16 : 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Tile traits. One warp owns 16 rows of the "outer" tile (queries in the forward pass, keys in the
// backward pass), so the outer tile is 16 * warps rows.

template <int kHeadDim, int kBlockM_, int kBlockN_, int kWarps_, int kMinBlocks_>
struct FwdTraits {
  static constexpr int D = kHeadDim;
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__ min CTAs per SM (caps registers)
  static constexpr int kBlockM = kBlockM_;  // queries per CTA
  static constexpr int kBlockN = kBlockN_;  // keys per inner iteration
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStride = D + 8;  // smem row stride (elements)
  static_assert(kBlockM == 16 * kWarps, "one warp per 16 query rows");
  static_assert(D % 16 == 0 && kBlockN % 16 == 0, "tile sizes must be multiples of 16");
  // sQ [kBlockM][kStride], sK and sV double-buffered [2][kBlockN][kStride].
  static constexpr size_t kSmemBytes = static_cast<size_t>(kBlockM + 4 * kBlockN) * kStride * sizeof(bf16);
};

template <int kHeadDim, int kBlockM_, int kBlockN_, int kWarps_>
struct BwdTraits {
  static constexpr int D = kHeadDim;
  static constexpr int kBlockM = kBlockM_;  // queries per inner iteration
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStride = D + 8;         // row stride of the K, V, Q, dO tiles (elements)
  static constexpr int kStrideS = kBlockM + 8;  // row stride of the dS^T tile [kBlockN][kBlockM]
  static_assert(kBlockN == 16 * kWarps, "one warp per 16 key rows");
  static_assert(D % 32 == 0 && kBlockM % 16 == 0, "tile sizes must be multiples of 16 (D of 32)");
  // sK, sV [kBlockN][kStride]; sQ, sdO double-buffered [2][kBlockM][kStride]; sdS [kBlockN][kStrideS]
  // (bf16); then fp32 sLse, sDelta [2][kBlockM].
  static constexpr size_t kSmemElems =
      static_cast<size_t>(2 * kBlockN + 4 * kBlockM) * kStride + static_cast<size_t>(kBlockN) * kStrideS;
  static constexpr size_t kSmemBytes = kSmemElems * sizeof(bf16) + 4 * kBlockM * sizeof(float);
};

using Fwd64 = FwdTraits<64, 128, 64, 8, 2>;
using Fwd128 = FwdTraits<128, 128, 64, 8, 1>;
using Bwd64 = BwdTraits<64, 64, 128, 8>;
using Bwd128 = BwdTraits<128, 32, 64, 4>;

// ---------------------------------------------------------------------------------------------
// Forward kernel. Grid (B*H, ceil(T / kBlockM)); the CTA with blockIdx.y = 0 takes the LAST query
// tile (the most work under the causal mask) so heavy tiles start first.
//
// Warp w owns query rows m0 + 16w .. m0 + 16w + 15. Key tiles 0 .. up to the diagonal are visited in
// increasing order; the first (keys 0..) always contains a visible key for every row, so each row's
// running max is finite from then on and later fully masked tiles contribute exp2(-inf) = 0. A warp
// skips a key tile that lies entirely in its rows' future. Online softmax in the log2 domain:
// x = s * scale * log2(e), m = running max of x, l = running sum of exp2(x - m) (kept per thread
// and reduced over the 4 threads of a row at the end), o rescaled by exp2(m_old - m_new).
// lse = (m * ln 2) + ln(l): natural log-sum-exp of the scaled logits.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    flash_fwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                     bf16* __restrict__ o, float* __restrict__ lse, int T, float scale_log2) {
  constexpr int D = Tr::D, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStride, kThreads = Tr::kThreads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + BM * S;      // [2][BN][S]
  bf16* sV = sK + 2 * BN * S;  // [2][BN][S]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const size_t head = static_cast<size_t>(blockIdx.x) * T;
  q += head * D, k += head * D, v += head * D, o += head * D, lse += head;

  const int kv_end = min(T, m0 + BM);  // keys this CTA needs: 0 .. kv_end - 1
  const int n_blocks = (kv_end + BN - 1) / BN;

  load_tile_async<BM, D, kThreads>(sQ, S, q + static_cast<size_t>(m0) * D, T - m0, tid);
  load_tile_async<BN, D, kThreads>(sK, S, k, T, tid);
  load_tile_async<BN, D, kThreads>(sV, S, v, T, tid);
  cp_async_commit();

  float acc_o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc_o[j][0] = acc_o[j][1] = acc_o[j][2] = acc_o[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of the warp, log2 domain
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sums
  const int row_w = m0 + warp * 16;           // first query row of this warp

  for (int nb = 0; nb < n_blocks; ++nb) {
    // Tile nb has landed (this thread's copies: wait; everyone's: barrier), and every warp is done
    // with the buffer the next copies overwrite (it was read in iteration nb - 1).
    cp_async_wait_all();
    __syncthreads();
    if (nb + 1 < n_blocks) {
      const int n1 = (nb + 1) * BN, buf1 = (nb + 1) & 1;
      load_tile_async<BN, D, kThreads>(sK + buf1 * BN * S, S, k + static_cast<size_t>(n1) * D, T - n1, tid);
      load_tile_async<BN, D, kThreads>(sV + buf1 * BN * S, S, v + static_cast<size_t>(n1) * D, T - n1, tid);
      cp_async_commit();
    }
    const int n0 = nb * BN;
    const bf16* cK = sK + (nb & 1) * BN * S;
    const bf16* cV = sV + (nb & 1) * BN * S;
    if (row_w >= T || n0 > row_w + 15) continue;  // padding rows only, or every key in the future

    // S = Q K^T for this warp's 16 rows x BN keys.
    float acc_s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) acc_s[j][0] = acc_s[j][1] = acc_s[j][2] = acc_s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sQ + a_offset(lane, warp * 16, kk * 16, S));
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, cK + bnk_offset(lane, nn * 16, kk * 16, S));
        mma_bf16(acc_s[2 * nn], a, b[0], b[1]);
        mma_bf16(acc_s[2 * nn + 1], a, b[2], b[3]);
      }
    }

    // Causal mask (key > query) and the sequence end (key >= T), only where the tile can need it.
    if (n0 + BN > row_w + 1 || n0 + BN > T) {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n0 + 8 * j + 2 * t + (e & 1), row = row_w + g + 8 * (e >> 1);
          if (col > row || col >= T) acc_s[j][e] = -INFINITY;
        }
    }

    // Online softmax, per row half r (row g, row g + 8); a row is spread over the 4 lanes of a quad.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(acc_s[j][2 * r], acc_s[j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(row_max[r], mx * scale_log2);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
      const float alpha = exp2f(row_max[r] - m_use);          // exp2(-inf) = 0 on the first visit
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const float p = exp2f(fmaf(acc_s[j][e], scale_log2, -m_use));
          acc_s[j][e] = p;
          sum += p;
        }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) acc_o[j][2 * r] *= alpha, acc_o[j][2 * r + 1] *= alpha;
    }

    // O += P V: P (fp32 C fragments) becomes the bf16 A operand directly.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {pack_bf16(acc_s[2 * kk][0], acc_s[2 * kk][1]),
                             pack_bf16(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                             pack_bf16(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                             pack_bf16(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, cV + bkn_offset(lane, kk * 16, dn * 16, S));
        mma_bf16(acc_o[2 * dn], a, b[0], b[1]);
        mma_bf16(acc_o[2 * dn + 1], a, b[2], b[3]);
      }
    }
  }

  // Epilogue: normalize, write lse, stage this warp's 16 output rows in its own rows of sQ (read only
  // by this warp) and store them with 16-byte writes.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int row = row_w + g + 8 * r;
    if (t == 0 && row < T) lse[row] = l > 0.f ? row_max[r] * kLn2 + logf(l) : -INFINITY;
  }
  __syncwarp();
  bf16* sO = sQ + warp * 16 * S;
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(sO + (g + 8 * r) * S + 8 * j + 2 * t) =
          pack_bf16(acc_o[j][2 * r] * inv[r], acc_o[j][2 * r + 1] * inv[r]);
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, row = row_w + r;
    if (row < T)
      *reinterpret_cast<uint4*>(o + static_cast<size_t>(row) * D + col) =
          *reinterpret_cast<const uint4*>(sO + r * S + col);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward preprocessing: delta_i = sum_d dO[i,d] * O[i,d] in fp32 (one warp per row).
template <int D>
__global__ void flash_bwd_preprocess_kernel(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                            float* __restrict__ delta, long long rows) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together (rows are per warp)
  const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(o + row * D);
  const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(dout + row * D);
  float acc = 0.f;
#pragma unroll
  for (int c = lane; c < D / 2; c += 32) {
    const float2 a = __bfloat1622float2(o2[c]), b = __bfloat1622float2(d2[c]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc;
}

// Loads lse (pre-multiplied by log2 e) and delta of query rows m0 .. m0 + BM - 1 into shared memory
// (0 for rows >= T; those rows are masked anyway).
template <int BM, int kThreads>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_delta, const float* lse, const float* delta,
                                               int m0, int T, int tid) {
  for (int i = tid; i < BM; i += kThreads) {
    const int row = m0 + i;
    s_lse[i] = row < T ? lse[row] * kLog2e : 0.f;
    s_delta[i] = row < T ? delta[row] : 0.f;
  }
}

// Backward main kernel (FlashAttention-2). Grid (B*H, ceil(T / kBlockN)); each CTA owns key tile
// n0 .. n0 + BN - 1, keeps dK and dV for it in registers and visits the query tiles from the one
// holding query n0 (the diagonal) to the end. Warp w owns keys n0 + 16w .. n0 + 16w + 15 and works
// with transposed score tiles (keys as rows):
//   S^T = K Q^T,  P^T = exp2(S^T * scale*log2e - lse*log2e) (0 where query < key or out of range),
//   dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T * (dP^T - delta),  dK += dS^T Q,
//   dS^T -> shared memory (bf16), then all warps compute dQ_tile += dS K and add it to the fp32
//   accumulator with atomicAdd (the scale is applied when dq is converted). dK is scaled at the end.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                     const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                     float* __restrict__ dq_accum, bf16* __restrict__ dk, bf16* __restrict__ dv, int T,
                     float scale_log2, float scale) {
  constexpr int D = Tr::D, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStride, SS = Tr::kStrideS;
  constexpr int kThreads = Tr::kThreads, kWarps = Tr::kWarps;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // [BN][S]
  bf16* sV = sK + BN * S;                         // [BN][S]
  bf16* sQ = sV + BN * S;                         // [2][BM][S]
  bf16* sdO = sQ + 2 * BM * S;                    // [2][BM][S]
  bf16* sdS = sdO + 2 * BM * S;                   // [BN][SS]: dS^T, keys x queries
  float* sLse = reinterpret_cast<float*>(sdS + BN * SS);  // [2][BM]
  float* sDelta = sLse + 2 * BM;                          // [2][BM]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.y * BN;
  const size_t head = static_cast<size_t>(blockIdx.x) * T;
  q += head * D, k += head * D, v += head * D, dout += head * D, dq_accum += head * D;
  dk += head * D, dv += head * D, lse += head, delta += head;

  const int m_first = n0 / BM, m_blocks = (T + BM - 1) / BM;
  {
    const int m0 = m_first * BM;
    load_tile_async<BN, D, kThreads>(sK, S, k + static_cast<size_t>(n0) * D, T - n0, tid);
    load_tile_async<BN, D, kThreads>(sV, S, v + static_cast<size_t>(n0) * D, T - n0, tid);
    load_tile_async<BM, D, kThreads>(sQ, S, q + static_cast<size_t>(m0) * D, T - m0, tid);
    load_tile_async<BM, D, kThreads>(sdO, S, dout + static_cast<size_t>(m0) * D, T - m0, tid);
    cp_async_commit();
    load_row_stats<BM, kThreads>(sLse, sDelta, lse, delta, m0, T, tid);
  }

  float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[j][e] = 0.f, acc_dv[j][e] = 0.f;
  const int kw0 = n0 + warp * 16;  // first key of this warp

  for (int mb = m_first; mb < m_blocks; ++mb) {
    const int buf = (mb - m_first) & 1, m0 = mb * BM;
    // Tile mb has landed and is visible; every warp is done with the other buffer and with sdS.
    cp_async_wait_all();
    __syncthreads();
    if (mb + 1 < m_blocks) {
      const int m1 = m0 + BM, b1 = buf ^ 1;
      load_tile_async<BM, D, kThreads>(sQ + b1 * BM * S, S, q + static_cast<size_t>(m1) * D, T - m1, tid);
      load_tile_async<BM, D, kThreads>(sdO + b1 * BM * S, S, dout + static_cast<size_t>(m1) * D, T - m1, tid);
      cp_async_commit();
      load_row_stats<BM, kThreads>(sLse + b1 * BM, sDelta + b1 * BM, lse, delta, m1, T, tid);
    }
    const bf16* cQ = sQ + buf * BM * S;
    const bf16* cdO = sdO + buf * BM * S;
    const float* cLse = sLse + buf * BM;
    const float* cDelta = sDelta + buf * BM;

    // S^T = K Q^T: this warp's 16 keys x BM queries.
    float acc_s[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) acc_s[j][0] = acc_s[j][1] = acc_s[j][2] = acc_s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sK + a_offset(lane, warp * 16, kk * 16, S));
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, cQ + bnk_offset(lane, nn * 16, kk * 16, S));
        mma_bf16(acc_s[2 * nn], a, b[0], b[1]);
        mma_bf16(acc_s[2 * nn + 1], a, b[2], b[3]);
      }
    }

    // P^T in fp32 (exactly 0 where masked: query < key, query >= T or key >= T).
    const bool need_mask = m0 < kw0 + 15 || m0 + BM > T || kw0 + 16 > T;
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = 8 * j + 2 * t + (e & 1);
        float p = exp2f(fmaf(acc_s[j][e], scale_log2, -cLse[qi]));
        if (need_mask) {
          const int key = kw0 + g + 8 * (e >> 1), query = m0 + qi;
          if (query < key || query >= T || key >= T) p = 0.f;
        }
        acc_s[j][e] = p;
      }

    // dV += P^T dO (k = queries).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint32_t a[4] = {pack_bf16(acc_s[2 * kk][0], acc_s[2 * kk][1]),
                             pack_bf16(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                             pack_bf16(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                             pack_bf16(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, cdO + bkn_offset(lane, kk * 16, dn * 16, S));
        mma_bf16(acc_dv[2 * dn], a, b[0], b[1]);
        mma_bf16(acc_dv[2 * dn + 1], a, b[2], b[3]);
      }
    }

    // dP^T = V dO^T: 16 keys x BM queries.
    float acc_dp[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) acc_dp[j][0] = acc_dp[j][1] = acc_dp[j][2] = acc_dp[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sV + a_offset(lane, warp * 16, kk * 16, S));
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, cdO + bnk_offset(lane, nn * 16, kk * 16, S));
        mma_bf16(acc_dp[2 * nn], a, b[0], b[1]);
        mma_bf16(acc_dp[2 * nn + 1], a, b[2], b[3]);
      }
    }

    // dS^T = P^T * (dP^T - delta) in fp32 (gradient of the scaled logits).
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dp[j][e] = acc_s[j][e] * (acc_dp[j][e] - cDelta[8 * j + 2 * t + (e & 1)]);

    // dK += dS^T Q (k = queries), and dS^T -> shared memory for the dQ step.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint32_t a[4] = {pack_bf16(acc_dp[2 * kk][0], acc_dp[2 * kk][1]),
                             pack_bf16(acc_dp[2 * kk][2], acc_dp[2 * kk][3]),
                             pack_bf16(acc_dp[2 * kk + 1][0], acc_dp[2 * kk + 1][1]),
                             pack_bf16(acc_dp[2 * kk + 1][2], acc_dp[2 * kk + 1][3])};
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * SS + 16 * kk + 2 * t) = a[0];
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * SS + 16 * kk + 2 * t) = a[1];
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * SS + 16 * kk + 8 + 2 * t) = a[2];
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * SS + 16 * kk + 8 + 2 * t) = a[3];
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, cQ + bkn_offset(lane, kk * 16, dn * 16, S));
        mma_bf16(acc_dk[2 * dn], a, b[0], b[1]);
        mma_bf16(acc_dk[2 * dn + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // dS^T of every warp is in sdS

    // dQ[m0 .. m0 + BM) += dS K over this CTA's BN keys. Work units: (16 query rows) x (32 columns of
    // D), spread over the warps; each unit's fp32 result is added to the accumulator atomically.
    constexpr int kDChunks = D / 32, kUnits = (BM / 16) * kDChunks;
#pragma unroll 1
    for (int u = warp; u < kUnits; u += kWarps) {
      const int mt = u / kDChunks, dc = u % kDChunks;
      float acc[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, sdS + at_offset(lane, kk * 16, mt * 16, SS));
#pragma unroll
        for (int dn = 0; dn < 2; ++dn) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, sK + bkn_offset(lane, kk * 16, dc * 32 + dn * 16, S));
          mma_bf16(acc[2 * dn], a, b[0], b[1]);
          mma_bf16(acc[2 * dn + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + mt * 16 + g + 8 * r;
        if (row >= T) continue;
        float* dst = dq_accum + static_cast<size_t>(row) * D + dc * 32 + 2 * t;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float2*>(dst + 8 * j), make_float2(acc[j][2 * r], acc[j][2 * r + 1]));
#else
          atomicAdd(dst + 8 * j, acc[j][2 * r]);
          atomicAdd(dst + 8 * j + 1, acc[j][2 * r + 1]);
#endif
        }
      }
    }
  }

  // Epilogue: every warp is done with sK/sV (dQ step); each warp stages its own 16 rows of dK (scaled)
  // and dV there and stores them with 16-byte writes.
  __syncthreads();
  bf16* sdK = sK + warp * 16 * S;
  bf16* sdV = sV + warp * 16 * S;
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(sdK + (g + 8 * r) * S + 8 * j + 2 * t) =
          pack_bf16(acc_dk[j][2 * r] * scale, acc_dk[j][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(sdV + (g + 8 * r) * S + 8 * j + 2 * t) =
          pack_bf16(acc_dv[j][2 * r], acc_dv[j][2 * r + 1]);
    }
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, key = kw0 + r;
    if (key < T) {
      *reinterpret_cast<uint4*>(dk + static_cast<size_t>(key) * D + col) =
          *reinterpret_cast<const uint4*>(sdK + r * S + col);
      *reinterpret_cast<uint4*>(dv + static_cast<size_t>(key) * D + col) =
          *reinterpret_cast<const uint4*>(sdV + r * S + col);
    }
  }
}

// dq = bf16(scale * dq_accum), 4 elements per thread per step (n is a multiple of 4).
__global__ void flash_bwd_convert_dq_kernel(const float* __restrict__ acc, bf16* __restrict__ dq, long long n4,
                                            float scale) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(acc)[i];
    uint2 out;
    out.x = pack_bf16(a.x * scale, a.y * scale);
    out.y = pack_bf16(a.z * scale, a.w * scale);
    reinterpret_cast<uint2*>(dq)[i] = out;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

void check_shape(int B, int H, int T, int D) {
  fa_require(B >= 1 && H >= 1 && T >= 1, "B, H and T must be >= 1 (got B=" + std::to_string(B) +
                                             " H=" + std::to_string(H) + " T=" + std::to_string(T) + ")");
  fa_require(D == 64 || D == 128, "head dim D must be 64 or 128 (got " + std::to_string(D) + ")");
  fa_require(static_cast<long long>(B) * H <= INT_MAX, "B * H too large");
}

void check_tensor(const void* p, const char* name) {
  fa_require(p != nullptr, std::string(name) + " is null");
  fa_require(aligned(p, 16), std::string(name) + " must be 16-byte aligned");
}

template <class Tr>
void launch_forward(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, int B, int H, int T,
                    cudaStream_t s) {
  const long long m_blocks = (static_cast<long long>(T) + Tr::kBlockM - 1) / Tr::kBlockM;
  fa_require(m_blocks <= 65535, "T too large for the forward grid");
  const float scale = 1.0f / std::sqrt(static_cast<float>(Tr::D));
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(m_blocks));
  FA_CHECK(cudaFuncSetAttribute(flash_fwd_kernel<Tr>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(Tr::kSmemBytes)));
  flash_fwd_kernel<Tr><<<grid, Tr::kThreads, Tr::kSmemBytes, s>>>(q, k, v, o, lse, T, scale * kLog2e);
  FA_CHECK_LAUNCH("flash_fwd_kernel");
}

template <class Tr>
void launch_backward(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout, const float* lse,
                     bf16* dq, bf16* dk, bf16* dv, float* dq_accum, float* delta, int B, int H, int T,
                     cudaStream_t s) {
  constexpr int D = Tr::D;
  const long long n_blocks = (static_cast<long long>(T) + Tr::kBlockN - 1) / Tr::kBlockN;
  fa_require(n_blocks <= 65535, "T too large for the backward grid");
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const long long rows = static_cast<long long>(B) * H * T;
  const long long numel = rows * D;

  FA_CHECK(cudaMemsetAsync(dq_accum, 0, static_cast<size_t>(numel) * sizeof(float), s));

  constexpr int kPreThreads = 256, kPreRowsPerBlock = kPreThreads / 32;
  const long long pre_blocks = (rows + kPreRowsPerBlock - 1) / kPreRowsPerBlock;
  fa_require(pre_blocks <= INT_MAX, "B * H * T too large");
  flash_bwd_preprocess_kernel<D><<<static_cast<unsigned>(pre_blocks), kPreThreads, 0, s>>>(o, dout, delta, rows);
  FA_CHECK_LAUNCH("flash_bwd_preprocess_kernel");

  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(n_blocks));
  FA_CHECK(cudaFuncSetAttribute(flash_bwd_kernel<Tr>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(Tr::kSmemBytes)));
  flash_bwd_kernel<Tr><<<grid, Tr::kThreads, Tr::kSmemBytes, s>>>(q, k, v, dout, lse, delta, dq_accum, dk, dv, T,
                                                                   scale * kLog2e, scale);
  FA_CHECK_LAUNCH("flash_bwd_kernel");

  constexpr int kConvThreads = 256;
  const long long n4 = numel / 4;
  const long long conv_blocks = std::min<long long>((n4 + kConvThreads - 1) / kConvThreads, 1 << 16);
  flash_bwd_convert_dq_kernel<<<static_cast<unsigned>(conv_blocks), kConvThreads, 0, s>>>(dq_accum, dq, n4, scale);
  FA_CHECK_LAUNCH("flash_bwd_convert_dq_kernel");
}

}  // namespace

void flash_attn_forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o,
                        float* lse, int B, int H, int T, int D, cudaStream_t s) {
  check_shape(B, H, T, D);
  check_tensor(q, "q"), check_tensor(k, "k"), check_tensor(v, "v"), check_tensor(o, "o");
  fa_require(lse != nullptr && aligned(lse, alignof(float)), "lse is null or misaligned");
  if (D == 64)
    launch_forward<Fwd64>(q, k, v, o, lse, B, H, T, s);
  else
    launch_forward<Fwd128>(q, k, v, o, lse, B, H, T, s);
}

size_t flash_attn_backward_scratch_bytes(int B, int H, int T, int D) {
  check_shape(B, H, T, D);
  const size_t rows = static_cast<size_t>(B) * H * T;
  const size_t accum = rows * D * sizeof(float);  // a multiple of 256 bytes (D >= 64)
  return accum + rows * sizeof(float);
}

void flash_attn_backward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                         const __nv_bfloat16* o, const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq,
                         __nv_bfloat16* dk, __nv_bfloat16* dv, void* scratch, int B, int H, int T, int D,
                         cudaStream_t s) {
  check_shape(B, H, T, D);
  check_tensor(q, "q"), check_tensor(k, "k"), check_tensor(v, "v"), check_tensor(o, "o");
  check_tensor(dout, "dout"), check_tensor(dq, "dq"), check_tensor(dk, "dk"), check_tensor(dv, "dv");
  check_tensor(scratch, "scratch");
  fa_require(lse != nullptr && aligned(lse, alignof(float)), "lse is null or misaligned");
  const size_t rows = static_cast<size_t>(B) * H * T;
  float* dq_accum = static_cast<float*>(scratch);
  float* delta = dq_accum + rows * D;
  if (D == 64)
    launch_backward<Bwd64>(q, k, v, o, dout, lse, dq, dk, dv, dq_accum, delta, B, H, T, s);
  else
    launch_backward<Bwd128>(q, k, v, o, dout, lse, dq, dk, dv, dq_accum, delta, B, H, T, s);
}

}  // namespace mta::cuda
