#pragma once
// The Llama-style decoder on the CPU: token embedding tied to the output layer, RMSNorm pre-norm,
// RoPE, SwiGLU, and per-layer attention that is standard, MTA or DIFF (ModelConfig). Explicit forward
// and backward per layer (llm.c style); parameters and gradients are contiguous buffers with views.
#include <cstdint>
#include <memory>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace mta {

// One batch of B sequences of T positions: predict targets from inputs; the loss weight of each
// position is 1 on the tokens the task scores and 0 elsewhere.
struct Batch {
  int B = 0, T = 0;
  std::vector<int32_t> inputs, targets;  // [B*T]
  std::vector<float> weights;            // [B*T]
  double weight_sum() const;
};

struct LossStats {
  double loss_sum = 0;    // sum over positions of weight * cross-entropy
  double weight_sum = 0;  // sum of weights
};

// T = float for training; T = double for the finite-difference tests.
template <typename T>
class ModelT {
 public:
  explicit ModelT(const ModelConfig& cfg);
  ~ModelT();
  ModelT(const ModelT&) = delete;
  ModelT& operator=(const ModelT&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  std::vector<T>& params() { return params_; }
  const std::vector<T>& params() const { return params_; }
  std::vector<T>& grads() { return grads_; }
  T* param(const std::string& name) { return params_.data() + layout_.view(name).offset; }
  T* grad(const std::string& name) { return grads_.data() + layout_.view(name).offset; }
  size_t num_params() const;  // without alignment padding

  // Random linear weights (normal, init_std), RMSNorm weights 1, MTA kernels identity, DIFF lambdas
  // normal(0, 0.1). Deterministic in seed.
  void init(uint64_t seed);
  void zero_grads();

  // Forward and backward: adds grad_scale * d(loss_sum)/d(params) into grads(). With train = true,
  // dropout is active with masks derived from dropout_seed.
  LossStats forward_backward(const Batch& batch, T grad_scale, bool train, uint64_t dropout_seed);
  // Throws InputError when the batch does not fit the model (sizes, token ids, length).
  void check_batch(const Batch& batch) const;
  // Forward only (no dropout). If argmax is given it receives the most likely token per position.
  LossStats forward(const Batch& batch, std::vector<int32_t>* argmax = nullptr);
  // After a forward pass: the hidden states after the final RMSNorm, [B*T, dim], which the tied
  // output layer maps to logits (generation without a cache takes the last row's).
  const std::vector<T>& final_hidden() const;

 private:
  struct Acts;
  LossStats run(const Batch& batch, bool backward, T grad_scale, bool train, uint64_t dropout_seed,
                std::vector<int32_t>* argmax);
  void layer_forward(int l, Acts& a, bool train, uint64_t seed);
  void layer_backward(int l, Acts& a, T* dx, bool train, uint64_t seed);
  void attention_forward(int l, Acts& a, bool train, uint64_t seed);
  // datt: the gradient of the attention's output in the heads-major layout of v, [B, Hv, T, C / Hv].
  void attention_backward(int l, Acts& a, const T* datt, T* dq, T* dk, T* dv, bool train, uint64_t seed);

  ModelConfig cfg_;
  ParamLayout layout_;
  std::vector<T> params_, grads_;
  std::unique_ptr<Acts> acts_;
};

using Model = ModelT<float>;

}  // namespace mta
