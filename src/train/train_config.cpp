#include "train/train_config.h"

#include "util/error.h"
#include "util/json_fields.h"

namespace mta {

TrainConfig train_config_from_json(const nlohmann::json& j) {
  FieldReader r(j, "config");
  TrainConfig c;
  c.source = j;
  c.name = r.string("name");
  c.out_dir = r.string_or("out_dir", "runs/" + c.name);
  c.seed = static_cast<uint64_t>(r.integer_or("seed", 1, 0, (1LL << 62)));
  c.model = model_config_from_json(r.object("model"), "model");
  c.task = r.object("task");
  FieldReader t(r.object("train"), "train");
  TrainSettings& s = c.train;
  s.steps = t.integer("steps", 1, 1LL << 40);
  s.batch_size = static_cast<int>(t.integer("batch_size", 1, 1 << 20));
  s.micro_batch_size = static_cast<int>(t.integer_or("micro_batch_size", 0, 0, 1 << 20));
  if (s.micro_batch_size == 0) s.micro_batch_size = s.batch_size;
  if (s.batch_size % s.micro_batch_size != 0)
    throw InputError("train.micro_batch_size: must divide train.batch_size = " + std::to_string(s.batch_size) +
                     " (got " + std::to_string(s.micro_batch_size) + ")");
  s.lr.lr = t.number("lr", 0.0, 10.0);
  s.lr.warmup = t.integer_or("warmup", 0, 0, 1LL << 40);
  s.lr.schedule = parse_schedule(t.string_or("schedule", "constant"), "train.schedule");
  s.lr.min_lr_ratio = t.number_or("min_lr_ratio", 0.0, 0.0, 1.0);
  s.lr.total_steps = s.steps;
  s.adamw.beta1 = t.number_or("beta1", 0.9, 0.0, 0.999999);
  s.adamw.beta2 = t.number_or("beta2", 0.95, 0.0, 0.999999);
  s.adamw.eps = t.number_or("eps", 1e-8, 1e-30, 1.0);
  s.adamw.weight_decay = t.number_or("weight_decay", 0.0, 0.0, 10.0);
  s.grad_clip = t.number_or("grad_clip", 1.0, 0.0, 1e9);
  s.log_every = static_cast<int>(t.integer_or("log_every", 10, 1, 1 << 30));
  s.eval_every = static_cast<int>(t.integer_or("eval_every", 0, 0, 1 << 30));
  s.eval_examples = static_cast<int>(t.integer_or("eval_examples", 1000, 1, 1 << 24));
  s.eval_batch_size = static_cast<int>(t.integer_or("eval_batch_size", 64, 1, 1 << 20));
  s.checkpoint_every = static_cast<int>(t.integer_or("checkpoint_every", 200, 0, 1 << 30));
  s.checkpoint_minutes = t.number_or("checkpoint_minutes", 0.0, 0.0, 1e6);
  s.threads = static_cast<int>(t.integer_or("threads", 0, 0, 4096));
  s.device = t.choice_or("device", "cpu", {"cpu", "cuda"});
  t.finish();
  r.finish();
  return c;
}

TrainConfig load_train_config(const std::string& path) {
  return train_config_from_json(load_json_file(path, "config"));
}

}  // namespace mta
