#pragma once
// The model as the trainer sees it, whatever the device: the backend interface of a whole model.
// The CPU implementation wraps ModelT<float> and AdamW; the CUDA one (src/cuda/) keeps weights,
// gradients and moments on the GPU. Both use the same ModelConfig, parameter layout and names, so
// checkpoints move freely between them.
#include <memory>
#include <string>
#include <vector>

#include "model/model.h"
#include "train/optimizer.h"

namespace mta {

class TrainableModel {
 public:
  virtual ~TrainableModel() = default;
  virtual const ModelConfig& config() const = 0;
  virtual const ParamLayout& layout() const = 0;
  virtual std::string device() const = 0;
  size_t num_params() const;

  virtual void init(uint64_t seed) = 0;  // the same values on every device (drawn on the host)
  virtual void zero_grads() = 0;
  // Adds grad_scale * d(loss_sum)/d(params) into the gradients.
  virtual LossStats forward_backward(const Batch& batch, float grad_scale, bool train, uint64_t dropout_seed) = 0;
  virtual LossStats forward(const Batch& batch, std::vector<int32_t>* argmax) = 0;
  // Scales the gradients to global L2 norm <= max_norm (0: no clipping); returns the norm before.
  virtual double clip_grad_norm(double max_norm) = 0;
  // One AdamW step (step counts from 1).
  virtual void optimizer_step(const AdamWConfig& cfg, double lr, long long step) = 0;

  // Waits until the device has finished all work queued so far (benchmarks time whole steps with it).
  virtual void synchronize() {}

  // Host copy of the gradients (tests compare devices with it).
  virtual std::vector<float> get_grads() = 0;
  // Host copies of weights and AdamW moments (layout().total() floats each), for checkpoints.
  virtual void get_state(std::vector<float>* params, std::vector<float>* m, std::vector<float>* v) = 0;
  // m and v may be null (evaluation only).
  virtual void set_state(const std::vector<float>& params, const std::vector<float>* m, const std::vector<float>* v) = 0;
};

// device: "cpu" or "cuda" (InputError when this build or machine has no such device).
std::unique_ptr<TrainableModel> make_trainable_model(const ModelConfig& cfg, const std::string& device);

}  // namespace mta
