#pragma once
// Choosing the next token from logits: greedy (argmax), or sampling from softmax(logits / temperature),
// optionally among the k most likely tokens only. Deterministic in the seed on every platform: the
// generator is std::mt19937_64 (its output sequence is fixed by the standard) and uniforms are made
// from its raw bits, not by a standard-library distribution whose mapping varies between libraries.
#include <cstdint>
#include <random>
#include <vector>

namespace mta {

struct SamplingOptions {
  double temperature = 0;  // 0: greedy; > 0: sample
  int top_k = 0;           // > 0: sample among the top_k most likely tokens (needs temperature > 0)
  uint64_t seed = 1;
  void validate() const;   // InputError naming the option
};

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& opt);
  // The next token. Ties go to the lower id (greedy, and the order of the top-k cut).
  int32_t next(const std::vector<double>& logits);

 private:
  SamplingOptions opt_;
  std::mt19937_64 rng_;
};

}  // namespace mta
