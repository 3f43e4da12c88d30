// `mta attn --spec SPEC.json --in IN.safetensors --out OUT.safetensors [--device cpu|cuda]`
// The op exactly as docs/mta-semantics.md specifies. Refusals: one line on stderr, exit 2, no output.
#include <cstdio>

#include "attention/attn_files.h"
#include "cli/commands.h"
#include "io/safetensors.h"

namespace mta::cli {

Runner add_attn_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("attn", "Run one MTA attention layer (forward, and backward when dout is given)");
  struct Opts {
    std::string spec, in, out, device = "cpu";
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--spec", o->spec, "AttentionSpec JSON file")->required();
  cmd->add_option("--in", o->in, "input safetensors: q, k, v [B,H,T,D], parameters, optional dout")->required();
  cmd->add_option("--out", o->out, "output safetensors: out, and grad_* when dout is given")->required();
  cmd->add_option("--device", o->device, "cpu or cuda")->capture_default_str();
  return [o]() {
    const Device device = parse_device(o->device);
    const AttentionSpec spec = load_spec_file(o->spec);
    const io::SafeTensors in = io::read_safetensors(o->in);
    std::vector<std::string> unused;
    const io::SafeTensors out = run_attention_tensors(spec, in, device, &unused);
    for (const auto& name : unused)
      std::fprintf(stderr, "mta attn: warning: ignoring tensor '%s' (the spec does not use it)\n", name.c_str());
    io::write_safetensors(o->out, out);
    return 0;
  };
}

}  // namespace mta::cli
