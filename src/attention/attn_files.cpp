#include "attention/attn_files.h"

#include <cmath>
#include <set>

#include "attention/attention_op.h"
#include "attention/fused_range.h"
#include "attention/mta_cpu.h"
#include "util/error.h"

#ifdef MTA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <memory>
#include <stdexcept>

#include <cstdint>

#include "attention/fused_attention.h"
#include "attention/mta_cuda.h"
#include "util/bf16_bits.h"
#endif

namespace mta {
namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  io::Tensor t;
  t.shape = s;
  return t.shape_str();
}

// Pointers of the enabled parameters, at(i) giving the storage of infos[i].
template <typename Pointers, typename At>
Pointers by_info(const std::vector<AttentionParamInfo>& infos, At&& at) {
  return attn_pointers<Pointers>([&](const char* name) -> decltype(at(0)) {
    for (size_t i = 0; i < infos.size(); ++i)
      if (infos[i].name == name) return at(i);
    return nullptr;
  });
}

template <typename T>
std::vector<T> load(const io::SafeTensors& in, const std::string& name, const std::vector<int64_t>& shape) {
  const io::Tensor& t = in.at(name);
  if (t.shape != shape)
    throw InputError("tensor '" + name + "' has shape " + t.shape_str() + ", expected " + shape_str(shape));
  std::vector<T> x;
  if constexpr (std::is_same_v<T, double>) x = io::to_f64(t, "tensor '" + name + "'");
  else x = io::to_f32(t, "tensor '" + name + "'");
  for (size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i]))
      throw InputError("tensor '" + name + "' contains " + (std::isnan(x[i]) ? "NaN" : "Inf") + " at flat index " +
                       std::to_string(i));
  return x;
}

#ifdef MTA_HAVE_CUDA
// Host <-> device copies for the CUDA path; any CUDA failure is a std::runtime_error (exit status 1).
void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("--device cuda: ") + what + ": " + cudaGetErrorString(err));
}

template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(const std::vector<T>& host) : n_(host.size()) {
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<size_t>(n_, 1) * sizeof(T)), "cudaMalloc");
    if (n_) cuda_check(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy to device");
  }
  ~DeviceArray() {
    if (p_) cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return p_; }
  void copy_to(std::vector<T>& host) const {
    host.resize(n_);
    if (n_) cuda_check(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
  }

 private:
  size_t n_ = 0;
  T* p_ = nullptr;
};

// The op on the GPU: the same inputs and outputs as the CPU calls in run() below (host vectors).
template <typename T>
void run_cuda(const AttentionSpec& spec, const AttnDims& dims, const std::vector<T>& q, const std::vector<T>& k,
              const std::vector<T>& v, const std::vector<AttentionParamInfo>& infos,
              const std::vector<std::vector<T>>& pvals, const std::vector<T>* dout, std::vector<T>& o,
              std::vector<T>& dq, std::vector<T>& dk, std::vector<T>& dv, std::vector<std::vector<T>>& gvals) {
  if (cuda::device_count() < 1) throw std::runtime_error("--device cuda: no CUDA device is available");
  DeviceArray<T> d_q(q), d_k(k), d_v(v);
  std::vector<std::unique_ptr<DeviceArray<T>>> dp, dg;
  for (size_t i = 0; i < infos.size(); ++i) {
    dp.push_back(std::make_unique<DeviceArray<T>>(pvals[i]));
    dg.push_back(std::make_unique<DeviceArray<T>>(gvals[i]));  // zeros: gradients are added into
  }
  const auto p = by_info<AttnParams<T>>(infos, [&](size_t i) -> const T* { return dp[i]->get(); });
  const auto g = by_info<AttnParamGrads<T>>(infos, [&](size_t i) -> T* { return dg[i]->get(); });
  DeviceArray<T> d_out(o);
  cuda::mta_forward<T>(spec, dims, d_q.get(), d_k.get(), d_v.get(), p, d_out.get());
  d_out.copy_to(o);
  if (dout) {
    DeviceArray<T> d_dout(*dout), d_dq(dq), d_dk(dk), d_dv(dv);
    cuda::mta_backward<T>(spec, dims, d_q.get(), d_k.get(), d_v.get(), p, d_dout.get(), d_dq.get(), d_dk.get(),
                          d_dv.get(), g);
    d_dq.copy_to(dq), d_dk.copy_to(dk), d_dv.copy_to(dv);
    for (size_t i = 0; i < infos.size(); ++i) dg[i]->copy_to(gvals[i]);
  }
}
std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = float_to_bf16_bits(x[i]);
  return r;
}
void from_bf16(const DeviceArray<uint16_t>& d, std::vector<float>& host) {
  std::vector<uint16_t> bits;
  d.copy_to(bits);
  host.resize(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) host[i] = bf16_bits_to_float(bits[i]);
}
__nv_bfloat16* bf(const DeviceArray<uint16_t>& d) { return reinterpret_cast<__nv_bfloat16*>(d.get()); }

// The fused path (attention/fused_attention.h) on float32 tensors: q, k, v and dout are rounded to
// bf16, the outputs come back from bf16; parameters and their gradients stay float32.
void run_cuda_fused(const AttentionSpec& spec, const AttnDims& dims, const std::vector<float>& q,
                    const std::vector<float>& k, const std::vector<float>& v,
                    const std::vector<AttentionParamInfo>& infos, const std::vector<std::vector<float>>& pvals,
                    const std::vector<float>* dout, std::vector<float>& o, std::vector<float>& dq,
                    std::vector<float>& dk, std::vector<float>& dv, std::vector<std::vector<float>>& gvals) {
  if (cuda::device_count() < 1) throw std::runtime_error("--device cuda: no CUDA device is available");
  std::vector<std::unique_ptr<DeviceArray<float>>> dp, dg;
  for (size_t i = 0; i < infos.size(); ++i) {
    dp.push_back(std::make_unique<DeviceArray<float>>(pvals[i]));
    dg.push_back(std::make_unique<DeviceArray<float>>(gvals[i]));  // zeros: gradients are added into
  }
  const auto p = by_info<AttnParams<float>>(infos, [&](size_t i) -> const float* { return dp[i]->get(); });
  const auto g = by_info<AttnParamGrads<float>>(infos, [&](size_t i) -> float* { return dg[i]->get(); });
  const bool epi = cuda::fused_attention_has_epilogue(spec);
  DeviceArray<uint16_t> d_q(to_bf16(q)), d_k(to_bf16(k)), d_v(to_bf16(v)), d_o(std::vector<uint16_t>(q.size())),
      d_core(std::vector<uint16_t>(epi ? q.size() : 0));
  DeviceArray<float> d_lse(std::vector<float>(static_cast<size_t>(dims.B) * dims.H * dims.T));
  const size_t n32 = cuda::fused_attention_core32_floats(spec, dims.B, dims.T);
  DeviceArray<float> d_core32{std::vector<float>(n32)};
  float* core32 = n32 ? d_core32.get() : nullptr;
  const AttnOptions opt;
  cuda::fused_attention_forward(spec, bf(d_q), bf(d_k), bf(d_v), p, epi ? bf(d_core) : nullptr, bf(d_o), d_lse.get(),
                                dims.B, dims.T, opt, 0, core32);
  cuda_check(cudaDeviceSynchronize(), "fused forward");
  from_bf16(d_o, o);
  if (!dout) return;
  DeviceArray<uint16_t> d_dout(to_bf16(*dout)), d_dq(std::vector<uint16_t>(q.size())),
      d_dk(std::vector<uint16_t>(q.size())), d_dv(std::vector<uint16_t>(q.size()));
  DeviceArray<uint8_t> scratch(std::vector<uint8_t>(cuda::fused_attention_backward_scratch_bytes(spec, dims.B, dims.T)));
  cuda::fused_attention_backward(spec, bf(d_q), bf(d_k), bf(d_v), p, epi ? bf(d_core) : bf(d_o), bf(d_dout),
                                 d_lse.get(), bf(d_dq), bf(d_dk), bf(d_dv), g, scratch.get(), dims.B, dims.T, opt, 0,
                                 core32);
  cuda_check(cudaDeviceSynchronize(), "fused backward");
  from_bf16(d_dq, dq), from_bf16(d_dk, dk), from_bf16(d_dv, dv);
  for (size_t i = 0; i < infos.size(); ++i) dg[i]->copy_to(gvals[i]);
}
#endif

#ifdef MTA_HAVE_CUDA
// Whether the fused kernels compute this spec (forward and backward cover the same specs).
bool fused_covers(const AttentionSpec& spec, const AttnDims& dims) {
  return dims.dv() == dims.D && cuda::fused_attention_supported(spec, dims.D);
}

// Which CUDA path runs: the fused kernels where they cover the spec (auto) or when asked for; the
// materialized op otherwise, always for float64 input (the fused kernels compute in bf16), and for
// inputs outside the fused kernels' fp16 range (`range_problem`, fused_range.h; auto falls back,
// --impl fused refuses).
bool fused_path(const AttentionSpec& spec, const AttnDims& dims, AttnImpl impl, bool float32, bool backward,
                const std::string& range_problem) {
  const bool covered = fused_covers(spec, dims);
  if (impl == AttnImpl::Fused) {
    if (!covered)
      throw InputError(std::string("--impl fused: the fused kernels do not cover this spec") +
                       (backward ? " with gradients" : "") +
                       " yet (kq_pre alone; head mixing alone; kq_pre and / or kq_post with head mixing; up to "
                       "16 coupled heads; plus norm / depth scaling / gate; head_dim 64 or 128; see "
                       "docs/flash-mta.md); use --impl auto or materialized");
    if (!float32) throw InputError("--impl fused: the fused kernels take F32 input (they compute in bf16), not F64");
    if (!range_problem.empty()) throw InputError("--impl fused: " + range_problem + "; use --impl auto or materialized");
  }
  return impl != AttnImpl::Materialized && covered && float32 && range_problem.empty();
}
#endif

template <typename T>
io::SafeTensors run(const AttentionSpec& spec, const io::SafeTensors& in, const AttnDims& dims, Device device,
                    AttnImpl impl) {
  const std::vector<int64_t> qshape{dims.B, dims.H, dims.T, dims.D};
  std::vector<T> q = load<T>(in, "q", qshape), k = load<T>(in, "k", qshape), v = load<T>(in, "v", qshape);
  const auto infos = attention_params(spec);
  std::vector<std::vector<T>> pvals;
  for (const auto& info : infos) pvals.push_back(load<T>(in, info.name, std::vector<int64_t>(info.shape.begin(), info.shape.end())));

  std::vector<std::vector<T>> gvals;
  for (const auto& pv : pvals) gvals.emplace_back(pv.size(), T(0));
  const auto p = by_info<AttnParams<T>>(infos, [&](size_t i) -> const T* { return pvals[i].data(); });
  const auto g = by_info<AttnParamGrads<T>>(infos, [&](size_t i) -> T* { return gvals[i].data(); });

  const bool backward = in.has("dout");
  std::vector<T> dout;
  if (backward) dout = load<T>(in, "dout", qshape);

  io::SafeTensors out;
  std::vector<T> o(q.size());
  std::vector<T> dq, dk, dv;
  if (backward) dq.resize(q.size()), dk.resize(q.size()), dv.resize(q.size());
  bool fused = false;
  std::string range_problem;  // why the fused kernels cannot take these inputs (empty: they can)
  if (device == Device::Cuda) {
#ifdef MTA_HAVE_CUDA
    if constexpr (std::is_same_v<T, float>)
      if (impl != AttnImpl::Materialized && fused_covers(spec, dims) &&
          cuda::fused_attention_fp16_logits(spec, dims.D))
        range_problem = fused_fp16_range_problem(spec, dims, q.data(), k.data(), p.kq_pre);
    fused = fused_path(spec, dims, impl, std::is_same_v<T, float>, backward, range_problem);
    if constexpr (std::is_same_v<T, float>) {
      if (fused) run_cuda_fused(spec, dims, q, k, v, infos, pvals, backward ? &dout : nullptr, o, dq, dk, dv, gvals);
    }
    if (!fused) run_cuda<T>(spec, dims, q, k, v, infos, pvals, backward ? &dout : nullptr, o, dq, dk, dv, gvals);
#else
    (void)impl;
    throw InputError("--device cuda: this build has no CUDA backend");
#endif
  } else {
    cpu::mta_forward<T>(spec, dims, q.data(), k.data(), v.data(), p, o.data());
    if (backward)
      cpu::mta_backward<T>(spec, dims, q.data(), k.data(), v.data(), p, dout.data(), dq.data(), dk.data(), dv.data(), g);
  }
  out.tensors["out"] = io::make_tensor(qshape, o.data());
  if (backward) {
    out.tensors["grad_q"] = io::make_tensor(qshape, dq.data());
    out.tensors["grad_k"] = io::make_tensor(qshape, dk.data());
    out.tensors["grad_v"] = io::make_tensor(qshape, dv.data());
    for (size_t i = 0; i < infos.size(); ++i)
      out.tensors["grad_" + infos[i].name] =
          io::make_tensor(std::vector<int64_t>(infos[i].shape.begin(), infos[i].shape.end()), gvals[i].data());
  }
  out.metadata["producer"] = "mta attn";
  out.metadata["compute_dtype"] = fused ? "BF16" : std::is_same_v<T, double> ? "F64" : "F32";
  out.metadata["impl"] = device == Device::Cpu ? "cpu" : fused ? "fused" : "materialized";
  if (!range_problem.empty()) out.metadata["impl_reason"] = range_problem;  // auto fell back to materialized
  return out;
}

}  // namespace

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::Cpu;
  if (name == "cuda") return Device::Cuda;
  throw InputError("--device: must be cpu or cuda (got '" + name + "')");
}

AttnImpl parse_attn_impl(const std::string& name) {
  if (name == "auto") return AttnImpl::Auto;
  if (name == "fused") return AttnImpl::Fused;
  if (name == "materialized") return AttnImpl::Materialized;
  throw InputError("--impl: must be auto, fused or materialized (got '" + name + "')");
}

io::SafeTensors run_attention_tensors(const AttentionSpec& spec, const io::SafeTensors& in, Device device,
                                      std::vector<std::string>* warnings, AttnImpl impl) {
  spec.validate();
  const io::Tensor& q = in.at("q");
  if (q.shape.size() != 4) throw InputError("tensor 'q' has shape " + q.shape_str() + ", expected [B, H, T, D]");
  AttnDims dims{static_cast<int>(q.shape[0]), static_cast<int>(q.shape[1]), static_cast<int>(q.shape[2]),
                static_cast<int>(q.shape[3])};
  if (q.shape[1] != spec.heads)
    throw InputError("tensor 'q' has " + std::to_string(q.shape[1]) + " heads (shape " + q.shape_str() +
                     "), spec.heads = " + std::to_string(spec.heads));
  if (q.shape[3] != spec.head_dim)
    throw InputError("tensor 'q' has head dim " + std::to_string(q.shape[3]) + " (shape " + q.shape_str() +
                     "), spec.head_dim = " + std::to_string(spec.head_dim));
  for (int i = 0; i < 4; ++i)
    if (q.shape[i] < 1 || q.shape[i] > (1 << 30)) throw InputError("tensor 'q' has an empty or huge dimension: shape " + q.shape_str());

  if (warnings) {
    std::set<std::string> used{"q", "k", "v", "dout"};
    for (const auto& info : attention_params(spec)) used.insert(info.name);
    for (const auto& [name, t] : in.tensors)
      if (!used.count(name)) warnings->push_back(name);
  }
#ifndef MTA_HAVE_CUDA
  if (device == Device::Cuda) throw InputError("--device cuda: this build has no CUDA backend");
#endif
  if (q.dtype == io::DType::F64) return run<double>(spec, in, dims, device, impl);
  return run<float>(spec, in, dims, device, impl);
}

}  // namespace mta
