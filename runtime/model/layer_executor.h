// LayerExecutor: runs MoELayer passes somewhere else (e.g. on a GPU) for a MoeModel / Trainer.
#pragma once

#include <cstdint>

namespace moex {

class MoELayer;

/// Runs the forward and backward passes of the MoELayers of a model on other hardware, while the
/// model's own parts (norms, residuals, loss, optimiser) stay on the host. The host MoELayer stays the
/// owner of the parameters, their gradients and the routing statistics:
///   - forward(layer, ...) computes what layer.forward would (host pointers in and out) with the
///     layer's current parameters, and records the pass's statistics in the layer
///     (MoELayer::set_route_stats);
///   - backward(layer, ...) writes dx and ADDS the pass's gradients to layer.replicated().grad (this
///     rank's share, before any all-reduce, as MoELayer::backward does) and layer.experts().grad;
///   - parameters_changed(layer) says the layer's parameters or selection bias changed on the host
///     (after an optimiser step): the next forward must use the new values.
/// Every call is a collective where the layer's are (same order on every rank).
class LayerExecutor {
 public:
  virtual ~LayerExecutor() = default;
  /// Throws ConfigError when the executor cannot run `layer` (a schedule or mode it does not support).
  virtual void check(const MoELayer& layer) = 0;
  virtual void forward(MoELayer& layer, const float* x, std::int64_t tokens, float* y) = 0;
  virtual void backward(MoELayer& layer, const float* dy, float* dx) = 0;
  virtual void parameters_changed(MoELayer& layer) = 0;
};

}  // namespace moex
