// FlashMix forward: head mixing before and / or after the softmax, fused (see flash_mix.h and
// docs/flash-mta.md, "one warp per head").
//
// A CTA owns 16 query rows of one batch element and one coupled group of G heads, one warp per head.
// Per block of 16 keys, each warp computes its head's logit tile S (mma, Q fragments in registers,
// its K tile in shared memory), writes it to an exchange buffer, and after a barrier forms its mixed
// logits C' = sum_y Mpre[x, y] S_y from the G tiles (mixing is position-wise, so each lane mixes its
// own positions with CUDA-core FMAs). Two passes, as the post-softmax mixing needs every head's
// normalized weights:
//   pass 1 (kOut = false): online row max / sum of C' per head -> lse;
//   pass 2 (kOut = true):  A = exp(C' - lse) -> exchange -> A3 = sum_y Mpost[x, y] A_y -> O += A3 V.
// K and V of one batch element's group stay in L2 while its CTAs run, so the re-reads by the small
// query tiles are L2 traffic.
#include "attention/flash_mix.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention/mma_sm80.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;  // NOLINT: the kernels are written in terms of these primitives

constexpr int kTile = 16;  // query rows per CTA and keys per step: one m16 block, two n8 blocks
constexpr int kMaxG = 16;  // heads per CTA (one warp each)
// fp32 row stride of the exchange tiles: a half-warp's 8-byte accesses (rows g = 0..3, columns
// 2t, 2t + 1) then fall into 16 distinct bank pairs (kXS = 8 mod 32).
constexpr int kXS = 40;

void mix_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flash_mix: " + what);
}

// Shared memory: K (and V) tiles [G][16][D + 8] bf16, the exchange tiles [G][16][kXS] fp32 (S, and A
// in pass 2), and the mixing coefficients [2][G][kMaxG] fp32.
template <int D>
size_t smem_bytes(int G, bool out) {
  const size_t tiles = static_cast<size_t>(G) * kTile * (D + 8) * sizeof(bf16) * (out ? 2 : 1);
  const size_t xch = static_cast<size_t>(G) * kTile * kXS * sizeof(float) * (out ? 2 : 1);
  return tiles + xch + 2 * static_cast<size_t>(G) * kMaxG * sizeof(float);
}

// Rows r0 .. r0 + 15 of one head ([T][D] bf16 at `head`) into shared memory (row stride S) with one
// warp's 32 lanes; rows at or past T are zero-filled (`head` is their dummy source: T >= 1).
template <int D, int S>
__device__ __forceinline__ void warp_load_rows(bf16* smem, const bf16* head, int r0, int T, int lane) {
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < kTile * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = r0 + r < T;
    cp_async_16(smem + r * S + col, ok ? head + static_cast<size_t>(r0 + r) * D + col : head, ok ? 16 : 0);
  }
}

// sum_y coef[y] * x[y tile](row, col .. col + 1) over n tiles starting at `first` (pairs of positions).
__device__ __forceinline__ float2 mix_pair(const float* xch, const float* coef, int first, int n, int row, int col) {
  float2 acc = make_float2(0.f, 0.f);
  for (int y = 0; y < n; ++y) {
    const float w = coef[y];
    const float2 val = *reinterpret_cast<const float2*>(xch + ((first + y) * kTile + row) * kXS + col);
    acc.x = fmaf(w, val.x, acc.x);
    acc.y = fmaf(w, val.y, acc.y);
  }
  return acc;
}

// At D = 128 the groups stop at 8 heads (256 threads), which leaves each thread the registers for its
// 64 output accumulators and 32 Q fragment words.
template <int D, bool kOut>
__global__ void __launch_bounds__(D == 64 ? 32 * kMaxG : 16 * kMaxG) flash_mix_fwd_kernel(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, const float* __restrict__ mpre,
    int gpre, const float* __restrict__ mpost, int gpost, bf16* __restrict__ o, float* __restrict__ lse, int H, int T,
    int G, float scale) {
  constexpr int S = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);        // [G][16][S]
  bf16* sV = sK + G * kTile * S;                        // [G][16][S], pass 2
  float* sX = reinterpret_cast<float*>(sV + (kOut ? G * kTile * S : 0));  // [G][16][kXS]: S0
  float* sA = sX + G * kTile * kXS;                     // [G][16][kXS]: A, pass 2
  float* sCoef = sA + (kOut ? G * kTile * kXS : 0);     // [2][G][kMaxG]: Mpre, Mpost rows

  const int units = H / G, b = blockIdx.x / units, u = blockIdx.x % units;
  const int h = u * G + warp;  // this warp's head
  const size_t head = static_cast<size_t>(b * H + h) * T;
  const int m0 = ((T + kTile - 1) / kTile - 1 - static_cast<int>(blockIdx.y)) * kTile;  // heavy tiles first
  q += head * D, k += head * D, v += head * D;

  // This head's rows of its groups' mixing matrices; its group's first warp in the CTA.
  const int xpre = gpre ? h % gpre : 0, xpost = gpost ? h % gpost : 0;
  float* cpre = sCoef + warp * kMaxG;
  float* cpost = sCoef + (G + warp) * kMaxG;
  if (lane < kMaxG) {
    cpre[lane] = gpre && lane < gpre ? mpre[(static_cast<size_t>(h / gpre) * gpre + xpre) * gpre + lane] : 0.f;
    cpost[lane] = gpost && lane < gpost ? mpost[(static_cast<size_t>(h / gpost) * gpost + xpost) * gpost + lane] : 0.f;
  }

  // Q of the warp's 16 rows as mma A fragments, staged through its K tile.
  bf16* myK = sK + warp * kTile * S;
  bf16* myV = sV + warp * kTile * S;
  float* myX = sX + warp * kTile * kXS;
  float* myA = sA + warp * kTile * kXS;
  warp_load_rows<D, S>(myK, q, m0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qa[kk], myK + a_offset(lane, 0, kk * 16, S));
  __syncwarp();

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // pass 1 (log2 domain)
  float lse2[2] = {0.f, 0.f};                                          // pass 2: lse * log2(e)
  float acc_o[kOut ? D / 8 : 1][4] = {};
  if (kOut)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + g + 8 * r;
      lse2[r] = row < T ? lse[head + row] * kLog2e : 0.f;
    }

  const int n_end = min(T, m0 + kTile);  // keys up to the tile's last row
  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    warp_load_rows<D, S>(myK, k, n0, T, lane);
    if (kOut) warp_load_rows<D, S>(myV, v, n0, T, lane);
    cp_async_commit();
    cp_async_wait_all();
    __syncwarp();
    float acc_s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bb[4];
      ldmatrix_x4(bb, myK + bnk_offset(lane, 0, kk * 16, S));
      mma_bf16(acc_s[0], qa[kk], bb[0], bb[1]);
      mma_bf16(acc_s[1], qa[kk], bb[2], bb[3]);
    }
    // S0: scaled logits, the future (and keys past T) as 0, into the exchange.
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t, row = m0 + rl, col = n0 + cl;
        float2 val;
        val.x = col <= row && col < T ? acc_s[j][2 * r] * scale : 0.f;
        val.y = col + 1 <= row && col + 1 < T ? acc_s[j][2 * r + 1] * scale : 0.f;
        *reinterpret_cast<float2*>(myX + rl * kXS + cl) = val;
      }
    __syncthreads();
    // C' of this warp's head at its positions (log2 domain), the future as -inf.
    float c[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rl = g + 8 * r, cl = 8 * j + 2 * t, row = m0 + rl, col = n0 + cl;
        const float2 x = gpre ? mix_pair(sX, cpre, warp - xpre, gpre, rl, cl)
                              : *reinterpret_cast<const float2*>(myX + rl * kXS + cl);
        c[j][2 * r] = col <= row && col < T ? x.x * kLog2e : -INFINITY;
        c[j][2 * r + 1] = col + 1 <= row && col + 1 < T ? x.y * kLog2e : -INFINITY;
      }
    if (!kOut) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = fmaxf(fmaxf(c[0][2 * r], c[0][2 * r + 1]), fmaxf(c[1][2 * r], c[1][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[r], mx);  // finite: key 0 is visible to every row
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 2; ++j) sum += exp2f(c[j][2 * r] - m_new) + exp2f(c[j][2 * r + 1] - m_new);
        row_sum[r] = row_sum[r] * exp2f(row_max[r] - m_new) + sum;
        row_max[r] = m_new;
      }
    } else {
      // A = exp(C' - lse) into the exchange, then A3 = sum_y Mpost[x, y] A_y, then O += A3 V.
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<float2*>(myA + (g + 8 * r) * kXS + 8 * j + 2 * t) =
              make_float2(exp2f(c[j][2 * r] - lse2[r]), exp2f(c[j][2 * r + 1] - lse2[r]));
      __syncthreads();
      float a3[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rl = g + 8 * r, cl = 8 * j + 2 * t;
          const float2 x = gpost ? mix_pair(sA, cpost, warp - xpost, gpost, rl, cl)
                                 : *reinterpret_cast<const float2*>(myA + rl * kXS + cl);
          a3[j][2 * r] = x.x, a3[j][2 * r + 1] = x.y;
        }
      const uint32_t a[4] = {pack_bf16(a3[0][0], a3[0][1]), pack_bf16(a3[0][2], a3[0][3]),
                             pack_bf16(a3[1][0], a3[1][1]), pack_bf16(a3[1][2], a3[1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, myV + bkn_offset(lane, 0, dn * 16, S));
        mma_bf16(acc_o[2 * dn], a, bb[0], bb[1]);
        mma_bf16(acc_o[2 * dn + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done reading the exchange before the next block writes it
  }

  if (!kOut) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = m0 + g + 8 * r;
      if (t == 0 && row < T) lse[head + row] = row_max[r] * kLn2 + logf(l);
    }
    return;
  }
  // O rows (A3 is normalized: no division), staged through the warp's K tile, 16-byte stores.
  __syncwarp();
#pragma unroll
  for (int j = 0; j < (kOut ? D / 8 : 0); ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(myK + (g + 8 * r) * S + 8 * j + 2 * t) = pack_bf16(acc_o[j][2 * r], acc_o[j][2 * r + 1]);
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
  bf16* out = o + head * D;
#pragma unroll
  for (int cc = lane; cc < kTile * kChunksPerRow; cc += 32) {
    const int r = cc / kChunksPerRow, col = (cc % kChunksPerRow) * 8, row = m0 + r;
    if (row < T)
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(row) * D + col) =
          *reinterpret_cast<const uint4*>(myK + r * S + col);
  }
}

template <int D, bool kOut>
void launch_pass(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* mpre,
                 const float* mpost, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  const int H = spec.heads, G = spec.coupled_heads();
  const int gpre = spec.head_pre ? spec.head_pre->group : 0, gpost = spec.head_post ? spec.head_post->group : 0;
  const size_t smem = smem_bytes<D>(G, kOut);
  MTA_CUDA_CHECK(cudaFuncSetAttribute(flash_mix_fwd_kernel<D, kOut>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(B * (H / G)), static_cast<unsigned>((T + kTile - 1) / kTile));
  flash_mix_fwd_kernel<D, kOut><<<grid, 32 * G, smem, s>>>(q, k, v, mpre, gpre, mpost, gpost, o, lse, H, T, G,
                                                          1.0f / std::sqrt(static_cast<float>(D)));
  MTA_CUDA_CHECK_LAUNCH("flash_mix_fwd_kernel");
}

template <int D>
void launch_forward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* mpre,
                    const float* mpost, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  launch_pass<D, false>(spec, q, k, v, mpre, mpost, o, lse, B, T, s);
  launch_pass<D, true>(spec, q, k, v, mpre, mpost, o, lse, B, T, s);
}

}  // namespace

bool flash_mix_supported(const AttentionSpec& spec, int D) {
  if (spec.kq_pre || spec.kq_post || spec.norm || spec.gate || spec.depth_scale_layer) return false;
  if (!spec.head_pre && !spec.head_post) return false;  // standard attention: flash_attn
  if (D != spec.head_dim || (D != 64 && D != 128)) return false;
  return spec.coupled_heads() <= (D == 64 ? 16 : 8);
}

void flash_mix_forward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* head_pre,
                       const float* head_post, bf16* o, float* lse, int B, int T, cudaStream_t s) {
  const int D = spec.head_dim;
  mix_require(flash_mix_supported(spec, D), "spec not covered (head_pre / head_post only, coupled heads <= 16 at "
                                            "head dim 64, <= 8 at 128)");
  mix_require(B >= 1 && T >= 1, "B and T must be >= 1");
  mix_require(static_cast<long long>(B) * spec.heads <= INT_MAX && (T + kTile - 1) / kTile <= 65535,
              "B * H or T too large");
  mix_require(q && k && v && o && lse, "null tensor");
  mix_require(!spec.head_pre || head_pre, "head_pre weights missing");
  mix_require(!spec.head_post || head_post, "head_post weights missing");
  if (D == 64) launch_forward<64>(spec, q, k, v, head_pre, head_post, o, lse, B, T, s);
  else launch_forward<128>(spec, q, k, v, head_pre, head_post, o, lse, B, T, s);
}

}  // namespace mta::cuda
