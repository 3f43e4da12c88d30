#pragma once
// Coupled head groups spread over a thread-block cluster, for the kernels that run one warp per head of
// a group (flash_mix.cu, flash_kq_layer.cu). A group runs in one CTA where that CTA's shared memory and
// registers hold it, else on a cluster of C CTAs with G / C heads each (cluster_size: FlashMix, and the
// kq layers' forward, hold up to 8 heads per CTA at D = 128 and pair CTAs for 10-16 heads; the kq
// layers' backward holds 4 at D = 128, so 8 heads take 2 CTAs and 16 take 4; at D = 64, FlashMix and
// pass 1 hold 16 heads in one CTA). The mixing products need every head's tile: each CTA writes
// its heads' tiles into its own MixIn buffers (head_mix_mma.cuh), copies the other CTA's head slots
// into them through distributed shared memory (cluster_gather), and computes the mix for its own heads
// (mix_tiles_owned). Internal to those files (unnamed namespace: each includes its own copy).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <utility>

#include "attention/head_mix_layout.h"
#include "cuda/check.h"

namespace mta::cuda {
namespace {

using headmix::cluster_size;  // head_mix_layout.h (host-callable, tested on the CPU)

// Launches a pass over B x (H / G) groups x the query (or key) tiles of T, C CTAs of G / C warps per group
// (a cluster when C > 1; blockIdx.x = group unit * C + rank), with `smem` bytes of dynamic shared memory.
template <class... Params, class... Args>
void launch_grouped(void (*kernel)(Params...), int B, int H, int G, int C, int T, size_t smem, cudaStream_t s,
                    Args&&... args) {
  MTA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(B * (H / G) * C),
                     static_cast<unsigned>((T + headmix::kTile - 1) / headmix::kTile));
  cfg.blockDim = dim3(static_cast<unsigned>(32 * (G / C)));
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

// A CTA's place in its coupled group of G heads: the group is spread over a cluster of C CTAs (C = 1:
// one CTA holds it), each with L = G / C heads (warps); this CTA's are heads h0 = rank * L .. + L - 1.
struct GroupPlace {
  int G, C, L, rank, h0;
};
__device__ __forceinline__ GroupPlace group_place(int G, int C) {
  const int L = G / C, rank = static_cast<int>(blockIdx.x) % C;
  return GroupPlace{G, C, L, rank, rank * L};
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
// writes before the arrival are visible to the cluster after the wait.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// With C > 1: after every CTA of the cluster has written its heads' tiles into its own MixIn buffers
// (up to three; null ones are skipped), each copies the other CTAs' head slots into its own (distributed
// shared memory, 16-byte chunks; the loop reads through restrict pointers, unrolled by 2, so that two
// loads can be in flight: batching all of a thread's chunks of three buffers at once spilled kernel Q),
// so that its mixing products see every head of the group. It ends with this CTA's arrival at a second
// cluster barrier, whose wait (in mix_done, after the mix) keeps any CTA from rewriting its MixIn while
// a peer still copies it: the barrier completes while the mix runs. Every thread of every CTA of the
// cluster must call it. Measured (bench/RESULTS.md, session 9): an exchange costs about one cross-SM
// barrier (~0.7 us); the copy and the second barrier were the smaller part.
// Head slots [base, base + n chunks) of `buf` from the cluster's CTA `peer` into this CTA's `buf`.
__device__ __forceinline__ void copy_peer_slots(cooperative_groups::cluster_group& cl, __nv_bfloat16* buf, int peer,
                                                size_t base, int n) {
  const uint4* __restrict__ src = reinterpret_cast<const uint4*>(cl.map_shared_rank(buf, peer) + base);
  uint4* __restrict__ dst = reinterpret_cast<uint4*>(buf + base);
#pragma unroll 2
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

__device__ __forceinline__ void cluster_gather(const GroupPlace& gp, __nv_bfloat16* a, __nv_bfloat16* b = nullptr,
                                               __nv_bfloat16* c = nullptr) {
  namespace cg = cooperative_groups;
  using headmix::kYS;
  constexpr int kChunks = kYS * static_cast<int>(sizeof(__nv_bfloat16)) / 16;  // 16-byte chunks per head slot
  static_assert(kYS * sizeof(__nv_bfloat16) % 16 == 0, "head slots are whole 16-byte chunks");
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();  // every CTA's tiles are in its MixIn
  const int n = gp.L * kChunks;  // chunks per buffer and peer
  // The buffers one by one, not through an array of pointers: with the cluster size known only at run
  // time, an array indexed in the peer loop went to local memory and ptxas then spilled registers
  // (kernel P's runtime-size form: 128 registers and 96 bytes of spills).
  for (int peer = 0; peer < gp.C; ++peer) {
    if (peer == gp.rank) continue;
    const size_t base = static_cast<size_t>(peer) * gp.L * kYS;
    if (a) copy_peer_slots(cl, a, peer, base, n);  // any of the three may be null (FlashMix's delta pass)
    if (b) copy_peer_slots(cl, b, peer, base, n);
    if (c) copy_peer_slots(cl, c, peer, base, n);
  }
  __syncthreads();   // the copies are complete in this CTA's MixIn before its warps mix
  cluster_arrive();  // this CTA is done reading its peers' MixIn (the wait: mix_done)
}

// The barrier before a mix: every head's tile in the MixIn buffers given (with C > 1 the cluster's
// exchange, else the CTA's barrier). Every group_sync is followed by mix_done.
__device__ __forceinline__ void group_sync(const GroupPlace& gp, __nv_bfloat16* a, __nv_bfloat16* b = nullptr,
                                           __nv_bfloat16* c = nullptr) {
  if (gp.C > 1)
    cluster_gather(gp, a, b, c);
  else
    __syncthreads();
}

// The barrier after a mix: every head's mixed tile in MixOut, and (C > 1) no peer still copying this
// CTA's MixIn, so that it may be rewritten.
__device__ __forceinline__ void mix_done(const GroupPlace& gp) {
  __syncthreads();
  if (gp.C > 1) cluster_wait();
}

}  // namespace
}  // namespace mta::cuda
