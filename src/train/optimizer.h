#pragma once
// AdamW over a model's contiguous parameter buffer, with weight decay on the views marked `decay`
// (matrices), and the learning-rate schedule: linear warmup, then constant, linear or cosine decay.
#include <string>
#include <vector>

#include "model/params.h"

namespace mta {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
};

class AdamW {
 public:
  AdamW(const ParamLayout& layout, const AdamWConfig& cfg);
  // One update with the given learning rate; `step` counts from 1 (bias correction).
  void update(std::vector<float>& params, const std::vector<float>& grads, double lr, long long step);
  void set_config(const AdamWConfig& cfg) { cfg_ = cfg; }
  std::vector<float>& m() { return m_; }
  std::vector<float>& v() { return v_; }

 private:
  AdamWConfig cfg_;
  std::vector<char> decay_;  // per float: weight decay applies
  std::vector<float> m_, v_;
};

enum class LrSchedule { Constant, Linear, Cosine };

struct LrConfig {
  double lr = 1e-3;
  long long warmup = 0;
  LrSchedule schedule = LrSchedule::Constant;
  double min_lr_ratio = 0.0;  // final lr = lr * min_lr_ratio for linear and cosine
  long long total_steps = 1;
};

// Learning rate of step s (0-based).
double learning_rate(const LrConfig& c, long long s);
LrSchedule parse_schedule(const std::string& s, const std::string& where);
std::string schedule_name(LrSchedule s);

// Scales grads so that their global L2 norm is at most max_norm (0: no clipping); returns the norm
// before clipping.
double clip_grad_norm(std::vector<float>& grads, double max_norm);

}  // namespace mta
