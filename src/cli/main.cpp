// `mta`: one command with subcommands. Errors are one clear line on stderr and a non-zero exit:
// 2 for input that does not fit (spec, config, file, shape, NaN), 1 for anything else.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include "cli/commands.h"
#include "util/blas.h"
#include "util/error.h"

namespace {

// Keep an error message on one line whatever its source (nlohmann and CLI11 messages may wrap).
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  mta::blas_avoid_oversubscription();
  CLI::App app{"mta: train, evaluate and run Transformers with Multi-Token Attention"};
  app.require_subcommand(1);
  std::map<CLI::App*, mta::cli::Runner> runners;
  auto add = [&](mta::cli::Runner (*adder)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    mta::cli::Runner r = adder(app);
    auto subs = app.get_subcommands({});
    if (subs.size() > before) runners[subs.back()] = r;
  };
  add(mta::cli::add_train_command);
  add(mta::cli::add_eval_command);
  add(mta::cli::add_compare_command);
  add(mta::cli::add_generate_command);
  add(mta::cli::add_attn_command);
  add(mta::cli::add_bench_command);
  add(mta::cli::add_tokenizer_command);
  add(mta::cli::add_tokenize_command);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "mta: %s (see mta --help)\n", one_line(e.what()).c_str());
    return 2;
  }
  for (auto& [sub, run] : runners) {
    if (!sub->parsed()) continue;
    try {
      return run();
    } catch (const mta::InputError& e) {
      std::fprintf(stderr, "mta %s: %s\n", sub->get_name().c_str(), one_line(e.what()).c_str());
      return 2;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mta %s: error: %s\n", sub->get_name().c_str(), one_line(e.what()).c_str());
      return 1;
    }
  }
  return 2;
}
