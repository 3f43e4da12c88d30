// The toy block task as a training Task: loss on the label tokens only; evaluation by greedy
// decoding of the label on the held-out (test) stream; text is one character per token.
#include <omp.h>

#include <algorithm>
#include <cstdio>

#include "tasks/blocks_task.h"
#include "tasks/lm_task.h"
#include "tasks/task.h"
#include "util/error.h"
#include "util/json_fields.h"

namespace mta {
namespace {

// The character at text[pos] for an error message: printable ASCII quoted, a UTF-8 sequence quoted
// whole, anything else as its byte value.
std::string describe_char(const std::string& text, size_t pos) {
  const unsigned char c = static_cast<unsigned char>(text[pos]);
  if (c >= 0x20 && c < 0x7f) return std::string("'") + text[pos] + "'";
  const int len = c >= 0xf0 && c < 0xf8 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
  bool utf8 = len > 1 && pos + len <= text.size() && c < 0xf8;
  for (int i = 1; utf8 && i < len; ++i) utf8 = (static_cast<unsigned char>(text[pos + i]) & 0xc0) == 0x80;
  if (utf8) return "'" + text.substr(pos, len) + "'";
  char buf[16];
  std::snprintf(buf, sizeof buf, "byte 0x%02x", c);
  return buf;
}

class BlocksData : public Task {
 public:
  BlocksData(const tasks::BlocksTaskConfig& cfg, uint64_t seed) : task_(cfg), seed_(seed) {}

  std::string name() const override { return "blocks"; }
  int vocab_size() const override { return tasks::kBlocksVocab; }
  int seq_len() const override { return task_.seq_tokens() - 1; }
  std::string primary_metric() const override { return "error_rate"; }

  Batch train_batch(uint64_t first, int count) const override { return batch(tasks::Stream::Train, first, count); }

  // The prompt laid out as training examples are: BOS, the left padding of an example, then the
  // characters, so that a prompt of the configured number of blocks ending in '#' and the query
  // letters puts the label where training put it. Text starting with '^' (BOS) is taken verbatim.
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids;
    const bool verbatim = !text.empty() && text[0] == '^';
    if (!verbatim) {
      const long long pad = static_cast<long long>(task_.config().length) - task_.label_len() -
                            static_cast<long long>(text.size());
      ids.push_back(tasks::kBos);
      ids.insert(ids.end(), static_cast<size_t>(std::max(0LL, pad)), tasks::kPad);
    }
    for (size_t i = 0; i < text.size(); ++i) {
      const int32_t id = tasks::char_token(text[i]);
      if (id < 0)
        throw InputError("blocks task: character " + describe_char(text, i) + " at position " + std::to_string(i) +
                         " is not in its alphabet (a-z, '.', '#', '_' padding, '^' BOS)");
      ids.push_back(id);
    }
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (int32_t id : ids) s += tasks::token_char(id);
    return s;
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
