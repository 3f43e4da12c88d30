#pragma once
// What the CPU and the GPU model must agree on exactly: parameter names, the seeds of the dropout
// sites (so both devices draw the same masks) and DIFF's lambda_init.
#include <cmath>
#include <cstdint>
#include <string>

namespace mta {

inline std::string layer_param_name(int l, const std::string& rest) {
  return "layers." + std::to_string(l) + "." + rest;
}

enum DropSite { kDropAttnWeights = 0, kDropAttnOut = 1, kDropFfnOut = 2 };

// Seed of one dropout site of layer `layer`, derived from the step's seed.
inline uint64_t dropout_site_seed(uint64_t base, int layer, int site) {
  uint64_t x = base ^ (0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(layer * 8 + site + 1));
  x = (x ^ (x >> 31)) * 0xBF58476D1CE4E5B9ULL;
  return x ^ (x >> 29);
}

// DIFF Transformer: lambda_init = 0.8 - 0.6 exp(-0.3 l), l the 0-based layer index.
inline double diff_lambda_init(int l) { return 0.8 - 0.6 * std::exp(-0.3 * l); }

}  // namespace mta
