#pragma once
// Each `mta` subcommand registers its options on a CLI11 subcommand and returns the function that
// runs it. main() turns InputError into one line on stderr and exit status 2.
#include <CLI/CLI.hpp>
#include <functional>

namespace mta::cli {

using Runner = std::function<int()>;

Runner add_attn_command(CLI::App& app);
Runner add_train_command(CLI::App& app);
Runner add_eval_command(CLI::App& app);
Runner add_compare_command(CLI::App& app);
Runner add_bench_command(CLI::App& app);
Runner add_generate_command(CLI::App& app);
Runner add_tokenizer_command(CLI::App& app);
Runner add_tokenize_command(CLI::App& app);

}  // namespace mta::cli
