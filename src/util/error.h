#pragma once
// Error types shared by the library and the CLI.
//
// InputError: the user gave something that does not fit (a spec, a config, a file, a tensor shape, a
// NaN). The CLI prints its message as one line and exits with status 2. Any other exception is an
// internal or environment failure (disk full, ...) and exits with status 1.
#include <stdexcept>
#include <string>

namespace mta {

class InputError : public std::runtime_error {
 public:
  explicit InputError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace mta
