#pragma once
// CPU kernels of the Transformer's non-attention layers, forward and backward, row-major, for
// T = T (training) and double (finite-difference tests).
// Backward functions ADD into parameter gradients (dW, dw) and, where named d*_acc, into input
// gradients; the others overwrite. N is the number of rows (batch * tokens).
#include <cstdint>

namespace mta::cpu {

// y = x W^T: x [N, in], W [out, in], y [N, out].
template <typename T>
void linear_forward(const T* x, const T* W, T* y, int N, int in, int out);
// dx (overwritten, or added when accumulate) = dy W; dW += dy^T x.
template <typename T>
void linear_backward(const T* dy, const T* x, const T* W, T* dx, T* dW, int N, int in, int out,
                     bool accumulate_dx = false);

// y = x / sqrt(mean(x^2) + eps) * w; rstd [N] saved for backward.
template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, int N, int C, T eps);
template <typename T>
void rmsnorm_backward(const T* dy, const T* x, const T* w, const T* rstd, T* dx_acc, T* dw,
                      int N, int C);

// Rotary position embedding on [B, H, T, d] in place, interleaved pairs (x[2i], x[2i+1]) rotated by
// t * theta^(-2i/d) (Llama / Lingua convention). inverse = true applies the transpose (backward).
// Row t of each head sits at position pos0 + t (incremental decoding rotates a new token at its
// place in the sequence).
template <typename T>
void rope_apply(T* x, int B, int H, int seq, int d, double theta, bool inverse, int pos0 = 0);

// g = silu(a) * b; backward gives da, db (overwritten).
template <typename T>
void swiglu_forward(const T* a, const T* b, T* g, long long n);
template <typename T>
void swiglu_backward(const T* dg, const T* a, const T* b, T* da, T* db, long long n);

// [B, T, H, d] (tokens-major, as a linear layer writes it) <-> [B, H, T, d] (heads-major, as attention reads it).
template <typename T>
void to_heads(const T* x, T* y, int B, int seq, int H, int d);
template <typename T>
void from_heads(const T* y, T* x, int B, int seq, int H, int d);

// Dropout with a mask that is a pure function of (seed, index): x *= keep / (1 - p), in place.
// The same call with the same seed applies the same mask (used again on the gradient in backward).
template <typename T>
void dropout_apply(T* x, long long n, float p, uint64_t seed);

}  // namespace mta::cpu
