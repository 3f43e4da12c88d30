#pragma once
// All parameters of a model in one contiguous buffer with named views (and the same layout for
// gradients and optimizer moments), as llm.c does: one allocation, one optimizer loop, one file.
#include <map>
#include <string>
#include <vector>

namespace mta {

struct ParamView {
  std::string name;
  std::vector<long long> shape;
  size_t offset = 0;  // in floats, into the buffer
  size_t size = 0;
  bool decay = false;  // weight decay applies (matrices only)
};

class ParamLayout {
 public:
  // Returns the offset of the new view.
  size_t add(const std::string& name, std::vector<long long> shape, bool decay);
  const std::vector<ParamView>& views() const { return views_; }
  const ParamView& view(const std::string& name) const;  // std::out_of_range names the view
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  size_t total() const { return total_; }

 private:
  std::vector<ParamView> views_;
  std::map<std::string, size_t> index_;
  size_t total_ = 0;
};

}  // namespace mta
