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

}  // namespace mta::cuda
