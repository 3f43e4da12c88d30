#pragma once
// The device code shared by the fused kq layer's forward (flash_kq_layer_fwd.cu: pass 1, pass 2) and
// backward (flash_kq_layer_bwd.cu: kernels P and Q): heads per CTA, the S0 / A windows on key rings, the
// row fragments, the convolution stencils, the group's mixing exchanges and A's window (pass 2's step 2,
// also kernel P's). See flash_kq_layer.h and docs/flash-mta.md. Internal to those two files.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/flash_kq_layer.h"
#include "attention/flash_common.cuh"
#include "attention/group_cluster.cuh"
#include "attention/head_mix_mma.cuh"
#include "attention/mma_sm80.cuh"
#include "cuda/check.h"
#include "cuda/warp_reduce.cuh"

namespace mta::cuda::kq_layer {

using bf16 = __nv_bfloat16;
using namespace mma;      // NOLINT: the kernels are written in terms of these primitives
using namespace headmix;  // NOLINT: kTile, kMaxG, the mixing buffers and products

inline void kq_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flash_kq_layer: " + what);
}

constexpr int kMaxCq = 8, kMaxCk = 15;

// Heads (warps) per CTA, as shared memory and registers allow: pass 1 holds 16 at D = 64 (one window per
// head) and 8 at D = 128; pass 2 holds 8; kernels P and Q 8 at D = 64 and 4 at D = 128 (where they
// keep their Q and dO rows in shared memory: RowFrags). A larger group runs on a
// cluster of CTAs (cluster_size, group_cluster.cuh); the whole group's tiles must fit MixIn (kMaxG).
constexpr int lse_heads(int D) { return D == 64 ? 16 : 8; }
constexpr int kOutHeads = 8;
constexpr int bwd_heads(int D) { return D == 64 ? 8 : 4; }
constexpr size_t kMaxSmemPerCta = 227 * 1024;  // sm_90's opt-in dynamic shared memory per CTA
// The kernels after pass 1 declare __launch_bounds__(256, kCl ? 1 : 0): compiled for clusters (whose
// size they read at run time), ptxas otherwise chose as few as 64 or 128 registers and spilled (kernel
// P's runtime-size form at D = 64: 128 registers, 96 bytes; the former delta pass at D = 128: 64
// registers); a minimum of one CTA per SM lets them use up to 255. The one-CTA forms keep ptxas's own
// choice.

// A layer without kq_pre (or kq_post) runs the kernels with the identity 1 x 1 convolution in its
// place: with the weight pointer null, load_taps gives the single tap 1, and C = 1 * S0 is S0 exactly in
// fp32, so the result is the layer without that convolution (its weight gradient is computed and
// dropped). This is how the kq layers cover kq_post alone (with or without head mixing).
inline KqConv pre_conv(const AttentionSpec& spec) {
  return spec.kq_pre ? *spec.kq_pre : KqConv{1, 1, PadKey::Right};
}
inline KqConv post_conv(const AttentionSpec& spec) {
  return spec.kq_post ? *spec.kq_post : KqConv{1, 1, PadKey::Right};
}
// The paper's 6 x 11 on both sides: the passes after pass 1 are compiled for it (other sizes: runtime).
inline bool paper_sizes(const AttentionSpec& spec) {
  const KqConv pre = pre_conv(spec);
  return pre.q == 6 && pre.k == 11 && spec.kq_post && spec.kq_post->q == 6 && spec.kq_post->k == 11;
}
constexpr int kWinRows = 24;       // S0 rows m0 - 8 .. m0 + 15
constexpr int kWinTop = 8;         // window row of query row m0
constexpr int kWinPitch = 68;      // floats per window row: a ring of 64 keys, padded (16-byte rows)
constexpr int kTapPitch = 16;      // floats per row of a head's taps in shared memory (float4 loads)
constexpr int kHeadTaps = kMaxCq * kTapPitch;  // floats per head's taps (rows of kTapPitch)
constexpr int kWinFloats = kWinRows * kWinPitch;

// The windows' key axis: a ring of kSize columns (rows of kPitch floats, padded so that the 16 lanes of
// a stencil reading 16 consecutive rows hit distinct banks). The forward and kernel P use rings of 64
// keys; kernel Q, which holds three windows per head, rings of 48 (three key tiles, all it needs:
// replay_kq_layer_backward.py checks the occupancy).
struct Ring64 {
  static constexpr int kSize = 64, kPitch = 68;
  static __device__ __forceinline__ int col(int x) { return x & (kSize - 1); }
};
struct Ring48 {
  static constexpr int kSize = 48, kPitch = 52;
  // x >= 0. Unsigned: a constant modulo without the signed fix-ups (session 12: ncu put Ring48::col at 3% of
  // kernel Q's instructions, from the windows' per-element stores).
  static __device__ __forceinline__ int col(int x) { return static_cast<int>(static_cast<unsigned>(x) % kSize); }
};
static_assert(Ring64::kPitch == kWinPitch, "the forward's windows are Ring64's");

// Per warp: the S0 window, then the K tile [16][D + 8] bf16; the Q rows are staged there first
// ([32][D + 8] bf16 fits the two together).
template <int D>
constexpr size_t warp_region_bytes() {
  return kWinFloats * sizeof(float) + static_cast<size_t>(kTile) * (D + 8) * sizeof(bf16);
}
static_assert(warp_region_bytes<64>() >= 32 * (64 + 8) * sizeof(bf16), "Q staging fits the warp region");
static_assert(warp_region_bytes<128>() >= 32 * (128 + 8) * sizeof(bf16), "Q staging fits the warp region");

// kTapRows: rows of taps per head (kMaxCq, or the compiled cq). At 8 heads, D = 64 and 6 x 11 taps this
// is 113.6 KB, so that two CTAs share an SM (ncu, session 9: with 8 tap rows it took 116.4 KB, 0.6 KB
// more than half an SM's 233 KB minus the driver's 1 KB per CTA, and ran one CTA of 8 warps per SM).
template <int D, int kTapRows = kMaxCq>
constexpr size_t smem_bytes(int G) {
  return static_cast<size_t>(G) * (warp_region_bytes<D>() + kTapRows * kTapPitch * sizeof(float)) +
         kFragWords * sizeof(uint32_t) + 2 * static_cast<size_t>(kInElems) * sizeof(bf16) +
         static_cast<size_t>(G) * kXT * sizeof(float);
}

// kRows rows r0 .. of one head ([T][D] bf16 at `head`) into shared memory (row stride S) with one
// warp's lanes; rows outside [0, T) are zero-filled (`head` is their dummy source: T >= 1).
template <int D, int S, int kRows>
__device__ __forceinline__ void warp_load_rows_zero(bf16* smem, const bf16* head, int r0, int T, int lane) {
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < kRows * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, row = r0 + r;
    const bool ok = row >= 0 && row < T;
    cp_async_16(smem + r * S + col, ok ? head + static_cast<size_t>(row) * D + col : head, ok ? 16 : 0);
  }
}

// The A fragments of kTiles 16-row tiles of Q or dO rows (r0 ..), the left operand of the products
// with K or V tiles. kInSmem false: held in registers, taken once from the rows staged in shared memory
// (which may then be reused). kInSmem true: read from the rows in shared memory at each use (ldmatrix),
// which must stay there: the backward's kernels at D = 128, where 32 rows of fragments take 64
// registers that kernels P and Q (247-255 registers at D = 64) do not have.
template <int D, int S, int kTiles, bool kInSmem>
struct RowFrags {
  uint32_t a[kInSmem ? 1 : kTiles][kInSmem ? 1 : D / 16][4];
  const bf16* rows;
  __device__ __forceinline__ void take(const bf16* smem, int lane) {
    rows = smem;
    if constexpr (!kInSmem) {
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          ldmatrix_x4(a[tile][kk], smem + tile * kTile * S + a_offset(lane, 0, kk * 16, S));
    }
  }
  __device__ __forceinline__ void get(int tile, int kk, uint32_t (&out)[4], int lane) const {
    if constexpr (kInSmem) {
      ldmatrix_x4(out, rows + tile * kTile * S + a_offset(lane, 0, kk * 16, S));
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) out[i] = a[tile][kk][i];
    }
  }
};
// The forward's: Q rows in registers (at D = 128 too: passes 1 and 2 have the registers).
template <int D>
using QFrags = RowFrags<D, D + 8, 2, false>;
// The backward's Q and dO rows: in shared memory at D = 128.
template <int D>
constexpr bool kBwdRowsInSmem = D > 64;
// Bytes per warp of the rows the backward keeps in shared memory (`sets` sets of 32 rows), 0 at D = 64.
template <int D>
constexpr size_t kept_rows_bytes(int sets) {
  return kBwdRowsInSmem<D> ? static_cast<size_t>(sets) * 2 * kTile * (D + 8) * sizeof(bf16) : 0;
}

// Rows r0 .. r0 + 16 kTiles - 1 of one head (zero outside [0, T)) into `smem` ([16 kTiles][S] bf16)
// and the fragments f.
template <int D, int S, int kTiles, bool kInSmem>
__device__ __forceinline__ void load_row_frags(bf16* smem, const bf16* src, int r0, int T, int lane,
                                               RowFrags<D, S, kTiles, kInSmem>& f) {
  warp_load_rows_zero<D, S, kTiles * kTile>(smem, src, r0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  f.take(smem, lane);
  __syncwarp();
}

// A power of two s with s * mx in [2^13, 2^14) (1 for mx = 0), so that values up to mx scaled by it are
// normal fp16 numbers (below 65504) that keep their 11 significant bits down to mx / 2^27. Exact: the
// scaling and its inverse change no bit of a significand.
__device__ __forceinline__ float f16_scale_for(float mx) {
  if (!(mx > 0.f)) return 1.f;
  const int e = max(-110, min(((__float_as_int(mx) >> 23) & 0xff) - 127, 110));
  return __int_as_float((127 + 13 - e) << 23);
}


// A head's taps w [cq][ck] (of head h in [H][cq][ck]) into the warp's rows of kTapPitch; w == nullptr:
// the identity 1 x 1 (a layer without kq_post).
__device__ __forceinline__ void load_taps(float* myW, const float* w, int h, int cq, int ck, int lane) {
  for (int i = lane; i < cq * ck; i += 32)
    myW[(i / ck) * kTapPitch + i % ck] = w ? w[static_cast<size_t>(h) * cq * ck + i] : 1.f;
}

// The products of a 16-key tile in shared memory (sT, rows of S) with the two 16-row A-fragment tiles of
// f (RowFrags): acc0 / acc1 [key half][mma accumulator], added to. kF16: fp16 operands, else bf16.
template <int D, int S, bool kF16, class F>
__device__ __forceinline__ void two_tile_mma(float (&acc0)[2][4], float (&acc1)[2][4], const bf16* sT, const F& f,
                                             int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t bb[4], a0[4], a1[4];
    ldmatrix_x4(bb, sT + bnk_offset(lane, 0, kk * 16, S));
    f.get(0, kk, a0, lane);
    f.get(1, kk, a1, lane);
    if constexpr (kF16) {
      mma_f16(acc0[0], a0, bb[0], bb[1]), mma_f16(acc0[1], a0, bb[2], bb[3]);
      mma_f16(acc1[0], a1, bb[0], bb[1]), mma_f16(acc1[1], a1, bb[2], bb[3]);
    } else {
      mma_bf16(acc0[0], a0, bb[0], bb[1]), mma_bf16(acc0[1], a0, bb[2], bb[3]);
      mma_bf16(acc1[0], a1, bb[0], bb[1]), mma_bf16(acc1[1], a1, bb[2], bb[3]);
    }
  }
}

// The same for key tile rows 16 tile .. of `rows` [T][D] bf16 (K or V, zero past T), staged in sT first.
template <int D, int S, class F>
__device__ __forceinline__ void two_tile_products(float (&acc0)[2][4], float (&acc1)[2][4], bf16* sT, const bf16* rows,
                                                  int key0, int T, const F& f, int lane) {
  warp_load_rows_zero<D, S, kTile>(sT, rows, key0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  two_tile_mma<D, S, false>(acc0, acc1, sT, f, lane);
}

// Key tile `tile` (keys 16 tile ..) of S0 into a window of rows m0 - kTop .. m0 + 15 (kTop = 8 or 16)
// from the products of the two 16-row Q tiles (rows m0 - 16 .. m0 - 1, of which the last kTop are kept,
// and m0 .. m0 + 15), scaled, the future set to 0. kRows: the window's rows (kTop + 16, or kTop + 8 where
// only rows m0 - kTop .. m0 + 7 are read: kernel Q). The ring is rotated by `rot`, the key offset of the
// convolution that reads it (column = (key + rot) & 63), so that its reads start at aligned columns.
// Keys at or past T are zero rows of K, so their S0 is 0 as well; a tile entirely in the rows' future
// is zero-filled without products.
template <int D, int S, int kTop, class R = Ring64, int kRows = kTop + kTile, class F>
__device__ __forceinline__ void s0_tile_to_window(float* win, bf16* sKt, const bf16* k, const F& qf, int tile, int m0,
                                                  int T, float scale, int rot, int lane) {
  static_assert(kTop == 8 || kTop == 16, "the window starts 8 or 16 rows above the query tile");
  static_assert(kRows == kTop + kTile || kRows == kTop + 8, "the window ends at row m0 + 15 or m0 + 7");
  const int g = lane >> 2, t = lane & 3, key0 = kTile * tile;
  if (key0 > m0 + kRows - kTop - 1) {  // every key after every row of the window: S0 = 0
    for (int i = lane; i < kRows * kTile; i += 32)
      win[(i / kTile) * R::kPitch + R::col(key0 + i % kTile + rot)] = 0.f;
    __syncwarp();
    return;
  }
  float acc0[2][4] = {}, acc1[2][4] = {};
  two_tile_products<D, S>(acc0, acc1, sKt, k, key0, T, qf, lane);
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // Two scalar stores: with an odd rotation the pair's columns are not 8-byte aligned.
      const int key = key0 + 8 * j + 2 * t, c0 = R::col(key + rot), c1 = R::col(key + 1 + rot);
      // Q tile 1: rows m0 + g + 8r, window rows kTop + g + 8r (those < kRows).
      if (kTop + 8 * r + 8 <= kRows) {
        const int row1 = m0 + g + 8 * r;
        float* w1 = win + (kTop + g + 8 * r) * R::kPitch;
        w1[c0] = key > row1 ? 0.f : acc1[j][2 * r] * scale;
        w1[c1] = key + 1 > row1 ? 0.f : acc1[j][2 * r + 1] * scale;
      }
      // Q tile 0: rows m0 - 16 + g + 8r, window rows kTop - 16 + g + 8r where that is >= 0.
      const int row0 = m0 - kTile + g + 8 * r, wr0 = kTop - kTile + g + 8 * r;
      if (wr0 >= 0) {
        float* w0 = win + wr0 * R::kPitch;
        w0[c0] = key > row0 ? 0.f : acc0[j][2 * r] * scale;
        w0[c1] = key + 1 > row0 ? 0.f : acc0[j][2 * r + 1] * scale;
      }
    }
  __syncwarp();  // the window is read by other lanes; the K tile is reloaded next time
}

// Chunks of 4 floats into v: from a window row at ring columns x0, x0 + 4, ... (x0 a multiple of 4, so a
// chunk never straddles the ring's end), or from contiguous floats (a tap row). The stencils' loads.
template <int kChunks, class R>
__device__ __forceinline__ void ring_chunks(const float* row, int x0, float (&v)[4 * kChunks]) {
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const float4 f = *reinterpret_cast<const float4*>(row + R::col(x0 + 4 * i));
    v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
  }
}
template <int kChunks>
__device__ __forceinline__ void flat_chunks(const float* p, float (&v)[4 * kChunks]) {
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const float4 f = *reinterpret_cast<const float4*>(p + 4 * i);
    v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
  }
}
// A warp zeroes n floats at p (n a multiple of 4, p 16-byte aligned).
__device__ __forceinline__ void warp_zero(float* p, int n, int lane) {
  for (int i = lane; i < n / 4; i += 32) reinterpret_cast<float4*>(p)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// The convolution at one output row (window row `wrow`) and the 8 output keys whose first input column
// is x0 (a multiple of 8: the window's ring is rotated by the convolution's key offset, see
// s0_tile_to_window), from a window (rows of kWinPitch, a ring of 64 keys) and the head's taps W [cq]
// [ck] in shared memory (rows of kTapPitch). kCq = 0: runtime sizes. The compiled sizes read the
// window and the taps as float4 (a 16-byte chunk never straddles the ring's end): 6 x 11 takes 8
// loads per tap row instead of 29 scalar ones (ncu, session 7: these loads were the kernels' largest
// stall).
// kN: outputs per lane (8; 4 for conv_half_live, x0 then a multiple of 4).
template <int kCq, int kCk, class R = Ring64, int kN = 8>
__device__ __forceinline__ void conv_row8(const float* win, const float* w, int cq, int ck, int wrow, int x0,
                                          float (&out)[kN]) {
#pragma unroll
  for (int e = 0; e < kN; ++e) out[e] = 0.f;
  if constexpr (kCq > 0) {
    constexpr int kValChunks = (kN + kCk - 1 + 3) / 4, kTapChunks = (kCk + 3) / 4;
    static_assert(4 * kTapChunks <= kTapPitch, "a tap row's chunks stay in its row");
#pragma unroll
    for (int a = 0; a < kCq; ++a) {
      const float* row = win + (wrow - (kCq - 1) + a) * R::kPitch;
      float vals[4 * kValChunks], taps[4 * kTapChunks];
      ring_chunks<kValChunks, R>(row, x0, vals);
      flat_chunks<kTapChunks>(w + a * kTapPitch, taps);
#pragma unroll
      for (int c = 0; c < kCk; ++c)
#pragma unroll
        for (int e = 0; e < kN; ++e) out[e] = fmaf(taps[c], vals[e + c], out[e]);
    }
  } else {
    for (int a = 0; a < cq; ++a) {
      const float* row = win + (wrow - (cq - 1) + a) * R::kPitch;
      for (int c = 0; c < ck; ++c) {
        const float wc = w[a * kTapPitch + c];
#pragma unroll
        for (int e = 0; e < kN; ++e) out[e] = fmaf(wc, row[R::col(x0 + e + c)], out[e]);
      }
    }
  }
}

// The transposed convolution (the adjoint of conv_row8's, for the backward): the 8 outputs of row
// `wrow` whose first input column is x0 (a multiple of 8; the ring rotated by ck - 1 - o) read rows
// wrow .. wrow + cq - 1 (below) with the taps flipped in both directions,
//   out[e] = sum_{a<cq, c<ck} W[cq - 1 - a, ck - 1 - c] win[wrow + a, x0 + e + c].
// With `zero` (a row of zeros), the window holds only rows 0 .. live_rows - 1 and every other row reads
// as zero (kernel Q's dC window, whose rows above and below the tile are zero).
template <int kCq, int kCk, class R = Ring64, int kN = 8>
__device__ __forceinline__ void conv_row8_t(const float* win, const float* w, int cq, int ck, int wrow, int x0,
                                            float (&out)[kN], const float* zero = nullptr, int live_rows = 0) {
  auto row_at = [&](int wr) {
    return zero != nullptr && (wr < 0 || wr >= live_rows) ? zero : win + wr * R::kPitch;
  };
#pragma unroll
  for (int e = 0; e < kN; ++e) out[e] = 0.f;
  if constexpr (kCq > 0) {
    constexpr int kValChunks = (kN + kCk - 1 + 3) / 4, kTapChunks = (kCk + 3) / 4;
#pragma unroll
    for (int a = 0; a < kCq; ++a) {
      const float* row = row_at(wrow + a);
      float vals[4 * kValChunks], taps[4 * kTapChunks];
      ring_chunks<kValChunks, R>(row, x0, vals);
      flat_chunks<kTapChunks>(w + (kCq - 1 - a) * kTapPitch, taps);
#pragma unroll
      for (int c = 0; c < kCk; ++c)
#pragma unroll
        for (int e = 0; e < kN; ++e) out[e] = fmaf(taps[kCk - 1 - c], vals[e + c], out[e]);
    }
  } else {
    for (int a = 0; a < cq; ++a) {
      const float* row = row_at(wrow + a);
      for (int c = 0; c < ck; ++c) {
        const float wc = w[(cq - 1 - a) * kTapPitch + ck - 1 - c];
#pragma unroll
        for (int e = 0; e < kN; ++e) out[e] = fmaf(wc, row[R::col(x0 + e + c)], out[e]);
      }
    }
  }
}

// A window part of which only the lanes of rows r < 8 are live (the second 16-row part of a 24-row
// window: lane (r, half) outputs row r, keys x0 + 8 half ..): row r's 8 outputs, computed by lanes r and
// r + 8 with 4 each (keys x0 + 8 half + 4 (r >> 3) ..), lane r taking lane r + 8's by shuffles; the lanes
// of rows r >= 8 return zeros, as the 8-output form leaves them. The outputs are bitwise the 8-output
// form's (same terms, same order), but a warp issues half its stencil instructions (ncu, session 12:
// half-live 8-output stencils were ~8% of kernel Q's instructions). kT: the transposed convolution.
// wrow0: the window row of row r = 0. Every lane of the warp must call it. zero, live_rows: conv_row8_t's
// (the transposed convolution only).
template <bool kT, int kCq, int kCk, class R = Ring64>
__device__ __forceinline__ void conv_half_live(const float* win, const float* w, int cq, int ck, int wrow0, int x0,
                                               int lane, float (&out)[8], const float* zero = nullptr,
                                               int live_rows = 0) {
  const int r = lane & 15, rl = r & 7, sub = r >> 3;
  float o4[4];
  if constexpr (kT)
    conv_row8_t<kCq, kCk, R, 4>(win, w, cq, ck, wrow0 + rl, x0 + 4 * sub, o4, zero, live_rows);
  else
    conv_row8<kCq, kCk, R, 4>(win, w, cq, ck, wrow0 + rl, x0 + 4 * sub, o4);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float up = __shfl_down_sync(0xffffffffu, o4[e], 8);  // lane r + 8's (same half)
    out[e] = sub == 0 ? o4[e] : 0.f;
    out[4 + e] = sub == 0 ? up : 0.f;
  }
}

// A CTA's place in the kq-layer kernels: blockIdx.x = (batch * units + unit of G coupled heads) * C +
// rank (launch_grouped), one warp per head. The warp's head h of its batch element (u: the group unit),
// that head's first row in [B * H * T], and the CTA's query tile m0 (blockIdx.y counts from the last
// tile, so that the heavy tiles start first).
struct KqPlace {
  GroupPlace gp;
  int u, h;     // h: padding warps read the group's last head (GroupPlace::head_of)
  size_t head;
  int m0;
  bool real;    // false: a padding warp, which writes nothing
};
__device__ __forceinline__ KqPlace kq_place(int H, int T, int G, int C, int warp) {
  KqPlace p;
  p.gp = group_place(G, C);
  const int units = H / G, unit = static_cast<int>(blockIdx.x) / C;
  p.u = unit % units;
  p.h = p.u * G + p.gp.head_of(warp);
  p.real = p.gp.real(warp);
  p.head = static_cast<size_t>((unit / units) * H + p.h) * T;
  p.m0 = ((T + kTile - 1) / kTile - 1 - static_cast<int>(blockIdx.y)) * kTile;
  return p;
}

// The shared memory of passes 2, delta, P and Q after the L warps' regions (at `base`): per head the
// pre and post taps (kHeadTaps floats each) and, with_dw, a convolution-gradient buffer (runtime
// sizes); the coefficient fragments; MixIn hi and lo; MixOut. The smem_*_bytes functions size it.
struct KqShared {
  float *wpre, *wpost, *dw;
  uint32_t* frag;
  bf16 *in_hi, *in_lo;
  float* out;
};
__device__ __forceinline__ KqShared kq_shared(unsigned char* base, int L, bool with_dw) {
  KqShared sh;
  sh.wpre = reinterpret_cast<float*>(base);
  sh.wpost = sh.wpre + L * kHeadTaps;
  sh.dw = with_dw ? sh.wpost + L * kHeadTaps : nullptr;
  sh.frag = reinterpret_cast<uint32_t*>(sh.wpost + (with_dw ? 2 : 1) * L * kHeadTaps);
  sh.in_hi = reinterpret_cast<bf16*>(sh.frag + kFragWords);
  sh.in_lo = sh.in_hi + kInElems;
  sh.out = reinterpret_cast<float*>(sh.in_lo + kInElems);
  return sh;
}

// This warp's pre and post taps into its rows of `sh` (its dW rows zeroed, if any) and, with mixing,
// the CTA's coefficient fragments and zeroed MixIn buffers; the caller synchronizes before their use.
__device__ __forceinline__ void load_taps_and_mix(const KqShared& sh, const KqPlace& p, const float* wpre, int cq1,
                                                  int ck1, const float* wpost, int cq2, int ck2, const float* mpre,
                                                  int gpre, const float* mpost, int gpost, int G, int warp,
                                                  int lane, int reps = 1) {
  load_taps(sh.wpre + warp * kHeadTaps, wpre, p.h, cq1, ck1, lane);
  load_taps(sh.wpost + warp * kHeadTaps, wpost, p.h, cq2, ck2, lane);
  if (sh.dw)
    for (int i = lane; i < kHeadTaps; i += 32) sh.dw[warp * kHeadTaps + i] = 0.f;
  if (gpre || gpost) {
    build_frags(sh.frag, mpre, gpre, mpost, gpost, p.u * G, G, reps);
    zero_in(sh.in_hi), zero_in(sh.in_lo);
  }
}

// The mixing exchange of the kq-layer kernels follows group_cluster.cuh's protocol (group_start,
// mix_done, group_finish; mbarriers `free` and `full`), with each lane storing its own 8 values into the
// peers' MixIn (one 16-byte st.async per buffer and peer) instead of group_sync's copy of the CTA's slots.
//
// Mixes the group's 16 x 16 tiles in place of `c` (this lane's row r, keys 8 half .. + 7): C (or A2) into
// MixIn as hi + lo (and into the peers' MixIn), a barrier, the product with the coefficients of `kind` for
// this CTA's heads, a barrier, the mixed values back. Every warp of every CTA of the cluster must call it.
// kRelease false: the caller still reads MixIn (the mix's input, for a mixing-weight gradient) and calls
// mix_done before the next mix.
// A lane's 8 values as bf16 hi and their rounding remainders lo (MixIn's operands), 16 bytes each.
__device__ __forceinline__ void split_hi_lo(const float (&c)[8], uint4& vhi, uint4& vlo) {
  uint32_t hi[4], lo[4];
#pragma unroll
  for (int e = 0; e < 8; e += 2) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(c[e], c[e + 1]);
    const __nv_bfloat162 l = __floats2bfloat162_rn(c[e] - __low2float(h), c[e + 1] - __high2float(h));
    hi[e / 2] = *reinterpret_cast<const uint32_t*>(&h);
    lo[e / 2] = *reinterpret_cast<const uint32_t*>(&l);
  }
  vhi = make_uint4(hi[0], hi[1], hi[2], hi[3]), vlo = make_uint4(lo[0], lo[1], lo[2], lo[3]);
}

// This lane's 8 mixed values (its row r, keys 8 half ..) from MixOut slot `slot`.
__device__ __forceinline__ void read_mixed(float (&c)[8], const float* sOut, int slot, int lane) {
  const int r = lane & 15, half = lane >> 4;
#pragma unroll
  for (int e = 0; e < 8; e += 2) {
    const float2 x = get_pair(sOut, slot, r, 8 * half + e);
    c[e] = x.x, c[e + 1] = x.y;
  }
}

template <bool kRelease = true>
__device__ __forceinline__ void mix_in_place(float (&c)[8], bf16* sInHi, bf16* sInLo, const uint32_t* sFrag, int kind,
                                             float* sOut, const GroupPlace& gp, int warp, int lane) {
  const int r = lane & 15, half = lane >> 4;
  const int off = in_offset(gp.h0 + warp, r, 8 * half);  // 16-byte aligned (kYS, kPS and 8 half)
  uint4 vhi, vlo;
  split_hi_lo(c, vhi, vlo);
  const bool real = gp.real(warp);  // a padding warp's slot stays zero
  if (gp.C > 1) {
    // Every warp stores (a padding warp zeros), so each peer expects L warps' 1 KB from each CTA.
    const uint32_t m = real ? 0xffffffffu : 0u;
    const uint32_t ahi = smem_addr(sInHi + off), alo = smem_addr(sInLo + off);
    wait_free(gp);  // every peer has finished reading its MixIn
    for (int peer = 0; peer < gp.C; ++peer) {
      if (peer == gp.rank) continue;
      store_to_peer(ahi, peer, vhi.x & m, vhi.y & m, vhi.z & m, vhi.w & m);
      store_to_peer(alo, peer, vlo.x & m, vlo.y & m, vlo.z & m, vlo.w & m);
    }
  }
  if (real) {
    *reinterpret_cast<uint4*>(sInHi + off) = vhi;
    *reinterpret_cast<uint4*>(sInLo + off) = vlo;
  }
  __syncthreads();
  if (gp.C > 1) wait_full(gp, static_cast<uint32_t>((gp.C - 1) * gp.L) * 32u * 2u * 16u);
  mix_tiles_owned<true>(sInHi, sInLo, sFrag, kind, sOut, gp.h0, gp.L, gp.L, warp, lane);
  if (kRelease)
    mix_done(gp);  // every head's mixed tile in MixOut; `free`: done reading MixIn
  else
    __syncthreads();  // every head's mixed tile in MixOut
  read_mixed(c, sOut, warp, lane);
}

// Two 16 x 16 tiles per head mixed in one product (session 12; a group in one CTA, G <= 8): c0 into
// MixIn slot x, c1 into slot x + G, the coefficients block-diagonal (load_taps_and_mix with reps = 2), so
// each comes back mixed on its own, as two calls of mix_in_place would give, with one pair of barriers
// instead of two. A single-tile mix_in_place stays right with those coefficients: its outputs (slots
// < G) take nothing from the slots >= G, which hold finite values (zero, or an earlier mix's input).
__device__ __forceinline__ void mix_in_place2(float (&c0)[8], float (&c1)[8], bf16* sInHi, bf16* sInLo,
                                              const uint32_t* sFrag, int kind, float* sOut, const GroupPlace& gp,
                                              int warp, int lane) {
  const int r = lane & 15, half = lane >> 4;
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    const int off = in_offset(warp + part * gp.G, r, 8 * half);
    uint4 vhi, vlo;
    split_hi_lo(part == 0 ? c0 : c1, vhi, vlo);
    *reinterpret_cast<uint4*>(sInHi + off) = vhi;
    *reinterpret_cast<uint4*>(sInLo + off) = vlo;
  }
  __syncthreads();
  mix_tiles_owned<true>(sInHi, sInLo, sFrag, kind, sOut, 0, 2 * gp.G, gp.L, warp, lane);
  __syncthreads();  // every slot's mixed tile in MixOut; every warp is done reading MixIn
#pragma unroll
  for (int e = 0; e < 8; e += 2) {
    const float2 x0 = get_pair(sOut, warp, r, 8 * half + e), x1 = get_pair(sOut, warp + gp.G, r, 8 * half + e);
    c0[e] = x0.x, c0[e + 1] = x0.y, c1[e] = x1.x, c1[e + 1] = x1.y;
  }
}

// The same two tiles per head on a cluster (session 16), where MixIn has no free slots: c1 goes into a
// second MixIn pair (hi1, lo1), both travel in one exchange (one `full` wait instead of two), and the two
// products run one after the other through the one MixOut tile (its results read back between them).
__device__ __forceinline__ void mix_in_place2_cl(float (&c0)[8], float (&c1)[8], bf16* hi0, bf16* lo0, bf16* hi1,
                                                 bf16* lo1, const uint32_t* sFrag, int kind, float* sOut,
                                                 const GroupPlace& gp, int warp, int lane) {
  const int r = lane & 15, half = lane >> 4;
  const int off = in_offset(gp.h0 + warp, r, 8 * half);
  uint4 vh0, vl0, vh1, vl1;
  split_hi_lo(c0, vh0, vl0);
  split_hi_lo(c1, vh1, vl1);
  const bool real = gp.real(warp);  // a padding warp's slots stay zero (it sends zeros)
  const uint32_t m = real ? 0xffffffffu : 0u;
  wait_free(gp);  // every peer has finished reading both its MixIn pairs
  for (int peer = 0; peer < gp.C; ++peer) {
    if (peer == gp.rank) continue;
    store_to_peer(smem_addr(hi0 + off), peer, vh0.x & m, vh0.y & m, vh0.z & m, vh0.w & m);
    store_to_peer(smem_addr(lo0 + off), peer, vl0.x & m, vl0.y & m, vl0.z & m, vl0.w & m);
    store_to_peer(smem_addr(hi1 + off), peer, vh1.x & m, vh1.y & m, vh1.z & m, vh1.w & m);
    store_to_peer(smem_addr(lo1 + off), peer, vl1.x & m, vl1.y & m, vl1.z & m, vl1.w & m);
  }
  if (real) {
    *reinterpret_cast<uint4*>(hi0 + off) = vh0, *reinterpret_cast<uint4*>(lo0 + off) = vl0;
    *reinterpret_cast<uint4*>(hi1 + off) = vh1, *reinterpret_cast<uint4*>(lo1 + off) = vl1;
  }
  __syncthreads();
  wait_full(gp, static_cast<uint32_t>((gp.C - 1) * gp.L) * 32u * 4u * 16u);
  mix_tiles_owned<true>(hi0, lo0, sFrag, kind, sOut, gp.h0, gp.L, gp.L, warp, lane);
  __syncthreads();  // every head's first mixed tile in MixOut
  read_mixed(c0, sOut, warp, lane);
  __syncthreads();  // every warp has read it before the second product rewrites MixOut
  mix_tiles_owned<true>(hi1, lo1, sFrag, kind, sOut, gp.h0, gp.L, gp.L, warp, lane);
  mix_done(gp);  // the second in MixOut; `free`: both pairs read
  read_mixed(c1, sOut, warp, lane);
}

// The windows of pass 2 and kernel P (the pass-2 comment in flash_kq_layer_fwd.cu).
constexpr int kS0Top = 16;  // pass 2's S0 window: rows m0 - 16 .. m0 + 15
constexpr int kATop = 8;    // its A window: rows m0 - 8 .. m0 + 15
static_assert(kATop == 8, "A's second 16-row part has 8 live rows (conv_half_live)");
// lse * log2(e) of A's window rows m0 - 8 + 16 part + r (part 0, 1; 0 outside the sequence), as
// a_tile_to_window takes them.
__device__ __forceinline__ void a_rows_lse2(const float* lse, int m0, int T, int r, float (&lse2)[2]) {
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    const int row = m0 - kATop + 16 * part + r;
    lse2[part] = row >= 0 && row < T ? lse[row] * kLog2e : 0.f;
  }
}
constexpr int kS0Floats = (kS0Top + kTile) * kWinPitch;
constexpr int kAFloats = (kATop + kTile) * kWinPitch;

// Pass 2's step 2 (flash_kq_layer_fwd.cu), also kernel P's, for key tile `tile`. lse2[part]: lse * log2(e)
// of row m0 - 8 + 16 part + (lane & 15). The S0 window's ring is rotated by the pre convolution's key
// offset, the A window's by the post convolution's (a_rot), each for the convolution that reads it.
// kTwo: both parts' convolutions first, then their mixes in one exchange: in one CTA one mixing product
// for both (mix_in_place2: 4 barriers per key block instead of 6); on a cluster (sInHi1, sInLo1: the
// second MixIn pair) one exchange for both products (mix_in_place2_cl; session 16). Kernel P, which has
// no shared memory for the second pair, takes them one by one (kTwo false).
// R: the rings of both windows (pass 2's Ring64, kernel P's Ring48).
template <int kCq, int kCk, bool kTwo, class R = Ring64>
__device__ __forceinline__ void a_tile_to_window(float* awin, const float* s0win, const float* w, int cq, int ck,
                                                 int a_rot, int gpre, bf16* sInHi, bf16* sInLo,
                                                 const uint32_t* sFrag, float* sOut, const GroupPlace& gp, int warp,
                                                 int lane, int tile, int m0, int T, const float (&lse2)[2],
                                                 bf16* sInHi1 = nullptr, bf16* sInLo1 = nullptr) {
  const int r = lane & 15, half = lane >> 4, key0 = kTile * tile;
  if constexpr (kTwo) {
    float c[2][8] = {};
    if (key0 <= m0 + kTile - 1) {  // not all future (the same for every lane)
      conv_row8<kCq, kCk, R>(s0win, w, cq, ck, r + (kS0Top - kATop), key0 + 8 * half, c[0]);
      if constexpr (kCq > 0)  // part 1: rows 16 .. 23 only
        conv_half_live<false, kCq, kCk, R>(s0win, w, cq, ck, kTile + (kS0Top - kATop), key0 + 8 * half, lane, c[1]);
      else if (kTile + r < kATop + kTile)
        conv_row8<kCq, kCk, R>(s0win, w, cq, ck, kTile + r + (kS0Top - kATop), key0 + 8 * half, c[1]);
    }
    if (gpre && gp.C > 1)
      mix_in_place2_cl(c[0], c[1], sInHi, sInLo, sInHi1, sInLo1, sFrag, kPre, sOut, gp, warp, lane);
    else if (gpre)
      mix_in_place2(c[0], c[1], sInHi, sInLo, sFrag, kPre, sOut, gp, warp, lane);
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const int rr = 16 * part + r, row = m0 - kATop + rr;
      if (rr < kATop + kTile) {
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          const int key = key0 + 8 * half + e;
          const bool ok = row >= 0 && row < T;
          const float a0 = ok && key <= row ? exp2f(fmaf(c[part][e], kLog2e, -lse2[part])) : 0.f;
          const float a1 = ok && key + 1 <= row ? exp2f(fmaf(c[part][e + 1], kLog2e, -lse2[part])) : 0.f;
          awin[rr * R::kPitch + R::col(key + a_rot)] = a0;
          awin[rr * R::kPitch + R::col(key + 1 + a_rot)] = a1;
        }
      }
    }
  } else {
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const int rr = 16 * part + r, row = m0 - kATop + rr;  // A window row rr
      const bool live = rr < kATop + kTile && key0 <= m0 + kTile - 1;  // in the window, not all future
      float c[8] = {};
      if (part == 1 && kCq > 0) {  // rows 16 .. 23 only (warp-uniform)
        if (key0 <= m0 + kTile - 1)
          conv_half_live<false, kCq, kCk, R>(s0win, w, cq, ck, kTile + (kS0Top - kATop), key0 + 8 * half, lane, c);
      } else if (live) {
        conv_row8<kCq, kCk, R>(s0win, w, cq, ck, rr + (kS0Top - kATop), key0 + 8 * half, c);
      }
      if (gpre) mix_in_place(c, sInHi, sInLo, sFrag, kPre, sOut, gp, warp, lane);
      if (rr < kATop + kTile) {
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          const int key = key0 + 8 * half + e;
          const bool ok = row >= 0 && row < T;
          const float a0 = ok && key <= row ? exp2f(fmaf(c[e], kLog2e, -lse2[part])) : 0.f;
          const float a1 = ok && key + 1 <= row ? exp2f(fmaf(c[e + 1], kLog2e, -lse2[part])) : 0.f;
          awin[rr * R::kPitch + R::col(key + a_rot)] = a0;  // scalar: an odd rotation misaligns pairs
          awin[rr * R::kPitch + R::col(key + 1 + a_rot)] = a1;
        }
      }
    }
  }
  __syncwarp();
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace mta::cuda::kq_layer
