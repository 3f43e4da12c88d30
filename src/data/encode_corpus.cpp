#include "data/encode_corpus.h"

#include <algorithm>

#include "io/atomic_file.h"
#include "util/error.h"

namespace mta::data {

Shard encode_documents(const Tokenizer& tok, const std::vector<TextDocument>& docs, size_t* text_bytes) {
  std::vector<std::vector<int32_t>> ids(docs.size());
  std::vector<std::string> errors(docs.size());
  size_t bytes = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : bytes)
  for (size_t i = 0; i < docs.size(); ++i) {
    try {
      const std::string text = io::read_file(docs[i].path, "document");
      bytes += text.size();
      ids[i].push_back(tok.bos_id());  // documents are told apart by a leading BOS
      const std::vector<int32_t> t = tok.encode(text);
      ids[i].insert(ids[i].end(), t.begin(), t.end());
    } catch (const std::exception& e) {
      errors[i] = e.what();  // thrown below: exceptions must not leave the parallel region
    }
  }
  for (const std::string& e : errors)
    if (!e.empty()) throw InputError(e);

  Shard shard;
  shard.vocab_size = tok.vocab_size();
  shard.tokenizer_checksum = tok.checksum();
  for (size_t i = 0; i < docs.size(); ++i) {
    auto g = std::find(shard.groups.begin(), shard.groups.end(), docs[i].group);
    if (g == shard.groups.end()) g = shard.groups.insert(g, docs[i].group);
    shard.docs.push_back({shard.tokens.size(), ids[i].size(), static_cast<int>(g - shard.groups.begin()), docs[i].name});
    shard.tokens.insert(shard.tokens.end(), ids[i].begin(), ids[i].end());
    std::vector<int32_t>().swap(ids[i]);
  }
  if (text_bytes) *text_bytes = bytes;
  return shard;
}

}  // namespace mta::data
