#pragma once
// Coupled head groups spread over a thread-block cluster, for the kernels that run one warp per head of
// a group (flash_mix.cu, flash_kq_layer.cu). A group runs in one CTA where that CTA's shared memory and
// registers hold it, else on a cluster of the fewest CTAs that hold it, one warp per head and the last
// CTA padded where they do not split it evenly (cluster_size: FlashMix and the kq layers' forward hold
// up to 8 heads per CTA at D = 128, so 9-16 heads take 2 CTAs; kernels P and Q hold 4 at D = 128, so
// 8 heads take 2 CTAs and 13-16 take 4; at D = 64, FlashMix and pass 1 hold 16 heads in one CTA). The
// mixing products need every head's tile: each CTA writes its heads' tiles into its own MixIn buffers
// (head_mix_mma.cuh) and into its peers' through distributed shared memory (group_sync; the kq layers'
// mix_in_place stores each lane's values directly), and computes the mix for its own heads
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

// The exchange protocol on a cluster (C > 1). Each CTA writes its heads' tiles into its own MixIn
// buffers and stores them into every peer's (distributed shared memory, posted 16-byte stores: no
// CTA waits for a remote load), so that its mixing products see every head of the group. Two cluster
// barriers order it:
//   (A) a CTA arrives once it no longer reads its MixIn buffers (mix_done, after the mix and any
//       reads of the mix's input), and waits before its next stores into its peers' buffers;
//   (B) arrive after the stores, wait before the mix: every head's tile is in every CTA's buffers.
// (A)'s wait falls after the work between two mixes, so one barrier per mix is exposed. group_start
// arrives at (A) once MixIn is zeroed; group_finish waits for the last (A) before the kernel ends.
// Every thread of every CTA of the cluster runs the same sequence of these calls. Measured (RESULTS,
// session 10): against copies pulled from the peers after a cluster barrier (one remote round trip
// per 16 bytes), the paper-LM kq layer got 10% faster at D = 64 (pairs) and 27% at D = 128 (4 CTAs).

// After the kernel's setup (MixIn zeroed, coefficient fragments built): a CTA barrier, and (A).
__device__ __forceinline__ void group_start(const GroupPlace& gp) {
  __syncthreads();
  if (gp.C > 1) cluster_arrive();
}
// Before the kernel ends: no peer stores into this CTA's shared memory any more.
__device__ __forceinline__ void group_finish(const GroupPlace& gp) {
  if (gp.C > 1) cluster_wait();
}

// This CTA's head slots of `buf` (written by its warps, visible after a CTA barrier) into every peer's
// `buf`.
__device__ __forceinline__ void push_own_slots(const GroupPlace& gp, __nv_bfloat16* buf) {
  namespace cg = cooperative_groups;
  using headmix::kYS;
  constexpr int kChunks = kYS * static_cast<int>(sizeof(__nv_bfloat16)) / 16;  // 16-byte chunks per head slot
  static_assert(kYS * sizeof(__nv_bfloat16) % 16 == 0, "head slots are whole 16-byte chunks");
  cg::cluster_group cl = cg::this_cluster();
  const int n = gp.L * kChunks;
  const uint4* own = reinterpret_cast<const uint4*>(buf + static_cast<size_t>(gp.h0) * kYS);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint4 x = own[i];
    for (int peer = 0; peer < gp.C; ++peer)
      if (peer != gp.rank)
        reinterpret_cast<uint4*>(cl.map_shared_rank(buf, peer) + static_cast<size_t>(gp.h0) * kYS)[i] = x;
  }
}

// The barrier before a mix, once each warp has written its head's tile into the MixIn buffers given
// (up to three; null ones are skipped): every head's tile in them (C = 1: the CTA's barrier; C > 1:
// (A)'s wait, the pushes, (B)). Every group_sync is followed by mix_done.
__device__ __forceinline__ void group_sync(const GroupPlace& gp, __nv_bfloat16* a, __nv_bfloat16* b = nullptr,
                                           __nv_bfloat16* c = nullptr) {
  __syncthreads();
  if (gp.C == 1) return;
  cluster_wait();  // (A): every peer is done reading its buffers
  if (a) push_own_slots(gp, a);
  if (b) push_own_slots(gp, b);
  if (c) push_own_slots(gp, c);
  cluster_arrive();  // (B)
  cluster_wait();
}

// The barrier after a mix and the reads of its input: every head's mixed tile in MixOut, and (C > 1)
// this CTA's arrival at (A).
__device__ __forceinline__ void mix_done(const GroupPlace& gp) {
  __syncthreads();
  if (gp.C > 1) cluster_arrive();
}

}  // namespace
}  // namespace mta::cuda
