#pragma once
// Text generation with ModelT: the prompt, then one token at a time, with the incremental decoder
// (a KV cache, DecoderT) or, for testing and `mta generate --no-cache`, a full forward pass of the
// whole sequence at every step. Both paths give the same logits up to rounding.
#include <cstdint>
#include <vector>

#include "model/model.h"
#include "model/sampling.h"

namespace mta {

struct GenerateOptions {
  int max_new = 32;        // tokens to generate at most
  SamplingOptions sampling;
  int32_t eos = -1;        // stop after generating this id (-1: no end-of-sequence token)
  bool use_cache = true;
};

enum class StopReason { MaxNew, Eos, ContextFull };

struct GenerateResult {
  std::vector<int32_t> tokens;  // the generated ids, without the prompt
  StopReason stop = StopReason::MaxNew;
};

// Throws InputError for an empty prompt, a prompt longer than model.max_seq_len or ids outside the
// vocabulary. Stops at max_new tokens, after eos, or when the sequence no longer fits the model
// (ContextFull: a sequence of max_seq_len tokens gets one more, then nothing can be fed).
template <typename T>
GenerateResult generate(ModelT<T>& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt);

// The logits [vocab_size] after the last of ids from one forward pass over all of them (no cache).
template <typename T>
std::vector<T> full_forward_logits(ModelT<T>& model, const std::vector<int32_t>& ids);

const char* stop_reason_name(StopReason r);

}  // namespace mta
