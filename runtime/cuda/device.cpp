// CUDA device plumbing: device discovery, error messages, streams and cuBLAS handles.
#include "runtime/cuda/device.h"

#include <iomanip>
#include <sstream>

#include "comm/communicator.h"
#include "comm/op_checks.h"

namespace moex::cuda {

int cuda_device_count(std::string* reason) {
  try {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      static_cast<void>(cudaGetLastError());  // clear the (non-sticky) error for later calls
      if (reason) *reason = cudaGetErrorString(err);
      return 0;
    }
    if (count <= 0) {
      if (reason) *reason = "cudaGetDeviceCount reported 0 devices";
      return 0;
    }
    if (reason) reason->clear();
    return count;
  } catch (...) {  // e.g. std::bad_alloc while building the reason: still never throw
    return 0;
  }
}

std::chrono::milliseconds default_wait_timeout() { return comm::timeout_from_env(std::chrono::seconds(300)); }

void synchronize(cudaStream_t stream, const std::string& what, std::chrono::milliseconds timeout) {
  const auto start = std::chrono::steady_clock::now(), deadline = start + timeout;
  cudaEvent_t done = nullptr;
  MOEX_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  cudaError_t rc = cudaEventRecord(done, stream);
  comm::op_checks::Backoff backoff;
  while (rc == cudaSuccess) {
    rc = cudaEventQuery(done);
    if (rc != cudaErrorNotReady) break;
    rc = cudaSuccess;
    if (std::chrono::steady_clock::now() >= deadline) {
      static_cast<void>(cudaEventDestroy(done));
      std::ostringstream os;
      os << "waiting for the device (" << what << ") did not finish within " << std::fixed << std::setprecision(1)
         << std::chrono::duration<double>(timeout).count()
         << " s: queued work waits for an exchange a peer did not join, or the device stalled; raise MOEX_TIMEOUT_S "
            "or --timeout if the step is legitimately slower";
      throw TimeoutError(os.str());
    }
    backoff.pause();
  }
  static_cast<void>(cudaEventDestroy(done));
  if (rc != cudaSuccess) detail::throw_cuda_error(rc, ("waiting for the device: " + what).c_str(), __FILE__, __LINE__);
}

namespace detail {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  std::ostringstream os;
  os << call << " failed at " << file << ":" << line << ": " << cudaGetErrorName(err) << ": "
     << cudaGetErrorString(err);
  throw CudaError(os.str());
}

void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line) {
  std::ostringstream os;
  os << call << " failed at " << file << ":" << line << ": " << cublasGetStatusName(st) << ": "
     << cublasGetStatusString(st);
  throw CudaError(os.str());
}

}  // namespace detail

Stream::Stream() { MOEX_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }

Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    if (s_) static_cast<void>(cudaStreamDestroy(s_));
    s_ = std::exchange(o.s_, nullptr);
  }
  return *this;
}

Stream::~Stream() {
  if (s_) static_cast<void>(cudaStreamDestroy(s_));
}

void Stream::synchronize() const { cuda::synchronize(s_, "a stream of the layer"); }

CublasHandle::CublasHandle() {
  MOEX_CUBLAS_CHECK(cublasCreate(&h_));
  const cublasStatus_t st = cublasSetPointerMode(h_, CUBLAS_POINTER_MODE_HOST);
  if (st != CUBLAS_STATUS_SUCCESS) {
    static_cast<void>(cublasDestroy(h_));
    h_ = nullptr;
    MOEX_CUBLAS_CHECK(st);
  }
}

CublasHandle& CublasHandle::operator=(CublasHandle&& o) noexcept {
  if (this != &o) {
    if (h_) static_cast<void>(cublasDestroy(h_));
    h_ = std::exchange(o.h_, nullptr);
  }
  return *this;
}

CublasHandle::~CublasHandle() {
  if (h_) static_cast<void>(cublasDestroy(h_));
}

}  // namespace moex::cuda
