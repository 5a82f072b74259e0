// StageProfile: CUDA events at the stage boundaries of a GpuMoELayer's passes, read back as stage
// times (GpuLayerTimes) or as spans on the trace timeline. Internal to the GPU layer.
#pragma once

#include <cuda_runtime_api.h>

namespace moex::cuda {

/// Device milliseconds of the stages of the last profiled forward and backward (zeros when
/// profiling is off). Stages on the caller's stream are consecutive; `*_shared` ran on the second
/// stream beside them (with overlap_shared), so the totals are not sums. Each combine stage includes
/// the wait for the shared experts and the fp32 conversion of its output in bf16 mode.
struct GpuLayerTimes {
  double fwd_total = 0, fwd_gate = 0, fwd_permute = 0, fwd_experts = 0, fwd_combine = 0, fwd_shared = 0;
  double bwd_total = 0, bwd_permute = 0, bwd_experts = 0, bwd_combine = 0, bwd_gate = 0, bwd_shared = 0;
};

namespace layer {
/// The stage boundaries: events on the caller's stream, except *_S*: the shared experts' stream.
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
}  // namespace layer

/// One event per Mark. A pass clears its flags when it starts (begin) and sets them once it has
/// recorded all its marks (end, once for the caller's stream and once for the shared experts'), so
/// times() and trace() read only the stages of complete passes.
class StageProfile {
 public:
  StageProfile();  ///< CudaError without a usable device
  ~StageProfile();
  StageProfile(const StageProfile&) = delete;
  StageProfile& operator=(const StageProfile&) = delete;

  void mark(layer::Mark m, cudaStream_t stream);
  void begin(bool backward);
  void end(bool backward, bool on_shared);
  void clear();  ///< nothing recorded (profiling switched on or off)
  /// The stage times of the last complete forward and backward; synchronises their events.
  GpuLayerTimes times() const;
  /// Tracing: the last forward's and backward's stages as spans on the "cuda stream" tracks. A
  /// reference event after them, waited for on the host, pins device time to host time.
  void trace(cudaStream_t stream);

 private:
  bool marked(bool backward, bool on_shared) const {
    return backward ? bwd_ && (!on_shared || bwd_shared_) : fwd_ && (!on_shared || fwd_shared_);
  }
  void destroy();
  cudaEvent_t marks_[layer::kMarks] = {};
  cudaEvent_t ref_ = nullptr;
  bool fwd_ = false, fwd_shared_ = false, bwd_ = false, bwd_shared_ = false;
};

}  // namespace moex::cuda
