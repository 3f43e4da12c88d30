#pragma once
// Helpers shared by the GPU tests: device detection (tests skip themselves without a GPU), checked
// CUDA calls, bit-exact bf16 conversion on the host, a NaN-poisoned device buffer, and the relative
// error measure.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "util/bf16_bits.h"

namespace gpu_test {

inline bool have_gpu() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!gpu_test::have_gpu()) GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount reports none)"

inline void cuda_ok(cudaError_t e, const char* what, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(__FILE__) + ":" + std::to_string(line) + ": " + what + ": " +
                             cudaGetErrorString(e));
}
#define CUDA_OK(expr) gpu_test::cuda_ok((expr), #expr, __LINE__)

// bf16 <-> float on the host, bit exact (round to nearest even; inputs here are finite).
using mta::bf16_bits_to_float;
using mta::float_to_bf16_bits;

// A device buffer of raw bytes, poisoned with 0xFF (NaN in bf16 and fp32).
class DevMem {
 public:
  explicit DevMem(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) { CUDA_OK(cudaMalloc(&p_, bytes_)); }
  ~DevMem() { cudaFree(p_); }
  DevMem(const DevMem&) = delete;
  DevMem& operator=(const DevMem&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  void poison() { CUDA_OK(cudaMemset(p_, 0xFF, bytes_)); }
  template <typename T>
  void upload(const std::vector<T>& h) {
    CUDA_OK(cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  template <typename T>
  std::vector<T> download(size_t n) const {
    std::vector<T> h(n);
    CUDA_OK(cudaMemcpy(h.data(), p_, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  size_t bytes_;
  void* p_ = nullptr;
};

// Random bf16 tensor (randn, then rounded): bits for the GPU, the same values in double for the CPU.
struct Tensor {
  std::vector<uint16_t> bits;
  std::vector<double> val;
};
inline Tensor randn_bf16(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  Tensor t;
  t.bits.resize(n), t.val.resize(n);
  for (size_t i = 0; i < n; ++i) {
    t.bits[i] = float_to_bf16_bits(nd(rng));
    t.val[i] = bf16_bits_to_float(t.bits[i]);
  }
  return t;
}

inline std::vector<double> to_double(const std::vector<uint16_t>& bits) {
  std::vector<double> x(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) x[i] = bf16_bits_to_float(bits[i]);
  return x;
}

inline long long non_finite(const std::vector<double>& a) {
  long long n = 0;
  for (double x : a) n += !std::isfinite(x);
  return n;
}

// ||a - b|| / ||b||; where the reference is (numerically) zero, the RMS of a - b instead (T = 1 gives
// dq = dk = 0 exactly).
inline double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size() || a.empty()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = a[i] - b[i];
    num += d * d, den += b[i] * b[i];
  }
  const double n = static_cast<double>(a.size());
  if (std::sqrt(den / n) < 1e-6) return std::sqrt(num / n);
  return std::sqrt(num) / std::sqrt(den);
}

}  // namespace gpu_test
