// FlashMTA forward for the pre-softmax key-query convolution (see flash_mta.h and docs/flash-mta.md).
//
// The kernel is FlashAttention-2's forward with one detour. A CTA owns kBlockM query rows and walks
// the key tiles up to the diagonal. For each key tile it
//   1. computes the logits on an EXTENDED tile, 16 halo rows above the query tile (the convolution
//      reads up to cq - 1 <= 7 earlier queries) and 16 halo columns around the key tile (it reads keys
//      j - o .. j - o + ck - 1, ck <= 15), applies the first causal mask (future -> 0) and stores the
//      tile as fp16 in shared memory (sS);
//   2. convolves on the tensor cores: for each query shift a, the output block of 8 keys at n is
//      (rows of sS shifted by a, columns n .. n + 31) x (a 32 x 8 banded matrix holding W[a, k - n]).
//      The banded matrices do not depend on the tile, so each thread keeps its B fragments in registers
//      for the whole kernel. The result lands in the mma C-fragment layout, exactly where
//      FlashAttention's softmax expects its logits;
//   3. continues as FlashAttention: second causal mask (-inf), online softmax, P V.
// The extended tile costs (kBlockM + 16) x (kBlockN + 16) logits for kBlockM x kBlockN outputs (1.56x
// at 64 x 64); the convolution adds cq x 2 mma per 16 x 8 outputs.
#include "attention/flash_mta.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/flash_common.cuh"
#include "attention/mma_sm80.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;  // NOLINT: the kernel is written in terms of these primitives

constexpr int kMaxCq = 8;   // query taps: halo rows cq - 1 <= 7 < 16
constexpr int kMaxCk = 15;  // key taps: halo columns ck - 1 <= 14 <= 16; band rows n + c <= 21 < 32
constexpr int kBandWords = kMaxCq * 2 * 2 * 32;  // banded-operand fragments, see build_band

void fm_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flash_mta: " + what);
}

template <int kHeadDim, int kBlockM_, int kBlockN_, int kWarps_>
struct KqFwdTraits {
  static constexpr int D = kHeadDim;
  static constexpr int kBlockM = kBlockM_;  // output query rows per CTA (16 per warp)
  static constexpr int kBlockN = kBlockN_;  // output keys per iteration
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kHalo = 16;                  // extra rows above / columns around (one mma block)
  static constexpr int kRowsE = kBlockM + kHalo;    // rows of the extended tile
  static constexpr int kColsE = kBlockN + kHalo;    // columns of the extended tile
  static constexpr int kStride = D + 8;             // bf16 row stride of sQ, sK, sV (odd x 16 bytes)
  static constexpr int kStrideS = kBlockN + 24;     // fp16 row stride of sS: the convolution reads
                                                    // columns up to kBlockN + 23 (odd x 16 bytes)
  static_assert(kBlockM == 16 * kWarps, "one warp per 16 output rows");
  static_assert(kBlockN % 16 == 0 && D % 16 == 0, "tile sizes must be multiples of 16");
  static_assert((kStride * 2 / 16) % 2 == 1 && (kStrideS * 2 / 16) % 2 == 1, "conflict-free ldmatrix rows");
  // sQ [kRowsE][kStride]; sK [2][kColsE][kStride]; sV [2][kBlockN][kStride]; sS [kRowsE][kStrideS] fp16;
  // then the band fragments (kBandWords u32).
  static constexpr size_t kSmemBytes =
      (static_cast<size_t>(kRowsE + 2 * kColsE + 2 * kBlockN) * kStride + static_cast<size_t>(kRowsE) * kStrideS) * 2 +
      kBandWords * 4;
};

// D = 64: 64 query rows and 4 warps per CTA, ~71 KB, 3 CTAs (12 warps) per SM. D = 128: 128 rows and
// 8 warps, ~146 KB, one CTA of 8 warps per SM, where 64 rows (~118 KB) left one CTA of 4 warps (measured,
// session 11: 1.95 -> 1.29 ms at B = 2, H = 16, T = 4096; 128 rows at D = 64 fit only one CTA of 8 warps
// by registers, and were 23% slower).
using KqFwd64 = KqFwdTraits<64, 64, 64, 4>;
using KqFwd128 = KqFwdTraits<128, 128, 64, 8>;

// Copies global rows first_row .. first_row + kRows - 1 of one head ([T][kD] bf16 at head_base) into
// shared memory (row stride `stride`); rows outside [0, T) are zero-filled. T >= 1, so head_base is a
// valid dummy source for the zero fills.
// kPlain: rows wholly inside [0, T) are copied with the plain cp.async form (the forward: -2%, session
// 21; the backward lost 1.4% with it, so it keeps one form).
template <int kRows, int kD, int kThreads, bool kPlain = false>
__device__ __forceinline__ void load_rows_async(bf16* smem, int stride, const bf16* head_base, int first_row, int T,
                                                int tid) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  if (kPlain && first_row >= 0 && first_row + kRows <= T) {
#pragma unroll
    for (int c = tid; c < kChunks; c += kThreads) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      cp_async_16(smem + r * stride + col, head_base + static_cast<size_t>(first_row + r) * kD + col);
    }
    return;
  }
#pragma unroll
  for (int c = tid; c < kChunks; c += kThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, gr = first_row + r;
    const bool ok = gr >= 0 && gr < T;
    const bf16* src = ok ? head_base + static_cast<size_t>(gr) * kD + col : head_base;
    cp_async_16(smem + r * stride + col, src, ok ? 16 : 0);
  }
}

// Calls f(std::integral_constant<int, 2>{}, u) for this warp's units in pairs (u, u + stride), u = first,
// first + 2 stride, ... < n, then f(std::integral_constant<int, 1>{}, u) for an odd one out: two
// independent accumulator chains per warp where one would stall on each MMA (ncu, session 7).
template <class F>
__device__ __forceinline__ void for_unit_pairs(int first, int stride, int n, F&& f) {
  int u = first;
#pragma unroll 1
  for (; u + stride < n; u += 2 * stride) f(std::integral_constant<int, 2>{}, u);
  if (u < n) f(std::integral_constant<int, 1>{}, u);
}

// Rows first_row .. first_row + n - 1 of lse and delta into shared memory (raw lse; zeros past T),
// by cp.async so that the next query tile's copies overlap the current one's work.
template <int kThreads>
__device__ __forceinline__ void load_row_stats_async(float* sLse, float* sDelta, const float* lse,
                                                     const float* delta, int first_row, int n, int T, int tid) {
  for (int i = tid; i < n; i += kThreads) {
    const int row = first_row + i;
    const bool ok = row < T;
    cp_async_4(sLse + i, ok ? lse + row : lse, ok ? 4 : 0);
    cp_async_4(sDelta + i, ok ? delta + row : delta, ok ? 4 : 0);
  }
}

// fp16's largest finite number: operands beyond it would become infinities (AttnOptions::fp16_overflow).
constexpr float kFp16Max = 65504.f;

// Fragments of the banded B operands, one u32 (two fp16 or bf16) per (a, k-step, half, lane), at
// sBand[((a * 2 + ks) * 2 + half) * 32 + lane]: rows kk = 16 ks + 2t + 8 half (+1), column n = g of
//   forward:    Band_a[kk][n] = W[a, kk - n]        (C from S0, the convolution)
//   transposed: Band_a[kk][n] = W[a, 16 + n - kk]   (dS0 from dC, its adjoint)
// and zero where the tap index is outside [0, ck) or a >= cq.

// Returns whether a weight this thread converted lies beyond fp16's range (kFp16 only).
template <bool kTransposed, bool kFp16>
__device__ __forceinline__ bool build_band(uint32_t* sBand, const float* W, int cq, int ck, int tid, int nthreads) {
  bool beyond = false;
  for (int idx = tid; idx < kBandWords; idx += nthreads) {
    const int lane = idx & 31, half = (idx >> 5) & 1, ks = (idx >> 6) & 1, a = idx >> 7;
    const int g = lane >> 2, t = lane & 3;
    float w2[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int kk = 16 * ks + 2 * t + 8 * half + e;
      const int c = kTransposed ? 16 + g - kk : kk - g;
      w2[e] = (a < cq && c >= 0 && c < ck) ? W[a * ck + c] : 0.f;
      beyond |= kFp16 && fabsf(w2[e]) > kFp16Max;
    }
    sBand[idx] = kFp16 ? pack_f16(w2[0], w2[1]) : pack_bf16(w2[0], w2[1]);
  }
  return beyond;
}

// S0 on the extended tile: rows m0 - 16 + lr (lr < kRowsE) of sQ against keys n0 - o + lc (lc < kColsE)
// of sK, scaled, future (key > query) set to 0, in 16 x 16 units spread over the warps. Rows and keys
// outside the sequence were loaded as zeros, so only the causal mask is needed. Written as fp16 to sS
// (the convolution's operand) and, when sSb is given, as bf16 to sSb (the weight gradient's operand).
// Returns whether a value this thread wrote lies beyond fp16's range.
// Units the previous tile already computed are not computed again (session 20; the values are the same
// function of the global row and key, so the results are bitwise unchanged):
//  * rb0 = 1: row block 0 is left to the caller (the backward walks query tiles down a key tile, and a
//    tile's 16 halo rows are the previous tile's last 16 rows);
//  * carry_col: unit column 0 is the previous key tile's last unit column (the forward walks key tiles
//    along a query tile, and a tile's first 16 halo keys are the previous tile's last 16), copied in
//    sS by the warp that then overwrites that column.
template <class Tr, bool kUnmaskedBelow = false>
__device__ __forceinline__ bool s0_extended(const bf16* sQ, const bf16* sK, __half* sS, bf16* sSb, int m0, int n0,
                                            int key_off, float scale, int warp, int lane, int rb0 = 0,
                                            bool carry_col = false) {
  constexpr int D = Tr::D, S = Tr::kStride, SS = Tr::kStrideS;
  constexpr int kUnitRows = Tr::kRowsE / 16, kUnitCols = Tr::kColsE / 16;
  static_assert(Tr::kColsE - Tr::kBlockN == 16, "the carried unit column is the whole key halo");
  // Warps that take a whole row of units first (with more warps than rows, the others wait: the
  // backward's 8 warps at D = 128 over 5 rows of units).
  const int rows = kUnitRows - rb0, whole = rows < Tr::kWarps ? rows : Tr::kWarps;
  const int cb0 = carry_col ? 1 : 0, ncols = kUnitCols - cb0;
  const int g = lane >> 2, t = lane & 3;
  // The previous key tile's last unit column of row block rb into column 0: one 16-byte chunk per lane.
  auto carry = [&](int rb) {
    __half* row = sS + (rb * 16 + (lane >> 1)) * SS + (lane & 1) * 8;
    *reinterpret_cast<uint4*>(row) = *reinterpret_cast<const uint4*>(row + (kUnitCols - 1) * 16);
    __syncwarp();  // every lane's read before the warp overwrites the last column
  };
  // The largest |S0| this thread wrote, for the fp16 range check at the end (one max per value where a
  // compare and an or per value were: the forward issues ~58% of its cycles, ALU 40% busy; ncu, session 20).
  float amax = 0.f;
  auto store_unit = [&](int rb, int cb, const float (&acc)[2][4], auto masked_tag) {
#pragma unroll
    for (int nn = 0; nn < 2; ++nn)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int lr = rb * 16 + g + 8 * r, lc = cb * 16 + nn * 8 + 2 * t;
        float s0, s1;
        if constexpr (decltype(masked_tag)::value) {
          const int ii = m0 - Tr::kHalo + lr, jj = n0 - key_off + lc;
          s0 = jj > ii ? 0.f : acc[nn][2 * r] * scale;
          s1 = jj + 1 > ii ? 0.f : acc[nn][2 * r + 1] * scale;
        } else {
          s0 = acc[nn][2 * r] * scale, s1 = acc[nn][2 * r + 1] * scale;
        }
        *reinterpret_cast<uint32_t*>(sS + lr * SS + lc) = pack_f16(s0, s1);
        if (sSb) *reinterpret_cast<uint32_t*>(sSb + lr * SS + lc) = pack_bf16(s0, s1);
        amax = fmaxf(amax, fmaxf(fabsf(s0), fabsf(s1)));
      }
  };
  // A unit whose last key is at or before its first row has no future to mask: most of them, away from
  // the diagonal (a warp-uniform branch, so the compares are skipped, not predicated off). Forward only:
  // the backward (2 warps per scheduler, a third of its issue slots busy) measured 1-2% slower with it.
  auto store = [&](int rb, int cb, const float (&acc)[2][4]) {
    if (kUnmaskedBelow && n0 - key_off + cb * 16 + 15 <= m0 - Tr::kHalo + rb * 16)
      store_unit(rb, cb, acc, std::false_type{});
    else
      store_unit(rb, cb, acc, std::true_type{});
  };
  // Row block rb0 + warp whole, its Q fragments loaded once for the row's units (shared-memory
  // traffic: the products here are bound by it); then the remaining rows' units spread over the warps.
  if (warp < whole) {
    const int rb = rb0 + warp;
    if (carry_col) carry(rb);
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], sQ + a_offset(lane, rb * 16, kk * 16, S));
    // Two units at a time: four independent accumulator chains instead of two (ncu, session 7: the
    // kernels' largest stall was waiting on the previous MMA of the same chain).
    auto units = [&](auto nu_tag, int cb_first) {
      constexpr int NU = decltype(nu_tag)::value;
      float acc[NU][2][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int i = 0; i < NU; ++i) {
          uint32_t b[4];
          ldmatrix_x4(b, sK + bnk_offset(lane, (cb_first + i) * 16, kk * 16, S));
          mma_bf16(acc[i][0], qf[kk], b[0], b[1]);
          mma_bf16(acc[i][1], qf[kk], b[2], b[3]);
        }
#pragma unroll
      for (int i = 0; i < NU; ++i) store(rb, cb_first + i, acc[i]);
    };
    for_unit_pairs(cb0, 1, kUnitCols, units);
  }
  for (int u = warp; u < (rows - whole) * ncols; u += Tr::kWarps) {
    const int rb = rb0 + whole + u / ncols, cb = cb0 + u % ncols;
    if (carry_col && cb == kUnitCols - 1) carry(rb);
    float acc[2][4];
    warp_gemm_abt<16, D, S>(acc, sQ + rb * 16 * S, sK + cb * 16 * S, lane);
    store(rb, cb, acc);
  }
  return amax > kFp16Max;
}

// The banded products of the convolutions, for 16 output rows and kNB blocks of 8 columns from block nb0,
// in mma accumulator layout: acc = sum over a < cq of (the 16 rows of `in` from row0 + step a, 32 columns
// from 8 (nb0 + m)) x band a (two k-steps of B fragments per lane, band[((a * 2 + ks) * 2 + half) * 32 +
// lane]). kF16: fp16 operands (S0, for the forward's C), else bf16 (dC, for dS0).
// k-step 1's band rows 24 .. 31 are zero in both bands (build_band: tap index >= 17 in the forward, < 0
// in the transposed one, as ck <= 15), so it runs as a k8 product (session 13). Block m then reads the
// 8-column halves m, m + 1 (k-step 0) and m + 2 (k-step 1) of the tap's rows: a half is two registers
// (a0, a1 of an A fragment), so one ldmatrix.x4 at an even half loads two of them, and the kNB + 2 halves
// take (kNB + 2) / 2 loads per tap (session 20; before, an x4 per 16 columns at every half: kNB + 2,
// each half loaded twice: the kernels are bound by shared-memory traffic). Each block's sum runs in the
// order a, then k-step, as before: the results are bitwise unchanged.
template <int kNB, bool kF16, int kStride>
__device__ __forceinline__ void banded_rows(const bf16* in, int row0, int step, int nb0, const uint32_t* band,
                                            int cq, int lane, float (&acc)[kNB][4]) {
  constexpr int kHalves = kNB + 2;
#pragma unroll
  for (int j = 0; j < kNB; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int a = 0; a < cq; ++a) {
    const int r = row0 + step * a;
    uint32_t b[2][2];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks)
#pragma unroll
      for (int half = 0; half < 2 - ks; ++half) b[ks][half] = band[((a * 2 + ks) * 2 + half) * 32 + lane];
    uint32_t h[kHalves][2];
    // Halves 2p and 2p + 1, then the blocks they complete (2p - 2 and 2p - 1), so that few are live.
#pragma unroll
    for (int p = 0; 2 * p < kHalves; ++p) {
      const bf16* src = in + a_offset(lane, r, (nb0 + 2 * p) * 8, kStride);
      if (2 * p + 1 < kHalves) {
        uint32_t x[4];
        ldmatrix_x4(x, src);
        h[2 * p][0] = x[0], h[2 * p][1] = x[1], h[2 * p + 1][0] = x[2], h[2 * p + 1][1] = x[3];
      } else {
        ldmatrix_x2(h[2 * p], src);
      }
#pragma unroll
      for (int m = 2 * p - 2; m < 2 * p; ++m) {
        if (m < 0 || m >= kNB) continue;
        const uint32_t af[4] = {h[m][0], h[m][1], h[m + 1][0], h[m + 1][1]};
        if constexpr (kF16) {
          mma_f16(acc[m], af, b[0][0], b[0][1]);
          mma_f16_k8(acc[m], h[m + 2][0], h[m + 2][1], b[1][0]);
        } else {
          mma_bf16(acc[m], af, b[0][0], b[0][1]);
          mma_bf16_k8(acc[m], h[m + 2][0], h[m + 2][1], b[1][0]);
        }
      }
    }
  }
}

// C for 16 output rows (local rows 16 rg ..) and kNB blocks of 8 keys from block nj0 (the tile's kBlockN
// keys by default): sum over a < cq of (sS rows shifted by a) x Band_a.
template <class Tr, int kNB = Tr::kBlockN / 8>
__device__ __forceinline__ void conv_tile(const __half* sS, const uint32_t* sBand, int cq, int rg, int nj0, int lane,
                                          float (&acc)[kNB][4]) {
  banded_rows<kNB, true, Tr::kStrideS>(reinterpret_cast<const bf16*>(sS), Tr::kHalo + rg * 16 - (cq - 1), 1, nj0,
                                       sBand, cq, lane, acc);
}

// Grid (B*H, ceil(T / kBlockM)), heavy (late) query tiles first. W: [H][cq][ck] fp32.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads)
    flash_mta_kq_fwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                            const float* __restrict__ W, bf16* __restrict__ o, float* __restrict__ lse, int T, int H,
                            int cq, int ck, int key_off, float scale, float p_drop, unsigned long long drop_seed,
                            unsigned int* __restrict__ fp16_overflow) {
  constexpr int D = Tr::D, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStride, SS = Tr::kStrideS;
  constexpr int kThreads = Tr::kThreads, kHalo = Tr::kHalo;
  constexpr int kRowsE = Tr::kRowsE, kColsE = Tr::kColsE;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // query rows m0 - 16 .. m0 + BM - 1
  bf16* sK = sQ + kRowsE * S;                     // [2][kColsE][S]: keys n0 - o .. n0 - o + kColsE - 1
  bf16* sV = sK + 2 * kColsE * S;                 // [2][BN][S]: keys n0 .. n0 + BN - 1
  __half* sS = reinterpret_cast<__half*>(sV + 2 * BN * S);  // [kRowsE][SS]: S0 on the extended tile
  uint32_t* sBand = reinterpret_cast<uint32_t*>(sS + kRowsE * SS);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int h = blockIdx.x % H;
  const size_t head = static_cast<size_t>(blockIdx.x) * T;
  q += head * D, k += head * D, v += head * D, o += head * D, lse += head;
  W += static_cast<size_t>(h) * cq * ck;

  const int kv_end = min(T, m0 + BM);  // output keys 0 .. kv_end - 1
  const int n_blocks = (kv_end + BN - 1) / BN;

  load_rows_async<kRowsE, D, kThreads, true>(sQ, S, q, m0 - kHalo, T, tid);
  load_rows_async<kColsE, D, kThreads, true>(sK, S, k, -key_off, T, tid);
  load_rows_async<BN, D, kThreads, true>(sV, S, v, 0, T, tid);
  cp_async_commit();

  // Columns kColsE .. SS - 1 of sS are read by the convolution with zero weights only; they must
  // hold finite values (0 * NaN = NaN), so they are zeroed once.
  for (int i = tid; i < kRowsE * (SS - kColsE); i += kThreads)
    sS[(i / (SS - kColsE)) * SS + kColsE + i % (SS - kColsE)] = __float2half(0.f);

  bool beyond = build_band</*kTransposed=*/false, /*kFp16=*/true>(sBand, W, cq, ck, tid, kThreads);

  float acc_o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc_o[j][0] = acc_o[j][1] = acc_o[j][2] = acc_o[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain
  float row_sum[2] = {0.f, 0.f};
  const int row_w = m0 + warp * 16;  // first output row of this warp

  for (int nb = 0; nb < n_blocks; ++nb) {
    // Tile nb has landed, and every warp is done with iteration nb - 1 (its sS reads, its buffers).
    cp_async_wait_all();
    __syncthreads();
    const int n0 = nb * BN;
    if (nb + 1 < n_blocks) {
      const int n1 = n0 + BN, buf1 = (nb + 1) & 1;
      load_rows_async<kColsE, D, kThreads, true>(sK + buf1 * kColsE * S, S, k, n1 - key_off, T, tid);
      load_rows_async<BN, D, kThreads, true>(sV + buf1 * BN * S, S, v, n1, T, tid);
      cp_async_commit();
    }
    const bf16* cK = sK + (nb & 1) * kColsE * S;
    const bf16* cV = sV + (nb & 1) * BN * S;

    // 1. S0 on the extended tile (all warps); after the first key tile its first 16 keys are the
    //    previous tile's last 16, carried over.
    beyond |= s0_extended<Tr, true>(sQ, cK, sS, nullptr, m0, n0, key_off, scale, warp, lane, 0, nb > 0);
    __syncthreads();  // sS complete
    if (row_w >= T || n0 > row_w + 15) continue;  // padding rows only, or every key in the future

    // 2. C = sum_a (S0 rows shifted by a) x Band_a, per output block of 8 keys.
    float acc_s[BN / 8][4];
    conv_tile<Tr>(sS, sBand, cq, warp, 0, lane, acc_s);

    // 3. Second causal mask and the sequence end, then FlashAttention's online softmax (C already
    //    carries the 1/sqrt(D) scale: only log2(e) remains) and P V.
    mask_future<BN>(acc_s, n0, row_w, T, lane);
    online_softmax<BN, D>(acc_s, row_max, row_sum, acc_o, kLog2e);
    // Dropout after the row sums took the weights: the output is (dropped A) V with A normalized.
    if (p_drop > 0.f) apply_dropout<BN>(acc_s, blockIdx.x, T, row_w, n0, p_drop, drop_seed, lane);
    accumulate_pv<BN, D, S>(acc_s, cV, acc_o, lane);
  }

  // Every thread reaches this point (the loop only skips iterations), so the vote is warp-wide.
  if (__any_sync(0xffffffffu, beyond) && lane == 0 && fp16_overflow != nullptr) atomicOr(fp16_overflow, 1u);
  // Epilogue: the warp's rows are staged in its own (no longer read) rows of sQ.
  store_output_rows<D, S>(acc_o, row_max, row_sum, sQ + (kHalo + warp * 16) * S, o, lse, row_w, T, lane);
}


// Backward: a CTA owns kBlockN keys and walks the query tiles from the diagonal down. With 4 warps, one
// warp per 16 query rows for C, P, dP, dC (as in the forward) and per 16 keys for dV and dW; with 8, two
// per 16 rows (each half of the keys) and two per 16 keys (each half of D for dV; dW stays with the
// first four). 16 x 16 units spread over the warps for the extended-tile products.
template <int kHeadDim, int kWarps_>
struct KqBwdTraits {
  static constexpr int D = kHeadDim;
  static constexpr int kBlockM = 64, kBlockN = 64, kWarps = kWarps_, kThreads = 32 * kWarps, kHalo = 16;
  static constexpr int kRowGroups = kBlockM / 16;      // 16-row (and 16-key) groups of the tile
  static constexpr int kSplit = kWarps / kRowGroups;   // warps per group
  static_assert(kBlockM == kBlockN && kRowGroups * kSplit == kWarps && (kSplit == 1 || kSplit == 2),
                "4 or 8 warps over 64 x 64 tiles");
  static constexpr int kRowsE = kBlockM + kHalo, kColsE = kBlockN + kHalo;
  static constexpr int kStride = D + 8;          // bf16 rows of sK, sV, sQ, sdO
  static constexpr int kStrideS = kBlockN + 24;  // fp16/bf16 rows of sS, sSb, sdS (88: odd x 16 bytes)
  // The dC frame: dC at rows 16 .. 16 + kBlockM - 1, columns 16 .. 16 + kBlockN - 1, zeros around it,
  // so the transposed convolution can read any shift without bounds checks. Rows up to
  // 16 * (kRowsE / 16 - 1) + 7 + 15 = 86, columns up to 16 * (kColsE / 16) + 23 = 103.
  static constexpr int kRowsF = 88, kStrideF = 104;
  static constexpr int kStrideP = kBlockM + 8;  // sP [kBlockM][kStrideP] bf16
  static_assert((kStrideF * 2 / 16) % 2 == 1 && (kStrideP * 2 / 16) % 2 == 1, "conflict-free ldmatrix rows");
  // dK of the extended keys: at D = 64 in registers (5 units of 16 x 16 per warp), so that with the
  // aliases below two CTAs fit on an SM (one did: 4 warps per SM); at D = 128 (10 units) in shared memory.
  static constexpr bool kDkInRegs = D == 64;
  static constexpr int kDkUnits = (kColsE / 16) * (D / 16) / kWarps;
  static_assert((kColsE / 16) * (D / 16) % kWarps == 0, "dK units split evenly over the warps");
  // Aliases: dS0 (written in step 5) lives in sS (read last in step 2); step 5 writes rows 0 .. 63
  // only, so rows 64 .. 79 keep S0's last 16 rows for the next tile's halo. The dW scratch (step 4) in
  // sP (read last in step 3, with a barrier between).
  // The dW scratch: per warp 16 rows of M_a with a pitch of 40 floats, written as float2 (session 20: the
  // pitch of 33 with scalar stores put 4 lanes on a bank, 4 wavefronts per store: ~85% of the kernel's
  // 90M bank conflicts per launch, ncu). With 40, a half-warp's float2 stores fall on 16 distinct bank
  // pairs, and the diagonal reads (lane c, row r: r * 40 + r + c) on distinct banks. 10 KB, 1 KB more
  // than sP, so sP's region grows to hold it.
  static constexpr int kScrPitch = 40;
  static constexpr size_t kPBytes = std::max<size_t>(static_cast<size_t>(kBlockM) * kStrideP * 2,
                                                     static_cast<size_t>(kRowGroups) * 16 * kScrPitch * 4);
  static constexpr size_t kBf16Elems = static_cast<size_t>(kColsE + kBlockN + kRowsE + kBlockM) * kStride +
                                       2 * static_cast<size_t>(kRowsE) * kStrideS +
                                       static_cast<size_t>(kRowsF) * kStrideF + kPBytes / 2;
  static_assert(kPBytes % 16 == 0, "the regions after sP stay 16-byte aligned");
  static constexpr size_t kFloats = (kDkInRegs ? 0 : static_cast<size_t>(kColsE) * D) + 2 * kBlockM;
  static constexpr size_t kSmemBytes = kBf16Elems * 2 + kFloats * 4 + 2 * kBandWords * 4;
};

// D = 64: 4 warps, two CTAs per SM (106,880 bytes each). D = 128: 184,704 bytes, one CTA per SM, so 8 warps
// (session 11: with 4, each SM ran 4 warps).
using KqBwd64 = KqBwdTraits<64, 4>;
using KqBwd128 = KqBwdTraits<128, 8>;

// acc[rb] += A_rb B over kKs k-steps of 16, for kRb row blocks of 16 sharing one 16-column block of B:
// B's fragment is loaded once per k-step for the kRb products (the backward is bound by shared-memory
// traffic). A_rb: rows 16 rb .. of sA (row stride SA), or with kTransA the transpose of sA's columns
// 16 rb ..; B: rows 16 ks .., columns col .. col + 15 of sB (row stride SB), read transposed.
template <int kRb, int kKs, bool kTransA, int SA, int SB>
__device__ __forceinline__ void shared_b_products(float (&acc)[kRb][2][4], const bf16* sA, const bf16* sB, int col,
                                                  int lane) {
#pragma unroll
  for (int ks = 0; ks < kKs; ++ks) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, sB + bkn_offset(lane, ks * 16, col, SB));
#pragma unroll
    for (int rb = 0; rb < kRb; ++rb) {
      uint32_t af[4];
      if constexpr (kTransA)
        ldmatrix_x4_trans(af, sA + at_offset(lane, ks * 16, rb * 16, SA));
      else
        ldmatrix_x4(af, sA + a_offset(lane, rb * 16, ks * 16, SA));
      mma_bf16(acc[rb][0], af, b[0], b[1]);
      mma_bf16(acc[rb][1], af, b[2], b[3]);
    }
  }
}

// Gradients of the kq_pre layer for one key tile (see docs/flash-mta.md, "Backward plan"). Per query
// tile: recompute S0 (extended) and C exactly as the forward did, P = exp(C - lse), dP = dO V^T,
// dC = P (dP - delta); dV += P^T dO; dW[a, c] += sum dC[i,j] S0[i-(cq-1)+a, j-o+c] (band diagonals of
// dC^T S0_a); dS0 = transposed convolution of dC, masked, on the extended rows whose dC rows are all
// there (the previous tile's last 16 carried: steps 5-7 below); dQ (extended rows)
// += dS0 K by fp32 atomics; dK (extended keys) += dS0^T Q in shared memory, added to the fp32
// accumulator once at the end (the halo keys belong to neighbouring CTAs). dQ and dK still lack the
// 1/sqrt(D) factor (applied when converting); dW and dV are complete.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads)
    flash_mta_kq_bwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                            const bf16* __restrict__ dout, const float* __restrict__ lse,
                            const float* __restrict__ delta, const float* __restrict__ W, float* __restrict__ dq_acc,
                            float* __restrict__ dk_acc, bf16* __restrict__ dv, float* __restrict__ dW_acc, int T,
                            int H, int cq, int ck, int key_off, float scale, float p_drop,
                            unsigned long long drop_seed) {
  constexpr int D = Tr::D, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStride, SS = Tr::kStrideS;
  constexpr int FS = Tr::kStrideF, SP = Tr::kStrideP, kThreads = Tr::kThreads, kWarps = Tr::kWarps;
  constexpr int kHalo = Tr::kHalo, kRowsE = Tr::kRowsE, kColsE = Tr::kColsE;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // keys n0 - o .. n0 - o + kColsE - 1 (fixed)
  bf16* sV = sK + kColsE * S;                     // keys n0 .. n0 + BN - 1 (fixed)
  bf16* sQ = sV + BN * S;                         // query rows m0 - 16 .. m0 + BM - 1
  bf16* sdO = sQ + kRowsE * S;                    // dO rows m0 .. m0 + BM - 1
  __half* sS = reinterpret_cast<__half*>(sdO + BM * S);  // S0 extended, fp16 (recomputing C)
  bf16* sSb = reinterpret_cast<bf16*>(sS + kRowsE * SS);  // S0 extended, bf16 (dW)
  bf16* sdS = reinterpret_cast<bf16*>(sS);                // dS0 extended, bf16 (in sS: see the traits)
  bf16* sF = sSb + kRowsE * SS;                           // the dC frame [kRowsF][FS]
  bf16* sP = sF + Tr::kRowsF * FS;                        // P [BM][SP]
  float* sScr = reinterpret_cast<float*>(sP);  // [kRowGroups][16][kScrPitch]: band extraction of dW (in sP)
  float* sdK = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(sP) + Tr::kPBytes);  // [kColsE][D]
                                                                                               // unless kDkInRegs
  float* sLse = sdK + (Tr::kDkInRegs ? 0 : kColsE * D);   // lse of rows m0 ..
  float* sDelta = sLse + BM;
  uint32_t* sBandF = reinterpret_cast<uint32_t*>(sDelta + BM);
  uint32_t* sBandT = sBandF + kBandWords;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // This warp's 16-row (and 16-key) group and its half of the keys (steps 2) or of D (step 3); 0 with 4 warps.
  constexpr int kSplit = Tr::kSplit, kNB = BN / 8 / kSplit, kDV = D / 8 / kSplit;
  // (kSplit == 1: constants, so that the 4-warp kernel compiles as before the split.)
  const int rg = kSplit == 1 ? warp : warp % Tr::kRowGroups, part = kSplit == 1 ? 0 : warp / Tr::kRowGroups;
  const int n0 = blockIdx.y * BN;
  const int h = blockIdx.x % H;
  const size_t head = static_cast<size_t>(blockIdx.x) * T;
  q += head * D, k += head * D, v += head * D, dout += head * D, dv += head * D;
  dq_acc += head * D, dk_acc += head * D, lse += head, delta += head;
  W += static_cast<size_t>(h) * cq * ck, dW_acc += static_cast<size_t>(h) * cq * ck;

  load_rows_async<kColsE, D, kThreads>(sK, S, k, n0 - key_off, T, tid);
  load_rows_async<BN, D, kThreads>(sV, S, v, n0, T, tid);
  cp_async_commit();
  build_band<false, true>(sBandF, W, cq, ck, tid, kThreads);
  build_band<true, false>(sBandT, W, cq, ck, tid, kThreads);
  // Zeros that stay: the dC frame around its interior, the columns of sS past the extended tile.
  for (int i = tid; i < Tr::kRowsF * FS; i += kThreads) sF[i] = __float2bfloat16(0.f);
  for (int i = tid; i < kRowsE * SS; i += kThreads) sS[i] = __float2half(0.f), sSb[i] = __float2bfloat16(0.f);
  if (!Tr::kDkInRegs)
    for (int i = tid; i < kColsE * D; i += kThreads) sdK[i] = 0.f;
  float acc_dk[Tr::kDkInRegs ? Tr::kDkUnits : 1][2][4] = {};

  float acc_dv[kDV][4];
#pragma unroll
  for (int j = 0; j < kDV; ++j) acc_dv[j][0] = acc_dv[j][1] = acc_dv[j][2] = acc_dv[j][3] = 0.f;
  float acc_dw[kMaxCq];
#pragma unroll
  for (int a = 0; a < kMaxCq; ++a) acc_dw[a] = 0.f;

  // Steps 5-7 on a query tile cover the extended rows whose dS0 is complete (session 22): dS0 of row
  // m0 - 16 + lr reads dC rows m0 - 16 + lr .. + cq - 1 (the transposed convolution looks down), so
  // rows m0 - 16 .. m0 + 47 (lr < kOwnRows) have all of theirs once the frame's 16 rows above hold the
  // previous tile's last 16 rows of dC (carried; zero for the first tile: no earlier query row sees
  // these keys). The tile's last 16 rows wait for the next tile, where they are the rows above; the
  // last tile's are done after the loop. Before, every tile computed all 80 rows, the top 16 and the
  // bottom 16 each from half of their dC rows: 20% more dS0, dQ and dK products and dq atomics.
  constexpr int kUnitRows = kRowsE / 16, kOwnBlocks = kUnitRows - 1, kOwnRows = 16 * kOwnBlocks;
  constexpr int kHalfBlocks = kColsE / 16;  // 8-column blocks per half band (2 kHalfBlocks = kColsE / 8)
  static_assert(2 * kHalfBlocks * 8 == kColsE, "two half bands per row of units");
  static_assert(BM == kOwnRows, "a tile completes as many extended rows as it has own rows");
  // 5. dS0 of half band v (row block v / 2, 16 rows x 40 columns: 5 blocks of 8) of the tile at m0:
  //    sum_a (dC frame rows shifted by cq - 1 - a) x transposed Band_a, masked like S0 (future and
  //    outside the sequence -> 0), through banded_rows as conv_tile: 3 ldmatrix.x4 and one .x2 per tap.
  auto ds0_half_band = [&](int v, int m0) {
    const int rb = v >> 1, m0b = (v & 1) * kHalfBlocks;  // row block, first 8-column block
    float acc[kHalfBlocks][4];
    // Tap a reads the frame rows from rb * 16 + cq - 1 - a (the transposed convolution looks down).
    banded_rows<kHalfBlocks, false, FS>(sF, rb * 16 + cq - 1, -1, m0b, sBandT, cq, lane, acc);
#pragma unroll
    for (int jb = 0; jb < kHalfBlocks; ++jb)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int lr = rb * 16 + g + 8 * r, lc = (m0b + jb) * 8 + 2 * t;
        const int ii = m0 - kHalo + lr, jj = n0 - key_off + lc;
        const bool row_ok = ii >= 0 && ii < T;
        const float d0 = (row_ok && jj >= 0 && jj <= ii) ? acc[jb][2 * r] : 0.f;
        const float d1 = (row_ok && jj + 1 >= 0 && jj + 1 <= ii) ? acc[jb][2 * r + 1] : 0.f;
        *reinterpret_cast<uint32_t*>(sdS + lr * SS + lc) = pack_bf16(d0, d1);
      }
  };
  // 7. dK (extended keys) += dS0^T Q over kKs 16-row blocks of extended rows from row0, in registers
  //    (D = 64) or shared memory. Warp w owns D's columns 16 w .. (kWarps = D / 16) for all 5 row
  //    blocks of keys: each k-step's Q fragment is loaded once for the 5 products (the kernel is bound
  //    by shared-memory traffic: ncu, session 11, L1/TEX 78-84% busy). The same units go to the same
  //    warp in every iteration, so sdK needs no atomics.
  static_assert(kWarps == D / 16, "one 16-column block of D per warp in the dK and dQ products");
  static_assert(Tr::kDkUnits == kColsE / 16, "dK: the warp's units are the key row blocks");
  auto dk_products = [&](auto kks, int row0) {
    constexpr int kRb = kColsE / 16, kKs = decltype(kks)::value;
    if constexpr (Tr::kDkInRegs) {  // straight into the kernel's accumulators
      shared_b_products<kRb, kKs, true, SS, S>(acc_dk, sdS + row0 * SS, sQ + row0 * S, warp * 16, lane);
    } else {
      float acc[kRb][2][4] = {};
      shared_b_products<kRb, kKs, true, SS, S>(acc, sdS + row0 * SS, sQ + row0 * S, warp * 16, lane);
#pragma unroll
      for (int rb = 0; rb < kRb; ++rb)
#pragma unroll
        for (int nn = 0; nn < 2; ++nn)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            sdK[(rb * 16 + g + 8 * (e >> 1)) * D + warp * 16 + nn * 8 + 2 * t + (e & 1)] += acc[rb][nn][e];
    }
  };
  // 6. dQ of kRbQ 16-row blocks of extended rows from row0 += dS0 K, by fp32 atomics. Warp w owns D's
  //    columns 16 w .., for all the row blocks: each k-step's K fragment is loaded once for them.
  auto dq_products = [&](auto krb, int row0, int m0) {
    constexpr int kRbQ = decltype(krb)::value;
    float acc[kRbQ][2][4] = {};
    shared_b_products<kRbQ, kColsE / 16, false, SS, S>(acc, sdS + row0 * SS, sK, warp * 16, lane);
#pragma unroll
    for (int rb = 0; rb < kRbQ; ++rb)
#pragma unroll
      for (int nn = 0; nn < 2; ++nn)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = m0 - kHalo + row0 + rb * 16 + g + 8 * r, col = warp * 16 + nn * 8 + 2 * t;
          if (row >= 0 && row < T)
            atomic_add2(dq_acc + static_cast<size_t>(row) * D + col, acc[rb][nn][2 * r], acc[rb][nn][2 * r + 1]);
        }
  };

  // The query tiles' inputs are copied one tile ahead: dO, lse and delta once step 3 has read them,
  // Q once step 7 has (see the barriers below), so the copies overlap steps 4-6.
  const int m_first = (n0 / BM) * BM;
  load_rows_async<kRowsE, D, kThreads>(sQ, S, q, m_first - kHalo, T, tid);
  load_rows_async<BM, D, kThreads>(sdO, S, dout, m_first, T, tid);
  load_row_stats_async<kThreads>(sLse, sDelta, lse, delta, m_first, BM, T, tid);
  cp_async_commit();

  for (int m0 = m_first; m0 < T; m0 += BM) {
    const bool has_next = m0 + BM < T;
    cp_async_wait_all();
    __syncthreads();  // this tile's inputs landed; the previous tile is done with every buffer

    // 1. S0 on the extended tile, as the forward pass computed it. After the first query tile, its 16
    //    halo rows are the previous tile's last 16 (session 20), moved within sS (fp16; dS0 overwrote
    //    rows 0 .. 63 of it only, session 22) and sSb (bf16) by the warp that then overwrites the last
    //    row block (program order).
    const bool carry = m0 > m_first;
    constexpr int kCarrier = kRowsE / 16 - 2;  // with rb0 = 1, warp w computes row block w + 1
    static_assert(kRowsE / 16 - 1 <= kWarps, "one warp per row block after the carried one");
    if (carry && warp == kCarrier) {
      constexpr int kChunks = kColsE / 8;  // 16-byte chunks per row (columns past kColsE stay zero)
      for (int c = lane; c < kHalo * kChunks; c += 32) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        *reinterpret_cast<uint4*>(sS + r * SS + col) = *reinterpret_cast<const uint4*>(sS + (BM + r) * SS + col);
        *reinterpret_cast<uint4*>(sSb + r * SS + col) =
            *reinterpret_cast<const uint4*>(sSb + (BM + r) * SS + col);
      }
      __syncwarp();
    }
    s0_extended<Tr>(sQ, sK, sS, sSb, m0, n0, key_off, scale, warp, lane, carry ? 1 : 0);
    __syncthreads();

    // 2. This warp's 16 query rows (and its half of the keys with 8 warps): C, then P, dP = dO V^T,
    //    dC = P (dP - delta). With dropout, the weights that met V are the dropped ones (for dV) and dP
    //    reaches P through the same mask; delta = dO . O still equals sum_j P dP since O was computed
    //    from the dropped weights.
    float acc_p[kNB][4];
    conv_tile<Tr, kNB>(sS, sBandF, cq, rg, part * kNB, lane, acc_p);
    float acc_dp[kNB][4];
    warp_gemm_abt<8 * kNB, D, S>(acc_dp, sdO + rg * 16 * S, sV + part * 8 * kNB * S, lane);
    const float keep_scale = p_drop > 0.f ? 1.0f / (1.0f - p_drop) : 1.0f;
#pragma unroll
    for (int j = 0; j < kNB; ++j)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int lrow = rg * 16 + g + 8 * hh, row = m0 + lrow, lcol = 8 * (part * kNB + j) + 2 * t;
        float p[2], pd[2], dc[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + lcol + e;
          const bool ok = row < T && col <= row;  // col <= row < T
          p[e] = ok ? exp2f(fmaf(acc_p[j][2 * hh + e], kLog2e, -(sLse[lrow] * kLog2e))) : 0.f;
          const float mask =
              (p_drop > 0.f && ok) ? (dropout_keep(drop_seed, blockIdx.x, T, row, col, p_drop) ? keep_scale : 0.f) : 1.f;
          pd[e] = p[e] * mask;
          // Row 0 sees one key: the softmax's Jacobian there is exactly 0, which dP - delta (delta from
          // the bf16 output) would only approximate (T = 1: every pre-softmax gradient exactly 0).
          dc[e] = row > 0 ? p[e] * (acc_dp[j][2 * hh + e] * mask - sDelta[lrow]) : 0.f;
        }
        *reinterpret_cast<uint32_t*>(sP + lrow * SP + lcol) = pack_bf16(pd[0], pd[1]);
        *reinterpret_cast<uint32_t*>(sF + (kHalo + lrow) * FS + kHalo + lcol) = pack_bf16(dc[0], dc[1]);
      }
    __syncthreads();  // sP and the dC frame complete

    // 3. dV for this warp's 16 keys (and its half of D with 8 warps): P^T dO.
#pragma unroll
    for (int ks = 0; ks < BM / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, sP + at_offset(lane, ks * 16, rg * 16, SP));
#pragma unroll
      for (int dn = 0; dn < kDV / 2; ++dn) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sdO + bkn_offset(lane, ks * 16, part * 8 * kDV + dn * 16, S));
        mma_bf16(acc_dv[2 * dn], a, b[0], b[1]);
        mma_bf16(acc_dv[2 * dn + 1], a, b[2], b[3]);
      }
    }

    __syncthreads();  // every warp is done with sP (the dW scratch takes its place), sdO, sLse, sDelta
    if (has_next) {
      load_rows_async<BM, D, kThreads>(sdO, S, dout, m0 + BM, T, tid);
      load_row_stats_async<kThreads>(sLse, sDelta, lse, delta, m0 + BM, BM, T, tid);
      cp_async_commit();
    }

    // 4. dW for this warp's 16 keys j (local 16 warp + r), the first 4 warps (the others go on to step
    //    5): for each a, M = dC^T X_a with
    //    X_a[i][col] = S0 row i - (cq-1) + a (sS row 16 + i - (cq-1) + a), columns col = 16 warp .. + 31;
    //    dW[a, c] gets the band M[r][r + c].
    //    The dC^T fragments do not depend on a: loaded once per tile.
    if (kSplit == 1 || warp < Tr::kRowGroups) {
      constexpr int kP = Tr::kScrPitch;
      float* scr = sScr + warp * 16 * kP;
      uint32_t dct[BM / 16][4];
#pragma unroll
      for (int ks = 0; ks < BM / 16; ++ks)
        ldmatrix_x4_trans(dct[ks], sF + at_offset(lane, kHalo + ks * 16, kHalo + warp * 16, FS));
#pragma unroll
      for (int a = 0; a < kMaxCq; ++a) {
        if (a >= cq) break;
        float m[4][4] = {};
#pragma unroll
        for (int ks = 0; ks < BM / 16; ++ks) {
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sSb + bkn_offset(lane, kHalo - (cq - 1) + a + ks * 16, warp * 16 + np * 16, SS));
            mma_bf16(m[2 * np], dct[ks], b[0], b[1]);
            mma_bf16(m[2 * np + 1], dct[ks], b[2], b[3]);
          }
        }
#pragma unroll
        for (int nb = 0; nb < 4; ++nb)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            *reinterpret_cast<float2*>(scr + (g + 8 * h) * kP + 8 * nb + 2 * t) =
                make_float2(m[nb][2 * h], m[nb][2 * h + 1]);
        __syncwarp();
        if (lane < ck) {
          float sum = 0.f;
#pragma unroll
          for (int r = 0; r < 16; ++r) sum += scr[r * kP + r + lane];
          acc_dw[a] += sum;
        }
        __syncwarp();
      }
    }

    // 5. dS0 of the extended tile's first kOwnRows rows (m0 - 16 .. m0 + 47); see ds0_half_band. With
    //    8 warps the last four, which skipped dW, take all 8 half bands, two each: between the same
    //    two barriers the first four do dW, which costs about two half bands (session 22: with one half
    //    band each for all 8 warps, dW + one half band was the longest share).
    if constexpr (kSplit == 1) {
      for (int v = warp; v < 2 * kOwnBlocks; v += kWarps) ds0_half_band(v, m0);
    } else {
      static_assert(kOwnBlocks == kWarps - Tr::kRowGroups, "two half bands per warp that skips dW");
      if (warp >= Tr::kRowGroups)
        for (int v = warp - Tr::kRowGroups; v < 2 * kOwnBlocks; v += kWarps - Tr::kRowGroups) ds0_half_band(v, m0);
    }
    __syncthreads();  // sdS complete
    // dC's last 16 rows become the frame's rows above for the next tile (its dS0 rows m0 + 48 ..
    // m0 + 63 read them); step 5 has read the frame, the next tile's step 2 writes it after a barrier.
    if (has_next) {
      constexpr int kChunks = BN / 8;  // 16-byte chunks of a row of dC
      for (int c = tid; c < kHalo * kChunks; c += kThreads) {
        const int r = c / kChunks, col = kHalo + (c % kChunks) * 8;
        *reinterpret_cast<uint4*>(sF + r * FS + col) = *reinterpret_cast<const uint4*>(sF + (BM + r) * FS + col);
      }
    }

    // 7. dK (extended keys) += dS0^T Q, before dQ, so that sQ is free for the next tile's copy while
    //    the dQ atomics run.
    dk_products(std::integral_constant<int, kOwnBlocks>{}, 0);
    __syncthreads();  // every warp is done with sQ
    if (has_next) {
      load_rows_async<kRowsE, D, kThreads>(sQ, S, q, m0 + BM - kHalo, T, tid);
      cp_async_commit();
    }

    // 6. dQ (extended rows) += dS0 K, by atomics (they need no barrier after them: the next
    //    iteration's first barrier orders them before sdS is overwritten).
    dq_products(std::integral_constant<int, kOwnBlocks>{}, 0, m0);
  }

  // The last tile's deferred rows m_last + 48 .. m_last + 63 (extended rows kOwnRows ..): nothing below
  // them is left, so their dS0 is complete. sdS's rows 0 .. 63 are still read by the last dQ products,
  // these rows are not; sQ still holds the last tile's rows (no copy followed it).
  const int m_last = m_first + (T - 1 - m_first) / BM * BM;
  if (m_last - kHalo + kOwnRows < T) {
    for (int v = 2 * kOwnBlocks + warp; v < 2 * kUnitRows; v += kWarps) ds0_half_band(v, m_last);
    __syncthreads();  // the deferred rows of sdS complete
    dk_products(std::integral_constant<int, 1>{}, kOwnRows);
    dq_products(std::integral_constant<int, 1>{}, kOwnRows, m_last);
  }
  __syncthreads();  // sdK complete

  // dV of this warp's 16 keys and its columns (exact: no other CTA touches them).
#pragma unroll
  for (int j = 0; j < kDV; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = n0 + rg * 16 + g + 8 * r;
      if (row < T)
        *reinterpret_cast<uint32_t*>(dv + static_cast<size_t>(row) * D + part * 8 * kDV + 8 * j + 2 * t) =
            pack_bf16(acc_dv[j][2 * r], acc_dv[j][2 * r + 1]);
    }
  // dK of the extended keys (the halo ones are shared with the neighbouring CTAs).
  if constexpr (Tr::kDkInRegs) {
#pragma unroll
    for (int rb = 0; rb < Tr::kDkUnits; ++rb) {  // the warp's units: key row block rb, D's columns 16 warp ..
      const int i = rb;
#pragma unroll
      for (int nn = 0; nn < 2; ++nn)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = n0 - key_off + rb * 16 + g + 8 * r, col = warp * 16 + nn * 8 + 2 * t;
          if (row >= 0 && row < T)
            atomic_add2(dk_acc + static_cast<size_t>(row) * D + col, acc_dk[i][nn][2 * r], acc_dk[i][nn][2 * r + 1]);
        }
    }
  } else {
    for (int i = 2 * tid; i < kColsE * D; i += 2 * kThreads) {
      const int row = n0 - key_off + i / D;
      if (row >= 0 && row < T) atomic_add2(dk_acc + static_cast<size_t>(row) * D + i % D, sdK[i], sdK[i + 1]);
    }
  }
#pragma unroll
  for (int a = 0; a < kMaxCq; ++a)
    if (a < cq && lane < ck && (kSplit == 1 || warp < Tr::kRowGroups)) atomicAdd(dW_acc + a * ck + lane, acc_dw[a]);
}

template <class Tr>
void launch_kq_forward(const bf16* q, const bf16* k, const bf16* v, const float* W, bf16* o, float* lse, int B, int H,
                       int T, int cq, int ck, int key_off, const AttnOptions& opt, cudaStream_t s) {
  const long long m_blocks = (static_cast<long long>(T) + Tr::kBlockM - 1) / Tr::kBlockM;
  fm_require(m_blocks <= 65535, "T too large for the forward grid");
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(m_blocks));
  MTA_CUDA_CHECK(cudaFuncSetAttribute(flash_mta_kq_fwd_kernel<Tr>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Tr::kSmemBytes)));
  flash_mta_kq_fwd_kernel<Tr><<<grid, Tr::kThreads, Tr::kSmemBytes, s>>>(
      q, k, v, W, o, lse, T, H, cq, ck, key_off, 1.0f / std::sqrt(static_cast<float>(Tr::D)), opt.dropout,
      opt.dropout_seed, opt.fp16_overflow);
  MTA_CUDA_CHECK_LAUNCH("flash_mta_kq_fwd_kernel");
}

template <class Tr>
void launch_kq_backward(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                        const float* delta, const float* W, float* dq_acc, float* dk_acc, bf16* dv, float* dW, int B,
                        int H, int T, int cq, int ck, int key_off, const AttnOptions& opt, cudaStream_t s) {
  const long long n_blocks = (static_cast<long long>(T) + Tr::kBlockN - 1) / Tr::kBlockN;
  fm_require(n_blocks <= 65535, "T too large for the backward grid");
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(n_blocks));
  MTA_CUDA_CHECK(cudaFuncSetAttribute(flash_mta_kq_bwd_kernel<Tr>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Tr::kSmemBytes)));
  flash_mta_kq_bwd_kernel<Tr><<<grid, Tr::kThreads, Tr::kSmemBytes, s>>>(
      q, k, v, dout, lse, delta, W, dq_acc, dk_acc, dv, dW, T, H, cq, ck, key_off,
      1.0f / std::sqrt(static_cast<float>(Tr::D)), opt.dropout, opt.dropout_seed);
  MTA_CUDA_CHECK_LAUNCH("flash_mta_kq_bwd_kernel");
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool flash_mta_supported(const AttentionSpec& spec, int D) {
  return (D == 64 || D == 128) && spec.kq_pre && spec.kq_pre->q <= kMaxCq && spec.kq_pre->k <= kMaxCk &&
         !spec.head_pre && !spec.kq_post && !spec.head_post && !spec.norm && !spec.depth_scale_layer && !spec.gate;
}

void flash_mta_forward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* kq_pre_w,
                       bf16* o, float* lse, int B, int T, const AttnOptions& opt, cudaStream_t s) {
  const int H = spec.heads, D = spec.head_dim;
  fm_require(flash_mta_supported(spec, D),
             "this spec is not supported by the fused kernel yet (only kq_pre with cq <= 8, ck <= 15, D = 64 or 128)");
  fm_require(B >= 1 && T >= 1 && H >= 1, "B, H and T must be >= 1");
  fm_require(static_cast<long long>(B) * H <= INT_MAX, "B * H too large");
  fm_require(q && k && v && o && aligned16(q) && aligned16(k) && aligned16(v) && aligned16(o),
             "q, k, v, o must be non-null and 16-byte aligned");
  fm_require(kq_pre_w != nullptr && lse != nullptr, "kq_pre weights and lse must be non-null");
  fm_require(opt.dropout >= 0.f && opt.dropout < 1.f, "dropout must be in [0, 1)");
  const KqConv& kc = *spec.kq_pre;
  if (D == 64)
    launch_kq_forward<KqFwd64>(q, k, v, kq_pre_w, o, lse, B, H, T, kc.q, kc.k, kc.key_offset(), opt, s);
  else
    launch_kq_forward<KqFwd128>(q, k, v, kq_pre_w, o, lse, B, H, T, kc.q, kc.k, kc.key_offset(), opt, s);
}

size_t flash_mta_backward_scratch_bytes(int B, int H, int T, int D) {
  const size_t rows = static_cast<size_t>(B) * H * T;
  return (2 * rows * D + rows) * sizeof(float);
}

void flash_mta_backward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* kq_pre_w,
                        const bf16* o, const bf16* dout, const float* lse, bf16* dq, bf16* dk, bf16* dv,
                        float* grad_kq_pre, void* scratch, int B, int T, const AttnOptions& opt, cudaStream_t s) {
  const int H = spec.heads, D = spec.head_dim;
  fm_require(flash_mta_supported(spec, D),
             "this spec is not supported by the fused kernel yet (only kq_pre with cq <= 8, ck <= 15, D = 64 or 128)");
  fm_require(B >= 1 && T >= 1 && H >= 1, "B, H and T must be >= 1");
  fm_require(static_cast<long long>(B) * H <= INT_MAX, "B * H too large");
  for (const void* p : {static_cast<const void*>(q), static_cast<const void*>(k), static_cast<const void*>(v),
                        static_cast<const void*>(o), static_cast<const void*>(dout), static_cast<const void*>(dq),
                        static_cast<const void*>(dk), static_cast<const void*>(dv), static_cast<const void*>(scratch)})
    fm_require(p != nullptr && aligned16(p), "tensors and scratch must be non-null and 16-byte aligned");
  fm_require(kq_pre_w && lse && grad_kq_pre, "kq_pre weights, lse and grad_kq_pre must be non-null");
  fm_require(opt.dropout >= 0.f && opt.dropout < 1.f, "dropout must be in [0, 1)");
  const KqConv& kc = *spec.kq_pre;
  const size_t rows = static_cast<size_t>(B) * H * T, numel = rows * D;
  float* dq_acc = static_cast<float*>(scratch);
  float* dk_acc = dq_acc + numel;
  float* delta = dk_acc + numel;
  MTA_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, 2 * numel * sizeof(float), s));
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  if (D == 64) {
    launch_row_dot<64>(o, dout, delta, static_cast<long long>(rows), s);
    launch_kq_backward<KqBwd64>(q, k, v, dout, lse, delta, kq_pre_w, dq_acc, dk_acc, dv, grad_kq_pre, B, H, T, kc.q,
                                kc.k, kc.key_offset(), opt, s);
  } else {
    launch_row_dot<128>(o, dout, delta, static_cast<long long>(rows), s);
    launch_kq_backward<KqBwd128>(q, k, v, dout, lse, delta, kq_pre_w, dq_acc, dk_acc, dv, grad_kq_pre, B, H, T, kc.q,
                                 kc.k, kc.key_offset(), opt, s);
  }
  launch_convert_accum(dq_acc, dq, static_cast<long long>(numel), scale, s);
  launch_convert_accum(dk_acc, dk, static_cast<long long>(numel), scale, s);
}

}  // namespace mta::cuda
