// Trainer: teacher-student expert estimation with AdamW across the ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "runtime/adamw.h"
#include "runtime/moe_model.h"

namespace moex {

/// Settings of one training run.
struct TrainOptions {
  LayerOptions layer{};  ///< chunks, overlap, flat or hierarchical exchange (results do not change)
  std::int64_t steps = 200;
  std::int64_t tokens_per_rank = 256;
  std::uint64_t seed = 1;
  AdamWOptions adam{};
  /// Aux-loss-free balancing (DeepSeek-V3): after each optimiser step every student layer updates
  /// its selection bias b_e += gamma * sign(mean_load - load_e) from the global per-expert load of
  /// that step (summed over all ranks, so the bias is identical on every rank). 0 = off;
  /// DeepSeek-V3 uses 0.001. Must be >= 0.
  float bias_update_speed = 0.0f;
  /// Auxiliary balance losses of every student layer (off when both coefficients are 0). Each rank's
  /// loss is over its own shard (seq_len = 0: the whole shard is one sequence). The coefficients mean
  /// the same at any world size: the optimised term is the MEAN over ranks of the per-rank loss with
  /// these coefficients (the trainer hands each layer alpha / world_size, because the layer adds its
  /// loss gradient with upstream 1 on every rank and replicated gradients are summed across ranks).
  /// All three must be >= 0.
  AuxLossOptions aux{};
};

/// What one step measured (identical on every rank except `ms`, which is this rank's).
struct StepRecord {
  std::int64_t step = 0;
  double loss = 0.0;             ///< mean squared error over all ranks' tokens
  double ms = 0.0;               ///< wall time of the step on this rank
  double tokens_per_s = 0.0;     ///< all ranks' tokens / step time
  double max_mean_load = 0.0;    ///< worst layer's max/mean tokens per expert
  /// Auxiliary balance loss (sequence-wise + expert-level), summed over layers and averaged over
  /// ranks: exactly the term the step optimised on top of `loss` (see TrainOptions::aux). 0 when off.
  double aux_loss = 0.0;
};

/// The seed paper's expert-estimation task: a fixed random teacher DeepSeekMoE model produces
/// targets from random inputs; a student of the same shape learns them with MSE and AdamW. Each rank
/// draws its own data shard; expert parameters are sharded, replicated ones all-reduced.
/// Optional load balancing: auxiliary losses and/or the aux-loss-free selection bias (TrainOptions).
class Trainer {
 public:
  /// Throws ConfigError for invalid options (steps < 0, tokens_per_rank < 1, negative
  /// bias_update_speed or aux settings, non-finite values).
  Trainer(const MoeConfig& config, comm::Communicator& comm, TrainOptions options);
  /// Runs one step (a collective).
  StepRecord step();
  MoeModel& student() { return *student_; }
  const TrainOptions& options() const { return options_; }

 private:
  MoeConfig config_;
  comm::Communicator& comm_;
  TrainOptions options_;
  sched::Topology topology_;
  sched::ExpertPlacement placement_;
  std::unique_ptr<MoeModel> teacher_, student_;
  AdamW optimizer_;
  std::int64_t step_ = 0;
  std::vector<float> x_, target_, y_, dy_;
  std::vector<std::int64_t> loads_;
  double sums_[2] = {0.0, 0.0};  // squared error, aux loss: reduced together
};

/// The per-step line of the training log: `step | loss | ms | tokens/s | max/mean expert load`,
/// plus a sixth column `aux loss` when `with_aux` (auxiliary losses on).
std::string format_step(const StepRecord& r, bool with_aux = false);
/// The header that goes above those lines (same `with_aux`).
std::string step_header(bool with_aux = false);
/// One JSON object (a line) for `--log-json`.
std::string step_json(const StepRecord& r);

}  // namespace moex
