// `mta tokenizer train|encode` and `mta tokenize`: the language-modelling data pipeline from a corpus
// folder (scripts/make-corpus.sh) to token shards (data/shard.h).
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "data/encode_corpus.h"
#include "data/shard.h"
#include "data/text_files.h"
#include "data/tokenizer.h"
#include "io/atomic_file.h"
#include "util/error.h"
#include "util/format.h"
#include "util/hash.h"

namespace mta::cli {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void make_parent_dirs(const std::string& path) {
  const auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
}

}  // namespace

Runner add_tokenizer_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenizer", "Train or try a SentencePiece BPE tokenizer");
  cmd->require_subcommand(1);
  struct Opts {
    data::TokenizerTrainOptions train;
    std::string out, model, text;
  };
  auto o = std::make_shared<Opts>();
  auto* train = cmd->add_subcommand("train", "Train BPE on every line of a corpus folder's documents");
  train->add_option("--input", o->train.input_dir, "corpus folder, e.g. data/corpus/train")->required();
  train->add_option("--vocab", o->train.vocab_size, "vocabulary size (default 16000)");
  train->add_option("--out", o->out, "model file to write, e.g. data/tok/corpus-16k.model")->required();
  train->add_option("--max-lines", o->train.max_lines, "train on a fixed sample of this many lines (default: all)");
  train->add_flag("--verbose", o->train.verbose, "show SentencePiece's progress log");
  auto* encode = cmd->add_subcommand("encode", "Print the token ids and pieces of a text, and its round trip");
  encode->add_option("--tokenizer", o->model, "model file")->required();
  encode->add_option("--text", o->text, "text to encode")->required();
  return [o, train, encode]() {
    if (train->parsed()) {
      const auto t0 = std::chrono::steady_clock::now();
      const std::string model = data::train_tokenizer(o->train);
      make_parent_dirs(o->out);
      io::write_file_atomic(o->out, model.data(), model.size());
      const data::Tokenizer tok(o->out);
      std::printf("tokenizer: BPE, %d pieces, trained on %s in %s -> %s (fnv1a64 %s)\n", tok.vocab_size(),
                  o->train.input_dir.c_str(), human_duration(seconds_since(t0)).c_str(), o->out.c_str(),
                  hex64(tok.checksum()).c_str());
      return 0;
    }
    if (encode->parsed()) {
      const data::Tokenizer tok(o->model);
      const std::vector<int32_t> ids = tok.encode(o->text);
      std::printf("%zu tokens:", ids.size());
      for (int32_t id : ids) std::printf(" %d", id);
      std::printf("\nround trip %s: %s\n", tok.decode(ids) == o->text ? "exact" : "DIFFERS", tok.decode(ids).c_str());
      return 0;
    }
    return 2;
  };
}

Runner add_tokenize_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Encode a corpus folder into one token shard");
  struct Opts {
    std::string tokenizer, input, out;
    int threads = 0;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--tokenizer", o->tokenizer, "model file of `mta tokenizer train`")->required();
  cmd->add_option("--input", o->input, "corpus folder: <group>/<document>.txt files, e.g. data/corpus/valid")->required();
  cmd->add_option("--out", o->out, "shard file to write, e.g. data/shards/valid.bin")->required();
  cmd->add_option("--threads", o->threads, "threads (default: all cores)");
  return [o]() {
    const auto t0 = std::chrono::steady_clock::now();
    const data::Tokenizer tok(o->tokenizer);
    const std::vector<data::TextDocument> docs = data::list_text_documents(o->input);
    if (o->threads > 0) omp_set_num_threads(o->threads);
    size_t bytes = 0;
    const data::Shard shard = data::encode_documents(tok, docs, &bytes);
    make_parent_dirs(o->out);
    data::write_shard(o->out, shard);
    std::printf("tokenize: %zu documents in %zu groups, %.2f MB of text -> %zu tokens (%.2f bytes/token) in %s -> %s "
                "(%.2f MB)\n",
                docs.size(), shard.groups.size(), bytes / 1e6, shard.tokens.size(),
                static_cast<double>(bytes) / static_cast<double>(shard.tokens.size()),
                human_duration(seconds_since(t0)).c_str(), o->out.c_str(),
                static_cast<double>(std::filesystem::file_size(o->out)) / 1e6);
    return 0;
  };
}

}  // namespace mta::cli
