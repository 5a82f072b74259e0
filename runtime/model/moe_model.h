// MoeModel: a stack of DeepSeekMoE blocks, h <- h + MoE(RMSNorm(h)), forward and backward.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/model/layer_executor.h"
#include "runtime/moe_layer.h"

namespace moex {

/// Fills a layer with random parameters that are identical on every rank: gate and experts
/// N(0, 1/sqrt(fan_in)); each expert drawn from its own stream so a rank draws only its own.
/// A selection bias of zeros is created for noaux_tc (as DeepSeek-V3 has one).
void init_layer_random(MoELayer& layer, std::uint64_t seed, std::int64_t layer_index);

/// A skewed router for load-balancing experiments: sets the selection bias (created if absent) to
/// b_e = -0.1 * z * ln(1 + rank_e), where rank_e (0 = most favoured) is a shuffle of the experts drawn
/// from `seed`. Token counts then fall off with the favour rank roughly like a Zipf law of exponent
/// about z. Identical on every rank for the same seed. InvalidArgument unless z is finite and >= 0.
void apply_zipf_selection_bias(MoELayer& layer, double z, std::uint64_t seed);

/// L blocks of RMSNorm -> MoE -> residual over the ranks of `comm`. Collective like MoELayer.
class MoeModel {
 public:
  MoeModel(const MoeConfig& config, comm::Communicator& comm, const sched::ExpertPlacement& placement,
           const std::optional<sched::Topology>& topology = std::nullopt, const LayerOptions& options = {});
  /// Replica mode: every layer starts from `layout` (see MoELayer's replica-mode constructor).
  MoeModel(const MoeConfig& config, comm::Communicator& comm, const sched::ReplicaLayout& layout,
           const std::optional<sched::Topology>& topology = std::nullopt, const LayerOptions& options = {});

  void init_random(std::uint64_t seed);
  /// y [tokens, H] = model(x [tokens, H]); keeps activations for backward. `on_host`: the host
  /// layers even when an executor is set (the router evaluation reads their routing decisions).
  void forward(const float* x, std::int64_t tokens, float* y, bool on_host = false);
  /// From dL/dy of the last forward: accumulates every parameter gradient, then sums the replicated
  /// ones across ranks (and, in replica mode, each multi-replica expert's over its replicas), so after
  /// it every rank holds complete gradients for what it stores.
  void backward(const float* dy);
  void zero_grad();

  std::vector<std::unique_ptr<MoELayer>>& layers() { return layers_; }
  /// Runs every layer's passes through `executor` from now on (null: on this host again); checks
  /// each layer with it (ConfigError) and marks their parameters changed. Not owned.
  void set_executor(LayerExecutor* executor);
  LayerExecutor* executor() const { return executor_; }
  /// The parameters changed on the host (an optimiser step): tells the executor, if any.
  void parameters_changed();
  /// RMSNorm weights [L, H] (replicated).
  ParamBlock& norms() { return norms_; }
  /// Every trainable block of this rank (norms, each layer's replicated and expert blocks).
  std::vector<ParamBlock*> param_blocks();

 private:
  void init_buffers();
  MoeConfig config_;
  comm::Communicator& comm_;
  std::vector<std::unique_ptr<MoELayer>> layers_;
  LayerExecutor* executor_ = nullptr;
  ParamBlock norms_;
  std::int64_t tokens_ = 0;
  std::vector<std::vector<float>> h_;      // [L+1] block inputs (h_[L] = output)
  std::vector<std::vector<float>> normed_; // [L] RMSNorm outputs
  std::vector<std::vector<float>> rstd_;   // [L] 1/rms per token
  std::vector<float> moe_out_, dh_, dnormed_;
};

}  // namespace moex
