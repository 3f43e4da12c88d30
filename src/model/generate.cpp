#include "model/generate.h"

#include <string>

#include "model/decode_cpu.h"
#include "model/layers_cpu.h"
#include "util/error.h"

namespace mta {

template <typename T>
std::vector<T> full_forward_logits(ModelT<T>& model, const std::vector<int32_t>& ids) {
  const ModelConfig& cfg = model.config();
  const int n = static_cast<int>(ids.size()), C = cfg.dim, V = cfg.vocab_size;
  Batch b;
  b.B = 1, b.T = n;
  b.inputs = ids;
  b.targets.assign(n, 0);
  b.weights.assign(n, 0.0f);  // no loss: only the hidden states are wanted
  model.forward(b);
  std::vector<T> logits(V);
  const T* E = model.params().data() + model.layout().view("tok_embeddings.weight").offset;
  cpu::linear_forward(model.final_hidden().data() + static_cast<size_t>(n - 1) * C, E, logits.data(), 1, C, V);
  return logits;
}

template <typename T>
GenerateResult generate(ModelT<T>& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt) {
  const int max_len = model.config().max_seq_len;
  if (prompt.empty()) throw InputError("generate: the prompt has no tokens");
  if (static_cast<long long>(prompt.size()) > max_len)
    throw InputError("generate: the prompt has " + std::to_string(prompt.size()) +
                     " tokens, more than model.max_seq_len = " + std::to_string(max_len));
  for (int32_t id : prompt)
    if (id < 0 || id >= model.config().vocab_size)
      throw InputError("generate: prompt token id " + std::to_string(id) + " is outside the model's vocabulary [0, " +
                       std::to_string(model.config().vocab_size) + ")");
  if (opt.max_new < 0) throw InputError("generate: max_new must be >= 0 (got " + std::to_string(opt.max_new) + ")");
  Sampler sampler(opt.sampling);
  DecoderT<T> decoder(model);
  std::vector<int32_t> seq = prompt;
  GenerateResult res;
  for (int step = 0; step < opt.max_new; ++step) {
    if (static_cast<long long>(seq.size()) > max_len) {  // the last token cannot be fed any more
      res.stop = StopReason::ContextFull;
      break;
    }
    std::vector<T> logits;
    if (!opt.use_cache) logits = full_forward_logits(model, seq);
    else logits = decoder.feed(step == 0 ? prompt : std::vector<int32_t>{seq.back()});
    const int32_t tok = sampler.next(std::vector<double>(logits.begin(), logits.end()));
    seq.push_back(tok);
    res.tokens.push_back(tok);
    if (tok == opt.eos) {
      res.stop = StopReason::Eos;
      break;
    }
  }
  return res;
}

const char* stop_reason_name(StopReason r) {
  switch (r) {
    case StopReason::MaxNew: return "max_new";
    case StopReason::Eos: return "eos";
    case StopReason::ContextFull: return "context_full";
  }
  return "?";
}

template GenerateResult generate<float>(ModelT<float>&, const std::vector<int32_t>&, const GenerateOptions&);
template GenerateResult generate<double>(ModelT<double>&, const std::vector<int32_t>&, const GenerateOptions&);
template std::vector<float> full_forward_logits<float>(ModelT<float>&, const std::vector<int32_t>&);
template std::vector<double> full_forward_logits<double>(ModelT<double>&, const std::vector<int32_t>&);

}  // namespace mta
