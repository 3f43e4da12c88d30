#pragma once
// Device primitives shared by the fused attention kernels (flash_attn.cu, flash_mta.cu): cp.async
// copies, ldmatrix, mma.sync (m16n8k16, bf16 and fp16 operands, fp32 accumulators), packing, and the
// ldmatrix address patterns. sm_80 instructions (run on sm_90).
//
// Fragment conventions (PTX ISA, mma.m16n8k16 with .bf16 operands; lane = 4 * g + t, g = lane / 4,
// t = lane % 4):
//   A (16 x 16, row-major), 4 x b32:  a0 = A[g][2t..2t+1],   a1 = A[g+8][2t..2t+1],
//                                     a2 = A[g][2t+8..+9],   a3 = A[g+8][2t+8..+9]
//   B (16 x 8, k x n),      2 x b32:  b0 = B[2t..2t+1][g],   b1 = B[2t+8..+9][g]
//   C (16 x 8, fp32),       4 x f32:  c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// The lower-indexed element of a pair sits in the low 16 bits of the b32 register.
// ldmatrix.x4 loads four 8 x 8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and
// register i of every lane receives matrix i's element pair (row g, columns 2t, 2t+1), or with .trans
// the pair (rows 2t, 2t+1, column g), i.e. the pair of the transposed matrix.
//
// Shared-memory tiles are row-major with rows padded by 8 bf16 (16 bytes): the 8 row addresses of one
// ldmatrix phase then fall into 8 distinct groups of 4 banks (no bank conflicts, no swizzle needed).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/mma_layout.h"

namespace mta::cuda::mma {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 reads nothing and fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
// The same copy without the source-size operand, for rows known to be in range: the forward kernels'
// row loaders take it when a whole tile lies inside [0, T) (a warp-uniform test), the zero-filling
// form otherwise (forward -2 to -3%; in the backward kernels it cost spills and up to 8%).
// Session 21: ncu counted the zero-fill form's copies at 15-77% of the kernels' excess shared
// wavefronts and their global sectors as uncoalesced, on rows that are contiguous 128-byte lines.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
}
// dst[0..1] += (x, y): one vector reduction on sm_90 (8-byte aligned dst), two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// A 16 x 16 product in the mma accumulator layout (acc[j][2 r + e] at row g + 8 r, column 8 j + 2 t + e
// of lane 4 g + t), times `scale`, added atomically to rows row0 .. row0 + 15 (stride ld floats) and
// columns col0 .. col0 + 15 of dst; rows at or past `rows` are skipped.
__device__ __forceinline__ void atomic_add_tile(float* dst, const float (&acc)[2][4], int row0, int col0, int rows,
                                                int ld, int lane, float scale = 1.f) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + g + 8 * r;
      if (row < rows)
        atomic_add2(dst + static_cast<size_t>(row) * ld + col0 + 8 * j + 2 * t, acc[j][2 * r] * scale,
                    acc[j][2 * r + 1] * scale);
    }
}

// 4-byte global -> shared copy (through L1); src_bytes = 0 fills the 4 bytes with zeros.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// Two 8 x 8 matrices: lanes 0 .. 15 give the row addresses (a_offset's first two: the registers a0, a1
// of an A operand, its rows 0 .. 15 at one 8-column block).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p))
               : "memory");
}

// Two 8 x 8 matrices, transposed: lanes 0 .. 15 give the row addresses (at_offset's first two: the
// first 8 columns of a transposed A operand, i.e. the registers a0, a1 of the 16 x 8 x 8 forms below).
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p))
               : "memory");
}

// c += a * b (16 x 8 x 16, fp32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a * b with fp16 operands (16 x 8 x 16, fp32 accumulators).
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The 16 x 8 x 8 forms: a0, a1 are the first two registers of a 16 x 16 A fragment (its columns 0 .. 7),
// b0 the first of a B fragment (its rows 0 .. 7). For a product whose k rows 8 .. 15 are known zeros,
// half the tensor-core work of the k16 form.
__device__ __forceinline__ void mma_bf16_k8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(b0));
}
__device__ __forceinline__ void mma_f16_k8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(b0));
}

// Two floats -> one b32 holding two fp16 (lo in the low half), round to nearest.
__device__ __forceinline__ uint32_t pack_f16(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two floats -> one b32 holding two bf16 (lo in the low half), round to nearest even.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The ldmatrix address patterns (a_offset, bnk_offset, bkn_offset, at_offset) are in mma_layout.h,
// callable from the host too (tests/test_head_mix_mma.cpp replays the fragment mechanics with them).

// Copies a kRows x kD bf16 tile (global rows `gstride` elements apart, a multiple of 8; contiguous by
// default) into shared memory with row stride `stride`; rows >= rows_valid are zero-filled (and not
// read). The tile's row 0 must be a valid row (it is also the dummy source address of zero-filled chunks).
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile_async(bf16* smem, int stride, const bf16* gmem, int rows_valid, int tid,
                                                long long gstride = kD) {
  constexpr int kChunksPerRow = kD / 8;  // 16-byte chunks
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int c = tid; c < kChunks; c += kThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = r < rows_valid;
    const bf16* src = ok ? gmem + r * gstride + col : gmem;
    cp_async_16(smem + r * stride + col, src, ok ? 16 : 0);
  }
}

// A warp's product acc = A B^T with A = 16 rows x K and B = N rows x K, both bf16 row-major in shared
// memory with row stride S (A at sA, B at sB: e.g. S = Q K^T, dP = dO V^T). acc is in the mma
// accumulator layout: acc[j] holds columns 8j .. 8j + 7.
template <int N, int K, int S>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[N / 8][4], const bf16* sA, const bf16* sB, int lane) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, sA + a_offset(lane, 0, kk * 16, S));
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];
      ldmatrix_x4(b, sB + bnk_offset(lane, nn * 16, kk * 16, S));
      mma_bf16(acc[2 * nn], a, b[0], b[1]);
      mma_bf16(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

}  // namespace mta::cuda::mma
