#pragma once
// Incremental decoding of ModelT on the CPU: the model's forward pass for new tokens appended to a
// sequence, with a per-layer cache (MtaIncremental: keys after RoPE, values, and for MTA layers the
// few rows of logits and weights the key-query convolutions read), so a token costs O(T * dim) per
// layer instead of a forward pass over the whole prefix. The logits equal the last row of
// ModelT::forward over the same sequence (up to rounding; tests/test_generate.cpp checks every
// attention kind and MTA option).
#include <cstdint>
#include <string>
#include <vector>

#include "attention/mta_incremental.h"
#include "model/model.h"

namespace mta {

template <typename T>
class DecoderT {
 public:
  // Reads the model's weights at every feed: the model must outlive the decoder and its weights
  // must not change while a sequence is being decoded.
  explicit DecoderT(const ModelT<T>& model);

  int length() const { return len_; }  // tokens fed so far
  void reset();                        // start a new sequence

  // Appends ids at positions length() .. length() + ids.size() - 1 and returns the logits [vocab_size]
  // that predict the token after the last one. Several ids at once (a prompt) share the linear
  // layers' matrix products. Throws InputError for an empty list, an id outside the vocabulary or a
  // sequence longer than model.max_seq_len.
  std::vector<T> feed(const std::vector<int32_t>& ids);

 private:
  const T* param(const std::string& name) const;
  void layer_step(int l, T* x, int n);

  const ModelT<T>& model_;
  std::vector<MtaIncremental<T>> attn_;  // one per layer
  int len_ = 0;
};

using Decoder = DecoderT<float>;

}  // namespace mta
