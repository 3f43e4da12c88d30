#include "attention/spec.h"

#include "attention/attention_op.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>

#include "util/error.h"
#include "util/json_fields.h"

namespace mta {
namespace {

using json = nlohmann::json;

// Generous bounds: far beyond the paper's 6 x 11 kernels and 16 heads, small enough that a typo
// (k = 1100) is refused instead of running for hours.
constexpr int kMaxConvQ = 64;
constexpr int kMaxConvK = 255;
constexpr int kMaxHeads = 1024;
constexpr int kMaxHeadDim = 4096;

std::optional<KqConv> get_conv(FieldReader& r, const std::string& key) {
  if (!r.has(key)) {
    r.raw_if_present(key);
    return std::nullopt;
  }
  FieldReader cr(r.object(key), r.name(key));
  KqConv c;
  c.q = static_cast<int>(cr.integer("q", 1, kMaxConvQ));
  c.k = static_cast<int>(cr.integer("k", 1, kMaxConvK));
  const std::string p = cr.choice_or("pad_key", "both", {"both", "left", "right"});
  c.pad_key = p == "both" ? PadKey::Both : p == "left" ? PadKey::Left : PadKey::Right;
  cr.finish();
  return c;
}

std::optional<HeadMix> get_mix(FieldReader& r, const std::string& key) {
  if (!r.has(key)) {
    r.raw_if_present(key);
    return std::nullopt;
  }
  FieldReader mr(r.object(key), r.name(key));
  HeadMix m;
  m.group = static_cast<int>(mr.integer("group", 1, kMaxHeads));
  mr.finish();
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
  FieldReader r(j, where);
  AttentionSpec s;
  s.heads = static_cast<int>(r.integer("heads", 1, kMaxHeads));
  s.head_dim = static_cast<int>(r.integer("head_dim", 1, kMaxHeadDim));
  s.kq_pre = get_conv(r, "kq_pre");
  s.head_pre = get_mix(r, "head_pre");
  s.kq_post = get_conv(r, "kq_post");
  s.head_post = get_mix(r, "head_post");
  s.norm = r.boolean_or("norm", false);
  s.gate = r.boolean_or("gate", false);
  if (r.has("depth_scale_layer")) s.depth_scale_layer = static_cast<int>(r.integer("depth_scale_layer", 0, 100000));
  r.raw_if_present("depth_scale_layer");
  r.finish();
  try {
    s.validate();
  } catch (const InputError& e) {
    throw InputError(where + "." + e.what());
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

AttentionSpec load_spec_file(const std::string& path) { return spec_from_json(load_json_file(path, "spec file"), "spec"); }

void check_attention_args(const AttentionSpec& spec, const AttnDims& dims) {
  spec.validate();
  if (dims.B < 1 || dims.T < 1) throw InputError("attention: B and T must be at least 1");
  if (dims.H != spec.heads)
    throw InputError("attention: tensors have " + std::to_string(dims.H) + " heads, spec.heads = " +
                     std::to_string(spec.heads));
  if (dims.D != spec.head_dim)
    throw InputError("attention: tensors have head dim " + std::to_string(dims.D) + ", spec.head_dim = " +
                     std::to_string(spec.head_dim));
  if (dims.dv() != dims.D && (spec.norm || spec.gate))
    throw InputError("attention: a value dim different from the key dim is not supported with norm or gate");
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
