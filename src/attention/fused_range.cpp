#include "attention/fused_range.h"

#include <algorithm>
#include <cmath>
#include <sstream>

namespace mta {
namespace {

// max over rows t of |x[b, h, t, :]| for one (b, h).
double max_row_norm(const float* x, int T, int D) {
  double best = 0;
  for (int t = 0; t < T; ++t) {
    const float* row = x + static_cast<size_t>(t) * D;
    double s = 0;
    for (int c = 0; c < D; ++c) s += static_cast<double>(row[c]) * row[c];
    best = std::max(best, s);
  }
  return std::sqrt(best);
}

}  // namespace

std::string fused_fp16_range_problem(const AttentionSpec& spec, const AttnDims& dims, const float* q, const float* k,
                                     const float* kq_pre) {
  if (!spec.kq_pre) return "";
  const int B = dims.B, H = dims.H, T = dims.T, D = dims.D;
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(D));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const size_t off = (static_cast<size_t>(b) * H + h) * T * D;
      const double bound = max_row_norm(q + off, T, D) * max_row_norm(k + off, T, D) * inv_sqrt_d;
      if (bound > kFusedMaxLogit) {
        std::ostringstream os;
        os << "the logits of batch " << b << ", head " << h << " may reach " << bound
           << " (|q| * |k| / sqrt(D)), beyond the fused kernel's fp16 range (" << kFusedMaxLogit << ")";
        return os.str();
      }
    }
  const int per_head = spec.kq_pre->q * spec.kq_pre->k;
  for (int h = 0; h < H; ++h) {
    double m = 0;
    const float* w = kq_pre + static_cast<size_t>(h) * per_head;
    for (int i = 0; i < per_head; ++i) m = std::max(m, std::fabs(static_cast<double>(w[i])));
    if (m > kFusedMaxLogit || (m > 0 && m < std::ldexp(1.0, -14))) {
      std::ostringstream os;
      os << "the kq_pre weights of head " << h << " have largest magnitude " << m
         << ", outside the fused kernel's fp16 range [2^-14, " << kFusedMaxLogit << "]";
      return os.str();
    }
  }
  return "";
}

}  // namespace mta
