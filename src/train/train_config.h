#pragma once
// A training run's configuration: one JSON file with "model", "task" and "train" sections.
#include <nlohmann/json.hpp>
#include <string>

#include "model/config.h"
#include "train/optimizer.h"

namespace mta {

struct TrainSettings {
  long long steps = 1000;
  int batch_size = 32;        // examples per optimizer step
  int micro_batch_size = 0;   // examples per forward/backward (gradient accumulation); 0 = batch_size
  LrConfig lr;
  AdamWConfig adamw;
  double grad_clip = 1.0;     // 0: off
  int log_every = 10;
  int eval_every = 0;         // 0: only at the end
  int eval_examples = 1000;
  int eval_batch_size = 64;
  int checkpoint_every = 200; // 0: only at the end
  double checkpoint_minutes = 0;  // also checkpoint when this much wall time passed since the last (0: off)
  int threads = 0;            // 0: all cores
  std::string device = "cpu";
};

struct TrainConfig {
  std::string name;
  std::string out_dir;
  uint64_t seed = 1;
  ModelConfig model;
  nlohmann::json task;  // the task section, given to make_task
  TrainSettings train;
  nlohmann::json source;  // the whole file as read, stored in checkpoints
};

TrainConfig train_config_from_json(const nlohmann::json& j);
TrainConfig load_train_config(const std::string& path);

}  // namespace mta
