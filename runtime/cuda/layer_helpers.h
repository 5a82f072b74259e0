// Helpers shared by the sources of GpuMoELayer (gpu_layer.cu, gpu_layer_ep.cu): dtype dispatch,
// typed views of byte buffers, workspace (re)allocation and the layer's CUDA events. Internal.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/cuda/grouped_gemm.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/stage_profile.h"

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

}  // namespace moex::cuda::layer

namespace moex::cuda {

struct GpuMoELayer::Events {
  cudaEvent_t input = nullptr;   // caller's stream: the inputs of the shared experts are ready
  cudaEvent_t shared = nullptr;  // second stream: the shared experts are done
  cudaEvent_t counts = nullptr;  // caller's stream: the expert counts reached the host
  cudaEvent_t last = nullptr;    // caller's stream: end of the last pass
  StageProfile profile;          // the stage marks (GpuLayerOptions::profile, tracing)

  Events() {
    for (cudaEvent_t* e : {&input, &shared, &counts, &last})
      MOEX_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  ~Events() {
    for (cudaEvent_t e : {input, shared, counts, last})
      if (e) static_cast<void>(cudaEventDestroy(e));
  }
};

}  // namespace moex::cuda
