#pragma once
// Error checking for the CUDA code: every CUDA runtime call and every kernel launch goes through
// check_cuda; a failure throws std::runtime_error naming the file, the line, the call and the reason.
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace mta::cuda {

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": CUDA error in " + what + ": " +
                             cudaGetErrorString(err));
}

}  // namespace mta::cuda

#define MTA_CUDA_CHECK(expr) ::mta::cuda::check_cuda((expr), #expr, __FILE__, __LINE__)
#define MTA_CUDA_CHECK_LAUNCH(name) ::mta::cuda::check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
