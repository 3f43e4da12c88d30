// The toy block task as a training Task: loss on the label tokens only; evaluation by greedy
// decoding of the label on the held-out (test) stream.
#include <omp.h>

#include "tasks/blocks_task.h"
#include "tasks/lm_task.h"
#include "tasks/task.h"
#include "util/error.h"
#include "util/json_fields.h"

namespace mta {
namespace {

class BlocksData : public Task {
 public:
  BlocksData(const tasks::BlocksTaskConfig& cfg, uint64_t seed) : task_(cfg), seed_(seed) {}

  std::string name() const override { return "blocks"; }
  int vocab_size() const override { return tasks::kBlocksVocab; }
  int seq_len() const override { return task_.seq_tokens() - 1; }
  std::string primary_metric() const override { return "error_rate"; }

  Batch train_batch(uint64_t first, int count) const override { return batch(tasks::Stream::Train, first, count); }

  // One token per character, as examples are displayed: '_' PAD, '^' BOS, '.', '#', 'a'..'z'.
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids;
    for (char c : text) {
      int32_t id = -1;
      for (int32_t t = 0; t < tasks::kBlocksVocab; ++t)
        if (tasks::token_char(t) == c) id = t;
      if (id < 0)
        throw InputError(std::string("blocks task: character '") + c + "' is not in its vocabulary (a-z . # _ ^)");
      ids.push_back(id);
    }
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string text;
    for (int32_t id : ids) {
      if (id < 0 || id >= tasks::kBlocksVocab)
        throw InputError("blocks task: token id " + std::to_string(id) + " is outside its vocabulary [0, " +
                         std::to_string(tasks::kBlocksVocab) + ")");
      text += tasks::token_char(id);
    }
    return text;
  }

  // Greedy decoding of the label, computed with one teacher-forced pass: the label is decoded
  // correctly iff at every label position the argmax equals the true token given the true prefix
  // (once a token is wrong the example is wrong, whatever follows; while all are right, the prefix
  // greedy decoding sees is the true one). So the error rate equals that of token-by-token decoding.
  nlohmann::json evaluate(TrainableModel& model, int examples, int batch_size) const override {
    long long wrong = 0;
    double loss = 0, weight = 0;
    std::vector<int32_t> argmax;
    for (int first = 0; first < examples; first += batch_size) {
      const int count = std::min(batch_size, examples - first);
      Batch b = batch(tasks::Stream::Test, first, count);
      LossStats st = model.forward(b, &argmax);
      loss += st.loss_sum, weight += st.weight_sum;
      for (int e = 0; e < count; ++e) {
        bool ok = true;
        for (int t = 0; t < b.T; ++t) {
          const size_t i = static_cast<size_t>(e) * b.T + t;
          if (b.weights[i] != 0 && argmax[i] != b.targets[i]) ok = false;
        }
        wrong += !ok;
      }
    }
    return {{"error_rate", static_cast<double>(wrong) / examples}, {"examples", examples}, {"loss", loss / weight}};
  }

 private:
  Batch batch(tasks::Stream stream, uint64_t first, int count) const {
    Batch b;
    b.B = count;
    b.T = seq_len();
    const size_t n = static_cast<size_t>(count) * b.T;
    b.inputs.resize(n), b.targets.resize(n), b.weights.resize(n);
#pragma omp parallel for schedule(static)
    for (int e = 0; e < count; ++e) {
      tasks::BlocksExample ex = task_.example(seed_, stream, first + e);
      for (int t = 0; t < b.T; ++t) {
        const size_t i = static_cast<size_t>(e) * b.T + t;
        b.inputs[i] = ex.tokens[t];
        b.targets[i] = ex.tokens[t + 1];
        b.weights[i] = t + 1 >= ex.label_begin ? 1.0f : 0.0f;  // predict the label tokens only
      }
    }
    return b;
  }

  tasks::BlocksTask task_;
  uint64_t seed_;
};

}  // namespace

std::unique_ptr<Task> make_task(const nlohmann::json& j, uint64_t seed) {
  FieldReader r(j, "task");
  const std::string name = r.string("name");
  if (name == "blocks") {
    tasks::BlocksTaskConfig c;
    c.n = static_cast<int>(r.integer_or("n", c.n, -1000000, 1000000));
    c.l = static_cast<int>(r.integer_or("l", c.l, -1000000, 1000000));
    c.variant = tasks::parse_variant(r.string_or("variant", "all"));
    c.length = static_cast<int>(r.integer_or("length", c.length, -1000000, 1 << 30));
    c.blocks = static_cast<int>(r.integer_or("blocks", 0, -1000000, 1000000));
    r.finish();
    return std::make_unique<BlocksData>(c, seed);
  }
  if (name == "lm") return make_lm_task(j, seed);
  throw InputError("task.name: unknown task \"" + name + "\" (known: blocks, lm)");
}

}  // namespace mta
