// CUDA device plumbing of the GPU path: device discovery, error checks, RAII device memory, streams
// and cuBLAS handles. Plain C++ (no device code): usable from .cpp and .cu files alike.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "base/error.h"

namespace moex::cuda {

/// Number of usable CUDA devices. Never throws: with no driver, no device or any other failure it
/// returns 0 and, when `reason` is not null, stores why: cudaGetErrorString of cudaGetDeviceCount's
/// result (e.g. "no CUDA-capable device is detected"), or "cudaGetDeviceCount reported 0 devices".
/// With devices it clears `reason`. Typical skip: "no CUDA device: " + reason.
int cuda_device_count(std::string* reason = nullptr);

namespace detail {
/// Throws CudaError "<call> failed at <file>:<line>: <cudaGetErrorName>: <cudaGetErrorString>".
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
/// Throws CudaError "<call> failed at <file>:<line>: <cublasGetStatusName>: <cublasGetStatusString>".
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line);
}  // namespace detail

}  // namespace moex::cuda

/// Evaluates a CUDA runtime call; on any result but cudaSuccess throws moex::CudaError naming the
/// call, file:line and CUDA's error string.
#define MOEX_CUDA_CHECK(expr)                                                               \
  do {                                                                                      \
    const cudaError_t moex_cuda_err_ = (expr);                                              \
    if (moex_cuda_err_ != cudaSuccess)                                                      \
      ::moex::cuda::detail::throw_cuda_error(moex_cuda_err_, #expr, __FILE__, __LINE__);    \
  } while (0)

/// Evaluates a cuBLAS call; on any status but CUBLAS_STATUS_SUCCESS throws moex::CudaError naming
/// the call, file:line and cuBLAS's status string.
#define MOEX_CUBLAS_CHECK(expr)                                                             \
  do {                                                                                      \
    const cublasStatus_t moex_cublas_st_ = (expr);                                          \
    if (moex_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                           \
      ::moex::cuda::detail::throw_cublas_error(moex_cublas_st_, #expr, __FILE__, __LINE__); \
  } while (0)

/// After a kernel launch: throws moex::CudaError for a launch failure (bad configuration, no device),
/// naming the kernel (`kernel_name`, a string literal) and file:line. Does not synchronise, so
/// faults inside the kernel surface at a later check.
#define MOEX_CUDA_CHECK_LAUNCH(kernel_name)                                                            \
  do {                                                                                                \
    const cudaError_t moex_cuda_err_ = cudaGetLastError();                                            \
    if (moex_cuda_err_ != cudaSuccess)                                                                \
      ::moex::cuda::detail::throw_cuda_error(moex_cuda_err_, "launch of " kernel_name, __FILE__, __LINE__); \
  } while (0)

namespace moex::cuda {

/// The host's deadline for waits on the device: MOEX_TIMEOUT_S, else 300 s (a communicator's
/// default_timeout() where one is at hand).
std::chrono::milliseconds default_wait_timeout();

/// Waits on the host until `stream` has run the work queued on it so far, polling (never a blocking
/// cudaStreamSynchronize: the stream may wait for an exchange a peer never joins) until `timeout`
/// from now; TimeoutError naming `what` after it, CudaError on a device fault.
void synchronize(cudaStream_t stream, const std::string& what,
                 std::chrono::milliseconds timeout = default_wait_timeout());

/// Device memory for `size()` elements of T, owned (move-only). Allocated with cudaMallocAsync on
/// the stream given at construction and released with cudaFreeAsync on that same stream, so it is
/// ordered after the work queued there; a buffer used on several streams must be released only once
/// they are done (synchronise, or keep it alive). Contents are uninitialised.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  /// `count` elements on `stream` (0 elements allocates nothing; data() is then null).
  explicit DeviceBuffer(std::size_t count, cudaStream_t stream = nullptr) : size_(count), stream_(stream) {
    if (count > 0) {
      void* p = nullptr;
      MOEX_CUDA_CHECK(cudaMallocAsync(&p, count * sizeof(T), stream));
      data_ = static_cast<T*>(p);
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), stream_(o.stream_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      stream_ = o.stream_;
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  /// The device pointer (null when empty).
  T* data() { return data_; }
  const T* data() const { return data_; }
  /// Elements (not bytes).
  std::size_t size() const { return size_; }
  /// size() * sizeof(T).
  std::size_t bytes() const { return size_ * sizeof(T); }
  bool empty() const { return size_ == 0; }
  /// The stream the buffer was allocated on (and will be freed on).
  cudaStream_t stream() const { return stream_; }
  /// Frees the memory now (stream-ordered); the buffer is then empty.
  void reset() { release(); }

 private:
  void release() noexcept {
    // A destructor must not throw: a failing free (e.g. a context already torn down) is ignored.
    if (data_) static_cast<void>(cudaFreeAsync(data_, stream_));
    data_ = nullptr;
    size_ = 0;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
  cudaStream_t stream_ = nullptr;
};

/// Copies `count` elements host -> device, asynchronously on `stream`. A pageable `src` may be
/// reused as soon as this returns (CUDA stages it); pinned memory must stay untouched until the
/// stream reaches the copy.
template <typename T>
void copy_to_device(T* dst, const T* src, std::size_t count, cudaStream_t stream) {
  if (count > 0) MOEX_CUDA_CHECK(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyHostToDevice, stream));
}
/// Copies `count` elements device -> host on `stream` and waits for the stream (so `dst` is ready).
template <typename T>
void copy_to_host(T* dst, const T* src, std::size_t count, cudaStream_t stream) {
  if (count > 0) MOEX_CUDA_CHECK(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyDeviceToHost, stream));
  synchronize(stream, "copy to the host");
}
/// A new device buffer holding a copy of `host` (asynchronous on `stream`).
template <typename T>
DeviceBuffer<T> to_device(std::span<const T> host, cudaStream_t stream = nullptr) {
  DeviceBuffer<T> d(host.size(), stream);
  copy_to_device(d.data(), host.data(), host.size(), stream);
  return d;
}
template <typename T>
DeviceBuffer<T> to_device(const std::vector<T>& host, cudaStream_t stream = nullptr) {
  return to_device(std::span<const T>(host), stream);
}
/// The first `count` elements of `d` (all when count is -1) copied to the host; synchronises `stream`.
template <typename T>
std::vector<T> to_host(const DeviceBuffer<T>& d, cudaStream_t stream = nullptr, std::int64_t count = -1) {
  const std::size_t n = count < 0 ? d.size() : static_cast<std::size_t>(count);
  if (n > d.size())
    throw InvalidArgument("to_host: asked for " + std::to_string(n) + " elements of a device buffer of " +
                          std::to_string(d.size()));
  std::vector<T> h(n);
  copy_to_host(h.data(), d.data(), n, stream);
  return h;
}

/// An owned, non-blocking CUDA stream (move-only).
class Stream {
 public:
  /// Creates the stream on the current device (CudaError without a usable device).
  Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&& o) noexcept;
  ~Stream();
  cudaStream_t get() const { return s_; }
  operator cudaStream_t() const { return s_; }  // NOLINT: a Stream is used where a cudaStream_t is
  /// Waits until every operation queued on the stream has finished (CudaError on a failed one).
  void synchronize() const;

 private:
  cudaStream_t s_ = nullptr;
};

/// An owned cuBLAS handle (move-only) in host pointer mode. The kernels set its stream per call.
class CublasHandle {
 public:
  /// Creates the handle on the current device (CudaError without a usable device).
  CublasHandle();
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  CublasHandle(CublasHandle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  CublasHandle& operator=(CublasHandle&& o) noexcept;
  ~CublasHandle();
  cublasHandle_t get() const { return h_; }
  operator cublasHandle_t() const { return h_; }  // NOLINT: used where a cublasHandle_t is

 private:
  cublasHandle_t h_ = nullptr;
};

}  // namespace moex::cuda
