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

// The key-query convolution (or its transpose) as tf32 band products (conv_tile_tf32 in
// flash_kq_layer.cu): for 16 output rows, one n8 block of output keys n = 0 .. 7 and tap row a,
// out[n] += sum_c tap(c) in[n + c] is (16 rows x 8 k-steps of input columns) x (band: B[k][n] =
// tap(k - n)) over band_steps(ck) k-chunks of 8 columns. An m16n8k8 fragment's logical k index is t
// (registers a0, a1, b0) or t + 4 (a2, a3, b1); both operands map it to physical column 2t + e (e = 0,
// 1), so each lane loads its two A columns as one float2 and the product is unchanged (a sum over k).
MTA_HD constexpr int band_steps(int ck) { return (ck + 6) / 8 + 1; }  // input chunks per n8 block
// Column (from the block's first output key) of lane t's A element e in k-chunk q.
MTA_HD constexpr int band_a_col(int q, int t, int e) { return 8 * q + 2 * t + e; }
// The tap c that lane (g, t)'s B element e holds in k-step s: physical row 8 s + 2 t + e, column g;
// zero unless 0 <= c < ck.
MTA_HD constexpr int band_b_tap(int s, int g, int t, int e) { return 8 * s + 2 * t + e - g; }
// The lane whose tap register B element e comes from (a shuffle): tap c on lane c mod 32. Lanes >= ck
// hold zero, and c stays in [-7, 24], so the taps outside [0, ck) all read a zero lane for ck <= 25.
MTA_HD constexpr int band_b_lane(int s, int g, int t, int e) { return band_b_tap(s, g, t, e) & 31; }

}  // namespace mta::cuda::mma
