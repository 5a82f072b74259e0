// Helpers shared by the sources of GpuMoELayer (gpu_layer.cu, gpu_layer_ep.cu): dtype dispatch,
// typed views of byte buffers, workspace (re)allocation, the profile marks and the layer's CUDA
// events. Internal.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/cuda/grouped_gemm.h"
#include "runtime/cuda/kernels.h"

namespace moex::cuda::layer {

using std::int64_t;

/// Calls f(Tag<float>{}) or f(Tag<bf16>{}) for the element type of `d`.
template <typename T>
struct Tag {
  using type = T;
};
template <typename F>
void with_type(DType d, F&& f) {
  if (d == DType::kFp32)
    f(Tag<float>{});
  else
    f(Tag<bf16>{});
}

template <typename T>
T* as(DeviceBuffer<unsigned char>& b) {
  return reinterpret_cast<T*>(b.data());
}
/// (Re)allocates `b` for `count` elements on `stream` (the old memory is freed first).
template <typename T>
void realloc_typed(DeviceBuffer<T>& b, int64_t count, cudaStream_t stream) {
  b = DeviceBuffer<T>();
  b = DeviceBuffer<T>(static_cast<std::size_t>(count), stream);
}
/// The same for `count` elements of `es` bytes.
inline void realloc_bytes(DeviceBuffer<unsigned char>& b, int64_t count, std::size_t es, cudaStream_t stream) {
  realloc_typed(b, count * static_cast<int64_t>(es), stream);
}
/// Grows `b` to hold at least `need` elements (a quarter more, so that small variations do not
/// reallocate every pass); true when it reallocated.
template <typename T>
bool grow(DeviceBuffer<T>& b, int64_t need, cudaStream_t s) {
  if (need <= static_cast<int64_t>(b.size())) return false;
  realloc_typed(b, need + need / 4, s);
  return true;
}

// Profile marks (events on the caller's stream unless named *_S*: the shared experts' stream).
enum Mark : int {
  kF0,   // forward start
  kFG,   // gate start
  kF1,   // routed (gate, counting sort, counts copy queued)
  kF2,   // gathered
  kF3,   // experts done
  kF4,   // forward end
  kFS0,  // shared forward start
  kFS1,  // shared forward end
  kB0,   // backward start
  kBP,   // routing-weight gradients start
  kB1,   // permuted (d_weights, weighted dy rows)
  kB2,   // experts done
  kB3,   // combined (dx rows back per token)
  kB4,   // backward end (gate backward done)
  kBS0,  // shared backward start
  kBS1,  // shared backward end
  kMarks
};

}  // namespace moex::cuda::layer

namespace moex::cuda {

struct GpuMoELayer::Events {
  cudaEvent_t input = nullptr;   // caller's stream: the inputs of the shared experts are ready
  cudaEvent_t shared = nullptr;  // second stream: the shared experts are done
  cudaEvent_t counts = nullptr;  // caller's stream: the expert counts reached the host
  cudaEvent_t last = nullptr;    // caller's stream: end of the last pass
  cudaEvent_t ref = nullptr;     // tracing: after a backward, pins device time to host time
  cudaEvent_t marks[layer::kMarks] = {};
  bool fwd_marked = false, fwd_shared_marked = false, bwd_marked = false, bwd_shared_marked = false;
  /// Whether the last forward (backward) recorded its marks, and those of the shared experts.
  bool marked(bool backward, bool on_shared) const {
    return backward ? bwd_marked && (!on_shared || bwd_shared_marked) : fwd_marked && (!on_shared || fwd_shared_marked);
  }

  Events() {
    for (cudaEvent_t* e : {&input, &shared, &counts, &last})
      MOEX_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
    for (cudaEvent_t& e : marks) MOEX_CUDA_CHECK(cudaEventCreate(&e));
    MOEX_CUDA_CHECK(cudaEventCreate(&ref));
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  ~Events() {
    for (cudaEvent_t e : {input, shared, counts, last})
      if (e) static_cast<void>(cudaEventDestroy(e));
    for (cudaEvent_t e : marks)
      if (e) static_cast<void>(cudaEventDestroy(e));
    if (ref) static_cast<void>(cudaEventDestroy(ref));
  }
};

}  // namespace moex::cuda
