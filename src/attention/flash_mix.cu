// FlashMix: head mixing before and / or after the softmax, fused (see flash_mix.h and
// docs/flash-mta.md, "one warp per head").
//
// A CTA owns 16 query rows of one batch element and one coupled group of G heads, one warp per head
// (at D = 128 a group of 10-16 heads is spread over a cluster of two CTAs: group_cluster.cuh); a group
// of up to 8 at D = 64 takes 32 rows, two 16-row tiles per warp (kQB = 2: MixIn slots x and x + G).
// Per block of 16 keys, each warp computes its head's logit tile S (mma, Q fragments in registers,
// its K tile in shared memory); the mixed logits C'_x = sum_y Mpre[x, y] S_y of every head are one
// tensor-core product over the CTA's tiles (head_mix_mma.cuh), and each warp reads its head's back.
// Two forward passes, as the post-softmax mixing needs every head's normalized weights:
//   pass 1 (kOut = false): online row max / sum of C' per head -> lse;
//   pass 2 (kOut = true):  A = exp(C' - lse) -> A3 = sum_y Mpost[x, y] A_y (the same product) -> O += A3 V.
// K and V of one batch element's group stay in L2 while its CTAs run, so the re-reads by the small
// query tiles are L2 traffic.
#include "attention/flash_mix.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "attention/flash_common.cuh"
#include "attention/group_cluster.cuh"
#include "attention/head_mix_mma.cuh"
#include "attention/mma_sm80.cuh"
#include "cuda/check.h"
#include "cuda/warp_reduce.cuh"
#include "util/env.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;      // NOLINT: the kernels are written in terms of these primitives
using namespace headmix;  // NOLINT: kTile, kMaxG, the mixing buffers and products

void mix_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flash_mix: " + what);
}

constexpr size_t kInBytes = kInElems * sizeof(bf16);
constexpr size_t kFragBytes = kFragWords * sizeof(uint32_t);
size_t out_bytes(int G) { return static_cast<size_t>(G) * kXT * sizeof(float); }
// The opt-in dynamic shared memory limit of one CTA on sm_90 (227 KB).
constexpr size_t kMaxSmemPerBlock = 227 * 1024;

// The forward's coefficient fragments: kPre (pass 1), kPre and kPost (pass 2): kFragWords / 4 per kind
// (session 12: the 3 KB pass 1 saves keep two of its CTAs per SM with two query tiles per warp).
constexpr int fwd_frag_words(bool out) { return (out ? 2 : 1) * kFragWords / 4; }
// Forward shared memory: K (and V) tiles [2 stages][L][16][D + 8] bf16 (the next key block's tiles
// load while this one is used), the coefficient fragments, MixIn hi and lo (S, then A in pass 2; every
// head of the group) and one MixOut (C', then A3; the CTA's L heads).
template <int D>
size_t smem_bytes(int L, bool out, int qb = 1) {  // L: the CTA's heads; qb: query tiles per warp
  const size_t tiles = 2 * static_cast<size_t>(L) * kTile * (D + 8) * sizeof(bf16) * (out ? 2 : 1);
  return tiles + fwd_frag_words(out) * sizeof(uint32_t) + 2 * kInBytes + out_bytes(qb * L);
}

// Rows r0 .. r0 + 15 of one head ([T][D] bf16 at `head`) into shared memory (row stride S) with one
// warp's 32 lanes; rows at or past T are zero-filled (`head` is their dummy source: T >= 1).
// kPlain: a tile wholly before T is copied with the plain cp.async form (the forward kernel: -2%,
// session 21; the backward kernels spilled more with it and lost 1-8%, so they keep one form).
template <int D, int S, bool kPlain = false>
__device__ __forceinline__ void warp_load_rows(bf16* smem, const bf16* head, int r0, int T, int lane) {
  constexpr int kChunksPerRow = D / 8;
  if (kPlain && r0 + kTile <= T) {
#pragma unroll
    for (int c = lane; c < kTile * kChunksPerRow; c += 32) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      cp_async_16(smem + r * S + col, head + static_cast<size_t>(r0 + r) * D + col);
    }
    return;
  }
#pragma unroll
  for (int c = lane; c < kTile * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = r0 + r < T;
    cp_async_16(smem + r * S + col, ok ? head + static_cast<size_t>(r0 + r) * D + col : head, ok ? 16 : 0);
  }
}

// A warp's place in a CTA of these kernels: blockIdx.x = (batch * units + unit of G coupled heads) * C +
// rank, one warp per head; the group on C CTAs of L = group_warps(G, C) warps each, padding included
// (group_cluster.cuh). Also builds the CTA's coefficient fragments for the whole group (the caller
// synchronizes).
struct MixWarp {
  int warp, lane, g, t, h;  // h: the head within its batch element (padding: the group's last)
  size_t head;              // the head's first row in [B * H * T]
  GroupPlace gp;
  int x;                    // the warp's head within the group: its MixIn slot
  bool real;                // false: a padding warp (no MixIn writes, no results)
  int reps;                 // tiles per head in the mixing buffers (1; 2: the backward's two query blocks)
  // This warp's tile (its tile qt < reps) into MixIn slot x (+ qt G); padding warps leave their zero
  // slots alone.
  template <bool kLo>
  __device__ __forceinline__ void put(bf16* hi, bf16* lo, const float (&v)[2][4], int qt = 0) const {
    if (real) put_tile<kLo>(hi, lo, x + qt * gp.G, v, g, t);
  }
  // MixOut's slot (local to the CTA) of this warp's tile qt.
  __device__ __forceinline__ int out_slot(int qt = 0) const { return warp + qt * gp.G; }
};
// reps > 1 only for a group in one CTA (C = 1, G <= 8: slot x + qt G stays within kMaxG).
__device__ __forceinline__ MixWarp mix_warp(uint32_t* sFrag, const float* mpre, int gpre, const float* mpost,
                                            int gpost, int H, int T, int G, int C, int reps = 1, int kinds = 4) {
  MixWarp w;
  w.reps = reps;
  w.warp = threadIdx.x >> 5, w.lane = threadIdx.x & 31, w.g = w.lane >> 2, w.t = w.lane & 3;
  w.gp = group_place(G, C);
  const int units = H / G, unit = static_cast<int>(blockIdx.x) / C, b = unit / units, u = unit % units;
  w.x = w.gp.h0 + w.warp;
  w.real = w.gp.real(w.warp);
  w.h = u * G + w.gp.head_of(w.warp);
  w.head = static_cast<size_t>(b * H + w.h) * T;
  build_frags(sFrag, mpre, gpre, mpost, gpost, u * G, G, reps, kinds);
  return w;
}

// The mix of `kind` for this CTA's heads (MixOut at local indices), after group_sync.
template <bool kLo>
__device__ __forceinline__ void mix_own(const bf16* hi, const bf16* lo, const uint32_t* sFrag, int kind, float* out,
                                        const MixWarp& mw) {
  mix_tiles_owned<kLo>(hi, lo, sFrag, kind, out, mw.gp.h0, mw.gp.L * mw.reps, mw.gp.L, mw.warp, mw.lane);
}

// At D = 128 a CTA holds at most 8 heads (256 threads), which leaves each thread the registers for its
// 64 output accumulators and 32 Q fragment words: groups of 10-16 heads run on clusters of two CTAs
// (kC = 2, group_cluster.cuh).
// kQB = 2 (session 12; groups of up to 8 heads in one CTA at D = 64, as the backward's): a CTA takes 32
// query rows, each warp two 16-row tiles of its head in MixIn slots x and x + G (block-diagonal
// coefficients), so each K / V tile and each pair of barriers serves both.
template <int D, bool kOut, int kC, int kQB = 1>
__global__ void __launch_bounds__(D == 64 && kC == 1 && kQB == 1 ? 32 * kMaxG : 16 * kMaxG)
    flash_mix_fwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                         const float* __restrict__ mpre, int gpre, const float* __restrict__ mpost, int gpost,
                         bf16* __restrict__ o, float* __restrict__ lse, int H, int T, int G, float scale) {
  static_assert(kQB == 1 || (kQB == 2 && kC == 1), "two query tiles per warp: one CTA per group");
  constexpr int S = D + 8, kRows = kQB * kTile;  // kRows: the CTA's query rows
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int L = group_warps(G, kC);                                    // the CTA's warps
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);                        // [2][L][16][S]
  bf16* sV = sK + 2 * L * kTile * S;                                   // [2][L][16][S], pass 2
  uint32_t* sFrag = reinterpret_cast<uint32_t*>(sV + (kOut ? 2 * L * kTile * S : 0));
  bf16* sInHi = reinterpret_cast<bf16*>(sFrag + fwd_frag_words(kOut));  // MixIn: S, then A
  bf16* sInLo = sInHi + kInElems;
  float* sOut = reinterpret_cast<float*>(sInLo + kInElems);  // MixOut: C', then A3
  MixWarp mw = mix_warp(sFrag, mpre, gpre, mpost, gpost, H, T, G, kC, kQB, kOut ? 2 : 1);
  if (kC == 1) mw.real = true;  // no padding in one CTA: the checks compile away
  zero_in(sInHi), zero_in(sInLo);
  const int warp = mw.warp, lane = mw.lane, g = mw.g, t = mw.t;
  const size_t head = mw.head;
  const int m0 = ((T + kRows - 1) / kRows - 1 - static_cast<int>(blockIdx.y)) * kRows;  // heavy tiles first
  q += head * D, k += head * D, v += head * D;

  // Q of the warp's rows as mma A fragments, staged through its K tile. K and V tiles are the warp's
  // own, in two stages (stage s of warp w at (s * L + w) * 16 rows).
  bf16* myK = sK + warp * kTile * S;
  bf16* myV = sV + warp * kTile * S;
  const int stage_step = L * kTile * S;
  uint32_t qa[kQB][D / 16][4];
#pragma unroll
  for (int qt = 0; qt < kQB; ++qt) {
    warp_load_rows<D, S, true>(myK, q, m0 + qt * kTile, T, lane);
    cp_async_commit();
    cp_async_wait_all();
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qa[qt][kk], myK + a_offset(lane, 0, kk * 16, S));
    __syncwarp();
  }
  group_start(mw.gp);  // the fragments, the zeroed MixIn, and every warp's Q read before K overwrites it

  float row_max[kQB][2], row_sum[kQB][2];  // pass 1 (log2 domain)
  float lse2[kQB][2];                       // pass 2: lse * log2(e)
  float acc_o[kQB][kOut ? D / 8 : 1][4] = {};
#pragma unroll
  for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + qt * kTile + g + 8 * r;
      row_max[qt][r] = -INFINITY, row_sum[qt][r] = 0.f;
      lse2[qt][r] = kOut && row < T ? lse[head + row] * kLog2e : 0.f;
    }

  const int n_end = min(T, m0 + kRows);  // keys up to the CTA's last row
  warp_load_rows<D, S, true>(myK, k, 0, T, lane);
  if (kOut) warp_load_rows<D, S, true>(myV, v, 0, T, lane);
  cp_async_commit();
  for (int n0 = 0, stage = 0; n0 < n_end; n0 += kTile, stage ^= 1) {
    // The next block's tiles into the other stage (its last readers, this warp's MMAs of the previous
    // block, have completed: their results were consumed), then wait for this block's.
    bf16* tK = myK + stage * stage_step;
    bf16* tV = myV + stage * stage_step;
    if (n0 + kTile < n_end) {
      warp_load_rows<D, S, true>(myK + (stage ^ 1) * stage_step, k, n0 + kTile, T, lane);
      if (kOut) warp_load_rows<D, S, true>(myV + (stage ^ 1) * stage_step, v, n0 + kTile, T, lane);
      cp_async_commit();
      cp_async_wait_group<1>();
    } else {
      cp_async_wait_group<0>();
    }
    __syncwarp();
    float acc_s[kQB][2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bb[4];
      ldmatrix_x4(bb, tK + bnk_offset(lane, 0, kk * 16, S));
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt) {
        mma_bf16(acc_s[qt][0], qa[qt][kk], bb[0], bb[1]);
        mma_bf16(acc_s[qt][1], qa[qt][kk], bb[2], bb[3]);
      }
    }
    // S0: scaled logits, the future (and keys past T) as 0.
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int row = m0 + qt * kTile + g + 8 * r, col = n0 + 8 * j + 2 * t + e;
            acc_s[qt][j][2 * r + e] = col <= row && col < T ? acc_s[qt][j][2 * r + e] * scale : 0.f;
          }
    if (gpre) {
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt) mw.put<true>(sInHi, sInLo, acc_s[qt], qt);
      group_sync(mw.gp, sInHi, sInLo);  // every head's S0
      mix_own<true>(sInHi, sInLo, sFrag, kPre, sOut, mw);
      mix_done(mw.gp);  // every head's C'
    }
    // C' of this warp's head at its positions (log2 domain), the future as -inf.
    float c[kQB][2][4];
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rl = g + 8 * r, cl = 8 * j + 2 * t, row = m0 + qt * kTile + rl, col = n0 + cl;
          const float2 x = gpre ? get_pair(sOut, mw.out_slot(qt), rl, cl)
                                : make_float2(acc_s[qt][j][2 * r], acc_s[qt][j][2 * r + 1]);
          c[qt][j][2 * r] = col <= row && col < T ? x.x * kLog2e : -INFINITY;
          c[qt][j][2 * r + 1] = col + 1 <= row && col + 1 < T ? x.y * kLog2e : -INFINITY;
        }
    if (!kOut) {
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = fmaxf(fmaxf(c[qt][0][2 * r], c[qt][0][2 * r + 1]), fmaxf(c[qt][1][2 * r], c[qt][1][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          // Finite: key 0 is visible to every row. (With two tiles, the first tile's rows have all of
          // the last key block in their future: mx is -inf there and its terms exp2(-inf) = 0.)
          const float m_new = fmaxf(row_max[qt][r], mx);
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < 2; ++j) sum += exp2f(c[qt][j][2 * r] - m_new) + exp2f(c[qt][j][2 * r + 1] - m_new);
          row_sum[qt][r] = row_sum[qt][r] * exp2f(row_max[qt][r] - m_new) + sum;
          row_max[qt][r] = m_new;
        }
    } else {
      // A = exp(C' - lse), then A3 = sum_y Mpost[x, y] A_y, then O += A3 V.
      float a3[kQB][2][4];
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) a3[qt][j][e] = exp2f(c[qt][j][e] - lse2[qt][e >> 1]);
      if (gpost) {
#pragma unroll
        for (int qt = 0; qt < kQB; ++qt) mw.put<true>(sInHi, sInLo, a3[qt], qt);  // every warp is done with S0 and C'
        group_sync(mw.gp, sInHi, sInLo);                                          // every head's A
        mix_own<true>(sInHi, sInLo, sFrag, kPost, sOut, mw);
        mix_done(mw.gp);  // every head's A3
#pragma unroll
        for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const float2 x = get_pair(sOut, mw.out_slot(qt), g + 8 * r, 8 * j + 2 * t);
              a3[qt][j][2 * r] = x.x, a3[qt][j][2 * r + 1] = x.y;
            }
      }
      uint32_t a[kQB][4];
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt) {
        a[qt][0] = pack_bf16(a3[qt][0][0], a3[qt][0][1]), a[qt][1] = pack_bf16(a3[qt][0][2], a3[qt][0][3]);
        a[qt][2] = pack_bf16(a3[qt][1][0], a3[qt][1][1]), a[qt][3] = pack_bf16(a3[qt][1][2], a3[qt][1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, tV + bkn_offset(lane, 0, dn * 16, S));
#pragma unroll
        for (int qt = 0; qt < kQB; ++qt) {
          mma_bf16(acc_o[qt][2 * dn], a[qt], bb[0], bb[1]);
          mma_bf16(acc_o[qt][2 * dn + 1], a[qt], bb[2], bb[3]);
        }
      }
    }
    // No barrier here: the next block's put_tile follows the barrier after this block's last mix (so
    // MixIn is free), and its mix writes MixOut only after a barrier that every warp reaches once it
    // has read this block's values. A warp's K / V tiles are its own (program order).
  }
  group_finish(mw.gp);

  if (!kOut) {
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(row_sum[qt][r]);
        const int row = m0 + qt * kTile + g + 8 * r;
        if (t == 0 && row < T && mw.real) lse[head + row] = row_max[qt][r] * kLn2 + logf(l);
      }
    return;
  }
  // O rows (A3 is normalized: no division), staged through the warp's K tile, 16-byte stores.
  if (!mw.real) return;
#pragma unroll
  for (int qt = 0; qt < kQB; ++qt) {
    __syncwarp();
#pragma unroll
    for (int j = 0; j < (kOut ? D / 8 : 0); ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<uint32_t*>(myK + (g + 8 * r) * S + 8 * j + 2 * t) =
            pack_bf16(acc_o[qt][j][2 * r], acc_o[qt][j][2 * r + 1]);
    __syncwarp();
    constexpr int kChunksPerRow = D / 8;
    bf16* out = o + head * D;
#pragma unroll
    for (int cc = lane; cc < kTile * kChunksPerRow; cc += 32) {
      const int r = cc / kChunksPerRow, col = (cc % kChunksPerRow) * 8, row = m0 + qt * kTile + r;
      if (row < T)
        *reinterpret_cast<uint4*>(out + static_cast<size_t>(row) * D + col) =
            *reinterpret_cast<const uint4*>(myK + r * S + col);
    }
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
// dA3 is mixed from bf16, as in the key-tile pass, so delta matches the dA it is subtracted from.
// kStages = 2: the next key block's K and V tiles load while this one is used (where shared memory
// holds two sets of tiles, see launch_backward); 1: each block waits for its own.
// kQB = 2 (session 12, as the main pass's): a CTA takes 32 query rows, each warp two 16-row tiles of its
// head in MixIn slots x and x + G, so each K and V tile and each pair of barriers serves both.
template <int D, int kStages, int kC, int kQB = 1>
__global__ void __launch_bounds__(D == 64 && kC == 1 && kQB == 1 ? 32 * kMaxG : 16 * kMaxG)
    flash_mix_bwd_delta_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                               const bf16* __restrict__ dout, const float* __restrict__ lse,
                               const float* __restrict__ mpre, int gpre, const float* __restrict__ mpost, int gpost,
                               float* __restrict__ delta, int H, int T, int G, float scale) {
  static_assert(kQB == 1 || (kQB == 2 && kC == 1), "two query tiles per warp: one CTA per group");
  constexpr int S = D + 8, kRows = kQB * kTile;  // kRows: the CTA's query rows
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int L = group_warps(G, kC);              // the CTA's warps
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // [kStages][L][16][S]
  bf16* sV = sK + kStages * L * kTile * S;       // [kStages][L][16][S]
  uint32_t* sFrag = reinterpret_cast<uint32_t*>(sV + kStages * L * kTile * S);
  bf16* sSHi = reinterpret_cast<bf16*>(sFrag + kFragWords);  // MixIn: S0 (hi, lo), dA3
  bf16* sSLo = sSHi + kInElems;
  bf16* sD = sSLo + kInElems;
  float* sC = reinterpret_cast<float*>(sD + kInElems);  // MixOut: C', dA
  float* sDA = sC + kQB * L * kXT;
  MixWarp mw = mix_warp(sFrag, mpre, gpre, mpost, gpost, H, T, G, kC, kQB);
  if (kC == 1) mw.real = true;  // no padding in one CTA: the checks compile away
  zero_in(sSHi), zero_in(sSLo), zero_in(sD);
  const int warp = mw.warp, lane = mw.lane, g = mw.g, t = mw.t;
  const size_t head = mw.head;
  const int m0 = ((T + kRows - 1) / kRows - 1 - static_cast<int>(blockIdx.y)) * kRows;
  q += head * D, k += head * D, v += head * D, dout += head * D;

  bf16* myK = sK + warp * kTile * S;
  bf16* myV = sV + warp * kTile * S;
  uint32_t qa[kQB][D / 16][4], da[kQB][D / 16][4];
#pragma unroll
  for (int qt = 0; qt < kQB; ++qt) {  // staged through the warp's K and V tiles
    warp_load_rows<D, S>(myK, q, m0 + qt * kTile, T, lane);
    warp_load_rows<D, S>(myV, dout, m0 + qt * kTile, T, lane);
    cp_async_commit();
    cp_async_wait_all();
    __syncwarp();
    load_a_frags<D, S>(qa[qt], myK, lane);
    load_a_frags<D, S>(da[qt], myV, lane);
    __syncwarp();
  }
  group_start(mw.gp);  // the fragments and the zeroed MixIn buffers
  float lse2[kQB][2], dpart[kQB][2] = {};
#pragma unroll
  for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + qt * kTile + g + 8 * r;
      lse2[qt][r] = row < T ? lse[head + row] * kLog2e : 0.f;
    }

  const int n_end = min(T, m0 + kRows);
  const int stage_step = L * kTile * S;
  warp_load_rows<D, S>(myK, k, 0, T, lane);
  warp_load_rows<D, S>(myV, v, 0, T, lane);
  cp_async_commit();
  for (int n0 = 0, it = 0; n0 < n_end; n0 += kTile, ++it) {
    // This warp's last reads of the buffer a load overwrites (its MMAs of an earlier block) are done.
    const int stage = kStages == 2 ? it & 1 : 0;
    if (kStages == 1 && it > 0) {
      warp_load_rows<D, S>(myK, k, n0, T, lane);
      warp_load_rows<D, S>(myV, v, n0, T, lane);
      cp_async_commit();
    }
    if (kStages == 2 && n0 + kTile < n_end) {
      warp_load_rows<D, S>(myK + (stage ^ 1) * stage_step, k, n0 + kTile, T, lane);
      warp_load_rows<D, S>(myV + (stage ^ 1) * stage_step, v, n0 + kTile, T, lane);
      cp_async_commit();
      cp_async_wait_group<1>();
    } else {
      cp_async_wait_group<0>();
    }
    __syncwarp();
    float acc_s[kQB][2][4], acc_d[kQB][2][4];
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt) {
      frag_gemm_abt<D, S>(acc_s[qt], qa[qt], myK + stage * stage_step, lane);
      frag_gemm_abt<D, S>(acc_d[qt], da[qt], myV + stage * stage_step, lane);
    }
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + qt * kTile + g + 8 * (e >> 1), col = n0 + 8 * j + 2 * t + (e & 1);
          const bool ok = col <= row && col < T;
          acc_s[qt][j][e] = ok ? acc_s[qt][j][e] * scale : 0.f;
          acc_d[qt][j][e] = ok ? acc_d[qt][j][e] : 0.f;
        }
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt) {
      if (gpre) mw.put<true>(sSHi, sSLo, acc_s[qt], qt);
      if (gpost) mw.put<false>(sD, nullptr, acc_d[qt], qt);
    }
    group_sync(mw.gp, gpre ? sSHi : nullptr, gpre ? sSLo : nullptr, gpost ? sD : nullptr);  // every head's S0, dA3
    if (gpre) mix_own<true>(sSHi, sSLo, sFrag, kPre, sC, mw);
    if (gpost) mix_own<false>(sD, nullptr, sFrag, kPostT, sDA, mw);
    mix_done(mw.gp);  // every head's C' and dA
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rl = g + 8 * r, cl = 8 * j + 2 * t, row = m0 + qt * kTile + rl, col = n0 + cl;
          const float2 c = gpre ? get_pair(sC, mw.out_slot(qt), rl, cl)
                                : make_float2(acc_s[qt][j][2 * r], acc_s[qt][j][2 * r + 1]);
          const float2 d = gpost ? get_pair(sDA, mw.out_slot(qt), rl, cl)
                                 : make_float2(acc_d[qt][j][2 * r], acc_d[qt][j][2 * r + 1]);
          const float a0 = col <= row && col < T ? exp2f(c.x * kLog2e - lse2[qt][r]) : 0.f;
          const float a1 = col + 1 <= row && col + 1 < T ? exp2f(c.y * kLog2e - lse2[qt][r]) : 0.f;
          dpart[qt][r] += a0 * d.x + a1 * d.y;
        }
    // No barrier: the next block writes MixIn after every warp's mix (barrier above) and MixOut only
    // after its own first barrier, which every warp reaches after reading this block's values.
  }
  group_finish(mw.gp);
#pragma unroll
  for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float s = quad_sum(dpart[qt][r]);
      const int row = m0 + qt * kTile + g + 8 * r;
      if (t == 0 && row < T && mw.real) delta[head + row] = s;
    }
}

// Backward, pass 2, FlashAttention-2's order: a CTA = 16 keys of one group (one warp per head), over
// the query blocks from the diagonal on, with transposed tiles (rows = keys, columns = queries):
//   S^T = K Q^T -> C'^T (mixed) -> A^T = exp(C' - lse) -> A3^T (mixed);  dV += A3^T dO;
//   dA3^T = V dO^T -> dA^T (mixed with Mpost^T);  dC'^T = A^T (dA^T - delta) -> dS^T (Mpre^T);
//   dK += dS^T Q;  dQ += dS K (fp32 atomics, scaled at conversion);
//   dMpost[x, y] += dA3_x . A_y and dMpre[x, y] += dC'_x . S_y: tensor-core products over the same
//   MixIn buffers, accumulated per warp in registers, summed over the warps at the end into per-CTA
//   partials part[(cta * G + x) * kMaxGBwd + y] (y within x's group), reduced in a fixed order. On a
//   cluster (kC = 2) each CTA sums the positions of its half of the tile rows, for every x of the group.
// The mixes are the forward's (head_mix_mma.cuh): S0 with its remainder (the logits go into exp and
// must match the forward's lse), A, dA3 and dC' as bf16 (their products are bf16 MMAs anyway).
// kMaxThreads: 512 for 16 heads (128 registers per thread: this kernel spills there), 256 for groups
// of up to 8 (255 registers, no spills). Shared memory allows one CTA per SM either way at D = 64.
// kStages = 2: the next query block's Q and dO tiles load while this one is used (where shared memory
// holds two sets, see launch_backward); 1: each step waits for its own, except with kQB = 2, where the
// next step's tiles load into the same buffers once this step is done with them (dO after dV, Q after
// dK), overlapping the step's last products.
// kQB = 2 (session 12; groups of up to 8 heads in one CTA at D = 64): each step takes two query blocks,
// m0 and m0 + 16. Their tiles share the mixing products (MixIn slots x and x + G, block-diagonal
// coefficients, frag_coef's reps), so the six barriers of a step serve twice the work, each warp has
// two independent chains between them, and K's fragments serve both blocks. Measured as the main
// pass's bound (ncu, session 11: 13 cycles per issued instruction, waiting at barriers and on
// dependent loads).
template <int D, int kMaxThreads, int kStages, int kC, int kQB = 1, bool kEarlyOne = false>
__global__ void __launch_bounds__(kMaxThreads)
    flash_mix_bwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                         const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                         const float* __restrict__ mpre, int gpre, const float* __restrict__ mpost, int gpost,
                         float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv,
                         float* __restrict__ part_pre, float* __restrict__ part_post, int H, int T, int G,
                         float scale) {
  static_assert(kQB == 1 || (kQB == 2 && kC == 1), "two query blocks per step: one CTA per group");
  constexpr int S = D + 8, SS = kTile + 8, kRows = kQB * kTile;  // kRows: query rows per step
  constexpr bool kEarlyLoads = kStages == 1 && (kQB == 2 || kEarlyOne);  // see below
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int L = group_warps(G, kC);              // the CTA's warps
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // [L][16][S]
  bf16* sQ = sK + L * kTile * S;                 // [kStages][L][kRows][S]
  bf16* sO = sQ + kStages * L * kRows * S;       // [kStages][L][kRows][S]: dO
  bf16* sdS = sO + kStages * L * kRows * S;      // [L][kQB][16][SS]: dS^T (keys x queries)
  uint32_t* sFrag = reinterpret_cast<uint32_t*>(sdS + L * kQB * kTile * SS);
  bf16* sSHi = reinterpret_cast<bf16*>(sFrag + kFragWords);  // MixIn: S0^T (hi, lo), A^T then dC'^T, dA3^T
  bf16* sSLo = sSHi + kInElems;
  bf16* sA = sSLo + kInElems;
  bf16* sD = sA + kInElems;
  float* sX1 = reinterpret_cast<float*>(sD + kInElems);  // MixOut: C'^T, then A3^T, then dS^T
  float* sX2 = sX1 + kQB * L * kXT;                       // MixOut: dA^T
  MixWarp mw = mix_warp(sFrag, mpre, gpre, mpost, gpost, H, T, G, kC, kQB);
  if (kC == 1) mw.real = true;  // no padding in one CTA: the checks compile away
  // The tile rows of the weight-gradient products: this warp's slot, + the group's warps (padding
  // included: every row once), ...
  const int grad_row0 = mw.x, grad_step = mw.gp.C * L;
  zero_in(sSHi), zero_in(sSLo), zero_in(sA), zero_in(sD);
  const int warp = mw.warp, lane = mw.lane, g = mw.g, t = mw.t;
  const size_t head = mw.head;
  const int n0 = static_cast<int>(blockIdx.y) * kTile;  // tile 0 has the most query blocks: it starts first
  q += head * D, k += head * D, v += head * D, dout += head * D, dq_acc += head * D, dk += head * D, dv += head * D;

  bf16* myK = sK + warp * kTile * S;
  bf16* myQ = sQ + warp * kRows * S;
  bf16* myO = sO + warp * kRows * S;
  bf16* mydS = sdS + warp * kQB * kTile * SS;
  // K of the CTA's keys stays in shared memory; V as A fragments in registers (staged through sQ).
  warp_load_rows<D, S>(myK, k, n0, T, lane);
  warp_load_rows<D, S>(myQ, v, n0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  uint32_t va[D / 16][4];
  load_a_frags<D, S>(va, myQ, lane);
  group_start(mw.gp);  // the fragments and the zeroed MixIn buffers; every warp's V read before Q lands

  float acc_dk[D / 8][4] = {}, acc_dv[D / 8][4] = {};
  float gpre_acc[2][4] = {}, gpost_acc[2][4] = {};  // this warp's share of dMpre / dMpost (head_mix_mma.cuh)
  const int stage_step = L * kRows * S;
  auto load_rows = [&](bf16* dst, const bf16* src, int r0) {
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt) warp_load_rows<D, S>(dst + qt * kTile * S, src, r0 + qt * kTile, T, lane);
  };
  load_rows(myQ, q, n0);
  load_rows(myO, dout, n0);
  cp_async_commit();
  constexpr bool kPrefetchStats = kMaxThreads <= 256;
  float nxt_lse[kQB][2][2] = {}, nxt_dlt[kQB][2][2] = {};  // raw lse and delta of the next step's query
                                                           // blocks (of this one without kPrefetchStats)
  auto load_stats = [&](int mb) {
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int qi = mb + qt * kTile + 8 * j + 2 * t + e;
          nxt_lse[qt][j][e] = qi < T ? lse[head + qi] : 0.f;
          nxt_dlt[qt][j][e] = qi < T ? delta[head + qi] : 0.f;
        }
  };
  if constexpr (kPrefetchStats) load_stats(n0);
  for (int m0 = n0, it = 0; m0 < T; m0 += kRows, ++it) {
    // This warp's last reads of the buffer a load overwrites (its MMAs of an earlier block) are done.
    const int stage = kStages == 2 ? it & 1 : 0;
    const bool has_next = m0 + kRows < T, prefetch = kStages == 2 && has_next;
    if (kStages == 1 && !kEarlyLoads && it > 0) {
      load_rows(myQ, q, m0);
      load_rows(myO, dout, m0);
      cp_async_commit();
    }
    if (prefetch) {
      load_rows(myQ + (stage ^ 1) * stage_step, q, m0 + kRows);
      load_rows(myO + (stage ^ 1) * stage_step, dout, m0 + kRows);
      cp_async_commit();
    }
    const bf16* cQ = myQ + stage * stage_step;
    const bf16* cO = myO + stage * stage_step;
    // The row statistics of this lane's query columns (8j + 2t + e), while the tiles land; with 8 or
    // fewer heads (registers to spare) they were loaded one block ahead, and the next block's are
    // loaded now (ncu, session 7: these loads were the main pass's second-largest stall).
    float lse2[kQB][2][2], dlt[kQB][2][2];
    if constexpr (!kPrefetchStats) load_stats(m0);
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) lse2[qt][j][e] = nxt_lse[qt][j][e] * kLog2e, dlt[qt][j][e] = nxt_dlt[qt][j][e];
    if constexpr (kPrefetchStats) load_stats(m0 + kRows);
    if (prefetch)
      cp_async_wait_group<1>();
    else
      cp_async_wait_group<0>();
    __syncwarp();
    float acc_s[kQB][2][4], d3[kQB][2][4];
    if constexpr (kQB == 1) {
      warp_gemm_abt<16, D, S>(acc_s[0], myK, cQ, lane);
    } else {  // K's fragments once for both blocks
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
        for (int j = 0; j < 2; ++j) acc_s[qt][j][0] = acc_s[qt][j][1] = acc_s[qt][j][2] = acc_s[qt][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ka[4];
        ldmatrix_x4(ka, myK + a_offset(lane, 0, kk * 16, S));
#pragma unroll
        for (int qt = 0; qt < kQB; ++qt) {
          uint32_t bb[4];
          ldmatrix_x4(bb, cQ + qt * kTile * S + bnk_offset(lane, 0, kk * 16, S));
          mma_bf16(acc_s[qt][0], ka, bb[0], bb[1]);
          mma_bf16(acc_s[qt][1], ka, bb[2], bb[3]);
        }
      }
    }
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt) frag_gemm_abt<D, S>(d3[qt], va, cO + qt * kTile * S, lane);
    bool ok[kQB][2][4];
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + g + 8 * (e >> 1), qi = m0 + qt * kTile + 8 * j + 2 * t + (e & 1);
          ok[qt][j][e] = key <= qi && qi < T && key < T;
          acc_s[qt][j][e] = ok[qt][j][e] ? acc_s[qt][j][e] * scale : 0.f;
          d3[qt][j][e] = ok[qt][j][e] ? d3[qt][j][e] : 0.f;
        }
    if (gpre) {
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt) mw.put<true>(sSHi, sSLo, acc_s[qt], qt);
      group_sync(mw.gp, sSHi, sSLo);  // (1) S0^T of every head
      mix_own<true>(sSHi, sSLo, sFrag, kPre, sX1, mw);
      mix_done(mw.gp);  // (2) C'^T of every head
    }
    float a[kQB][2][4];
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float2 c = gpre ? get_pair(sX1, mw.out_slot(qt), g + 8 * r, 8 * j + 2 * t)
                                : make_float2(acc_s[qt][j][2 * r], acc_s[qt][j][2 * r + 1]);
          a[qt][j][2 * r] = ok[qt][j][2 * r] ? exp2f(c.x * kLog2e - lse2[qt][j][0]) : 0.f;
          a[qt][j][2 * r + 1] = ok[qt][j][2 * r + 1] ? exp2f(c.y * kLog2e - lse2[qt][j][1]) : 0.f;
        }
    float p[kQB][2][4], dc[kQB][2][4];
    if (gpost) {
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt) {
        mw.put<false>(sA, nullptr, a[qt], qt);
        mw.put<false>(sD, nullptr, d3[qt], qt);
      }
      group_sync(mw.gp, sA, sD);  // (3) A^T and dA3^T of every head; every warp has read C'^T
      mix_own<false>(sA, nullptr, sFrag, kPost, sX1, mw);
      mix_own<false>(sD, nullptr, sFrag, kPostT, sX2, mw);
      grad_tiles(gpost_acc, sD, sA, nullptr, grad_row0, grad_step, lane);  // dMpost += dA3^T A
      mix_done(mw.gp);  // (4) A3^T and dA^T of every head; every warp is done with sA
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float2 a3 = get_pair(sX1, mw.out_slot(qt), g + 8 * r, 8 * j + 2 * t);
            const float2 da = get_pair(sX2, mw.out_slot(qt), g + 8 * r, 8 * j + 2 * t);
            p[qt][j][2 * r] = a3.x, p[qt][j][2 * r + 1] = a3.y;
            dc[qt][j][2 * r] = a[qt][j][2 * r] * (da.x - dlt[qt][j][0]);
            dc[qt][j][2 * r + 1] = a[qt][j][2 * r + 1] * (da.y - dlt[qt][j][1]);
          }
    } else {
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            p[qt][j][e] = a[qt][j][e], dc[qt][j][e] = a[qt][j][e] * (d3[qt][j][e] - dlt[qt][j][e & 1]);
    }
    // Query row 0 (qt 0, j 0, lane t 0, e 0 and 2) sees one key: its softmax Jacobian is exactly 0, which
    // dA - delta (delta from other roundings) would only approximate (T = 1: dq, dk, d head_pre exactly 0).
    if (m0 == 0 && t == 0) dc[0][0][0] = dc[0][0][2] = 0.f;
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt) accumulate_p_b<D, S>(acc_dv, p[qt], cO + qt * kTile * S, lane);  // dV += A3^T dO
    // One stage with two blocks (or kEarlyOne): the next step's dO tiles load once this step's last reads
    // of them are done (here) and its Q tiles after dK below, so that the loads overlap the rest of the
    // step. Session 12: -7% on the two-block pass, -3.6% on the one-CTA kernel at D = 128; the kernels
    // that spill got slower with them (the 16-head one at D = 64 +7%, the clustered one at D = 128 +2.7%).
    if (kEarlyLoads && has_next) {
      __syncwarp();
      load_rows(myO, dout, m0 + kRows);
      cp_async_commit();
    }
    float ds[kQB][2][4];
    if (gpre) {
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt) mw.put<false>(sA, nullptr, dc[qt], qt);  // A^T is done with (barrier (4), or no post mix)
      group_sync(mw.gp, sA);  // (5) dC'^T of every head; every warp has read A3^T and dA^T
      mix_own<false>(sA, nullptr, sFrag, kPreT, sX1, mw);
      grad_tiles(gpre_acc, sA, sSHi, sSLo, grad_row0, grad_step, lane);  // dMpre += dC'^T S0
      mix_done(mw.gp);  // (6) dS^T of every head; every warp is done with sA and sS
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float2 x = get_pair(sX1, mw.out_slot(qt), g + 8 * r, 8 * j + 2 * t);
            ds[qt][j][2 * r] = x.x, ds[qt][j][2 * r + 1] = x.y;
          }
    } else {
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) ds[qt][j][e] = dc[qt][j][e];
    }
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(mydS + qt * kTile * SS + (g + 8 * r) * SS + 8 * j + 2 * t) =
              pack_bf16(ds[qt][j][2 * r], ds[qt][j][2 * r + 1]);
      accumulate_p_b<D, S>(acc_dk, ds[qt], cQ + qt * kTile * S, lane);  // dK += dS^T Q (scaled at the end)
    }
    __syncwarp();
    if (kEarlyLoads && has_next) {
      load_rows(myQ, q, m0 + kRows);
      cp_async_commit();
    }
    // dQ[m0 + 16 qt ..] += dS K: A = dS (queries x keys) read transposed from dS^T.
    uint32_t aq[kQB][4];
#pragma unroll
    for (int qt = 0; qt < kQB; ++qt) ldmatrix_x4_trans(aq[qt], mydS + qt * kTile * SS + at_offset(lane, 0, 0, SS));
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, myK + bkn_offset(lane, 0, dn * 16, S));
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt) {
        float acc[2][4] = {};
        mma_bf16(acc[0], aq[qt], bb[0], bb[1]);
        mma_bf16(acc[1], aq[qt], bb[2], bb[3]);
        if (mw.real) atomic_add_tile(dq_acc, acc, m0 + qt * kTile, dn * 16, T, D, lane);
      }
    }
    __syncwarp();
    // No barrier at the end: the next block's first shared write of each buffer follows a barrier
    // that every warp reaches only after its last read of it in this block.
  }

  group_finish(mw.gp);
  // dK (scaled) and dV of the CTA's 16 keys, staged through the warp's Q tile, 16-byte stores.
  __syncwarp();
#pragma unroll
  for (int pass = 0; pass < (mw.real ? 2 : 0); ++pass) {
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
  // The mixing-weight gradient: each warp's 16 x 16 share (rows x, columns y of the CTA's slots) into
  // shared memory (the MixOut buffers, free now), then one partial per (CTA, head x, y in x's group),
  // summed over the warps in a fixed order. With two tiles per head (kQB = 2), head x's terms are the
  // sum of the two diagonal blocks, (x, y) and (x + G, y + G); the cross-tile blocks are not used.
  __syncthreads();
  float* sG = sX1;  // [2][L warps][16][16]: needs 2 * L * 256 <= 2 * L * kXT floats
  for (int kind = 0; kind < 2; ++kind) {
    const float(&acc)[2][4] = kind == 0 ? gpre_acc : gpost_acc;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        sG[((kind * L + warp) * kMaxG + g + 8 * (e >> 1)) * kMaxG + 8 * nb + 2 * t + (e & 1)] = acc[nb][e];
  }
  __syncthreads();
  const size_t cta = static_cast<size_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  for (int i = threadIdx.x; i < 2 * G * kMaxGBwd; i += blockDim.x) {
    const int kind = i / (G * kMaxGBwd), x = (i / kMaxGBwd) % G, yy = i % kMaxGBwd;
    const int gs = kind == 0 ? gpre : gpost;
    float* part = kind == 0 ? part_pre : part_post;
    if (!gs || yy >= gs) continue;
    const int y = x - x % gs + yy;
    float sum = 0.f;
    for (int w = 0; w < L; ++w)
#pragma unroll
      for (int qt = 0; qt < kQB; ++qt) sum += sG[((kind * L + w) * kMaxG + x + qt * G) * kMaxG + y + qt * G];
    part[(cta * G + x) * kMaxGBwd + yy] = sum;
  }
}

// grad[h][y] += sum over the batch, the cluster's CTAs and the key tiles of the partials of head h: one
// warp per (h, y), lane l taking the (batch, rank, tile) triples l, l + 32, ... in ascending order, then
// a fixed shuffle tree (deterministic). grad is [H / g][g][g] = [H][g].
__global__ void reduce_mix_grad_kernel(const float* __restrict__ part, float* __restrict__ grad, int B, int H, int G,
                                       int C, int gs, int ntiles) {
  const int idx = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (idx >= H * gs) return;
  const int h = idx / gs, y = idx % gs, units = H / G, u = h / G, w = h % G;
  double s = 0.0;
  for (int e = lane; e < B * C * ntiles; e += 32) {
    const int b = e / (C * ntiles), rank = e / ntiles % C, tile = e % ntiles;
    s += part[(((static_cast<size_t>(b * units + u) * C + rank) * ntiles + tile) * G + w) * kMaxGBwd + y];
  }
  s = warp_sum(s);
  if (lane == 0) grad[idx] += static_cast<float>(s);
}

// CTAs per coupled group at most (mix_ctas): the kernels are compiled for 1 and 2.
constexpr int kMaxMixCtas = 2;

// Per-CTA partials of one mixing weight's gradient: (batch, group, rank in the cluster (< kMaxMixCtas),
// key tile, head of the group) x kMaxGBwd floats.
size_t mix_partials(int B, int H, int T) {
  return static_cast<size_t>(B) * H * kMaxMixCtas * ((T + kTile - 1) / kTile) * kMaxGBwd;
}

// CTAs per coupled group (group_cluster.cuh): one CTA holds up to 16 heads at D = 64 (512 threads) and
// 8 at D = 128, where larger groups take a pair of CTAs (cluster_size; an odd group leaves one padding
// warp in the second). MTA_FLASH_MIX_CLUSTER=1 also puts the groups of 9-16 at D = 64 on pairs (for
// comparisons, bench/RESULTS.md).
int mix_ctas(int G, int D) {
  if (G <= 8) return 1;
  if (D == 128) return cluster_size(G, 8);
  // Read per launch: tests switch it.
  return env_switch("MTA_FLASH_MIX_CLUSTER").value_or(false) ? 2 : 1;
}

// Whether FlashMix's passes take two query tiles per warp: a group of up to 8 heads in one CTA (C) at
// D = 64 (the kernels' kQB = 2, session 12). MTA_FLASH_MIX_TWO_BLOCKS=0 keeps one (for comparisons; read
// per launch).
bool two_query_blocks(int D, int G, int C) {
  return D == 64 && C == 1 && G <= 8 && env_switch("MTA_FLASH_MIX_TWO_BLOCKS").value_or(true);
}

template <int D, bool kOut>
void launch_pass(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* mpre,
                 const float* mpost, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  const int H = spec.heads, G = spec.coupled_heads(), C = mix_ctas(G, D);
  const int gpre = spec.head_pre ? spec.head_pre->group : 0, gpost = spec.head_post ? spec.head_post->group : 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  if constexpr (D == 64) {  // two query tiles per warp (kQB) for groups of up to 8 in one CTA
    if (two_query_blocks(D, G, C)) {
      launch_grouped_rows(flash_mix_fwd_kernel<D, kOut, 1, 2>, B, H, G, C, T, 2 * kTile,
                          smem_bytes<D>(group_warps(G, C), kOut, 2), s, q, k, v, mpre, gpre, mpost, gpost, o, lse, H,
                          T, G, scale);
      return;
    }
  }
  const size_t smem = smem_bytes<D>(group_warps(G, C), kOut);
  auto kernel = C == 1 ? flash_mix_fwd_kernel<D, kOut, 1> : flash_mix_fwd_kernel<D, kOut, 2>;
  launch_grouped(kernel, B, H, G, C, T, smem, s, q, k, v, mpre, gpre, mpost, gpost, o, lse, H, T, G, scale);
}

template <int D>
void launch_forward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* mpre,
                    const float* mpost, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  launch_pass<D, false>(spec, q, k, v, mpre, mpost, o, lse, B, T, s);
  launch_pass<D, true>(spec, q, k, v, mpre, mpost, o, lse, B, T, s);
}

// Opts kernel in to `smem` bytes of dynamic shared memory.
template <class Kernel>
void set_smem_limit(Kernel kernel, size_t smem) {
  MTA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

// Whether the two-stage variant of a pass fits in a CTA's shared memory and keeps as many CTAs per SM
// as the one-stage variant (the streamed tiles' latency is better hidden by more CTAs than by a second
// stage). Sets both kernels' shared-memory limits (the occupancy query and the launch need them).
template <class Kernel1, class Kernel2>
bool two_stages_pay(Kernel1 one, Kernel2 two, int threads, size_t smem1, size_t smem2) {
  set_smem_limit(one, smem1);
  if (smem2 > kMaxSmemPerBlock) return false;
  set_smem_limit(two, smem2);
  int n1 = 0, n2 = 0;
  MTA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n1, one, threads, smem1));
  MTA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n2, two, threads, smem2));
  return n2 >= n1 && n2 > 0;
}

template <int D>
void launch_backward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* mpre,
                     const float* mpost, const bf16* dout, const float* lse, bf16* dq, bf16* dk, bf16* dv,
                     float* grad_pre, float* grad_post, void* scratch, int B, int T, cudaStream_t s) {
  constexpr int S = D + 8, SS = kTile + 8;
  const int H = spec.heads, G = spec.coupled_heads(), ntiles = (T + kTile - 1) / kTile;
  const int C = mix_ctas(G, D), L = group_warps(G, C);
  const int gpre = spec.head_pre ? spec.head_pre->group : 0, gpost = spec.head_post ? spec.head_post->group : 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const size_t rows = static_cast<size_t>(B) * H * T, parts = mix_partials(B, H, T);
  auto up = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  char* base = static_cast<char*>(scratch);
  float* delta = reinterpret_cast<float*>(base);
  float* dq_acc = reinterpret_cast<float*>(base + up(rows * 4));
  float* part_pre = reinterpret_cast<float*>(base + up(rows * 4) + up(rows * D * 4));
  float* part_post = part_pre + up(parts * 4) / 4;
  MTA_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, rows * D * sizeof(float), s));
  // Two stages of the streamed tiles where they fit and do not cost occupancy (measured, session 7:
  // at G = 4, D = 64 the second stage took the main pass from 2 CTAs per SM to 1 and made it 47%
  // slower; where the CTAs per SM stay the same it gains 5-10%), else one. Sizes are per CTA (L heads).
  const size_t tile = static_cast<size_t>(L) * kTile * S * sizeof(bf16);
  auto smem_delta = [&](int stages, int qb = 1) {
    return 2 * stages * tile + kFragBytes + 3 * kInBytes + 2 * out_bytes(qb * L);
  };
  auto smem_main = [&](int stages, int qb = 1) {
    return (1 + 2 * stages * qb) * tile + static_cast<size_t>(qb) * L * kTile * SS * sizeof(bf16) + kFragBytes +
           4 * kInBytes + 2 * out_bytes(qb * L);
  };
  const int threads = 32 * L;
  // The delta pass of kC CTAs per group and kQB query tiles per warp, in its better stage count.
  auto delta_pass = [&](auto kc, auto kqb) {
    constexpr int kC = decltype(kc)::value, kQB = decltype(kqb)::value;
    auto launch = [&](auto kernel, size_t smem) {
      launch_grouped_rows(kernel, B, H, G, C, T, kQB * kTile, smem, s, q, k, v, dout, lse, mpre, gpre, mpost, gpost,
                          delta, H, T, G, scale);
    };
    if (two_stages_pay(flash_mix_bwd_delta_kernel<D, 1, kC, kQB>, flash_mix_bwd_delta_kernel<D, 2, kC, kQB>, threads,
                       smem_delta(1, kQB), smem_delta(2, kQB)))
      launch(flash_mix_bwd_delta_kernel<D, 2, kC, kQB>, smem_delta(2, kQB));
    else
      launch(flash_mix_bwd_delta_kernel<D, 1, kC, kQB>, smem_delta(1, kQB));
  };
  auto key_tiles = [&](auto kernel, size_t smem) {
    launch_grouped(kernel, B, H, G, C, T, smem, s, q, k, v, dout, lse, delta, mpre, gpre, mpost, gpost, dq_acc, dk,
                   dv, part_pre, part_post, H, T, G, scale);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  // Both passes for groups of <= 8 heads per CTA (kC CTAs per group), each in its better stage count.
  auto small_groups = [&](auto kc) {
    constexpr int kC = decltype(kc)::value;
    delta_pass(kc, One{});
    if (two_stages_pay(flash_mix_bwd_kernel<D, 16 * kMaxG, 1, kC>, flash_mix_bwd_kernel<D, 16 * kMaxG, 2, kC>, threads,
                       smem_main(1), smem_main(2)))
      key_tiles(flash_mix_bwd_kernel<D, 16 * kMaxG, 2, kC>, smem_main(2));
    else if constexpr (D == 128 && kC == 1)  // early loads (kEarlyOne): -3.6% here, +2.7% on clusters (spills)
      key_tiles(flash_mix_bwd_kernel<D, 16 * kMaxG, 1, kC, 1, true>, smem_main(1));
    else
      key_tiles(flash_mix_bwd_kernel<D, 16 * kMaxG, 1, kC>, smem_main(1));
  };
  if (C == 2) {
    small_groups(Two{});
  } else if (two_query_blocks(D, G, C)) {
    if constexpr (D == 64) {  // at D = 128 the kernel has no registers for a second block
      // Two query blocks per step (kQB) in both passes: the main pass in one stage (~204 KB at 8 heads),
      // the delta pass in two (~165 KB) where they keep its CTAs per SM.
      delta_pass(One{}, Two{});
      key_tiles(flash_mix_bwd_kernel<D, 16 * kMaxG, 1, 1, 2>, smem_main(1, 2));
    }
  } else if (G <= 8) {
    small_groups(One{});
  } else if constexpr (D == 64) {  // 9-16 heads in one CTA of 512 threads (flash_mix_supported)
    delta_pass(One{}, One{});
    key_tiles(flash_mix_bwd_kernel<D, 32 * kMaxG, 1, 1>, smem_main(1));
  }
  launch_convert_accum(dq_acc, dq, static_cast<long long>(rows) * D, scale, s);
  for (auto [part, grad, gs] : {std::tuple{part_pre, grad_pre, gpre}, std::tuple{part_post, grad_post, gpost}}) {
    if (!gs) continue;
    reduce_mix_grad_kernel<<<(H * gs * 32 + 255) / 256, 256, 0, s>>>(part, grad, B, H, G, C, gs, ntiles);
    MTA_CUDA_CHECK_LAUNCH("reduce_mix_grad_kernel");
  }
}

}  // namespace

bool flash_mix_supported(const AttentionSpec& spec, int D) {
  if (spec.kq_pre || spec.kq_post || spec.norm || spec.gate || spec.depth_scale_layer) return false;
  if (!spec.head_pre && !spec.head_post) return false;  // standard attention: flash_attn
  if (D != spec.head_dim || (D != 64 && D != 128)) return false;
  const int G = spec.coupled_heads();
  // D = 128: up to 8 heads in one CTA, else a pair of CTAs (mix_ctas).
  const int C = cluster_size(G, 8);
  return D == 64 ? G <= kMaxG : C >= 1 && C <= kMaxMixCtas;
}

void flash_mix_forward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* head_pre,
                       const float* head_post, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  const int D = spec.head_dim;
  mix_require(flash_mix_supported(spec, D),
              "spec not covered (head_pre / head_post only, coupled heads <= 16)");
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
  return up(rows * 4) + up(rows * D * 4) + 2 * up(mix_partials(B, H, T) * 4);
}

void flash_mix_backward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* head_pre,
                        const float* head_post, const bf16* dout, const float* lse, bf16* dq, bf16* dk, bf16* dv,
                        float* grad_head_pre, float* grad_head_post, void* scratch, int B, int T, cudaStream_t s) {
  const int D = spec.head_dim;
  mix_require(flash_mix_backward_supported(spec, D),
              "backward: spec not covered (head_pre / head_post only, coupled heads <= 16)");
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
