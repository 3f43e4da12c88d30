// `mta bench attn --spec SPEC.json --batch B --seq T`: times the op (forward, forward+backward) on
// random inputs and prints one JSON line. bench/attn_cpu.py runs it beside PyTorch.
#include <omp.h>

#include <algorithm>
#include <map>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "attention/attention_op.h"
#include "attention/init.h"
#include "attention/mta_cpu.h"
#include "cli/commands.h"
#ifdef MTA_HAVE_CUDA
#include "attention/attn_bench_cuda.h"
#endif
#include "model/trainable.h"
#include "train/train_config.h"
#include "util/error.h"

namespace mta::cli {
namespace {

// `mta bench train CONFIG [--device cuda] [--batch B] [--seq T] [--steps S]`: training throughput of a
// config's model on random tokens (every position scored): tokens/s and model FLOP utilisation.
struct TrainBenchOpts {
  std::string config, device;
  int B = 0, T = 0, steps = 10, warmup = 2;
  double peak_tflops = 0;
  bool parsed = false;
};
TrainBenchOpts g_train_bench;

void add_bench_train(CLI::App* bench) {
  auto* t = bench->add_subcommand("train", "Time training steps of a config's model on random tokens");
  TrainBenchOpts& o = g_train_bench;
  t->add_option("config", o.config, "training config JSON (its model section is used)")->required();
  t->add_option("--device", o.device, "cpu or cuda (default: the config's train.device)");
  t->add_option("--batch", o.B, "sequences per step (default: the config's batch_size)");
  t->add_option("--seq", o.T, "tokens per sequence (default: model.max_seq_len)");
  t->add_option("--steps", o.steps, "timed steps")->capture_default_str();
  t->add_option("--warmup", o.warmup, "untimed steps first")->capture_default_str();
  t->add_option("--peak-tflops", o.peak_tflops,
                "peak dense bf16 TFLOP/s for the utilisation figure (default: 989 on cuda, none on cpu)");
  t->callback([] { g_train_bench.parsed = true; });
}

int run_bench_train() {
  const TrainBenchOpts& o = g_train_bench;
  TrainConfig cfg = load_train_config(o.config);
  const std::string device = o.device.empty() ? cfg.train.device : o.device;
  const int B = o.B > 0 ? o.B : cfg.train.batch_size, T = o.T > 0 ? o.T : cfg.model.max_seq_len;
  if (T > cfg.model.max_seq_len) throw InputError("--seq: longer than model.max_seq_len");
  if (o.steps < 1 || o.warmup < 0) throw InputError("--steps must be at least 1 and --warmup at least 0");
  auto model = make_trainable_model(cfg.model, device);
  model->init(cfg.seed);
  std::mt19937_64 rng(1);
  Batch batch;
  batch.B = B, batch.T = T;
  for (int i = 0; i < B * T; ++i) {
    batch.inputs.push_back(static_cast<int32_t>(rng() % cfg.model.vocab_size));
    batch.targets.push_back(static_cast<int32_t>(rng() % cfg.model.vocab_size));
    batch.weights.push_back(1.0f);
  }
  const float scale = 1.0f / static_cast<float>(B * T);
  auto step = [&](long long s) {
    model->zero_grads();
    model->forward_backward(batch, scale, true, static_cast<uint64_t>(s));
    model->clip_grad_norm(cfg.train.grad_clip);  // reads the norm back: the step has finished
    model->optimizer_step(cfg.train.adamw, cfg.train.lr.lr, s + 1);
  };
  for (int s = 0; s < o.warmup; ++s) step(s);
  model->synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < o.steps; ++s) step(o.warmup + s);
  model->synchronize();  // the last optimizer step has finished
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double tok_s = static_cast<double>(B) * T * o.steps / sec;
  // Model FLOPs per token (PaLM's convention, causal attention not halved): 6 x (parameters
  // without the embedding) + 6 x V x C for the tied output layer + 12 x layers x C x T for attention.
  const ModelConfig& m = cfg.model;
  const double n_matrix = static_cast<double>(model->num_params()) - static_cast<double>(m.vocab_size) * m.dim;
  const double flops_tok = 6.0 * n_matrix + 6.0 * m.vocab_size * m.dim + 12.0 * m.n_layers * m.dim * T;
  const double peak = o.peak_tflops > 0 ? o.peak_tflops : (device == "cuda" ? 989.0 : 0.0);
  nlohmann::json j{{"config", o.config}, {"device", device}, {"attention", attention_kind_name(m.attention)},
                   {"params", model->num_params()}, {"B", B}, {"T", T}, {"steps", o.steps},
                   {"tokens_per_s", tok_s}, {"model_tflops", flops_tok * tok_s / 1e12}};
  if (peak > 0) j["mfu"] = flops_tok * tok_s / (peak * 1e12), j["peak_tflops"] = peak;
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

}  // namespace

Runner add_bench_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "Benchmarks (see bench/)");
  auto* attn = cmd->add_subcommand("attn", "Time one attention layer, forward and forward+backward");
  cmd->require_subcommand(1);
  struct Opts {
    std::string spec;
    int B = 1, T = 256, reps = 5, warmup = 1;
    std::string device = "cpu", impl = "fused";
    bool forward_only = false;
  };
  auto o = std::make_shared<Opts>();
  attn->add_option("--spec", o->spec, "AttentionSpec JSON file")->required();
  attn->add_option("--batch", o->B, "batch size")->capture_default_str();
  attn->add_option("--seq", o->T, "sequence length")->capture_default_str();
  attn->add_option("--reps", o->reps, "timed repetitions (on CUDA: the mean of back-to-back calls; on the CPU: the median)")->capture_default_str();
  attn->add_option("--warmup", o->warmup, "untimed repetitions first")->capture_default_str();
  attn->add_option("--device", o->device, "cpu, or cuda: the fused GPU kernels (bf16)")->capture_default_str();
  attn->add_option("--impl", o->impl,
                   "with --device cuda: fused (the fused kernels, where they cover the spec), flash (standard attention) or "
                   "materialized (every spec, fp32)")
      ->capture_default_str();
  attn->add_flag("--forward-only", o->forward_only,
                 "time the forward pass alone (bwd_ms and fwd_bwd_ms are null)");
  add_bench_train(cmd);
  return [o, attn]() {
    if (!attn->parsed()) return run_bench_train();
    const AttentionSpec spec = load_spec_file(o->spec);
    if (o->B < 1 || o->T < 1 || o->reps < 1) throw InputError("--batch, --seq and --reps must be at least 1");
    if (o->device == "cuda") {
#ifdef MTA_HAVE_CUDA
      std::printf("%s\n",
                  cuda::bench_attention(spec, o->B, o->T, o->impl, o->reps, o->warmup, o->forward_only).dump().c_str());
      return 0;
#else
      throw InputError("--device cuda: this build has no CUDA backend");
#endif
    }
    if (o->device != "cpu") throw InputError("--device: must be cpu or cuda (got '" + o->device + "')");
    const AttnDims dims{o->B, spec.heads, o->T, spec.head_dim};
    std::mt19937 rng(0);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto randn = [&](size_t n, float sd) {
      std::vector<float> x(n);
      for (auto& e : x) e = sd * nd(rng);
      return x;
    };
    std::vector<float> q = randn(dims.numel(), 1), k = randn(dims.numel(), 1), v = randn(dims.numel(), 1),
                       dout = randn(dims.numel(), 1), out(dims.numel()), dq(dims.numel()), dk(dims.numel()),
                       dv(dims.numel());
    // Identity kernels plus noise: timing must not depend on zero weights being skipped.
    std::map<std::string, std::vector<float>> pv, gv;
    for (const auto& info : attention_params(spec)) {
      long long n = 1;
      for (auto d : info.shape) n *= d;
      std::vector<float> x(n);
      init_attention_param_identity(spec, info, x.data());
      for (auto& e : x) e += 0.1f * nd(rng);
      pv[info.name] = x;
      gv[info.name].assign(n, 0.0f);
    }
    auto find = [](auto& m, const char* name) { auto it = m.find(name); return it == m.end() ? nullptr : it->second.data(); };
    const auto p = attn_pointers<AttnParams<float>>([&](const char* n) -> const float* { return find(pv, n); });
    const auto g = attn_pointers<AttnParamGrads<float>>([&](const char* n) -> float* { return find(gv, n); });
    auto time_ms = [&](auto&& fn) {
      for (int i = 0; i < o->warmup; ++i) fn();
      std::vector<double> t;
      for (int i = 0; i < o->reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(t.begin(), t.end());
      return t[t.size() / 2];
    };
    const double fwd = time_ms([&] { cpu::mta_forward<float>(spec, dims, q.data(), k.data(), v.data(), p, out.data()); });
    nlohmann::json fwdbwd;  // null with --forward-only
    if (!o->forward_only)
      fwdbwd = time_ms([&] {
        cpu::mta_forward<float>(spec, dims, q.data(), k.data(), v.data(), p, out.data());
        cpu::mta_backward<float>(spec, dims, q.data(), k.data(), v.data(), p, dout.data(), dq.data(), dk.data(),
                                 dv.data(), g);
      });
    nlohmann::json j{{"B", o->B}, {"H", spec.heads}, {"T", o->T}, {"D", spec.head_dim}, {"threads", omp_get_max_threads()},
                     {"fwd_ms", fwd}, {"fwd_bwd_ms", fwdbwd}, {"reps", o->reps}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  };
}

}  // namespace mta::cli
