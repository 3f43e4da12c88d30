#pragma once
// Model configuration: a Llama-style decoder whose attention is standard, MTA or DIFF per the config.
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "attention/spec.h"

namespace mta {

enum class AttentionKind { Standard, Mta, Diff };

struct ModelConfig {
  int vocab_size = 0;
  int dim = 0;
  int n_layers = 0;
  int n_heads = 0;
  int ffn_hidden = 0;        // derived by Llama's rule unless given
  int ffn_multiple_of = 256;
  double rope_theta = 1e5;
  double norm_eps = 1e-5;
  float dropout = 0.0f;      // residual and attention-weight dropout (training only)
  int max_seq_len = 0;
  double init_std = 0.02;

  AttentionKind attention = AttentionKind::Standard;
  // MTA: the spec shared by all layers (heads / head_dim filled in), and the layers that also get the
  // key-query convolutions of that spec. Every other option (head mixing, norm, gate) applies to all
  // layers; depth scaling, when on, uses each layer's own index.
  AttentionSpec mta;
  std::vector<int> kq_layers;
  bool mta_depth_scale = false;

  int head_dim() const { return dim / n_heads; }
  // The AttentionSpec of layer l (standard attention for Standard; the sub-head layout for Diff).
  AttentionSpec layer_spec(int l) const;
  bool operator==(const ModelConfig&) const = default;
};

// Llama's rule: hidden = multiple_of * ceil((2/3 * 4 * dim) / multiple_of).
int llama_ffn_hidden(int dim, int multiple_of);

ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& where = "model");
nlohmann::json model_config_to_json(const ModelConfig& c);
std::string attention_kind_name(AttentionKind k);

}  // namespace mta
