// `mta attn --spec SPEC.json --in IN.safetensors --out OUT.safetensors [--device cpu|cuda]
//  [--impl auto|fused|materialized]`
// The op exactly as docs/mta-semantics.md specifies. Refusals: one line on stderr, exit 2, no output.
#include <cstdio>

#include "attention/attn_files.h"
#include "cli/commands.h"
#include "io/safetensors.h"

namespace mta::cli {

Runner add_attn_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("attn", "Run one MTA attention layer (forward, and backward when dout is given)");
  struct Opts {
    std::string spec, in, out, device = "cpu", impl = "auto";
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--spec", o->spec, "AttentionSpec JSON file")->required();
  cmd->add_option("--in", o->in, "input safetensors: q, k, v [B,H,T,D], parameters, optional dout")->required();
  cmd->add_option("--out", o->out, "output safetensors: out, and grad_* when dout is given")->required();
  cmd->add_option("--device", o->device, "cpu or cuda")->capture_default_str();
  cmd->add_option("--impl", o->impl,
                  "with --device cuda: auto (the fused bf16 kernels where they cover the spec and the input is "
                  "F32, else the materialized path), fused, or materialized (float32/float64)")
      ->capture_default_str();
  return [o]() {
    const Device device = parse_device(o->device);
    const AttnImpl impl = parse_attn_impl(o->impl);
    const AttentionSpec spec = load_spec_file(o->spec);
    const io::SafeTensors in = io::read_safetensors(o->in);
    std::vector<std::string> unused;
    const io::SafeTensors out = run_attention_tensors(spec, in, device, &unused, impl);
    for (const auto& name : unused)
      std::fprintf(stderr, "mta attn: warning: ignoring tensor '%s' (the spec does not use it)\n", name.c_str());
    io::write_safetensors(o->out, out);
    return 0;
  };
}

}  // namespace mta::cli
