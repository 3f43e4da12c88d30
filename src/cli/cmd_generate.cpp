// `mta generate CHECKPOINT --prompt TEXT`: continue a prompt with a trained model, on the CPU.
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "model/generate.h"
#include "tasks/task.h"
#include "train/checkpoint.h"
#include "train/train_config.h"
#include "util/error.h"

namespace mta::cli {

Runner add_generate_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Continue a prompt with a trained checkpoint (CPU, KV cache)");
  struct Opts {
    std::string checkpoint, prompt;
    int max_new = 32;
    double temperature = 0;
    int top_k = 0;
    uint64_t seed = 1;
    bool no_cache = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint.safetensors written by mta train")->required();
  cmd->add_option("--prompt", o->prompt, "text to continue, in the checkpoint's task's alphabet")->required();
  cmd->add_option("--max-new", o->max_new, "tokens to generate at most (default 32)");
  cmd->add_option("--temperature", o->temperature, "0 (default): greedy; > 0: sample from softmax(logits / T)");
  cmd->add_option("--top-k", o->top_k, "sample among the K most likely tokens only (needs --temperature > 0)");
  cmd->add_option("--seed", o->seed, "seed of the sampling (default 1)");
  cmd->add_flag("--no-cache", o->no_cache, "recompute the whole sequence at every token (slow; for checking)");
  return [o]() {
    GenerateOptions g;
    g.max_new = o->max_new;
    g.sampling = SamplingOptions{o->temperature, o->top_k, o->seed};
    g.use_cache = !o->no_cache;
    g.sampling.validate();  // before the checkpoint is read: bad options fail at once
    if (g.max_new < 0) throw InputError("--max-new: must be >= 0 (got " + std::to_string(g.max_new) + ")");
    const CheckpointState st = read_checkpoint_state(o->checkpoint);
    const TrainConfig cfg = train_config_from_json(st.config);
    const std::unique_ptr<Task> task = make_task(cfg.task, cfg.seed);
    const std::vector<int32_t> prompt = task->encode(o->prompt);
    // The checkpoint loader fills a TrainableModel; generation runs on ModelT, so copy the weights.
    Model model(cfg.model);
    {
      std::unique_ptr<TrainableModel> loaded = make_trainable_model(cfg.model, "cpu");
      load_checkpoint(o->checkpoint, *loaded, false);
      loaded->get_state(&model.params(), nullptr, nullptr);
    }
    const GenerateResult r = generate(model, prompt, g);
    std::printf("%s\n", task->decode(r.tokens).c_str());
    if (r.stop == StopReason::ContextFull)
      std::fprintf(stderr, "mta generate: stopped after %zu tokens: the sequence reached model.max_seq_len = %d\n",
                   r.tokens.size(), cfg.model.max_seq_len);
    return 0;
  };
}

}  // namespace mta::cli
