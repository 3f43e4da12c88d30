#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "attention/spec.h"
#include "util/error.h"

using mta::AttentionSpec;
using mta::InputError;
using nlohmann::json;

namespace {

// Returns the InputError message of parsing j, or "" if it parsed.
std::string refusal(const json& j) {
  try {
    mta::spec_from_json(j);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

const json kFull = json::parse(R"({"heads": 4, "head_dim": 16,
     "kq_pre":   {"q": 6, "k": 11, "pad_key": "both"},
     "head_pre": {"group": 2},
     "kq_post":  {"q": 6, "k": 11, "pad_key": "left"},
     "head_post": {"group": 4},
     "norm": true, "depth_scale_layer": 3, "gate": true})");

}  // namespace

TEST(Spec, ParsesEveryOption) {
  AttentionSpec s = mta::spec_from_json(kFull);
  EXPECT_EQ(s.heads, 4);
  EXPECT_EQ(s.head_dim, 16);
  ASSERT_TRUE(s.kq_pre);
  EXPECT_EQ(s.kq_pre->q, 6);
  EXPECT_EQ(s.kq_pre->k, 11);
  EXPECT_EQ(s.kq_pre->pad_key, mta::PadKey::Both);
  EXPECT_EQ(s.kq_pre->key_offset(), 5);
  EXPECT_EQ(s.kq_post->pad_key, mta::PadKey::Left);
  EXPECT_EQ(s.kq_post->key_offset(), 10);
  EXPECT_EQ(s.head_pre->group, 2);
  EXPECT_EQ(s.head_post->group, 4);
  EXPECT_EQ(s.coupled_heads(), 4);
  EXPECT_TRUE(s.norm);
  EXPECT_TRUE(s.gate);
  EXPECT_EQ(*s.depth_scale_layer, 3);
  EXPECT_NEAR(s.depth_scale(), 1.0 - (0.8 - 0.6 * std::exp(-0.9)), 1e-15);
  EXPECT_FALSE(s.is_standard());
}

TEST(Spec, AbsentAndNullMembersAreDisabled) {
  AttentionSpec s = mta::spec_from_json(json::parse(R"({"heads": 2, "head_dim": 8, "kq_pre": null, "gate": null})"));
  EXPECT_TRUE(s.is_standard());
  EXPECT_EQ(s.coupled_heads(), 1);
  EXPECT_EQ(s.depth_scale(), 1.0);
}

TEST(Spec, JsonRoundTrip) {
  AttentionSpec s = mta::spec_from_json(kFull);
  EXPECT_EQ(mta::spec_from_json(mta::spec_to_json(s)), s);
  AttentionSpec plain = mta::spec_from_json(json::parse(R"({"heads": 3, "head_dim": 5})"));
  EXPECT_EQ(mta::spec_from_json(mta::spec_to_json(plain)), plain);
  json right = kFull;
  right["kq_pre"]["pad_key"] = "right";
  right["kq_pre"]["k"] = 4;
  AttentionSpec r = mta::spec_from_json(right);
  EXPECT_EQ(r.kq_pre->key_offset(), 0);
  EXPECT_EQ(mta::spec_from_json(mta::spec_to_json(r)), r);
}

TEST(Spec, RefusalsNameTheField) {
  auto with = [](const std::string& path, const json& value) {
    json j = kFull;
    j[json::json_pointer(path)] = value;
    return j;
  };
  EXPECT_NE(refusal(with("/kq_pre/k", 10)).find("kq_pre.k"), std::string::npos);
  EXPECT_NE(refusal(with("/kq_pre/k", 10)).find("odd"), std::string::npos);
  EXPECT_NE(refusal(with("/kq_post/pad_key", "middle")).find("kq_post.pad_key"), std::string::npos);
  EXPECT_NE(refusal(with("/head_pre/group", 3)).find("head_pre.group"), std::string::npos);
  EXPECT_NE(refusal(with("/head_post/group", 0)).find("head_post.group"), std::string::npos);
  EXPECT_NE(refusal(with("/heads", 0)).find("heads"), std::string::npos);
  EXPECT_NE(refusal(with("/head_dim", "16")).find("head_dim"), std::string::npos);
  EXPECT_NE(refusal(with("/norm", 1)).find("norm"), std::string::npos);
  EXPECT_NE(refusal(with("/depth_scale_layer", -1)).find("depth_scale_layer"), std::string::npos);
  EXPECT_NE(refusal(with("/kq_pre/q", 0)).find("kq_pre.q"), std::string::npos);
  EXPECT_NE(refusal(with("/kq_pre/extra", 1)).find("kq_pre.extra"), std::string::npos);
  EXPECT_NE(refusal(with("/gates", true)).find("gates: unknown field"), std::string::npos);
  json no_heads = kFull;
  no_heads.erase("heads");
  EXPECT_NE(refusal(no_heads).find("heads: missing"), std::string::npos);
  EXPECT_NE(refusal(json::array()).find("object"), std::string::npos);
  // Even k is fine with one-sided padding.
  EXPECT_EQ(refusal(with("/kq_post/k", 10)), "");
}

TEST(Spec, ParamShapes) {
  AttentionSpec s = mta::spec_from_json(kFull);
  auto ps = mta::attention_params(s);
  ASSERT_EQ(ps.size(), 7u);
  EXPECT_EQ(ps[0].name, "kq_pre");
  EXPECT_EQ(ps[0].shape, (std::vector<long long>{4, 6, 11}));
  EXPECT_EQ(ps[1].name, "head_pre");
  EXPECT_EQ(ps[1].shape, (std::vector<long long>{2, 2, 2}));
  EXPECT_EQ(ps[3].shape, (std::vector<long long>{1, 4, 4}));
  EXPECT_EQ(ps[4].name, "norm");
  EXPECT_EQ(ps[6].name, "gate_b");
  EXPECT_EQ(ps[6].shape, (std::vector<long long>{1}));
}
