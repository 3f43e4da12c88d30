#include "model/layers_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/attention_op.h"
#include "util/blas.h"
#include "util/fast_exp.h"

namespace mta::cpu {

template <typename T>
void linear_forward(const T* x, const T* W, T* y, int N, int in, int out) {
  gemm<T>(false, true, N, out, in, T(1), x, in, W, in, T(0), y, out);
}

template <typename T>
void linear_backward(const T* dy, const T* x, const T* W, T* dx, T* dW, int N, int in, int out,
                     bool accumulate_dx) {
  if (dx) linear_backward_input(dy, W, dx, N, in, out, accumulate_dx);
  linear_backward_weight(dy, x, dW, N, in, out, 0, out);
}

template <typename T>
void linear_backward_input(const T* dy, const T* W, T* dx, int N, int in, int out, bool accumulate_dx) {
  gemm<T>(false, false, N, in, out, T(1), dy, out, W, in, accumulate_dx ? T(1) : T(0), dx, in);
}

template <typename T>
void linear_backward_weight(const T* dy, const T* x, T* dW, int N, int in, int out, int o0, int o1) {
  if (o1 > o0) gemm<T>(true, false, o1 - o0, in, N, T(1), dy + o0, out, x, in, T(1), dW + static_cast<long long>(o0) * in, in);
}

template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, int N, int C, T eps) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* xr = x + static_cast<long long>(n) * C;
    T* yr = y + static_cast<long long>(n) * C;
    T ms = 0;
    for (int c = 0; c < C; ++c) ms += xr[c] * xr[c];
    const T r = T(1) / std::sqrt(ms / C + eps);
    rstd[n] = r;
    for (int c = 0; c < C; ++c) yr[c] = xr[c] * r * w[c];
  }
}

template <typename T>
void rmsnorm_backward(const T* dy, const T* x, const T* w, const T* rstd, T* dx_acc, T* dw,
                      int N, int C) {
  // dw needs a sum over rows: per-thread partial sums, combined in thread order for determinism.
  const int nt = omp_get_max_threads();
  std::vector<std::vector<T>> part(nt, std::vector<T>(C, T(0)));
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    std::vector<T>& dwp = part[t];
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const T* xr = x + static_cast<long long>(n) * C;
      const T* dyr = dy + static_cast<long long>(n) * C;
      T* dxr = dx_acc + static_cast<long long>(n) * C;
      const T r = rstd[n];
      T dot = 0;
      for (int c = 0; c < C; ++c) {
        dwp[c] += dyr[c] * xr[c] * r;
        dot += dyr[c] * w[c] * xr[c];
      }
      const T k = r * r * r * dot / C;
      for (int c = 0; c < C; ++c) dxr[c] += r * dyr[c] * w[c] - xr[c] * k;
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int c = 0; c < C; ++c) dw[c] += part[t][c];
}

template <typename T>
RopeTable<T>::RopeTable(int seq_, int d, double theta, int pos0) : seq(seq_), half(d / 2) {
  cos.resize(static_cast<size_t>(seq) * half), sin.resize(cos.size());
  for (int t = 0; t < seq; ++t)
    for (int i = 0; i < half; ++i) {
      const double ang = static_cast<double>(pos0 + t) * std::pow(theta, -2.0 * i / d);
      cos[static_cast<size_t>(t) * half + i] = static_cast<T>(std::cos(ang));
      sin[static_cast<size_t>(t) * half + i] = static_cast<T>(std::sin(ang));
    }
}

namespace {

// dst = src rotated by RoPE at position t (inverse: by -angle); dst may equal src.
template <typename T>
void rope_row(const T* src, T* dst, const RopeTable<T>& rope, int t, bool inverse) {
  const T* c = rope.cos.data() + static_cast<size_t>(t) * rope.half;
  const T* s = rope.sin.data() + static_cast<size_t>(t) * rope.half;
  const T sign = inverse ? T(-1) : T(1);
  for (int i = 0; i < rope.half; ++i) {
    const T a = src[2 * i], b = src[2 * i + 1], si = sign * s[i];
    dst[2 * i] = a * c[i] - b * si;
    dst[2 * i + 1] = a * si + b * c[i];
  }
}

}  // namespace

template <typename T>
void rope_apply(T* x, int B, int H, int seq, int d, double theta, bool inverse, int pos0) {
  const RopeTable<T> rope(seq, d, theta, pos0);
#pragma omp parallel for collapse(2) schedule(static)
  for (int bh = 0; bh < B * H; ++bh)
    for (int t = 0; t < seq; ++t) {
      T* row = x + (static_cast<long long>(bh) * seq + t) * d;
      rope_row(row, row, rope, t, inverse);
    }
}

template <typename T>
void swiglu_forward(const T* a, const T* b, T* g, long long n) {
#pragma omp parallel for schedule(static)
  for (long long i = 0; i < n; ++i) {
    const T sig = T(1) / (T(1) + exp_vec(-a[i]));
    g[i] = a[i] * sig * b[i];
  }
}

template <typename T>
void swiglu_backward(const T* dg, const T* a, const T* b, T* da, T* db, long long n) {
#pragma omp parallel for schedule(static)
  for (long long i = 0; i < n; ++i) {
    const T sig = T(1) / (T(1) + exp_vec(-a[i]));
    const T silu = a[i] * sig;
    db[i] = dg[i] * silu;
    da[i] = dg[i] * b[i] * sig * (T(1) + a[i] * (T(1) - sig));
  }
}

template <typename T>
void to_heads_tokens(const T* x, T* y, int seq, int H, int d, const RopeTable<T>* rope, long long n0, long long n1) {
  for (long long n = n0; n < n1; ++n) {
    const long long b = n / seq;
    const int t = static_cast<int>(n % seq);
    for (int h = 0; h < H; ++h) {
      const T* src = x + (n * H + h) * d;
      T* dst = y + ((b * H + h) * seq + t) * d;
      if (rope)
        rope_row(src, dst, *rope, t, false);
      else
        std::copy_n(src, d, dst);
    }
  }
}

template <typename T>
void from_heads_tokens(const T* y, T* x, int seq, int H, int d, const RopeTable<T>* rope, long long n0, long long n1) {
  for (long long n = n0; n < n1; ++n) {
    const long long b = n / seq;
    const int t = static_cast<int>(n % seq);
    for (int h = 0; h < H; ++h) {
      const T* src = y + ((b * H + h) * seq + t) * d;
      T* dst = x + (n * H + h) * d;
      if (rope)
        rope_row(src, dst, *rope, t, true);
      else
        std::copy_n(src, d, dst);
    }
  }
}

template <typename T>
void to_heads(const T* x, T* y, int B, int seq, int H, int d, const RopeTable<T>* rope) {
#pragma omp parallel for schedule(static)
  for (long long n = 0; n < static_cast<long long>(B) * seq; ++n) to_heads_tokens(x, y, seq, H, d, rope, n, n + 1);
}

template <typename T>
void from_heads(const T* y, T* x, int B, int seq, int H, int d, const RopeTable<T>* rope) {
#pragma omp parallel for schedule(static)
  for (long long n = 0; n < static_cast<long long>(B) * seq; ++n) from_heads_tokens(y, x, seq, H, d, rope, n, n + 1);
}

template <typename T>
void dropout_apply(T* x, long long n, float p, uint64_t seed, long long first) {
  if (p <= T(0)) return;
  const T scale = T(1) / (T(1) - p);
#pragma omp parallel for schedule(static)
  for (long long i = 0; i < n; ++i)
    x[i] *= hash_uniform(seed, static_cast<unsigned long long>(first + i)) >= p ? scale : T(0);
}

#define MTA_INSTANTIATE(T)                                                                                   \
  template void linear_forward<T>(const T*, const T*, T*, int, int, int);                                  \
  template void linear_backward<T>(const T*, const T*, const T*, T*, T*, int, int, int, bool);             \
  template void linear_backward_input<T>(const T*, const T*, T*, int, int, int, bool);                     \
  template void linear_backward_weight<T>(const T*, const T*, T*, int, int, int, int, int);                \
  template void rmsnorm_forward<T>(const T*, const T*, T*, T*, int, int, T);                               \
  template void rmsnorm_backward<T>(const T*, const T*, const T*, const T*, T*, T*, int, int);             \
  template void rope_apply<T>(T*, int, int, int, int, double, bool, int);                                  \
  template void swiglu_forward<T>(const T*, const T*, T*, long long);                                      \
  template void swiglu_backward<T>(const T*, const T*, const T*, T*, T*, long long);                       \
  template struct RopeTable<T>;                                                                             \
  template void to_heads<T>(const T*, T*, int, int, int, int, const RopeTable<T>*);                        \
  template void from_heads<T>(const T*, T*, int, int, int, int, const RopeTable<T>*);                      \
  template void to_heads_tokens<T>(const T*, T*, int, int, int, const RopeTable<T>*, long long, long long); \
  template void from_heads_tokens<T>(const T*, T*, int, int, int, const RopeTable<T>*, long long, long long); \
  template void dropout_apply<T>(T*, long long, float, uint64_t, long long);
MTA_INSTANTIATE(float)
MTA_INSTANTIATE(double)
#undef MTA_INSTANTIATE

}  // namespace mta::cpu
