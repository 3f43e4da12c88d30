#include "train/trainer.h"

#include <omp.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "model/model.h"
#include "tasks/task.h"
#include "train/checkpoint.h"
#include "util/error.h"
#include "util/format.h"

namespace mta {
namespace {

std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }

// Seed of the dropout masks of (step, micro-batch).
uint64_t dropout_seed(uint64_t run_seed, long long step, int micro) {
  uint64_t x = run_seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(step) * 0xD1B54A32D192ED03ULL +
               static_cast<uint64_t>(micro) + 1;
  x = (x ^ (x >> 33)) * 0xFF51AFD7ED558CCDULL;
  return x ^ (x >> 33);
}

// Keeps the metrics lines of steps <= last_step (a resumed run rewrites what follows its checkpoint).
void truncate_metrics(const std::string& path, long long last_step) {
  std::ifstream in(path);
  if (!in) return;
  std::ostringstream kept;
  std::string line;
  while (std::getline(in, line)) {
    try {
      auto j = nlohmann::json::parse(line);
      if (j.value("step", 0LL) <= last_step) kept << line << "\n";
    } catch (...) {
      // A line cut by a kill: dropped.
    }
  }
  in.close();
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << kept.str();
  std::filesystem::rename(tmp, path);
}

void check_compatible(const TrainConfig& cfg, const Task& task) {
  if (task.vocab_size() > cfg.model.vocab_size)
    throw InputError("model.vocab_size: the task needs " + std::to_string(task.vocab_size()) + " tokens (got " +
                     std::to_string(cfg.model.vocab_size) + ")");
  if (task.seq_len() > cfg.model.max_seq_len)
    throw InputError("model.max_seq_len: the task's sequences have " + std::to_string(task.seq_len()) +
                     " positions (got " + std::to_string(cfg.model.max_seq_len) + ")");
}

}  // namespace

std::string checkpoint_path(const TrainConfig& cfg) { return cfg.out_dir + "/checkpoint.safetensors"; }

TrainResult train(const TrainConfig& cfg, const TrainOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  if (cfg.train.threads > 0) omp_set_num_threads(cfg.train.threads);
  std::unique_ptr<Task> task = make_task(cfg.task, cfg.seed);
  check_compatible(cfg, *task);
  std::filesystem::create_directories(cfg.out_dir);

  std::unique_ptr<TrainableModel> model_ptr = make_trainable_model(cfg.model, cfg.train.device);
  TrainableModel& model = *model_ptr;
  model.init(cfg.seed);
  CheckpointState state;
  state.config = cfg.source;
  const std::string ckpt = checkpoint_path(cfg);
  const std::string metrics_path = cfg.out_dir + "/metrics.jsonl";
  if (opt.resume && std::filesystem::exists(ckpt)) {
    const CheckpointState saved = read_checkpoint_state(ckpt);
    for (const char* section : {"model", "task", "seed"})
      if (saved.config.value(section, nlohmann::json()) != cfg.source.value(section, nlohmann::json()))
        throw InputError(std::string("--resume: the config's \"") + section + "\" differs from the checkpoint's in " + ckpt);
    state = load_checkpoint(ckpt, model, true);
    state.config = cfg.source;
    truncate_metrics(metrics_path, state.step);
    if (!opt.quiet) std::printf("[%s] resuming from %s at step %lld\n", cfg.name.c_str(), ckpt.c_str(), state.step);
  } else {
    std::ofstream(metrics_path, std::ios::trunc);
  }
  std::ofstream metrics(metrics_path, std::ios::app);
  if (!metrics) throw std::runtime_error("cannot write " + metrics_path);
  {
    std::ofstream(cfg.out_dir + "/config.json") << cfg.source.dump(2) << "\n";
  }

  g_stop = false;
  auto old_int = std::signal(SIGINT, on_signal);
  auto old_term = std::signal(SIGTERM, on_signal);

  const TrainSettings& s = cfg.train;
  const int micro = s.micro_batch_size, n_micro = s.batch_size / s.micro_batch_size;
  const long long tokens_per_step = static_cast<long long>(s.batch_size) * task->seq_len();
  if (!opt.quiet)
    std::printf("[%s] %s attention on %s, %zu parameters, %d threads, %lld steps of %d x %d tokens\n",
                cfg.name.c_str(), attention_kind_name(cfg.model.attention).c_str(), model.device().c_str(),
                model.num_params(), omp_get_max_threads(), s.steps,
                s.batch_size, task->seq_len());
  TrainResult result;
  result.num_params = model.num_params();
  double window_loss = 0;
  int window_steps = 0;
  auto window_start = std::chrono::steady_clock::now();
  const long long first_step = state.step;
  auto last_checkpoint = std::chrono::steady_clock::now();

  auto do_eval = [&]() {
    nlohmann::json e = task->evaluate(model, s.eval_examples, s.eval_batch_size);
    e["step"] = state.step;
    e["kind"] = "eval";
    metrics << e.dump() << "\n" << std::flush;
    state.last_eval = e;
    if (!opt.quiet) std::printf("[%s] eval at step %lld: %s\n", cfg.name.c_str(), state.step, e.dump().c_str());
  };

  bool out_of_time = false;
  while (state.step < s.steps && !g_stop && !out_of_time) {
    model.zero_grads();
    std::vector<Batch> batches;
    double weight = 0;
    for (int m = 0; m < n_micro; ++m) {
      batches.push_back(task->train_batch(state.data_position + static_cast<uint64_t>(m) * micro, micro));
      weight += batches.back().weight_sum();
    }
    if (weight <= 0) throw InputError("task: a training batch has no target tokens");
    double loss = 0;
    for (int m = 0; m < n_micro; ++m)
      loss += model.forward_backward(batches[m], static_cast<float>(1.0 / weight), true,
                                     dropout_seed(cfg.seed, state.step, m)).loss_sum;
    loss /= weight;
    if (!std::isfinite(loss))
      throw std::runtime_error("training loss is " + std::to_string(loss) + " at step " + std::to_string(state.step) +
                               " (diverged; lower train.lr or raise train.warmup); last checkpoint kept in " + ckpt);
    const double gnorm = model.clip_grad_norm(s.grad_clip);
    const double lr = learning_rate(s.lr, state.step);
    model.optimizer_step(s.adamw, lr, state.step + 1);
    state.step += 1;
    state.data_position += static_cast<uint64_t>(s.batch_size);
    window_loss += loss, window_steps += 1;

    const auto now = std::chrono::steady_clock::now();
    out_of_time = opt.time_limit_minutes > 0 &&
                  std::chrono::duration<double>(now - t0).count() >= 60.0 * opt.time_limit_minutes;
    // The first step of an invocation is always reported: on a slow machine it shows the run is alive.
    if (state.step % s.log_every == 0 || state.step == s.steps || state.step == first_step + 1 || out_of_time) {
      const double elapsed = std::chrono::duration<double>(now - t0).count();
      const double win = std::chrono::duration<double>(now - window_start).count();
      const double tok_s = tokens_per_step * window_steps / std::max(win, 1e-9);
      const double eta = elapsed / static_cast<double>(state.step - first_step) * static_cast<double>(s.steps - state.step);
      nlohmann::json line{{"step", state.step}, {"loss", loss}, {"lr", lr}, {"grad_norm", gnorm},
                          {"tokens_per_s", tok_s}, {"elapsed_s", elapsed}};
      metrics << line.dump() << "\n" << std::flush;
      result.final_loss = window_loss / window_steps;
      if (!opt.quiet)
        std::printf("[%s] step %lld/%lld | loss %.4f | lr %.2e | gnorm %.3f | %s tok/s | %s elapsed | ETA %s\n",
                    cfg.name.c_str(), state.step, s.steps, window_loss / window_steps, lr, gnorm,
                    human_count(tok_s).c_str(), human_duration(elapsed).c_str(), human_duration(eta).c_str());
      std::fflush(stdout);
      window_loss = 0, window_steps = 0, window_start = now;
    }
    if (s.eval_every > 0 && state.step % s.eval_every == 0 && state.step < s.steps) do_eval();
    const bool by_steps = s.checkpoint_every > 0 && state.step % s.checkpoint_every == 0;
    const bool by_time = s.checkpoint_minutes > 0 &&
                         std::chrono::duration<double>(now - last_checkpoint).count() >= 60.0 * s.checkpoint_minutes;
    if ((by_steps || by_time) && state.step < s.steps) {
      save_checkpoint(ckpt, state, model, true);
      last_checkpoint = std::chrono::steady_clock::now();
    }
  }
  if (out_of_time && !g_stop && !opt.quiet)
    std::printf("[%s] time limit of %g minutes reached at step %lld\n", cfg.name.c_str(), opt.time_limit_minutes,
                state.step);
  if ((state.step >= s.steps || (out_of_time && !g_stop)) && state.step > first_step) do_eval();
  save_checkpoint(ckpt, state, model, true);
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  if (g_stop) {
    std::printf("[%s] interrupted at step %lld; checkpoint written to %s (resume with --resume)\n", cfg.name.c_str(),
                state.step, ckpt.c_str());
    std::fflush(stdout);
    result.interrupted = true;
  }
  result.steps = state.step;
  result.eval = state.last_eval;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

nlohmann::json evaluate_checkpoint(const std::string& path, int examples, const std::string& device) {
  CheckpointState st = read_checkpoint_state(path);
  TrainConfig cfg = train_config_from_json(st.config);
  std::unique_ptr<Task> task = make_task(cfg.task, cfg.seed);
  std::unique_ptr<TrainableModel> model = make_trainable_model(cfg.model, device.empty() ? cfg.train.device : device);
  load_checkpoint(path, *model, false);
  nlohmann::json e = task->evaluate(*model, examples > 0 ? examples : cfg.train.eval_examples, cfg.train.eval_batch_size);
  e["step"] = st.step;
  e["checkpoint"] = path;
  return e;
}

}  // namespace mta
