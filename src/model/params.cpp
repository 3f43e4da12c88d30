#include "model/params.h"

#include <stdexcept>

namespace mta {

size_t ParamLayout::add(const std::string& name, std::vector<long long> shape, bool decay, bool pack_next) {
  if (index_.count(name)) throw std::logic_error("duplicate parameter " + name);
  size_t n = 1;
  for (long long d : shape) n *= static_cast<size_t>(d);
  ParamView v{name, std::move(shape), total_, n, decay};
  index_[name] = views_.size();
  views_.push_back(v);
  total_ += n;
  // Keep the next view 16-float aligned (64 bytes) for vector loads, unless it is packed onto this one.
  if (!pack_next) total_ = (total_ + 15) / 16 * 16;
  return v.offset;
}

const ParamView& ParamLayout::view(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw std::out_of_range("no parameter named " + name);
  return views_[it->second];
}

}  // namespace mta
