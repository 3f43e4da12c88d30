#pragma once
// A corpus folder encoded into one shard (what `mta tokenize` writes): every document, in path
// order, as BOS followed by its tokens; the document table keeps names and groups for per-group
// evaluation.
#include <string>
#include <vector>

#include "data/shard.h"
#include "data/text_files.h"
#include "data/tokenizer.h"

namespace mta::data {

// Documents are encoded in parallel (OpenMP); the result does not depend on the thread count.
// text_bytes (optional) receives the total size of the documents.
Shard encode_documents(const Tokenizer& tok, const std::vector<TextDocument>& docs, size_t* text_bytes = nullptr);

}  // namespace mta::data
