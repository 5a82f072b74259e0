// ExpertPlacement: which rank owns each routed expert, and at which local slot.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "scheduler/topology.h"

namespace moex::sched {

/// A map from logical routed expert to (owner rank, local slot). Every expert has exactly one owner;
/// shared experts are not placed (they are on every rank).
class ExpertPlacement {
 public:
  /// Contiguous sharding: rank r owns a consecutive block of experts; the first
  /// `num_experts % world_size` ranks own one more (uneven counts allowed, a rank may own none).
  static ExpertPlacement contiguous(std::int64_t num_experts, int world_size);
  /// Node by node: the experts are split into one consecutive block per node (the first
  /// `num_experts % nodes` nodes get one more), then each node's block over its ranks the same way.
  /// With DeepSeek's contiguous expert groups and n_group = number of nodes (and n_routed_experts
  /// divisible by it), group g lives on node g, so group-limited routing is node-limited routing.
  static ExpertPlacement node_aware(std::int64_t num_experts, const Topology& topology);
  /// From explicit lists: experts_of_rank[r] = global expert ids rank r holds, by local slot. Every
  /// expert must appear exactly once (InvalidArgument otherwise).
  static ExpertPlacement from_lists(std::int64_t num_experts, std::vector<std::vector<std::int64_t>> experts_of_rank);

  std::int64_t num_experts() const { return static_cast<std::int64_t>(owner_.size()); }
  int world_size() const { return static_cast<int>(experts_of_.size()); }
  /// Rank that owns expert `e`.
  int owner(std::int64_t e) const { return owner_[static_cast<std::size_t>(e)]; }
  /// Slot of expert `e` among its owner's local experts.
  std::int32_t local_slot(std::int64_t e) const { return slot_[static_cast<std::size_t>(e)]; }
  /// Global ids of the experts rank `r` owns, by local slot.
  std::span<const std::int64_t> experts_of(int r) const { return experts_of_[static_cast<std::size_t>(r)]; }
  std::int64_t num_local(int r) const { return static_cast<std::int64_t>(experts_of(r).size()); }
  /// Whether every one of the `n_group` contiguous expert groups lives on a single node, i.e. a token
  /// restricted to `topk_group` groups reaches at most `topk_group` nodes.
  bool groups_within_nodes(std::int64_t n_group, const Topology& topology) const;

 private:
  std::vector<int> owner_;
  std::vector<std::int32_t> slot_;
  std::vector<std::vector<std::int64_t>> experts_of_;
};

}  // namespace moex::sched
