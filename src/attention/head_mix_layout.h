#pragma once
// The layout of FlashMix's tensor-core head mixing (head_mix_mma.cuh), host- and device-callable, so
// that tests/test_head_mix_mma.cpp replays the fragment mechanics with the functions the kernels use.
#include <cstddef>

#include "attention/mma_layout.h"

namespace mta::cuda::headmix {

constexpr int kTile = 16;             // positions per tile side (query rows and keys per step)
constexpr int kMaxG = 16;             // heads per CTA: the k of one MMA
constexpr int kPS = kTile + 8;        // bf16 per tile row in MixIn (16-byte aligned rows)
constexpr int kYS = kTile * kPS + 8;  // bf16 per head in MixIn: 784 bytes = 16 (mod 128), so the 8
                                      // heads of one ldmatrix phase hit 8 distinct 16-byte bank groups
constexpr int kXS = 24;               // fp32 per tile row in MixOut (half-warp float2 reads: no conflicts)
constexpr int kXT = kTile * kXS + 4;  // fp32 per head in MixOut: 4 (mod 32), so an MMA's result
                                      // stores (8 positions x 4 head pairs) hit 32 distinct banks
constexpr int kInElems = kMaxG * kYS;   // bf16 per MixIn buffer
constexpr int kFragWords = 4 * 32 * 8;  // 4 kinds x (hi, lo) x 32 lanes x 4 b32
// A lane's four hi b32 of kind `kind` start at word frag_hi(kind, lane), its lo ones kFragLo words
// later: each part a [32 lanes][4] block, so a quarter-warp's 16-byte reads cover 128 contiguous bytes
// (session 21: with hi and lo of a lane adjacent, 32 bytes per lane, two lanes of a quarter shared a
// bank group: ncu counted these reads as 23-38% of the FlashMix kernels' bank-conflict wavefronts).
constexpr int kFragLo = 32 * 4;
MTA_HD int frag_hi(int kind, int lane) { return (kind * 2 * 32 + lane) * 4; }

// The kinds of coefficient fragments: head_pre and head_post, each as M (mixing) and as M^T (its
// adjoint, dIn_y = sum_x M[x, y] dOut_x).
enum MixKind { kPre = 0, kPost = 1, kPreT = 2, kPostT = 3 };

// CTAs per group of G coupled heads when one CTA holds at most max_heads of them (group_cluster.cuh):
// the fewest that hold the group, C = ceil(G / max_heads), up to 8 (a cluster's portable size); 0 when
// more would be needed. Each CTA runs L = group_warps(G, C) = ceil(G / C) warps, one per head; where C
// does not divide G (e.g. 11 or 13 heads over 2 CTAs of 8), the last CTA's last C L - G < C warps are
// padding: they compute on a real head's inputs, put nothing into the mixing buffers (whose slots stay
// zero, with zero coefficients) and write nothing, so the group's results are exactly those of G heads.
// Session 11 (before: only even splits, so 11 and 13 heads had no fused path and 7 heads over 4 per CTA
// took 7 CTAs of one warp).
MTA_HD int group_warps(int G, int C) { return (G + C - 1) / C; }
MTA_HD int cluster_size(int G, int max_heads) {
  if (G < 1 || max_heads < 1) return 0;
  const int C = (G + max_heads - 1) / max_heads;
  if (C > 8) return 0;
  // The last CTA holds at least one real head: (C - 1) ceil(G / C) < G holds for the group sizes and
  // per-CTA limits the kernels use (G <= 16; 2, 4, 8 or 16 heads per CTA), checked anyway.
  return (C - 1) * group_warps(G, C) < G ? C : 0;
}

// MixIn element of head x at tile position (row, col); MixOut element likewise.
// MixOut is read two ways: in the mma accumulator layout (FlashMix: lane (g, t) at rows g, g + 8,
// columns 2t, 2t + 8), conflict-free, and row per lane (the kq-layer kernels: lane (r, half) at row r,
// columns 8 half .., as float2), where rows r, r + 4, r + 8, r + 12 share a bank pair (24 r mod 32 has
// period 4): 4-way. Session 21 shifted rows 4q .. 4q + 3 by 2q words, which made those reads
// conflict-free and the kq layers 2-6% slower (forward +7 to +9%; ptxas spilled 4-16 bytes more in
// kernels P and Q): measured and reverted (bench/RESULTS.md).
MTA_HD int in_offset(int x, int row, int col) { return x * kYS + row * kPS + col; }
MTA_HD int out_offset(int x, int row, int col) { return x * kXT + row * kXS + col; }

// ldmatrix addresses of the products over tile row r (16 positions):
//  * mixing, A = the tiles as [k = head][m = position] (.trans): Out[p, x] = sum_y In[p, y] B[y, x];
//  * weight gradients, A = D as [m = head][k = position] and B = V as [n = head][k = position]
//    (both non-trans): G[x, y] = sum_p D[p, x] V[p, y].
MTA_HD int mix_a_offset(int lane, int r) { return mma::at_offset(lane, 0, r * kPS, kYS); }
MTA_HD int grad_a_offset(int lane, int r) { return mma::a_offset(lane, 0, r * kPS, kYS); }
MTA_HD int grad_b_offset(int lane, int r) { return mma::bnk_offset(lane, 0, r * kPS, kYS); }

// The clustered kq-layer kernels' gradient staging (flash_kq_layer_bwd.cu, grad_terms_cl): a CTA-local head
// x's 16 x 16 gradient tile as bf16 in its own MixOut slot (MixOut viewed as bf16: slot stride 2 kXT),
// the hi part at element 0 and the lo part at kStageLo, rows of kPS; and the ldmatrix address of lane's
// row of the A operand [m = head x][k = position] over tile row r for a CTA of L heads: rows 8 .. 15,
// and rows >= L, repeat head min(lane & 7, L - 1), so that every read stays inside the CTA's L slots
// (their products are dropped). The slot stride, 1552 bytes = 16 (mod 128), puts an ldmatrix phase's
// 8 rows in distinct 16-byte bank groups.
constexpr int kStageLo = kTile * kPS;
static_assert(2 * kStageLo <= 2 * kXT, "a MixOut slot holds a gradient tile's hi and lo parts");
MTA_HD int staged_offset(int x, int row, int col) { return x * 2 * kXT + row * kPS + col; }
MTA_HD int staged_grad_a_offset(int lane, int r, int L) {
  const int x = (lane & 7) < L ? (lane & 7) : L - 1;
  return staged_offset(x, r, (lane >> 4) * 8);
}

// The CTA's mixing matrix entry (x, y) (CTA-local heads) of a group size gs: block-diagonal with the
// gs x gs blocks of m (the CTA's first head is head0, a multiple of gs), zero outside.
MTA_HD float cta_coef(const float* m, int gs, int head0, int G, int x, int y) {
  if (!gs || x >= G || y >= G || x / gs != y / gs) return 0.f;
  return m[static_cast<size_t>((head0 + x) / gs) * gs * gs + (x % gs) * gs + y % gs];
}

// Element e (0, 1) of B-fragment register reg (0, 1) of n-block nt for `lane`, as (k, n) of the
// m16n8k16 B operand (b0 = B[2t..2t+1][g], b1 = B[2t+8..+9][g]), and its coefficient: B[k][n] =
// M[n][k] for mixing (k = input head, n = output head), M[k][n] for the adjoint.
MTA_HD void b_frag_kn(int lane, int nt, int reg, int e, int& k, int& n) {
  n = 8 * nt + (lane >> 2);
  k = 2 * (lane & 3) + 8 * reg + e;
}
// reps > 1: the mixing buffers hold `reps` tiles of positions per head, tile i of head x in slot x + i G
// (FlashMix's backward at G <= 8, D = 64: two query blocks per step, session 12), and the coefficients
// are block-diagonal over the copies, diag(M, M), so that one product mixes each tile on its own.
MTA_HD float frag_coef(const float* m, int gs, int head0, int G, bool adjoint, int k, int n, int reps = 1) {
  if (reps > 1) {
    if (k / G != n / G || k / G >= reps) return 0.f;
    k %= G, n %= G;
  }
  return adjoint ? cta_coef(m, gs, head0, G, k, n) : cta_coef(m, gs, head0, G, n, k);
}

}  // namespace mta::cuda::headmix
