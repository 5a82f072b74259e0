// Building the per-rank send rows and the per-expert receive blocks of a token exchange.
#include "scheduler/route_plan.h"

#include <string>

#include "base/error.h"

namespace moex::sched {

void RoutePlan::build(std::span<const std::int32_t> topk_ids, std::int64_t tokens, std::int64_t k,
                      const ExpertPlacement& placement) {
  MOEX_CHECK_EQ(static_cast<std::int64_t>(topk_ids.size()), tokens * k);
  const int world = placement.world_size();
  topk = k;
  rows_per_rank.assign(static_cast<std::size_t>(world), 0);
  for (std::int64_t i = 0; i < tokens * k; ++i) {
    const std::int32_t e = topk_ids[static_cast<std::size_t>(i)];
    if (e < 0 || e >= placement.num_experts())
      throw InvalidArgument("route: expert id " + std::to_string(e) + " of token " +
                            std::to_string(i / k) + " is outside [0, " +
                            std::to_string(placement.num_experts()) + ")");
  }
  // Count rows: a token contributes one row per distinct destination rank.
  std::vector<std::int64_t> last_token(static_cast<std::size_t>(world), -1);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t j = 0; j < k; ++j) {
      const int r = placement.owner(topk_ids[static_cast<std::size_t>(t * k + j)]);
      if (last_token[static_cast<std::size_t>(r)] != t) {
        last_token[static_cast<std::size_t>(r)] = t;
        ++rows_per_rank[static_cast<std::size_t>(r)];
      }
    }
  }
  std::vector<std::int64_t> next(static_cast<std::size_t>(world), 0);
  std::int64_t total = 0;
  for (int r = 0; r < world; ++r) {
    next[static_cast<std::size_t>(r)] = total;
    total += rows_per_rank[static_cast<std::size_t>(r)];
  }
  row_token.assign(static_cast<std::size_t>(total), -1);
  row_slot.assign(static_cast<std::size_t>(total * k), -1);
  row_k.assign(static_cast<std::size_t>(total * k), -1);
  // Tokens are visited in order, so rows of one destination stay in token order.
  std::vector<std::int64_t> row_of_rank(static_cast<std::size_t>(world), -1);
  std::vector<std::int32_t> fill(static_cast<std::size_t>(world), 0);
  last_token.assign(static_cast<std::size_t>(world), -1);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t e = topk_ids[static_cast<std::size_t>(t * k + j)];
      const auto r = static_cast<std::size_t>(placement.owner(e));
      if (last_token[r] != t) {
        last_token[r] = t;
        row_of_rank[r] = next[r]++;
        row_token[static_cast<std::size_t>(row_of_rank[r])] = t;
        fill[r] = 0;
      }
      const auto at = static_cast<std::size_t>(row_of_rank[r] * k + fill[r]++);
      row_slot[at] = placement.local_slot(e);
      row_k[at] = static_cast<std::int32_t>(j);
    }
  }
}

void ExpertBatchLayout::build(std::span<const std::int32_t> row_slot, std::int64_t rows,
                              std::int64_t k, std::int64_t num_local) {
  MOEX_CHECK_EQ(static_cast<std::int64_t>(row_slot.size()), rows * k);
  offsets.assign(static_cast<std::size_t>(num_local + 1), 0);
  std::int64_t entries = 0;
  for (std::int64_t i = 0; i < rows * k; ++i) {
    const std::int32_t s = row_slot[static_cast<std::size_t>(i)];
    if (s < 0) continue;
    if (s >= num_local)
      throw InvalidArgument("received a pick for local expert slot " + std::to_string(s) +
                            " but this rank holds " + std::to_string(num_local) + " experts");
    ++offsets[static_cast<std::size_t>(s + 1)];
    ++entries;
  }
  for (std::int64_t s = 0; s < num_local; ++s)
    offsets[static_cast<std::size_t>(s + 1)] += offsets[static_cast<std::size_t>(s)];
  entry_row.resize(static_cast<std::size_t>(entries));
  entry_pick.resize(static_cast<std::size_t>(entries));
  std::vector<std::int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (std::int64_t row = 0; row < rows; ++row) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t s = row_slot[static_cast<std::size_t>(row * k + j)];
      if (s < 0) continue;
      const auto at = static_cast<std::size_t>(cursor[static_cast<std::size_t>(s)]++);
      entry_row[at] = row;
      entry_pick[at] = static_cast<std::int32_t>(j);
    }
  }
}

}  // namespace moex::sched
