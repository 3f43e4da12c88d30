#pragma once
// The training loop: batches from the task by position, gradient accumulation, clipping, AdamW,
// progress lines, metrics as JSONL, periodic evaluation and atomic checkpoints, exact resume.
#include <nlohmann/json.hpp>
#include <string>

#include "train/train_config.h"

namespace mta {

struct TrainOptions {
  bool resume = false;   // continue from out_dir/checkpoint.safetensors when it exists
  bool quiet = false;    // no progress lines
  // Wall-clock budget of this invocation in minutes (0: none). When it is spent the run stops after the
  // current step, evaluates and checkpoints, as if train.steps had been reached there: a GPU budget
  // decides the step count, not a guess of the step rate. --resume continues toward train.steps.
  double time_limit_minutes = 0;
};

struct TrainResult {
  long long steps = 0;
  double final_loss = 0;   // mean training loss of the last logged window
  nlohmann::json eval;     // last evaluation
  double seconds = 0;      // wall time of this invocation
  size_t num_params = 0;
  bool interrupted = false;  // stopped by SIGINT/SIGTERM after writing a checkpoint
};

TrainResult train(const TrainConfig& cfg, const TrainOptions& opt);

// Loads a checkpoint and evaluates it on its task's held-out data.
// device: "cpu", "cuda" or "" for the config's train.device.
nlohmann::json evaluate_checkpoint(const std::string& path, int examples, const std::string& device = "");

std::string checkpoint_path(const TrainConfig& cfg);

}  // namespace mta
