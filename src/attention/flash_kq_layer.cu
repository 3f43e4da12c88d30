// The fused kq layer, pass 1 (see flash_kq_layer.h and docs/flash-mta.md): lse of the mixed, convolved
// logits, without any T x T tensor in device memory.
//
// A CTA owns 16 query rows (m0 ..) of one batch element and one coupled group of G heads, one warp per
// head, as FlashMix does. Per block of 16 output keys (n0 ..), each warp:
//   1. adds the logits of the next key tile to a sliding window of its head's S0 (fp32 in shared
//      memory): rows m0 - 8 .. m0 + 15 (the query tile and up to cq - 1 <= 7 rows above it), keys in a
//      ring of 64 (column = key & 63, so key tiles t - 1, t, t + 1 are always present; tile -1 is the
//      zero padding left of the sequence). The Q fragments of rows m0 - 16 .. m0 + 15 stay in
//      registers;
//   2. convolves its head's window on CUDA cores in fp32: lane (r, half) computes row m0 + r, keys
//      n0 + 8 half .. + 7, with cq x ck taps from shared memory (compiled for the paper's 6 x 11 and
//      the toy's 2 x 9, runtime sizes otherwise);
//   3. with head_pre, puts C into the mixing buffer (hi + lo bf16), and after a barrier the group's
//      mixing product (head_mix_mma.cuh) gives C' of every head (a second barrier);
//   4. masks the future (-inf) and updates its rows' online max and sum (log2 domain).
// The S0 window and the K tile are the warp's own (program order and __syncwarp), the mixing buffers
// the CTA's (the barriers above, as in FlashMix's forward).
#include "attention/flash_kq_layer.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention/flash_common.cuh"
#include "attention/head_mix_mma.cuh"
#include "attention/mma_sm80.cuh"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;
using namespace mma;      // NOLINT: the kernels are written in terms of these primitives
using namespace headmix;  // NOLINT: kTile, kMaxG, the mixing buffers and products

void kq_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("flash_kq_layer: " + what);
}

constexpr int kMaxCq = 8, kMaxCk = 15;
constexpr int kWinRows = 24;       // S0 rows m0 - 8 .. m0 + 15
constexpr int kWinTop = 8;         // window row of query row m0
constexpr int kWinPitch = 68;      // floats per window row: a ring of 64 keys, padded (16-byte rows)
constexpr int kWinFloats = kWinRows * kWinPitch;

// Per warp: the S0 window, then the K tile [16][D + 8] bf16; the Q rows are staged there first
// ([32][D + 8] bf16 fits the two together).
template <int D>
constexpr size_t warp_region_bytes() {
  return kWinFloats * sizeof(float) + static_cast<size_t>(kTile) * (D + 8) * sizeof(bf16);
}
static_assert(warp_region_bytes<64>() >= 32 * (64 + 8) * sizeof(bf16), "Q staging fits the warp region");
static_assert(warp_region_bytes<128>() >= 32 * (128 + 8) * sizeof(bf16), "Q staging fits the warp region");

template <int D>
size_t smem_bytes(int G) {
  return static_cast<size_t>(G) * (warp_region_bytes<D>() + kMaxCq * kMaxCk * sizeof(float)) +
         kFragWords * sizeof(uint32_t) + 2 * static_cast<size_t>(kInElems) * sizeof(bf16) +
         static_cast<size_t>(G) * kXT * sizeof(float);
}

// kRows rows r0 .. of one head ([T][D] bf16 at `head`) into shared memory (row stride S) with one
// warp's lanes; rows outside [0, T) are zero-filled (`head` is their dummy source: T >= 1).
template <int D, int S, int kRows>
__device__ __forceinline__ void warp_load_rows_zero(bf16* smem, const bf16* head, int r0, int T, int lane) {
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < kRows * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, row = r0 + r;
    const bool ok = row >= 0 && row < T;
    cp_async_16(smem + r * S + col, ok ? head + static_cast<size_t>(row) * D + col : head, ok ? 16 : 0);
  }
}

// Key tile `tile` (keys 16 tile ..) of S0 into the window: rows m0 - 8 .. m0 + 15 from the products of
// the two 16-row Q tiles (rows m0 - 16 .. m0 - 1, of which the last 8 are kept, and m0 .. m0 + 15),
// scaled, the future set to 0. Keys at or past T are zero rows of K, so their S0 is 0 as well; a tile
// entirely in the rows' future is zero-filled without products.
template <int D, int S>
__device__ __forceinline__ void s0_tile_to_window(float* win, bf16* sKt, const bf16* k, const uint32_t (&qa0)[D / 16][4],
                                                  const uint32_t (&qa1)[D / 16][4], int tile, int m0, int T,
                                                  float scale, int lane) {
  const int g = lane >> 2, t = lane & 3, key0 = kTile * tile;
  if (key0 > m0 + kTile - 1) {  // every key after every row of the tile: S0 = 0
    for (int i = lane; i < kWinRows * kTile; i += 32) win[(i / kTile) * kWinPitch + ((key0 + i % kTile) & 63)] = 0.f;
    __syncwarp();
    return;
  }
  warp_load_rows_zero<D, S, kTile>(sKt, k, key0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  float acc0[2][4] = {}, acc1[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t bb[4];
    ldmatrix_x4(bb, sKt + bnk_offset(lane, 0, kk * 16, S));
    mma_bf16(acc0[0], qa0[kk], bb[0], bb[1]);
    mma_bf16(acc0[1], qa0[kk], bb[2], bb[3]);
    mma_bf16(acc1[0], qa1[kk], bb[0], bb[1]);
    mma_bf16(acc1[1], qa1[kk], bb[2], bb[3]);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key0 + 8 * j + 2 * t, col = key & 63;
      // Q tile 1: rows m0 + g + 8r, window rows 8 + g + 8r.
      const int row1 = m0 + g + 8 * r;
      *reinterpret_cast<float2*>(win + (kWinTop + g + 8 * r) * kWinPitch + col) =
          make_float2(key > row1 ? 0.f : acc1[j][2 * r] * scale, key + 1 > row1 ? 0.f : acc1[j][2 * r + 1] * scale);
      // Q tile 0: rows m0 - 16 + g + 8r; only r = 1 (rows m0 - 8 + g) is in the window (row g).
      if (r == 1) {
        const int row0 = m0 - kWinTop + g;
        *reinterpret_cast<float2*>(win + g * kWinPitch + col) =
            make_float2(key > row0 ? 0.f : acc0[j][2] * scale, key + 1 > row0 ? 0.f : acc0[j][3] * scale);
      }
    }
  __syncwarp();  // the window is read by other lanes; the K tile is reloaded next time
}

// C at row m0 + r, keys x0 + o .. x0 + o + 7 (x0 = the first S0 key read: n0 + 8 half - o), from the
// window and the head's taps W [cq][ck] in shared memory. kCq = 0: runtime sizes.
template <int kCq, int kCk>
__device__ __forceinline__ void conv_row8(const float* win, const float* w, int cq, int ck, int r, int x0,
                                          float (&out)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) out[e] = 0.f;
  if constexpr (kCq > 0) {
#pragma unroll
    for (int a = 0; a < kCq; ++a) {
      const float* row = win + (r + kWinTop - (kCq - 1) + a) * kWinPitch;
      float vals[8 + kCk - 1];
#pragma unroll
      for (int i = 0; i < 8 + kCk - 1; ++i) vals[i] = row[(x0 + i) & 63];
#pragma unroll
      for (int c = 0; c < kCk; ++c) {
        const float wc = w[a * kCk + c];
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = fmaf(wc, vals[e + c], out[e]);
      }
    }
  } else {
    for (int a = 0; a < cq; ++a) {
      const float* row = win + (r + kWinTop - (cq - 1) + a) * kWinPitch;
      for (int c = 0; c < ck; ++c) {
        const float wc = w[a * ck + c];
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = fmaf(wc, row[(x0 + e + c) & 63], out[e]);
      }
    }
  }
}

template <int D, int kCq, int kCk>
__global__ void __launch_bounds__(D == 64 ? 32 * kMaxG : 16 * kMaxG)
    flash_kq_layer_lse_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const float* __restrict__ wpre,
                              const float* __restrict__ mpre, int gpre, float* __restrict__ lse, int H, int T, int G,
                              int cq, int ck, int key_off, float scale) {
  constexpr int S = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* region = smem_raw + static_cast<size_t>(warp) * warp_region_bytes<D>();
  float* win = reinterpret_cast<float*>(region);
  bf16* sKt = reinterpret_cast<bf16*>(region + kWinFloats * sizeof(float));
  float* sW = reinterpret_cast<float*>(smem_raw + static_cast<size_t>(G) * warp_region_bytes<D>());
  uint32_t* sFrag = reinterpret_cast<uint32_t*>(sW + G * kMaxCq * kMaxCk);
  bf16* sInHi = reinterpret_cast<bf16*>(sFrag + kFragWords);
  bf16* sInLo = sInHi + kInElems;
  float* sOut = reinterpret_cast<float*>(sInLo + kInElems);

  const int units = H / G, b = blockIdx.x / units, u = blockIdx.x % units, h = u * G + warp;
  const size_t head = static_cast<size_t>(b * H + h) * T;
  const int m0 = ((T + kTile - 1) / kTile - 1 - static_cast<int>(blockIdx.y)) * kTile;  // heavy tiles first
  q += head * D, k += head * D, lse += head;
  float* myW = sW + warp * kMaxCq * kMaxCk;
  for (int i = lane; i < cq * ck; i += 32) myW[i] = wpre[static_cast<size_t>(h) * cq * ck + i];
  if (gpre) {
    build_frags(sFrag, mpre, gpre, nullptr, 0, u * G, G);
    zero_in(sInHi), zero_in(sInLo);
  }

  // Q rows m0 - 16 .. m0 + 15 as A fragments (two 16-row tiles), staged in the warp's region.
  bf16* stage = reinterpret_cast<bf16*>(region);
  warp_load_rows_zero<D, S, 2 * kTile>(stage, q, m0 - kTile, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  uint32_t qa0[D / 16][4], qa1[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qa0[kk], stage + a_offset(lane, 0, kk * 16, S));
    ldmatrix_x4(qa1[kk], stage + kTile * S + a_offset(lane, 0, kk * 16, S));
  }
  __syncwarp();
  for (int i = lane; i < kWinFloats / 4; i += 32) reinterpret_cast<float4*>(win)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  __syncwarp();
  __syncthreads();  // every warp's taps, the fragments, the zeroed MixIn

  const int r = lane & 15, half = lane >> 4, row = m0 + r;
  float row_max = -INFINITY, row_sum = 0.f;  // log2 domain; lanes r and r + 16 share row r
  const int n_end = min(T, m0 + kTile);
  s0_tile_to_window<D, S>(win, sKt, k, qa0, qa1, 0, m0, T, scale, lane);
  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    s0_tile_to_window<D, S>(win, sKt, k, qa0, qa1, n0 / kTile + 1, m0, T, scale, lane);
    float c[8];
    conv_row8<kCq, kCk>(win, myW, cq, ck, r, n0 + 8 * half - key_off, c);
    if (gpre) {
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        const int off = in_offset(warp, r, 8 * half + e);
        const __nv_bfloat162 hi = __floats2bfloat162_rn(c[e], c[e + 1]);
        *reinterpret_cast<__nv_bfloat162*>(sInHi + off) = hi;
        *reinterpret_cast<__nv_bfloat162*>(sInLo + off) =
            __floats2bfloat162_rn(c[e] - __low2float(hi), c[e + 1] - __high2float(hi));
      }
      __syncthreads();  // every head's C
      mix_tiles<true>(sInHi, sInLo, sFrag, kPre, sOut, G, warp, lane);
      __syncthreads();  // every head's C'
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        const float2 x = get_pair(sOut, warp, r, 8 * half + e);
        c[e] = x.x, c[e + 1] = x.y;
      }
    }
    // Second causal mask (the sequence end is in every valid row's future), then the online update.
    float mx = -INFINITY;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int key = n0 + 8 * half + e;
      c[e] = key <= row && key < T ? c[e] * kLog2e : -INFINITY;
      mx = fmaxf(mx, c[e]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    const float m_new = fmaxf(row_max, mx);  // finite: key 0 is visible to every row
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += exp2f(c[e] - m_new);
    row_sum = row_sum * exp2f(row_max - m_new) + sum;
    row_max = m_new;
    // No barrier here: the next block's MixIn writes follow this block's second barrier (every warp
    // has mixed), and its MixOut writes follow the next first barrier (every warp has read C').
  }
  const float l = row_sum + __shfl_xor_sync(0xffffffffu, row_sum, 16);
  if (half == 0 && row < T) lse[row] = row_max * kLn2 + logf(l);
}

template <int D, int kCq, int kCk>
void launch_lse(const AttentionSpec& spec, const bf16* q, const bf16* k, const float* wpre, const float* mpre,
                float* lse, int B, int T, cudaStream_t s) {
  const int H = spec.heads, G = spec.coupled_heads();
  const int gpre = spec.head_pre ? spec.head_pre->group : 0;
  const KqConv& kc = *spec.kq_pre;
  const size_t smem = smem_bytes<D>(G);
  auto kernel = flash_kq_layer_lse_kernel<D, kCq, kCk>;
  MTA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(B * (H / G)), static_cast<unsigned>((T + kTile - 1) / kTile));
  kernel<<<grid, 32 * G, smem, s>>>(q, k, wpre, mpre, gpre, lse, H, T, G, kc.q, kc.k, kc.key_offset(),
                                    1.0f / std::sqrt(static_cast<float>(D)));
  MTA_CUDA_CHECK_LAUNCH("flash_kq_layer_lse_kernel");
}

template <int D>
void dispatch_lse(const AttentionSpec& spec, const bf16* q, const bf16* k, const float* wpre, const float* mpre,
                  float* lse, int B, int T, cudaStream_t s) {
  const KqConv& kc = *spec.kq_pre;
  if (kc.q == 6 && kc.k == 11)
    launch_lse<D, 6, 11>(spec, q, k, wpre, mpre, lse, B, T, s);
  else if (kc.q == 2 && kc.k == 9)
    launch_lse<D, 2, 9>(spec, q, k, wpre, mpre, lse, B, T, s);
  else
    launch_lse<D, 0, 0>(spec, q, k, wpre, mpre, lse, B, T, s);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool flash_kq_layer_lse_supported(const AttentionSpec& spec, int D) {
  if (!spec.kq_pre || spec.kq_pre->q > kMaxCq || spec.kq_pre->k > kMaxCk) return false;
  if (D != spec.head_dim || (D != 64 && D != 128)) return false;
  return spec.coupled_heads() <= (D == 64 ? 16 : 8);
}

void flash_kq_layer_lse(const AttentionSpec& spec, const bf16* q, const bf16* k, const float* kq_pre,
                        const float* head_pre, float* lse, int B, int T, cudaStream_t s) {
  const int D = spec.head_dim;
  kq_require(flash_kq_layer_lse_supported(spec, D),
             "pass 1 needs kq_pre with cq <= 8, ck <= 15, head_dim 64 or 128 and at most 16 (D = 64) or 8 "
             "(D = 128) coupled heads");
  kq_require(B >= 1 && T >= 1, "B and T must be >= 1");
  kq_require(static_cast<long long>(B) * spec.heads <= INT_MAX && T <= 65535 * kTile, "B * H or T too large");
  kq_require(q && k && aligned16(q) && aligned16(k), "q and k must be non-null and 16-byte aligned");
  kq_require(kq_pre != nullptr && lse != nullptr, "the kq_pre weights and lse must be non-null");
  kq_require(!spec.head_pre || head_pre != nullptr, "head_pre is enabled but its weights are null");
  if (D == 64)
    dispatch_lse<64>(spec, q, k, kq_pre, head_pre, lse, B, T, s);
  else
    dispatch_lse<128>(spec, q, k, kq_pre, head_pre, lse, B, T, s);
}

}  // namespace mta::cuda
