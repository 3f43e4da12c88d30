#pragma once
// Coupled head groups spread over a thread-block cluster, for the kernels that run one warp per head of
// a group (flash_mix.cu, flash_kq_layer_fwd.cu / _bwd.cu). A group runs in one CTA where that CTA's shared memory and
// registers hold it, else on a cluster of the fewest CTAs that hold it, one warp per head and the last
// CTA padded where they do not split it evenly (cluster_size: FlashMix and the kq layers' forward hold
// up to 8 heads per CTA at D = 128, so 9-16 heads take 2 CTAs; kernels P and Q hold 4 at D = 128, so
// 8 heads take 2 CTAs and 13-16 take 4; at D = 64, FlashMix and pass 1 hold 16 heads in one CTA). The
// mixing products need every head's tile: each CTA writes its heads' tiles into its own MixIn buffers
// (head_mix_mma.cuh) and into its peers' through distributed shared memory (group_sync; the kq layers'
// mix_in_place stores each lane's values directly), and computes the mix for its own heads
// (mix_tiles_owned). Internal to those files (unnamed namespace: each includes its own copy).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "attention/head_mix_layout.h"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using headmix::cluster_size;  // head_mix_layout.h (host-callable, tested on the CPU)
using headmix::group_warps;

// Launches a pass over B x (H / G) groups x the tiles of `rows` query rows (or keys) of T, C CTAs of
// group_warps(G, C) warps per group (a cluster when C > 1; blockIdx.x = group unit * C + rank), with
// `smem` bytes of dynamic shared memory.
template <class... Params, class... Args>
void launch_grouped_rows(void (*kernel)(Params...), int B, int H, int G, int C, int T, int rows, size_t smem,
                         cudaStream_t s, Args&&... args) {
  MTA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(B * (H / G) * C),
                     static_cast<unsigned>((T + rows - 1) / rows));
  cfg.blockDim = dim3(static_cast<unsigned>(32 * group_warps(G, C)));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = C > 1 ? 1 : 0;
  MTA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));  // launch errors included
}
// The same over tiles of 16 (headmix::kTile), as most passes take them.
template <class... Params, class... Args>
void launch_grouped(void (*kernel)(Params...), int B, int H, int G, int C, int T, size_t smem, cudaStream_t s,
                    Args&&... args) {
  launch_grouped_rows(kernel, B, H, G, C, T, headmix::kTile, smem, s, std::forward<Args>(args)...);
}

// A CTA's place in its coupled group of G heads: the group is spread over a cluster of C CTAs (C = 1:
// one CTA holds it), each with L = group_warps(G, C) warps; this CTA's are heads h0 = rank * L .. + L - 1,
// of which those >= G are padding (cluster_size: the last CTA's last warps when C does not divide G).
struct GroupPlace {
  int G, C, L, rank, h0;
  // Mixes completed so far (the same in every thread of the cluster): the phase of the exchange's
  // mbarriers (C > 1). Mutable: the kernels hold their GroupPlace const and pass it by reference.
  mutable unsigned phase;
  // Whether warp w of this CTA holds a head of the group (else it is padding: it runs the kernel's
  // schedule on a real head's inputs, so that every barrier sees it, but puts nothing into the mixing
  // buffers and writes nothing).
  // (One CTA holds the group without padding: C == 1 folds these where C is known at compile time.)
  __device__ __forceinline__ bool real(int w) const { return C == 1 || h0 + w < G; }
  // The group's head that warp w reads: its own, or for padding the group's last.
  __device__ __forceinline__ int head_of(int w) const { return C == 1 ? w : min(h0 + w, G - 1); }
};
__device__ __forceinline__ GroupPlace group_place(int G, int C) {
  const int L = group_warps(G, C), rank = static_cast<int>(blockIdx.x) % C;
  return GroupPlace{G, C, L, rank, rank * L, 0u};
}

// The CTAs of this CTA's cluster (1 outside a cluster launch): kernels compiled for clusters read their
// group's C here rather than take it as an argument.
__device__ __forceinline__ int cluster_ctas() {
  unsigned n;
  asm("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return static_cast<int>(n);
}

// The cluster barrier in two halves (PTX barrier.cluster): every thread of every CTA of the cluster
// arrives, then waits for all arrivals; a thread alternates the two. Release / acquire: shared-memory
// writes before the arrival are visible to the cluster after the wait. Only group_start uses it now.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// The exchange protocol on a cluster (C > 1), on two mbarriers per CTA (session 16):
//   full: this CTA's MixIn holds every peer's tiles of the current mix. Each peer's threads store
//         their tiles straight into this CTA's MixIn with st.async, which counts its bytes on `full`
//         (complete_tx); one thread of this CTA arrives with the bytes to expect, so the phase ends
//         when all of them have landed, and an acquire wait makes them visible.
//   free: every peer has finished reading its own MixIn for the previous mix, so this CTA may store
//         into it (C - 1 arrivals per phase: one thread of each peer arrives remotely after its mix,
//         mix_done; group_start arrives once for the first mix).
// Mix p waits on both in phase parity p & 1 (GroupPlace::phase counts the mixes). No thread waits for
// its own remote stores: the protocol of sessions 10-15 (two cluster barriers per mix, arrive.release
// after each thread's remote stores) stalled the clustered kq-layer pass 2 1.09 cycles per issued
// instruction on that release (ncu "membar", session 16), a fifth of its time.
// Why it is safe: a peer stores mix p + 1 into this CTA only after `free` phase p + 1, i.e. after this
// CTA's mix_done of mix p, which follows its wait on `full` phase p; so neither barrier sees a phase's
// transactions or arrivals before its previous phase completed, and the stores never overwrite
// tiles still to be read.
__device__ __forceinline__ uint64_t* group_bars() {
  __shared__ uint64_t bars[2];  // [0] full, [1] free
  return bars;
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// The address of the same shared-memory location in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t peer_addr(uint32_t local, int rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(local), "r"(rank));
  return r;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, unsigned parity) {
  // The retry loop inside one asm block (its labels are local to the braces).
  asm volatile(
      "{\n .reg .pred p;\n WAIT:\n"
      " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// One thread's arrival on every peer's `free` barrier (after a barrier of its CTA: cumulative release).
__device__ __forceinline__ void arrive_free_at_peers(const GroupPlace& gp) {
  const uint32_t bar = smem_addr(group_bars() + 1);
  for (int peer = 0; peer < gp.C; ++peer)
    if (peer != gp.rank)
      asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(peer_addr(bar, peer))
                   : "memory");
}
// 16 bytes (x, y, z, w) into CTA `peer`'s shared memory at the (local) address `local`, counted on its
// `full`. By value: a selected uint4 reference would put both candidates in local memory.
__device__ __forceinline__ void store_to_peer(uint32_t local, int peer, uint32_t x, uint32_t y, uint32_t z,
                                              uint32_t w) {
  const uint32_t bar = peer_addr(smem_addr(group_bars()), peer);
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(
                   peer_addr(local, peer)),
               "r"(x), "r"(y), "r"(z), "r"(w), "r"(bar));  // no "memory": the mbarrier waits order it
}
// Before a mix's stores into the peers: they are done reading their MixIn.
__device__ __forceinline__ void wait_free(const GroupPlace& gp) {
  mbar_wait(smem_addr(group_bars() + 1), gp.phase & 1u);
}
// After this CTA's own stores and a CTA barrier: `bytes` (from all peers together) have landed in this
// CTA's MixIn.
__device__ __forceinline__ void wait_full(const GroupPlace& gp, uint32_t bytes) {
  const uint32_t bar = smem_addr(group_bars());
  if (threadIdx.x == 0)
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
  mbar_wait(bar, gp.phase & 1u);
}

// After the kernel's setup (MixIn zeroed, coefficient fragments built): a CTA barrier; on a cluster the
// barriers' initialization, made visible to the peers by one cluster barrier, and the first `free`.
__device__ __forceinline__ void group_start(const GroupPlace& gp) {
  if (gp.C > 1 && threadIdx.x == 0) {
    const uint32_t full_bar = smem_addr(group_bars()), free_bar = smem_addr(group_bars() + 1);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(full_bar) : "memory");
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(free_bar), "r"(gp.C - 1) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (gp.C == 1) return;
  cluster_arrive();
  cluster_wait();  // every CTA's barriers initialized, its MixIn zeroed
  if (threadIdx.x == 0) arrive_free_at_peers(gp);
}
// Before the kernel ends: every peer's last arrival has landed (they arrive after their last mix), so
// nothing will touch this CTA's shared memory any more; a peer in turn waits for this CTA's arrival.
__device__ __forceinline__ void group_finish(const GroupPlace& gp) {
  if (gp.C > 1) wait_free(gp);
}

// This CTA's head slots of `buf` (written by its warps, visible after a CTA barrier) into every peer's
// `buf`; returns the bytes each peer receives.
__device__ __forceinline__ uint32_t push_own_slots(const GroupPlace& gp, __nv_bfloat16* buf) {
  using headmix::kYS;
  constexpr int kChunks = kYS * static_cast<int>(sizeof(__nv_bfloat16)) / 16;  // 16-byte chunks per head slot
  static_assert(kYS * sizeof(__nv_bfloat16) % 16 == 0, "head slots are whole 16-byte chunks");
  const int n = gp.L * kChunks;
  const uint4* own = reinterpret_cast<const uint4*>(buf + static_cast<size_t>(gp.h0) * kYS);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint4 x = own[i];
    for (int peer = 0; peer < gp.C; ++peer)
      if (peer != gp.rank) store_to_peer(smem_addr(own + i), peer, x.x, x.y, x.z, x.w);
  }
  return static_cast<uint32_t>(n) * 16u;
}

// The barrier before a mix, once each warp has written its head's tile into the MixIn buffers given
// (up to three; null ones are skipped): every head's tile in them (C = 1: the CTA's barrier; C > 1:
// `free`, the pushes, `full`). Every group_sync is followed by mix_done.
__device__ __forceinline__ void group_sync(const GroupPlace& gp, __nv_bfloat16* a, __nv_bfloat16* b = nullptr,
                                           __nv_bfloat16* c = nullptr) {
  __syncthreads();
  if (gp.C == 1) return;
  wait_free(gp);
  uint32_t bytes = 0;  // per peer, the same in every CTA (each holds L slots)
  if (a) bytes += push_own_slots(gp, a);
  if (b) bytes += push_own_slots(gp, b);
  if (c) bytes += push_own_slots(gp, c);
  wait_full(gp, bytes * static_cast<uint32_t>(gp.C - 1));
}

// The barrier after a mix and the reads of its input: every head's mixed tile in MixOut, and (C > 1)
// this CTA's arrival at its peers' `free`; the next mix's phase.
__device__ __forceinline__ void mix_done(const GroupPlace& gp) {
  __syncthreads();
  if (gp.C == 1) return;
  if (threadIdx.x == 0) arrive_free_at_peers(gp);
  ++gp.phase;
}

}  // namespace
}  // namespace mta::cuda
