// Per-expert load estimate: sliding-window mean or exponential moving average.
#include "scheduler/load_tracker.h"

#include <cmath>
#include <sstream>
#include <string>

#include "base/error.h"

namespace moex::sched {

LoadTracker::LoadTracker(std::int64_t experts, Mode mode, double param) : experts_(experts), mode_(mode) {
  if (experts < 1) throw InvalidArgument("load tracker: experts = " + std::to_string(experts) + " must be >= 1");
  if (mode == Mode::Window) {
    if (!(param >= 1.0) || !std::isfinite(param) || param != std::floor(param) || param > 1e9) {
      std::ostringstream os;
      os << "load tracker: window = " << param << " must be an integer >= 1";
      throw InvalidArgument(os.str());
    }
    window_ = static_cast<std::int64_t>(param);
  } else if (mode == Mode::Ema) {
    if (!(param > 0.0 && param <= 1.0)) {
      std::ostringstream os;
      os << "load tracker: EMA decay alpha = " << param << " must be in (0, 1]";
      throw InvalidArgument(os.str());
    }
    alpha_ = param;
  } else {
    throw InvalidArgument("load tracker: unknown mode " + std::to_string(static_cast<int>(mode)));
  }
  reset();
}

void LoadTracker::reset() {
  steps_ = 0;
  recent_.clear();
  window_sum_.assign(mode_ == Mode::Window ? static_cast<std::size_t>(experts_) : 0, 0);
  ema_.assign(mode_ == Mode::Ema ? static_cast<std::size_t>(experts_) : 0, 0.0);
}

void LoadTracker::restore(std::vector<double> estimate, std::int64_t steps) {
  if (mode_ != Mode::Ema) throw InvalidArgument("LoadTracker::restore: only an Ema tracker's state can be restored");
  if (static_cast<std::int64_t>(estimate.size()) != experts_ || steps < 0)
    throw InvalidArgument("LoadTracker::restore: " + std::to_string(estimate.size()) + " estimates and " +
                          std::to_string(steps) + " steps: expected " + std::to_string(experts_) + " and >= 0");
  for (double v : estimate)
    if (!std::isfinite(v) || v < 0.0) throw InvalidArgument("LoadTracker::restore: an estimate is negative or not finite");
  ema_ = std::move(estimate);
  steps_ = steps;
}

void LoadTracker::add(std::span<const std::int64_t> load) {
  if (static_cast<std::int64_t>(load.size()) != experts_)
    throw InvalidArgument("load tracker: load has " + std::to_string(load.size()) + " entries, expected experts = " +
                          std::to_string(experts_));
  for (std::size_t e = 0; e < load.size(); ++e)
    if (load[e] < 0)
      throw InvalidArgument("load tracker: load[" + std::to_string(e) + "] = " + std::to_string(load[e]) +
                            " must be >= 0");
  if (mode_ == Mode::Window) {
    if (static_cast<std::int64_t>(recent_.size()) == window_) {
      const auto& old = recent_.front();
      for (std::size_t e = 0; e < old.size(); ++e) window_sum_[e] -= old[e];
      recent_.pop_front();
    }
    recent_.emplace_back(load.begin(), load.end());
    for (std::size_t e = 0; e < load.size(); ++e) window_sum_[e] += load[e];
  } else {
    for (std::size_t e = 0; e < load.size(); ++e) {
      const double x = static_cast<double>(load[e]);
      ema_[e] = steps_ == 0 ? x : alpha_ * x + (1.0 - alpha_) * ema_[e];
    }
  }
  ++steps_;
}

std::vector<double> LoadTracker::estimate() const {
  if (mode_ == Mode::Ema) return ema_;
  std::vector<double> est(static_cast<std::size_t>(experts_), 0.0);
  if (recent_.empty()) return est;
  const double n = static_cast<double>(recent_.size());
  for (std::size_t e = 0; e < est.size(); ++e) est[e] = static_cast<double>(window_sum_[e]) / n;
  return est;
}

}  // namespace moex::sched
