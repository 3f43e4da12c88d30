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
  // Returns the offset of the new view. Views start 16-float aligned (64 bytes, for vector loads),
  // except after a view added with `pack_next`: the next view then starts right after it, with no
  // padding, so that the two form one contiguous block (model.cpp packs wq|wk|wv and w1|w3 this way;
  // the GPU model multiplies each block as one matrix). A packed view keeps its own name and shape
  // (checkpoints store views by name), but may start unaligned when the previous view's size is not
  // a multiple of 16.
  size_t add(const std::string& name, std::vector<long long> shape, bool decay, bool pack_next = false);
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
