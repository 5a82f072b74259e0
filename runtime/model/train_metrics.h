// What moex-train serves on its Prometheus endpoint: every rank's step measured and rendered as
// Prometheus text by rank 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/model/trainer.h"

namespace moex {

/// Keeps the run's totals (tokens, bytes, drops, migrations) and renders one step's StepRecord with
/// every rank's step time and stage seconds. One per run, on every rank.
class TrainMetrics {
 public:
  TrainMetrics(comm::Communicator& comm, std::int64_t tokens_per_rank, std::int64_t steps_target);
  /// A collective after each step (every rank, same order): gathers each rank's step time and the
  /// student layers' cumulative stage times to rank 0, which returns the Prometheus text; other ranks
  /// return "".
  std::string collect(const StepRecord& r, MoeModel& student);

 private:
  comm::Communicator& comm_;
  std::int64_t tokens_per_rank_, steps_target_;
  double tokens_total_ = 0;
  std::int64_t picks_dropped_total_ = 0, migrated_total_ = 0, steps_run_ = 0, evaluations_ = 0;
  std::vector<double> bytes_total_;  // [layer][intra, inter]
  std::vector<double> mine_, all_;   // gather buffers, reused
  std::vector<std::int64_t> counts_;
};

}  // namespace moex
