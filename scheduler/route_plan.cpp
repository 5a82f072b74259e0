// Building the per-rank send rows and the per-expert receive blocks of a token exchange.
#include "scheduler/route_plan.h"

#include <string>

#include "base/error.h"

namespace moex::sched {

void RoutePlan::build(std::span<const std::int32_t> topk_ids, std::int64_t tokens, std::int64_t k,
                      const ExpertPlacement& placement) {
  const auto E = static_cast<std::size_t>(placement.num_experts());
  std::vector<int> dest(E);
  std::vector<std::int32_t> code(E);
  for (std::size_t e = 0; e < E; ++e) {
    dest[e] = placement.owner(static_cast<std::int64_t>(e));
    code[e] = placement.local_slot(static_cast<std::int64_t>(e));
  }
  build(topk_ids, tokens, k, placement.world_size(), dest, code);
}

void RoutePlan::build(std::span<const std::int32_t> topk_ids, std::int64_t tokens, std::int64_t k, int num_dest,
                      std::span<const int> dest_of_expert, std::span<const std::int32_t> code_of_expert) {
  MOEX_CHECK_EQ(static_cast<std::int64_t>(topk_ids.size()), tokens * k);
  MOEX_CHECK_EQ(dest_of_expert.size(), code_of_expert.size());
  const auto num_experts = static_cast<std::int64_t>(dest_of_expert.size());
  pick_dest_.resize(topk_ids.size());
  pick_code_.resize(topk_ids.size());
  for (std::size_t i = 0; i < topk_ids.size(); ++i) {
    const std::int32_t e = topk_ids[i];
    if (e < 0 || e >= num_experts)
      throw InvalidArgument("route: expert id " + std::to_string(e) + " of token " +
                            std::to_string(static_cast<std::int64_t>(i) / k) + " is outside [0, " +
                            std::to_string(num_experts) + ")");
    pick_dest_[i] = dest_of_expert[static_cast<std::size_t>(e)];
    pick_code_[i] = code_of_expert[static_cast<std::size_t>(e)];
  }
  build_picks(tokens, k, num_dest, pick_dest_, pick_code_);
}

void RoutePlan::build_picks(std::int64_t tokens, std::int64_t k, int num_dest, std::span<const int> pick_dest,
                            std::span<const std::int32_t> pick_code) {
  MOEX_CHECK_EQ(static_cast<std::int64_t>(pick_dest.size()), tokens * k);
  MOEX_CHECK_EQ(pick_dest.size(), pick_code.size());
  const int world = num_dest;
  topk = k;
  rows_per_rank.assign(static_cast<std::size_t>(world), 0);
  for (std::size_t i = 0; i < pick_dest.size(); ++i)
    if (pick_dest[i] < -1 || pick_dest[i] >= world)
      throw InvalidArgument("route: pick " + std::to_string(i % static_cast<std::size_t>(k)) + " of token " +
                            std::to_string(static_cast<std::int64_t>(i) / k) + " goes to destination " +
                            std::to_string(pick_dest[i]) + ", outside [-1, " + std::to_string(world) + ")");
  // Count rows: a token contributes one row per distinct destination.
  std::vector<std::int64_t> last_token(static_cast<std::size_t>(world), -1);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t j = 0; j < k; ++j) {
      const int d = pick_dest[static_cast<std::size_t>(t * k + j)];
      if (d < 0) continue;
      const auto r = static_cast<std::size_t>(d);
      if (last_token[r] != t) {
        last_token[r] = t;
        ++rows_per_rank[r];
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
      const auto i = static_cast<std::size_t>(t * k + j);
      if (pick_dest[i] < 0) continue;
      const auto r = static_cast<std::size_t>(pick_dest[i]);
      if (last_token[r] != t) {
        last_token[r] = t;
        row_of_rank[r] = next[r]++;
        row_token[static_cast<std::size_t>(row_of_rank[r])] = t;
        fill[r] = 0;
      }
      const auto at = static_cast<std::size_t>(row_of_rank[r] * k + fill[r]++);
      row_slot[at] = pick_code[i];
      row_k[at] = static_cast<std::int32_t>(j);
    }
  }
}

void ReceiveLayout::build(int world_size, int num_chunks, std::int64_t num_local_experts,
                          std::span<const std::int64_t> rows_pc, std::span<const std::int64_t> picks_pcs) {
  MOEX_CHECK_GE(world_size, 1);
  MOEX_CHECK_GE(num_chunks, 1);
  const auto P = static_cast<std::size_t>(world_size), C = static_cast<std::size_t>(num_chunks);
  const auto S = static_cast<std::size_t>(num_local_experts);
  MOEX_CHECK_EQ(rows_pc.size(), P * C);
  MOEX_CHECK_EQ(picks_pcs.size(), P * C * S);
  world = world_size;
  chunks = num_chunks;
  num_local = num_local_experts;
  rows.assign(rows_pc.begin(), rows_pc.end());
  row_base.assign(P * C, 0);
  total_rows = 0;
  for (std::size_t i = 0; i < P * C; ++i) {  // p-major, then c: the source's token order
    if (rows[i] < 0) throw InvalidArgument("receive layout: negative row count " + std::to_string(rows[i]));
    row_base[i] = total_rows;
    total_rows += rows[i];
  }
  picks.assign(S * P * C, 0);
  entry_base.assign(S * P * C, 0);
  expert_offsets.assign(S + 1, 0);
  total_entries = 0;
  for (std::size_t s = 0; s < S; ++s) {
    expert_offsets[s] = total_entries;
    for (std::size_t p = 0; p < P; ++p)
      for (std::size_t c = 0; c < C; ++c) {
        const std::int64_t n = picks_pcs[(p * C + c) * S + s];
        if (n < 0) throw InvalidArgument("receive layout: negative pick count " + std::to_string(n));
        const std::size_t i = (s * P + p) * C + c;
        picks[i] = n;
        entry_base[i] = total_entries;
        total_entries += n;
      }
  }
  expert_offsets[S] = total_entries;
}

std::int64_t ReceiveLayout::chunk_rows(int c) const {
  std::int64_t n = 0;
  for (int p = 0; p < world; ++p) n += rows[rc(p, c)];
  return n;
}

}  // namespace moex::sched
