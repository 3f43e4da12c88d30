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
#include "util/error.h"

namespace mta::cli {

Runner add_bench_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "Benchmarks (see bench/)");
  auto* attn = cmd->add_subcommand("attn", "Time one attention layer, forward and forward+backward");
  cmd->require_subcommand(1);
  struct Opts {
    std::string spec;
    int B = 1, T = 256, reps = 5, warmup = 1;
  };
  auto o = std::make_shared<Opts>();
  attn->add_option("--spec", o->spec, "AttentionSpec JSON file")->required();
  attn->add_option("--batch", o->B, "batch size")->capture_default_str();
  attn->add_option("--seq", o->T, "sequence length")->capture_default_str();
  attn->add_option("--reps", o->reps, "timed repetitions (median reported)")->capture_default_str();
  attn->add_option("--warmup", o->warmup, "untimed repetitions first")->capture_default_str();
  return [o]() {
    const AttentionSpec spec = load_spec_file(o->spec);
    if (o->B < 1 || o->T < 1 || o->reps < 1) throw InputError("--batch, --seq and --reps must be at least 1");
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
    const double fwdbwd = time_ms([&] {
      cpu::mta_forward<float>(spec, dims, q.data(), k.data(), v.data(), p, out.data());
      cpu::mta_backward<float>(spec, dims, q.data(), k.data(), v.data(), p, dout.data(), dq.data(), dk.data(), dv.data(), g);
    });
    nlohmann::json j{{"B", o->B}, {"H", spec.heads}, {"T", o->T}, {"D", spec.head_dim}, {"threads", omp_get_max_threads()},
                     {"fwd_ms", fwd}, {"fwd_bwd_ms", fwdbwd}, {"reps", o->reps}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  };
}

}  // namespace mta::cli
