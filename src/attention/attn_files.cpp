#include "attention/attn_files.h"

#include <cmath>
#include <set>

#include "attention/attention_op.h"
#include "attention/mta_cpu.h"
#include "util/error.h"

#ifdef MTA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <memory>
#include <stdexcept>

#include "attention/mta_cuda.h"
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
#endif

template <typename T>
io::SafeTensors run(const AttentionSpec& spec, const io::SafeTensors& in, const AttnDims& dims, Device device) {
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
  if (device == Device::Cuda) {
#ifdef MTA_HAVE_CUDA
    run_cuda<T>(spec, dims, q, k, v, infos, pvals, backward ? &dout : nullptr, o, dq, dk, dv, gvals);
#else
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
  out.metadata["compute_dtype"] = std::is_same_v<T, double> ? "F64" : "F32";
  return out;
}

}  // namespace

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::Cpu;
  if (name == "cuda") return Device::Cuda;
  throw InputError("--device: must be cpu or cuda (got '" + name + "')");
}

io::SafeTensors run_attention_tensors(const AttentionSpec& spec, const io::SafeTensors& in, Device device,
                                      std::vector<std::string>* warnings) {
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
  if (q.dtype == io::DType::F64) return run<double>(spec, in, dims, device);
  return run<float>(spec, in, dims, device);
}

}  // namespace mta
