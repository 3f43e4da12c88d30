#pragma once
// Matrix products on cuBLASLt, row-major like mta::gemm on the CPU:
//   C = alpha * op(A) @ op(B) + beta * C,  op(A) M x K, op(B) K x N, A and B bf16, fp32 accumulation,
// C bf16 or fp32. One handle and workspace per device, created on first use.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mta::cuda {

void gemm_bf16(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
               const __nv_bfloat16* B, int ldb, float beta, float* C, int ldc, cudaStream_t s);
void gemm_bf16(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
               const __nv_bfloat16* B, int ldb, float beta, __nv_bfloat16* C, int ldc, cudaStream_t s);

// D = op(A) @ op(B) + C in fp32, C and D distinct [M, N] matrices with leading dimension ldc: a residual
// connection added in the product's epilogue (the same fp32 sum as the product into a temporary, then
// an addition), one pass over C and D instead of three.
void gemm_bf16_add(bool trans_a, bool trans_b, int M, int N, int K, const __nv_bfloat16* A, int lda,
                   const __nv_bfloat16* B, int ldb, const float* C, float* D, int ldc, cudaStream_t s);

}  // namespace mta::cuda
