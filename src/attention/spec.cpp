#include "attention/spec.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <sstream>

#include "util/error.h"

namespace mta {
namespace {

using json = nlohmann::json;

// Generous bounds: far beyond the paper's 6 x 11 kernels and 16 heads, small enough that a typo
// (k = 1100) is refused instead of running for hours.
constexpr int kMaxConvQ = 64;
constexpr int kMaxConvK = 255;
constexpr int kMaxHeads = 1024;
constexpr int kMaxHeadDim = 4096;

void check_keys(const json& j, const std::string& where, const std::set<std::string>& allowed) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!allowed.count(it.key())) {
      std::string list;
      for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
      throw InputError(where + "." + it.key() + ": unknown field (allowed: " + list + ")");
    }
  }
}

int get_int(const json& j, const std::string& key, const std::string& where, int lo, int hi) {
  const std::string name = where + "." + key;
  if (!j.contains(key) || j[key].is_null()) throw InputError(name + ": missing (an integer is required)");
  const json& v = j[key];
  if (!v.is_number_integer()) throw InputError(name + ": must be an integer (got " + v.dump() + ")");
  long long x = v.get<long long>();
  if (x < lo || x > hi)
    throw InputError(name + ": must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] (got " +
                     std::to_string(x) + ")");
  return static_cast<int>(x);
}

bool get_bool(const json& j, const std::string& key, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return false;
  if (!j[key].is_boolean()) throw InputError(where + "." + key + ": must be true or false (got " + j[key].dump() + ")");
  return j[key].get<bool>();
}

std::optional<KqConv> get_conv(const json& j, const std::string& key, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  const std::string name = where + "." + key;
  const json& v = j[key];
  if (!v.is_object()) throw InputError(name + ": must be an object {\"q\", \"k\", \"pad_key\"} or null");
  check_keys(v, name, {"q", "k", "pad_key"});
  KqConv c;
  c.q = get_int(v, "q", name, 1, kMaxConvQ);
  c.k = get_int(v, "k", name, 1, kMaxConvK);
  if (v.contains("pad_key") && !v["pad_key"].is_null()) {
    if (!v["pad_key"].is_string()) throw InputError(name + ".pad_key: must be \"both\", \"left\" or \"right\"");
    std::string p = v["pad_key"].get<std::string>();
    if (p == "both") c.pad_key = PadKey::Both;
    else if (p == "left") c.pad_key = PadKey::Left;
    else if (p == "right") c.pad_key = PadKey::Right;
    else throw InputError(name + ".pad_key: must be \"both\", \"left\" or \"right\" (got \"" + p + "\")");
  }
  return c;
}

std::optional<HeadMix> get_mix(const json& j, const std::string& key, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  const std::string name = where + "." + key;
  const json& v = j[key];
  if (!v.is_object()) throw InputError(name + ": must be an object {\"group\"} or null");
  check_keys(v, name, {"group"});
  HeadMix m;
  m.group = get_int(v, "group", name, 1, kMaxHeads);
  return m;
}

json conv_to_json(const KqConv& c) { return json{{"q", c.q}, {"k", c.k}, {"pad_key", pad_key_name(c.pad_key)}}; }

}  // namespace

std::string pad_key_name(PadKey p) {
  switch (p) {
    case PadKey::Both: return "both";
    case PadKey::Left: return "left";
    case PadKey::Right: return "right";
  }
  return "?";
}

int AttentionSpec::coupled_heads() const {
  int g = 1;
  if (head_pre) g = std::lcm(g, head_pre->group);
  if (head_post) g = std::lcm(g, head_post->group);
  return g;
}

double AttentionSpec::depth_scale() const {
  if (!depth_scale_layer) return 1.0;
  double lambda = 0.8 - 0.6 * std::exp(-0.3 * static_cast<double>(*depth_scale_layer));
  return 1.0 - lambda;
}

void AttentionSpec::validate() const {
  auto range = [](const std::string& name, long long x, long long lo, long long hi) {
    if (x < lo || x > hi)
      throw InputError(name + ": must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] (got " +
                       std::to_string(x) + ")");
  };
  range("heads", heads, 1, kMaxHeads);
  range("head_dim", head_dim, 1, kMaxHeadDim);
  auto conv = [&](const std::optional<KqConv>& c, const std::string& name) {
    if (!c) return;
    range(name + ".q", c->q, 1, kMaxConvQ);
    range(name + ".k", c->k, 1, kMaxConvK);
    if (c->pad_key == PadKey::Both && c->k % 2 == 0)
      throw InputError(name + ".k: must be odd when pad_key is \"both\" (got " + std::to_string(c->k) + ")");
  };
  conv(kq_pre, "kq_pre");
  conv(kq_post, "kq_post");
  auto mix = [&](const std::optional<HeadMix>& m, const std::string& name) {
    if (!m) return;
    range(name + ".group", m->group, 1, heads);
    if (heads % m->group != 0)
      throw InputError(name + ".group: must divide heads = " + std::to_string(heads) + " (got " +
                       std::to_string(m->group) + ")");
  };
  mix(head_pre, "head_pre");
  mix(head_post, "head_post");
  if (depth_scale_layer) range("depth_scale_layer", *depth_scale_layer, 0, 100000);
}

AttentionSpec spec_from_json(const json& j, const std::string& where) {
  if (!j.is_object()) throw InputError(where + ": must be a JSON object");
  check_keys(j, where, {"heads", "head_dim", "kq_pre", "head_pre", "kq_post", "head_post", "norm",
                        "depth_scale_layer", "gate"});
  AttentionSpec s;
  s.heads = get_int(j, "heads", where, 1, kMaxHeads);
  s.head_dim = get_int(j, "head_dim", where, 1, kMaxHeadDim);
  s.kq_pre = get_conv(j, "kq_pre", where);
  s.head_pre = get_mix(j, "head_pre", where);
  s.kq_post = get_conv(j, "kq_post", where);
  s.head_post = get_mix(j, "head_post", where);
  s.norm = get_bool(j, "norm", where);
  s.gate = get_bool(j, "gate", where);
  if (j.contains("depth_scale_layer") && !j["depth_scale_layer"].is_null())
    s.depth_scale_layer = get_int(j, "depth_scale_layer", where, 0, 100000);
  try {
    s.validate();
  } catch (const InputError& e) {
    throw InputError(where == "spec" ? e.what() : where + "." + e.what());
  }
  return s;
}

json spec_to_json(const AttentionSpec& s) {
  json j;
  j["heads"] = s.heads;
  j["head_dim"] = s.head_dim;
  j["kq_pre"] = s.kq_pre ? conv_to_json(*s.kq_pre) : json(nullptr);
  j["head_pre"] = s.head_pre ? json{{"group", s.head_pre->group}} : json(nullptr);
  j["kq_post"] = s.kq_post ? conv_to_json(*s.kq_post) : json(nullptr);
  j["head_post"] = s.head_post ? json{{"group", s.head_post->group}} : json(nullptr);
  j["norm"] = s.norm;
  j["depth_scale_layer"] = s.depth_scale_layer ? json(*s.depth_scale_layer) : json(nullptr);
  j["gate"] = s.gate;
  return j;
}

AttentionSpec load_spec_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw InputError("spec file " + path + ": cannot be opened");
  json j;
  try {
    j = json::parse(f);
  } catch (const json::parse_error& e) {
    throw InputError("spec file " + path + ": not valid JSON (" + e.what() + ")");
  }
  return spec_from_json(j, "spec");
}

std::vector<AttentionParamInfo> attention_params(const AttentionSpec& s) {
  std::vector<AttentionParamInfo> p;
  const long long H = s.heads, D = s.head_dim;
  if (s.kq_pre) p.push_back({"kq_pre", {H, s.kq_pre->q, s.kq_pre->k}});
  if (s.head_pre) p.push_back({"head_pre", {H / s.head_pre->group, s.head_pre->group, s.head_pre->group}});
  if (s.kq_post) p.push_back({"kq_post", {H, s.kq_post->q, s.kq_post->k}});
  if (s.head_post) p.push_back({"head_post", {H / s.head_post->group, s.head_post->group, s.head_post->group}});
  if (s.norm) p.push_back({"norm", {D}});
  if (s.gate) {
    p.push_back({"gate_w", {D}});
    p.push_back({"gate_b", {1}});
  }
  return p;
}

}  // namespace mta
