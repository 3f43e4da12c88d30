#include "tasks/lm_task.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

#include "data/shard.h"
#include "util/error.h"
#include "util/hash.h"
#include "util/json_fields.h"

namespace mta {
namespace {

// A list of file names, or one name.
std::vector<std::string> string_list(FieldReader& r, const std::string& key) {
  const nlohmann::json& v = r.raw(key);
  std::vector<std::string> out;
  if (v.is_string()) out.push_back(v.get<std::string>());
  if (v.is_array())
    for (const auto& x : v) {
      if (!x.is_string()) throw InputError(r.name(key) + ": must be a list of file names (got " + v.dump() + ")");
      out.push_back(x.get<std::string>());
    }
  if (out.empty()) throw InputError(r.name(key) + ": must name at least one shard file (got " + v.dump() + ")");
  return out;
}

// Unbiased draw in [0, n), n >= 1, by rejection on the raw 64-bit output (std::mt19937_64's
// sequence is fixed by the standard; std::uniform_int_distribution's mapping is not).
uint64_t draw(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;
  uint64_t x;
  do x = rng();
  while (x < threshold);
  return x % n;
}

uint64_t epoch_seed(uint64_t seed, uint64_t epoch) {
  return splitmix64(splitmix64(seed ^ 0x6d74612d6c6d2d64ULL) ^ epoch);  // "mta-lm-d"
}

}  // namespace

LmTaskConfig lm_task_config_from_json(const nlohmann::json& j) {
  FieldReader r(j, "task");
  if (r.string("name") != "lm") throw InputError("task.name: expected \"lm\"");
  LmTaskConfig c;
  c.tokenizer = r.string("tokenizer");
  c.train_shards = string_list(r, "train_shards");
  c.valid_shards = string_list(r, "valid_shards");
  c.seq_len = static_cast<int>(r.integer("seq_len", 1, 1 << 20));
  r.finish();
  return c;
}

LmTask::LmTask(const LmTaskConfig& cfg, uint64_t seed) : cfg_(cfg), seed_(seed), tokenizer_(cfg.tokenizer) {
  const data::ShardExpect expect{tokenizer_.vocab_size(), tokenizer_.checksum(), cfg.tokenizer};
  const uint64_t T = static_cast<uint64_t>(cfg.seq_len);
  for (const std::string& path : cfg.train_shards) {
    data::Shard s = data::read_shard(path, expect);
    train_.insert(train_.end(), s.tokens.begin(), s.tokens.end());
  }
  if (train_.size() < 2 * T)
    throw InputError("task.train_shards: " + std::to_string(train_.size()) + " tokens, fewer than 2 x seq_len = " +
                     std::to_string(2 * T) + " (too little text for one window per epoch)");
  windows_per_epoch_ = (train_.size() - T) / T;
  if (windows_per_epoch_ > UINT32_MAX) throw InputError("task.train_shards: more than 2^32 windows per epoch");

  std::map<std::string, int> group_index;
  std::vector<std::vector<EvalWindow>> by_group;
  for (const std::string& path : cfg.valid_shards) {
    data::Shard s = data::read_shard(path, expect);
    const uint64_t base = valid_.size();
    valid_.insert(valid_.end(), s.tokens.begin(), s.tokens.end());
    for (const data::ShardDoc& d : s.docs) {
      const std::string& g = s.groups[static_cast<size_t>(d.group)];
      auto [it, added] = group_index.emplace(g, static_cast<int>(groups_.size()));
      if (added) groups_.push_back(g), by_group.emplace_back();
      for (uint64_t k = 0; k * T + 1 < d.count; ++k)
        by_group[static_cast<size_t>(it->second)].push_back(
            {base + d.first + k * T, static_cast<int>(std::min(T, d.count - 1 - k * T)), it->second});
    }
  }
  for (auto& w : by_group) windows_.insert(windows_.end(), w.begin(), w.end());
  if (windows_.empty()) throw InputError("task.valid_shards: no document has a token to predict");
}

uint64_t LmTask::permuted(uint64_t epoch, uint64_t index) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (epoch != cached_epoch_) {
    const uint64_t W = windows_per_epoch_;
    perm_.resize(W);
    for (uint64_t i = 0; i < W; ++i) perm_[i] = static_cast<uint32_t>(i);
    std::mt19937_64 rng(epoch_seed(seed_, epoch));
    for (uint64_t i = W - 1; i > 0; --i) std::swap(perm_[i], perm_[draw(rng, i + 1)]);  // Fisher-Yates
    cached_epoch_ = epoch;
  }
  return perm_[index];
}

uint64_t LmTask::window_start(uint64_t position) const {
  const uint64_t T = static_cast<uint64_t>(cfg_.seq_len);
  const uint64_t epoch = position / windows_per_epoch_;
  // The offset comes from a different mix of the epoch seed than the permutation's generator.
  const uint64_t offset = splitmix64(epoch_seed(seed_, epoch) ^ 0x0ff5e7ULL) % T;
  return offset + T * permuted(epoch, position % windows_per_epoch_);
}

Batch LmTask::train_batch(uint64_t first, int count) const {
  Batch b;
  b.B = count;
  b.T = cfg_.seq_len;
  const size_t T = static_cast<size_t>(b.T);
  b.inputs.resize(static_cast<size_t>(count) * T);
  b.targets.resize(b.inputs.size());
  b.weights.assign(b.inputs.size(), 1.0f);  // every position is scored
  for (int e = 0; e < count; ++e) {
    const int32_t* w = train_.data() + window_start(first + static_cast<uint64_t>(e));
    std::copy(w, w + T, b.inputs.begin() + static_cast<ptrdiff_t>(e * T));
    std::copy(w + 1, w + 1 + T, b.targets.begin() + static_cast<ptrdiff_t>(e * T));
  }
  return b;
}

nlohmann::json LmTask::evaluate(TrainableModel& model, int examples, int batch_size) const {
  const size_t total = windows_.size();
  std::vector<size_t> chosen;
  if (examples <= 0 || static_cast<size_t>(examples) >= total) {
    for (size_t i = 0; i < total; ++i) chosen.push_back(i);
  } else {
    for (size_t i = 0; i < static_cast<size_t>(examples); ++i) chosen.push_back(i * total / examples);
  }
  const size_t T = static_cast<size_t>(cfg_.seq_len);
  std::vector<double> loss(groups_.size(), 0.0), tokens(groups_.size(), 0.0);
  // Batches never mix groups (windows_ is sorted by group), so each batch's loss sum belongs to one.
  for (size_t i = 0; i < chosen.size();) {
    const int g = windows_[chosen[i]].group;
    size_t n = 0;
    while (i + n < chosen.size() && n < static_cast<size_t>(batch_size) && windows_[chosen[i + n]].group == g) ++n;
    Batch b;
    b.B = static_cast<int>(n);
    b.T = cfg_.seq_len;
    b.inputs.assign(n * T, tokenizer_.bos_id());  // padding, weight 0
    b.targets.assign(n * T, tokenizer_.bos_id());
    b.weights.assign(n * T, 0.0f);
    for (size_t e = 0; e < n; ++e) {
      const EvalWindow& w = windows_[chosen[i + e]];
      for (size_t t = 0; t < static_cast<size_t>(w.len); ++t) {
        b.inputs[e * T + t] = valid_[w.start + t];
        b.targets[e * T + t] = valid_[w.start + t + 1];
        b.weights[e * T + t] = 1.0f;
      }
    }
    const LossStats st = model.forward(b, nullptr);
    loss[static_cast<size_t>(g)] += st.loss_sum;
    tokens[static_cast<size_t>(g)] += st.weight_sum;
    i += n;
  }
  nlohmann::json groups = nlohmann::json::object();
  double all_loss = 0, all_tokens = 0, ppl_sum = 0;
  int counted = 0;
  for (size_t g = 0; g < groups_.size(); ++g) {
    if (tokens[g] == 0) continue;  // possible only when evaluating a subset
    const double mean = loss[g] / tokens[g];
    groups[groups_[g]] = {{"ppl", std::exp(mean)}, {"loss", mean}, {"tokens", static_cast<long long>(tokens[g])}};
    all_loss += loss[g], all_tokens += tokens[g], ppl_sum += std::exp(mean), ++counted;
  }
  const double mean = all_loss / all_tokens;
  return {{"ppl", std::exp(mean)},
          {"loss", mean},
          {"tokens", static_cast<long long>(all_tokens)},
          {"windows", chosen.size()},
          {"ppl_mean_of_groups", ppl_sum / counted},
          {"groups", groups}};
}

std::unique_ptr<Task> make_lm_task(const nlohmann::json& task_section, uint64_t seed) {
  return std::make_unique<LmTask>(lm_task_config_from_json(task_section), seed);
}

std::string LmTask::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  std::vector<int32_t> run;
  for (int32_t id : ids) {
    if (id >= 0 && id < tokenizer_.vocab_size()) {
      run.push_back(id);
      continue;
    }
    text += tokenizer_.decode(run) + "<unk:" + std::to_string(id) + ">";
    run.clear();
  }
  return text + tokenizer_.decode(run);
}

}  // namespace mta
