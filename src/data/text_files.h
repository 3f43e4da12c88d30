#pragma once
// The documents of a corpus folder (what scripts/make-corpus.sh writes): every *.txt file under it,
// one document per file, its group the first folder below the root (DIR/<group>/<name>.txt; files
// directly in DIR have the group "all"). Sorted by path, so every command sees the same order.
#include <string>
#include <vector>

namespace mta::data {

struct TextDocument {
  std::string path;   // as found under the root
  std::string group;  // "fiction", ...
  std::string name;   // path relative to the root without ".txt", e.g. "fiction/moby-dick"
};

// InputError when `dir` is not a folder or holds no *.txt file.
std::vector<TextDocument> list_text_documents(const std::string& dir);

}  // namespace mta::data
