#pragma once
// The regions of the planned fused MTA layer (docs/flash-mta.md, "What comes next"): which query rows
// and keys each stage of one tile needs, when a tile of query rows x keys recomputes its halos instead
// of carrying state between tiles. Host- and device-callable, so that the CPU replay
// (tests/test_fused_layer_tiling.cpp) checks the arithmetic the kernels will use.
//
// Notation (docs/mta-semantics.md): a key-query convolution reads, for output (i, j), the inputs
// (i - U + a, j - L + c) for a < cq, c < ck: U = cq - 1 rows above, L = o keys to the left and
// R = ck - 1 - o keys to the right (its Reach). Its adjoint reads (i + U - a, j + L - c): U rows below,
// R keys to the left and L to the right. An absent convolution has reach 0 (the identity).
#include "attention/mma_layout.h"  // MTA_HD

namespace mta::fused {

// Query rows [r0, r1) x keys [c0, c1); bounds may lie outside the sequence (those entries are 0).
struct Region {
  int r0 = 0, r1 = 0, c0 = 0, c1 = 0;
  MTA_HD int rows() const { return r1 - r0; }
  MTA_HD int cols() const { return c1 - c0; }
  MTA_HD bool contains(int i, int j) const { return i >= r0 && i < r1 && j >= c0 && j < c1; }
  MTA_HD bool covers(const Region& o) const { return o.r0 >= r0 && o.r1 <= r1 && o.c0 >= c0 && o.c1 <= c1; }
};

struct Reach {
  int up = 0, left = 0, right = 0;
};
MTA_HD Reach conv_reach(int cq, int ck, int o) { return Reach{cq - 1, o, ck - 1 - o}; }

MTA_HD Region hull(const Region& a, const Region& b) {
  return Region{a.r0 < b.r0 ? a.r0 : b.r0, a.r1 > b.r1 ? a.r1 : b.r1, a.c0 < b.c0 ? a.c0 : b.c0,
                a.c1 > b.c1 ? a.c1 : b.c1};
}
// The inputs the convolution needs for its outputs on p, and those its adjoint needs.
MTA_HD Region conv_inputs(const Region& p, Reach k) {
  return Region{p.r0 - k.up, p.r1, p.c0 - k.left, p.c1 + k.right};
}
MTA_HD Region adjoint_inputs(const Region& p, Reach k) {
  return Region{p.r0, p.r1 + k.up, p.c0 - k.right, p.c1 + k.left};
}

// One tile p (owned query rows x owned keys) of the layer, convolutions pre (before the softmax) and
// post (after it); S0 -> C (pre) -> C' (mixing) -> A (softmax) -> A2 (post) -> A3 (mixing).
struct TileRegions {
  // Forward pass 1 (row statistics): C' on p, so S0 on s0_stats.
  Region s0_stats;
  // Forward pass 2 (A3 V on p): A on a_out (the post convolution's inputs), so S0 on s0_out.
  Region a_out, s0_out;
  // Delta pass (delta_i = sum_j A dA over p's keys): dA on p needs dA3 (and dA2) on d2_delta;
  // A on p needs S0 on s0_stats.
  Region d2_delta;
  // Main backward pass (dS on p, the weight-gradient and dV terms owned by p): dC', dC and dA on d1
  // (the pre adjoint's inputs), dA3 and dA2 on d2 (the post adjoint's inputs of d1), A and C on
  // a_bwd (d1 and a_out together), S0 on s0_bwd.
  Region d1, d2, a_bwd, s0_bwd;
};

MTA_HD TileRegions tile_regions(const Region& p, Reach pre, Reach post) {
  TileRegions t;
  t.s0_stats = conv_inputs(p, pre);
  t.a_out = conv_inputs(p, post);
  t.s0_out = conv_inputs(t.a_out, pre);
  t.d2_delta = adjoint_inputs(p, post);
  t.d1 = adjoint_inputs(p, pre);
  t.d2 = adjoint_inputs(t.d1, post);
  t.a_bwd = hull(t.d1, t.a_out);
  t.s0_bwd = conv_inputs(t.a_bwd, pre);
  return t;
}

}  // namespace mta::fused
