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

void save_checkpoint(const std::string& path, const CheckpointState& state, TrainableModel& model,
                     bool with_optimizer) {
  std::vector<float> p, m, v;
  model.get_state(&p, with_optimizer ? &m : nullptr, with_optimizer ? &v : nullptr);
  io::SafeTensors st;
  for (const auto& view : model.layout().views()) {
    std::vector<int64_t> shape(view.shape.begin(), view.shape.end());
    st.tensors["model." + view.name] = io::make_tensor(shape, p.data() + view.offset);
    if (with_optimizer) {
      st.tensors["optim.m." + view.name] = io::make_tensor(shape, m.data() + view.offset);
      st.tensors["optim.v." + view.name] = io::make_tensor(shape, v.data() + view.offset);
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

CheckpointState load_checkpoint(const std::string& path, TrainableModel& model, bool with_optimizer) {
  io::SafeTensors st = io::read_safetensors(path);
  CheckpointState s = state_from_metadata(st, path);
  const size_t total = model.layout().total();
  std::vector<float> p(total, 0.0f), m, v;
  if (with_optimizer) m.assign(total, 0.0f), v.assign(total, 0.0f);
  for (const auto& view : model.layout().views()) {
    load_view(st, path, "model." + view.name, view, p.data() + view.offset);
    if (with_optimizer) {
      load_view(st, path, "optim.m." + view.name, view, m.data() + view.offset);
      load_view(st, path, "optim.v." + view.name, view, v.data() + view.offset);
    }
  }
  model.set_state(p, with_optimizer ? &m : nullptr, with_optimizer ? &v : nullptr);
  return s;
}

}  // namespace mta
