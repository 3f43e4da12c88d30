// Fused causal attention (FlashAttention-2 algorithm), bf16 in/out, fp32 accumulation. See
// flash_attn.h for the contract. Layout of this file: error checking, tile traits, the kernels
// (forward; backward preprocess, main, dq conversion), then the host launch code. The device
// primitives (cp.async, ldmatrix, mma.sync) and the fragment conventions are in mma_sm80.cuh.
#include "attention/flash_attn.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/flash_common.cuh"
#include "attention/mma_sm80.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;  // NOLINT: the kernels below are written in terms of these primitives

// ---------------------------------------------------------------------------------------------
// Error checking: every CUDA call and every launch (cudaGetLastError) goes through these.

#define FA_CHECK(expr) MTA_CUDA_CHECK(expr)
#define FA_CHECK_LAUNCH(name) MTA_CUDA_CHECK_LAUNCH(name)

void fa_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flash_attn: " + what);
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
// kDrop: attention dropout (a separate instantiation, so the kernels without it are unchanged).
template <class Tr, bool kDrop>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    flash_fwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                     bf16* __restrict__ o, float* __restrict__ lse, int T, int H, HeadLayout lin, HeadLayout lout,
                     float scale_log2, float p_drop, unsigned long long drop_seed) {
  constexpr int D = Tr::D, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStride, kThreads = Tr::kThreads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + BM * S;      // [2][BN][S]
  bf16* sV = sK + 2 * BN * S;  // [2][BN][S]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const long long b = blockIdx.x / H, h = blockIdx.x % H, rs = lin.row;
  const long long in_off = b * lin.batch + h * lin.head;
  q += in_off, k += in_off, v += in_off, o += b * lout.batch + h * lout.head;
  lse += static_cast<size_t>(blockIdx.x) * T;

  const int kv_end = min(T, m0 + BM);  // keys this CTA needs: 0 .. kv_end - 1
  const int n_blocks = (kv_end + BN - 1) / BN;

  load_tile_async<BM, D, kThreads>(sQ, S, q + m0 * rs, T - m0, tid, rs);
  load_tile_async<BN, D, kThreads>(sK, S, k, T, tid, rs);
  load_tile_async<BN, D, kThreads>(sV, S, v, T, tid, rs);
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
      load_tile_async<BN, D, kThreads>(sK + buf1 * BN * S, S, k + n1 * rs, T - n1, tid, rs);
      load_tile_async<BN, D, kThreads>(sV + buf1 * BN * S, S, v + n1 * rs, T - n1, tid, rs);
      cp_async_commit();
    }
    const int n0 = nb * BN;
    const bf16* cK = sK + (nb & 1) * BN * S;
    const bf16* cV = sV + (nb & 1) * BN * S;
    if (row_w >= T || n0 > row_w + 15) continue;  // padding rows only, or every key in the future

    // S = Q K^T for this warp's 16 rows x BN keys.
    float acc_s[BN / 8][4];
    warp_gemm_abt<BN, D, S>(acc_s, sQ + warp * 16 * S, cK, lane);

    mask_future<BN>(acc_s, n0, row_w, T, lane);
    online_softmax<BN, D>(acc_s, row_max, row_sum, acc_o, scale_log2);
    if (kDrop) apply_dropout<BN>(acc_s, blockIdx.x, T, row_w, n0, p_drop, drop_seed, lane);  // after the row sums
    accumulate_pv<BN, D, S>(acc_s, cV, acc_o, lane);
  }

  // Epilogue: this warp's 16 output rows are staged in its own rows of sQ (read only by this warp).
  store_output_rows<D, S>(acc_o, row_max, row_sum, sQ + warp * 16 * S, o, lse, row_w, T, lane, lout.row);
}

// RoPE's rotation of one pair (x0, x1) by (cos, sin), transposed: the gradient with respect to the pair
// before the rotation (dq, dk of the un-rotated q, k).
__device__ __forceinline__ void rotate_back(float& x0, float& x1, float c, float s) {
  const float y0 = x0 * c + x1 * s, y1 = x1 * c - x0 * s;
  x0 = y0, x1 = y1;
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
//   accumulator with atomicAdd (the scale is applied when dq is converted). dK is scaled at the end (and
//   rotated back by RoPE when rope_cs is not null; flash_attn.h).
template <class Tr, bool kDrop>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                     const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                     float* __restrict__ dq_accum, bf16* __restrict__ dk, bf16* __restrict__ dv, int T, int H,
                     HeadLayout lin, HeadLayout lout, const float* __restrict__ rope_cs, float scale_log2, float scale,
                     float p_drop, unsigned long long drop_seed) {
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
  const long long b = blockIdx.x / H, h = blockIdx.x % H, rs = lin.row, rso = lout.row;
  const long long in_off = b * lin.batch + h * lin.head;
  q += in_off, k += in_off, v += in_off, dk += in_off, dv += in_off;
  dout += b * lout.batch + h * lout.head;
  dq_accum += head * D, lse += head, delta += head;

  const int m_first = n0 / BM, m_blocks = (T + BM - 1) / BM;
  {
    const int m0 = m_first * BM;
    load_tile_async<BN, D, kThreads>(sK, S, k + n0 * rs, T - n0, tid, rs);
    load_tile_async<BN, D, kThreads>(sV, S, v + n0 * rs, T - n0, tid, rs);
    load_tile_async<BM, D, kThreads>(sQ, S, q + m0 * rs, T - m0, tid, rs);
    load_tile_async<BM, D, kThreads>(sdO, S, dout + m0 * rso, T - m0, tid, rso);
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
      load_tile_async<BM, D, kThreads>(sQ + b1 * BM * S, S, q + m1 * rs, T - m1, tid, rs);
      load_tile_async<BM, D, kThreads>(sdO + b1 * BM * S, S, dout + m1 * rso, T - m1, tid, rso);
      cp_async_commit();
      load_row_stats<BM, kThreads>(sLse + b1 * BM, sDelta + b1 * BM, lse, delta, m1, T, tid);
    }
    const bf16* cQ = sQ + buf * BM * S;
    const bf16* cdO = sdO + buf * BM * S;
    const float* cLse = sLse + buf * BM;
    const float* cDelta = sDelta + buf * BM;

    // S^T = K Q^T: this warp's 16 keys x BM queries.
    float acc_s[BM / 8][4];
    warp_gemm_abt<BM, D, S>(acc_s, sK + warp * 16 * S, cQ, lane);

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

    // With attention dropout, the weights that met V are P^T times the mask factor (the forward's mask).
    auto drop = [&](int j, int e) {
      return kDrop ? dropout_factor(blockIdx.x, T, m0 + 8 * j + 2 * t + (e & 1), kw0 + g + 8 * (e >> 1), p_drop,
                                    drop_seed)
                   : 1.f;
    };
    // dV += (P^T * mask) dO (k = queries).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const int j0 = 2 * kk, j1 = 2 * kk + 1;
      const uint32_t a[4] = {pack_bf16(acc_s[j0][0] * drop(j0, 0), acc_s[j0][1] * drop(j0, 1)),
                             pack_bf16(acc_s[j0][2] * drop(j0, 2), acc_s[j0][3] * drop(j0, 3)),
                             pack_bf16(acc_s[j1][0] * drop(j1, 0), acc_s[j1][1] * drop(j1, 1)),
                             pack_bf16(acc_s[j1][2] * drop(j1, 2), acc_s[j1][3] * drop(j1, 3))};
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
    warp_gemm_abt<BM, D, S>(acc_dp, sV + warp * 16 * S, cdO, lane);

    // dS^T = P^T * (dP^T * mask - delta) in fp32 (gradient of the scaled logits; delta = dO . O with
    // the dropped-out O).
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        acc_dp[j][e] = acc_s[j][e] * (acc_dp[j][e] * drop(j, e) - cDelta[8 * j + 2 * t + (e & 1)]);

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
        for (int j = 0; j < 4; ++j) atomic_add2(dst + 8 * j, acc[j][2 * r], acc[j][2 * r + 1]);
      }
    }
  }

  // Epilogue: every warp is done with sK/sV (dQ step); each warp stages its own 16 rows of dK (scaled,
  // and rotated back by RoPE when asked: columns 8j + 2t, 8j + 2t + 1 are pair 4j + t) and dV there and
  // stores them with 16-byte writes.
  __syncthreads();
  bf16* sdK = sK + warp * 16 * S;
  bf16* sdV = sV + warp * 16 * S;
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float x0 = acc_dk[j][2 * r] * scale, x1 = acc_dk[j][2 * r + 1] * scale;
      const int key = kw0 + g + 8 * r;
      if (rope_cs != nullptr && key < T) {
        const float2 cs = *reinterpret_cast<const float2*>(rope_cs + 2 * (static_cast<size_t>(key) * (D / 2) + 4 * j + t));
        rotate_back(x0, x1, cs.x, cs.y);
      }
      *reinterpret_cast<uint32_t*>(sdK + (g + 8 * r) * S + 8 * j + 2 * t) = pack_bf16(x0, x1);
      *reinterpret_cast<uint32_t*>(sdV + (g + 8 * r) * S + 8 * j + 2 * t) =
          pack_bf16(acc_dv[j][2 * r], acc_dv[j][2 * r + 1]);
    }
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, key = kw0 + r;
    if (key < T) {
      *reinterpret_cast<uint4*>(dk + key * rs + col) = *reinterpret_cast<const uint4*>(sdK + r * S + col);
      *reinterpret_cast<uint4*>(dv + key * rs + col) =
          *reinterpret_cast<const uint4*>(sdV + r * S + col);
    }
  }
}

// dq = bf16(scale * acc) from the contiguous fp32 accumulator [B, H, T, D] into dq laid out as `lq`,
// rotated back by RoPE when rope_cs is not null (as dK in the epilogue above). 4 elements (2 pairs) per
// thread per step.
template <int D>
__global__ void convert_dq_kernel(const float* __restrict__ acc, bf16* __restrict__ dq, long long n4, int T, int H,
                                  HeadLayout lq, const float* __restrict__ rope_cs, float scale) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long e = 4 * i, row = e / D, bh = row / T;
    const int c = static_cast<int>(e % D), t = static_cast<int>(row % T);
    const float4 a = reinterpret_cast<const float4*>(acc)[i];
    float x[4] = {a.x * scale, a.y * scale, a.z * scale, a.w * scale};
    if (rope_cs != nullptr) {
      const float4 cs = *reinterpret_cast<const float4*>(rope_cs + 2 * (static_cast<long long>(t) * (D / 2) + c / 2));
      rotate_back(x[0], x[1], cs.x, cs.y);
      rotate_back(x[2], x[3], cs.z, cs.w);
    }
    uint2 packed;
    packed.x = pack_bf16(x[0], x[1]);
    packed.y = pack_bf16(x[2], x[3]);
    *reinterpret_cast<uint2*>(dq + (bh / H) * lq.batch + (bh % H) * lq.head + t * lq.row + c) = packed;
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
                    const HeadLayout& lin, const HeadLayout& lout, cudaStream_t s, float p_drop,
                    unsigned long long seed) {
  const long long m_blocks = (static_cast<long long>(T) + Tr::kBlockM - 1) / Tr::kBlockM;
  fa_require(m_blocks <= 65535, "T too large for the forward grid");
  const float scale = 1.0f / std::sqrt(static_cast<float>(Tr::D));
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(m_blocks));
  auto kernel = p_drop > 0.f ? flash_fwd_kernel<Tr, true> : flash_fwd_kernel<Tr, false>;
  FA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Tr::kSmemBytes)));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, s>>>(q, k, v, o, lse, T, H, lin, lout, scale * kLog2e, p_drop, seed);
  FA_CHECK_LAUNCH("flash_fwd_kernel");
}

template <class Tr>
void launch_backward(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout, const float* lse,
                     bf16* dq, bf16* dk, bf16* dv, float* dq_accum, float* delta, int B, int H, int T,
                     const HeadLayout& lin, const HeadLayout& lout, const float* rope_cs, cudaStream_t s,
                     float p_drop, unsigned long long seed) {
  constexpr int D = Tr::D;
  const long long n_blocks = (static_cast<long long>(T) + Tr::kBlockN - 1) / Tr::kBlockN;
  fa_require(n_blocks <= 65535, "T too large for the backward grid");
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const long long rows = static_cast<long long>(B) * H * T;
  const long long numel = rows * D;

  FA_CHECK(cudaMemsetAsync(dq_accum, 0, static_cast<size_t>(numel) * sizeof(float), s));

  launch_row_dot<D>(o, dout, delta, rows, T, H, lout.batch, lout.head, lout.row, s);

  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(n_blocks));
  auto kernel = p_drop > 0.f ? flash_bwd_kernel<Tr, true> : flash_bwd_kernel<Tr, false>;
  FA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Tr::kSmemBytes)));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, s>>>(q, k, v, dout, lse, delta, dq_accum, dk, dv, T, H, lin, lout,
                                                    rope_cs, scale * kLog2e, scale, p_drop, seed);
  FA_CHECK_LAUNCH("flash_bwd_kernel");

  constexpr int kConvThreads = 256;
  const long long n4 = numel / 4;
  const long long conv_blocks = std::min<long long>((n4 + kConvThreads - 1) / kConvThreads, 1 << 16);
  convert_dq_kernel<D><<<static_cast<unsigned>(conv_blocks), kConvThreads, 0, s>>>(dq_accum, dq, n4, T, H, lin,
                                                                                 rope_cs, scale);
  FA_CHECK_LAUNCH("convert_dq_kernel");
}

void check_layout(const HeadLayout& l, const char* name) {
  fa_require(l.batch >= 0 && l.head >= 0 && l.row >= 0 && l.batch % 8 == 0 && l.head % 8 == 0 && l.row % 8 == 0,
             std::string("the strides of ") + name + " must be non-negative multiples of 8 elements (got batch " +
                 std::to_string(l.batch) + ", head " + std::to_string(l.head) + ", row " + std::to_string(l.row) +
                 ")");
}

}  // namespace

HeadLayout contiguous_heads(int H, int T, int D) {
  return HeadLayout{static_cast<long long>(H) * T * D, static_cast<long long>(T) * D, D};
}

HeadLayout token_major(int T, int D, long long width) { return HeadLayout{T * width, D, width}; }

void flash_attn_forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o,
                        float* lse, int B, int H, int T, int D, const HeadLayout& in, const HeadLayout& out,
                        cudaStream_t s, float dropout, unsigned long long dropout_seed) {
  check_shape(B, H, T, D);
  check_tensor(q, "q"), check_tensor(k, "k"), check_tensor(v, "v"), check_tensor(o, "o");
  check_layout(in, "q, k, v"), check_layout(out, "o");
  fa_require(lse != nullptr && aligned(lse, alignof(float)), "lse is null or misaligned");
  fa_require(dropout >= 0.f && dropout < 1.f, "dropout must be in [0, 1)");
  if (D == 64)
    launch_forward<Fwd64>(q, k, v, o, lse, B, H, T, in, out, s, dropout, dropout_seed);
  else
    launch_forward<Fwd128>(q, k, v, o, lse, B, H, T, in, out, s, dropout, dropout_seed);
}

void flash_attn_forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o,
                        float* lse, int B, int H, int T, int D, cudaStream_t s, float dropout,
                        unsigned long long dropout_seed) {
  const HeadLayout dense = contiguous_heads(H, T, D);
  flash_attn_forward(q, k, v, o, lse, B, H, T, D, dense, dense, s, dropout, dropout_seed);
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
                         const HeadLayout& in, const HeadLayout& out, const float* grad_rope_cs, cudaStream_t s,
                         float dropout, unsigned long long dropout_seed) {
  check_shape(B, H, T, D);
  check_tensor(q, "q"), check_tensor(k, "k"), check_tensor(v, "v"), check_tensor(o, "o");
  check_tensor(dout, "dout"), check_tensor(dq, "dq"), check_tensor(dk, "dk"), check_tensor(dv, "dv");
  check_tensor(scratch, "scratch");
  check_layout(in, "q, k, v, dq, dk, dv"), check_layout(out, "o, dout");
  fa_require(grad_rope_cs == nullptr || aligned(grad_rope_cs, 16), "the RoPE table must be 16-byte aligned");
  fa_require(lse != nullptr && aligned(lse, alignof(float)), "lse is null or misaligned");
  fa_require(dropout >= 0.f && dropout < 1.f, "dropout must be in [0, 1)");
  const size_t rows = static_cast<size_t>(B) * H * T;
  float* dq_accum = static_cast<float*>(scratch);
  float* delta = dq_accum + rows * D;
  if (D == 64)
    launch_backward<Bwd64>(q, k, v, o, dout, lse, dq, dk, dv, dq_accum, delta, B, H, T, in, out, grad_rope_cs, s,
                           dropout, dropout_seed);
  else
    launch_backward<Bwd128>(q, k, v, o, dout, lse, dq, dk, dv, dq_accum, delta, B, H, T, in, out, grad_rope_cs, s,
                            dropout, dropout_seed);
}

void flash_attn_backward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                         const __nv_bfloat16* o, const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq,
                         __nv_bfloat16* dk, __nv_bfloat16* dv, void* scratch, int B, int H, int T, int D,
                         cudaStream_t s, float dropout, unsigned long long dropout_seed) {
  const HeadLayout dense = contiguous_heads(H, T, D);
  flash_attn_backward(q, k, v, o, dout, lse, dq, dk, dv, scratch, B, H, T, D, dense, dense, nullptr, s, dropout,
                      dropout_seed);
}

}  // namespace mta::cuda
