#pragma once
// The materialized op's key-query convolution kernels for a kernel size known at compile time (the
// paper's 6 x 11 and the toy task's 2 x 9), float32 only. Included by mta_cuda.cu inside its anonymous
// namespace, after Geom, Span and stage_causal_window, whose contracts these kernels share with
// conv_tile_kernel and conv_weight_grad_kernel (the runtime-size forms, which remain for every other
// size and for float64).
//
// Why: the runtime-size kernels are bound by shared-memory reads (ncu, 35M LM step: one read per FMA
// or more). Here a thread computes a 4 x 4 output block from window rows it loads as float4 (CK + 3
// columns serve 4 x CK products), and the tap loops are unrolled, so the inner loops are FMAs with
// ~0.15 shared-memory reads each. The convolution adds every output's terms in the runtime form's
// order (a, then c, one FMA each), so its results are bitwise those of conv_tile_kernel. The weight
// gradient sums 8 rows of products in float before adding them into double (the runtime form adds
// each product in double): deterministic, a fixed order, ~1e-7 relative.

// Output tile of the convolution: 32 rows x 128 columns, 8 warps; warp w owns rows 4w .. 4w + 3 and
// lane l columns 4l .. 4l + 3 of the tile.
constexpr int kFixRows = 32, kFixCols = 128, kFixRowsPerWarp = 4;
static_assert(kFixRows == kFixRowsPerWarp * kBlock / 32, "8 warps of 4 rows");
static_assert(kFixRows == kConvTile, "weight-gradient strips of kConvTile rows: the partials' layout (Op::part_cols)");

template <int CQ, int CK>
struct FixedConv {
  static_assert(CQ >= 1 && CQ <= kMaxCq && CK >= 1 && CK <= kMaxCk, "the sizes the tiled kernels take");
  static constexpr int kVec = (CK + 3 + 3) / 4;           // float4 loads per lane and window row (CK + 3 columns)
  static constexpr int kWinRows = kFixRows + CQ - 1;      // a tile's rows plus the query halo
  static constexpr int kPitch = kFixCols + 4 * (kVec - 1);  // window columns: lane 31 reads up to 124 + 4 kVec
  static constexpr int kTaps = CQ * CK;
};

// The convolution (kAdjoint = false) or its adjoint, as conv_tile_kernel (same arguments apart from the
// compile-time sizes). Grid (column tiles of 128, row tiles of 32, chunk head x), kBlock threads.
template <int CQ, int CK, bool kAdjoint>
__global__ void __launch_bounds__(kBlock) conv_fixed_kernel(const float* __restrict__ in, float* __restrict__ out,
                                                            const float* __restrict__ W, int o, Geom g, Span sp,
                                                            int in_lo, int in_hi, int H, long long bh0) {
  using S = FixedConv<CQ, CK>;
  __shared__ __align__(16) float win[S::kWinRows * S::kPitch];
  const long long x = blockIdx.z;
  const int i0 = sp.ra + blockIdx.y * kFixRows, j0 = blockIdx.x * kFixCols;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rw = warp * kFixRowsPerWarp, jc = 4 * lane;
  if (j0 > i0 + kFixRows - 1) {  // wholly in the future
    for (int t = threadIdx.x; t < kFixRows * kFixCols; t += kBlock) {
      const int i = i0 + t / kFixCols, j = j0 + t % kFixCols;
      if (i < sp.rb && j < sp.cols) out[g.at(x, i, j)] = 0.0f;
    }
    return;
  }
  const int h = static_cast<int>((bh0 + x) % H);
  __shared__ float w[S::kTaps];
  for (int t = threadIdx.x; t < S::kTaps; t += kBlock) w[t] = W[static_cast<long long>(h) * S::kTaps + t];
  // Window rows and columns as conv_tile_kernel: forward, input rows i0 - (CQ-1) .. and columns j0 - o ..;
  // adjoint, rows i0 .. and columns j0 + o - (CK-1) ...
  if (kAdjoint)
    stage_causal_window<float, float, S::kPitch>(in, g, x, win, i0, j0 + o - (CK - 1), S::kWinRows, S::kPitch, in_lo,
                                                 in_hi);
  else
    stage_causal_window<float, float, S::kPitch>(in, g, x, win, i0 - (CQ - 1), j0 - o, S::kWinRows, S::kPitch, in_lo,
                                                 in_hi);
  __syncthreads();

  float acc[kFixRowsPerWarp][4];
#pragma unroll
  for (int r = 0; r < kFixRowsPerWarp; ++r)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[r][k] = 0.0f;
  // Tap row a at a time: output row rw + r reads window row rw + r + a (forward) or rw + r + CQ-1 - a
  // (adjoint), so the 4 window rows are loaded once per a (as float4) and each weight, read once from
  // shared memory (a broadcast), serves 16 FMAs. Every output meets its taps in the order a, then c
  // (the runtime form's order).
#pragma unroll 1
  for (int a = 0; a < CQ; ++a) {
    const int wr = rw + (kAdjoint ? CQ - 1 - a : a);
    float v[kFixRowsPerWarp][4 * S::kVec];
#pragma unroll
    for (int r = 0; r < kFixRowsPerWarp; ++r) {
      const float4* src = reinterpret_cast<const float4*>(win + (wr + r) * S::kPitch + jc);
#pragma unroll
      for (int k = 0; k < S::kVec; ++k) {
        const float4 f = src[k];
        v[r][4 * k] = f.x, v[r][4 * k + 1] = f.y, v[r][4 * k + 2] = f.z, v[r][4 * k + 3] = f.w;
      }
    }
#pragma unroll
    for (int c = 0; c < CK; ++c) {
      const float wv = w[a * CK + c];
#pragma unroll
      for (int r = 0; r < kFixRowsPerWarp; ++r)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[r][k] = fmaf(wv, v[r][kAdjoint ? k + CK - 1 - c : k + c], acc[r][k]);
    }
  }
#pragma unroll
  for (int r = 0; r < kFixRowsPerWarp; ++r) {
    const int i = i0 + rw + r;
    if (i >= sp.rb) continue;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = j0 + jc + k;
      if (j < sp.cols) out[g.at(x, i, j)] = j <= i ? acc[r][k] : 0.0f;
    }
  }
}

// Convolution weight gradient, stage 1, as conv_weight_grad_kernel (same partial layout: one value per
// tap, chunk head and strip of 32 owned rows). Block (strip, chunk head x) of CQ warps: warp a owns
// the taps (a, 0 .. CK-1), lane l columns 4l .. 4l + 3 of each 128-column tile; the block walks the
// causal tiles of its strip.
template <int CQ, int CK>
__global__ void __launch_bounds__(32 * CQ) conv_weight_grad_fixed_kernel(const float* __restrict__ in,
                                                                         const float* __restrict__ dout,
                                                                         double* __restrict__ partial, int o, Geom g,
                                                                         int r0, int r1, int in_lo, int in_hi) {
  using S = FixedConv<CQ, CK>;
  __shared__ __align__(16) float win[S::kWinRows * S::kPitch];
  __shared__ __align__(16) float dtile[kFixRows * kFixCols];
  const int strip = blockIdx.x;
  const long long x = blockIdx.y;
  const int i0 = r0 + strip * kFixRows, a = threadIdx.x >> 5, lane = threadIdx.x & 31, jc = 4 * lane;
  constexpr int kFlushRows = 8;  // rows of products summed in float before they go into double
  double accd[CK];
#pragma unroll
  for (int c = 0; c < CK; ++c) accd[c] = 0.0;
  for (int j0 = 0; j0 <= i0 + kFixRows - 1 && j0 < g.n; j0 += kFixCols) {
    __syncthreads();  // the previous tile's reads are done
    stage_causal_window<float, float, kFixCols>(dout, g, x, dtile, i0, j0, kFixRows, kFixCols, r0, r1);
    stage_causal_window<float, float, S::kPitch>(in, g, x, win, i0 - (CQ - 1), j0 - o, S::kWinRows, S::kPitch, in_lo,
                                                 in_hi);
    __syncthreads();
    for (int r8 = 0; r8 < kFixRows; r8 += kFlushRows) {
      float accf[CK];
#pragma unroll
      for (int c = 0; c < CK; ++c) accf[c] = 0.0f;
#pragma unroll 2
      for (int r = r8; r < r8 + kFlushRows; ++r) {
        const float4 d = *reinterpret_cast<const float4*>(dtile + r * kFixCols + jc);
        const float dv[4] = {d.x, d.y, d.z, d.w};
        float v[4 * S::kVec];
        const float4* src = reinterpret_cast<const float4*>(win + (r + a) * S::kPitch + jc);
#pragma unroll
        for (int k = 0; k < S::kVec; ++k) {
          const float4 f = src[k];
          v[4 * k] = f.x, v[4 * k + 1] = f.y, v[4 * k + 2] = f.z, v[4 * k + 3] = f.w;
        }
#pragma unroll
        for (int c = 0; c < CK; ++c)
#pragma unroll
          for (int k = 0; k < 4; ++k) accf[c] = fmaf(dv[k], v[k + c], accf[c]);
      }
#pragma unroll
      for (int c = 0; c < CK; ++c) accd[c] += static_cast<double>(accf[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < CK; ++c) {
    const double s = warp_sum(accd[c]);
    if (lane == 0) partial[(x * S::kTaps + a * CK + c) * gridDim.x + strip] = s;
  }
}

// The compile-time sizes with specialized kernels, and a dispatcher: f.template operator()<CQ, CK>()
// for the one matching (cq, ck); false when none does.
template <class F>
bool with_fixed_conv(int cq, int ck, F&& f) {
  if (cq == 6 && ck == 11) return f.template operator()<6, 11>(), true;  // the paper's LM and kq-only
  if (cq == 2 && ck == 9) return f.template operator()<2, 9>(), true;    // the toy task, N = 5
  return false;
}
