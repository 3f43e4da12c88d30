#pragma once
// What the trainer needs from a task: batches of its training stream by position, and an evaluation
// on held-out data. Positions make data order a pure function of (seed, position), so a resumed run
// sees exactly the batches the uninterrupted run would have.
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/trainable.h"

namespace mta {

class Task {
 public:
  virtual ~Task() = default;
  virtual std::string name() const = 0;
  virtual int vocab_size() const = 0;
  virtual int seq_len() const = 0;  // model positions per example
  // Training examples [first, first + count) as one batch.
  virtual Batch train_batch(uint64_t first, int count) const = 0;
  // Held-out metrics, e.g. {"error_rate": 0.02, "examples": 1000, "loss": 0.1}.
  virtual nlohmann::json evaluate(TrainableModel& model, int examples, int batch_size) const = 0;
  // The metric the comparison table reports, lower is better ("error_rate", "ppl").
  virtual std::string primary_metric() const = 0;
  // Text <-> the task's token ids (for prompts and generated text). encode adds no BOS; decode
  // throws InputError for an id outside the vocabulary, encode for text the vocabulary cannot express.
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
};

// Builds the task of a config's "task" section; `seed` is the run's data seed.
std::unique_ptr<Task> make_task(const nlohmann::json& task_section, uint64_t seed);

}  // namespace mta
