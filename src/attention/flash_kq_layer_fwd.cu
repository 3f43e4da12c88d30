// The fused kq layer (see flash_kq_layer.h and docs/flash-mta.md), without any T x T tensor in device
// memory: pass 1 (below) computes lse of the mixed, convolved logits; pass 2 (further down) the output,
// recomputing the logits with the halos its post-softmax convolution needs; the backward's kernel P
// (post side, and delta) and kernel Q (pre side) are in flash_kq_layer_bwd.cu. Every pass runs one warp
// per head of a coupled group, in one CTA or on a cluster (GroupPlace; heads per CTA: lse_heads,
// kOutHeads, bwd_heads).
//
// Pass 1. A CTA owns 16 query rows (m0 ..) of one batch element and one coupled group of G heads, one
// warp per head, as FlashMix does. Per block of 16 output keys (n0 ..), each warp:
//   1. adds the logits of the next key tile to a sliding window of its head's S0 (fp32 in shared
//      memory): rows m0 - 8 .. m0 + 15 (the query tile and up to cq - 1 <= 7 rows above it), keys in a
//      ring of 64 (column = (key + o) & 63 with o the convolution's key offset, so that its reads
//      start at aligned columns; key tiles t - 1, t, t + 1 are always present; tile -1 is the
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
//
// Pass 2 and the forward's entry points follow; the device code they share with the backward
// (flash_kq_layer_bwd.cu) is in flash_kq_layer_device.cuh.
#include <algorithm>
#include <utility>

#include "attention/flash_kq_layer_device.cuh"

namespace mta::cuda {
namespace {

using namespace kq_layer;  // NOLINT: the shared device code (flash_kq_layer_device.cuh)

// kCl: the group spread over a cluster (9-16 heads at D = 128; at D = 64 one CTA holds 16).
template <int D, int kCq, int kCk, bool kCl>
__global__ void __launch_bounds__(D == 64 && !kCl ? 32 * kMaxG : 16 * kMaxG)
    flash_kq_layer_lse_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const float* __restrict__ wpre,
                              const float* __restrict__ mpre, int gpre, float* __restrict__ lse, int H, int T, int G,
                              int cq, int ck, int key_off, float scale) {
  constexpr int S = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* region = smem_raw + static_cast<size_t>(warp) * warp_region_bytes<D>();
  float* win = reinterpret_cast<float*>(region);
  bf16* sKt = reinterpret_cast<bf16*>(region + kWinFloats * sizeof(float));
  const int C = kCl ? cluster_ctas() : 1;  // CTAs per group (kCl: a cluster; one-CTA groups carry no cluster code)
  const int L = group_warps(G, C);  // the CTA's warps (padding included)
  float* sW = reinterpret_cast<float*>(smem_raw + static_cast<size_t>(L) * warp_region_bytes<D>());
  constexpr int kTapRows = kCq > 0 ? kCq : kMaxCq;
  uint32_t* sFrag = reinterpret_cast<uint32_t*>(sW + L * kTapRows * kTapPitch);
  bf16* sInHi = reinterpret_cast<bf16*>(sFrag + kFragWords);
  bf16* sInLo = sInHi + kInElems;
  float* sOut = reinterpret_cast<float*>(sInLo + kInElems);

  const KqPlace pl = kq_place(H, T, G, C, warp);
  const GroupPlace gp = pl.gp;
  const int m0 = pl.m0;
  q += pl.head * D, k += pl.head * D, lse += pl.head;
  float* myW = sW + warp * kTapRows * kTapPitch;
  load_taps(myW, wpre, pl.h, cq, ck, lane);
  if (gpre) {
    build_frags(sFrag, mpre, gpre, nullptr, 0, pl.u * G, G);
    zero_in(sInHi), zero_in(sInLo);
  }

  QFrags<D> qf;  // Q rows m0 - 16 .. m0 + 15, staged in the warp's region
  load_row_frags(reinterpret_cast<bf16*>(region), q, m0 - kTile, T, lane, qf);
  warp_zero(win, kWinFloats, lane);
  __syncwarp();
  group_start(gp);  // every warp's taps, the fragments, the zeroed MixIn

  const int r = lane & 15, half = lane >> 4, row = m0 + r;
  float row_max = -INFINITY, row_sum = 0.f;  // log2 domain; lanes r and r + 16 share row r
  const int n_end = min(T, m0 + kTile);
  s0_tile_to_window<D, S, kWinTop>(win, sKt, k, qf, 0, m0, T, scale, key_off, lane);
  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    s0_tile_to_window<D, S, kWinTop>(win, sKt, k, qf, n0 / kTile + 1, m0, T, scale, key_off, lane);
    float c[8];
    conv_row8<kCq, kCk>(win, myW, cq, ck, kWinTop + r, n0 + 8 * half, c);
    if (gpre) mix_in_place(c, sInHi, sInLo, sFrag, kPre, sOut, gp, warp, lane);  // C -> C'  (two barriers)
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
  group_finish(gp);
  const float l = row_sum + __shfl_xor_sync(0xffffffffu, row_sum, 16);
  if (half == 0 && row < T && pl.real) lse[row] = row_max * kLn2 + logf(l);
}

// ---------------------------------------------------------------------------------------------
// Pass 2: O = A3 V. Per block of 16 output keys (n0 = 16 kt), each warp (head):
//   1. adds S0 of key tile kt + 2 to its S0 window (rows m0 - 16 .. m0 + 15, ring of 64 keys);
//   2. computes A of key tile kt + 1 on rows m0 - 8 .. m0 + 15 into its A window (same ring): the pre
//      convolution, the head_pre mix (two 16-row parts: one product for both where the group fits
//      one CTA, mix_in_place2; else a product each, between barriers),
//      A = exp(C' - lse) with pass 1's lse, 0 in the future and outside the sequence;
//   3. convolves its A window with the kq_post taps (rows m0 .. m0 + 15, keys n0 ..): A2, the future
//      set to 0; mixes it with head_post (A3); stages A3 in its MixOut rows;
//   4. O += A3 V with A3 rounded to bf16 (as FlashAttention rounds P), V tile n0 .. in the warp's tile
//      buffer (K's, once S0 is done).
// A layer without kq_post uses the identity 1 x 1 taps (the rows above the tile are then unused).


template <int D>
constexpr size_t warp_region_out_bytes() {
  return (kS0Floats + kAFloats) * sizeof(float) + static_cast<size_t>(kTile) * (D + 8) * sizeof(bf16);
}
static_assert(kS0Floats * sizeof(float) >= 32 * (128 + 8) * sizeof(bf16), "Q staging fits the S0 window");

// tiles: MixOut's tiles per head (2 in one CTA: mix_in_place2); in_pairs: MixIn hi / lo pairs (2 on a
// cluster: mix_in_place2_cl, the second after MixOut).
template <int D>
constexpr size_t smem_out_bytes(int G, int tiles, int in_pairs = 1) {
  return static_cast<size_t>(G) * (warp_region_out_bytes<D>() + 2 * kMaxCq * kTapPitch * sizeof(float)) +
         kFragWords * sizeof(uint32_t) + 2 * static_cast<size_t>(in_pairs) * kInElems * sizeof(bf16) +
         static_cast<size_t>(tiles) * G * kXT * sizeof(float);
}
static_assert(smem_out_bytes<64>(kOutHeads, 2) <= kMaxSmemPerCta && smem_out_bytes<128>(kOutHeads, 2) <= kMaxSmemPerCta &&
                  smem_out_bytes<64>(kOutHeads, 1, 2) <= kMaxSmemPerCta &&
                  smem_out_bytes<128>(kOutHeads, 1, 2) <= kMaxSmemPerCta,
              "pass 2's CTAs fit their heads' shared memory");

template <int D, int kCq1, int kCk1, int kCq2, int kCk2, bool kCl>
__global__ void __launch_bounds__(16 * kMaxG, kCl ? 1 : 0)
    flash_kq_layer_out_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                              const float* __restrict__ wpre, const float* __restrict__ mpre, int gpre,
                              const float* __restrict__ wpost, const float* __restrict__ mpost, int gpost,
                              const float* __restrict__ lse, bf16* __restrict__ o, float* __restrict__ o32, int H,
                              int T, int G, int cq1,
                              int ck1, int off1, int cq2, int ck2, int off2, float scale) {
  const int C = kCl ? cluster_ctas() : 1;  // CTAs per group (kCl: a cluster; one-CTA groups carry no cluster code)
  constexpr int S = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* region = smem_raw + static_cast<size_t>(warp) * warp_region_out_bytes<D>();
  float* s0win = reinterpret_cast<float*>(region);
  float* awin = s0win + kS0Floats;
  bf16* sTile = reinterpret_cast<bf16*>(awin + kAFloats);  // K, then V, then the output rows
  const int L = group_warps(G, C);  // the CTA's warps (padding included)
  const KqShared sh = kq_shared(smem_raw + static_cast<size_t>(L) * warp_region_out_bytes<D>(), L, false);
  const uint32_t* sFrag = sh.frag;
  bf16 *sInHi = sh.in_hi, *sInLo = sh.in_lo;
  float* sOut = sh.out;
  const KqPlace pl = kq_place(H, T, G, C, warp);
  const GroupPlace gp = pl.gp;
  const int m0 = pl.m0;
  q += pl.head * D, k += pl.head * D, v += pl.head * D, lse += pl.head;
  if (o) o += pl.head * D;
  if (o32) o32 += pl.head * D;
  const float* myWpre = sh.wpre + warp * kHeadTaps;
  const float* myWpost = sh.wpost + warp * kHeadTaps;
  // The pre mix's two parts in one exchange: in one CTA (<= kOutHeads) one product with block-diagonal
  // coefficients; on a cluster through a second MixIn pair after MixOut (smem_out_bytes' in_pairs).
  constexpr bool kTwo = true;
  bf16* sInHi1 = kCl ? reinterpret_cast<bf16*>(sOut + L * kXT) : nullptr;
  bf16* sInLo1 = kCl ? sInHi1 + kInElems : nullptr;
  load_taps_and_mix(sh, pl, wpre, cq1, ck1, wpost, cq2, ck2, mpre, gpre, mpost, gpost, G, warp, lane, kCl ? 1 : 2);
  if (kCl && gpre) zero_in(sInHi1), zero_in(sInLo1);  // padding slots stay zero

  QFrags<D> qf;  // Q rows m0 - 16 .. m0 + 15, staged in the S0 window
  load_row_frags(reinterpret_cast<bf16*>(s0win), q, m0 - kTile, T, lane, qf);
  warp_zero(s0win, kS0Floats + kAFloats, lane);
  const int r = lane & 15, half = lane >> 4, g = lane >> 2, t = lane & 3;
  float lse2[2];
  a_rows_lse2(lse, m0, T, r, lse2);
  __syncwarp();
  group_start(gp);  // every warp's taps, the fragments, the zeroed MixIn

  float acc_o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc_o[j][0] = acc_o[j][1] = acc_o[j][2] = acc_o[j][3] = 0.f;
  s0_tile_to_window<D, S, kS0Top>(s0win, sTile, k, qf, 0, m0, T, scale, off1, lane);
  s0_tile_to_window<D, S, kS0Top>(s0win, sTile, k, qf, 1, m0, T, scale, off1, lane);
  a_tile_to_window<kCq1, kCk1, kTwo>(awin, s0win, myWpre, cq1, ck1, off2, gpre, sInHi, sInLo, sFrag, sOut, gp, warp,
                                     lane, 0, m0, T, lse2, sInHi1, sInLo1);
  const int n_end = min(T, m0 + kTile), row = m0 + r;
  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    const int kt = n0 / kTile;
    s0_tile_to_window<D, S, kS0Top>(s0win, sTile, k, qf, kt + 2, m0, T, scale, off1, lane);
    // V of the output keys into the tile buffer (K is done with), landing while A and A2 are computed.
    warp_load_rows_zero<D, S, kTile>(sTile, v, n0, T, lane);
    cp_async_commit();
    a_tile_to_window<kCq1, kCk1, kTwo>(awin, s0win, myWpre, cq1, ck1, off2, gpre, sInHi, sInLo, sFrag, sOut, gp,
                                       warp, lane, kt + 1, m0, T, lse2, sInHi1, sInLo1);
    float a2[8];
    conv_row8<kCq2, kCk2>(awin, myWpost, cq2, ck2, kATop + r, n0 + 8 * half, a2);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (n0 + 8 * half + e > row) a2[e] = 0.f;  // A2: the future set to 0 (keys past T are in it)
    if (gpost) {
      mix_in_place(a2, sInHi, sInLo, sFrag, kPost, sOut, gp, warp, lane);
    }
    // A3 into this warp's MixOut rows (already there after the mix), then read back as A fragments.
#pragma unroll
    for (int e = 0; e < 8; e += 2)
      *reinterpret_cast<float2*>(sOut + out_offset(warp, r, 8 * half + e)) = make_float2(a2[e], a2[e + 1]);
    cp_async_wait_all();
    __syncwarp();
    uint32_t a[4];
    {
      const float2 p0 = get_pair(sOut, warp, g, 2 * t), p1 = get_pair(sOut, warp, g + 8, 2 * t);
      const float2 p2 = get_pair(sOut, warp, g, 2 * t + 8), p3 = get_pair(sOut, warp, g + 8, 2 * t + 8);
      a[0] = pack_bf16(p0.x, p0.y), a[1] = pack_bf16(p1.x, p1.y), a[2] = pack_bf16(p2.x, p2.y);
      a[3] = pack_bf16(p3.x, p3.y);
    }
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, sTile + bkn_offset(lane, 0, dn * 16, S));
      mma_bf16(acc_o[2 * dn], a, bb[0], bb[1]);
      mma_bf16(acc_o[2 * dn + 1], a, bb[2], bb[3]);
    }
    __syncwarp();  // every lane has read its A fragments and V before either is overwritten
  }

  // O rows in fp32 as well, when asked (the epilogue's backward needs the core's output unrounded:
  // its gradient is nearly orthogonal to it, and the mixing gradients sum what is left).
  if (o32 && pl.real) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int orow = m0 + g + 8 * rr;
        if (orow < T)
          *reinterpret_cast<float2*>(o32 + static_cast<size_t>(orow) * D + 8 * j + 2 * t) =
              make_float2(acc_o[j][2 * rr], acc_o[j][2 * rr + 1]);
      }
  }
  group_finish(gp);
  // O rows (A3 carries the softmax's normalization), staged through the tile buffer, 16-byte stores;
  // none when only the fp32 rows are asked for (an epilogue then reads those).
  if (!o || !pl.real) return;
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
      *reinterpret_cast<uint32_t*>(sTile + (g + 8 * rr) * S + 8 * j + 2 * t) =
          pack_bf16(acc_o[j][2 * rr], acc_o[j][2 * rr + 1]);
  __syncwarp();
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int cc = lane; cc < kTile * kChunksPerRow; cc += 32) {
    const int rr = cc / kChunksPerRow, col = (cc % kChunksPerRow) * 8, orow = m0 + rr;
    if (orow < T)
      *reinterpret_cast<uint4*>(o + static_cast<size_t>(orow) * D + col) =
          *reinterpret_cast<const uint4*>(sTile + rr * S + col);
  }
}

template <int D, int kCq, int kCk>
void launch_lse(const AttentionSpec& spec, const bf16* q, const bf16* k, const float* wpre, const float* mpre,
                float* lse, int B, int T, cudaStream_t s) {
  const int H = spec.heads, G = spec.coupled_heads();
  const int gpre = spec.head_pre ? spec.head_pre->group : 0;
  const KqConv kc = pre_conv(spec);
  const int C = cluster_size(G, lse_heads(D));  // 1 at D = 64
  const size_t smem = smem_bytes<D, (kCq > 0 ? kCq : kMaxCq)>(group_warps(G, C));
  auto kernel = flash_kq_layer_lse_kernel<D, kCq, kCk, false>;
  if constexpr (D == 128)
    if (C > 1) kernel = flash_kq_layer_lse_kernel<D, kCq, kCk, true>;
  // The whole shared memory for L1's share: two CTAs per SM where they fit (smem_bytes).
  MTA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  launch_grouped(kernel, B, H, G, C, T, smem, s, q, k, spec.kq_pre ? wpre : nullptr, mpre, gpre, lse, H, T, G, kc.q,
                 kc.k, kc.key_offset(), 1.0f / std::sqrt(static_cast<float>(D)));
}

template <int D>
void dispatch_lse(const AttentionSpec& spec, const bf16* q, const bf16* k, const float* wpre, const float* mpre,
                  float* lse, int B, int T, cudaStream_t s) {
  const KqConv kc = pre_conv(spec);
  if (kc.q == 6 && kc.k == 11)
    launch_lse<D, 6, 11>(spec, q, k, wpre, mpre, lse, B, T, s);
  else if (kc.q == 2 && kc.k == 9)
    launch_lse<D, 2, 9>(spec, q, k, wpre, mpre, lse, B, T, s);
  else
    launch_lse<D, 0, 0>(spec, q, k, wpre, mpre, lse, B, T, s);
}

template <int D, int kCq1, int kCk1, int kCq2, int kCk2>
void launch_out(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* wpre,
                const float* mpre, const float* wpost, const float* mpost, const float* lse, bf16* o, float* o32, int B,
                int T, cudaStream_t s) {
  const int H = spec.heads, G = spec.coupled_heads();
  const int gpre = spec.head_pre ? spec.head_pre->group : 0, gpost = spec.head_post ? spec.head_post->group : 0;
  const KqConv pre = pre_conv(spec);
  const KqConv post = post_conv(spec);
  const int C = cluster_size(G, kOutHeads);
  const size_t smem = smem_out_bytes<D>(group_warps(G, C), C == 1 ? 2 : 1, C == 1 ? 1 : 2);
  auto kernel = C == 1 ? flash_kq_layer_out_kernel<D, kCq1, kCk1, kCq2, kCk2, false>
                       : flash_kq_layer_out_kernel<D, kCq1, kCk1, kCq2, kCk2, true>;
  launch_grouped(kernel, B, H, G, C, T, smem, s, q, k, v, spec.kq_pre ? wpre : nullptr, mpre, gpre,
                 spec.kq_post ? wpost : nullptr, mpost, gpost, lse, o, o32, H, T, G, pre.q, pre.k, pre.key_offset(),
                 post.q, post.k, post.key_offset(), 1.0f / std::sqrt(static_cast<float>(D)));
}

template <int D>
void dispatch_out(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const float* wpre,
                  const float* mpre, const float* wpost, const float* mpost, const float* lse, bf16* o, float* o32, int B,
                  int T, cudaStream_t s) {
  if (paper_sizes(spec))
    launch_out<D, 6, 11, 6, 11>(spec, q, k, v, wpre, mpre, wpost, mpost, lse, o, o32, B, T, s);
  else
    launch_out<D, 0, 0, 0, 0>(spec, q, k, v, wpre, mpre, wpost, mpost, lse, o, o32, B, T, s);
}

}  // namespace

bool flash_kq_layer_forward_supported(const AttentionSpec& spec, int D) {
  if (!flash_kq_layer_lse_supported(spec, D)) return false;
  if (spec.kq_post && (spec.kq_post->q > kMaxCq || spec.kq_post->k > kMaxCk)) return false;
  return cluster_size(spec.coupled_heads(), kOutHeads) > 0;
}

void flash_kq_layer_forward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v,
                            const float* kq_pre, const float* head_pre, const float* kq_post, const float* head_post,
                            bf16* o, float* lse, int B, int T, cudaStream_t s, float* o32) {
  const int D = spec.head_dim;
  kq_require(flash_kq_layer_forward_supported(spec, D),
             "the forward needs kq_pre or kq_post (each with cq <= 8, ck <= 15), head_dim 64 or 128 and at "
             "most 16 coupled heads");
  kq_require(v && aligned16(v) && (o || o32) && (!o || aligned16(o)),
             "v must be non-null and 16-byte aligned, and o (16-byte aligned) or o32 non-null");
  kq_require(!spec.kq_post || kq_post != nullptr, "kq_post is enabled but its weights are null");
  kq_require(!spec.head_post || head_post != nullptr, "head_post is enabled but its weights are null");
  flash_kq_layer_lse(spec, q, k, kq_pre, head_pre, lse, B, T, s);
  if (D == 64)
    dispatch_out<64>(spec, q, k, v, kq_pre, head_pre, kq_post, head_post, lse, o, o32, B, T, s);
  else
    dispatch_out<128>(spec, q, k, v, kq_pre, head_pre, kq_post, head_post, lse, o, o32, B, T, s);
}

bool flash_kq_layer_lse_supported(const AttentionSpec& spec, int D) {
  if (!spec.kq_pre && !spec.kq_post) return false;  // head mixing alone is flash_mix.h's
  if (spec.kq_pre && (spec.kq_pre->q > kMaxCq || spec.kq_pre->k > kMaxCk)) return false;
  if (D != spec.head_dim || (D != 64 && D != 128)) return false;
  const int G = spec.coupled_heads();
  return G <= kMaxG && cluster_size(G, lse_heads(D)) > 0;
}

void flash_kq_layer_lse(const AttentionSpec& spec, const bf16* q, const bf16* k, const float* kq_pre,
                        const float* head_pre, float* lse, int B, int T, cudaStream_t s) {
  const int D = spec.head_dim;
  kq_require(flash_kq_layer_lse_supported(spec, D),
             "pass 1 needs kq_pre or kq_post (each with cq <= 8, ck <= 15), head_dim 64 or 128 and at most 16 "
             "coupled heads");
  kq_require(B >= 1 && T >= 1, "B and T must be >= 1");
  kq_require(static_cast<long long>(B) * spec.heads <= INT_MAX && T <= 65535 * kTile, "B * H or T too large");
  kq_require(q && k && aligned16(q) && aligned16(k), "q and k must be non-null and 16-byte aligned");
  kq_require(lse != nullptr, "lse must be non-null");
  kq_require(!spec.kq_pre || kq_pre != nullptr, "kq_pre is enabled but its weights are null");
  kq_require(!spec.head_pre || head_pre != nullptr, "head_pre is enabled but its weights are null");
  if (D == 64)
    dispatch_lse<64>(spec, q, k, kq_pre, head_pre, lse, B, T, s);
  else
    dispatch_lse<128>(spec, q, k, kq_pre, head_pre, lse, B, T, s);
}

}  // namespace mta::cuda
