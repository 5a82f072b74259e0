// GpuLayerExecutor: a MoeModel's MoE layers on the GPU (expert-parallel GpuMoELayers), the rest of
// the model on the host (see runtime/model/layer_executor.h).
#pragma once

#include <map>
#include <memory>
#include <optional>

#include "comm/communicator.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/model/layer_executor.h"

namespace moex::cuda {

/// Runs each host MoELayer's passes on an expert-parallel GpuMoELayer of the same placement, created
/// at its first pass on the current CUDA device. Parameters (and the selection bias) are uploaded
/// at the first forward after parameters_changed(); activations travel host <-> device per pass;
/// gradients are downloaded after each backward and added to the host layer's (so the host model's
/// all-reduces and optimiser work unchanged); the route statistics of each forward (expert_tokens,
/// entries_processed, rows, picks dropped by the capacity factor; bytes_sent at the layer's element
/// size) and its auxiliary balance losses (computed on the GPU, their gradient added there in
/// backward) are recorded in the host layer. The schedule, capacity factor and replica layout are
/// each host layer's (with `--chunks auto` the GPU layer's own trials choose the schedule; a
/// migration to a new layout makes a new GPU layer at the next pass, which keeps that choice; the
/// host sums the replicas' gradients and moves the slots, as without the executor). Convenient rather than fast: every pass copies its
/// activations, every step its gradients and parameters, across PCIe.
class GpuLayerExecutor final : public LayerExecutor {
 public:
  /// `host_comm` / `device_comm` as for GpuMoELayer's expert-parallel constructor; both outlive this.
  /// Touches no CUDA device until the first pass.
  GpuLayerExecutor(comm::Communicator& host_comm, comm::Communicator& device_comm, GpuLayerOptions options = {});
  ~GpuLayerExecutor() override;

  /// ConfigError for what the GPU layer does not run: the deterministic mode with the hierarchical
  /// exchange, or a rank without a routed expert.
  void check(const MoELayer& layer) override;
  void forward(MoELayer& layer, const float* x, std::int64_t tokens, float* y) override;
  void backward(MoELayer& layer, const float* dy, float* dx) override;
  void parameters_changed(MoELayer& layer) override;

  /// The GPU twin of `layer` (null before its first pass).
  GpuMoELayer* gpu_layer(const MoELayer& layer);

 private:
  struct Twin {
    std::unique_ptr<GpuMoELayer> gpu;
    std::optional<sched::ReplicaLayout> layout;  // the host layer's when `gpu` was made
    bool dirty = true;
    DeviceBuffer<float> x, y;  // [capacity, H] (y is reused for dy, x keeps the forward's input)
    DeviceBuffer<float> dy;
    std::int64_t capacity = 0;
  };
  Twin& twin(MoELayer& layer);
  cudaStream_t stream();  // created at the first pass, so construction and check() need no device

  comm::Communicator& host_comm_;
  comm::Communicator& device_comm_;
  GpuLayerOptions options_;
  std::optional<Stream> stream_;
  std::map<const MoELayer*, Twin> twins_;
};

}  // namespace moex::cuda
