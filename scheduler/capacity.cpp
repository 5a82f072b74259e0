#include "scheduler/capacity.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "base/error.h"

namespace moex::sched {

void check_capacity_factor(double capacity_factor, const std::string& who) {
  if (!std::isfinite(capacity_factor) || capacity_factor < 0.0)
    throw InvalidArgument(who + ": capacity_factor = " + std::to_string(capacity_factor) +
                          " must be finite and >= 0 (0 = dropless)");
}

std::int64_t expert_capacity(double capacity_factor, std::int64_t picks, std::int64_t experts) {
  if (!(capacity_factor > 0.0) || !std::isfinite(capacity_factor))
    throw InvalidArgument("capacity factor = " + std::to_string(capacity_factor) + ": must be a finite value > 0");
  if (experts < 1) throw InvalidArgument("capacity: experts = " + std::to_string(experts) + ", must be >= 1");
  // No expert can get more than all the picks: a larger capacity is dropless, and clamping first keeps
  // a huge factor (1e300) from overflowing the conversion.
  const double cap = std::ceil(capacity_factor * static_cast<double>(picks) / static_cast<double>(experts));
  return cap >= static_cast<double>(picks) ? std::max<std::int64_t>(picks, 0) : static_cast<std::int64_t>(cap);
}

std::int64_t apply_capacity(std::span<const std::int32_t> topk_ids, std::span<const float> topk_weights,
                            std::int64_t experts, double capacity_factor, std::vector<std::uint8_t>& kept,
                            std::vector<std::int64_t>& order) {
  const auto n = static_cast<std::int64_t>(topk_ids.size());
  if (topk_weights.size() != topk_ids.size())
    throw InvalidArgument("capacity: " + std::to_string(topk_ids.size()) + " expert ids but " +
                          std::to_string(topk_weights.size()) + " routing weights (expected one per pick)");
  if (experts < 1) throw InvalidArgument("capacity: experts = " + std::to_string(experts) + ", must be >= 1");
  kept.assign(static_cast<std::size_t>(n), 1);
  if (capacity_factor <= 0.0 || n == 0) return 0;
  const std::int64_t cap = expert_capacity(capacity_factor, n, experts);
  // Picks grouped by expert (a counting sort keeps pick order), then each group by weight, descending.
  std::vector<std::int64_t> first(static_cast<std::size_t>(experts) + 1, 0);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t e = topk_ids[static_cast<std::size_t>(i)];
    if (e < 0 || e >= experts)
      throw InvalidArgument("capacity: expert id " + std::to_string(e) + " of pick " + std::to_string(i) +
                            " is outside [0, " + std::to_string(experts) + ")");
    ++first[static_cast<std::size_t>(e) + 1];
  }
  for (std::size_t e = 0; e < static_cast<std::size_t>(experts); ++e) first[e + 1] += first[e];
  order.resize(static_cast<std::size_t>(n));
  std::vector<std::int64_t> next(first.begin(), first.end() - 1);
  for (std::int64_t i = 0; i < n; ++i)
    order[static_cast<std::size_t>(next[static_cast<std::size_t>(topk_ids[static_cast<std::size_t>(i)])]++)] = i;
  std::int64_t dropped = 0;
  for (std::size_t e = 0; e < static_cast<std::size_t>(experts); ++e) {
    const auto b = order.begin() + first[e], end = order.begin() + first[e + 1];
    if (end - b <= cap) continue;
    std::stable_sort(b, end, [&](std::int64_t p, std::int64_t q) {
      return topk_weights[static_cast<std::size_t>(p)] > topk_weights[static_cast<std::size_t>(q)];
    });
    for (auto it = b + cap; it != end; ++it) kept[static_cast<std::size_t>(*it)] = 0;
    dropped += (end - b) - cap;
  }
  return dropped;
}

}  // namespace moex::sched
