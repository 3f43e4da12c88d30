#pragma once
// Checkpoints: one safetensors file with the weights ("model.<name>"), the AdamW moments
// ("optim.m.<name>", "optim.v.<name>") and, in the metadata, the run's config, step and data position.
// Dropout masks and data order are pure functions of (seed, step, position), so these are the whole
// state: a resumed run continues exactly. Written atomically (temporary file, then rename).
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "model/trainable.h"

namespace mta {

struct CheckpointState {
  nlohmann::json config;   // the training config the run was started with
  long long step = 0;      // optimizer steps done
  uint64_t data_position = 0;
  nlohmann::json last_eval;  // may be null
};

// with_optimizer: also store the AdamW moments (training checkpoints); false for weights only.
void save_checkpoint(const std::string& path, const CheckpointState& state, TrainableModel& model, bool with_optimizer);
// Reads the metadata only (and validates the file).
CheckpointState read_checkpoint_state(const std::string& path);
// Loads weights (and the optimizer moments when with_optimizer) into a model built from the same config.
// Refuses (InputError) a missing tensor, a shape mismatch or a non-finite weight.
CheckpointState load_checkpoint(const std::string& path, TrainableModel& model, bool with_optimizer);

}  // namespace mta
