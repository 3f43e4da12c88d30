#include "train/checkpoint.h"

#include <cmath>

#include "io/safetensors.h"
#include "util/error.h"

namespace mta {
namespace {

constexpr const char* kFormat = "mta-checkpoint-1";

CheckpointState state_from_metadata(const io::SafeTensors& st, const std::string& path) {
  auto meta = [&](const char* key) -> const std::string& {
    auto it = st.metadata.find(key);
    if (it == st.metadata.end()) throw InputError(path + ": not an mta checkpoint (metadata '" + key + "' missing)");
    return it->second;
  };
  if (meta("format") != kFormat) throw InputError(path + ": unsupported checkpoint format '" + meta("format") + "'");
  CheckpointState s;
  try {
    s.config = nlohmann::json::parse(meta("config"));
    s.step = std::stoll(meta("step"));
    s.data_position = std::stoull(meta("data_position"));
    s.last_eval = nlohmann::json::parse(meta("last_eval"));
  } catch (const std::exception& e) {
    throw InputError(path + ": corrupt checkpoint metadata (" + e.what() + ")");
  }
  return s;
}

void load_view(const io::SafeTensors& st, const std::string& path, const std::string& name, const ParamView& v,
               float* dst) {
  if (!st.has(name)) throw InputError(path + ": checkpoint has no tensor '" + name + "'");
  const io::Tensor& t = st.at(name);
  if (std::vector<long long>(t.shape.begin(), t.shape.end()) != v.shape)
    throw InputError(path + ": tensor '" + name + "' has shape " + t.shape_str() + ", the model needs another shape");
  std::vector<float> x = io::to_f32(t, path + ": tensor '" + name + "'");
  for (size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i])) throw InputError(path + ": tensor '" + name + "' holds a non-finite value");
  std::copy(x.begin(), x.end(), dst);
}

}  // namespace

void save_checkpoint(const std::string& path, const CheckpointState& state, const Model& model, AdamW* optim) {
  io::SafeTensors st;
  for (const auto& v : model.layout().views()) {
    std::vector<int64_t> shape(v.shape.begin(), v.shape.end());
    st.tensors["model." + v.name] = io::make_tensor(shape, model.params().data() + v.offset);
    if (optim) {
      st.tensors["optim.m." + v.name] = io::make_tensor(shape, optim->m().data() + v.offset);
      st.tensors["optim.v." + v.name] = io::make_tensor(shape, optim->v().data() + v.offset);
    }
  }
  st.metadata["format"] = kFormat;
  st.metadata["config"] = state.config.dump();
  st.metadata["step"] = std::to_string(state.step);
  st.metadata["data_position"] = std::to_string(state.data_position);
  st.metadata["last_eval"] = state.last_eval.dump();
  io::write_safetensors(path, st);
}

CheckpointState read_checkpoint_state(const std::string& path) {
  return state_from_metadata(io::read_safetensors(path), path);
}

CheckpointState load_checkpoint(const std::string& path, Model& model, AdamW* optim) {
  io::SafeTensors st = io::read_safetensors(path);
  CheckpointState s = state_from_metadata(st, path);
  for (const auto& v : model.layout().views()) {
    load_view(st, path, "model." + v.name, v, model.params().data() + v.offset);
    if (optim) {
      load_view(st, path, "optim.m." + v.name, v, optim->m().data() + v.offset);
      load_view(st, path, "optim.v." + v.name, v, optim->v().data() + v.offset);
    }
  }
  return s;
}

}  // namespace mta
