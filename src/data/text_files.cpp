#include "data/text_files.h"

#include <algorithm>
#include <filesystem>

#include "util/error.h"

namespace mta::data {

namespace fs = std::filesystem;

std::vector<TextDocument> list_text_documents(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw InputError(dir + ": not a folder (expected a corpus folder of *.txt files)");
  std::vector<TextDocument> docs;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (!it->is_regular_file() || it->path().extension() != ".txt") continue;
    const fs::path rel = fs::relative(it->path(), dir);
    TextDocument d;
    d.path = it->path().string();
    d.name = (rel.parent_path() / rel.stem()).generic_string();
    d.group = rel.has_parent_path() ? rel.begin()->string() : "all";
    docs.push_back(std::move(d));
  }
  if (ec) throw InputError(dir + ": cannot list (" + ec.message() + ")");
  if (docs.empty()) throw InputError(dir + ": no *.txt documents in this folder");
  std::sort(docs.begin(), docs.end(), [](const TextDocument& a, const TextDocument& b) { return a.name < b.name; });
  return docs;
}

}  // namespace mta::data
