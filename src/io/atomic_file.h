#pragma once
// Writing a whole file so that readers never see it half-written: the bytes go to a temporary file
// in the same folder, are flushed to disk (fsync), then renamed over the target.
#include <cstddef>
#include <string>

namespace mta::io {

// Throws std::runtime_error naming the path and the failed step; the temporary file is removed.
void write_file_atomic(const std::string& path, const void* data, size_t size);

// The whole file; InputError naming the path when it cannot be opened or read.
std::string read_file(const std::string& path, const std::string& what);

}  // namespace mta::io
