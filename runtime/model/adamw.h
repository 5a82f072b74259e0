// AdamW optimiser over flat parameter blocks.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "runtime/moe_layer.h"

namespace moex {

/// AdamW hyper-parameters (decoupled weight decay, Loshchilov & Hutter).
struct AdamWOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
};

/// AdamW over a fixed list of ParamBlocks; keeps first and second moments per element.
class AdamW {
 public:
  explicit AdamW(AdamWOptions options) : options_(options) {}
  /// Registers a block (before the first step). The block must outlive the optimiser.
  void add(ParamBlock* block);
  /// One update of every registered block from its grad.
  void step();
  std::int64_t steps() const { return step_; }
  /// Restores the step count (a checkpoint's; the bias corrections depend on it). InvalidArgument if < 0.
  void set_steps(std::int64_t steps);
  /// The first and second moments of a registered block (same size as its values; moving a block's
  /// parameters, e.g. migrating expert replicas, must move these along). InvalidArgument when the
  /// block is not registered.
  std::array<std::vector<float>*, 2> moments(const ParamBlock* block);
  const AdamWOptions& options() const { return options_; }

 private:
  struct State {
    ParamBlock* block;
    std::vector<float> m, v;
  };
  AdamWOptions options_;
  std::vector<State> states_;
  std::int64_t step_ = 0;
};

}  // namespace moex
