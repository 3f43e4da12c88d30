// The fused kq layer's backward (see flash_kq_layer.h and docs/flash-mta.md): kernel P (the post side,
// and delta) and kernel Q (the pre side), as tests/oracle/replay_kq_layer_backward.py designed them, with
// the device code they share with the forward in flash_kq_layer_device.cuh.
#include <algorithm>
#include <utility>

#include "attention/flash_kq_layer_device.cuh"

namespace mta::cuda {
namespace {

using namespace kq_layer;  // NOLINT: the shared device code (flash_kq_layer_device.cuh)

// The largest magnitude of v's n bf16 values into *vmax (zeroed before: non-negative floats order as their
// bits), for kernel Q's fp16 V operand (da2_tile_to_window).
__global__ void abs_max_kernel(const bf16* __restrict__ v, size_t n, float* __restrict__ vmax) {
  float mx = 0.f;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    mx = fmaxf(mx, fabsf(__bfloat162float(v[i])));
  mx = warp_max(mx);
  if ((threadIdx.x & 31) == 0) atomicMax(reinterpret_cast<int*>(vmax), __float_as_int(mx));
}

// ---------------------------------------------------------------------------------------------
// The backward's dA2 window (kernel Q; until session 13 also a delta pass of its own, whose row sums
// kernel P now gives: add_delta_terms): dA3 = dO V^T, dA2 = the future set to 0 in the head_post^T mix of
// dA3, on rows m0 .. m0 + 23 (the transposed kq_post convolution on the query tile's rows reads cq - 1
// <= 7 rows below each row), its ring rotated by ck2 - 1 - o2 so that the transposed stencil reads aligned
// columns.
constexpr int kDRows = 24;  // the dA2 window: rows m0 .. m0 + 23

// Rows 0 .. 31 of dO (bf16, rows of S at `rows`), plus dO_lo's (rows of S at `lo`, may be null), in place as
// fp16, each row scaled by f16_scale_for its largest magnitude (lane = row), and into inv[32] the inverse
// of each row's scale times `other` (the other operand's scale: the product's). With dO_lo, dO + dO_lo (an
// fp32 gradient split as bf16 hi + lo) keeps 11 significant bits where bf16 holds 8. Every lane of the
// warp must call it.
template <int D, int S>
__device__ __forceinline__ void rows_to_scaled_f16(bf16* rows, const bf16* lo, float other, float* inv, int lane) {
  bf16* row = rows + lane * S;
  const bf16* lrow = lo ? lo + lane * S : nullptr;
  auto values = [&](int c, float (&x)[8]) {
    const uint4 h = *reinterpret_cast<const uint4*>(row + c);
    const uint4 l = lrow ? *reinterpret_cast<const uint4*>(lrow + c) : make_uint4(0u, 0u, 0u, 0u);
    const uint32_t hw[4] = {h.x, h.y, h.z, h.w}, lw[4] = {l.x, l.y, l.z, l.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 hb = *reinterpret_cast<const __nv_bfloat162*>(&hw[i]);
      const __nv_bfloat162 lb = *reinterpret_cast<const __nv_bfloat162*>(&lw[i]);
      x[2 * i] = __low2float(hb) + __low2float(lb);
      x[2 * i + 1] = __high2float(hb) + __high2float(lb);
    }
  };
  float mx = 0.f;
  for (int c = 0; c < D; c += 8) {
    float x[8];
    values(c, x);
#pragma unroll
    for (int e = 0; e < 8; ++e) mx = fmaxf(mx, fabsf(x[e]));
  }
  const float s = f16_scale_for(mx);
  for (int c = 0; c < D; c += 8) {
    float x[8];
    values(c, x);
    *reinterpret_cast<uint4*>(row + c) = make_uint4(pack_f16(x[0] * s, x[1] * s), pack_f16(x[2] * s, x[3] * s),
                                                    pack_f16(x[4] * s, x[5] * s), pack_f16(x[6] * s, x[7] * s));
  }
  inv[lane] = 1.f / (s * other);  // powers of two: exact
}

// Key tile `tile` of dA2 for rows m0 .. m0 + 23 into the dA2 window (ring rotated by `rot`): dA3 from the
// dO fragments (rows m0 .. m0 + 15 and m0 + 16 .. m0 + 31, of which rows up to m0 + 23 are kept; zero past
// T; fp16 scaled by rows_to_scaled_f16;
// inv_row: the inverse of each row's scale times V's) and the V tile (zero past T; here in place as fp16
// scaled by f16_scale_for V's largest magnitude *vmax, exact for bf16 values), the Mpost^T mix of both
// 16-row parts in one exchange when gpost, the future set to 0. A tile entirely in the future of row
// m0 + 23 is zero-filled; that test is the same for every warp of the CTA, so all of them take the mix's
// barriers or none does.
// Why fp16 (session 13): kernel P's delta sums dA3 from dO + dO_lo (an epilogue's fp32 gradient); with
// dA3 from bf16 dO alone here, dC' = A (dA - delta) lost its zero row sums by dO_lo's share, and the
// 4-head model's pre-side gradients moved 10-30% further from the CPU's (ModelCuda, call 3).
// kCl: the group on a cluster (mix_in_place2_cl, with the second MixIn pair hi1, lo1), else in one CTA
// (mix_in_place2, MixOut holding two tiles per head).
template <int D, int S, class R, bool kCl, class F>
__device__ __forceinline__ void da2_tile_to_window(float* dwin, bf16* sVt, const bf16* v, const float* vmax,
                                                   const F& dof, const float* inv_row, int tile, int m0, int T,
                                                   int rot, int gpost, bf16* sInHi, bf16* sInLo,
                                                   const uint32_t* sFrag, float* sOut, const GroupPlace& gp, int warp,
                                                   int lane, bf16* hi1 = nullptr, bf16* lo1 = nullptr) {
  const int g = lane >> 2, t = lane & 3, key0 = kTile * tile;
  if (key0 > m0 + kDRows - 1) {
    for (int i = lane; i < kDRows * kTile; i += 32)
      dwin[(i / kTile) * R::kPitch + R::col(key0 + i % kTile + rot)] = 0.f;
    __syncwarp();
    return;
  }
  warp_load_rows_zero<D, S, kTile>(sVt, v, key0, T, lane);
  // One scale for all of V, from abs_max_kernel's maximum (a scale per tile, read or computed here,
  // made ptxas spill 30-170 bytes more in kernel Q; session 13).
  const float sv = f16_scale_for(*vmax);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  constexpr int kChunks = kTile * D / 8;  // 16-byte chunks of the V tile
#pragma unroll 1
  for (int c = lane; c < kChunks; c += 32) {
    uint4* p = reinterpret_cast<uint4*>(sVt + (c / (D / 8)) * S + (c % (D / 8)) * 8);
    const uint4 u = *p;
    uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&w[i]);
      w[i] = pack_f16(__low2float(b) * sv, __high2float(b) * sv);
    }
    *p = make_uint4(w[0], w[1], w[2], w[3]);
  }
  __syncwarp();
  float acc0[2][4] = {}, acc1[2][4] = {};
  two_tile_mma<D, S, true>(acc0, acc1, sVt, dof, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float i0 = inv_row[g + 8 * r], i1 = inv_row[kTile + g + 8 * r];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int key = key0 + 8 * j + 2 * t, c0 = R::col(key + rot), c1 = R::col(key + 1 + rot);
      float* w0 = dwin + (g + 8 * r) * R::kPitch;
      float* w1 = dwin + (kTile + g + 8 * r) * R::kPitch;
      w0[c0] = acc0[j][2 * r] * i0, w0[c1] = acc0[j][2 * r + 1] * i0;
      if (kTile + 8 * r + 8 <= kDRows) w1[c0] = acc1[j][2 * r] * i1, w1[c1] = acc1[j][2 * r + 1] * i1;
    }
  }
  __syncwarp();  // each lane now mixes and masks the positions of its own row r and keys 8 half ..
  const int r = lane & 15, half = lane >> 4;
  float x[2][8];
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    const float* wrow = dwin + (kTile * part + r) * R::kPitch;
    const bool live = kTile * part + r < kDRows;  // every lane takes the mix
#pragma unroll
    for (int e = 0; e < 8; ++e) x[part][e] = live ? wrow[R::col(key0 + 8 * half + e + rot)] : 0.f;
  }
  if (gpost && kCl) mix_in_place2_cl(x[0], x[1], sInHi, sInLo, hi1, lo1, sFrag, kPostT, sOut, gp, warp, lane);
  if (gpost && !kCl) mix_in_place2(x[0], x[1], sInHi, sInLo, sFrag, kPostT, sOut, gp, warp, lane);
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    float* wrow = dwin + (kTile * part + r) * R::kPitch;
    const int row = m0 + kTile * part + r;
    if (kTile * part + r < kDRows) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int key = key0 + 8 * half + e;
        wrow[R::col(key + rot)] = key > row ? 0.f : x[part][e];
      }
    }
  }
  __syncwarp();  // the window is read by other lanes; the V tile buffer is reloaded next time
}

// ---------------------------------------------------------------------------------------------
// Backward, kernel P (the post side of the main pass; designed and replayed in float64 by
// tests/oracle/replay_kq_layer_backward.py, kernel_p): pass 2's CTA, windows and schedule (S0 rows
// m0 - 16 .. m0 + 15, A rows m0 - 8 .. m0 + 15, key tile kt + 2 of S0 and kt + 1 of A computed while
// block kt is used; here on rings of 48 keys, and A's two 16-row parts through one pre-mix exchange as in
// pass 2: session 18), and per block of 16 keys, with the tile's dO rows (A fragments in registers, the
// rows in shared memory as dV's B operand):
//   A2 = mask0(conv_post(A)) and A3 = Mpost A2 on the tile's rows, as pass 2;
//   dV[block keys] += A3^T dO          (float2 atomics into an fp32 accumulator: every query tile adds);
//   dA3 = dO V^T;  dMpost += dA3_x . A2_y   (tensor-core products with hi + lo operands, A2_y read
//                                           back from the mix's input: grad_terms_and_mix / grad_terms_cl);
//   dA2 = mask0(Mpost^T dA3) (the mix with hi + lo operands);
//   dWpost[a, c] += dA2[i, j] A[i - (cq2 - 1) + a, j - o2 + c] over the
//   tile's rows (the A window, whose rotation o2 aligns these reads as the forward stencil's): per lane
//   in registers for the compiled 6 x 11, per warp in shared memory (a warp sum per tap) otherwise.
// At the end each CTA writes partials (dWpost and dMpost per warp, i.e. per head), which
// reduce_partials_kernel sums over the CTAs in a fixed order, and adds delta's terms from the lanes'
// dWpost terms (add_delta_terms; this replaced the backward's first pass, session 13). At D = 64 and 8
// heads the windows, tiles and mixing buffers take 210-222 KB (smem_post_bytes); at D = 128 (4 heads per
// CTA) the Q rows are kept in shared memory too. With dout_lo (dout's bf16 remainder, from an epilogue's
// fp32 gradient) dA3 = (dO + dO_lo) V^T: the post-side gradients sum what the norm leaves of dO.
constexpr int kWStride = kMaxCq * kMaxCk;      // floats per (CTA, head) convolution-gradient partial

// This warp's per-CTA partials (slot = (the group's CTA row * G + its head in the group)): the
// convolution's weight gradient (cq x ck, from the lanes' accw for the compiled sizes kCq x kCk, or the
// warp's sDw rows for runtime sizes) when has_w, and its head's mixing-gradient row (dm[y], y < gs)
// when gs > 0, each summed over the lanes.
template <int kCq, int kCk, int kDm>
__device__ __forceinline__ void write_partials(float* part_w, float* part_m, size_t slot, bool has_w,
                                               const float (&accw)[kCq > 0 ? kCq : 1][kCk > 0 ? kCk : 1],
                                               const float* sDw, int cq, int ck, int gs, const float (&dm)[kDm],
                                               int lane) {
  if (has_w) {
    float* pw = part_w + slot * kWStride;
    if constexpr (kCq > 0) {
#pragma unroll
      for (int a = 0; a < kCq; ++a)
#pragma unroll
        for (int c = 0; c < kCk; ++c) {
          const float sum = warp_sum(accw[a][c]);
          if (lane == 0) pw[a * kCk + c] = sum;
        }
    } else {
      __syncwarp();
      for (int i = lane; i < cq * ck; i += 32) pw[i] = sDw[(i / ck) * kTapPitch + i % ck];
    }
  }
#pragma unroll
  for (int yy = 0; yy < kDm; ++yy)
    if (yy < gs) {
      const float sum = warp_sum(dm[yy]);
      if (lane == 0) part_m[slot * kMaxG + yy] = sum;
    }
}

// Kernel P's windows are pass 2's rows on rings of 48 keys (session 18): three key tiles are all it
// reads (S0 tiles kt .. kt + 2, A tiles kt - 1 .. kt + 1; replay_kq_layer_backward.py runs kernel_p on
// rings of 48 and asserts every tile it reads), and the 3.5 KB per warp this saves against rings of 64
// make room for the pre mix's second MixOut tile (one CTA) or second MixIn pair (clusters).
constexpr int kPS0Floats = (kS0Top + kTile) * Ring48::kPitch, kPAFloats = (kATop + kTile) * Ring48::kPitch;
static_assert(kPS0Floats * sizeof(float) >= 32 * (64 + 8) * sizeof(bf16), "Q staging fits kernel P's S0 window");

template <int D>
constexpr size_t warp_region_post_bytes() {
  return (kPS0Floats + kPAFloats) * sizeof(float) + 3 * static_cast<size_t>(kTile) * (D + 8) * sizeof(bf16) +
         kept_rows_bytes<D>(1);
}

// cl: on a cluster. two: the pre mix's two parts in one exchange, with MixOut's second tile per head in
// one CTA (mix_in_place2), with a second MixIn pair after MixOut on a cluster (mix_in_place2_cl).
template <int D>
constexpr size_t smem_post_bytes(int G, bool cl, bool two) {
  return static_cast<size_t>(G) * (warp_region_post_bytes<D>() + 3 * kHeadTaps * sizeof(float)) +
         kFragWords * sizeof(uint32_t) + 2 * static_cast<size_t>(kInElems) * sizeof(bf16) +
         (two && !cl ? 2 : 1) * static_cast<size_t>(G) * kXT * sizeof(float) +
         (two && cl ? 2 * static_cast<size_t>(kInElems) * sizeof(bf16) : 0);
}
// Whether the second MixIn pair fits a cluster's CTA: at D = 64 (8 heads) 227,456 of 232,448 bytes, at
// D = 128 (4 heads and their kept Q rows) 200,256. Rings of 64 (231,040 bytes at D = 64) left no room.
template <int D>
constexpr bool post_two(bool cl) {
  return !cl || smem_post_bytes<D>(bwd_heads(D), true, true) <= kMaxSmemPerCta;
}

// The convolution's weight-gradient terms of one row's 8 outputs (the adjoint of conv_row8 in the taps):
// acc[a][c] += sum_e d[e] win[wrow - (cq - 1) + a, x0 + e + c], x0 a multiple of 8 (aligned float4 reads).
template <int kCq, int kCk, class R = Ring64>
__device__ __forceinline__ void conv_grad_row8(const float* win, int wrow, int x0, const float (&d)[8],
                                               float (&acc)[kCq][kCk]) {
  constexpr int kValChunks = (8 + kCk - 1 + 3) / 4;
#pragma unroll
  for (int a = 0; a < kCq; ++a) {
    const float* row = win + (wrow - (kCq - 1) + a) * R::kPitch;
    float vals[4 * kValChunks];
    ring_chunks<kValChunks, R>(row, x0, vals);
#pragma unroll
    for (int c = 0; c < kCk; ++c)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[a][c] = fmaf(d[e], vals[e + c], acc[a][c]);
  }
}

// Runtime sizes: each tap's terms summed over the warp, added by lane 0 to the warp's sDw[a][c] (rows of
// kTapPitch; sDw null: not wanted, a layer without kq_post), and with kDl this lane's own terms weighted by
// the taps w (rows of kTapPitch) into dl[a] (delta's terms: kernel P). Every lane of the warp must call it.
template <class R = Ring64, bool kDl = false>
__device__ __forceinline__ void conv_grad_row8_rt(const float* win, const float* w, int cq, int ck, int wrow, int x0,
                                                  const float (&d)[8], float* sDw, float (&dl)[kMaxCq], int lane) {
#pragma unroll
  for (int a = 0; a < kMaxCq; ++a) {  // unrolled, so that dl stays in registers
    if (a >= cq) break;
    const float* row = win + (wrow - (cq - 1) + a) * R::kPitch;
    for (int c = 0; c < ck; ++c) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) s = fmaf(d[e], row[R::col(x0 + e + c)], s);
      if constexpr (kDl) dl[a] = fmaf(w[a * kTapPitch + c], s, dl[a]);
      if (sDw) {
        s = warp_sum(s);
        if (lane == 0) sDw[a * kTapPitch + c] += s;
      }
    }
  }
}

// A mixing weight's gradient terms and the adjoint mix that follows them, where the group fits one CTA
// (G <= 8; the coefficients block-diagonal: build_frags with reps = 2): kernel P's dMpost (dA3 with A2,
// then Mpost^T dA3) and kernel Q's dMpre (dC' with C, then Mpre^T dC'). The gradient d (this lane's 8
// values) goes into MixIn slot warp + G, beside the mix input x in slots 0 .. G - 1 (still there); after
// one barrier grad_tiles gives the terms d_x x_y over this warp's tile rows on tensor cores, with hi + lo
// on both sides (three products: bf16 operands alone left the model's head_post gradient 12% off,
// session 8), into acc (slot x = g + 8 (e >> 1), slot y = 8 nb + 2t + (e & 1)), and the mix `kind` of
// slots G .. 2G - 1 goes into MixOut; after a second barrier d is read back mixed. Against the general
// path (CUDA-core terms, mix_done, mix_in_place): ~40 instructions per lane and mix fewer, and one
// barrier (session 13).
__device__ __forceinline__ void grad_terms_and_mix(float (&d)[8], float (&acc)[2][4], bf16* sInHi, bf16* sInLo,
                                                   const uint32_t* sFrag, int kind, float* sOut, int G, int warp,
                                                   int lane) {
  const int r = lane & 15, half = lane >> 4, off = in_offset(warp + G, r, 8 * half);
  uint4 vhi, vlo;
  split_hi_lo(d, vhi, vlo);
  *reinterpret_cast<uint4*>(sInHi + off) = vhi;
  *reinterpret_cast<uint4*>(sInLo + off) = vlo;
  __syncthreads();
  grad_tiles(acc, sInHi, sInHi, sInLo, warp, G, lane);   // d hi times x hi + lo
  grad_tiles(acc, sInLo, sInHi, nullptr, warp, G, lane);  // d lo times x hi
  mix_tiles_owned<true>(sInHi, sInLo, sFrag, kind, sOut, G, G, G, warp, lane);
  __syncthreads();
  read_mixed(d, sOut, warp, lane);
}

// After the key loop: the G warps' grad_terms_and_mix terms summed per head in a fixed order, through
// MixOut (free then; G * 256 <= G * kXT floats), into lane 0's dm[yy] (the warp's head x with head y0 + yy
// of its gs-group), as write_partials expects them. Every thread of the CTA must call it.
template <int kDm>
__device__ __forceinline__ void sum_grad_terms(const float (&acc)[2][4], float* sOut, int G, int gs, int warp, int lane,
                                               float (&dm)[kDm]) {
  const int g = lane >> 2, t = lane & 3;
  __syncthreads();  // every warp has read its last mix's results from MixOut
#pragma unroll
  for (int nb = 0; nb < 2; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) sOut[warp * 256 + (g + 8 * (e >> 1)) * 16 + 8 * nb + 2 * t + (e & 1)] = acc[nb][e];
  __syncthreads();
  const int y0 = warp - warp % gs;  // the gradient of head `warp` sat in slot warp + G
#pragma unroll
  for (int yy = 0; yy < kDm; ++yy)
    if (yy < gs && lane == 0)
      for (int w = 0; w < G; ++w) dm[yy] += sOut[w * 256 + (warp + G) * 16 + y0 + yy];
}

// On a cluster (kernels P and Q; session 16): the mixing-weight gradient terms of a 16 x 16 tile on
// tensor cores, as grad_terms_and_mix gives them in one CTA, where MixIn has no free slots for the
// gradient (a group of 9-16 heads fills it). Each warp stages its gradient d (8 values per lane: dA3 for
// dMpost, dC' for dMpre) as bf16 hi and lo tiles in its own MixOut slot (free then: the warp has read
// its last mix from it, and the next mix writes it after a barrier); after a barrier every warp's tile
// rows warp, warp + L, ... give acc += d_x x_y on tensor cores, x this CTA's head (its warp), y the
// group's head (MixIn's slot, still the mix's input x: the caller's mix_done follows), with hi + lo on
// both sides as there. Replaces ~30 CUDA-core instructions per lane, head and block, and the 16
// per-lane accumulators that the clustered 6 x 11 kernels spilled around.
// acc[nb][e]: x = g (e < 2; rows 8 .. 15, and rows >= L, repeat others and are dropped), y = 8 nb + 2t + (e & 1).
// The staging layout and addresses: head_mix_layout.h (staged_offset, staged_grad_a_offset; replayed on
// the CPU by tests/test_head_mix_mma.cpp).
__device__ __forceinline__ void grad_terms_cl(const float (&d)[8], float (&acc)[2][4], float* sOut, const bf16* sInHi,
                                              const bf16* sInLo, const GroupPlace& gp, int warp, int lane) {
  bf16* staged = reinterpret_cast<bf16*>(sOut);
  const int off = staged_offset(warp, lane & 15, 8 * (lane >> 4));
  uint4 vhi, vlo;
  split_hi_lo(d, vhi, vlo);
  if (!gp.real(warp)) vhi = vlo = make_uint4(0u, 0u, 0u, 0u);  // padding: zero terms
  __syncwarp();  // every lane has read its values from this MixOut slot
  *reinterpret_cast<uint4*>(staged + off) = vhi;
  *reinterpret_cast<uint4*>(staged + kStageLo + off) = vlo;
  __syncthreads();
  const int L = gp.L;
  auto a_offset = [lane, L](int r) { return staged_grad_a_offset(lane, r, L); };
  grad_tiles_at(acc, staged, a_offset, sInHi, sInLo, warp, L, lane);               // d hi (x hi + lo)
  grad_tiles_at(acc, staged + kStageLo, a_offset, sInHi, nullptr, warp, L, lane);  // d lo x hi
}
// After the key loop: grad_terms_cl's terms of the CTA's L warps summed per head in a fixed order
// (through MixOut, free then), into lane 0's dm[yy] (this warp's head with group head y0 + yy of its
// gs-group), as write_partials expects them. Every thread of the CTA must call it.
template <int kDm>
__device__ __forceinline__ void sum_grad_terms_cl(const float (&acc)[2][4], float* sOut, const GroupPlace& gp, int gs,
                                                  int warp, int lane, float (&dm)[kDm]) {
  const int g = lane >> 2, t = lane & 3;
  __syncthreads();  // every warp has read its last mix's results from MixOut
#pragma unroll
  for (int nb = 0; nb < 2; ++nb)
#pragma unroll
    for (int e = 0; e < 2; ++e) sOut[warp * 128 + g * 16 + 8 * nb + 2 * t + e] = acc[nb][e];
  __syncthreads();
  const int hg = gp.h0 + warp, y0 = hg - hg % gs;
#pragma unroll
  for (int yy = 0; yy < kDm; ++yy)
    if (yy < gs && lane == 0)
      for (int w = 0; w < gp.L; ++w) dm[yy] += sOut[w * 128 + warp * 16 + y0 + yy];
}

// delta (the row term kernel Q subtracts, dC' = A (dA - delta)) from kernel P's weight-gradient terms
// (replay_kq_layer_backward.py, kernel_p): with dA = conv_post^T(dA2),
//   delta[i'] = sum_j A[i', j] dA[i', j] = sum_a sum_c Wpost[a, c] (sum_j dA2[i, j] A[i', j - o2 + c]),
// i = i' + cq - 1 - a, and the bracket is row i's own term of dWpost[a, c], which the lanes that own row
// i (two: halves of the keys) accumulate anyway. So dl[a] = sum_c Wpost[a, c] times the lane's dWpost[a, c]
// is what row m0 + r gives row m0 + r - (cq - 1) + a (a < cq <= 8: rows m0 - 7 .. m0 + 15). The warp sums
// the rows' terms in a fixed order in scr (24 floats: rows m0 - 8 .. m0 + 15) and adds them to delta (this
// head's, zeroed before the kernel). A row gets terms from its own tile's CTA and, for its tile's last
// cq - 1 rows, from the next tile's: two atomic additions to 0, whose result does not depend on their
// order (a + b = b + a), so delta is deterministic. Every lane of the warp must call it.
template <int kA>
__device__ __forceinline__ void add_delta_terms(const float (&dl)[kA], int cq, float* scr, float* delta, int m0, int T,
                                                bool real, int lane) {
  const int r = lane & 15, half = lane >> 4;
  if (lane < 24) scr[lane] = 0.f;
  __syncwarp();
#pragma unroll
  for (int a = 0; a < kA; ++a) {
    const float x = dl[a] + __shfl_xor_sync(0xffffffffu, dl[a], 16);  // the row's two lanes
    if (a < cq && half == 0) scr[8 + r - (cq - 1) + a] += x;
    __syncwarp();
  }
  const int row = m0 - 8 + lane;
  if (real && lane >= 8 - (cq - 1) && lane < 24 && row >= 0 && row < T) atomicAdd(delta + row, scr[lane]);
}

template <int D, int kCq1, int kCk1, int kCq2, int kCk2, bool kCl>
__global__ void __launch_bounds__(16 * kMaxG, kCl ? 1 : 0)
    flash_kq_layer_post_grad_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                    const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                    const float* __restrict__ wpre, const float* __restrict__ mpre, int gpre,
                                    const float* __restrict__ wpost, const float* __restrict__ mpost, int gpost,
                                    const float* __restrict__ lse, const bf16* __restrict__ dout_lo,
                                    float* __restrict__ dv_acc, float* __restrict__ part_w,
                                    float* __restrict__ part_m, float* __restrict__ delta, int H, int T, int G,
                                    int cq1, int ck1, int off1, int cq2, int ck2, int off2, float scale) {
  const int C = kCl ? cluster_ctas() : 1;  // CTAs per group (kCl: a cluster; one-CTA groups carry no cluster code)
  constexpr int S = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* region = smem_raw + static_cast<size_t>(warp) * warp_region_post_bytes<D>();
  float* s0win = reinterpret_cast<float*>(region);
  float* awin = s0win + kPS0Floats;
  bf16* sTile = reinterpret_cast<bf16*>(awin + kPAFloats);  // K, then V
  bf16* sDo = sTile + kTile * S;                           // the tile's dO rows
  bf16* sDoLo = sDo + kTile * S;                           // their remainders (with dout_lo)
  bf16* sKept = sDoLo + kTile * S;                         // D = 128: the Q rows
  // dw: runtime sizes' dWpost per warp
  const int L = group_warps(G, C);  // the CTA's warps (padding included)
  const KqShared sh = kq_shared(smem_raw + static_cast<size_t>(L) * warp_region_post_bytes<D>(), L, true);
  const uint32_t* sFrag = sh.frag;
  bf16 *sInHi = sh.in_hi, *sInLo = sh.in_lo;
  float* sOut = sh.out;
  const KqPlace pl = kq_place(H, T, G, C, warp);
  const GroupPlace gp = pl.gp;
  const int m0 = pl.m0;
  q += pl.head * D, k += pl.head * D, v += pl.head * D, dout += pl.head * D, dv_acc += pl.head * D, lse += pl.head;
  if (dout_lo) dout_lo += pl.head * D;
  const bool has_post = wpost != nullptr;
  const float* myWpre = sh.wpre + warp * kHeadTaps;
  const float* myWpost = sh.wpost + warp * kHeadTaps;
  float* myDw = sh.dw + warp * kHeadTaps;
  // One CTA: the coefficients block-diagonal, for the Mpost^T mix of MixIn's slots G .. 2G - 1 and the
  // pre mix's second part there.
  constexpr bool kTwo = post_two<D>(kCl);
  bf16* sInHi1 = kCl && kTwo ? reinterpret_cast<bf16*>(sOut + L * kXT) : nullptr;
  bf16* sInLo1 = kCl && kTwo ? sInHi1 + kInElems : nullptr;
  load_taps_and_mix(sh, pl, wpre, cq1, ck1, wpost, cq2, ck2, mpre, gpre, mpost, gpost, G, warp, lane, kCl ? 1 : 2);
  if (kCl && kTwo && gpre) zero_in(sInHi1), zero_in(sInLo1);  // padding slots stay zero

  // Q rows m0 - 16 .. m0 + 15 (staged in the S0 window at D = 64, kept in sKept at D = 128) and the
  // tile's dO rows (sDo) as A fragments.
  constexpr bool kSm = kBwdRowsInSmem<D>;
  RowFrags<D, S, 2, kSm> qf;
  RowFrags<D, S, 1, kSm> dof;
  load_row_frags(kSm ? sKept : reinterpret_cast<bf16*>(s0win), q, m0 - kTile, T, lane, qf);
  warp_load_rows_zero<D, S, kTile>(sDo, dout, m0, T, lane);
  if (dout_lo) warp_load_rows_zero<D, S, kTile>(sDoLo, dout_lo, m0, T, lane);
  cp_async_commit();
  cp_async_wait_all();
  __syncwarp();
  dof.take(sDo, lane);
  warp_zero(s0win, kPS0Floats + kPAFloats, lane);
  const int r = lane & 15, half = lane >> 4, g = lane >> 2, t = lane & 3;
  float lse2[2];
  a_rows_lse2(lse, m0, T, r, lse2);
  __syncwarp();
  group_start(gp);  // every warp's taps, the fragments, the zeroed MixIn and dWpost

  constexpr int kWq = kCq2 > 0 ? kCq2 : 1, kWk = kCk2 > 0 ? kCk2 : 1;
  float accw[kWq][kWk] = {};
  constexpr int kDmp = kCl ? 16 : 8;  // head_post groups fit the CTA's or the cluster's heads
  float dmp[kDmp] = {};  // at the end: dMpost of this warp's head with head y0 + yy of its group
  float accm[2][4] = {};  // the warp's dMpost terms (grad_terms_and_mix; on clusters grad_terms_cl)
  float dl[kMaxCq] = {};  // runtime sizes: delta's terms (add_delta_terms)
  s0_tile_to_window<D, S, kS0Top, Ring48>(s0win, sTile, k, qf, 0, m0, T, scale, off1, lane);
  s0_tile_to_window<D, S, kS0Top, Ring48>(s0win, sTile, k, qf, 1, m0, T, scale, off1, lane);
  a_tile_to_window<kCq1, kCk1, kTwo, Ring48>(awin, s0win, myWpre, cq1, ck1, off2, gpre, sInHi, sInLo, sFrag, sOut, gp,
                                             warp, lane, 0, m0, T, lse2, sInHi1, sInLo1);
  const int n_end = min(T, m0 + kTile), row = m0 + r;
  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    const int kt = n0 / kTile;
    s0_tile_to_window<D, S, kS0Top, Ring48>(s0win, sTile, k, qf, kt + 2, m0, T, scale, off1, lane);
    warp_load_rows_zero<D, S, kTile>(sTile, v, n0, T, lane);  // V lands while A and A2 are computed
    cp_async_commit();
    a_tile_to_window<kCq1, kCk1, kTwo, Ring48>(awin, s0win, myWpre, cq1, ck1, off2, gpre, sInHi, sInLo, sFrag, sOut,
                                               gp, warp, lane, kt + 1, m0, T, lse2, sInHi1, sInLo1);
    float a2[8], a3[8];
    conv_row8<kCq2, kCk2, Ring48>(awin, myWpost, cq2, ck2, kATop + r, n0 + 8 * half, a2);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (n0 + 8 * half + e > row) a2[e] = 0.f;  // A2: the future set to 0 (keys past T are in it)
      a3[e] = a2[e];
    }
    if (gpost) mix_in_place<false>(a3, sInHi, sInLo, sFrag, kPost, sOut, gp, warp, lane);  // MixIn read below
    // A3 into this warp's MixOut rows, read back as the A operand of dV += A3^T dO (keys x rows).
#pragma unroll
    for (int e = 0; e < 8; e += 2)
      *reinterpret_cast<float2*>(sOut + out_offset(warp, r, 8 * half + e)) = make_float2(a3[e], a3[e + 1]);
    cp_async_wait_all();
    __syncwarp();
    uint32_t at[4];
    {
      const float* o = sOut + out_offset(warp, 0, 0);
      at[0] = pack_bf16(o[(2 * t) * kXS + g], o[(2 * t + 1) * kXS + g]);
      at[1] = pack_bf16(o[(2 * t) * kXS + g + 8], o[(2 * t + 1) * kXS + g + 8]);
      at[2] = pack_bf16(o[(2 * t + 8) * kXS + g], o[(2 * t + 9) * kXS + g]);
      at[3] = pack_bf16(o[(2 * t + 8) * kXS + g + 8], o[(2 * t + 9) * kXS + g + 8]);
    }
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, sDo + bkn_offset(lane, 0, dn * 16, S));
      float acc[2][4] = {};
      mma_bf16(acc[0], at, bb[0], bb[1]);
      mma_bf16(acc[1], at, bb[2], bb[3]);
      if (pl.real) atomic_add_tile(dv_acc, acc, n0, dn * 16, T, D, lane);
    }
    // dA3 = dO V^T on the tile (rows past T and keys past T are zero rows of dO and V), then into this
    // lane's layout (row r, keys 8 half ..) through the warp's MixOut rows, once A3 has been read there.
    float d3[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bb[4];
      ldmatrix_x4(bb, sTile + bnk_offset(lane, 0, kk * 16, S));
      if (dout_lo) {  // the small terms first
        uint32_t al[4];
        ldmatrix_x4(al, sDoLo + a_offset(lane, 0, kk * 16, S));
        mma_bf16(d3[0], al, bb[0], bb[1]);
        mma_bf16(d3[1], al, bb[2], bb[3]);
      }
      uint32_t a[4];
      dof.get(0, kk, a, lane);
      mma_bf16(d3[0], a, bb[0], bb[1]);
      mma_bf16(d3[1], a, bb[2], bb[3]);
    }
    __syncwarp();  // every lane has read A3 and V before MixOut's rows and the tile buffer are rewritten
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
        *reinterpret_cast<float2*>(sOut + out_offset(warp, g + 8 * rr, 8 * j + 2 * t)) =
            make_float2(d3[j][2 * rr], d3[j][2 * rr + 1]);
    __syncwarp();
    float da[8];
    read_mixed(da, sOut, warp, lane);
    if (gpost && !kCl) {
      grad_terms_and_mix(da, accm, sInHi, sInLo, sFrag, kPostT, sOut, G, warp, lane);
    } else if (gpost) {
      // dMpost[x, y] += dA3_x A2_y over the tile, A2_y from MixIn (hi + lo: still the post mix's input).
      // hi + lo on both sides: bf16 operands alone left the model's head_post gradient 12% off the CPU's
      // (ModelCuda.MtaFusedMixAndEpilogueMatchCpu, session 8).
      grad_terms_cl(da, accm, sOut, sInHi, sInLo, gp, warp, lane);
      mix_done(gp);  // every warp (of the cluster) has read A2 from MixIn before dA3 replaces it
      mix_in_place(da, sInHi, sInLo, sFrag, kPostT, sOut, gp, warp, lane);  // dA3 -> Mpost^T dA3 (hi + lo)
    }
    float da2[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) da2[e] = n0 + 8 * half + e > row ? 0.f : da[e];  // dA2: the future set to 0
    // dWpost, whose per-lane terms also give delta (the compiled sizes imply kq_post: paper_sizes;
    // without kq_post the identity taps give delta alone).
    if constexpr (kCq2 > 0)
      conv_grad_row8<kCq2, kCk2, Ring48>(awin, kATop + r, n0 + 8 * half, da2, accw);
    else
      conv_grad_row8_rt<Ring48, true>(awin, myWpost, cq2, ck2, kATop + r, n0 + 8 * half, da2,
                                      has_post ? myDw : nullptr, dl, lane);
    __syncwarp();  // every lane has read its dA2 before the next block's MixOut writes
  }

  group_finish(gp);
  if (gpost && !kCl) sum_grad_terms(accm, sOut, G, gpost, warp, lane, dmp);
  if (gpost && kCl) sum_grad_terms_cl(accm, sOut, gp, gpost, warp, lane, dmp);
  // delta's terms, summed in this warp's S0 window (free now).
  if constexpr (kCq2 > 0) {
    float dlc[kCq2];
#pragma unroll
    for (int a = 0; a < kCq2; ++a) {
      dlc[a] = 0.f;
#pragma unroll
      for (int c = 0; c < kCk2; ++c) dlc[a] = fmaf(myWpost[a * kTapPitch + c], accw[a][c], dlc[a]);
    }
    add_delta_terms(dlc, kCq2, s0win, delta + pl.head, m0, T, pl.real, lane);
  } else {
    add_delta_terms(dl, cq2, s0win, delta + pl.head, m0, T, pl.real, lane);
  }
  // Partials of this CTA: dWpost and the dMpost row of this warp's head.
  const size_t cta = static_cast<size_t>(blockIdx.x / gp.C) * gridDim.y + blockIdx.y;  // the group's CTA row
  if (pl.real)
    write_partials<kCq2, kCk2, kDmp>(part_w, part_m, cta * G + gp.h0 + warp, has_post, accw, myDw, cq2, ck2, gpost,
                                     dmp, lane);
}

// grad[h * n + i] += the sum over the batch and the query tiles of the partials of head h, one warp per
// (h, i), lane l taking the (batch, tile) pairs l, l + 32, ... in ascending order and then a fixed
// shuffle tree, in double (deterministic). part is [B * H / G CTAs rows][tiles][G][stride].
__global__ void reduce_partials_kernel(const float* __restrict__ part, float* __restrict__ grad, int B, int H, int G,
                                       int ntiles, int stride, int n) {
  const int idx = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
  if (idx >= H * n) return;
  const int h = idx / n, i = idx % n, units = H / G, u = h / G, w = h % G;
  double s = 0.0;
  for (int e = lane; e < B * ntiles; e += 32) {
    const int b = e / ntiles, tile = e % ntiles;
    s += part[((static_cast<size_t>(b * units + u) * ntiles + tile) * G + w) * stride + i];
  }
  s = warp_sum(s);
  if (lane == 0) grad[idx] += static_cast<float>(s);
}

// out[i] = bf16(in[i]): the fp32 atomic accumulators of dk and dv, once every CTA has added.
__global__ void f32_to_bf16_kernel(const float* __restrict__ in, bf16* __restrict__ out, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

void reduce_partials(const float* part, float* grad, int B, int H, int G, int ntiles, int stride, int n,
                     cudaStream_t s) {
  const int warps = H * n, threads = 256;
  reduce_partials_kernel<<<(warps * 32 + threads - 1) / threads, threads, 0, s>>>(part, grad, B, H, G, ntiles, stride,
                                                                                 n);
  MTA_CUDA_CHECK_LAUNCH("reduce_partials_kernel");
}

template <int D, int kCq1, int kCk1, int kCq2, int kCk2>
void launch_post_grads(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                       const float* wpre, const float* mpre, const float* wpost, const float* mpost, const float* lse,
                       const bf16* dout_lo, float* dv_acc, float* part_w, float* part_m, float* delta, int B,
                       int T, cudaStream_t s) {
  const int H = spec.heads, G = spec.coupled_heads();
  const int gpre = spec.head_pre ? spec.head_pre->group : 0, gpost = spec.head_post ? spec.head_post->group : 0;
  const KqConv pre = pre_conv(spec);
  const KqConv post = post_conv(spec);
  const int C = cluster_size(G, bwd_heads(D));
  const size_t smem = smem_post_bytes<D>(group_warps(G, C), C > 1, post_two<D>(C > 1));
  auto kernel = C == 1 ? flash_kq_layer_post_grad_kernel<D, kCq1, kCk1, kCq2, kCk2, false>
                       : flash_kq_layer_post_grad_kernel<D, kCq1, kCk1, kCq2, kCk2, true>;
  launch_grouped(kernel, B, H, G, C, T, smem, s, q, k, v, dout, spec.kq_pre ? wpre : nullptr, mpre, gpre,
                 spec.kq_post ? wpost : nullptr, mpost, gpost, lse, dout_lo, dv_acc, part_w, part_m, delta, H, T, G,
                 pre.q,
                 pre.k, pre.key_offset(), post.q, post.k, post.key_offset(), 1.0f / std::sqrt(static_cast<float>(D)));
}

template <int D>
void dispatch_post_grads(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                         const float* wpre, const float* mpre, const float* wpost, const float* mpost,
                         const float* lse, const bf16* dout_lo, float* dv_acc, float* part_w, float* part_m,
                         float* delta, int B, int T, cudaStream_t s) {
  if (paper_sizes(spec))
    launch_post_grads<D, 6, 11, 6, 11>(spec, q, k, v, dout, wpre, mpre, wpost, mpost, lse, dout_lo, dv_acc, part_w,
                                       part_m, delta, B, T, s);
  else
    launch_post_grads<D, 0, 0, 0, 0>(spec, q, k, v, dout, wpre, mpre, wpost, mpost, lse, dout_lo, dv_acc, part_w,
                                     part_m, delta, B, T, s);
}

// ---------------------------------------------------------------------------------------------
// Backward, kernel Q (the pre side of the main pass; tests/oracle/replay_kq_layer_backward.py,
// kernel_q_own_rows). A CTA owns 16 query rows (m0 ..) of one group, one warp per head, with three
// windows per head on rings of 48 keys (Ring48: three key tiles; rings of 64 would not fit 8 heads):
//   S0 rows m0 - 8 .. m0 + 15 (from the Q tiles at m0 - 8 and m0 + 8), rotated by o1;
//   dA2 rows m0 .. m0 + 23 (from the dO tiles at m0 and m0 + 16, their two Mpost^T mixes in one
//   exchange: mix_in_place2 in one CTA, mix_in_place2_cl on a cluster), rotated by ck2 - 1 - o2;
//   dC rows m0 .. m0 + 15, rotated by ck1 - 1 - o1 (read by the transposed pre convolution, for which
//   every other row is 0: one row of zeros after them).
// Before block 0: S0 and dA2 tiles 0 and 1, dC tile 0. Per block of 16 keys (n0 = 16 kt):
//   1. dWpre[a, c] += dC[i, j] S0[i - (cq1 - 1) + a, j - o1 + c] over the tile's rows (S0 tiles
//      kt - 1 .. kt + 1, read before tile kt + 2 replaces kt - 1);
//   2. S0 tile kt + 2 and dA2 tile kt + 2;
//   3. dC tile kt + 1 on the own rows: C = conv_pre(S0), C' = Mpre C, A = exp(C' - lse), dA =
//      conv_post^T(dA2), dC' = A (dA - delta); dMpre[x, y] += dC'_x C_y with C_y read back from the mix's
//      input buffers (hi + lo) as tensor-core products (grad_terms_and_mix in one CTA, grad_terms_cl on a
//      cluster); dC = Mpre^T dC';
//   4. dS0 = mask0(conv_pre^T(dC)) at block kt on rows m0 - 8 .. m0 + 15, as bf16 in the warp's dS tile
//      (dS0 is linear in dC, so the own rows' dC reaches cq1 - 1 rows above the tile, whose tile adds
//      the rest); dQ += dS0 K on the own rows and dQ_above^T += K^T dS0_above^T on the rows above (its
//      accumulators in shared memory), dK[block keys] += dS0^T Q over the 24 rows (float2 atomics; Q's B
//      fragments are the A fragments transposed in registers by movmatrix at D = 64, read from the kept
//      rows by ldmatrix at D = 128).
// Session 13's form computed dC on 24 rows (two 16-row parts, four mixes per block) so that dS0 needed
// only its own rows; this one takes two mixes per block and one stencil less, and with dA2's two mixes
// in one exchange three exchanges per block instead of six (session 17).
// At the end: dq, zeroed before the kernel, where rows m0 .. m0 + 7 are stored and rows m0 + 8 .. m0 + 15
// and the rows above are added (bf16x2 atomics: each such row receives exactly two additions onto zero,
// this tile's and the next one's, so the sum is the same in either order); per-CTA partials of dWpre
// (per warp) and dMpre (per head), reduced over the CTAs by reduce_partials_kernel.
// kUpRows: the rows above the tile that its dS0 reaches (cq1 - 1 <= 7 of them). The dC window holds the
// own rows and one row of zeros, which the transposed stencil reads for every row outside them.
constexpr int kQS0Rows = 24, kQDRows = kDRows, kQCRows = kTile + 1, kUpRows = 8;
constexpr int kQDoRows = 32;  // the dO rows staged (two tiles) and their scales
constexpr int kQS0Floats = kQS0Rows * Ring48::kPitch, kQDFloats = kQDRows * Ring48::kPitch;
constexpr int kQCFloats = kQCRows * Ring48::kPitch;
constexpr int kDsPitch = kTile + 8;  // bf16 per row of the warp's dS tile (16-byte rows for ldmatrix)
constexpr int kDsRows = 24;          // dS0 rows m0 - 8 .. m0 + 15
// The rows-above dq accumulators, in shared memory (in registers the kernel spilled 120-200 bytes):
// per column block of 16 one float4 per lane, the mma accumulator.
template <int D>
constexpr int up_floats() {
  return D / 16 * 32 * 4;
}

template <int D>
constexpr size_t warp_region_pre_bytes() {
  return (kQS0Floats + kQDFloats + kQCFloats) * sizeof(float) + static_cast<size_t>(kTile) * (D + 8) * sizeof(bf16) +
         static_cast<size_t>(kDsRows) * kDsPitch * sizeof(bf16) + kept_rows_bytes<D>(2) +
         (up_floats<D>() + kQDoRows) * sizeof(float);
}
// dO_lo's 32 rows are staged in the S0 window (D = 64, where the dA2 window stages dO) or the S0 and dA2
// windows (D = 128, where dO is kept in sKept).
static_assert(kQS0Floats * sizeof(float) >= 32 * (64 + 8) * sizeof(bf16) &&
                  (kQS0Floats + kQDFloats) * sizeof(float) >= 32 * (128 + 8) * sizeof(bf16),
              "dO_lo staging fits");
static_assert(kQDFloats * sizeof(float) >= 32 * (64 + 8) * sizeof(bf16), "Q and dO staging fits the dA2 window");

// cl: on a cluster (a second MixIn pair after MixOut for dA2's merged mixes), else MixOut holds two tiles per
// head (mix_in_place2).
template <int D>
constexpr size_t smem_pre_bytes(int G, bool cl) {
  return static_cast<size_t>(G) * (warp_region_pre_bytes<D>() + 3 * kHeadTaps * sizeof(float)) +
         kFragWords * sizeof(uint32_t) + 2 * static_cast<size_t>(kInElems) * sizeof(bf16) +
         (cl ? 1 : 2) * static_cast<size_t>(G) * kXT * sizeof(float) +
         (cl ? 2 * static_cast<size_t>(kInElems) * sizeof(bf16) : 0);
}
static_assert(smem_pre_bytes<64>(bwd_heads(64), false) <= kMaxSmemPerCta &&
                  smem_pre_bytes<64>(bwd_heads(64), true) <= kMaxSmemPerCta &&
                  smem_pre_bytes<128>(bwd_heads(128), false) <= kMaxSmemPerCta &&
                  smem_pre_bytes<128>(bwd_heads(128), true) <= kMaxSmemPerCta &&
                  smem_post_bytes<64>(bwd_heads(64), false, post_two<64>(false)) <= kMaxSmemPerCta &&
                  smem_post_bytes<64>(bwd_heads(64), true, post_two<64>(true)) <= kMaxSmemPerCta &&
                  smem_post_bytes<128>(bwd_heads(128), false, post_two<128>(false)) <= kMaxSmemPerCta &&
                  smem_post_bytes<128>(bwd_heads(128), true, post_two<128>(true)) <= kMaxSmemPerCta,
              "the backward's CTAs fit their heads' shared memory");

// dst[0 .. 7] += the 8 bf16 of v (four bf16x2 atomic additions; dst 16-byte aligned).
__device__ __forceinline__ void atomic_add_bf16x8(bf16* dst, const uint4& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  __nv_bfloat162* d2 = reinterpret_cast<__nv_bfloat162*>(dst);
#pragma unroll
  for (int i = 0; i < 4; ++i) atomicAdd(d2 + i, *reinterpret_cast<const __nv_bfloat162*>(&w[i]));
}

// movmatrix: the transpose of an 8 x 8 bf16 matrix held as one b32 per lane (row lane / 4, columns
// 2 (lane % 4) ..), in the same layout.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t a) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
}

// Step 3 above for key tile `tile`. lse2, dlt: lse * log2(e) and delta of row m0 + (lane & 15). accq: the
// warp's dMpre terms over the own rows, on tensor cores (kOneCta, the group in one CTA, G <= 8:
// grad_terms_and_mix; on a cluster: grad_terms_cl).
template <int kCq1, int kCk1, int kCq2, int kCk2, bool kOneCta>
__device__ __forceinline__ void dc_tile_to_window(float* dcw, const float* s0w, const float* dw, const float* wpre,
                                                  const float* wpost, int cq1, int ck1, int cq2, int ck2, int c_rot,
                                                  int gpre, bf16* sInHi, bf16* sInLo, const uint32_t* sFrag,
                                                  float* sOut, const GroupPlace& gp, int warp, int lane, int tile,
                                                  int m0, int T, float lse2, float dlt, float (&accq)[2][4]) {
  const int r = lane & 15, half = lane >> 4, key0 = kTile * tile;
  if (key0 > m0 + kTile - 1) {  // the same for every warp: all of them skip the mixes' barriers
    for (int i = lane; i < kTile * kTile; i += 32)
      dcw[(i / kTile) * Ring48::kPitch + Ring48::col(key0 + i % kTile + c_rot)] = 0.f;
    __syncwarp();
    return;
  }
  const int row = m0 + r, x0 = key0 + 8 * half;
  float c[8], cm[8], da[8], dcp[8];
  conv_row8<kCq1, kCk1, Ring48>(s0w, wpre, cq1, ck1, r + 8, x0, c);  // S0 window row of row m0 + r: r + 8
  conv_row8_t<kCq2, kCk2, Ring48>(dw, wpost, cq2, ck2, r, x0, da);
#pragma unroll
  for (int e = 0; e < 8; ++e) cm[e] = c[e];
  if (gpre) mix_in_place<false>(cm, sInHi, sInLo, sFrag, kPre, sOut, gp, warp, lane);  // C -> C'; C stays in MixIn
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const bool ok = row < T && x0 + e <= row;
    const float a = ok ? exp2f(fmaf(cm[e], kLog2e, -lse2)) : 0.f;
    dcp[e] = row > 0 ? a * (da[e] - dlt) : 0.f;  // row 0 sees one key: its softmax Jacobian is exactly 0
  }
  if (gpre && kOneCta) {
    grad_terms_and_mix(dcp, accq, sInHi, sInLo, sFrag, kPreT, sOut, gp.G, warp, lane);  // dMpre, dC' -> dC
  } else if (gpre) {
    // dMpre[x, y] += dC'_x C_y over the own rows: C_y from MixIn (hi + lo), still the pre mix's input.
    grad_terms_cl(dcp, accq, sOut, sInHi, sInLo, gp, warp, lane);
    mix_done(gp);  // every warp (of the cluster) has read C from MixIn before dC' replaces it
    mix_in_place(dcp, sInHi, sInLo, sFrag, kPreT, sOut, gp, warp, lane);  // dC' -> dC
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) dcw[r * Ring48::kPitch + Ring48::col(x0 + e + c_rot)] = dcp[e];
  __syncwarp();
}

// kCl: the group spread over a cluster (bwd_heads). The dMpre accumulators per lane follow it
// (8 heads at most in one CTA, 16 on a cluster: 16 slots cost the one-CTA 6 x 11 kernel 236 bytes of
// spills and ~4% at 8 heads).
template <int D, int kCq1, int kCk1, int kCq2, int kCk2, bool kCl>
__global__ void __launch_bounds__(16 * kMaxG, kCl ? 1 : 0)
    flash_kq_layer_pre_grad_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                   const bf16* __restrict__ dout, const float* __restrict__ wpre,
                                   const float* __restrict__ mpre, int gpre, const float* __restrict__ wpost,
                                   const float* __restrict__ mpost, int gpost, const float* __restrict__ lse,
                                   const float* __restrict__ delta, const bf16* __restrict__ dout_lo,
                                   const float* __restrict__ vmax, bf16* __restrict__ dq, float* __restrict__ dk_acc,
                                   float* __restrict__ part_w, float* __restrict__ part_m, int H, int T, int G,
                                   int cq1, int ck1, int off1, int cq2, int ck2, int off2, float scale) {
  const int C = kCl ? cluster_ctas() : 1;  // CTAs per group (kCl: a cluster; one-CTA groups carry no cluster code)
  constexpr int kDm = kCl ? 16 : 8;
  constexpr int S = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* region = smem_raw + static_cast<size_t>(warp) * warp_region_pre_bytes<D>();
  float* s0w = reinterpret_cast<float*>(region);  // S0: rows m0 - 8 .. m0 + 15
  float* dw = s0w + kQS0Floats;                    // dA2: rows m0 .. m0 + 23
  float* dcw = dw + kQDFloats;                     // dC: rows m0 .. m0 + 15, then a row of zeros
  const float* dc_zero = dcw + kTile * Ring48::kPitch;
  // The rows above the tile (dS0's rows m0 - 8 .., step 4) read rows < 0 of dC as zeros together with
  // rows 0 .. a - 1 in one quarter-warp. Row 16 shares its 16-byte bank group with row 0 (16 x 52 floats
  // = 0 mod 32), so every such float4 load took two wavefronts: 80 extra per warp and key tile, ~43M
  // per launch at the 35M shape, about two thirds of what ncu counted on the stencils' loads in kernel
  // Q (session 21). The same zeros read 4 floats later (row 16's columns 4 .. 51; the ring's columns
  // end at 47, its padding stays zero) fall in row 5's group, which those loads never read at cq <= 6
  // (rows 0 .. 4 at most): conflict-free (at cq 7 and 8, the last two taps' loads still conflict). The
  // own rows' reads of rows >= 16 keep dc_zero (row 0's group is free there). Same zeros, so the same
  // results.
  const float* dc_zero_up = dc_zero + 4;
  static_assert(kTile * Ring48::kPitch + 4 + Ring48::kSize <= kQCFloats, "dc_zero_up's 48 zeros stay in row 16");
  bf16* sTile = reinterpret_cast<bf16*>(dcw + kQCFloats);  // K, V, K of the block, then the dq rows
  bf16* sdS = sTile + kTile * S;                           // dS0 of the block [kDsRows][kDsPitch]
  bf16* sKept = sdS + kDsRows * kDsPitch;                  // D = 128: the Q rows, then the dO rows
  float4* sUp = reinterpret_cast<float4*>(sKept + kept_rows_bytes<D>(2) / sizeof(bf16));  // the dq rows above
  float* sInvRow = reinterpret_cast<float*>(region + warp_region_pre_bytes<D>()) - kQDoRows;  // dO rows' 1 / scale
  // The other kernels' preamble (kq_shared, kq_place, load_taps_and_mix) and, below, atomic_add_tile
  // written out: at 255 registers, with them the clustered 6 x 11 kernel spilled 456 bytes instead of
  // 324 (one CTA: 8-16 instead of 4) and the paper-LM layer's backward measured 2% slower (RESULTS,
  // session 9).
  const int L = group_warps(G, C);  // the CTA's warps (padding included)
  float* sWpre = reinterpret_cast<float*>(smem_raw + static_cast<size_t>(L) * warp_region_pre_bytes<D>());
  float* sWpost = sWpre + L * kHeadTaps;
  float* sDw = sWpost + L * kHeadTaps;  // runtime sizes: dWpre per warp
  uint32_t* sFrag = reinterpret_cast<uint32_t*>(sDw + L * kHeadTaps);
  bf16* sInHi = reinterpret_cast<bf16*>(sFrag + kFragWords);
  bf16* sInLo = sInHi + kInElems;
  float* sOut = reinterpret_cast<float*>(sInLo + kInElems);  // one CTA: two tiles per head (smem_pre_bytes)
  bf16* sInHi1 = kCl ? reinterpret_cast<bf16*>(sOut + L * kXT) : nullptr;  // a cluster's second MixIn pair
  bf16* sInLo1 = kCl ? sInHi1 + kInElems : nullptr;

  const GroupPlace gp = group_place(G, C);
  const int units = H / G, b = static_cast<int>(blockIdx.x) / C / units, u = static_cast<int>(blockIdx.x) / C % units;
  const int h = u * G + gp.head_of(warp);
  const bool real = gp.real(warp);  // false: a padding warp, which writes nothing
  const size_t head = static_cast<size_t>(b * H + h) * T;
  const int m0 = ((T + kTile - 1) / kTile - 1 - static_cast<int>(blockIdx.y)) * kTile;  // heavy tiles first
  q += head * D, k += head * D, v += head * D, dout += head * D, dq += head * D, dk_acc += head * D;
  if (dout_lo) dout_lo += head * D;
  lse += head, delta += head;
  float* myWpre = sWpre + warp * kHeadTaps;
  float* myWpost = sWpost + warp * kHeadTaps;
  float* myDw = sDw + warp * kHeadTaps;
  load_taps(myWpre, wpre, h, cq1, ck1, lane);
  load_taps(myWpost, wpost, h, cq2, ck2, lane);
  for (int i = lane; i < kHeadTaps; i += 32) myDw[i] = 0.f;
  if (gpre || gpost) {
    build_frags(sFrag, mpre, gpre, mpost, gpost, u * G, G, kCl ? 1 : 2);  // one CTA: block-diagonal (dMpre)
    zero_in(sInHi), zero_in(sInLo);
    if (kCl) zero_in(sInHi1), zero_in(sInLo1);  // padding slots stay zero
  }

  // Q rows m0 - 8 .. m0 + 23 and dO rows m0 .. m0 + 31 as A fragments: staged in the dA2 window at
  // D = 64, kept in sKept at D = 128. The dO rows (with dout_lo: dO + dO_lo, dO_lo staged in the S0 and
  // dA2 windows) as scaled fp16 (rows_to_scaled_f16).
  constexpr bool kSm = kBwdRowsInSmem<D>;
  RowFrags<D, S, 2, kSm> qf, dof;
  load_row_frags(kSm ? sKept : reinterpret_cast<bf16*>(dw), q, m0 - 8, T, lane, qf);
  {
    bf16* sDo = kSm ? sKept + 2 * kTile * S : reinterpret_cast<bf16*>(dw);
    bf16* sLo = reinterpret_cast<bf16*>(s0w);
    warp_load_rows_zero<D, S, kQDoRows>(sDo, dout, m0, T, lane);
    if (dout_lo) warp_load_rows_zero<D, S, kQDoRows>(sLo, dout_lo, m0, T, lane);
    cp_async_commit();
    cp_async_wait_all();
    __syncwarp();
    rows_to_scaled_f16<D, S>(sDo, dout_lo ? sLo : nullptr, f16_scale_for(*vmax), sInvRow, lane);
    __syncwarp();
    dof.take(sDo, lane);
    __syncwarp();
  }
  if constexpr (!kSm) {
    // Rows 8 .. 15 of the second Q tile (Q rows m0 + 16 .. m0 + 23) and of the second dO tile (dO rows
    // m0 + 24 .. m0 + 31) feed only product rows that the 24-row S0 and dA2 windows drop, and dK reads
    // rows 0 .. 7 of Q's second tile only. Zero registers free 16 live ones: the clustered 6 x 11
    // kernels spilled up to 100 bytes with them, 0 without (ptxas).
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) qf.a[1][kk][1] = qf.a[1][kk][3] = dof.a[1][kk][1] = dof.a[1][kk][3] = 0u;
  }
  warp_zero(s0w, kQS0Floats + kQDFloats + kQCFloats, lane);
  warp_zero(reinterpret_cast<float*>(sUp), up_floats<D>(), lane);
  const int r = lane & 15, half = lane >> 4, g = lane >> 2, t = lane & 3, row = m0 + r;
  const float lse2 = row < T ? lse[row] * kLog2e : 0.f, dlt = row < T ? delta[row] : 0.f;
  const int rot_d = ck2 - 1 - off2, rot_c = ck1 - 1 - off1;
  __syncwarp();
  group_start(gp);  // every warp's taps, the fragments, the zeroed MixIn and dWpre

  constexpr int kWq = kCq1 > 0 ? kCq1 : 1, kWk = kCk1 > 0 ? kCk1 : 1;
  float accw[kWq][kWk] = {};
  float dm[kDm] = {};
  float accq[2][4] = {};  // the warp's dMpre terms (grad_terms_and_mix; on clusters grad_terms_cl)
  float unused_dl[kMaxCq];  // conv_grad_row8_rt's delta terms: kernel P's only
  float acc_dq[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc_dq[j][0] = acc_dq[j][1] = acc_dq[j][2] = acc_dq[j][3] = 0.f;

  s0_tile_to_window<D, S, kTile, Ring48, kQS0Rows>(s0w, sTile, k, qf, 0, m0 + 8, T, scale, off1, lane);
  s0_tile_to_window<D, S, kTile, Ring48, kQS0Rows>(s0w, sTile, k, qf, 1, m0 + 8, T, scale, off1, lane);
  da2_tile_to_window<D, S, Ring48, kCl>(dw, sTile, v, vmax, dof, sInvRow, 0, m0, T, rot_d, gpost, sInHi, sInLo,
                                        sFrag, sOut, gp, warp, lane, sInHi1, sInLo1);
  da2_tile_to_window<D, S, Ring48, kCl>(dw, sTile, v, vmax, dof, sInvRow, 1, m0, T, rot_d, gpost, sInHi, sInLo,
                                        sFrag, sOut, gp, warp, lane, sInHi1, sInLo1);
  dc_tile_to_window<kCq1, kCk1, kCq2, kCk2, !kCl>(dcw, s0w, dw, myWpre, myWpost, cq1, ck1, cq2, ck2, rot_c, gpre,
                                                 sInHi, sInLo, sFrag, sOut, gp, warp, lane, 0, m0, T, lse2, dlt, accq);
  const int n_end = min(T, m0 + kTile);
  for (int n0 = 0; n0 < n_end; n0 += kTile) {
    const int kt = n0 / kTile, x0 = n0 + 8 * half;
    {  // 1. dWpre from the own rows of dC (block kt) and the S0 window
      float d[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) d[e] = dcw[r * Ring48::kPitch + Ring48::col(x0 + e + rot_c)];
      if constexpr (kCq1 > 0)
        conv_grad_row8<kCq1, kCk1, Ring48>(s0w, r + 8, x0, d, accw);
      else
        conv_grad_row8_rt<Ring48>(s0w, myWpre, cq1, ck1, r + 8, x0, d, myDw, unused_dl, lane);
    }
    __syncwarp();  // every lane has read S0 tile kt - 1 before tile kt + 2 replaces it
    s0_tile_to_window<D, S, kTile, Ring48, kQS0Rows>(s0w, sTile, k, qf, kt + 2, m0 + 8, T, scale, off1, lane);
    da2_tile_to_window<D, S, Ring48, kCl>(dw, sTile, v, vmax, dof, sInvRow, kt + 2, m0, T, rot_d, gpost, sInHi,
                                          sInLo, sFrag, sOut, gp, warp, lane, sInHi1, sInLo1);
    // K of this block for dQ, landing while dC tile kt + 1 is computed (the V tile's reads are done).
    warp_load_rows_zero<D, S, kTile>(sTile, k, n0, T, lane);
    cp_async_commit();
    dc_tile_to_window<kCq1, kCk1, kCq2, kCk2, !kCl>(dcw, s0w, dw, myWpre, myWpost, cq1, ck1, cq2, ck2, rot_c, gpre,
                                                   sInHi, sInLo, sFrag, sOut, gp, warp, lane, kt + 1, m0, T, lse2, dlt,
                                                   accq);
    // 4. dS0 at block kt on rows m0 - 8 .. m0 + 15 (dS tile rows 0 .. 23), the future, rows past T and
    // rows before 0 set to 0: the own rows by every lane, then the rows above by the lanes of rows r < 8
    // (one after the other: together they spilled).
    {
      float ds[8];
      conv_row8_t<kCq1, kCk1, Ring48>(dcw, myWpre, cq1, ck1, r, x0, ds, dc_zero, kTile);
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        const float a0 = x0 + e <= row && row < T ? ds[e] : 0.f;
        const float a1 = x0 + e + 1 <= row && row < T ? ds[e + 1] : 0.f;
        *reinterpret_cast<uint32_t*>(sdS + (kUpRows + r) * kDsPitch + 8 * half + e) = pack_bf16(a0, a1);
      }
    }
    {
      float du[8];
      conv_half_live<true, kCq1, kCk1, Ring48>(dcw, myWpre, cq1, ck1, -kUpRows, x0, lane, du, dc_zero_up, kTile);
      const int up_row = m0 - kUpRows + r;  // lanes r < 8
      if (r < kUpRows) {
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          const float u0 = up_row >= 0 && x0 + e <= up_row ? du[e] : 0.f;
          const float u1 = up_row >= 0 && x0 + e + 1 <= up_row ? du[e + 1] : 0.f;
          *reinterpret_cast<uint32_t*>(sdS + r * kDsPitch + 8 * half + e) = pack_bf16(u0, u1);
        }
      }
    }
    cp_async_wait_all();
    __syncwarp();
    const bool above = m0 > 0;  // the tile's rows above exist (the same for every lane)
    uint32_t aq[4], ak0[4], ak1[2], bu[4];
    ldmatrix_x4(aq, sdS + a_offset(lane, kUpRows, 0, kDsPitch));     // dS0 of the own rows (rows x keys)
    ldmatrix_x4_trans(ak0, sdS + at_offset(lane, 0, 0, kDsPitch));   // dS0^T, rows m0 - 8 .. m0 + 7
    ldmatrix_x2_trans(ak1, sdS + at_offset(lane, 16, 0, kDsPitch));  // rows m0 + 8 .. m0 + 15 (k8)
    ldmatrix_x4(bu, sdS + bnk_offset(lane, 0, 0, kDsPitch));         // dS0 of the rows above as B (regs 0, 1)
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, sTile + bkn_offset(lane, 0, dn * 16, S));
      mma_bf16(acc_dq[2 * dn], aq, bb[0], bb[1]);
      mma_bf16(acc_dq[2 * dn + 1], aq, bb[2], bb[3]);
      if (above) {  // dQ_above^T += K^T dS0_above^T: bb's registers reordered are K^T's A fragment
        // (column 16 dn + g (+ 8), row m0 - 8 + 2t (+ 1))
        const uint32_t kt_frag[4] = {bb[0], bb[2], bb[1], bb[3]};
        const float4 u = sUp[dn * 32 + lane];
        float up[4] = {u.x, u.y, u.z, u.w};
        mma_bf16(up, kt_frag, bu[0], bu[1]);
        sUp[dn * 32 + lane] = make_float4(up[0], up[1], up[2], up[3]);
      }
      // Q rows m0 - 8 .. m0 + 15 (rows 0 .. 23 of qf's) as B fragments: at D = 64 Q tile 0 and rows 0 .. 7
      // of Q tile 1 transposed in registers, at D = 128 from the kept rows.
      uint32_t qb0[4], qb1[4];
      if constexpr (kSm) {
        ldmatrix_x4_trans(qb0, qf.rows + bkn_offset(lane, 0, dn * 16, S));
        ldmatrix_x4_trans(qb1, qf.rows + bkn_offset(lane, 16, dn * 16, S));
      } else {
        qb0[0] = transpose8x8(qf.a[0][dn][0]), qb0[1] = transpose8x8(qf.a[0][dn][1]);
        qb0[2] = transpose8x8(qf.a[0][dn][2]), qb0[3] = transpose8x8(qf.a[0][dn][3]);
        qb1[0] = transpose8x8(qf.a[1][dn][0]), qb1[2] = transpose8x8(qf.a[1][dn][2]);
      }
      float acc[2][4] = {};
      mma_bf16(acc[0], ak0, qb0[0], qb0[1]);
      mma_bf16(acc[1], ak0, qb0[2], qb0[3]);
      mma_bf16_k8(acc[0], ak1[0], ak1[1], qb1[0]);
      mma_bf16_k8(acc[1], ak1[0], ak1[1], qb1[2]);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int key = n0 + g + 8 * rr;
          if (key < T && real)
            atomic_add2(dk_acc + static_cast<size_t>(key) * D + dn * 16 + 8 * jj + 2 * t, acc[jj][2 * rr] * scale,
                        acc[jj][2 * rr + 1] * scale);
        }
    }
    __syncwarp();  // the dS tile and K are read before the next block rewrites them
  }

  group_finish(gp);
  // dq rows (scaled), staged through the tile buffer, 16-byte stores.
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
      *reinterpret_cast<uint32_t*>(sTile + (g + 8 * rr) * S + 8 * j + 2 * t) =
          pack_bf16(acc_dq[j][2 * rr] * scale, acc_dq[j][2 * rr + 1] * scale);
  __syncwarp();
  // Rows m0 .. m0 + 7 are this tile's alone; rows m0 + 8 .. m0 + 15 also receive the next tile's rows-above
  // terms, so they are added (dq is zero before the kernel).
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int cc = lane; cc < kTile * kChunksPerRow; cc += 32) {
    const int rr = cc / kChunksPerRow, col = (cc % kChunksPerRow) * 8, qrow = m0 + rr;
    if (qrow < T && real) {
      bf16* dst = dq + static_cast<size_t>(qrow) * D + col;
      const uint4 val = *reinterpret_cast<const uint4*>(sTile + rr * S + col);
      if (rr < kUpRows)
        *reinterpret_cast<uint4*>(dst) = val;
      else
        atomic_add_bf16x8(dst, val);
    }
  }
  if (m0 > 0) {  // rows m0 - 8 .. m0 - 1: this tile's terms, added
    __syncwarp();  // every lane has read the own rows' staging
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      const float4 u = sUp[dn * 32 + lane];
      const float up[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int c = 0; c < 4; ++c)
        sTile[(2 * t + (c & 1)) * S + 16 * dn + g + 8 * (c >> 1)] = __float2bfloat16_rn(up[c] * scale);
    }
    __syncwarp();
#pragma unroll
    for (int cc = lane; cc < kUpRows * kChunksPerRow; cc += 32) {
      const int rr = cc / kChunksPerRow, col = (cc % kChunksPerRow) * 8;
      if (real)
        atomic_add_bf16x8(dq + static_cast<size_t>(m0 - kUpRows + rr) * D + col,
                          *reinterpret_cast<const uint4*>(sTile + rr * S + col));
    }
  }
  // Partials of this CTA: dWpre and the dMpre row of this warp's head.
  const size_t cta = static_cast<size_t>(blockIdx.x / gp.C) * gridDim.y + blockIdx.y;  // the group's CTA row
  if (gpre && !kCl) sum_grad_terms(accq, sOut, G, gpre, warp, lane, dm);
  if (gpre && kCl) sum_grad_terms_cl(accq, sOut, gp, gpre, warp, lane, dm);
  if (real)
    write_partials<kCq1, kCk1, kDm>(part_w, part_m, cta * G + gp.h0 + warp, true, accw, myDw, cq1, ck1, gpre, dm,
                                    lane);
}

template <int D, int kCq1, int kCk1, int kCq2, int kCk2>
void launch_pre_grads(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                      const float* wpre, const float* mpre, const float* wpost, const float* mpost, const float* lse,
                      const float* delta, const bf16* dout_lo, const float* vmax, bf16* dq, float* dk_acc,
                      float* part_w, float* part_m, int B, int T, cudaStream_t s) {
  const int H = spec.heads, G = spec.coupled_heads();
  const int gpre = spec.head_pre ? spec.head_pre->group : 0, gpost = spec.head_post ? spec.head_post->group : 0;
  const KqConv pre = pre_conv(spec);
  const KqConv post = post_conv(spec);
  const int C = cluster_size(G, bwd_heads(D));
  const size_t smem = smem_pre_bytes<D>(group_warps(G, C), C > 1);
  auto kernel = C == 1 ? flash_kq_layer_pre_grad_kernel<D, kCq1, kCk1, kCq2, kCk2, false>
                       : flash_kq_layer_pre_grad_kernel<D, kCq1, kCk1, kCq2, kCk2, true>;
  // The kernel adds into the rows that two query tiles share (flash_kq_layer_pre_grad_kernel).
  MTA_CUDA_CHECK(cudaMemsetAsync(dq, 0, static_cast<size_t>(B) * H * T * D * sizeof(bf16), s));
  launch_grouped(kernel, B, H, G, C, T, smem, s, q, k, v, dout, spec.kq_pre ? wpre : nullptr, mpre, gpre,
                 spec.kq_post ? wpost : nullptr, mpost, gpost, lse, delta, dout_lo, vmax, dq, dk_acc, part_w,
                 part_m, H, T, G, pre.q,
                 pre.k, pre.key_offset(), post.q, post.k, post.key_offset(), 1.0f / std::sqrt(static_cast<float>(D)));
}

template <int D>
void dispatch_pre_grads(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                        const float* wpre, const float* mpre, const float* wpost, const float* mpost, const float* lse,
                        const float* delta, const bf16* dout_lo, const float* vmax, bf16* dq, float* dk_acc,
                        float* part_w, float* part_m, int B, int T, cudaStream_t s) {
  if (paper_sizes(spec))
    launch_pre_grads<D, 6, 11, 6, 11>(spec, q, k, v, dout, wpre, mpre, wpost, mpost, lse, delta, dout_lo, vmax, dq,
                                      dk_acc, part_w, part_m, B, T, s);
  else
    launch_pre_grads<D, 0, 0, 0, 0>(spec, q, k, v, dout, wpre, mpre, wpost, mpost, lse, delta, dout_lo, vmax, dq,
                                    dk_acc, part_w, part_m, B, T, s);
}

// The backward's workspace: delta's floats rounded up to 16 bytes, so that the fp32 accumulator after
// it stays aligned for float2 atomics whatever B * H * T (an odd count misaligned it before session 11).
size_t delta_floats(size_t rows) { return (rows + 3) / 4 * 4; }

}  // namespace

bool flash_kq_layer_post_grads_supported(const AttentionSpec& spec, int D) {
  return flash_kq_layer_backward_supported(spec, D);  // kernels P and Q hold the same heads per CTA
}

size_t flash_kq_layer_post_grads_workspace_floats(const AttentionSpec& spec, int B, int T) {
  const size_t ctas = static_cast<size_t>(B) * (spec.heads / spec.coupled_heads()) * ((T + kTile - 1) / kTile);
  // The CTAs' partials, then (kernel Q) V's largest magnitude.
  return ctas * spec.coupled_heads() * (kWStride + kMaxG) + 4;
}

namespace {
// The argument checks kernels P and Q share: sizes, the inputs, the forward's weights, dout_lo.
void require_grad_inputs(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                         const float* kq_pre, const float* head_pre, const float* kq_post, const float* head_post,
                         const float* lse, const float* workspace, const bf16* dout_lo, int B, int T) {
  kq_require(B >= 1 && T >= 1, "B and T must be >= 1");
  kq_require(static_cast<long long>(B) * spec.heads <= INT_MAX && (T + kTile - 1) / kTile <= 65535,
             "B * H or T too large");
  for (const void* p : {static_cast<const void*>(q), static_cast<const void*>(k), static_cast<const void*>(v),
                        static_cast<const void*>(dout)})
    kq_require(p != nullptr && aligned16(p), "q, k, v, dout must be non-null and 16-byte aligned");
  kq_require(lse != nullptr && workspace != nullptr, "lse and the workspace must be non-null");
  kq_require(!spec.kq_pre || kq_pre != nullptr, "kq_pre is enabled but its weights are null");
  kq_require(!spec.head_pre || head_pre != nullptr, "head_pre is enabled but its weights are null");
  kq_require(!spec.kq_post || kq_post != nullptr, "kq_post is enabled but its weights are null");
  kq_require(!spec.head_post || head_post != nullptr, "head_post is enabled but its weights are null");
  kq_require(!dout_lo || aligned16(dout_lo), "dout_lo must be 16-byte aligned");
}
}  // namespace

void flash_kq_layer_post_grads(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v,
                               const bf16* dout, const float* kq_pre, const float* head_pre, const float* kq_post,
                               const float* head_post, const float* lse, float* dv_acc, float* grad_kq_post,
                               float* grad_head_post, float* delta, float* workspace, int B, int T, cudaStream_t s,
                               const bf16* dout_lo) {
  const int D = spec.head_dim;
  kq_require(flash_kq_layer_post_grads_supported(spec, D),
             "kernel P needs what the forward needs (kq_pre or kq_post, each with cq <= 8, ck <= 15; "
             "head_dim 64 or 128; at most 16 coupled heads)");
  require_grad_inputs(spec, q, k, v, dout, kq_pre, head_pre, kq_post, head_post, lse, workspace, dout_lo, B, T);
  kq_require(dv_acc != nullptr && delta != nullptr, "dv_acc and delta must be non-null");
  kq_require(aligned16(dv_acc), "dv_acc must be 16-byte aligned (float pairs are added into it)");
  kq_require(!spec.kq_post || grad_kq_post != nullptr, "kq_post is enabled but its gradient is null");
  kq_require(!spec.head_post || grad_head_post != nullptr, "head_post is enabled but its gradient is null");
  const int H = spec.heads, G = spec.coupled_heads(), ntiles = (T + kTile - 1) / kTile;
  float* part_w = workspace;
  float* part_m = workspace + static_cast<size_t>(B) * (H / G) * ntiles * G * kWStride;
  MTA_CUDA_CHECK(cudaMemsetAsync(delta, 0, static_cast<size_t>(B) * H * T * sizeof(float), s));  // add_delta_terms adds
  if (D == 64)
    dispatch_post_grads<64>(spec, q, k, v, dout, kq_pre, head_pre, kq_post, head_post, lse, dout_lo, dv_acc, part_w,
                            part_m, delta, B, T, s);
  else
    dispatch_post_grads<128>(spec, q, k, v, dout, kq_pre, head_pre, kq_post, head_post, lse, dout_lo, dv_acc, part_w,
                             part_m, delta, B, T, s);
  if (spec.kq_post)
    reduce_partials(part_w, grad_kq_post, B, H, G, ntiles, kWStride, spec.kq_post->q * spec.kq_post->k, s);
  if (spec.head_post) reduce_partials(part_m, grad_head_post, B, H, G, ntiles, kMaxG, spec.head_post->group, s);
}

bool flash_kq_layer_backward_supported(const AttentionSpec& spec, int D) {
  return flash_kq_layer_forward_supported(spec, D) && cluster_size(spec.coupled_heads(), bwd_heads(D)) > 0;
}

size_t flash_kq_layer_backward_workspace_floats(const AttentionSpec& spec, int B, int T) {
  const size_t rows = static_cast<size_t>(B) * spec.heads * T;
  return delta_floats(rows) + rows * spec.head_dim + flash_kq_layer_post_grads_workspace_floats(spec, B, T);
}

void flash_kq_layer_pre_grads(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                              const float* kq_pre, const float* head_pre, const float* kq_post,
                              const float* head_post, const float* lse, const float* delta, bf16* dq, float* dk_acc,
                              float* grad_kq_pre, float* grad_head_pre, float* workspace, int B, int T, cudaStream_t s,
                              const bf16* dout_lo) {
  const int D = spec.head_dim;
  kq_require(flash_kq_layer_backward_supported(spec, D),
             "kernel Q needs what the forward needs (kq_pre or kq_post, each with cq <= 8, ck <= 15; "
             "head_dim 64 or 128; at most 16 coupled heads)");
  require_grad_inputs(spec, q, k, v, dout, kq_pre, head_pre, kq_post, head_post, lse, workspace, dout_lo, B, T);
  kq_require(dq != nullptr && aligned16(dq), "dq must be non-null and 16-byte aligned");
  kq_require(delta != nullptr && dk_acc != nullptr, "delta and dk_acc must be non-null");
  kq_require(aligned16(dk_acc), "dk_acc must be 16-byte aligned (float pairs are added into it)");
  kq_require(!spec.kq_pre || grad_kq_pre != nullptr, "kq_pre is enabled but its gradient is null");
  kq_require(!spec.head_pre || grad_head_pre != nullptr, "head_pre is enabled but its gradient is null");
  const int H = spec.heads, G = spec.coupled_heads(), ntiles = (T + kTile - 1) / kTile;
  float* part_w = workspace;
  float* part_m = workspace + static_cast<size_t>(B) * (H / G) * ntiles * G * kWStride;
  const KqConv pre = pre_conv(spec);
  float* vmax = part_m + static_cast<size_t>(B) * (H / G) * ntiles * G * kMaxG;
  const size_t nv = static_cast<size_t>(B) * H * T * D;
  MTA_CUDA_CHECK(cudaMemsetAsync(vmax, 0, sizeof(float), s));
  abs_max_kernel<<<static_cast<unsigned>(std::min<size_t>((nv + 255) / 256, 1024)), 256, 0, s>>>(v, nv, vmax);
  MTA_CUDA_CHECK_LAUNCH("abs_max_kernel");
  if (D == 64)
    dispatch_pre_grads<64>(spec, q, k, v, dout, kq_pre, head_pre, kq_post, head_post, lse, delta, dout_lo, vmax, dq,
                           dk_acc, part_w, part_m, B, T, s);
  else
    dispatch_pre_grads<128>(spec, q, k, v, dout, kq_pre, head_pre, kq_post, head_post, lse, delta, dout_lo, vmax,
                            dq, dk_acc, part_w, part_m, B, T, s);
  if (spec.kq_pre) reduce_partials(part_w, grad_kq_pre, B, H, G, ntiles, kWStride, pre.q * pre.k, s);
  if (spec.head_pre) reduce_partials(part_m, grad_head_pre, B, H, G, ntiles, kMaxG, spec.head_pre->group, s);
}

void flash_kq_layer_backward(const AttentionSpec& spec, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                             const float* kq_pre, const float* head_pre, const float* kq_post, const float* head_post,
                             const float* lse, bf16* dq, bf16* dk, bf16* dv, float* grad_kq_pre, float* grad_head_pre,
                             float* grad_kq_post, float* grad_head_post, float* workspace, int B, int T,
                             cudaStream_t s, const bf16* dout_lo) {
  kq_require(dk != nullptr && dv != nullptr, "dk and dv must be non-null");
  const size_t rows = static_cast<size_t>(B) * spec.heads * T, n = rows * spec.head_dim;
  float* delta = workspace;  // kernel P's by-product, kernel Q's input
  // One fp32 accumulator serves dv (kernel P), then dk (kernel Q): the kernels run one after the other
  // on `s`, so the second needs no memory of its own (rows x D x 4 bytes less at peak). It starts 16-byte
  // aligned after delta (delta_floats): the kernels add float pairs into it.
  float* acc = delta + delta_floats(rows);
  float* parts = acc + n;
  const int blocks = static_cast<int>(std::min<size_t>((n + 255) / 256, 4096));
  MTA_CUDA_CHECK(cudaMemsetAsync(acc, 0, n * sizeof(float), s));
  flash_kq_layer_post_grads(spec, q, k, v, dout, kq_pre, head_pre, kq_post, head_post, lse, acc, grad_kq_post,
                            grad_head_post, delta, parts, B, T, s, dout_lo);
  f32_to_bf16_kernel<<<blocks, 256, 0, s>>>(acc, dv, n);
  MTA_CUDA_CHECK_LAUNCH("f32_to_bf16_kernel");
  MTA_CUDA_CHECK(cudaMemsetAsync(acc, 0, n * sizeof(float), s));
  flash_kq_layer_pre_grads(spec, q, k, v, dout, kq_pre, head_pre, kq_post, head_post, lse, delta, dq, acc,
                           grad_kq_pre, grad_head_pre, parts, B, T, s, dout_lo);
  f32_to_bf16_kernel<<<blocks, 256, 0, s>>>(acc, dk, n);
  MTA_CUDA_CHECK_LAUNCH("f32_to_bf16_kernel");
}


}  // namespace mta::cuda
