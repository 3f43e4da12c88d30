#pragma once
// CPU kernels of the Transformer's non-attention layers, forward and backward, row-major, for
// T = T (training) and double (finite-difference tests).
// Backward functions ADD into parameter gradients (dW, dw) and, where named d*_acc, into input
// gradients; the others overwrite. N is the number of rows (batch * tokens).
#include <cstdint>
#include <vector>

namespace mta::cpu {

// y = x W^T: x [N, in], W [out, in], y [N, out].
template <typename T>
void linear_forward(const T* x, const T* W, T* y, int N, int in, int out);
// dx (overwritten, or added when accumulate) = dy W; dW += dy^T x.
template <typename T>
void linear_backward(const T* dy, const T* x, const T* W, T* dx, T* dW, int N, int in, int out,
                     bool accumulate_dx = false);
// The two halves of linear_backward, for callers that split the work themselves: dx = dy W (or
// +=), and rows [o0, o1) of dW += dy^T x (a sum over all N rows).
template <typename T>
void linear_backward_input(const T* dy, const T* W, T* dx, int N, int in, int out, bool accumulate_dx = false);
template <typename T>
void linear_backward_weight(const T* dy, const T* x, T* dW, int N, int in, int out, int o0, int o1);

// y = x / sqrt(mean(x^2) + eps) * w; rstd [N] saved for backward.
template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, int N, int C, T eps);
template <typename T>
void rmsnorm_backward(const T* dy, const T* x, const T* w, const T* rstd, T* dx_acc, T* dw,
                      int N, int C);

// Rotary position embedding: interleaved pairs (x[2i], x[2i+1]) of a head vector at position t
// rotated by t * theta^(-2i/d) (Llama / Lingua convention). The table holds cos and sin of those
// angles for positions pos0 .. pos0 + seq - 1 (computed in double, then rounded), built once per shape;
// row t of the table is position pos0 + t (incremental decoding rotates a new token at its place).
template <typename T>
struct RopeTable {
  int seq = 0, half = 0;
  std::vector<T> cos, sin;  // [seq, half]
  RopeTable(int seq, int d, double theta, int pos0 = 0);
};
// RoPE on [B, H, T, d] in place, row t at position pos0 + t; inverse = true applies the transpose
// (backward).
template <typename T>
void rope_apply(T* x, int B, int H, int seq, int d, double theta, bool inverse, int pos0 = 0);

// g = silu(a) * b; backward gives da, db (overwritten).
template <typename T>
void swiglu_forward(const T* a, const T* b, T* g, long long n);
template <typename T>
void swiglu_backward(const T* dg, const T* a, const T* b, T* da, T* db, long long n);

// [B, T, H, d] (tokens-major, as a linear layer writes it) <-> [B, H, T, d] (heads-major, as attention
// reads it). With a RoPE table, to_heads also applies RoPE and from_heads its inverse (the gradient's
// way back), in the same pass.
template <typename T>
void to_heads(const T* x, T* y, int B, int seq, int H, int d, const RopeTable<T>* rope = nullptr);
template <typename T>
void from_heads(const T* y, T* x, int B, int seq, int H, int d, const RopeTable<T>* rope = nullptr);
// The same for the token rows [n0, n1) only (n = b * seq + t), serially: for callers that split the
// tokens over threads themselves.
template <typename T>
void to_heads_tokens(const T* x, T* y, int seq, int H, int d, const RopeTable<T>* rope, long long n0, long long n1);
template <typename T>
void from_heads_tokens(const T* y, T* x, int seq, int H, int d, const RopeTable<T>* rope, long long n0, long long n1);

// Dropout with a mask that is a pure function of (seed, index): x *= keep / (1 - p), in place.
// The same call with the same seed applies the same mask (used again on the gradient in backward).
// x[i] has the index first + i (a slice of a larger tensor gets that tensor's mask).
template <typename T>
void dropout_apply(T* x, long long n, float p, uint64_t seed, long long first = 0);

}  // namespace mta::cpu
