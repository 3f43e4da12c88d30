// FlashMix forward: head mixing before and / or after the softmax, fused (see flash_mix.h and
// docs/flash-mta.md, "one warp per head").
//
// A CTA owns 16 query rows of one batch element and one coupled group of G heads, one warp per head.
// Per block of 16 keys, each warp computes its head's logit tile S (mma, Q fragments in registers,
// its K tile in shared memory), writes it to an exchange buffer, and after a barrier forms its mixed
// logits C' = sum_y Mpre[x, y] S_y from the G tiles (mixing is position-wise, so each lane mixes its
// own positions with CUDA-core FMAs). Two passes, as the post-softmax mixing needs every head's
// normalized weights:
//   pass 1 (kOut = false): online row max / sum of C' per head -> lse;
//   pass 2 (kOut = true):  A = exp(C' - lse) -> exchange -> A3 = sum_y Mpost[x, y] A_y -> O += A3 V.
// K and V of one batch element's group stay in L2 while its CTAs run, so the re-reads by the small
// query tiles are L2 traffic.
#include "attention/flash_mix.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention/flash_common.cuh"
#include "attention/mma_sm80.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;  // NOLINT: the kernels are written in terms of these primitives

constexpr int kTile = 16;  // query rows per CTA and keys per step: one m16 block, two n8 blocks
constexpr int kMaxG = 16;  // heads per CTA (one warp each)
// fp32 row stride of the exchange tiles: a half-warp's 8-byte accesses (rows g = 0..3, columns
// 2t, 2t + 1) then fall into 16 distinct bank pairs (g * kXS mod 32 = 0, 24, 16, 8).
constexpr int kXS = 24;

void mix_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flash_mix: " + what);
}

// Shared memory: K (and V) tiles [G][16][D + 8] bf16, the exchange tiles [G][16][kXS] fp32 (S, and A
// in pass 2), and the mixing coefficients [4][G][kMaxG] fp32 (load_coefficients).
template <int D>
size_t smem_bytes(int G, bool out) {
  const size_t tiles = static_cast<size_t>(G) * kTile * (D + 8) * sizeof(bf16) * (out ? 2 : 1);
  const size_t xch = static_cast<size_t>(G) * kTile * kXS * sizeof(float) * (out ? 2 : 1);
  return tiles + xch + 4 * static_cast<size_t>(G) * kMaxG * sizeof(float);
}

// Rows r0 .. r0 + 15 of one head ([T][D] bf16 at `head`) into shared memory (row stride S) with one
// warp's 32 lanes; rows at or past T are zero-filled (`head` is their dummy source: T >= 1).
template <int D, int S>
__device__ __forceinline__ void warp_load_rows(bf16* smem, const bf16* head, int r0, int T, int lane) {
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < kTile * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = r0 + r < T;
    cp_async_16(smem + r * S + col, ok ? head + static_cast<size_t>(r0 + r) * D + col : head, ok ? 16 : 0);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// sum over the warp's 16 x 16 positions of x (accumulator layout) times an exchange tile, reduced over
// the warp (every lane gets the sum).
__device__ __forceinline__ float warp_dot_tile(const float (&x)[2][4], const float* tile, int g, int t) {
  float v = 0.f;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float2 y = *reinterpret_cast<const float2*>(tile + (g + 8 * r) * kXS + 8 * j + 2 * t);
      v += x[j][2 * r] * y.x + x[j][2 * r + 1] * y.y;
    }
  return warp_sum(v);
}

// sum_y coef[y] * x[y tile](row, col .. col + 1) over n tiles starting at `first` (pairs of positions).
__device__ __forceinline__ float2 mix_pair(const float* xch, const float* coef, int first, int n, int row, int col) {
  float2 acc = make_float2(0.f, 0.f);
  for (int y = 0; y < n; ++y) {
    const float w = coef[y];
    const float2 val = *reinterpret_cast<const float2*>(xch + ((first + y) * kTile + row) * kXS + col);
    acc.x = fmaf(w, val.x, acc.x);
    acc.y = fmaf(w, val.y, acc.y);
  }
  return acc;
}

// This head's coefficients: rows (C'_x = sum_y M[x, y] S_y) and columns (the adjoint,
// dS_y = sum_x M[x, y] dC'_x) of its head_pre and head_post groups, into sCoef [4][G][kMaxG].
__device__ __forceinline__ void load_coefficients(float* sCoef, const float* mpre, int gpre, const float* mpost,
                                                  int gpost, int h, int G, int warp, int lane) {
  if (lane >= kMaxG) return;
  const int y = lane;
  float* row_pre = sCoef + warp * kMaxG;
  float* row_post = sCoef + (G + warp) * kMaxG;
  float* col_pre = sCoef + (2 * G + warp) * kMaxG;
  float* col_post = sCoef + (3 * G + warp) * kMaxG;
  const bool pre = gpre && y < gpre, post = gpost && y < gpost;
  const size_t bpre = gpre ? static_cast<size_t>(h / gpre) * gpre * gpre : 0;
  const size_t bpost = gpost ? static_cast<size_t>(h / gpost) * gpost * gpost : 0;
  row_pre[y] = pre ? mpre[bpre + (h % gpre) * gpre + y] : 0.f;
  col_pre[y] = pre ? mpre[bpre + y * gpre + h % gpre] : 0.f;
  row_post[y] = post ? mpost[bpost + (h % gpost) * gpost + y] : 0.f;
  col_post[y] = post ? mpost[bpost + y * gpost + h % gpost] : 0.f;
}

// A warp's place in a CTA of these kernels (blockIdx.x = batch * units + unit of G coupled heads, one
// warp per head) and its mixing coefficients (loaded by load_coefficients into sCoef).
struct MixWarp {
  int warp, lane, g, t, h;  // h: the head within its batch element
  size_t head;              // the head's first row in [B * H * T]
  int fpre, fpost;          // the first warp of its head_pre / head_post group in the CTA
  // Its rows (cpre, cpost) and columns (cpreT, cpostT) of the groups' matrices in sCoef.
  __device__ __forceinline__ const float* cpre(const float* sCoef) const { return sCoef + warp * kMaxG; }
  __device__ __forceinline__ const float* cpost(const float* sCoef, int G) const { return sCoef + (G + warp) * kMaxG; }
  __device__ __forceinline__ const float* cpreT(const float* sCoef, int G) const {
    return sCoef + (2 * G + warp) * kMaxG;
  }
  __device__ __forceinline__ const float* cpostT(const float* sCoef, int G) const {
    return sCoef + (3 * G + warp) * kMaxG;
  }
};
__device__ __forceinline__ MixWarp mix_warp(float* sCoef, const float* mpre, int gpre, const float* mpost, int gpost,
                                            int H, int T, int G) {
  MixWarp w;
  w.warp = threadIdx.x >> 5, w.lane = threadIdx.x & 31, w.g = w.lane >> 2, w.t = w.lane & 3;
  const int units = H / G, b = blockIdx.x / units, u = blockIdx.x % units;
  w.h = u * G + w.warp;
  w.head = static_cast<size_t>(b * H + w.h) * T;
  w.fpre = gpre ? w.warp - w.h % gpre : w.warp;
  w.fpost = gpost ? w.warp - w.h % gpost : w.warp;
  load_coefficients(sCoef, mpre, gpre, mpost, gpost, w.h, G, w.warp, w.lane);
  return w;
}

// At D = 128 the groups stop at 8 heads (256 threads), which leaves each thread the registers for its
// 64 output accumulators and 32 Q fragment words.
template <int D, bool kOut>
__global__ void __launch_bounds__(D == 64 ? 32 * kMaxG : 16 * kMaxG)
    flash_mix_fwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                         const float* __restrict__ mpre, int gpre, const float* __restrict__ mpost, int gpost,
                         bf16* __restrict__ o, float* __restrict__ lse, int H, int T, int G, float scale) {
  constexpr int S = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);                           // [G][16][S]
  bf16* sV = sK + G * kTile * S;                                          // [G][16][S], pass 2
  float* sX = reinterpret_cast<float*>(sV + (kOut ? G * kTile * S : 0));  // [G][16][kXS]: S0
  float* sA = sX + G * kTile * kXS;                                       // [G][16][kXS]: A, pass 2
  float* sCoef = sA + (kOut ? G * kTile * kXS : 0);                       // [4][G][kMaxG]: mixing coefficients
  const MixWarp mw = mix_warp(sCoef, mpre, gpre, mpost, gpost, H, T, G);
  const int warp = mw.warp, lane = mw.lane, g = mw.g, t = mw.t;
  const size_t head = mw.head;
  const int m0 = ((T + kTile - 1) / kTile - 1 - static_cast<int>(blockIdx.y)) * kTile;  // heavy tiles first
  q += head * D, k += head * D, v += head * D;

  // Q of the warp's 16 rows as mma A fragments, staged through its K tile.
  bf16* myK = sK + warp * kTile * S;
  bf16* myV = sV + warp * kTile * S;
  float* myX = sX + warp * kTile * kXS;
  float* myA = sA + warp * kTile * kXS;
  warp_load_rows<D, S>(myK, q, m0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qa[kk], myK + a_offset(lane, 0, kk * 16, S));
  __syncwarp();

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // pass 1 (log2 domain)
  float lse2[2] = {0.f, 0.f};                                          // pass 2: lse * log2(e)
  float acc_o[kOut ? D / 8 : 1][4] = {};
  if (kOut)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + g + 8 * r;
      lse2[r] = row < T ? lse[head + row] * kLog2e : 0.f;
    }

  const int n_end = min(T, m0 + kTile);  // keys up to the tile's last row
  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    warp_load_rows<D, S>(myK, k, n0, T, lane);
    if (kOut) warp_load_rows<D, S>(myV, v, n0, T, lane);
    cp_async_commit();
    cp_async_wait_all();
    __syncwarp();
    float acc_s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bb[4];
      ldmatrix_x4(bb, myK + bnk_offset(lane, 0, kk * 16, S));
      mma_bf16(acc_s[0], qa[kk], bb[0], bb[1]);
      mma_bf16(acc_s[1], qa[kk], bb[2], bb[3]);
    }
    // S0: scaled logits, the future (and keys past T) as 0, into the exchange.
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t, row = m0 + rl, col = n0 + cl;
        float2 val;
        val.x = col <= row && col < T ? acc_s[j][2 * r] * scale : 0.f;
        val.y = col + 1 <= row && col + 1 < T ? acc_s[j][2 * r + 1] * scale : 0.f;
        *reinterpret_cast<float2*>(myX + rl * kXS + cl) = val;
      }
    __syncthreads();
    // C' of this warp's head at its positions (log2 domain), the future as -inf.
    float c[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t, row = m0 + rl, col = n0 + cl;
        const float2 x = gpre ? mix_pair(sX, mw.cpre(sCoef), mw.fpre, gpre, rl, cl)
                              : *reinterpret_cast<const float2*>(myX + rl * kXS + cl);
        c[j][2 * r] = col <= row && col < T ? x.x * kLog2e : -INFINITY;
        c[j][2 * r + 1] = col + 1 <= row && col + 1 < T ? x.y * kLog2e : -INFINITY;
      }
    if (!kOut) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = fmaxf(fmaxf(c[0][2 * r], c[0][2 * r + 1]), fmaxf(c[1][2 * r], c[1][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[r], mx);  // finite: key 0 is visible to every row
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 2; ++j) sum += exp2f(c[j][2 * r] - m_new) + exp2f(c[j][2 * r + 1] - m_new);
        row_sum[r] = row_sum[r] * exp2f(row_max[r] - m_new) + sum;
        row_max[r] = m_new;
      }
    } else {
      // A = exp(C' - lse) into the exchange, then A3 = sum_y Mpost[x, y] A_y, then O += A3 V.
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<float2*>(myA + (g + 8 * r) * kXS + 8 * j + 2 * t) =
              make_float2(exp2f(c[j][2 * r] - lse2[r]), exp2f(c[j][2 * r + 1] - lse2[r]));
      __syncthreads();
      float a3[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rl = g + 8 * r, cl = 8 * j + 2 * t;
          const float2 x = gpost ? mix_pair(sA, mw.cpost(sCoef, G), mw.fpost, gpost, rl, cl)
                                 : *reinterpret_cast<const float2*>(myA + rl * kXS + cl);
          a3[j][2 * r] = x.x, a3[j][2 * r + 1] = x.y;
        }
      const uint32_t a[4] = {pack_bf16(a3[0][0], a3[0][1]), pack_bf16(a3[0][2], a3[0][3]),
                             pack_bf16(a3[1][0], a3[1][1]), pack_bf16(a3[1][2], a3[1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, myV + bkn_offset(lane, 0, dn * 16, S));
        mma_bf16(acc_o[2 * dn], a, bb[0], bb[1]);
        mma_bf16(acc_o[2 * dn + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done reading the exchange before the next block writes it
  }

  if (!kOut) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = m0 + g + 8 * r;
      if (t == 0 && row < T) lse[head + row] = row_max[r] * kLn2 + logf(l);
    }
    return;
  }
  // O rows (A3 is normalized: no division), staged through the warp's K tile, 16-byte stores.
  __syncwarp();
#pragma unroll
  for (int j = 0; j < (kOut ? D / 8 : 0); ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(myK + (g + 8 * r) * S + 8 * j + 2 * t) =
          pack_bf16(acc_o[j][2 * r], acc_o[j][2 * r + 1]);
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
  bf16* out = o + head * D;
#pragma unroll
  for (int cc = lane; cc < kTile * kChunksPerRow; cc += 32) {
    const int r = cc / kChunksPerRow, col = (cc % kChunksPerRow) * 8, row = m0 + r;
    if (row < T)
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(row) * D + col) =
          *reinterpret_cast<const uint4*>(myK + r * S + col);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: the same groups as the forward (16 heads at D = 64, 8 at D = 128); each thread keeps dK
// and dV of its head's 16 keys and the V fragments in registers.
constexpr int kMaxGBwd = kMaxG;

// A operand fragments of a warp's 16-row tile (row-major, stride S) for a product over D.
template <int D, int S>
__device__ __forceinline__ void load_a_frags(uint32_t (&fr)[D / 16][4], const bf16* tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(fr[kk], tile + a_offset(lane, 0, kk * 16, S));
}

// acc = A B^T for 16 x 16 with A as fragments (16 rows x D) and B the 16 rows of a tile (stride S).
template <int D, int S>
__device__ __forceinline__ void frag_gemm_abt(float (&acc)[2][4], const uint32_t (&a)[D / 16][4], const bf16* tile,
                                              int lane) {
#pragma unroll
  for (int j = 0; j < 2; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t bb[4];
    ldmatrix_x4(bb, tile + bnk_offset(lane, 0, kk * 16, S));
    mma_bf16(acc[0], a[kk], bb[0], bb[1]);
    mma_bf16(acc[1], a[kk], bb[2], bb[3]);
  }
}

// acc (16 x D) += P B with P a 16 x 16 tile in accumulator layout (rounded to bf16) and B = 16 rows x D
// of a tile (stride S), k = P's columns.
template <int D, int S>
__device__ __forceinline__ void accumulate_p_b(float (&acc)[D / 8][4], const float (&p)[2][4], const bf16* tile,
                                               int lane) {
  const uint32_t a[4] = {pack_bf16(p[0][0], p[0][1]), pack_bf16(p[0][2], p[0][3]), pack_bf16(p[1][0], p[1][1]),
                         pack_bf16(p[1][2], p[1][3])};
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    uint32_t bb[4];
    ldmatrix_x4_trans(bb, tile + bkn_offset(lane, 0, dn * 16, S));
    mma_bf16(acc[2 * dn], a, bb[0], bb[1]);
    mma_bf16(acc[2 * dn + 1], a, bb[2], bb[3]);
  }
}

// Backward, pass 1: delta_y[i] = sum_j A_y[i, j] dA_y[i, j], dA_y = sum_x Mpost[x, y] dA3_x,
// dA3_x = dO_x V_x^T (causal). A CTA = 16 query rows of one group, one warp per head, as the forward.
template <int D>
__global__ void __launch_bounds__(D == 64 ? 32 * kMaxG : 16 * kMaxG)
    flash_mix_bwd_delta_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                               const bf16* __restrict__ dout, const float* __restrict__ lse,
                               const float* __restrict__ mpre, int gpre, const float* __restrict__ mpost, int gpost,
                               float* __restrict__ delta, int H, int T, int G, float scale) {
  constexpr int S = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);              // [G][16][S]
  bf16* sV = sK + G * kTile * S;                             // [G][16][S]
  float* sX = reinterpret_cast<float*>(sV + G * kTile * S);  // [G][16][kXS]: S0
  float* sD = sX + G * kTile * kXS;                          // [G][16][kXS]: dA3
  float* sCoef = sD + G * kTile * kXS;                       // [4][G][kMaxG]
  const MixWarp mw = mix_warp(sCoef, mpre, gpre, mpost, gpost, H, T, G);
  const int warp = mw.warp, lane = mw.lane, g = mw.g, t = mw.t;
  const size_t head = mw.head;
  const int m0 = ((T + kTile - 1) / kTile - 1 - static_cast<int>(blockIdx.y)) * kTile;
  q += head * D, k += head * D, v += head * D, dout += head * D;

  bf16* myK = sK + warp * kTile * S;
  bf16* myV = sV + warp * kTile * S;
  float* myX = sX + warp * kTile * kXS;
  float* myD = sD + warp * kTile * kXS;
  warp_load_rows<D, S>(myK, q, m0, T, lane);
  warp_load_rows<D, S>(myV, dout, m0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  uint32_t qa[D / 16][4], da[D / 16][4];
  load_a_frags<D, S>(qa, myK, lane);
  load_a_frags<D, S>(da, myV, lane);
  __syncwarp();
  float lse2[2], dpart[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) lse2[r] = m0 + g + 8 * r < T ? lse[head + m0 + g + 8 * r] * kLog2e : 0.f;

  const int n_end = min(T, m0 + kTile);
  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    warp_load_rows<D, S>(myK, k, n0, T, lane);
    warp_load_rows<D, S>(myV, v, n0, T, lane);
    cp_async_commit();
    cp_async_wait_all();
    __syncwarp();
    float acc_s[2][4], acc_d[2][4];
    frag_gemm_abt<D, S>(acc_s, qa, myK, lane);
    frag_gemm_abt<D, S>(acc_d, da, myV, lane);
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t, row = m0 + rl, col = n0 + cl;
        const bool v0 = col <= row && col < T, v1 = col + 1 <= row && col + 1 < T;
        *reinterpret_cast<float2*>(myX + rl * kXS + cl) =
            make_float2(v0 ? acc_s[j][2 * r] * scale : 0.f, v1 ? acc_s[j][2 * r + 1] * scale : 0.f);
        *reinterpret_cast<float2*>(myD + rl * kXS + cl) =
            make_float2(v0 ? acc_d[j][2 * r] : 0.f, v1 ? acc_d[j][2 * r + 1] : 0.f);
      }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t, row = m0 + rl, col = n0 + cl;
        const float2 c = gpre ? mix_pair(sX, mw.cpre(sCoef), mw.fpre, gpre, rl, cl)
                              : *reinterpret_cast<const float2*>(myX + rl * kXS + cl);
        const float2 d = gpost ? mix_pair(sD, mw.cpostT(sCoef, G), mw.fpost, gpost, rl, cl)
                               : *reinterpret_cast<const float2*>(myD + rl * kXS + cl);
        const float a0 = col <= row && col < T ? exp2f(c.x * kLog2e - lse2[r]) : 0.f;
        const float a1 = col + 1 <= row && col + 1 < T ? exp2f(c.y * kLog2e - lse2[r]) : 0.f;
        dpart[r] += a0 * d.x + a1 * d.y;
      }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float s = dpart[r];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    const int row = m0 + g + 8 * r;
    if (t == 0 && row < T) delta[head + row] = s;
  }
}

// Backward, pass 2, FlashAttention-2's order: a CTA = 16 keys of one group (one warp per head), over
// the query blocks from the diagonal on, with transposed tiles (rows = keys, columns = queries):
//   S^T = K Q^T -> exchange -> C'^T -> A^T = exp(C' - lse) -> exchange -> A3^T;  dV += A3^T dO;
//   dA3^T = V dO^T -> exchange -> dA^T (Mpost^T);  dC'^T = A^T (dA^T - delta) -> exchange -> dS^T
//   (Mpre^T);  dK += dS^T Q;  dQ += dS K (fp32 atomics, scaled at conversion);
//   dMpost[x, y] += dA3_x . A_y and dMpre[x, y] += dC'_x . S_y, summed over the warp per query block
//   into shared memory (registers are short at 16 heads), then per-CTA partials
//   part[(cta * G + x) * kMaxGBwd + y] reduced in a fixed order (deterministic).
template <int D>
__global__ void __launch_bounds__(D == 64 ? 32 * kMaxG : 16 * kMaxG)
    flash_mix_bwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                         const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                         const float* __restrict__ mpre, int gpre, const float* __restrict__ mpost, int gpost,
                         float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv,
                         float* __restrict__ part_pre, float* __restrict__ part_post, int H, int T, int G,
                         float scale) {
  constexpr int S = D + 8, SS = kTile + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);                // [G][16][S]
  bf16* sQ = sK + G * kTile * S;                               // [G][16][S]
  bf16* sO = sQ + G * kTile * S;                               // [G][16][S]: dO
  bf16* sdS = sO + G * kTile * S;                              // [G][16][SS]: dS^T (keys x queries)
  float* sX = reinterpret_cast<float*>(sdS + G * kTile * SS);  // [G][16][kXS]: S0^T
  float* sA = sX + G * kTile * kXS;                            // [G][16][kXS]: A^T, then dC'^T
  float* sD = sA + G * kTile * kXS;                            // [G][16][kXS]: dA3^T
  float* sCoef = sD + G * kTile * kXS;  // [4][G][kMaxG]
  float* sMpre = sCoef + 4 * G * kMaxG;  // [G][kMaxG]: this CTA's d head_pre rows
  float* sMpost = sMpre + G * kMaxG;     // [G][kMaxG]: d head_post rows
  const MixWarp mw = mix_warp(sCoef, mpre, gpre, mpost, gpost, H, T, G);
  const int warp = mw.warp, lane = mw.lane, g = mw.g, t = mw.t, fpre = mw.fpre, fpost = mw.fpost;
  if (lane < kMaxG) sMpre[warp * kMaxG + lane] = 0.f, sMpost[warp * kMaxG + lane] = 0.f;
  __syncwarp();
  const size_t head = mw.head;
  const int n0 = static_cast<int>(blockIdx.y) * kTile;  // tile 0 has the most query blocks: it starts first
  q += head * D, k += head * D, v += head * D, dout += head * D, dq_acc += head * D, dk += head * D, dv += head * D;

  bf16* myK = sK + warp * kTile * S;
  bf16* myQ = sQ + warp * kTile * S;
  bf16* myO = sO + warp * kTile * S;
  bf16* mydS = sdS + warp * kTile * SS;
  float* myX = sX + warp * kTile * kXS;
  float* myA = sA + warp * kTile * kXS;
  float* myD = sD + warp * kTile * kXS;
  // K of the CTA's keys stays in shared memory; V as A fragments in registers (staged through sQ).
  warp_load_rows<D, S>(myK, k, n0, T, lane);
  warp_load_rows<D, S>(myQ, v, n0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  uint32_t va[D / 16][4];
  load_a_frags<D, S>(va, myQ, lane);
  __syncwarp();

  float acc_dk[D / 8][4] = {}, acc_dv[D / 8][4] = {};
  for (int m0 = n0; m0 < T; m0 += kTile) {
    warp_load_rows<D, S>(myQ, q, m0, T, lane);
    warp_load_rows<D, S>(myO, dout, m0, T, lane);
    cp_async_commit();
    // The row statistics of this lane's query columns (8j + 2t + e), while the tiles land.
    float lse2[2][2], dlt[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int qi = m0 + 8 * j + 2 * t + e;
        lse2[j][e] = qi < T ? lse[head + qi] * kLog2e : 0.f;
        dlt[j][e] = qi < T ? delta[head + qi] : 0.f;
      }
    cp_async_wait_all();
    __syncwarp();
    float acc_s[2][4], d3[2][4];
    warp_gemm_abt<16, D, S>(acc_s, myK, myQ, lane);
    frag_gemm_abt<D, S>(d3, va, myO, lane);
    bool ok[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + g + 8 * (e >> 1), qi = m0 + 8 * j + 2 * t + (e & 1);
        ok[j][e] = key <= qi && qi < T && key < T;
        acc_s[j][e] = ok[j][e] ? acc_s[j][e] * scale : 0.f;
        d3[j][e] = ok[j][e] ? d3[j][e] : 0.f;
      }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<float2*>(myX + (g + 8 * r) * kXS + 8 * j + 2 * t) =
            make_float2(acc_s[j][2 * r], acc_s[j][2 * r + 1]);
    __syncthreads();  // (1) S0^T of every head
    float a[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t;
        const float2 c =
            gpre ? mix_pair(sX, mw.cpre(sCoef), fpre, gpre, rl, cl) : make_float2(acc_s[j][2 * r], acc_s[j][2 * r + 1]);
        a[j][2 * r] = ok[j][2 * r] ? exp2f(c.x * kLog2e - lse2[j][0]) : 0.f;
        a[j][2 * r + 1] = ok[j][2 * r + 1] ? exp2f(c.y * kLog2e - lse2[j][1]) : 0.f;
        *reinterpret_cast<float2*>(myA + rl * kXS + cl) = make_float2(a[j][2 * r], a[j][2 * r + 1]);
        *reinterpret_cast<float2*>(myD + rl * kXS + cl) = make_float2(d3[j][2 * r], d3[j][2 * r + 1]);
      }
    __syncthreads();  // (2) A^T and dA3^T of every head
    float p[2][4], dc[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t;
        const float2 a3 =
            gpost ? mix_pair(sA, mw.cpost(sCoef, G), fpost, gpost, rl, cl) : make_float2(a[j][2 * r], a[j][2 * r + 1]);
        p[j][2 * r] = a3.x, p[j][2 * r + 1] = a3.y;
        const float2 da = gpost ? mix_pair(sD, mw.cpostT(sCoef, G), fpost, gpost, rl, cl)
                                : make_float2(d3[j][2 * r], d3[j][2 * r + 1]);
        dc[j][2 * r] = a[j][2 * r] * (da.x - dlt[j][0]);
        dc[j][2 * r + 1] = a[j][2 * r + 1] * (da.y - dlt[j][1]);
      }
    // The mixing-weight gradient terms of this block: dA3_x . A_y and dC'_x . S_y over the warp's
    // positions, summed over the warp into its rows of sMpost / sMpre.
    for (int y = 0; y < gpost; ++y) {
      const float v = warp_dot_tile(d3, sA + (fpost + y) * kTile * kXS, g, t);
      if (lane == 0) sMpost[warp * kMaxG + y] += v;
    }
    for (int y = 0; y < gpre; ++y) {
      const float v = warp_dot_tile(dc, sX + (fpre + y) * kTile * kXS, g, t);
      if (lane == 0) sMpre[warp * kMaxG + y] += v;
    }
    accumulate_p_b<D, S>(acc_dv, p, myO, lane);  // dV += A3^T dO
    __syncthreads();                             // (3) every head is done with A^T: dC'^T goes in its place
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<float2*>(myA + (g + 8 * r) * kXS + 8 * j + 2 * t) =
            make_float2(dc[j][2 * r], dc[j][2 * r + 1]);
    __syncthreads();  // (4) dC'^T of every head
    float ds[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t;
        const float2 x =
            gpre ? mix_pair(sA, mw.cpreT(sCoef, G), fpre, gpre, rl, cl) : make_float2(dc[j][2 * r], dc[j][2 * r + 1]);
        ds[j][2 * r] = x.x, ds[j][2 * r + 1] = x.y;
        *reinterpret_cast<uint32_t*>(mydS + rl * SS + cl) = pack_bf16(x.x, x.y);
      }
    accumulate_p_b<D, S>(acc_dk, ds, myQ, lane);  // dK += dS^T Q (scaled at the end)
    __syncwarp();
    // dQ[m0 .. m0 + 15] += dS K: A = dS (queries x keys) read transposed from dS^T.
    uint32_t aq[4];
    ldmatrix_x4_trans(aq, mydS + at_offset(lane, 0, 0, SS));
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, myK + bkn_offset(lane, 0, dn * 16, S));
      float acc[2][4] = {};
      mma_bf16(acc[0], aq, bb[0], bb[1]);
      mma_bf16(acc[1], aq, bb[2], bb[3]);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = m0 + g + 8 * r;
          if (row < T)
            atomicAdd(reinterpret_cast<float2*>(dq_acc + static_cast<size_t>(row) * D + dn * 16 + 8 * jj + 2 * t),
                      make_float2(acc[jj][2 * r], acc[jj][2 * r + 1]));
        }
    }
    __syncwarp();
  }

  // dK (scaled) and dV of the CTA's 16 keys, staged through the warp's Q tile, 16-byte stores.
  __syncwarp();
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    const float f = pass == 0 ? scale : 1.f;
    float(&acc)[D / 8][4] = pass == 0 ? acc_dk : acc_dv;
    bf16* dst = pass == 0 ? dk : dv;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<uint32_t*>(myQ + (g + 8 * r) * S + 8 * j + 2 * t) =
            pack_bf16(acc[j][2 * r] * f, acc[j][2 * r + 1] * f);
    __syncwarp();
    constexpr int kChunksPerRow = D / 8;
#pragma unroll
    for (int cc = lane; cc < kTile * kChunksPerRow; cc += 32) {
      const int r = cc / kChunksPerRow, col = (cc % kChunksPerRow) * 8, key = n0 + r;
      if (key < T)
        *reinterpret_cast<uint4*>(dst + static_cast<size_t>(key) * D + col) =
            *reinterpret_cast<const uint4*>(myQ + r * S + col);
    }
    __syncwarp();
  }
  // This CTA's mixing-gradient sums: one partial per (CTA, head, y).
  __syncwarp();
  const size_t cta = static_cast<size_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  if (lane < kMaxGBwd) {
    part_pre[(cta * G + warp) * kMaxGBwd + lane] = sMpre[warp * kMaxG + lane];
    part_post[(cta * G + warp) * kMaxGBwd + lane] = sMpost[warp * kMaxG + lane];
  }
}

// grad[h][y] += sum over the batch and the key tiles (fixed order, double) of the partials of head h:
// grad is [H / g][g][g] = [H][g]. One thread per (h, y).
__global__ void reduce_mix_grad_kernel(const float* __restrict__ part, float* __restrict__ grad, int B, int H, int G,
                                       int gs, int ntiles) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= H * gs) return;
  const int h = idx / gs, y = idx % gs, units = H / G, u = h / G, w = h % G;
  double s = 0.0;
  for (int b = 0; b < B; ++b)
    for (int tile = 0; tile < ntiles; ++tile)
      s += part[((static_cast<size_t>(b * units + u) * ntiles + tile) * G + w) * kMaxGBwd + y];
  grad[idx] += static_cast<float>(s);
}

template <int D, bool kOut>
void launch_pass(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* mpre,
                 const float* mpost, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  const int H = spec.heads, G = spec.coupled_heads();
  const int gpre = spec.head_pre ? spec.head_pre->group : 0, gpost = spec.head_post ? spec.head_post->group : 0;
  const size_t smem = smem_bytes<D>(G, kOut);
  MTA_CUDA_CHECK(cudaFuncSetAttribute(flash_mix_fwd_kernel<D, kOut>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(B * (H / G)), static_cast<unsigned>((T + kTile - 1) / kTile));
  flash_mix_fwd_kernel<D, kOut><<<grid, 32 * G, smem, s>>>(q, k, v, mpre, gpre, mpost, gpost, o, lse, H, T, G,
                                                           1.0f / std::sqrt(static_cast<float>(D)));
  MTA_CUDA_CHECK_LAUNCH("flash_mix_fwd_kernel");
}

template <int D>
void launch_forward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* mpre,
                    const float* mpost, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  launch_pass<D, false>(spec, q, k, v, mpre, mpost, o, lse, B, T, s);
  launch_pass<D, true>(spec, q, k, v, mpre, mpost, o, lse, B, T, s);
}

template <int D>
void launch_backward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* mpre,
                     const float* mpost, const bf16* dout, const float* lse, bf16* dq, bf16* dk, bf16* dv,
                     float* grad_pre, float* grad_post, void* scratch, int B, int T, cudaStream_t s) {
  constexpr int S = D + 8, SS = kTile + 8;
  const int H = spec.heads, G = spec.coupled_heads(), ntiles = (T + kTile - 1) / kTile;
  const int gpre = spec.head_pre ? spec.head_pre->group : 0, gpost = spec.head_post ? spec.head_post->group : 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const size_t rows = static_cast<size_t>(B) * H * T, parts = static_cast<size_t>(B) * H * ntiles * kMaxGBwd;
  auto up = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  char* base = static_cast<char*>(scratch);
  float* delta = reinterpret_cast<float*>(base);
  float* dq_acc = reinterpret_cast<float*>(base + up(rows * 4));
  float* part_pre = reinterpret_cast<float*>(base + up(rows * 4) + up(rows * D * 4));
  float* part_post = part_pre + up(parts * 4) / 4;
  MTA_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, rows * D * sizeof(float), s));
  const dim3 grid(static_cast<unsigned>(B * (H / G)), static_cast<unsigned>(ntiles));
  const size_t coef = 4 * static_cast<size_t>(G) * kMaxG * sizeof(float);
  const size_t smem_delta =
      2 * static_cast<size_t>(G) * kTile * S * 2 + 2 * static_cast<size_t>(G) * kTile * kXS * 4 + coef;
  MTA_CUDA_CHECK(cudaFuncSetAttribute(flash_mix_bwd_delta_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem_delta)));
  flash_mix_bwd_delta_kernel<D>
      <<<grid, 32 * G, smem_delta, s>>>(q, k, v, dout, lse, mpre, gpre, mpost, gpost, delta, H, T, G, scale);
  MTA_CUDA_CHECK_LAUNCH("flash_mix_bwd_delta_kernel");
  const size_t smem_main = 3 * static_cast<size_t>(G) * kTile * S * 2 + static_cast<size_t>(G) * kTile * SS * 2 +
                           3 * static_cast<size_t>(G) * kTile * kXS * 4 + coef +
                           2 * static_cast<size_t>(G) * kMaxG * sizeof(float);
  MTA_CUDA_CHECK(cudaFuncSetAttribute(flash_mix_bwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem_main)));
  flash_mix_bwd_kernel<D><<<grid, 32 * G, smem_main, s>>>(q, k, v, dout, lse, delta, mpre, gpre, mpost, gpost, dq_acc,
                                                          dk, dv, part_pre, part_post, H, T, G, scale);
  MTA_CUDA_CHECK_LAUNCH("flash_mix_bwd_kernel");
  launch_convert_accum(dq_acc, dq, static_cast<long long>(rows) * D, scale, s);
  for (auto [part, grad, gs] : {std::tuple{part_pre, grad_pre, gpre}, std::tuple{part_post, grad_post, gpost}}) {
    if (!gs) continue;
    reduce_mix_grad_kernel<<<(H * gs + 255) / 256, 256, 0, s>>>(part, grad, B, H, G, gs, ntiles);
    MTA_CUDA_CHECK_LAUNCH("reduce_mix_grad_kernel");
  }
}

}  // namespace

bool flash_mix_supported(const AttentionSpec& spec, int D) {
  if (spec.kq_pre || spec.kq_post || spec.norm || spec.gate || spec.depth_scale_layer) return false;
  if (!spec.head_pre && !spec.head_post) return false;  // standard attention: flash_attn
  if (D != spec.head_dim || (D != 64 && D != 128)) return false;
  return spec.coupled_heads() <= (D == 64 ? 16 : 8);
}

void flash_mix_forward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* head_pre,
                       const float* head_post, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  const int D = spec.head_dim;
  mix_require(flash_mix_supported(spec, D),
              "spec not covered (head_pre / head_post only, coupled heads <= 16 at "
              "head dim 64, <= 8 at 128)");
  mix_require(B >= 1 && T >= 1, "B and T must be >= 1");
  mix_require(static_cast<long long>(B) * spec.heads <= INT_MAX && (T + kTile - 1) / kTile <= 65535,
              "B * H or T too large");
  mix_require(q && k && v && o && lse, "null tensor");
  mix_require(!spec.head_pre || head_pre, "head_pre weights missing");
  mix_require(!spec.head_post || head_post, "head_post weights missing");
  if (D == 64)
    launch_forward<64>(spec, q, k, v, head_pre, head_post, o, lse, B, T, s);
  else
    launch_forward<128>(spec, q, k, v, head_pre, head_post, o, lse, B, T, s);
}

}  // namespace mta::cuda

namespace mta::cuda {

bool flash_mix_backward_supported(const AttentionSpec& spec, int D) {
  return flash_mix_supported(spec, D);
}

size_t flash_mix_backward_scratch_bytes(int B, int H, int T, int D) {
  auto up = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t rows = static_cast<size_t>(B) * H * T;
  const size_t parts = static_cast<size_t>(B) * H * ((T + kTile - 1) / kTile) * kMaxGBwd;
  return up(rows * 4) + up(rows * D * 4) + 2 * up(parts * 4);
}

void flash_mix_backward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* head_pre,
                        const float* head_post, const bf16* dout, const float* lse, bf16* dq, bf16* dk, bf16* dv,
                        float* grad_head_pre, float* grad_head_post, void* scratch, int B, int T, cudaStream_t s) {
  const int D = spec.head_dim;
  mix_require(flash_mix_backward_supported(spec, D),
              "backward: spec not covered (head_pre / head_post only, "
              "coupled heads <= 8, head dim 64 or 128)");
  mix_require(B >= 1 && T >= 1, "B and T must be >= 1");
  mix_require(static_cast<long long>(B) * spec.heads <= INT_MAX && (T + kTile - 1) / kTile <= 65535,
              "B * H or T too large");
  mix_require(q && k && v && dout && lse && dq && dk && dv && scratch, "null tensor or scratch");
  mix_require(!spec.head_pre || (head_pre && grad_head_pre), "head_pre weights or gradient missing");
  mix_require(!spec.head_post || (head_post && grad_head_post), "head_post weights or gradient missing");
  if (D == 64)
    launch_backward<64>(spec, q, k, v, head_pre, head_post, dout, lse, dq, dk, dv, grad_head_pre, grad_head_post,
                        scratch, B, T, s);
  else
    launch_backward<128>(spec, q, k, v, head_pre, head_post, dout, lse, dq, dk, dv, grad_head_pre, grad_head_post,
                         scratch, B, T, s);
}

}  // namespace mta::cuda
