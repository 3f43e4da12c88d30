#pragma once
// Row-major GEMM on OpenBLAS for float and double: C = alpha * op(A) @ op(B) + beta * C,
// op(A) is M x K, op(B) is K x N. Called inside OpenMP regions, OpenBLAS (OpenMP build) runs
// single-threaded; called outside, it uses all threads.
#include <cblas.h>

namespace mta {

// Our OpenMP loops call GEMM from inside parallel regions, which the OpenMP build of OpenBLAS runs
// single-threaded. A pthreads build would start its own threads there too (measured: 12x slower
// training at 16 threads), so with any other build BLAS is kept to one thread.
inline void blas_avoid_oversubscription() {
  if (openblas_get_parallel() != 2) openblas_set_num_threads(1);
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta,
          T* C, int ldc);

template <>
inline void gemm<float>(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
                        int ldb, float beta, float* C, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B,
              ldb, beta, C, ldc);
}

template <>
inline void gemm<double>(bool ta, bool tb, int M, int N, int K, double alpha, const double* A, int lda,
                         const double* B, int ldb, double beta, double* C, int ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B,
              ldb, beta, C, ldc);
}

}  // namespace mta
