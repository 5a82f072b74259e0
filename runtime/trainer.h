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
  std::int64_t steps = 200;
  std::int64_t tokens_per_rank = 256;
  std::uint64_t seed = 1;
  AdamWOptions adam{};
};

/// What one step measured (identical on every rank except `ms`, which is this rank's).
struct StepRecord {
  std::int64_t step = 0;
  double loss = 0.0;             ///< mean squared error over all ranks' tokens
  double ms = 0.0;               ///< wall time of the step on this rank
  double tokens_per_s = 0.0;     ///< all ranks' tokens / step time
  double max_mean_load = 0.0;    ///< worst layer's max/mean tokens per expert
};

/// The seed paper's expert-estimation task: a fixed random teacher DeepSeekMoE model produces
/// targets from random inputs; a student of the same shape learns them with MSE and AdamW. Each rank
/// draws its own data shard; expert parameters are sharded, replicated ones all-reduced.
class Trainer {
 public:
  Trainer(const MoeConfig& config, comm::Communicator& comm, TrainOptions options);
  /// Runs one step (a collective).
  StepRecord step();
  MoeModel& student() { return *student_; }

 private:
  MoeConfig config_;
  comm::Communicator& comm_;
  TrainOptions options_;
  sched::ExpertPlacement placement_;
  std::unique_ptr<MoeModel> teacher_, student_;
  AdamW optimizer_;
  std::int64_t step_ = 0;
  std::vector<float> x_, target_, y_, dy_;
  std::vector<std::int64_t> loads_;
};

/// The per-step line of the training log: `step | loss | ms | tokens/s | max/mean expert load`.
std::string format_step(const StepRecord& r);
/// The header that goes above those lines.
std::string step_header();
/// One JSON object (a line) for `--log-json`.
std::string step_json(const StepRecord& r);

}  // namespace moex
