// Contiguous expert sharding.
#include "scheduler/expert_placement.h"

#include <string>

#include "base/error.h"

namespace moex::sched {

ExpertPlacement ExpertPlacement::contiguous(std::int64_t num_experts, int world_size) {
  if (num_experts < 1) throw InvalidArgument("placement: num_experts = " + std::to_string(num_experts) + " must be >= 1");
  if (world_size < 1) throw InvalidArgument("placement: world_size = " + std::to_string(world_size) + " must be >= 1");
  ExpertPlacement p;
  p.owner_.resize(static_cast<std::size_t>(num_experts));
  p.slot_.resize(static_cast<std::size_t>(num_experts));
  p.experts_of_.resize(static_cast<std::size_t>(world_size));
  const std::int64_t base = num_experts / world_size;
  const std::int64_t extra = num_experts % world_size;
  std::int64_t e = 0;
  for (int r = 0; r < world_size; ++r) {
    const std::int64_t count = base + (r < extra ? 1 : 0);
    for (std::int64_t i = 0; i < count; ++i, ++e) {
      p.owner_[static_cast<std::size_t>(e)] = r;
      p.slot_[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(i);
      p.experts_of_[static_cast<std::size_t>(r)].push_back(e);
    }
  }
  return p;
}

ExpertPlacement ExpertPlacement::node_aware(std::int64_t num_experts, const Topology& topology) {
  if (num_experts < 1) throw InvalidArgument("placement: num_experts = " + std::to_string(num_experts) + " must be >= 1");
  std::vector<std::vector<std::int64_t>> lists(static_cast<std::size_t>(topology.world_size()));
  const int nodes = topology.num_nodes();
  std::int64_t e = 0;
  for (int n = 0; n < nodes; ++n) {
    const std::int64_t node_count = num_experts / nodes + (n < num_experts % nodes ? 1 : 0);
    const auto ranks = topology.ranks_of(n);
    const auto nr = static_cast<std::int64_t>(ranks.size());
    for (std::int64_t i = 0; i < nr; ++i) {
      const std::int64_t count = node_count / nr + (i < node_count % nr ? 1 : 0);
      for (std::int64_t j = 0; j < count; ++j) lists[static_cast<std::size_t>(ranks[static_cast<std::size_t>(i)])].push_back(e++);
    }
  }
  return from_lists(num_experts, std::move(lists));
}

ExpertPlacement ExpertPlacement::from_lists(std::int64_t num_experts,
                                            std::vector<std::vector<std::int64_t>> experts_of_rank) {
  if (num_experts < 1) throw InvalidArgument("placement: num_experts = " + std::to_string(num_experts) + " must be >= 1");
  if (experts_of_rank.empty()) throw InvalidArgument("placement: needs at least one rank");
  ExpertPlacement p;
  p.owner_.assign(static_cast<std::size_t>(num_experts), -1);
  p.slot_.assign(static_cast<std::size_t>(num_experts), -1);
  for (std::size_t r = 0; r < experts_of_rank.size(); ++r) {
    const auto& list = experts_of_rank[r];
    for (std::size_t s = 0; s < list.size(); ++s) {
      const std::int64_t e = list[s];
      if (e < 0 || e >= num_experts)
        throw InvalidArgument("placement: rank " + std::to_string(r) + " lists expert " + std::to_string(e) +
                              ", outside [0, " + std::to_string(num_experts) + ")");
      if (p.owner_[static_cast<std::size_t>(e)] >= 0)
        throw InvalidArgument("placement: expert " + std::to_string(e) + " is listed on rank " +
                              std::to_string(p.owner_[static_cast<std::size_t>(e)]) + " and on rank " + std::to_string(r));
      p.owner_[static_cast<std::size_t>(e)] = static_cast<int>(r);
      p.slot_[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(s);
    }
  }
  for (std::int64_t e = 0; e < num_experts; ++e)
    if (p.owner_[static_cast<std::size_t>(e)] < 0)
      throw InvalidArgument("placement: expert " + std::to_string(e) + " is on no rank");
  p.experts_of_ = std::move(experts_of_rank);
  return p;
}

bool ExpertPlacement::groups_within_nodes(std::int64_t n_group, const Topology& topology) const {
  if (n_group < 1 || num_experts() % n_group != 0 || topology.world_size() != world_size()) return false;
  const std::int64_t per = num_experts() / n_group;
  for (std::int64_t g = 0; g < n_group; ++g)
    for (std::int64_t e = g * per + 1; e < (g + 1) * per; ++e)
      if (topology.node_of(owner(e)) != topology.node_of(owner(g * per))) return false;
  return true;
}

}  // namespace moex::sched
