#pragma once
// The index arithmetic of the mma.sync kernels (mma_sm80.cuh and its users), host- and
// device-callable, so that CPU tests replay the fragment mechanics with the very functions the kernels
// use. Fragment conventions: mma_sm80.cuh.
#if defined(__CUDACC__)
#define MTA_HD __host__ __device__ __forceinline__
#else
#define MTA_HD inline
#endif

namespace mta::cuda::mma {

// Address offsets (in elements) of this lane's ldmatrix.x4 row for the three operand patterns used.
// All tiles are row-major with `stride` elements per row; (r0, c0) is the 16 x 16 block's corner.
//  * A operand, stored row-major (rows = M, cols = K), non-trans: matrices (rows 0-7|8-15) x (cols 0-7|8-15)
//    in the order a0 a1 a2 a3.
MTA_HD int a_offset(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 15)) * stride + c0 + (lane >> 4) * 8;
}
//  * B operand stored as [n][k] (e.g. K for Q K^T), non-trans: gives {b0, b1} of n-block r0..r0+7 in
//    registers 0, 1 and of n-block r0+8..r0+15 in registers 2, 3 (k = c0..c0+15).
MTA_HD int bnk_offset(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + (lane >> 4) * 8) * stride + c0 + ((lane >> 3) & 1) * 8;
}
//  * B operand stored as [k][n] (e.g. V for P V), with .trans: k = r0..r0+15, gives {b0, b1} of
//    n-block c0..c0+7 in registers 0, 1 and of n-block c0+8..c0+15 in registers 2, 3.
MTA_HD int bkn_offset(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + c0 + (lane >> 4) * 8;
}
//  * A operand stored transposed, as [k][m] (dS^T for dS K), with .trans: m = c0..c0+15, k = r0..r0+15.
MTA_HD int at_offset(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + (lane >> 4) * 8) * stride + c0 + ((lane >> 3) & 1) * 8;
}

}  // namespace mta::cuda::mma
