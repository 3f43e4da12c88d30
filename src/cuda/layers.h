#pragma once
// CUDA kernels of the Transformer's non-attention layers (launch API; kernels in layers.cu).
//
// Precision (see docs/architecture.md): the residual stream and its gradient are fp32; inputs of
// matrix products (normalized activations, q/k/v, attention output, SwiGLU) are bf16; master weights,
// gradients and AdamW moments are fp32, with a bf16 copy of each weight for the matrix products.
// All pointers are device pointers; every launcher checks the launch and throws std::runtime_error.
// Layouts match the CPU kernels (src/model/layers_cpu.h): rows are tokens (N = B * T).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace mta::cuda {

using bf16 = __nv_bfloat16;

// x[n, :] = E[tokens[n], :]  (E: fp32 master weights [V, C]).
void embedding_forward(const int32_t* tokens, const float* E, float* x, int N, int C, cudaStream_t s);
// dE[tokens[n], :] += dx[n, :].
void embedding_backward(const int32_t* tokens, const float* dx, float* dE, int N, int C, cudaStream_t s);

// y = x / sqrt(mean(x^2) + eps) * w (y bf16), rstd[N] saved.
void rmsnorm_forward(const float* x, const float* w, bf16* y, float* rstd, int N, int C, float eps, cudaStream_t s);
// dx_acc += d/dx, dw += d/dw (deterministic: per-block partial sums reduced in a fixed order).
// `scratch` holds at least rmsnorm_backward_scratch_floats(N, C) floats.
size_t rmsnorm_backward_scratch_floats(int N, int C);
void rmsnorm_backward(const bf16* dy, const float* x, const float* w, const float* rstd, float* dx_acc, float* dw,
                      float* scratch, int N, int C, cudaStream_t s);

// RoPE's rotations as a table: for position t < T and pair i < d/2, the cos and sin of the angle
// t * theta^(-2i/d), computed in double and rounded to float exactly as the head kernels compute them
// without a table, at cs[2 * (t * d/2 + i)] (cos) and cs[2 * (t * d/2 + i) + 1] (sin).
struct RopeTable {
  const float* cs = nullptr;  // device, rope_table_floats(T, d) floats, 32-byte aligned (as from cudaMalloc)
  int T = 0, d = 0;
  double theta = 0;
};
size_t rope_table_floats(int T, int d);
// Fills `cs` (rope_table_floats(T, d) floats, 32-byte aligned) on stream s and describes it. d even.
RopeTable make_rope_table(float* cs, int T, int d, double theta, cudaStream_t s);

// [B, T, H, d] (a linear layer's output) -> [B, H, T, d], applying RoPE when `rope` (interleaved
// pairs, angle t * theta^(-2i/d), as rope_apply on the CPU).
// `row_stride`: elements between consecutive tokens on the token-major side (0: dense, H * d; else
// >= H * d), so that q, k and v can be read from one [N, 3C] product (x = qkv + j * C, row_stride = 3C).
// `table`: with RoPE, read the rotations from a table of the same d and theta and at least T positions
// (the results are the same bits as without one, where the kernel computes every angle in double).
void to_heads(const bf16* x, bf16* y, int B, int T, int H, int d, bool rope, double theta, cudaStream_t s,
              long long row_stride = 0, const RopeTable* table = nullptr);
// [B, H, T, d] -> [B, T, H, d], applying the inverse rotation when `rope` (for gradients); `row_stride`
// (of x, the token-major output: elements between its rows are not written) and `table` as for to_heads.
void from_heads(const bf16* y, bf16* x, int B, int T, int H, int d, bool rope, double theta, cudaStream_t s,
                long long row_stride = 0, const RopeTable* table = nullptr);

// RoPE in place on token-major rows: columns 0 .. H*d - 1 of each of the B*T rows (`row_stride` elements
// apart, a multiple of 8) are H heads of d, rotated as to_heads rotates them (the same bits), with the
// table's rotations. d a multiple of 8, x 16-byte aligned. The model's standard-attention layers rotate
// q and k (2C columns of the [N, 3C] product) in place and let the flash kernels read them there.
void rope_rows(bf16* x, int B, int T, int H, int d, long long row_stride, const RopeTable& table, cudaStream_t s);

// g = silu(a) * b; backward writes da, db.
void swiglu_forward(const bf16* a, const bf16* b, bf16* g, long long n, cudaStream_t s);
void swiglu_backward(const bf16* dg, const bf16* a, const bf16* b, bf16* da, bf16* db, long long n, cudaStream_t s);
// The same on [rows, cols] matrices whose a and b (and da, db) have row stride `ld` (>= cols), e.g. the
// two halves of one [N, 2F] product: a = h, b = h + F, ld = 2F (and da = dh, db = dh + F). g and dg are
// dense [rows, cols]. Bit-identical to the dense functions on the same values.
void swiglu_forward_strided(const bf16* a, const bf16* b, long long ld, bf16* g, int rows, int cols, cudaStream_t s);
void swiglu_backward_strided(const bf16* dg, const bf16* a, const bf16* b, long long ld, bf16* da, bf16* db, int rows,
                             int cols, cudaStream_t s);

// out = x + dropout(y) with the CPU's mask (hash_uniform(seed, i) >= p keeps, scaled 1/(1-p)).
void residual_dropout_forward(const float* x, const float* y, float* out, long long n, float p, uint64_t seed,
                              cudaStream_t s);
// dy = dropout(dout) as bf16 (the input of the next matrix-product gradient).
void dropout_to_bf16(const float* dout, bf16* dy, long long n, float p, uint64_t seed, cudaStream_t s);

// Cross-entropy of R rows of fp32 logits [R, V]: loss[r] = w[r] * (logsumexp - logit[target]) (0 where
// w = 0), argmax[r] (may be null), and when dlogits is not null, dlogits = grad_scale * w * (softmax -
// onehot) in bf16.
void cross_entropy(const float* logits, const int32_t* targets, const float* weights, float grad_scale, float* loss,
                   int32_t* argmax, bf16* dlogits, int R, int V, cudaStream_t s);

// AdamW on fp32 master weights, writing the bf16 copy too (p_bf16 may be null). decay[i] != 0 where
// weight decay applies. The same arithmetic as AdamW::update (src/train/optimizer.cpp), operation by
// operation: lr, weight_decay, bc1 = 1 - beta1^step and bc2 = 1 - beta2^step are doubles, as there, so
// that step size and decay factor round to the same floats and p, m, v equal the CPU's bit for bit
// (when the CPU build does not contract the update into FMAs).
void adamw_update(float* p, bf16* p_bf16, const float* g, float* m, float* v, const uint8_t* decay, long long n,
                  double lr, float beta1, float beta2, float eps, double weight_decay, double bc1, double bc2,
                  cudaStream_t s);
// Sum of squares of g (deterministic), written to *out (device double).
size_t sum_squares_scratch_doubles(long long n);
void sum_squares(const float* g, long long n, double* out, double* scratch, cudaStream_t s);
void scale(float* g, long long n, float factor, cudaStream_t s);

void cast_to_bf16(const float* x, bf16* y, long long n, cudaStream_t s);
void cast_to_f32(const bf16* x, float* y, long long n, cudaStream_t s);

}  // namespace mta::cuda
