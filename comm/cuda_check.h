// CUDA error checks and a device guard for the GPU communicators (comm/nccl, comm/staged). comm/
// cannot use runtime/cuda/device.h (runtime depends on comm, not the other way round).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "base/error.h"

namespace moex::comm::cuda {

/// Throws CudaError naming the call, the site and CUDA's error name and text.
inline void check(cudaError_t code, const char* call, const char* file, int line) {
  if (code == cudaSuccess) return;
  throw CudaError(std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " +
                  cudaGetErrorName(code) + ": " + cudaGetErrorString(code));
}

/// Makes `device` current for one scope and restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != device) {
      check(cudaSetDevice(device), "cudaSetDevice(device)", __FILE__, __LINE__);
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace moex::comm::cuda

#define MOEX_COMM_CUDA_CHECK(call) ::moex::comm::cuda::check((call), #call, __FILE__, __LINE__)
