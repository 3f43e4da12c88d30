#include "model/config.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "util/error.h"
#include "util/json_fields.h"

namespace mta {

using json = nlohmann::json;

int llama_ffn_hidden(int dim, int multiple_of) {
  const int hidden = 2 * (4 * dim) / 3;
  return multiple_of * ((hidden + multiple_of - 1) / multiple_of);
}

std::string attention_kind_name(AttentionKind k) {
  switch (k) {
    case AttentionKind::Standard: return "standard";
    case AttentionKind::Mta: return "mta";
    case AttentionKind::Diff: return "diff";
  }
  return "?";
}

AttentionSpec ModelConfig::layer_spec(int l) const {
  AttentionSpec s;
  if (attention == AttentionKind::Mta) {
    s = mta;
    const bool kq = std::find(kq_layers.begin(), kq_layers.end(), l) != kq_layers.end();
    if (!kq) s.kq_pre.reset(), s.kq_post.reset();
    if (mta_depth_scale) s.depth_scale_layer = l;
  }
  s.heads = n_heads;
  s.head_dim = head_dim();
  return s;
}

ModelConfig model_config_from_json(const json& j, const std::string& where) {
  FieldReader r(j, where);
  ModelConfig c;
  c.vocab_size = r.integer("vocab_size", 2, 1 << 22);
  c.dim = r.integer("dim", 2, 1 << 16);
  c.n_layers = r.integer("n_layers", 1, 1024);
  c.n_heads = r.integer("n_heads", 1, 1024);
  c.max_seq_len = r.integer("max_seq_len", 1, 1 << 20);
  c.ffn_multiple_of = r.integer_or("ffn_multiple_of", 256, 1, 1 << 16);
  c.ffn_hidden = r.integer_or("ffn_hidden", 0, 0, 1 << 20);
  c.rope_theta = r.number_or("rope_theta", 1e5, 1.0, 1e12);
  c.norm_eps = r.number_or("norm_eps", 1e-5, 1e-12, 1.0);
  c.dropout = static_cast<float>(r.number_or("dropout", 0.0, 0.0, 0.95));
  c.init_std = r.number_or("init_std", 0.02, 1e-6, 10.0);
  if (c.dim % c.n_heads != 0)
    throw InputError(where + ".n_heads: must divide dim = " + std::to_string(c.dim) + " (got " + std::to_string(c.n_heads) + ")");
  if (c.head_dim() % 2 != 0)
    throw InputError(where + ".dim: dim / n_heads must be even for RoPE (got head dim " + std::to_string(c.head_dim()) + ")");
  if (c.ffn_hidden == 0) c.ffn_hidden = llama_ffn_hidden(c.dim, c.ffn_multiple_of);

  const json& a = r.object("attention");
  const std::string aw = where + ".attention";
  FieldReader ar(a, aw);
  const std::string type = ar.string_or("type", "standard");
  if (type == "standard") {
    c.attention = AttentionKind::Standard;
    ar.finish();
  } else if (type == "diff") {
    c.attention = AttentionKind::Diff;
    if (c.n_heads % 2 != 0)
      throw InputError(aw + ".type: diff attention needs an even n_heads (half the heads, twice the head dim; got " +
                       std::to_string(c.n_heads) + ")");
    ar.finish();
  } else if (type == "mta") {
    c.attention = AttentionKind::Mta;
    // The spec's members, with heads and head_dim taken from the model.
    json spec = json::object();
    for (const char* key : {"kq_pre", "head_pre", "kq_post", "head_post", "norm", "gate"})
      if (a.contains(key)) spec[key] = ar.raw(key);
    spec["heads"] = c.n_heads;
    spec["head_dim"] = c.head_dim();
    c.mta = spec_from_json(spec, aw);
    c.mta_depth_scale = ar.boolean_or("depth_scale", false);
    if (a.contains("kq_layers") && !a["kq_layers"].is_string()) {
      for (int l : ar.int_list("kq_layers")) {
        if (l < 0 || l >= c.n_layers)
          throw InputError(aw + ".kq_layers: layer " + std::to_string(l) + " is out of range [0, " +
                           std::to_string(c.n_layers - 1) + "]");
        c.kq_layers.push_back(l);
      }
    } else {
      const std::string all = ar.string_or("kq_layers", "all");
      if (all != "all") throw InputError(aw + ".kq_layers: must be \"all\" or a list of layer indices (got \"" + all + "\")");
      for (int l = 0; l < c.n_layers; ++l) c.kq_layers.push_back(l);
    }
    ar.finish();
  } else {
    throw InputError(aw + ".type: must be \"standard\", \"mta\" or \"diff\" (got \"" + type + "\")");
  }
  r.finish();
  return c;
}

json model_config_to_json(const ModelConfig& c) {
  json j;
  j["vocab_size"] = c.vocab_size;
  j["dim"] = c.dim;
  j["n_layers"] = c.n_layers;
  j["n_heads"] = c.n_heads;
  j["max_seq_len"] = c.max_seq_len;
  j["ffn_multiple_of"] = c.ffn_multiple_of;
  j["ffn_hidden"] = c.ffn_hidden;
  j["rope_theta"] = c.rope_theta;
  j["norm_eps"] = c.norm_eps;
  j["dropout"] = c.dropout;
  j["init_std"] = c.init_std;
  json a;
  a["type"] = attention_kind_name(c.attention);
  if (c.attention == AttentionKind::Mta) {
    json s = spec_to_json(c.mta);
    for (const char* key : {"kq_pre", "head_pre", "kq_post", "head_post", "norm", "gate"}) a[key] = s[key];
    a["depth_scale"] = c.mta_depth_scale;
    a["kq_layers"] = c.kq_layers;
  }
  j["attention"] = a;
  return j;
}

}  // namespace mta
