#include "train/optimizer.h"

#include <cmath>

#include "util/error.h"

namespace mta {

AdamW::AdamW(const ParamLayout& layout, const AdamWConfig& cfg) : cfg_(cfg) {
  decay_.assign(layout.total(), 0);
  for (const auto& v : layout.views())
    if (v.decay) std::fill(decay_.begin() + v.offset, decay_.begin() + v.offset + v.size, 1);
  m_.assign(layout.total(), 0.0f);
  v_.assign(layout.total(), 0.0f);
}

void AdamW::update(std::vector<float>& p, const std::vector<float>& g, double lr, long long step) {
  const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(step));
  const float b1 = static_cast<float>(cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
  const float step_size = static_cast<float>(lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float eps = static_cast<float>(cfg_.eps);
  const float decay = static_cast<float>(lr * cfg_.weight_decay);
  const long long n = static_cast<long long>(p.size());
#pragma omp parallel for schedule(static)
  for (long long i = 0; i < n; ++i) {
    m_[i] = b1 * m_[i] + (1 - b1) * g[i];
    v_[i] = b2 * v_[i] + (1 - b2) * g[i] * g[i];
    if (decay_[i]) p[i] -= decay * p[i];  // decoupled weight decay
    p[i] -= step_size * m_[i] / (std::sqrt(v_[i]) * inv_sqrt_bc2 + eps);
  }
}

double learning_rate(const LrConfig& c, long long s) {
  if (c.warmup > 0 && s < c.warmup) return c.lr * static_cast<double>(s + 1) / static_cast<double>(c.warmup);
  if (c.schedule == LrSchedule::Constant) return c.lr;
  const double span = static_cast<double>(std::max<long long>(1, c.total_steps - c.warmup));
  const double t = std::min(1.0, static_cast<double>(s - c.warmup) / span);
  const double lo = c.lr * c.min_lr_ratio;
  if (c.schedule == LrSchedule::Linear) return c.lr + (lo - c.lr) * t;
  return lo + (c.lr - lo) * 0.5 * (1.0 + std::cos(M_PI * t));
}

LrSchedule parse_schedule(const std::string& s, const std::string& where) {
  if (s == "constant") return LrSchedule::Constant;
  if (s == "linear") return LrSchedule::Linear;
  if (s == "cosine") return LrSchedule::Cosine;
  throw InputError(where + ": must be \"constant\", \"linear\" or \"cosine\" (got \"" + s + "\")");
}

std::string schedule_name(LrSchedule s) {
  return s == LrSchedule::Constant ? "constant" : s == LrSchedule::Linear ? "linear" : "cosine";
}

double clip_grad_norm(std::vector<float>& g, double max_norm) {
  double ss = 0;
  for (float x : g) ss += static_cast<double>(x) * x;
  const double norm = std::sqrt(ss);
  if (max_norm > 0 && norm > max_norm) {
    const float s = static_cast<float>(max_norm / (norm + 1e-6));
    for (auto& x : g) x *= s;
  }
  return norm;
}

}  // namespace mta
