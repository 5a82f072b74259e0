// LoadTracker: a per-expert load estimate from the global token counts of past steps.
#pragma once

#include <cstdint>
#include <deque>
#include <span>
#include <vector>

namespace moex::sched {

/// Tracks how many tokens each logical routed expert receives per step (global counts, summed over
/// all ranks) and estimates the expected load of the next step, the input of plan_replicas().
///
/// Modes:
///  - Window: the mean of the last W steps (param = W, an integer >= 1). Before W steps have been
///    added, the mean of the steps so far.
///  - Ema: exponential moving average est = alpha * load + (1 - alpha) * est (param = alpha in
///    (0, 1]); the first step sets est = load (no bias towards zero).
/// Before any step the estimate is all zeros. Pure data, not thread-safe.
class LoadTracker {
 public:
  enum class Mode { Window, Ema };

  /// InvalidArgument when experts < 1, a window that is not an integer >= 1, or alpha outside (0, 1].
  LoadTracker(std::int64_t experts, Mode mode, double param);

  /// Adds one step's load: `load[e]` = tokens routed to expert e (>= 0). InvalidArgument on a wrong
  /// size or a negative count (nothing is recorded then).
  void add(std::span<const std::int64_t> load);
  /// Expected per-expert load (tokens per step), size num_experts().
  std::vector<double> estimate() const;
  /// Steps added so far (all of them, not only those still in the window).
  std::int64_t steps() const { return steps_; }
  std::int64_t num_experts() const { return experts_; }
  Mode mode() const { return mode_; }
  /// Ema mode: restores a saved state (estimate() and steps() of a tracker with the same settings).
  /// InvalidArgument in Window mode, on a wrong size, or on a negative or non-finite value.
  void restore(std::vector<double> estimate, std::int64_t steps);
  /// Forgets every step (e.g. after a change of the model or batch size).
  void reset();

 private:
  std::int64_t experts_;
  Mode mode_;
  std::int64_t window_ = 0;      // Window mode
  double alpha_ = 0.0;           // Ema mode
  std::int64_t steps_ = 0;
  std::deque<std::vector<std::int64_t>> recent_;  // Window mode: the last min(steps, W) loads
  std::vector<std::int64_t> window_sum_;         // Window mode: their sum (exact)
  std::vector<double> ema_;                      // Ema mode
};

}  // namespace moex::sched
