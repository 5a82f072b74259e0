// GpuMoELayer's stage profile (see stage_profile.h).
#include "runtime/cuda/stage_profile.h"

#include <chrono>

#include "runtime/cuda/device.h"
#include "runtime/trace.h"

namespace moex::cuda {
namespace {
using namespace layer;  // NOLINT: the marks
/// The stages the marks delimit: name, marks, pass, whether on the shared-expert stream, and their
/// GpuLayerTimes field.
struct MarkedStage {
  const char* name;
  int from, to;
  bool backward, shared;
  double GpuLayerTimes::*field;
};
constexpr MarkedStage kMarkedStages[] = {
    {"gate", kFG, kF1, false, false, &GpuLayerTimes::fwd_gate},
    {"permute", kF1, kF2, false, false, &GpuLayerTimes::fwd_permute},
    {"experts", kF2, kF3, false, false, &GpuLayerTimes::fwd_experts},
    {"combine", kF3, kF4, false, false, &GpuLayerTimes::fwd_combine},
    {"shared experts", kFS0, kFS1, false, true, &GpuLayerTimes::fwd_shared},
    {"permute", kBP, kB1, true, false, &GpuLayerTimes::bwd_permute},
    {"experts", kB1, kB2, true, false, &GpuLayerTimes::bwd_experts},
    {"combine", kB2, kB3, true, false, &GpuLayerTimes::bwd_combine},
    {"gate", kB3, kB4, true, false, &GpuLayerTimes::bwd_gate},
    {"shared experts", kBS0, kBS1, true, true, &GpuLayerTimes::bwd_shared},
};
}  // namespace

StageProfile::StageProfile() {
  try {
    for (cudaEvent_t& e : marks_) MOEX_CUDA_CHECK(cudaEventCreate(&e));
    MOEX_CUDA_CHECK(cudaEventCreate(&ref_));
  } catch (...) {
    destroy();
    throw;
  }
}

StageProfile::~StageProfile() { destroy(); }

void StageProfile::destroy() {
  if (ref_) static_cast<void>(cudaEventDestroy(ref_));
  for (cudaEvent_t e : marks_)
    if (e) static_cast<void>(cudaEventDestroy(e));
}

void StageProfile::mark(Mark m, cudaStream_t stream) { MOEX_CUDA_CHECK(cudaEventRecord(marks_[m], stream)); }

void StageProfile::begin(bool backward) {
  if (backward) bwd_ = bwd_shared_ = false;
  else fwd_ = fwd_shared_ = false;
}

void StageProfile::end(bool backward, bool on_shared) {
  bool& flag = backward ? (on_shared ? bwd_shared_ : bwd_) : (on_shared ? fwd_shared_ : fwd_);
  flag = true;
}

void StageProfile::clear() { fwd_ = fwd_shared_ = bwd_ = bwd_shared_ = false; }

GpuLayerTimes StageProfile::times() const {
  GpuLayerTimes t;
  auto ms = [&](int from, int to) {
    MOEX_CUDA_CHECK(cudaEventSynchronize(marks_[to]));
    float v = 0.0f;
    MOEX_CUDA_CHECK(cudaEventElapsedTime(&v, marks_[from], marks_[to]));
    return static_cast<double>(v);
  };
  if (fwd_) t.fwd_total = ms(kF0, kF4);
  if (bwd_) t.bwd_total = ms(kB0, kB4);
  for (const MarkedStage& st : kMarkedStages)
    if (marked(st.backward, st.shared)) t.*st.field = ms(st.from, st.to);
  return t;
}

void StageProfile::trace(cudaStream_t stream) {
  MOEX_CUDA_CHECK(cudaEventRecord(ref_, stream));
  MOEX_CUDA_CHECK(cudaEventSynchronize(ref_));
  const auto host_ref = trace::Clock::now();
  auto at = [&](int m) {  // every mark lies the elapsed time before the reference
    float v = 0.0f;
    MOEX_CUDA_CHECK(cudaEventElapsedTime(&v, marks_[m], ref_));
    return host_ref - std::chrono::duration_cast<trace::Clock::duration>(std::chrono::duration<double, std::milli>(v));
  };
  for (const MarkedStage& st : kMarkedStages)
    if (marked(st.backward, st.shared))
      trace::span_on(st.shared ? "cuda shared-expert stream" : "cuda stream", st.name, at(st.from), at(st.to),
                     st.backward ? "backward" : "forward");
}

}  // namespace moex::cuda
