#pragma once
// Helpers for attention tests: random inputs and parameters for a spec, identity parameters, the
// relative error the tests compare with.
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "attention/attention_op.h"
#include "attention/init.h"

namespace mta::testing {

// ||a - b|| / ||b|| (||a - b|| when b is 0); infinite when the sizes differ or a has a non-finite entry.
inline double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <typename T>
struct AttnCase {
  AttentionSpec spec;
  AttnDims dims;
  std::vector<T> q, k, v, dout;
  std::map<std::string, std::vector<T>> params;  // by name, as attention_params(spec)
  AttnOptions opt;

  AttnParams<T> param_ptrs() const {
    return attn_pointers<AttnParams<T>>([&](const char* n) -> const T* {
      auto it = params.find(n);
      return it == params.end() ? nullptr : it->second.data();
    });
  }
};

inline long long prod(const std::vector<long long>& s) {
  long long n = 1;
  for (auto x : s) n *= x;
  return n;
}

// Identity initialisation of the semantics page (the library's).
template <typename T>
std::map<std::string, std::vector<T>> identity_params(const AttentionSpec& s) {
  std::map<std::string, std::vector<T>> m;
  for (const auto& info : attention_params(s)) {
    std::vector<T> x(prod(info.shape));
    init_attention_param_identity(s, info, x.data());
    m[info.name] = x;
  }
  return m;
}

template <typename T>
AttnCase<T> random_case(const AttentionSpec& spec, int B, int Tn, unsigned seed, bool identity = false, int Dv = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  AttnCase<T> c;
  c.spec = spec;
  c.dims = AttnDims{B, spec.heads, Tn, spec.head_dim, Dv};
  auto fill = [&](std::vector<T>& x, size_t n, double sd, double mean = 0) {
    x.resize(n);
    for (auto& e : x) e = static_cast<T>(mean + sd * nd(rng));
  };
  fill(c.q, c.dims.numel(), 1.0);
  fill(c.k, c.dims.numel(), 1.0);
  fill(c.v, c.dims.numel_v(), 1.0);
  fill(c.dout, c.dims.numel_v(), 1.0);
  if (identity) {
    c.params = identity_params<T>(spec);
  } else {
    for (const auto& info : attention_params(spec)) {
      std::vector<T> x;
      fill(x, prod(info.shape), info.name == "norm" ? 0.3 : 0.5, info.name == "norm" ? 1.0 : 0.0);
      c.params[info.name] = x;
    }
  }
  return c;
}

}  // namespace mta::testing
