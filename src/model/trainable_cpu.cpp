#include <stdexcept>

#include "model/trainable.h"
#include "util/error.h"

namespace mta {

size_t TrainableModel::num_params() const {
  size_t n = 0;
  for (const auto& v : layout().views()) n += v.size;
  return n;
}

namespace {

class CpuTrainable : public TrainableModel {
 public:
  explicit CpuTrainable(const ModelConfig& cfg) : model_(cfg) {}
  const ModelConfig& config() const override { return model_.config(); }
  const ParamLayout& layout() const override { return model_.layout(); }
  std::string device() const override { return "cpu"; }
  void init(uint64_t seed) override { model_.init(seed); }
  void zero_grads() override { model_.zero_grads(); }
  LossStats forward_backward(const Batch& b, float scale, bool train, uint64_t seed) override {
    return model_.forward_backward(b, scale, train, seed);
  }
  LossStats forward(const Batch& b, std::vector<int32_t>* argmax) override { return model_.forward(b, argmax); }
  double clip_grad_norm(double max_norm) override { return mta::clip_grad_norm(model_.grads(), max_norm); }
  void optimizer_step(const AdamWConfig& cfg, double lr, long long step) override {
    AdamW& o = optim(cfg);
    o.set_config(cfg);
    o.update(model_.params(), model_.grads(), lr, step);
  }
  std::vector<float> get_grads() override { return model_.grads(); }
  void get_state(std::vector<float>* p, std::vector<float>* m, std::vector<float>* v) override {
    if (p) *p = model_.params();
    if (m) *m = optim_ ? optim_->m() : std::vector<float>(layout().total(), 0.0f);
    if (v) *v = optim_ ? optim_->v() : std::vector<float>(layout().total(), 0.0f);
  }
  void set_state(const std::vector<float>& p, const std::vector<float>* m, const std::vector<float>* v) override {
    if (p.size() != layout().total()) throw std::invalid_argument("set_state: wrong parameter count");
    model_.params() = p;
    if (m || v) {
      AdamW& o = optim(AdamWConfig{});  // the run's betas are set at the next optimizer_step
      if (m) o.m() = *m;
      if (v) o.v() = *v;
    }
  }

 private:
  AdamW& optim(const AdamWConfig& cfg) {
    if (!optim_) optim_ = std::make_unique<AdamW>(model_.layout(), cfg);
    return *optim_;
  }
  Model model_;
  std::unique_ptr<AdamW> optim_;
};

}  // namespace

#ifdef MTA_HAVE_CUDA
std::unique_ptr<TrainableModel> make_cuda_trainable_model(const ModelConfig& cfg);  // src/cuda/model_cuda.cu
#endif

std::unique_ptr<TrainableModel> make_trainable_model(const ModelConfig& cfg, const std::string& device) {
  if (device == "cpu") return std::make_unique<CpuTrainable>(cfg);
  if (device == "cuda") {
#ifdef MTA_HAVE_CUDA
    return make_cuda_trainable_model(cfg);
#else
    throw InputError("device \"cuda\": this build has no CUDA backend (configure with nvcc available)");
#endif
  }
  throw InputError("device: must be \"cpu\" or \"cuda\" (got \"" + device + "\")");
}

}  // namespace mta
