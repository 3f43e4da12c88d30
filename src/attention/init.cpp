#include "attention/init.h"

#include <algorithm>

namespace mta {
namespace {

template <typename T>
void identity(const AttentionSpec& s, const AttentionParamInfo& info, T* x) {
  long long n = 1;
  for (auto d : info.shape) n *= d;
  std::fill(x, x + n, T(0));
  if (info.name == "kq_pre" || info.name == "kq_post") {
    const KqConv& c = info.name == "kq_pre" ? *s.kq_pre : *s.kq_post;
    for (int h = 0; h < s.heads; ++h) x[(h * c.q + c.q - 1) * c.k + c.key_offset()] = T(1);
  } else if (info.name == "head_pre" || info.name == "head_post") {
    const long long g = info.shape[1];
    for (long long G = 0; G < info.shape[0]; ++G)
      for (long long i = 0; i < g; ++i) x[(G * g + i) * g + i] = T(1);
  } else if (info.name == "norm") {
    std::fill(x, x + n, T(1));
  }
}

}  // namespace

void init_attention_param_identity(const AttentionSpec& s, const AttentionParamInfo& info, float* dst) {
  identity(s, info, dst);
}
void init_attention_param_identity(const AttentionSpec& s, const AttentionParamInfo& info, double* dst) {
  identity(s, info, dst);
}

}  // namespace mta
