#pragma once
// Language modelling on token shards (data/shard.h): next-token prediction at every position,
// evaluated by perplexity on held-out documents, overall and per document group.
//
// Training data. The train shards are concatenated into one stream of N tokens (each document
// starts with BOS, so windows may cross document boundaries as in usual LM pre-training). An epoch is
// W = floor((N - T) / T) windows of T + 1 tokens (T = seq_len) starting at o_e + T * perm_e(i), where
// the offset o_e in [0, T) and the permutation perm_e of [0, W) are drawn from (seed, epoch e): every
// epoch sees the stream cut at different places, in a different order, and no window repeats within
// an epoch. Example p is window p mod W of epoch p / W, a pure function of (seed, p), which is what
// makes a resumed run see exactly the batches of the uninterrupted one. At most 2T - 1 tokens at the
// ends of the stream are unused in an epoch.
//
// Evaluation. Each validation document is cut into non-overlapping windows: window k predicts the
// document's tokens k*T + 1 .. k*T + T from the tokens before them within the window (the first
// window starts at the document's BOS; a shorter last window is padded with weight 0). So every
// token of a document after its BOS is scored exactly once, with 0 to T - 1 tokens of context, and
// nothing crosses a document boundary, which keeps groups apart. This is the usual "non-overlapping"
// perplexity; a sliding window would give each token more context at T times the cost.
// Perplexity = exp(sum of token losses / tokens), per group and over all scored tokens; also the mean
// of the group perplexities (the paper averages its domains' perplexities).
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "tasks/task.h"

namespace mta {

struct LmTaskConfig {
  std::string tokenizer;                  // SentencePiece model of `mta tokenizer train`
  std::vector<std::string> train_shards;  // shards of `mta tokenize`, concatenated in order
  std::vector<std::string> valid_shards;
  int seq_len = 1024;
};

// The task section {"name": "lm", "tokenizer", "train_shards", "valid_shards", "seq_len"}.
LmTaskConfig lm_task_config_from_json(const nlohmann::json& task_section);

class LmTask : public Task {
 public:
  // Loads the tokenizer and the shards; InputError (naming the field or file) when a shard does not
  // fit the tokenizer or there is too little text for seq_len.
  LmTask(const LmTaskConfig& cfg, uint64_t seed);

  std::string name() const override { return "lm"; }
  int vocab_size() const override { return tokenizer_.vocab_size(); }
  int seq_len() const override { return cfg_.seq_len; }
  std::string primary_metric() const override { return "ppl"; }
  Batch train_batch(uint64_t first, int count) const override;
  // examples: the number of validation windows to score; all of them when examples >= windows(),
  // else an evenly spaced subset (window floor(i * windows() / examples) for i < examples).
  nlohmann::json evaluate(TrainableModel& model, int examples, int batch_size) const override;
  std::vector<int32_t> encode(const std::string& text) const override { return tokenizer_.encode(text); }
  // Ids the tokenizer does not know (a model vocabulary may be larger than the tokenizer's, and a
  // sampled id can land there) are shown as <unk:ID>, so generated text can always be printed.
  std::string decode(const std::vector<int32_t>& ids) const override;

  const data::Tokenizer& tokenizer() const { return tokenizer_; }
  uint64_t train_tokens() const { return train_.size(); }
  uint64_t windows_per_epoch() const { return windows_per_epoch_; }
  size_t validation_windows() const { return windows_.size(); }
  // Start in the training stream of example `position` (tests check the epoch structure with it).
  uint64_t window_start(uint64_t position) const;

 private:
  struct EvalWindow {
    uint64_t start;  // in valid_
    int len;         // scored tokens, 1..T
    int group;
  };
  uint64_t permuted(uint64_t epoch, uint64_t index) const;  // perm_epoch(index)

  LmTaskConfig cfg_;
  uint64_t seed_;
  data::Tokenizer tokenizer_;
  std::vector<int32_t> train_, valid_;
  std::vector<std::string> groups_;
  std::vector<EvalWindow> windows_;  // sorted by group, then document order
  uint64_t windows_per_epoch_ = 0;

  // The permutation of the last epoch asked for: a batch needs one epoch (two at a boundary), so
  // one cached epoch makes drawing it a once-per-epoch cost.
  mutable std::mutex mu_;
  mutable uint64_t cached_epoch_ = UINT64_MAX;
  mutable std::vector<uint32_t> perm_;
};

std::unique_ptr<Task> make_lm_task(const nlohmann::json& task_section, uint64_t seed);

}  // namespace mta
