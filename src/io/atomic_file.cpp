#include "io/atomic_file.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "util/error.h"

namespace mta::io {

void write_file_atomic(const std::string& path, const void* data, size_t size) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  auto fail = [&](const char* step, int err, FILE* f) {
    if (f) std::fclose(f);
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot write (" + step + " " + tmp + "): " + std::strerror(err));
  };
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail("open", errno, nullptr);
  if (size > 0 && std::fwrite(data, 1, size, f) != size) fail("write", errno, f);
  if (std::fflush(f) != 0) fail("flush", errno, f);
  // fsync before rename: otherwise a crash can leave the new name pointing at unwritten blocks.
  if (::fsync(::fileno(f)) != 0) fail("fsync", errno, f);
  if (std::fclose(f) != 0) fail("close", errno, nullptr);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("rename", errno, nullptr);
}

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot open " + what + " (" + std::strerror(errno) + ")");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw InputError(path + ": cannot read " + what);
  return ss.str();
}

}  // namespace mta::io
