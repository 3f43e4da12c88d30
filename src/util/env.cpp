// See env.h.
#include "util/env.h"

#include <cstdlib>
#include <string>

#include "util/error.h"

namespace mta {

std::optional<bool> env_switch(const char* name) {
  const char* e = std::getenv(name);
  if (e == nullptr || e[0] == '\0') return std::nullopt;
  const std::string v = e;
  if (v == "0") return false;
  if (v == "1") return true;
  throw InputError(std::string(name) + " must be 0 or 1 (got '" + v + "')");
}

}  // namespace mta
