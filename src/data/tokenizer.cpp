#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <unordered_map>

#include "data/text_files.h"
#include "io/atomic_file.h"
#include "util/error.h"
#include "util/hash.h"

namespace mta::data {
namespace {

// The training sentences: every non-empty line of every document, in path order, read one file at
// a time. Lines longer than kMaxChunk bytes (some documents are one long paragraph: a whole State of
// the Union address) are cut at spaces into pieces of at most kMaxChunk: SentencePiece skips
// over-long sentences, and since no piece spans a space, cutting there changes nothing it learns.
// A read error ends the stream and is reported after training (exceptions are not thrown through
// SentencePiece's code).
constexpr size_t kMaxChunk = 8192;

class CorpusLines : public sentencepiece::SentenceIterator {
 public:
  explicit CorpusLines(std::vector<TextDocument> docs) : docs_(std::move(docs)) { advance(); }
  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override {
    if (error_.empty()) return {};
    return {sentencepiece::util::StatusCode::kDataLoss, error_};
  }
  const std::string& error() const { return error_; }
  long long lines() const { return lines_; }

 private:
  void advance() {
    while (true) {
      if (pos_ < text_.size()) {
        size_t end = text_.find('\n', pos_);
        if (end == std::string::npos) end = text_.size();
        size_t next = end + 1;
        if (end - pos_ > kMaxChunk) {
          // The last space within the limit, else the last UTF-8 character boundary.
          size_t cut = text_.rfind(' ', pos_ + kMaxChunk);
          if (cut == std::string::npos || cut <= pos_) {
            cut = pos_ + kMaxChunk;
            while (cut > pos_ + 1 && (static_cast<unsigned char>(text_[cut]) & 0xC0) == 0x80) --cut;
            next = cut;
          } else {
            next = cut + 1;
          }
          end = cut;
        }
        line_.assign(text_, pos_, end - pos_);
        pos_ = next;
        if (!line_.empty()) {
          ++lines_;
          return;
        }
        continue;
      }
      if (next_ == docs_.size()) {
        done_ = true;
        return;
      }
      try {
        text_ = io::read_file(docs_[next_++].path, "document");
      } catch (const std::exception& e) {
        error_ = e.what();
        done_ = true;
        return;
      }
      pos_ = 0;
    }
  }

  std::vector<TextDocument> docs_;
  size_t next_ = 0, pos_ = 0;
  std::string text_, line_, error_;
  bool done_ = false;
  long long lines_ = 0;
};

// SentencePiece prefixes some messages with the source line and the failed condition
// ("./src/x.cc(660) [a == b] Vocabulary size too high ..."); keep the human part.
std::string sp_message(const sentencepiece::util::Status& s) {
  const std::string m = s.error_message();
  const size_t p = m.find(") [");
  const size_t q = p == std::string::npos ? p : m.find("] ", p);
  return q == std::string::npos ? m : m.substr(q + 2);
}

}  // namespace

std::string train_tokenizer(const TokenizerTrainOptions& opt) {
  if (opt.vocab_size < 300 || opt.vocab_size > 1000000)
    throw InputError("--vocab: must be in [300, 1000000] (256 byte pieces and the special pieces need room; got " +
                     std::to_string(opt.vocab_size) + ")");
  CorpusLines lines(list_text_documents(opt.input_dir));
  // Fixed seed: the line sample (when max_lines is set) is the same on every run.
  sentencepiece::SetRandomGeneratorSeed(20250401);
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(opt.vocab_size)},
      {"character_coverage", "0.9995"},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "true"},
      {"split_digits", "true"},
      {"user_defined_symbols", "\n"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      // Lines are paragraphs; SentencePiece's default (4192 bytes) would drop the long ones.
      {"max_sentence_length", std::to_string(kMaxChunk)},
      {"input_sentence_size", std::to_string(opt.max_lines)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", "1"},  // recorded in the model: see tokenizer.h
      {"minloglevel", opt.verbose ? "0" : "2"},
  };
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &model);
  if (!lines.error().empty()) throw InputError(lines.error());
  if (!status.ok()) throw InputError("tokenizer training on " + opt.input_dir + ": " + sp_message(status));
  if (lines.lines() == 0) throw InputError(opt.input_dir + ": the documents hold no text");
  return model;
}

Tokenizer::Tokenizer(const std::string& path) : source_(path) { init(io::read_file(path, "tokenizer model")); }

Tokenizer::Tokenizer(const std::string& model_bytes, const std::string& what) : source_(what) { init(model_bytes); }

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

void Tokenizer::init(const std::string& model_bytes) {
  sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = sp_->LoadFromSerializedProto(model_bytes);
  if (!status.ok()) throw InputError(source_ + ": not a SentencePiece model (" + sp_message(status) + ")");
  checksum_ = fnv1a64(model_bytes.data(), model_bytes.size());
  vocab_size_ = sp_->GetPieceSize();
  bos_id_ = sp_->bos_id();
  newline_id_ = sp_->PieceToId("\n");
  if (bos_id_ < 0 || newline_id_ == sp_->unk_id())
    throw InputError(source_ + ": a SentencePiece model without a BOS or a newline piece (train it with `mta tokenizer "
                     "train`)");
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  std::vector<int> ids;
  size_t pos = 0;
  while (true) {
    const size_t nl = text.find('\n', pos);
    const std::string_view line(text.data() + pos, (nl == std::string::npos ? text.size() : nl) - pos);
    if (!line.empty()) {
      const auto status = sp_->Encode(line, &ids);
      if (!status.ok()) throw InputError(source_ + ": cannot encode text (" + sp_message(status) + ")");
      out.insert(out.end(), ids.begin(), ids.end());
    }
    if (nl == std::string::npos) break;
    out.push_back(newline_id_);
    pos = nl + 1;
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out, piece;
  std::vector<int> line;
  auto flush = [&]() {
    if (line.empty()) return;
    const auto status = sp_->Decode(line, &piece);
    if (!status.ok()) throw InputError(source_ + ": cannot decode ids (" + sp_message(status) + ")");
    out += piece;
    line.clear();
  };
  for (const int32_t id : ids) {
    if (id < 0 || id >= vocab_size_)
      throw InputError("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                       std::to_string(vocab_size_) + ") of " + source_);
    if (id == newline_id_) {
      flush();
      out += '\n';
    } else {
      line.push_back(id);
    }
  }
  flush();
  return out;
}

}  // namespace mta::data
