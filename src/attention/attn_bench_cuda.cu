// See attn_bench_cuda.h.
#include "attention/attn_bench_cuda.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <vector>

#include "attention/flash_attn.h"
#include "attention/fused_attention.h"
#include "attention/init.h"
#include "attention/mta_cuda.h"
#include "cuda/check.h"
#include "util/error.h"

namespace mta::cuda {
namespace {

using bf16 = __nv_bfloat16;

// Uniform values in [-1, 1) from a hash of (seed, index): cheap, reproducible, never all zeros.
__global__ void fill_uniform_bf16(bf16* x, long long n, uint64_t seed) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    uint64_t h = (static_cast<uint64_t>(i) + seed) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 31, h *= 0xBF58476D1CE4E5B9ull, h ^= h >> 29;
    x[i] = __float2bfloat16(static_cast<float>(h >> 40) / static_cast<float>(1ull << 23) - 1.0f);
  }
}

// Device allocations of one benchmark, counted.
class Arena {
 public:
  ~Arena() {
    for (void* p : ptrs_) cudaFree(p);
  }
  template <typename T>
  T* alloc(size_t n) {
    void* p = nullptr;
    MTA_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    ptrs_.push_back(p);
    bytes_ += n * sizeof(T);
    return static_cast<T*>(p);
  }
  bf16* random_bf16(size_t n, uint64_t seed) {
    bf16* p = alloc<bf16>(n);
    fill_uniform_bf16<<<1024, 256>>>(p, static_cast<long long>(n), seed);
    MTA_CUDA_CHECK_LAUNCH("fill_uniform_bf16");
    return p;
  }
  size_t bytes() const { return bytes_; }

 private:
  std::vector<void*> ptrs_;
  size_t bytes_ = 0;
};

// With warm-up calls, they run for at least this long (each waited for), so that an idle GPU's clocks
// have ramped up before the timed calls: an idle H200 reads ~345 MHz, and 2 warm-up calls of a short op
// (~1 ms) left the first rows of a run at lower clocks (session 20: SDPA's backward at T = 2048 read
// 0.21 to 0.54 ms from run to run with bench/attn_gpu.py's 2 calls, which warms up the same way now).
constexpr double kWarmMs = 100.0;
constexpr int kMaxWarmCalls = 100000;  // bounds the loop whatever the clock says

// Device time per call: reps calls back to back between two events, divided by reps (bench/attn_gpu.py
// times PyTorch the same way), so host launch gaps between calls do not count. warmup = 0: no warm-up at
// all (a profiler's single launch, gpu-ncu.sh).
double mean_ms(const std::function<void()>& fn, int reps, int warmup) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < warmup || (warmup > 0 && i < kMaxWarmCalls &&
                                 std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                                         .count() < kWarmMs);
       ++i) {
    fn();
    if (i >= warmup) MTA_CUDA_CHECK(cudaDeviceSynchronize());  // the wall clock then follows the device
  }
  cudaEvent_t a, b;
  MTA_CUDA_CHECK(cudaEventCreate(&a));
  MTA_CUDA_CHECK(cudaEventCreate(&b));
  MTA_CUDA_CHECK(cudaDeviceSynchronize());
  MTA_CUDA_CHECK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) fn();
  MTA_CUDA_CHECK(cudaEventRecord(b));
  MTA_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  MTA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a), cudaEventDestroy(b);
  return ms / reps;
}

__global__ void cast_bf16_to_f32(const bf16* x, float* y, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    y[i] = __bfloat162float(x[i]);
}

}  // namespace

nlohmann::json bench_attention(const AttentionSpec& spec, int B, int T, const std::string& impl, int reps, int warmup,
                               bool forward_only) {
  const int H = spec.heads, D = spec.head_dim;
  if (impl == "flash" && !spec.is_standard())
    throw InputError("--impl flash: only for standard attention (this spec has MTA options)");
  if (impl == "fused" && !fused_attention_supported(spec, D))
    throw InputError("--impl fused: the fused kernels do not cover this spec yet (see docs/flash-mta.md)");
  if (impl != "flash" && impl != "fused" && impl != "materialized")
    throw InputError("--impl: must be flash, fused or materialized (got '" + impl + "')");
  if (device_count() < 1) throw std::runtime_error("--device cuda: no CUDA device is available");
  const size_t n = static_cast<size_t>(B) * H * T * D, rows = static_cast<size_t>(B) * H * T;
  Arena mem;
  bf16 *q = mem.random_bf16(n, 1), *k = mem.random_bf16(n, 2), *v = mem.random_bf16(n, 3),
       *dout = mem.random_bf16(n, 4);
  bf16 *o = mem.alloc<bf16>(n), *dq = mem.alloc<bf16>(n), *dk = mem.alloc<bf16>(n), *dv = mem.alloc<bf16>(n);
  float* lse = mem.alloc<float>(rows);
  void* scratch = nullptr;
  std::function<void()> fwd, bwd;
  // Parameters at identity plus noise (fp32); for the materialized op (mta_cuda.h, float32) also fp32
  // copies of the same (bf16) input values.
  float *q32 = nullptr, *k32 = nullptr, *v32 = nullptr, *o32 = nullptr, *do32 = nullptr, *dq32 = nullptr,
        *dk32 = nullptr, *dv32 = nullptr;
  const auto infos = attention_params(spec);
  std::vector<float*> pdev(infos.size(), nullptr), gdev(infos.size(), nullptr);
  if (impl == "materialized") {
    q32 = mem.alloc<float>(n), k32 = mem.alloc<float>(n), v32 = mem.alloc<float>(n), do32 = mem.alloc<float>(n);
    o32 = mem.alloc<float>(n), dq32 = mem.alloc<float>(n), dk32 = mem.alloc<float>(n), dv32 = mem.alloc<float>(n);
    for (auto [from, to] : {std::pair{q, q32}, {k, k32}, {v, v32}, {dout, do32}}) {
      cast_bf16_to_f32<<<1024, 256>>>(from, to, static_cast<long long>(n));
      MTA_CUDA_CHECK_LAUNCH("cast_bf16_to_f32");
    }
  }
  for (size_t p = 0; p < infos.size(); ++p) {
    size_t cnt = 1;
    for (auto d : infos[p].shape) cnt *= static_cast<size_t>(d);
    std::vector<float> hp(cnt);
    init_attention_param_identity(spec, infos[p], hp.data());
    for (size_t i = 0; i < cnt; ++i) hp[i] += 0.05f * static_cast<float>(static_cast<int>(i * 7919 % 21) - 10) / 10.f;
    pdev[p] = mem.alloc<float>(cnt), gdev[p] = mem.alloc<float>(cnt);
    MTA_CUDA_CHECK(cudaMemcpy(pdev[p], hp.data(), cnt * sizeof(float), cudaMemcpyHostToDevice));
    MTA_CUDA_CHECK(cudaMemset(gdev[p], 0, cnt * sizeof(float)));
  }
  auto lookup = [&](const std::vector<float*>& bufs, const char* name) -> float* {
    for (size_t i = 0; i < infos.size(); ++i)
      if (infos[i].name == name) return bufs[i];
    return nullptr;
  };
  const auto params = attn_pointers<AttnParams<float>>([&](const char* nm) -> const float* { return lookup(pdev, nm); });
  const auto grads = attn_pointers<AttnParamGrads<float>>([&](const char* nm) -> float* { return lookup(gdev, nm); });
  size_t workspace = 0;  // the materialized op's own allocations, the larger of forward and backward
  if (impl == "materialized") {
    const AttnDims dims{B, H, T, D};
    AttnOptions opt;
    opt.bf16_products = true;  // the inputs are bf16 values: the op as the model runs it
    fwd = [&] {
      mta_forward<float>(spec, dims, q32, k32, v32, params, o32, opt);
      workspace = std::max(workspace, mta_last_workspace_bytes());
    };
    bwd = [&] {
      mta_backward<float>(spec, dims, q32, k32, v32, params, do32, dq32, dk32, dv32, grads, opt);
      workspace = std::max(workspace, mta_last_workspace_bytes());
    };
  } else if (impl == "flash") {
    scratch = mem.alloc<unsigned char>(flash_attn_backward_scratch_bytes(B, H, T, D));
    fwd = [&] { flash_attn_forward(q, k, v, o, lse, B, H, T, D, nullptr); };
    bwd = [&] { flash_attn_backward(q, k, v, o, dout, lse, dq, dk, dv, scratch, B, H, T, D, nullptr); };
  } else {
    // The kq layers with an epilogue keep the core's output in fp32 alone (for the backward).
    const size_t n32 = forward_only ? 0 : fused_attention_core32_floats(spec, B, T);
    float* core32 = n32 ? mem.alloc<float>(n32) : nullptr;
    bf16* core = fused_attention_has_epilogue(spec) && !core32 ? mem.alloc<bf16>(n) : nullptr;
    if (!forward_only) scratch = mem.alloc<unsigned char>(fused_attention_backward_scratch_bytes(spec, B, T));
    fwd = [&, core, core32] {
      fused_attention_forward(spec, q, k, v, params, core, o, lse, B, T, AttnOptions{}, nullptr, core32);
    };
    bwd = [&, core, core32] {
      fused_attention_backward(spec, q, k, v, params, core ? core : o, dout, lse, dq, dk, dv, grads, scratch, B, T,
                               AttnOptions{}, nullptr, core32);
    };
  }
  MTA_CUDA_CHECK(cudaDeviceSynchronize());
  const double fwd_ms = mean_ms(fwd, reps, warmup);
  nlohmann::json bwd_ms, fwd_bwd_ms;  // null with forward_only
  if (!forward_only) {
    bwd_ms = mean_ms(bwd, reps, warmup);
    fwd_bwd_ms = fwd_ms + bwd_ms.get<double>();
  }
  return {{"impl", impl}, {"B", B}, {"H", H}, {"T", T}, {"D", D}, {"fwd_ms", fwd_ms}, {"bwd_ms", bwd_ms},
          {"fwd_bwd_ms", fwd_bwd_ms}, {"device_bytes", mem.bytes() + workspace}, {"reps", reps}};
}

}  // namespace mta::cuda
