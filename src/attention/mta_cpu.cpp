#include "attention/mta_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "util/blas.h"
#include "util/error.h"
#include "util/fast_exp.h"

namespace mta::cpu {
namespace {

// Square T x T matrices are stored row-major, one per head. Only the causal part (j <= i) of a score
// or weight matrix is ever meaningful; the stages below read and write only that part, and buffers
// start zeroed so that the future part reads as the zero the semantics require.

// out[i, j] = sum_{a,c} W[a,c] * in[i-(cq-1)+a, j-o+c] for j <= i, where `in` is zero outside its
// causal part. One row i of the output.
template <typename T>
void conv_forward_row(const T* in, T* out, const T* W, const KqConv& kc, int n, int i) {
  const int cq = kc.q, ck = kc.k, o = kc.key_offset();
  T* orow = out + static_cast<long long>(i) * n;
  std::fill(orow, orow + i + 1, T(0));
  for (int a = 0; a < cq; ++a) {
    const int ii = i - (cq - 1) + a;
    if (ii < 0) continue;
    const T* irow = in + static_cast<long long>(ii) * n;
    for (int c = 0; c < ck; ++c) {
      const T w = W[a * ck + c];
      if (w == T(0)) continue;  // exact: inputs are finite
      const int shift = c - o;  // source column = j + shift, must lie in [0, ii]
      const int jlo = std::max(0, -shift), jhi = std::min(i, ii - shift);
      for (int j = jlo; j <= jhi; ++j) orow[j] += w * irow[j + shift];
    }
  }
}

// Adjoint of conv_forward_row over a whole row ii of the input: din[ii, jj] (jj <= ii) =
// sum_{a,c} W[a,c] * dout[ii+(cq-1)-a, jj+o-c], reading dout only where it is causal (j <= i).
template <typename T>
void conv_input_grad_row(const T* dout, T* din, const T* W, const KqConv& kc, int n, int ii) {
  const int cq = kc.q, ck = kc.k, o = kc.key_offset();
  T* drow_in = din + static_cast<long long>(ii) * n;
  std::fill(drow_in, drow_in + ii + 1, T(0));
  for (int a = 0; a < cq; ++a) {
    const int i = ii + (cq - 1) - a;
    if (i >= n) continue;
    const T* drow = dout + static_cast<long long>(i) * n;
    for (int c = 0; c < ck; ++c) {
      const T w = W[a * ck + c];
      if (w == T(0)) continue;
      const int shift = o - c;  // dout column j = jj + shift, must lie in [0, i]
      const int jlo = std::max(0, -shift), jhi = std::min(ii, i - shift);
      for (int jj = jlo; jj <= jhi; ++jj) drow_in[jj] += w * drow[jj + shift];
    }
  }
}

// dW[a,c] += sum_{i, j<=i} dout[i,j] * in[i-(cq-1)+a, j-o+c] for one head.
template <typename T>
void conv_weight_grad(const T* in, const T* dout, double* dW, const KqConv& kc, int n) {
  const int cq = kc.q, ck = kc.k, o = kc.key_offset();
  for (int a = 0; a < cq; ++a) {
    for (int c = 0; c < ck; ++c) {
      const int shift = c - o;
      double acc = 0;  // T^2/2 terms: a float accumulator would lose ~1e-5 relative at T = 64
      for (int i = 0; i < n; ++i) {
        const int ii = i - (cq - 1) + a;
        if (ii < 0) continue;
        const T* irow = in + static_cast<long long>(ii) * n;
        const T* drow = dout + static_cast<long long>(i) * n;
        const int jlo = std::max(0, -shift), jhi = std::min(i, ii - shift);
        T row = 0;
#pragma omp simd reduction(+ : row)
        for (int j = jlo; j <= jhi; ++j) row += drow[j] * irow[j + shift];
        acc += row;
      }
      dW[a * ck + c] += acc;
    }
  }
}

// Per-unit state: the score matrices of the coupled heads of one batch element.
template <typename T>
struct UnitBuffers {
  int G = 0, n = 0;
  std::vector<T> S0, C, A, A2, A3;  // per head, n*n each (empty when aliased)
  std::vector<T*> s0, c, a, a2, a3;  // per-head views after aliasing

  UnitBuffers(const AttentionSpec& spec, int heads, int n_) : G(heads), n(n_) {
    const size_t nn = static_cast<size_t>(n) * n * G;
    S0.assign(nn, T(0));
    if (spec.kq_pre) C.assign(nn, T(0));
    if (spec.head_pre || spec.kq_pre) A.assign(nn, T(0));  // holds C' then, in place, the softmax A
    if (spec.kq_post) A2.assign(nn, T(0));
    if (spec.head_post) A3.assign(nn, T(0));
    for (int h = 0; h < G; ++h) {
      const size_t off = static_cast<size_t>(h) * n * n;
      s0.push_back(S0.data() + off);
      c.push_back(spec.kq_pre ? C.data() + off : s0.back());
      a.push_back(!A.empty() ? A.data() + off : c.back());
      a2.push_back(spec.kq_post ? A2.data() + off : a.back());
      a3.push_back(spec.head_post ? A3.data() + off : a2.back());
    }
  }
};

// out[x] = sum_y M[x, y] * in[y] over the causal part of row i, for all heads of the unit.
// Heads are mixed within groups of g consecutive global heads; h0 is the unit's first global head.
template <typename T>
void mix_heads_row(const std::vector<T*>& in, const std::vector<T*>& out, const T* M, int g, int h0, int n, int i) {
  const int G = static_cast<int>(in.size());
  const long long row = static_cast<long long>(i) * n;
  for (int x = 0; x < G; ++x) {
    const int hx = h0 + x, grp = hx / g, xg = hx % g;
    const T* m = M + (static_cast<long long>(grp) * g + xg) * g;
    T* orow = out[x] + row;
    std::fill(orow, orow + i + 1, T(0));
    for (int y = 0; y < g; ++y) {
      const T w = m[y];
      if (w == T(0)) continue;
      const T* irow = in[grp * g + y - h0] + row;
      for (int j = 0; j <= i; ++j) orow[j] += w * irow[j];
    }
  }
}

// dM[grp, x, y] += sum_{i, j<=i} dout[x][i,j] * in[y][i,j] for the unit's groups.
template <typename T>
void mix_heads_weight_grad(const std::vector<T*>& in, const std::vector<T*>& dout, double* dM, int g, int h0, int n) {
  const int G = static_cast<int>(in.size());
  const int pairs = G * g;
#pragma omp parallel for schedule(static)
  for (int p = 0; p < pairs; ++p) {
    const int x = p / g, y = p % g;
    const int hx = h0 + x, grp = hx / g, xg = hx % g;
    const T* a = dout[x];
    const T* b = in[grp * g + y - h0];
    double acc = 0;  // summed per row, then across rows in double (see conv_weight_grad)
    for (int i = 0; i < n; ++i) {
      const long long row = static_cast<long long>(i) * n;
      T r = 0;
#pragma omp simd reduction(+ : r)
      for (int j = 0; j <= i; ++j) r += a[row + j] * b[row + j];
      acc += r;
    }
    dM[(static_cast<long long>(grp) * g + xg) * g + y] += acc;
  }
}

// Row softmax over j <= i, in place, on a row of len >= i + 1 entries whose entries i < j < len are
// set to 0 (a len rounded up to the vector width spares the loops their scalar tails).
template <typename T>
void softmax_row(T* p, int i, int len) {
  std::fill(p + std::min(i + 1, len), p + len, -std::numeric_limits<T>::infinity());  // exp -> 0
  // Vectorized reductions (omp simd): a fixed order for a given build, whatever the threads.
  T m = p[0];
#pragma omp simd reduction(max : m)
  for (int j = 0; j < len; ++j) m = p[j] > m ? p[j] : m;  // (std::max, taking a reference, does not vectorize)
  for (int j = 0; j < len; ++j) p[j] = exp_vec(p[j] - m);  // a loop of its own: it vectorizes
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < len; ++j) sum += p[j];
  const T inv = T(1) / sum;
  for (int j = 0; j < len; ++j) p[j] *= inv;
}

// Epilogue of one output row: group norm, depth scaling, gate. `o` holds A3 @ V on entry.
template <typename T>
void epilogue_forward_row(const AttentionSpec& spec, const AttnParams<T>& p, const T* o, T* out, int D) {
  std::copy(o, o + D, out);
  if (spec.norm) {
    T ms = 0;
    for (int d = 0; d < D; ++d) ms += o[d] * o[d];
    const T r = T(1) / std::sqrt(ms / T(D) + T(kGroupNormEps));
    for (int d = 0; d < D; ++d) out[d] = o[d] * r * p.norm[d];
  }
  if (spec.depth_scale_layer) {
    const T s = static_cast<T>(spec.depth_scale());
    for (int d = 0; d < D; ++d) out[d] *= s;
  }
  if (spec.gate) {
    T z = p.gate_b[0];
    for (int d = 0; d < D; ++d) z += out[d] * p.gate_w[d];
    z = T(1) / (T(1) + std::exp(-z));
    for (int d = 0; d < D; ++d) out[d] *= z;
  }
}

// Backward of epilogue_forward_row: turns dout into d(A3 @ V) in `dobuf`, adds parameter grads into
// the unit-local accumulators gn/gw/gb.
template <typename T>
void epilogue_backward_row(const AttentionSpec& spec, const AttnParams<T>& p, const T* o, const T* dout, T* dobuf,
                           double* gnorm, double* ggw, double* ggb, int D, std::vector<T>& tmp) {
  // Recompute the stages' values: n = normed (or o), s = scaled.
  tmp.resize(2 * D);
  T* nrm = tmp.data();
  T* scl = tmp.data() + D;
  T r = 1;
  if (spec.norm) {
    T ms = 0;
    for (int d = 0; d < D; ++d) ms += o[d] * o[d];
    r = T(1) / std::sqrt(ms / T(D) + T(kGroupNormEps));
    for (int d = 0; d < D; ++d) nrm[d] = o[d] * r * p.norm[d];
  } else {
    std::copy(o, o + D, nrm);
  }
  const T ds = static_cast<T>(spec.depth_scale());
  for (int d = 0; d < D; ++d) scl[d] = nrm[d] * ds;

  // d(scaled)
  if (spec.gate) {
    T zl = p.gate_b[0];
    for (int d = 0; d < D; ++d) zl += scl[d] * p.gate_w[d];
    const T z = T(1) / (T(1) + std::exp(-zl));
    T dz = 0;
    for (int d = 0; d < D; ++d) dz += dout[d] * scl[d];
    const T dzl = dz * z * (T(1) - z);
    for (int d = 0; d < D; ++d) {
      dobuf[d] = dout[d] * z + dzl * p.gate_w[d];
      ggw[d] += dzl * scl[d];
    }
    ggb[0] += dzl;
  } else {
    std::copy(dout, dout + D, dobuf);
  }
  // d(normed)
  if (spec.depth_scale_layer)
    for (int d = 0; d < D; ++d) dobuf[d] *= ds;
  // d(o)
  if (spec.norm) {
    T uo = 0;
    for (int d = 0; d < D; ++d) {
      gnorm[d] += dobuf[d] * o[d] * r;
      dobuf[d] *= p.norm[d];  // u = gn * dN
      uo += dobuf[d] * o[d];
    }
    const T c = r * r * r * uo / T(D);
    for (int d = 0; d < D; ++d) dobuf[d] = r * dobuf[d] - o[d] * c;
  }
}

bool epilogue_enabled(const AttentionSpec& s) {
  return s.norm || s.depth_scale_layer || s.gate;
}

// The forward pass of one unit up to A3 (the final attention weights), for heads h0 .. h0+G-1 of
// batch b. Fills buf; writes nothing else.
template <typename T>
void unit_scores(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const AttnParams<T>& p,
                 int b, int h0, UnitBuffers<T>& buf) {
  const int G = buf.G, n = dims.T, D = dims.D;
  const T scale = T(1) / std::sqrt(T(D));
  const long long hs = static_cast<long long>(n) * D;
  // 1. Logits, future set to 0 (S0).
#pragma omp parallel for schedule(static)
  for (int x = 0; x < G; ++x) {
    const long long base = (static_cast<long long>(b) * dims.H + h0 + x) * hs;
    T* s = buf.s0[x];
    gemm<T>(false, true, n, n, D, scale, q + base, D, k + base, D, T(0), s, n);
    for (int i = 0; i < n; ++i) std::fill(s + static_cast<long long>(i) * n + i + 1, s + static_cast<long long>(i + 1) * n, T(0));
  }
  // 2. Key-query convolution before softmax.
  if (spec.kq_pre) {
    const KqConv& kc = *spec.kq_pre;
#pragma omp parallel for collapse(2) schedule(dynamic, 16)
    for (int x = 0; x < G; ++x)
      for (int i = 0; i < n; ++i)
        conv_forward_row(buf.s0[x], buf.c[x], p.kq_pre + static_cast<long long>(h0 + x) * kc.q * kc.k, kc, n, i);
  }
  // 3. Head mixing before softmax (into the A buffers), 4. softmax in place.
  if (spec.head_pre) {
#pragma omp parallel for schedule(dynamic, 16)
    for (int i = 0; i < n; ++i) mix_heads_row(buf.c, buf.a, p.head_pre, spec.head_pre->group, h0, n, i);
  } else if (buf.a[0] != buf.c[0]) {
    for (int x = 0; x < G; ++x) std::copy(buf.c[x], buf.c[x] + static_cast<long long>(n) * n, buf.a[x]);
  }
#pragma omp parallel for collapse(2) schedule(dynamic, 32)
  for (int x = 0; x < G; ++x)
    for (int i = 0; i < n; ++i) softmax_row(buf.a[x] + static_cast<long long>(i) * n, i, std::min(n, (i + 8) / 8 * 8));
  // 5. Key-query convolution after softmax, future set to 0 (conv writes only j <= i).
  if (spec.kq_post) {
    const KqConv& kc = *spec.kq_post;
#pragma omp parallel for collapse(2) schedule(dynamic, 16)
    for (int x = 0; x < G; ++x)
      for (int i = 0; i < n; ++i)
        conv_forward_row(buf.a[x], buf.a2[x], p.kq_post + static_cast<long long>(h0 + x) * kc.q * kc.k, kc, n, i);
  }
  // 6. Head mixing after softmax.
  if (spec.head_post) {
#pragma omp parallel for schedule(dynamic, 16)
    for (int i = 0; i < n; ++i) mix_heads_row(buf.a2, buf.a3, p.head_post, spec.head_post->group, h0, n, i);
  }
}

// The attention weights that multiply V: A3, or with dropout a copy of A3 with dropped entries zeroed
// and kept ones scaled by 1/(1-p).
template <typename T>
const T* weights_for_values(const T* a3, std::vector<T>& scratch, const AttnOptions& opt, long long bh, int n) {
  if (opt.dropout <= 0.0f) return a3;
  scratch.assign(static_cast<size_t>(n) * n, T(0));
  const T keep_scale = T(1) / (T(1) - static_cast<T>(opt.dropout));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j)
      if (dropout_keep(opt.dropout_seed, bh, n, i, j, opt.dropout))
        scratch[static_cast<size_t>(i) * n + j] = a3[static_cast<size_t>(i) * n + j] * keep_scale;
  return scratch.data();
}

// ---------------------------------------------------------------------------------------------
// Standard attention at small T: a separate path, a few query rows at a time.
//
// Why it exists: the general path above materializes T x T matrices per unit and multiplies them
// with BLAS; at the toy models' sizes (T = 69, head dim 32, 64 units a layer) the ~7 small BLAS
// calls per unit (packing, a zeroing pass, the full square where only the causal half is needed),
// the buffers and the nested parallel regions cost several times the arithmetic. Without any MTA
// stage a row of the attention weights depends only on q_i and K, so here each (batch, head) is
// computed kRowBlock query rows at a time, over the causal keys only: the block's logits, softmax
// and every product that uses them are fused, with no T x T matrix, in small kernels that keep
// their sums in registers. Same results as the general path up to rounding; the tests run both
// (standard specs take this path up to kRowPathMaxT, MTA specs and longer T the general one).
// ---------------------------------------------------------------------------------------------

// Up to this T, specs without MTA stages take this path. It measured faster than the general path
// at longer T too (1.2x at T = 256 and 1024, head dim 64), but it runs one thread per (batch, head)
// and long sequences are where the BLAS calls are large enough to pay; the general path keeps them.
constexpr int kRowPathMaxT = 128;
constexpr int kRowBlock = 4;       // query rows per block (R)
constexpr int kKeyBlock = 16;      // keys per register block; transposed K and V are padded to it

bool use_row_path(const AttentionSpec& spec, const AttnDims& dims) {
  return spec.is_standard() && dims.T <= kRowPathMaxT;
}

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// The three products, for R rows at once, written with explicit vectors (GCC/Clang's vector
// extension: one AVX2 register with -march=native, plain code elsewhere). The sums live in local
// vector variables that stay in registers, and each loaded vector is used R (or several) times;
// left to itself the compiler vectorized these loops along the wrong dimension.
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int N = 32 / sizeof(T);  // lanes
};
// (Vectors pass by reference: by value they would change the ABI between AVX and non-AVX builds.)
template <typename T>
inline void vload(typename Simd<T>::V& v, const T* p) {
  std::memcpy(&v, p, sizeof v);
}
template <typename T>
inline void vstore(T* p, const typename Simd<T>::V& v) {
  std::memcpy(p, &v, sizeof v);
}

// out[r, j] = c * sum_d x[r, d] * yt[d, j] for j < nkp (a multiple of kKeyBlock): logits Q K^T and
// dO V^T, with yt a transposed K or V.
template <typename T>
void rows_dot_cols(const T* x, int ldx, const T* yt, int ldy, int D, T c, int nkp, T* out, int ldo) {
  using V = typename Simd<T>::V;
  constexpr int R = kRowBlock, NV = kKeyBlock / Simd<T>::N;  // NV vectors of keys per block
  for (int j0 = 0; j0 < nkp; j0 += kKeyBlock) {
    V a[R][NV] = {};
    for (int d = 0; d < D; ++d) {
      V y[NV];
      for (int u = 0; u < NV; ++u) vload(y[u], yt + static_cast<long long>(d) * ldy + j0 + u * Simd<T>::N);
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < NV; ++u) a[r][u] += x[r * ldx + d] * y[u];
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) vstore(out + r * ldo + j0 + u * Simd<T>::N, c * a[r][u]);
  }
}

// out[r, 0..NV vectors) = sum_{j < nk} w[r, j] * y[j, same columns], for one block of columns.
template <int NV, typename T>
void weighted_rows_block(const T* w, int ldw, const T* y, int ldy, int nk, T* out, int ldo) {
  using V = typename Simd<T>::V;
  constexpr int R = kRowBlock;
  V a[R][NV] = {};
  for (int j = 0; j < nk; ++j) {
    V yj[NV];
    for (int u = 0; u < NV; ++u) vload(yj[u], y + static_cast<long long>(j) * ldy + u * Simd<T>::N);
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) a[r][u] += w[r * ldw + j] * yj[u];
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) vstore(out + r * ldo + u * Simd<T>::N, a[r][u]);
}

// out[r, 0..D) = sum_{j < nk} w[r, j] * y[j, 0..D) (y row-major, D columns): P V and dS K.
template <typename T>
void weighted_rows(const T* w, int ldw, const T* y, int D, int nk, T* out, int ldo) {
  constexpr int N = Simd<T>::N;
  int d = 0;
  for (; d + 2 * N <= D; d += 2 * N) weighted_rows_block<2>(w, ldw, y + d, D, nk, out + d, ldo);
  for (; d + N <= D; d += N) weighted_rows_block<1>(w, ldw, y + d, D, nk, out + d, ldo);
  for (; d < D; ++d)  // the last D % N columns
    for (int r = 0; r < kRowBlock; ++r) {
      T a = 0;
      for (int j = 0; j < nk; ++j) a += w[r * ldw + j] * y[static_cast<long long>(j) * D + d];
      out[r * ldo + d] = a;
    }
}

// y[j, 0..D) += sum_r w[r, j] * x[r, 0..D) for j < nk: the rank-R updates dV += W^T dO, dK += dS^T Q.
template <typename T>
void add_rank_rows(const T* w, int ldw, const T* x, int D, int nk, T* y) {
  using V = typename Simd<T>::V;
  constexpr int R = kRowBlock, N = Simd<T>::N;
  int d = 0;
  for (; d + N <= D; d += N) {
    V xr[R];
    for (int r = 0; r < R; ++r) vload(xr[r], x + r * D + d);
    for (int j = 0; j < nk; ++j) {
      T* yj = y + static_cast<long long>(j) * D + d;
      V acc;
      vload(acc, yj);
      for (int r = 0; r < R; ++r) acc += w[r * ldw + j] * xr[r];
      vstore(yj, acc);
    }
  }
  for (; d < D; ++d)  // the last D % N columns
    for (int j = 0; j < nk; ++j)
      for (int r = 0; r < R; ++r) y[static_cast<long long>(j) * D + d] += w[r * ldw + j] * x[r * D + d];
}

// Per-thread scratch of the row path for one (batch, head): K and V transposed and zero-padded to
// ld = round_up(T, kKeyBlock) keys, and R-row blocks of queries, output gradients and weights.
template <typename T>
struct RowScratch {
  int n = 0, ld = 0;
  std::vector<T> kt, vt, rows_q, rows_do, out, w, p, dp;

  RowScratch(const AttnDims& dims) : n(dims.T), ld(round_up(dims.T, kKeyBlock)) {
    const int R = kRowBlock;
    rows_q.resize(static_cast<size_t>(R) * dims.D), rows_do.resize(static_cast<size_t>(R) * dims.dv());
    out.resize(static_cast<size_t>(R) * std::max(dims.D, dims.dv()));
    w.resize(static_cast<size_t>(R) * ld), p.resize(w.size()), dp.resize(w.size());
  }
  void transpose_into(const T* x, int cols, std::vector<T>& xt) const {
    xt.assign(static_cast<size_t>(cols) * ld, T(0));
    for (int r = 0; r < n; ++r)
      for (int c = 0; c < cols; ++c) xt[static_cast<size_t>(c) * ld + r] = x[static_cast<long long>(r) * cols + c];
  }
  // Rows i0 .. i0+R-1 of x (n x cols), the ones past n as zeros (their results are dropped).
  const T* block_rows(const T* x, int cols, int i0, std::vector<T>& buf) const {
    const int valid = std::min(kRowBlock, n - i0);
    if (valid == kRowBlock) return x + static_cast<long long>(i0) * cols;
    std::fill(buf.begin(), buf.end(), T(0));
    std::copy_n(x + static_cast<long long>(i0) * cols, static_cast<long long>(valid) * cols, buf.begin());
    return buf.data();
  }
};

// Attention weights of rows i0 .. i0+R-1 of head bh from their logits in s (R x ld, keys < nkp
// filled): causal mask and softmax, and, with dropout, the mask and 1/(1-p), in place. With dropout the
// weights before it are copied to p (backward needs both); without, p is not touched.
template <typename T>
void block_weights(T* s, T* p, int ld, int nkp, const AttnOptions& opt, long long bh, int n, int i0) {
  const T keep_scale = T(1) / (T(1) - static_cast<T>(opt.dropout));
  for (int r = 0; r < kRowBlock; ++r) {
    const int i = i0 + r;
    T* row = s + static_cast<long long>(r) * ld;
    softmax_row(row, i, nkp);
    if (opt.dropout <= 0.0f || i >= n) continue;
    T* prow = p + static_cast<long long>(r) * ld;
    std::copy(row, row + nkp, prow);
    for (int j = 0; j <= i; ++j)
      row[j] *= dropout_keep(opt.dropout_seed, bh, n, i, j, opt.dropout) ? keep_scale : T(0);
  }
}

template <typename T>
void row_path_forward(const AttnDims& dims, const T* q, const T* k, const T* v, T* out, const AttnOptions& opt) {
  const int n = dims.T, D = dims.D, Dv = dims.dv(), units = dims.B * dims.H, R = kRowBlock;
  const T scale = T(1) / std::sqrt(T(D));
#pragma omp parallel
  {
    RowScratch<T> sc(dims);
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < units; ++bh) {
      const T* qh = q + static_cast<long long>(bh) * n * D;
      const T* vh = v + static_cast<long long>(bh) * n * Dv;
      T* oh = out + static_cast<long long>(bh) * n * Dv;
      sc.transpose_into(k + static_cast<long long>(bh) * n * D, D, sc.kt);
      for (int i0 = 0; i0 < n; i0 += R) {
        const int nk = std::min(i0 + R, n), nkp = round_up(nk, kKeyBlock);  // keys the block sees
        rows_dot_cols(sc.block_rows(qh, D, i0, sc.rows_q), D, sc.kt.data(), sc.ld, D, scale, nkp, sc.w.data(), sc.ld);
        block_weights(sc.w.data(), sc.p.data(), sc.ld, nkp, opt, bh, n, i0);
        weighted_rows(sc.w.data(), sc.ld, vh, Dv, nk, sc.out.data(), Dv);
        std::copy_n(sc.out.data(), static_cast<long long>(std::min(R, n - i0)) * Dv, oh + static_cast<long long>(i0) * Dv);
      }
    }
  }
}

// Per block of rows, with W the weights after dropout and P before: dV += W^T dO, dW = dO V^T,
// dP = dW * mask / (1-p), dS = P * (dP - <dP, P>) * scale (softmax and logit scale), dQ = dS K,
// dK += dS^T Q. dK and dV are sums over the blocks, accumulated in block order (deterministic).
template <typename T>
void row_path_backward(const AttnDims& dims, const T* q, const T* k, const T* v, const T* dout, T* dq, T* dk, T* dv,
                       const AttnOptions& opt) {
  const int n = dims.T, D = dims.D, Dv = dims.dv(), units = dims.B * dims.H, R = kRowBlock;
  const T scale = T(1) / std::sqrt(T(D));
  const bool drop = opt.dropout > 0.0f;
  const T keep_scale = T(1) / (T(1) - static_cast<T>(opt.dropout));
#pragma omp parallel
  {
    RowScratch<T> sc(dims);
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < units; ++bh) {
      const long long qk_off = static_cast<long long>(bh) * n * D, v_off = static_cast<long long>(bh) * n * Dv;
      sc.transpose_into(k + qk_off, D, sc.kt);
      sc.transpose_into(v + v_off, Dv, sc.vt);
      std::fill(dk + qk_off, dk + qk_off + static_cast<long long>(n) * D, T(0));
      std::fill(dv + v_off, dv + v_off + static_cast<long long>(n) * Dv, T(0));
      for (int i0 = 0; i0 < n; i0 += R) {
        const int nk = std::min(i0 + R, n), nkp = round_up(nk, kKeyBlock), ld = sc.ld;
        const T* qb = sc.block_rows(q + qk_off, D, i0, sc.rows_q);
        const T* dob = sc.block_rows(dout + v_off, Dv, i0, sc.rows_do);  // rows past n: zero, so no gradient
        rows_dot_cols(qb, D, sc.kt.data(), ld, D, scale, nkp, sc.w.data(), ld);
        block_weights(sc.w.data(), sc.p.data(), ld, nkp, opt, bh, n, i0);
        const T* pb = drop ? sc.p.data() : sc.w.data();
        add_rank_rows(sc.w.data(), ld, dob, Dv, nk, dv + v_off);
        rows_dot_cols(dob, Dv, sc.vt.data(), ld, Dv, T(1), nkp, sc.dp.data(), ld);
        for (int r = 0; r < R; ++r) {
          T* dpr = sc.dp.data() + static_cast<long long>(r) * ld;
          const T* pr = pb + static_cast<long long>(r) * ld;
          const T* wr = sc.w.data() + static_cast<long long>(r) * ld;
          if (drop)  // w is 0 exactly where dropped (or where p = 0, and there dS is 0 anyway)
            for (int j = 0; j < nkp; ++j) dpr[j] *= wr[j] == T(0) ? T(0) : keep_scale;
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int j = 0; j < nkp; ++j) dot += dpr[j] * pr[j];
          for (int j = 0; j < nkp; ++j) dpr[j] = pr[j] * (dpr[j] - dot) * scale;  // dS; 0 past row i (p = 0)
        }
        weighted_rows(sc.dp.data(), ld, k + qk_off, D, nk, sc.out.data(), D);
        std::copy_n(sc.out.data(), static_cast<long long>(std::min(R, n - i0)) * D, dq + qk_off + static_cast<long long>(i0) * D);
        add_rank_rows(sc.dp.data(), ld, qb, D, nk, dk + qk_off);
      }
    }
  }
}

}  // namespace

template <typename T>
void mta_forward(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const T* v,
                 const AttnParams<T>& p, T* out, const AttnOptions& opt) {
  check_attention_args(spec, dims);
  if (use_row_path(spec, dims)) return row_path_forward(dims, q, k, v, out, opt);
  const int G = spec.coupled_heads(), n = dims.T, Dv = dims.dv();
  const int units = dims.B * (dims.H / G);
  const long long hsv = static_cast<long long>(n) * Dv;
  // Parallel over units when there are enough of them; otherwise the loops inside a unit are.
#pragma omp parallel for schedule(dynamic, 1) if (units >= omp_get_max_threads())
  for (int u = 0; u < units; ++u) {
    const int b = u / (dims.H / G), h0 = (u % (dims.H / G)) * G;
    UnitBuffers<T> buf(spec, G, n);
    unit_scores(spec, dims, q, k, p, b, h0, buf);
    // 7. O = A3 @ V, then the per-row epilogue.
#pragma omp parallel for schedule(static)
    for (int x = 0; x < G; ++x) {
      const long long bh = static_cast<long long>(b) * dims.H + h0 + x;
      const long long base = bh * hsv;
      std::vector<T> scratch;
      const T* w = weights_for_values(buf.a3[x], scratch, opt, bh, n);
      gemm<T>(false, false, n, Dv, n, T(1), w, n, v + base, Dv, T(0), out + base, Dv);
      if (epilogue_enabled(spec)) {
        std::vector<T> row(Dv);
        for (int i = 0; i < n; ++i) {
          T* o = out + base + static_cast<long long>(i) * Dv;
          std::copy(o, o + Dv, row.begin());
          epilogue_forward_row(spec, p, row.data(), o, Dv);
        }
      }
    }
  }
}

template <typename T>
void mta_backward(const AttentionSpec& spec, const AttnDims& dims, const T* q, const T* k, const T* v,
                  const AttnParams<T>& p, const T* dout, T* dq, T* dk, T* dv, const AttnParamGrads<T>& grads,
                  const AttnOptions& opt) {
  check_attention_args(spec, dims);
  if (use_row_path(spec, dims)) return row_path_backward(dims, q, k, v, dout, dq, dk, dv, opt);
  const int G = spec.coupled_heads(), n = dims.T, D = dims.D, Dv = dims.dv(), H = dims.H;
  const int units = dims.B * (H / G);
  const long long hs = static_cast<long long>(n) * D, hsv = static_cast<long long>(n) * Dv;
  const long long nn = static_cast<long long>(n) * n;
  const T scale = T(1) / std::sqrt(T(D));
  auto need = [](bool on, const T* ptr, const char* name) {
    if (on && !ptr) throw std::invalid_argument(std::string("mta_backward: missing gradient buffer for ") + name);
  };
  need(spec.kq_pre.has_value(), grads.kq_pre, "kq_pre");
  need(spec.head_pre.has_value(), grads.head_pre, "head_pre");
  need(spec.kq_post.has_value(), grads.kq_post, "kq_post");
  need(spec.head_post.has_value(), grads.head_post, "head_post");
  need(spec.norm, grads.norm, "norm");
  need(spec.gate, grads.gate_w, "gate_w");
  need(spec.gate, grads.gate_b, "gate_b");

  // Parameter gradients per unit, summed in unit order after the parallel loop so that the result
  // does not depend on thread timing (exact resume of training relies on it). Accumulated in double
  // and rounded once: they are sums over B*T*T terms.
  const int cpre = spec.kq_pre ? spec.kq_pre->q * spec.kq_pre->k : 0;
  const int cpost = spec.kq_post ? spec.kq_post->q * spec.kq_post->k : 0;
  const int gpre = spec.head_pre ? spec.head_pre->group : 0;
  const int gpost = spec.head_post ? spec.head_post->group : 0;
  struct UnitGrads {
    std::vector<double> kq_pre, kq_post, head_pre, head_post, norm, gw, gb;  // double: sums over B*T*T terms
  };
  std::vector<UnitGrads> unit_grads(units);

#pragma omp parallel for schedule(dynamic, 1) if (units >= omp_get_max_threads())
  for (int u = 0; u < units; ++u) {
    const int b = u / (H / G), h0 = (u % (H / G)) * G;
    UnitBuffers<T> buf(spec, G, n);
    unit_scores(spec, dims, q, k, p, b, h0, buf);

    // Indexed by global head (or group) like the parameters; only this unit's part is touched.
    UnitGrads& ug = unit_grads[u];
    std::vector<double>& g_kq_pre = ug.kq_pre;
    std::vector<double>& g_kq_post = ug.kq_post;
    std::vector<double>& g_head_pre = ug.head_pre;
    std::vector<double>& g_head_post = ug.head_post;
    std::vector<double>& g_norm = ug.norm;
    std::vector<double>& g_gw = ug.gw;
    std::vector<double>& g_gb = ug.gb;
    g_kq_pre.assign(static_cast<size_t>(H) * cpre, 0.0), g_kq_post.assign(static_cast<size_t>(H) * cpost, 0.0);
    g_head_pre.assign(static_cast<size_t>(H) * gpre, 0.0), g_head_post.assign(static_cast<size_t>(H) * gpost, 0.0);
    g_norm.assign(static_cast<size_t>(G) * Dv, 0.0), g_gw.assign(static_cast<size_t>(G) * Dv, 0.0), g_gb.assign(G, 0.0);

    // dA3 (per head), through the epilogue and O = A3 @ V.
    std::vector<T> dA3(static_cast<size_t>(G) * nn, T(0));
#pragma omp parallel for schedule(static)
    for (int x = 0; x < G; ++x) {
      const long long bh = static_cast<long long>(b) * H + h0 + x;
      const long long base = bh * hsv;
      std::vector<T> scratch;
      const T* w = weights_for_values(buf.a3[x], scratch, opt, bh, n);
      const T* dO = dout + base;
      std::vector<T> dOraw;
      if (epilogue_enabled(spec)) {
        std::vector<T> o(hsv), tmp;
        dOraw.resize(hsv);
        gemm<T>(false, false, n, Dv, n, T(1), w, n, v + base, Dv, T(0), o.data(), Dv);
        for (int i = 0; i < n; ++i)
          epilogue_backward_row(spec, p, o.data() + static_cast<long long>(i) * Dv, dO + static_cast<long long>(i) * Dv,
                                dOraw.data() + static_cast<long long>(i) * Dv, g_norm.data() + x * Dv,
                                g_gw.data() + x * Dv, g_gb.data() + x, Dv, tmp);
        dO = dOraw.data();
      }
      T* da3x = dA3.data() + x * nn;
      gemm<T>(true, false, n, Dv, n, T(1), w, n, dO, Dv, T(0), dv + base, Dv);  // dV = W^T dO
      gemm<T>(false, true, n, n, Dv, T(1), dO, Dv, v + base, Dv, T(0), da3x, n);  // dW = dO V^T
      if (opt.dropout > 0.0f) {  // through the dropout mask: dA3 = dW * mask / (1 - p)
        const T keep_scale = T(1) / (T(1) - static_cast<T>(opt.dropout));
        for (int i = 0; i < n; ++i)
          for (int j = 0; j <= i; ++j)
            da3x[static_cast<size_t>(i) * n + j] *=
                dropout_keep(opt.dropout_seed, bh, n, i, j, opt.dropout) ? keep_scale : T(0);
      }
    }
    std::vector<T*> da3(G), da2(G), da(G);
    for (int x = 0; x < G; ++x) da3[x] = dA3.data() + x * nn;

    // 6. Head mixing after softmax.
    std::vector<T> dA2;
    if (spec.head_post) {
      dA2.assign(static_cast<size_t>(G) * nn, T(0));
      for (int x = 0; x < G; ++x) da2[x] = dA2.data() + x * nn;
      mix_heads_weight_grad(buf.a2, da3, g_head_post.data(), gpost, h0, n);
      // dA2[y] = sum_x M[x,y] dA3[x]: the mix with M transposed within each group.
      std::vector<T> Mt(static_cast<size_t>(H) * gpost);
      for (int grp = 0; grp < H / gpost; ++grp)
        for (int x = 0; x < gpost; ++x)
          for (int y = 0; y < gpost; ++y)
            Mt[(static_cast<size_t>(grp) * gpost + y) * gpost + x] = p.head_post[(static_cast<size_t>(grp) * gpost + x) * gpost + y];
#pragma omp parallel for schedule(dynamic, 16)
      for (int i = 0; i < n; ++i) mix_heads_row(da3, da2, Mt.data(), gpost, h0, n, i);
    } else {
      da2 = da3;
    }
    // 5. Key-query convolution after softmax.
    std::vector<T> dA;
    if (spec.kq_post) {
      const KqConv& kc = *spec.kq_post;
      dA.assign(static_cast<size_t>(G) * nn, T(0));
      for (int x = 0; x < G; ++x) da[x] = dA.data() + x * nn;
#pragma omp parallel for schedule(static)
      for (int x = 0; x < G; ++x)
        conv_weight_grad(buf.a[x], da2[x], g_kq_post.data() + static_cast<long long>(h0 + x) * cpost, kc, n);
#pragma omp parallel for collapse(2) schedule(dynamic, 16)
      for (int x = 0; x < G; ++x)
        for (int i = 0; i < n; ++i)
          conv_input_grad_row(da2[x], da[x], p.kq_post + static_cast<long long>(h0 + x) * cpost, kc, n, i);
    } else {
      da = da2;
    }
    // 4. Softmax, in place: dC' = A * (dA - <dA, A>), zero in the future.
#pragma omp parallel for collapse(2) schedule(dynamic, 32)
    for (int x = 0; x < G; ++x)
      for (int i = 0; i < n; ++i) {
        const T* a = buf.a[x] + static_cast<long long>(i) * n;
        T* d = da[x] + static_cast<long long>(i) * n;
        T dot = 0;
        for (int j = 0; j <= i; ++j) dot += d[j] * a[j];
        for (int j = 0; j <= i; ++j) d[j] = a[j] * (d[j] - dot);
        std::fill(d + i + 1, d + n, T(0));
      }
    // 3. Head mixing before softmax.
    std::vector<T*> dc(G);
    std::vector<T> dC;
    if (spec.head_pre) {
      dC.assign(static_cast<size_t>(G) * nn, T(0));
      for (int x = 0; x < G; ++x) dc[x] = dC.data() + x * nn;
      mix_heads_weight_grad(buf.c, da, g_head_pre.data(), gpre, h0, n);
      std::vector<T> Mt(static_cast<size_t>(H) * gpre);
      for (int grp = 0; grp < H / gpre; ++grp)
        for (int x = 0; x < gpre; ++x)
          for (int y = 0; y < gpre; ++y)
            Mt[(static_cast<size_t>(grp) * gpre + y) * gpre + x] = p.head_pre[(static_cast<size_t>(grp) * gpre + x) * gpre + y];
#pragma omp parallel for schedule(dynamic, 16)
      for (int i = 0; i < n; ++i) mix_heads_row(da, dc, Mt.data(), gpre, h0, n, i);
    } else {
      dc = da;
    }
    // 2. Key-query convolution before softmax; 1. the first mask keeps only j <= i.
    std::vector<T*> ds(G);
    std::vector<T> dS;
    if (spec.kq_pre) {
      const KqConv& kc = *spec.kq_pre;
      dS.assign(static_cast<size_t>(G) * nn, T(0));
      for (int x = 0; x < G; ++x) ds[x] = dS.data() + x * nn;
#pragma omp parallel for schedule(static)
      for (int x = 0; x < G; ++x)
        conv_weight_grad(buf.s0[x], dc[x], g_kq_pre.data() + static_cast<long long>(h0 + x) * cpre, kc, n);
#pragma omp parallel for collapse(2) schedule(dynamic, 16)
      for (int x = 0; x < G; ++x)
        for (int i = 0; i < n; ++i)
          conv_input_grad_row(dc[x], ds[x], p.kq_pre + static_cast<long long>(h0 + x) * cpre, kc, n, i);
    } else {
      ds = dc;
    }
    // dq = s dS K, dk = s dS^T Q (dS is zero in the future part).
#pragma omp parallel for schedule(static)
    for (int x = 0; x < G; ++x) {
      const long long base = (static_cast<long long>(b) * H + h0 + x) * hs;  // q and k have head dim D
      gemm<T>(false, false, n, D, n, scale, ds[x], n, k + base, D, T(0), dq + base, D);
      gemm<T>(true, false, n, D, n, scale, ds[x], n, q + base, D, T(0), dk + base, D);
    }

  }

  UnitGrads total;
  total.kq_pre.assign(static_cast<size_t>(H) * cpre, 0.0), total.kq_post.assign(static_cast<size_t>(H) * cpost, 0.0);
  total.head_pre.assign(static_cast<size_t>(H) * gpre, 0.0), total.head_post.assign(static_cast<size_t>(H) * gpost, 0.0);
  total.norm.assign(Dv, 0.0), total.gw.assign(Dv, 0.0), total.gb.assign(1, 0.0);
  for (int u = 0; u < units; ++u) {
    const UnitGrads& ug = unit_grads[u];
    const int h0 = (u % (H / G)) * G;
    auto add = [](double* dst, const std::vector<double>& src, size_t off, size_t count) {
      for (size_t i = 0; i < count; ++i) dst[off + i] += src[off + i];
    };
    // Only this unit's heads (or groups) received contributions.
    if (spec.kq_pre) add(total.kq_pre.data(), ug.kq_pre, static_cast<size_t>(h0) * cpre, static_cast<size_t>(G) * cpre);
    if (spec.kq_post) add(total.kq_post.data(), ug.kq_post, static_cast<size_t>(h0) * cpost, static_cast<size_t>(G) * cpost);
    if (spec.head_pre) add(total.head_pre.data(), ug.head_pre, static_cast<size_t>(h0) * gpre, static_cast<size_t>(G) * gpre);
    if (spec.head_post) add(total.head_post.data(), ug.head_post, static_cast<size_t>(h0) * gpost, static_cast<size_t>(G) * gpost);
    for (int x = 0; x < G; ++x) {
      for (int d = 0; d < Dv; ++d) {
        if (spec.norm) total.norm[d] += ug.norm[x * Dv + d];
        if (spec.gate) total.gw[d] += ug.gw[x * Dv + d];
      }
      if (spec.gate) total.gb[0] += ug.gb[x];
    }
  }
  auto put = [](T* dst, const std::vector<double>& src) {
    for (size_t i = 0; i < src.size(); ++i) dst[i] += static_cast<T>(src[i]);
  };
  if (spec.kq_pre) put(grads.kq_pre, total.kq_pre);
  if (spec.kq_post) put(grads.kq_post, total.kq_post);
  if (spec.head_pre) put(grads.head_pre, total.head_pre);
  if (spec.head_post) put(grads.head_post, total.head_post);
  if (spec.norm) put(grads.norm, total.norm);
  if (spec.gate) put(grads.gate_w, total.gw), put(grads.gate_b, total.gb);
}

template void mta_forward<float>(const AttentionSpec&, const AttnDims&, const float*, const float*, const float*,
                                 const AttnParams<float>&, float*, const AttnOptions&);
template void mta_forward<double>(const AttentionSpec&, const AttnDims&, const double*, const double*, const double*,
                                  const AttnParams<double>&, double*, const AttnOptions&);
template void mta_backward<float>(const AttentionSpec&, const AttnDims&, const float*, const float*, const float*,
                                  const AttnParams<float>&, const float*, float*, float*, float*,
                                  const AttnParamGrads<float>&, const AttnOptions&);
template void mta_backward<double>(const AttentionSpec&, const AttnDims&, const double*, const double*, const double*,
                                   const AttnParams<double>&, const double*, double*, double*, double*,
                                   const AttnParamGrads<double>&, const AttnOptions&);

}  // namespace mta::cpu
