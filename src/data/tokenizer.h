#pragma once
// The language-modelling tokenizer: a SentencePiece BPE model (libsentencepiece), trained and used
// through its C++ API.
//
// Text is UTF-8 and lossless: decode(encode(text)) == text for any valid UTF-8 text. That needs the
// "identity" normalization (no NFKC, whitespace kept as it is), byte fallback (characters outside
// the vocabulary become byte pieces instead of <unk>), and newlines as tokens: SentencePiece sees
// text one line at a time (training sentences are lines), so encode() encodes each line on its own,
// each with SentencePiece's usual leading-space marker, and puts the "\n" piece between lines.
//
// A model is identified by checksum(): FNV-1a 64 of the model file's bytes (util/hash.h).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace mta::data {

struct TokenizerTrainOptions {
  std::string input_dir;       // a corpus folder (data/text_files.h): every line of every document
  int vocab_size = 16000;
  long long max_lines = 0;     // train on a fixed-seed sample of this many lines (0: all)
  bool verbose = false;        // SentencePiece's own progress log on stderr
};

// Trains BPE and returns the serialized model (the bytes of a .model file). Deterministic: the same
// input and options give the same bytes, on any machine. (One thread: SentencePiece records the
// thread count in the model, which would change its bytes and checksum; its BPE training is
// sequential anyway.) InputError for a folder without text or a vocabulary
// that does not fit the text.
std::string train_tokenizer(const TokenizerTrainOptions& opt);

class Tokenizer {
 public:
  // Loads a model file (InputError naming the file if it is missing or not a model trained by
  // train_tokenizer).
  explicit Tokenizer(const std::string& path);
  // From a model's bytes; `what` names it in messages.
  Tokenizer(const std::string& model_bytes, const std::string& what);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  const std::string& source() const { return source_; }
  int vocab_size() const { return vocab_size_; }
  uint64_t checksum() const { return checksum_; }
  int bos_id() const { return bos_id_; }
  int newline_id() const { return newline_id_; }

  std::vector<int32_t> encode(const std::string& text) const;  // no BOS added
  // InputError for an id outside [0, vocab_size). BOS/EOS decode to nothing.
  std::string decode(const std::vector<int32_t>& ids) const;

 private:
  void init(const std::string& model_bytes);
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string source_;
  int vocab_size_ = 0, bos_id_ = -1, newline_id_ = -1;
  uint64_t checksum_ = 0;
};

}  // namespace mta::data
