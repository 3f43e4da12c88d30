#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "util/error.h"

namespace mta {

void SamplingOptions::validate() const {
  if (!std::isfinite(temperature) || temperature < 0)
    throw InputError("temperature: must be a number >= 0 (0 is greedy; got " + std::to_string(temperature) + ")");
  if (top_k < 0) throw InputError("top_k: must be >= 0 (0 is all tokens; got " + std::to_string(top_k) + ")");
  if (top_k > 0 && temperature == 0)
    throw InputError("top_k: needs a temperature > 0 (with temperature 0, decoding is greedy and top_k has no effect)");
}

Sampler::Sampler(const SamplingOptions& opt) : opt_(opt), rng_(opt.seed) { opt_.validate(); }

int32_t Sampler::next(const std::vector<double>& logits) {
  const int V = static_cast<int>(logits.size());
  // A strict total order: higher logit first, then lower id.
  auto before = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (opt_.temperature == 0) {
    int best = 0;
    for (int c = 1; c < V; ++c)
      if (before(c, best)) best = c;
    return best;
  }
  std::vector<int> cand(V);
  std::iota(cand.begin(), cand.end(), 0);
  if (opt_.top_k > 0 && opt_.top_k < V) {
    std::partial_sort(cand.begin(), cand.begin() + opt_.top_k, cand.end(), before);
    cand.resize(opt_.top_k);
  }
  double m = logits[cand[0]];
  for (int c : cand) m = std::max(m, logits[c]);
  std::vector<double> w(cand.size());
  double sum = 0;
  for (size_t i = 0; i < cand.size(); ++i) sum += w[i] = std::exp((logits[cand[i]] - m) / opt_.temperature);
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * sum;  // uniform in [0, sum)
  double acc = 0;
  for (size_t i = 0; i < cand.size(); ++i) {
    acc += w[i];
    if (u < acc) return cand[i];
  }
  return cand.back();  // u within rounding of sum
}

}  // namespace mta
