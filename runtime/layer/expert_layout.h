// ExpertLayout: where a layer's routed experts live, for both layers: a placement (one replica per
// expert) or a replica layout, the rank -> node topology, and what follows from them (each rank's
// slots, the widest rank, the experts whose gradients are summed over replicas).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "scheduler/expert_placement.h"
#include "scheduler/replica_planner.h"
#include "scheduler/topology.h"

namespace moex::layer {

class ExpertLayout {
 public:
  /// Placement mode (`replicas` empty) or replica mode (`placement` empty) for `experts` routed
  /// experts on `world` ranks; the topology defaults to one node. InvalidArgument, prefixed with
  /// `name`, when any of them is for another expert count or world size.
  ExpertLayout(std::optional<sched::ExpertPlacement> placement, std::optional<sched::ReplicaLayout> replicas,
               std::optional<sched::Topology> topology, std::int64_t experts, int world, const std::string& name);

  std::int64_t num_experts() const { return experts_; }
  const std::optional<sched::ExpertPlacement>& placement() const { return placement_; }
  const std::optional<sched::ReplicaLayout>& replicas() const { return replicas_; }
  const sched::Topology& topology() const { return topology_; }
  /// The expert in each slot of rank r.
  std::span<const std::int64_t> slots(int r) const { return slot_expert_[static_cast<std::size_t>(r)]; }
  /// The most slots any rank holds (the forwarding codes' stride).
  std::int64_t max_slots() const { return max_slots_; }
  /// Replica mode: the experts with more than one replica, and an expert's index among them (-1:
  /// one replica, or placement mode). Their gradients are summed over the replicas.
  std::int64_t multi_experts() const { return multi_experts_; }
  std::int64_t multi_index(std::int64_t expert) const { return multi_index_[static_cast<std::size_t>(expert)]; }
  /// The slots of rank r holding a multi-replica expert, each with that expert's multi_index():
  /// where the replica-gradient sums read and write, in slot order.
  std::vector<std::pair<std::int64_t, std::int64_t>> multi_slots(int r) const;
  /// Replica mode: the layout after a migration (same experts and ranks).
  void set_replicas(const sched::ReplicaLayout& to);
  /// The same experts in the same slots of the same ranks.
  bool same_slots(const ExpertLayout& o) const { return slot_expert_ == o.slot_expert_; }

 private:
  void derive();  // slot_expert_, max_slots_ and the multi-replica index from the placement or layout

  std::optional<sched::ExpertPlacement> placement_;
  std::optional<sched::ReplicaLayout> replicas_;
  sched::Topology topology_;
  std::int64_t experts_ = 0;
  std::vector<std::vector<std::int64_t>> slot_expert_;  // [P][slots of r]
  std::int64_t max_slots_ = 1;
  std::int64_t multi_experts_ = 0;
  std::vector<std::int64_t> multi_index_;  // [E]
};

}  // namespace moex::layer
