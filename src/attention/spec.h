#pragma once
// AttentionSpec: one value that describes a layer's attention, every option of
// ../shared/design/mta-semantics.md (docs/mta-semantics.md keeps our copy of the contract).
// The same value is used by every backend, the model, the configs and the `mta attn` command.
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

namespace mta {

enum class PadKey { Both, Left, Right };

// Key-query convolution over (query, key) logits or weights, one cq x ck kernel per head.
struct KqConv {
  int q = 1;  // cq: number of queries mixed (the current one and cq-1 previous)
  int k = 1;  // ck: number of keys mixed
  PadKey pad_key = PadKey::Both;
  // Key offset o of the convolution: C[i,j] reads S[i-(cq-1)+a, j-o+c].
  int key_offset() const { return pad_key == PadKey::Both ? (k - 1) / 2 : pad_key == PadKey::Left ? k - 1 : 0; }
  bool operator==(const KqConv&) const = default;
};

// Head mixing inside groups of `group` consecutive heads (group divides heads).
struct HeadMix {
  int group = 1;
  bool operator==(const HeadMix&) const = default;
};

struct AttentionSpec {
  int heads = 1;
  int head_dim = 1;
  std::optional<KqConv> kq_pre;
  std::optional<HeadMix> head_pre;
  std::optional<KqConv> kq_post;
  std::optional<HeadMix> head_post;
  bool norm = false;
  std::optional<int> depth_scale_layer;  // 0-based layer index l: output *= 1 - lambda(l)
  bool gate = false;

  bool operator==(const AttentionSpec&) const = default;

  // True when every MTA option is off: the layer is standard causal attention.
  bool is_standard() const {
    return !kq_pre && !head_pre && !kq_post && !head_post && !norm && !depth_scale_layer && !gate;
  }
  // Heads coupled by head mixing: the smallest block of heads that can be computed independently.
  int coupled_heads() const;
  // 1 - lambda(l), lambda(l) = 0.8 - 0.6 exp(-0.3 l); 1 when depth scaling is off.
  double depth_scale() const;

  // Throws InputError naming the field when the spec is inconsistent.
  void validate() const;
};

// JSON form exactly as the semantics page shows; absent or null members are disabled.
// Unknown members are refused (a typo must not silently disable an option).
AttentionSpec spec_from_json(const nlohmann::json& j, const std::string& where = "spec");
nlohmann::json spec_to_json(const AttentionSpec& s);
AttentionSpec load_spec_file(const std::string& path);

std::string pad_key_name(PadKey p);

// Names, shapes and identity initialisation of the op's parameters.
struct AttentionParamInfo {
  std::string name;                 // "kq_pre", "head_pre", "kq_post", "head_post", "norm", "gate_w", "gate_b"
  std::vector<long long> shape;
};
std::vector<AttentionParamInfo> attention_params(const AttentionSpec& s);

}  // namespace mta
