// mta_model_grads: one forward/backward pass of the C++ model on given weights and a given batch, for
// the PyTorch oracle (tests/oracle/check_model.py).
//
//   mta_model_grads CONFIG.json WEIGHTS.safetensors BATCH.safetensors OUT.safetensors [--double]
//
// CONFIG.json: a model config object (the "model" section of a training config).
// WEIGHTS: every parameter under its C++ name (ModelT's layout), F32 or F64 (any float dtype), with
//          exactly the layout's shape; a missing name, an extra name or a wrong shape is refused.
// BATCH: inputs, targets (integer [B, T]) and weights (float [B, T]).
// OUT: loss [1] = loss_sum / weight_sum, and grad.<name> for every parameter, the gradient of that mean
//      loss (grad_scale = 1 / weight_sum, train = false): F64 with --double, else F32.
// Exit status: 0 on success, 2 on bad input (one line on stderr), 1 on any other failure.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/config.h"
#include "model/model.h"
#include "util/error.h"

namespace {

using mta::InputError;
namespace io = mta::io;

std::string shape_str(const std::vector<long long>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

mta::Batch read_batch(const std::string& path) {
  const io::SafeTensors st = io::read_safetensors(path);
  const io::Tensor& in = st.at("inputs");
  const io::Tensor& tg = st.at("targets");
  const io::Tensor& w = st.at("weights");
  if (in.shape.size() != 2) throw InputError(path + ": inputs must be [B, T] (got " + in.shape_str() + ")");
  if (tg.shape != in.shape || w.shape != in.shape)
    throw InputError(path + ": targets and weights must have the shape of inputs " + in.shape_str());
  mta::Batch b;
  b.B = static_cast<int>(in.shape[0]);
  b.T = static_cast<int>(in.shape[1]);
  for (int64_t v : io::to_i64(in, "inputs")) b.inputs.push_back(static_cast<int32_t>(v));
  for (int64_t v : io::to_i64(tg, "targets")) b.targets.push_back(static_cast<int32_t>(v));
  b.weights = io::to_f32(w, "weights");
  return b;
}

template <typename T>
void run(const mta::ModelConfig& cfg, const std::string& weights_path, const mta::Batch& batch,
         const std::string& out_path) {
  mta::ModelT<T> model(cfg);
  const io::SafeTensors w = io::read_safetensors(weights_path);
  std::set<std::string> used;
  for (const auto& v : model.layout().views()) {
    if (!w.has(v.name)) throw InputError(weights_path + ": missing parameter \"" + v.name + "\"");
    const io::Tensor& t = w.at(v.name);
    if (t.shape.size() != v.shape.size() || !std::equal(v.shape.begin(), v.shape.end(), t.shape.begin()))
      throw InputError(weights_path + ": parameter \"" + v.name + "\" has shape " + t.shape_str() + ", the model needs " +
                       shape_str(v.shape));
    std::vector<double> src = io::to_f64(t, v.name);
    T* dst = model.params().data() + v.offset;
    for (size_t i = 0; i < v.size; ++i) dst[i] = static_cast<T>(src[i]);
    used.insert(v.name);
  }
  for (const auto& [name, t] : w.tensors)
    if (!used.count(name)) throw InputError(weights_path + ": \"" + name + "\" is not a parameter of this model");

  const double wsum = batch.weight_sum();
  if (!(wsum > 0)) throw InputError("batch: the weights sum to " + std::to_string(wsum) + " (need > 0)");
  model.zero_grads();
  const mta::LossStats ls = model.forward_backward(batch, static_cast<T>(1.0 / wsum), false, 0);

  io::SafeTensors out;
  const T loss = static_cast<T>(ls.loss_sum / ls.weight_sum);
  out.tensors["loss"] = io::make_tensor({1}, &loss);
  for (const auto& v : model.layout().views()) {
    std::vector<int64_t> shape(v.shape.begin(), v.shape.end());
    out.tensors["grad." + v.name] = io::make_tensor(shape, model.grads().data() + v.offset);
  }
  io::write_safetensors(out_path, out);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  bool dbl = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--double") == 0)
      dbl = true;
    else
      pos.push_back(argv[i]);
  }
  if (pos.size() != 4) {
    std::fprintf(stderr, "usage: %s CONFIG.json WEIGHTS.safetensors BATCH.safetensors OUT.safetensors [--double]\n",
                 argv[0]);
    return 2;
  }
  try {
    std::ifstream f(pos[0]);
    if (!f) throw InputError("cannot read " + pos[0]);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      throw InputError(pos[0] + ": " + e.what());
    }
    const mta::ModelConfig cfg = mta::model_config_from_json(j, "model");
    const mta::Batch batch = read_batch(pos[2]);
    if (dbl)
      run<double>(cfg, pos[1], batch, pos[3]);
    else
      run<float>(cfg, pos[1], batch, pos[3]);
  } catch (const InputError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
