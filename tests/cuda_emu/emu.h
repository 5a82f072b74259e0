// moex's CUDA emulator: runs the GPU path's own code (kernels, cuBLAS calls, streams and events) on
// the CPU, so that the CUDA tests exercise it on machines without a GPU. Test infrastructure only:
// it stands in for libcudart, libcublas and libnccl at link time (cudart.cpp, cublas.cpp, nccl.cpp
// define their C functions against the real headers) and for nvcc's device side
// (device_prelude.h, which the .cu files are compiled with as plain C++).
//
// What it models, and so can catch:
//   - Stream order, lazily: an operation runs only when something the host waits on needs it
//     (cudaStreamSynchronize, cudaEventSynchronize/Query, a copy to pageable memory, ...). A host
//     read of device results without a wait, or a stream that consumes another stream's output
//     without cudaStreamWaitEvent, therefore sees stale data and fails its test.
//   - Device memory: allocations are filled with 0xFF bytes (NaN as floats), so reads of
//     uninitialised memory show; copies, memsets and cuBLAS operands are bounds-checked against
//     their allocation; explicit copy kinds must match the pointers.
//   - Kernels: every thread is a fiber; __syncthreads, __syncwarp and the __shfl_*_sync family are
//     real barriers, a shuffle or __syncwarp whose mask names an exited or missing lane is an error,
//     launch configurations are validated, and a deadlock is reported instead of hanging.
//   - cuBLAS: column-major GEMM with cuBLAS's argument rules (leading dimensions, supported type
//     combinations), fp32 accumulation, beta == 0 not reading C.
//   - NCCL: over MPI point-to-point messages (nccl.cpp).
// What it does not model: timing, real concurrency between streams, the device memory model beyond
// barriers. A kernel error (deadlock, bad mask) is sticky, like a device fault: it is printed
// to stderr once and every later synchronising call returns cudaErrorLaunchFailure.
#pragma once

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace moex_emu {

// ------------------------------------------------------------------------------------------------
// Device side: the running thread's built-in variables and barriers (engine.cpp).

struct ThreadState {
  uint3 thread_idx;
  int linear = 0;  ///< x + y * bdx + z * bdx * bdy: the lane is linear % 32
};
struct BlockState {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dynamic_smem = nullptr;
};

extern ThreadState* g_thread;
extern BlockState g_block;

inline const uint3& thread_idx() { return g_thread->thread_idx; }
inline const uint3& block_idx() { return g_block.block_idx; }
inline const dim3& block_dim() { return g_block.block_dim; }
inline const dim3& grid_dim() { return g_block.grid_dim; }
inline unsigned char* dynamic_smem() { return g_block.dynamic_smem; }

/// __syncthreads: waits for every thread of the block that has not exited.
void sync_block();
/// __syncwarp(mask): waits for the lanes of `mask`; each must exist and not have exited.
void sync_warp(unsigned mask);

enum class ShuffleKind { kIndex, kUp, kDown, kXor };
/// The 8-byte payload of lane `source lane` (per `kind` and `arg`, within segments of `width`).
std::uint64_t shuffle(unsigned mask, std::uint64_t value, ShuffleKind kind, int arg, int width);

template <typename T>
T shuffle_as(unsigned mask, T value, ShuffleKind kind, int arg, int width) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t) && std::is_trivially_copyable_v<T>);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(mask, bits, kind, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ------------------------------------------------------------------------------------------------
// Host side: kernel launches (MOEX_LAUNCH in runtime/cuda/launch.h expands to launcher(...)(args)).

/// Validates the configuration (sets cudaGetLastError's error when it is bad) and queues `body`
/// (one thread's run of the kernel) for every thread of the grid on `stream`.
void launch(const char* name, dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
            std::function<void()> body);

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  std::size_t smem;
  cudaStream_t stream;

  /// Converts the arguments to the kernel's parameter types now (as a launch does) and queues it.
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    std::tuple<std::decay_t<P>...> bound(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
    auto* fn = kernel;
    launch(name, grid, block, smem, stream, [fn, bound]() { std::apply(fn, bound); });
  }
};

template <typename... P>
Launcher<P...> launcher(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, std::size_t smem,
                        cudaStream_t stream) {
  return Launcher<P...>{kernel, name, grid, block, smem, stream};
}

// ------------------------------------------------------------------------------------------------
// Shared by cudart.cpp and cublas.cpp.

/// Queues `op` on `stream` (null: the legacy default stream, with its implicit synchronisation).
void enqueue(cudaStream_t stream, std::string what, std::function<void()> op);
/// Queues an op that may take several polls (an NCCL transfer): it returns true once done. Later ops
/// of the stream wait for it; a query (cudaEventQuery, cudaStreamQuery) reports cudaErrorNotReady
/// meanwhile and a synchronisation keeps polling.
void enqueue_polled(cudaStream_t stream, std::string what, std::function<bool()> op);
/// Runs what is queued on `stream` as far as it can without waiting; true when all of it is done.
bool drain(cudaStream_t stream);
/// Records an emulator error (kernel fault, bad cuBLAS operand found at run time): printed once, and
/// sticky from then on.
void fault(const std::string& message);
/// What cudaGetLastError returns next (a bad launch configuration, a bad argument).
void set_last_error(cudaError_t error);
/// Whether [p, p + bytes) lies inside one live device allocation. `*is_device` tells whether `p`
/// is in one at all; `*why` (may be null) explains a range that runs past its allocation's end.
bool device_range_ok(const void* p, std::size_t bytes, bool* is_device, std::string* why);
/// The API lock: the emulator is used from one process's threads one call at a time.
std::recursive_mutex& api_mutex();

}  // namespace moex_emu
