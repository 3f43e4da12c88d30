// `mta train CONFIG [--resume]`, `mta eval CHECKPOINT`, `mta compare CONFIG...`.
#include <cstdio>

#include "cli/commands.h"
#include "train/trainer.h"
#include "util/format.h"

namespace mta::cli {

Runner add_train_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Train a model from a JSON config (see configs/)");
  struct Opts {
    std::string config, out_dir;
    bool resume = false;
    long long steps = 0;
    long long seed = -1;
    double time_limit = 0;
    int threads = 0;
    std::string device;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("config", o->config, "training config JSON")->required();
  cmd->add_flag("--resume", o->resume, "continue from OUT_DIR/checkpoint.safetensors if it exists");
  cmd->add_option("--out", o->out_dir, "output folder (default: the config's out_dir)");
  cmd->add_option("--steps", o->steps, "override train.steps");
  cmd->add_option("--threads", o->threads, "override train.threads");
  cmd->add_option("--device", o->device, "override train.device (cpu or cuda)");
  cmd->add_option("--seed", o->seed, "override the config's seed (weights, data and dropout)")->check(CLI::Range(0LL, 1LL << 62));
  cmd->add_option("--time-limit", o->time_limit,
                  "stop after this many minutes of training, then evaluate and checkpoint (--resume continues)")
      ->check(CLI::NonNegativeNumber);
  return [o]() {
    TrainConfig cfg = load_train_config(o->config);
    if (o->seed >= 0) cfg.seed = static_cast<uint64_t>(o->seed), cfg.source["seed"] = o->seed;
    if (!o->device.empty()) cfg.train.device = o->device;
    if (!o->out_dir.empty()) cfg.out_dir = o->out_dir;
    if (o->steps > 0) cfg.train.steps = cfg.train.lr.total_steps = o->steps, cfg.source["train"]["steps"] = o->steps;
    if (o->threads > 0) cfg.train.threads = o->threads;
    TrainResult r = train(cfg, TrainOptions{o->resume, false, o->time_limit});
    if (r.interrupted) return 130;  // the conventional status of a run stopped by a signal
    std::printf("[%s] done: %lld steps in %s, final eval %s\n", cfg.name.c_str(), r.steps,
                human_duration(r.seconds).c_str(), r.eval.dump().c_str());
    return 0;
  };
}

Runner add_eval_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "Evaluate a checkpoint on its task's held-out data");
  struct Opts {
    std::string checkpoint, device;
    int examples = 0;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint.safetensors written by mta train")->required();
  cmd->add_option("--examples", o->examples, "held-out examples (default: the config's eval_examples)");
  cmd->add_option("--device", o->device, "cpu or cuda (default: the config's train.device)");
  return [o]() {
    std::printf("%s\n", evaluate_checkpoint(o->checkpoint, o->examples, o->device).dump().c_str());
    return 0;
  };
}

Runner add_compare_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("compare", "Train several configs in turn and print a comparison table");
  struct Opts {
    std::vector<std::string> configs;
    int threads = 0;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("configs", o->configs, "training configs")->required();
  cmd->add_option("--threads", o->threads, "override train.threads");
  return [o]() {
    struct Row {
      std::string name, attention, metric;
      TrainResult r;
    };
    std::vector<TrainConfig> cfgs;
    for (const auto& path : o->configs) cfgs.push_back(load_train_config(path));  // refuse bad configs up front
    std::vector<Row> rows;
    for (auto& cfg : cfgs) {
      if (o->threads > 0) cfg.train.threads = o->threads;
      TrainResult r = train(cfg, TrainOptions{false, false});
      if (r.interrupted) return 130;
      rows.push_back({cfg.name, attention_kind_name(cfg.model.attention), "error_rate", r});
    }
    std::printf("\n%-22s %-9s %10s %8s %10s %11s %9s\n", "run", "attention", "params", "steps", "train loss",
                "error rate", "time");
    for (const auto& row : rows)
      std::printf("%-22s %-9s %10zu %8lld %10.4f %10.1f%% %9s\n", row.name.c_str(), row.attention.c_str(),
                  row.r.num_params, row.r.steps, row.r.final_loss, 100.0 * row.r.eval.value("error_rate", -0.01),
                  human_duration(row.r.seconds).c_str());
    return 0;
  };
}

}  // namespace mta::cli
