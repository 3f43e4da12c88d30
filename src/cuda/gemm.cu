// Row-major matrix products on cuBLASLt (see gemm.h).
//
// cuBLASLt is column-major. A row-major matrix X (r x c, leading dimension ld) is, read column-major,
// X^T (c x r, same ld). So the row-major product C = op(A) op(B) (M x N) is computed as the
// column-major product C^T = op(B)^T op(A)^T (N x M): cuBLASLt's "A" is our B and its "B" is our A,
// with the same transpose flags, and m = N, n = M, k = K.
//
// Per device, created on first use and kept for the life of the process: one cuBLASLt handle and one
// 32 MiB workspace. The workspace is shared by every call on that device, so products on different
// streams of one device must not run concurrently (the training path uses one stream); host threads
// are serialized by a mutex. The algorithm is chosen by cublasLtMatmulAlgoGetHeuristic and cached
// per (device, shape, leading dimensions, output type, pointer alignments).
#include "cuda/gemm.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/check.h"

namespace mta::cuda {
namespace {


void check_cublas(cublasStatus_t st, const char* what, const char* file, int line) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": cuBLASLt error in " + what + ": " +
                             cublasLtGetStatusName(st) + " (" + cublasLtGetStatusString(st) + ")");
}

#define CUDA_CHECK(expr) check_cuda((expr), #expr, __FILE__, __LINE__)
#define CUBLAS_CHECK(expr) check_cublas((expr), #expr, __FILE__, __LINE__)

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

// (trans_a, trans_b, M, N, K, lda, ldb, ldc, output type, alignment of A, B, C)
using AlgoKey = std::tuple<bool, bool, int, int, int, int, int, int, int, unsigned, unsigned, unsigned>;

struct DeviceState {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::map<AlgoKey, cublasLtMatmulHeuristicResult_t> algos;
};

std::mutex g_mutex;
// Never destroyed: the handles and workspaces live until the process ends (destroying them from a
// static destructor could run after the CUDA runtime has shut down).
std::map<int, DeviceState>* g_states = new std::map<int, DeviceState>();

// Called with g_mutex held.
DeviceState& state_for(int device) {
  DeviceState& st = (*g_states)[device];
  if (!st.handle) {
    CUBLAS_CHECK(cublasLtCreate(&st.handle));
    CUDA_CHECK(cudaMalloc(&st.workspace, kWorkspaceBytes));
  }
  return st;
}

// Largest power of two (at most 256) dividing the address: the alignment cuBLASLt may assume.
unsigned alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  unsigned r = 256;
  while (r > 1 && a % r != 0) r >>= 1;
  return r;
}

// RAII owners of the cuBLASLt descriptors.
struct OpDesc {
  cublasLtMatmulDesc_t d = nullptr;
  OpDesc() { CUBLAS_CHECK(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F)); }
  ~OpDesc() { cublasLtMatmulDescDestroy(d); }
  OpDesc(const OpDesc&) = delete;
  OpDesc& operator=(const OpDesc&) = delete;
};
struct Layout {
  cublasLtMatrixLayout_t d = nullptr;
  Layout(cudaDataType t, int rows, int cols, int ld) {
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d, t, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols),
                                            static_cast<int64_t>(ld)));
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(d); }
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;
};
struct Pref {
  cublasLtMatmulPreference_t d = nullptr;
  Pref() { CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d)); }
  ~Pref() { cublasLtMatmulPreferenceDestroy(d); }
  Pref(const Pref&) = delete;
  Pref& operator=(const Pref&) = delete;
};

// D = beta * C (K = 0: the product is empty); beta = 0 writes zeros without reading C.
template <typename T>
__global__ void scale_matrix_kernel(const T* C, T* D, int M, int N, int ldc, float beta) {
  const long long total = static_cast<long long>(M) * N;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long off = (idx / N) * ldc + idx % N;
    D[off] = beta == 0.0f ? T(0.0f) : T(beta * static_cast<float>(C[off]));
  }
}

std::string shape_str(bool ta, bool tb, int M, int N, int K, int lda, int ldb, int ldc) {
  return "trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb) + " M=" + std::to_string(M) +
         " N=" + std::to_string(N) + " K=" + std::to_string(K) + " lda=" + std::to_string(lda) +
         " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc);
}

// D = alpha op(A) op(B) + beta C, C and D with the same leading dimension (C == D: in place).
template <typename OutT>
void gemm_impl(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
               const __nv_bfloat16* B, int ldb, float beta, const OutT* C, OutT* D, int ldc, cudaStream_t s,
               cudaDataType ctype) {
  // Row-major shapes of the stored matrices: A is M x K (K x M when trans_a), B is K x N (N x K when
  // trans_b), C is M x N.
  const int a_cols = trans_a ? M : K, b_cols = trans_b ? K : N;
  if (M < 0 || N < 0 || K < 0 || lda < std::max(1, a_cols) || ldb < std::max(1, b_cols) || ldc < std::max(1, N))
    throw std::invalid_argument("mta::cuda::gemm_bf16: invalid shape or leading dimension (" +
                                shape_str(trans_a, trans_b, M, N, K, lda, ldb, ldc) + ")");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    const long long total = static_cast<long long>(M) * N;
    const unsigned blocks = static_cast<unsigned>(std::min<long long>((total + 255) / 256, 1 << 16));
    scale_matrix_kernel<OutT><<<blocks, 256, 0, s>>>(C, D, M, N, ldc, beta);
    CUDA_CHECK(cudaGetLastError());
    return;
  }

  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceState& st = state_for(device);

  OpDesc op;
  // cuBLASLt's A is our B, its B is our A.
  const cublasOperation_t op_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.d, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.d, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  // Column-major shapes as stored: our B is b_cols x (rows of B), our A is a_cols x (rows of A).
  const Layout la(CUDA_R_16BF, b_cols, trans_b ? N : K, ldb);
  const Layout lb(CUDA_R_16BF, a_cols, trans_a ? K : M, lda);
  const Layout lc(ctype, N, M, ldc);

  const unsigned align_a = alignment_of(B), align_b = alignment_of(A),
                 align_c = std::min(alignment_of(C), alignment_of(D));
  const AlgoKey key{trans_a, trans_b, M, N, K, lda, ldb, ldc, static_cast<int>(ctype), align_a, align_b, align_c};
  auto it = st.algos.find(key);
  if (it == st.algos.end()) {
    Pref pref;
    const uint64_t ws = kWorkspaceBytes;
    CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    // Split-K partial sums are reduced in fp32 (in place or in the workspace), never in the output
    // type: a bf16 reduction would round every partial sum.
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes,
                                                      sizeof(schemes)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                      sizeof(align_a)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                      sizeof(align_b)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                      sizeof(align_c)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                                      sizeof(align_c)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(st.handle, op.d, la.d, lb.d, lc.d, lc.d, pref.d, 1, &result, &found));
    if (found < 1 || result.state != CUBLAS_STATUS_SUCCESS)
      throw std::runtime_error(std::string(__FILE__) + ":" + std::to_string(__LINE__) +
                               ": cuBLASLt found no algorithm for gemm_bf16 (" +
                               shape_str(trans_a, trans_b, M, N, K, lda, ldb, ldc) + ", output " +
                               (ctype == CUDA_R_32F ? "fp32" : "bf16") + ")");
    if (st.algos.size() >= 4096) st.algos.clear();  // bound the cache
    it = st.algos.emplace(key, result).first;
  }
  const cublasLtMatmulHeuristicResult_t& r = it->second;
  CUBLAS_CHECK(cublasLtMatmul(st.handle, op.d, &alpha, B, la.d, A, lb.d, &beta, C, lc.d, D, lc.d, &r.algo,
                              st.workspace, r.workspaceSize, s));
}

}  // namespace

void gemm_bf16(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
               const __nv_bfloat16* B, int ldb, float beta, float* C, int ldc, cudaStream_t s) {
  gemm_impl<float>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, C, ldc, s, CUDA_R_32F);
}

void gemm_bf16_add(bool trans_a, bool trans_b, int M, int N, int K, const __nv_bfloat16* A, int lda,
                   const __nv_bfloat16* B, int ldb, const float* C, float* D, int ldc, cudaStream_t s) {
  gemm_impl<float>(trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, 1.0f, C, D, ldc, s, CUDA_R_32F);
}

void gemm_bf16(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
               const __nv_bfloat16* B, int ldb, float beta, __nv_bfloat16* C, int ldc, cudaStream_t s) {
  gemm_impl<__nv_bfloat16>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, C, ldc, s, CUDA_R_16BF);
}

}  // namespace mta::cuda
