// --chunks auto: measure, then choose once.
#include "scheduler/auto_schedule.h"

#include <algorithm>

namespace moex::sched {

void AutoSchedule::reset(int chunks, bool local_first, bool local_split, bool flat_exchange, int world,
                         bool overlap) {
  *this = AutoSchedule();
  flat_ = flat_exchange;
  overlap_ = overlap;
  world_ = world;
  choice_.automatic = chunks == 0;
  if (!choice_.automatic) choice_.schedule = fixed_schedule(chunks, local_first, local_split, flat_exchange, world);
}

void AutoSchedule::dispatched(double bytes, double ms) {
  link_bytes_ += bytes;
  link_ms_ += ms;
}

void AutoSchedule::measured(const PassWork& work, double counts_ms, int chunks) {
  work_ = work;
  latency_ms_ = counts_ms;
  dispatches_ = 2 * chunks;  // forward and backward
  measured_ = ++passes_ >= kMeasuredPasses;
  if (!measured_) link_bytes_ = link_ms_ = 0.0;  // the next pass's dispatches are the measured ones
}

std::pair<std::int64_t, std::int64_t> AutoSchedule::calibration_rows() const {
  if (work_.self_entries.empty()) return {0, 0};
  std::int64_t most = 64;  // the largest expert block (this pass's slots: a migration may change them)
  for (std::size_t s = 0; s < work_.self_entries.size(); ++s) {
    std::int64_t n = work_.self_entries[s];
    for (auto m : work_.remote_entries[s]) n += m;
    most = std::max(most, n);
  }
  const std::int64_t big = std::min<std::int64_t>(most, 4096);
  return {std::max<std::int64_t>(big / 8, 1), big};
}

std::vector<double>& AutoSchedule::calibrated(std::int64_t small, double small_ms, std::int64_t big, double big_ms) {
  MachineRates& r = choice_.rates;
  r.gemm_fixed_ms = r.gemm_row_ms = 0.0;
  if (big > small) {  // a rank without experts computes no expert GEMMs
    r.gemm_row_ms = std::max(0.0, (big_ms - small_ms) / static_cast<double>(big - small));
    r.gemm_fixed_ms = std::max(0.0, small_ms - r.gemm_row_ms * static_cast<double>(small));
  }
  // The dispatches' time beyond the latency of each is what their bytes took.
  r.exchange_latency_ms = world_ > 1 ? latency_ms_ : 0.0;
  const double bytes_ms = link_ms_ - latency_ms_ * dispatches_;
  r.link_bytes_per_ms = link_bytes_ > 0.0 ? link_bytes_ / std::max(bytes_ms, 0.05 * link_ms_) : 0.0;
  choice_.candidates = candidate_schedules(world_, flat_);
  choice_.predicted_ms.assign(choice_.candidates.size(), 0.0);
  for (std::size_t i = 0; i < choice_.candidates.size(); ++i)
    choice_.predicted_ms[i] = predict(work_, r, choice_.candidates[i], overlap_).total_ms();
  return choice_.predicted_ms;
}

void AutoSchedule::choose() {
  choice_.chosen = choose_schedule(choice_.candidates, choice_.predicted_ms);
  choice_.schedule = choice_.candidates[choice_.chosen];
  choice_.decided = true;
}

void TrialSchedule::reset(int chunks, bool local_first, bool local_split, bool flat_exchange, int world) {
  *this = TrialSchedule();
  choice_.automatic = chunks == 0;
  if (!choice_.automatic) {
    choice_.schedule = fixed_schedule(chunks, local_first, local_split, flat_exchange, world);
    return;
  }
  choice_.candidates = candidate_schedules(world, flat_exchange);
  choice_.predicted_ms.assign(choice_.candidates.size(), 0.0);
  choice_.schedule = choice_.candidates[0];
}

void TrialSchedule::timed(double ms) {
  if (!trying() || deciding()) return;
  if (++passes_ < kTrialPasses) return;
  choice_.predicted_ms[next_] = ms;
  passes_ = 0;
  if (++next_ < choice_.candidates.size()) choice_.schedule = choice_.candidates[next_];
}

void TrialSchedule::adopt(const ScheduleChoice& from) {
  if (!trying() || !from.automatic || !from.decided || from.candidates != choice_.candidates) return;
  choice_ = from;
  next_ = choice_.candidates.size();
}

void TrialSchedule::choose(double min_gain_ms) {
  choice_.chosen = choose_schedule(choice_.candidates, choice_.predicted_ms, 0.03, min_gain_ms);
  choice_.schedule = choice_.candidates[choice_.chosen];
  choice_.decided = true;
}

}  // namespace moex::sched
