// AutoSchedule: `--chunks auto` over a layer's passes. The first passes run unsplit and are
// measured; then the cost model (sched::predict) compares the candidate schedules once, from this
// machine's measured GEMM and link rates, and the fastest one runs from then on. Pure: the layer
// times its stages, exchanges and expert GEMMs and hands the figures in, and makes the one
// collective itself (the slowest rank's prediction of each candidate).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "scheduler/pipeline_model.h"

namespace moex::sched {

/// The schedule a layer runs and, with auto, how it was chosen.
struct ScheduleChoice {
  bool automatic = false;  ///< chunks = 0 was asked for
  bool decided = false;    ///< auto: the model has chosen (at the pass after kMeasuredPasses)
  Schedule schedule;       ///< what the next pass runs
  std::vector<Schedule> candidates;  ///< auto: what the model compared ...
  std::vector<double> predicted_ms;  ///< ... and each one's predicted pass, slowest rank (TrialSchedule: timed)
  std::size_t chosen = 0;            ///< index of `schedule` among the candidates
  MachineRates rates;                ///< this rank's measured rates
};

/// One layer's schedule over its passes. Use:
///   before a pass, if deciding(): time the expert FFN at calibration_rows(), calibrated(), then
///     max-reduce predicted() over the ranks and choose(); run choice().schedule;
///   during a pass, dispatched() for each dispatch (its bytes to and from other ranks, its time);
///   after a backward, if measuring(): measured() with the pass's work and times.
class AutoSchedule {
 public:
  /// Passes measured before the model chooses: the first pays first touches; the second is used.
  static constexpr int kMeasuredPasses = 2;

  /// Starts over. `chunks` 0 = auto; otherwise the fixed schedule {chunks, local_first,
  /// local_split} (local_split implies local_first), both kept only for the flat exchange with more
  /// than one rank. `overlap`: the layer's exchanges run beside its compute (the model's assumption).
  void reset(int chunks, bool local_first, bool local_split, bool flat_exchange, int world, bool overlap);
  const ScheduleChoice& choice() const { return choice_; }
  /// Auto, not decided yet: the passes are being measured.
  bool measuring() const { return choice_.automatic && !choice_.decided; }
  /// Auto, measured, not decided: the model chooses before the next pass.
  bool deciding() const { return measuring() && measured_; }

  /// One dispatch of the current pass: bytes to and from other ranks, and the milliseconds it took.
  void dispatched(double bytes, double ms);
  /// A pass ended while measuring(): its schedule-independent work (sched::pass_work with the
  /// measured times), the milliseconds of its metadata exchange's counts (a latency of the link) and
  /// the chunks it ran. The kMeasuredPasses-th call makes deciding() true.
  void measured(const PassWork& work, double counts_ms, int chunks);

  /// The two row counts to time one expert FFN forward at: the largest expert block of the measured
  /// pass (at least 64, at most 4096) and an eighth of it. {0, 0} for a rank without experts.
  std::pair<std::int64_t, std::int64_t> calibration_rows() const;
  /// The expert FFN's measured time at the two row counts (best of a few runs each), which fit a
  /// fixed cost per call plus a cost per row; then every candidate is predicted for this rank.
  /// Returns the predictions, to be max-reduced over the ranks in place.
  std::vector<double>& calibrated(std::int64_t small, double small_ms, std::int64_t big, double big_ms);
  /// After the max-reduce: the schedule the rest of the run uses (sched::choose_schedule).
  void choose();

 private:
  ScheduleChoice choice_;
  PassWork work_;
  bool flat_ = true, overlap_ = true;
  int world_ = 1;
  int passes_ = 0;
  bool measured_ = false;
  double link_bytes_ = 0.0, link_ms_ = 0.0;  // the measured pass's dispatches
  double latency_ms_ = 0.0;                  // its counts exchange
  int dispatches_ = 0;                       // exchanges in link_ms_
};

/// `--chunks auto` by trial, for a backend that times its passes exactly and cheaply (the GPU layer,
/// with CUDA events): every candidate (sched::candidate_schedules) runs kTrialPasses passes, the
/// last one timed, then the slowest rank's time of each chooses (sched::choose_schedule). Pure: the
/// layer times its passes and makes the one collective. Use:
///   before a pass, if deciding(): max-reduce times() over the ranks, then choose(); run
///     choice().schedule;
///   after a pass with its backward, if trying(): timed() with its device milliseconds.
class TrialSchedule {
 public:
  /// Passes each candidate runs: the first pays its buffers' growth, the second is timed.
  static constexpr int kTrialPasses = 2;

  /// Starts over, as AutoSchedule::reset (chunks 0 = auto, else the fixed schedule).
  void reset(int chunks, bool local_first, bool local_split, bool flat_exchange, int world);
  const ScheduleChoice& choice() const { return choice_; }
  /// Auto, not decided yet: candidates are being tried.
  bool trying() const { return choice_.automatic && !choice_.decided; }
  /// Every candidate timed: choose before the next pass.
  bool deciding() const { return trying() && next_ == choice_.candidates.size(); }
  /// A pass of choice().schedule (forward and backward) took `ms` on this rank; the schedule moves
  /// on to the next candidate after its kTrialPasses-th.
  void timed(double ms);
  /// The last pass of each candidate, this rank's; to be max-reduced over the ranks in place.
  std::vector<double>& times() { return choice_.predicted_ms; }
  /// After the max-reduce: the fastest unless it saves less than 3 % (or `min_gain_ms`) over one
  /// chunk; it runs from then on.
  void choose(double min_gain_ms);
  /// Takes over the decision of another layer's trials (`from`: automatic and decided, over the same
  /// candidates), so a rebuilt layer does not try again; anything else is ignored.
  void adopt(const ScheduleChoice& from);

 private:
  ScheduleChoice choice_;
  std::size_t next_ = 0;  // the candidate being tried
  int passes_ = 0;        // its passes so far
};

}  // namespace moex::sched
