#pragma once
// The row-block schedule of the materialized GPU op (attention/mta_cuda.cu): the query rows are
// processed in blocks of R rows, and a block computes only the rows its outputs depend on. Kept apart
// from the CUDA code so that tests/test_mta_row_blocks.cpp can replay the schedule on the CPU (in CI)
// with the same numbers the GPU uses.
//
// With hq = cq - 1 of kq_pre and hp = cq - 1 of kq_post (0 when absent), the dependencies are:
//   forward:  O rows [r0, r1) <- A2, A3 rows [r0, r1) <- A rows [r0 - hp, r1) (kq_post reads hp rows
//             above) <- C', C rows [r0 - hp, r1) <- S0 rows [r0 - hp - hq, r1) (kq_pre reads hq above);
//   backward: dS0 rows [r0, r1) <- dC rows [r0, r1 + hq) (the adjoint of kq_pre reads hq rows below)
//             <- dC', dA rows [r0, r1 + hq) <- dA2, dA3 rows [r0, r1 + hq + hp) <- dO rows, and the
//             forward quantities of those rows, which need S0 from r0 - hp - hq again.
// Everything a block owns -- outputs, dQ rows, weight-gradient terms, dK / dV terms -- comes from rows
// [r0, r1), so each term is counted once; the halo rows are recomputed by the neighbouring blocks.
#include <algorithm>

namespace mta {

struct RowBlock {
  int r0 = 0, r1 = 0;  // the rows this block owns
  int base = 0;        // first row computed (S0 from here): r0 - hq - hp, at least 0
  int end = 0;         // one past the last row computed, and the key columns [0, end) the block stores:
                       // r1 forward, r1 + hq + hp (at most T) backward
  int pre = 0;         // first row of C, C' and A: r0 - hp, at least 0
  int endA = 0;        // backward: one past the last row of dA, dC', dC (end - hp, or T when end = T)
};

inline RowBlock row_block(int T, int R, int hq, int hp, int r0, bool backward) {
  RowBlock b;
  b.r0 = r0;
  b.r1 = std::min(T, r0 + R);
  b.base = std::max(0, r0 - hq - hp);
  b.end = backward ? std::min(T, b.r1 + hq + hp) : b.r1;
  b.pre = std::max(0, r0 - hp);
  b.endA = b.end == T ? T : b.end - hp;
  return b;
}

// Rows a block's buffers hold at most: R + the halos (twice in the backward pass), at most T.
inline int row_block_capacity(int T, int R, int hq, int hp, bool backward) {
  return std::min(T, R + (hq + hp) * (backward ? 2 : 1));
}

}  // namespace mta
