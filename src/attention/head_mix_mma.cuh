#pragma once
// Head mixing on tensor cores, for the FlashMix kernels (flash_mix.cu).
//
// A CTA holds one 16 x 16 tile of positions for each of its G <= 16 heads, one warp per head.
// Mixing them, out_x = sum_y M[x, y] in_y at every position, is the product
//   Out[p, x] = sum_y In[p, y] M[x, y]  over the CTA's 256 positions p,
// one m16n8k16 MMA pair per tile row, with the heads as the k dimension:
//   * put_tile: each warp writes its tile as bf16 into a MixIn buffer, [16 heads][kYS], position
//     (r, c) at r * kPS + c. The layout is head-major, so a warp's writes are 4-byte pairs with no
//     bank conflicts. An optional second buffer holds the rounding remainder (hi + lo: ~16 bits of
//     mantissa), for logits that go into exp. Heads >= G stay zero (zero_in).
//   * mix_tiles_owned: tile row r is the A operand of one MMA (ldmatrix.trans from [k = head][m = position]).
//     The coefficients are B fragments, prepared once per CTA per lane (build_frags: hi and lo parts).
//     The fp32 results go to a MixOut buffer [G][kXT] in the warps' tile layout (row stride kXS),
//     where each warp reads its own head back.
//   * grad_tiles: the mixing weights' gradient terms sum_p D_x(p) V_y(p) are the product D^T V over
//     the same buffers (A = D from [m = head][k = position], B = V from [n = head][k = position]).
// The first version mixed with CUDA cores: 16 fp32 shared-memory reads and FMAs per position, head and
// mix, ~2,000 cycles of shared-memory bandwidth per mix and step on an SM (bench/RESULTS.md). Here
// each position and head costs one 2-byte write, one 4-byte write and read, and 1/16 of an MMA pair.
#include <cuda_bf16.h>

#include <cstdint>

#include "attention/head_mix_layout.h"
#include "attention/mma_sm80.cuh"

namespace mta::cuda::headmix {

using bf16 = __nv_bfloat16;

// Per lane, the B fragments of the four kinds, hi and lo parts, into sFrag (kFragWords b32): word
// 2 nt + reg of lane i of kind k at sFrag[frag_hi(k, i) + 2 nt + reg] (hi), kFragLo words later (lo).
// reps: the tiles per head in the mixing buffers (frag_coef). kinds < 4: only the first kinds (a
// forward pass needs kPre, or kPre and kPost: kinds * 1 KB of sFrag).
__device__ __forceinline__ void build_frags(uint32_t* sFrag, const float* mpre, int gpre, const float* mpost,
                                            int gpost, int head0, int G, int reps = 1, int kinds = 4) {
  for (int i = threadIdx.x; i < kinds * 32; i += blockDim.x) {
    const int kind = i / 32, lane = i % 32;
    const float* m = (kind == kPre || kind == kPreT) ? mpre : mpost;
    const int gs = (kind == kPre || kind == kPreT) ? gpre : gpost;
    const bool adj = kind >= kPreT;
    uint32_t* out = sFrag + frag_hi(kind, lane);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int reg = 0; reg < 2; ++reg) {
        float v[2], hi[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          int k, n;
          b_frag_kn(lane, nt, reg, e, k, n);
          v[e] = frag_coef(m, gs, head0, G, adj, k, n, reps);
          hi[e] = __bfloat162float(__float2bfloat16(v[e]));
        }
        out[2 * nt + reg] = mma::pack_bf16(v[0], v[1]);
        out[kFragLo + 2 * nt + reg] = mma::pack_bf16(v[0] - hi[0], v[1] - hi[1]);
      }
  }
}

// Zeroes a MixIn buffer (heads >= G are never written and must read as 0: 0 * NaN would not be).
__device__ __forceinline__ void zero_in(bf16* in) {
  for (int i = threadIdx.x; i < kInElems / 2; i += blockDim.x) reinterpret_cast<uint32_t*>(in)[i] = 0u;
}

// Warp x's 16 x 16 tile v, in the mma accumulator layout (v[j][2r + e] at row g + 8r, column
// 8j + 2t + e), into MixIn (and its rounding remainder into lo when kLo).
template <bool kLo>
__device__ __forceinline__ void put_tile(bf16* hi, bf16* lo, int x, const float (&v)[2][4], int g, int t) {
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int off = in_offset(x, g + 8 * r, 8 * j + 2 * t);
      const float a = v[j][2 * r], b = v[j][2 * r + 1];
      const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
      *reinterpret_cast<__nv_bfloat162*>(hi + off) = h;
      if (kLo)
        *reinterpret_cast<__nv_bfloat162*>(lo + off) =
            __floats2bfloat162_rn(a - __low2float(h), b - __high2float(h));
    }
}

// Out = mix of the group's tiles in MixIn (hi, + lo when kLo) with the coefficients of `kind`, into
// MixOut, for the slots h0 .. h0 + L - 1 that this CTA owns (h0 = 0, L = G: the whole group in one CTA;
// on a cluster, its share: group_cluster.cuh; with two tiles per head, 2 G slots). Its `warps` warps
// compute tile rows warp, warp + warps, ... and write the owned slots' results at local indices x - h0.
// The caller synchronizes before (MixIn complete) and after (MixOut complete).
template <bool kLo>
__device__ __forceinline__ void mix_tiles_owned(const bf16* hi, const bf16* lo, const uint32_t* sFrag, int kind,
                                                float* out, int h0, int L, int warps, int warp, int lane) {
  const uint4 fh = *reinterpret_cast<const uint4*>(sFrag + frag_hi(kind, lane));
  const uint4 fl = *reinterpret_cast<const uint4*>(sFrag + frag_hi(kind, lane) + kFragLo);
  const uint32_t bh[4] = {fh.x, fh.y, fh.z, fh.w}, bl[4] = {fl.x, fl.y, fl.z, fl.w};
  const int g = lane >> 2, t = lane & 3;
  for (int r = warp; r < kTile; r += warps) {
    uint32_t ah[4], al[4];
    mma::ldmatrix_x4_trans(ah, hi + mix_a_offset(lane, r));
    if (kLo) mma::ldmatrix_x4_trans(al, lo + mix_a_offset(lane, r));
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      mma::mma_bf16(c, ah, bl[2 * nt], bl[2 * nt + 1]);  // the small terms first
      if (kLo) mma::mma_bf16(c, al, bh[2 * nt], bh[2 * nt + 1]);
      mma::mma_bf16(c, ah, bh[2 * nt], bh[2 * nt + 1]);
      // c0, c1: position (r, g), heads x0, x0 + 1; c2, c3: position (r, g + 8).
      const int x0 = 8 * nt + 2 * t - h0;  // local head index
      if (x0 >= 0 && x0 < L) out[out_offset(x0, r, g)] = c[0], out[out_offset(x0, r, g + 8)] = c[2];
      if (x0 + 1 >= 0 && x0 + 1 < L) out[out_offset(x0 + 1, r, g)] = c[1], out[out_offset(x0 + 1, r, g + 8)] = c[3];
    }
  }
}

// acc[n-block] += D^T V summed over the positions of tile rows r0, r0 + step, ... (a warp's share: the
// CTA's warps, and on a cluster its CTAs, split the rows): acc[nb][e] is (head x = g + 8 (e >> 1),
// head y = 8 nb + 2t + (e & 1)). V's remainder is added when v_lo is given. a_offset(r): this lane's
// ldmatrix address in d of tile row r's A operand (grad_tiles: D in MixIn's layout, grad_a_offset; the
// clustered kq-layer kernels: D staged in MixOut, staged_grad_a_offset).
template <class AOffset>
__device__ __forceinline__ void grad_tiles_at(float (&acc)[2][4], const bf16* d, const AOffset& a_offset,
                                              const bf16* v, const bf16* v_lo, int r0, int step, int lane) {
  for (int r = r0; r < kTile; r += step) {
    uint32_t a[4], b[4];
    mma::ldmatrix_x4(a, d + a_offset(r));
    mma::ldmatrix_x4(b, v + grad_b_offset(lane, r));
    mma::mma_bf16(acc[0], a, b[0], b[1]);
    mma::mma_bf16(acc[1], a, b[2], b[3]);
    if (v_lo) {
      mma::ldmatrix_x4(b, v_lo + grad_b_offset(lane, r));
      mma::mma_bf16(acc[0], a, b[0], b[1]);
      mma::mma_bf16(acc[1], a, b[2], b[3]);
    }
  }
}
__device__ __forceinline__ void grad_tiles(float (&acc)[2][4], const bf16* d, const bf16* v, const bf16* v_lo, int r0,
                                           int step, int lane) {
  grad_tiles_at(acc, d, [lane](int r) { return grad_a_offset(lane, r); }, v, v_lo, r0, step, lane);
}

// This warp's head's values at its tile positions from MixOut (the mma accumulator layout).
__device__ __forceinline__ float2 get_pair(const float* out, int x, int row, int col) {
  return *reinterpret_cast<const float2*>(out + out_offset(x, row, col));
}

}  // namespace mta::cuda::headmix
