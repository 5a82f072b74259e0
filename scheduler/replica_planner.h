// Hot-expert replicas (EPLB-style): a physical expert layout with replicas, its planner, the routing
// choice among replicas, and the parameter migration between two layouts.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "scheduler/topology.h"

namespace moex::sched {

/// A physical placement of logical routed experts with replicas. Every rank has the same number of
/// physical expert slots (`slots_per_rank`), so every rank stores the same number of expert
/// parameter blocks; slot s of rank r holds a copy of logical expert slot_expert[r][s]. An expert may
/// sit in several slots (its replicas), on several ranks or, rarely, twice on one rank. Replicas'
/// gradients are summed (an all-reduce among the holders) so every replica stays identical.
class ReplicaLayout {
 public:
  /// One copy of an expert: physical slot `slot` of rank `rank`.
  struct Replica {
    int rank;
    std::int32_t slot;
    friend bool operator==(const Replica&, const Replica&) = default;
  };

  /// From slot_expert[r][s] (world = slot_expert.size()). Validates (see validate()).
  static ReplicaLayout from_slots(std::int64_t num_experts, std::vector<std::vector<std::int64_t>> slot_expert);

  std::int64_t num_experts() const { return static_cast<std::int64_t>(replica_offsets_.size()) - 1; }
  int world_size() const { return static_cast<int>(slot_expert_.size()); }
  std::int64_t slots_per_rank() const { return slots_per_rank_; }
  /// world_size() * slots_per_rank().
  std::int64_t num_physical() const { return slots_per_rank_ * world_size(); }
  /// slot_expert()[r][s]: the logical expert in physical slot s of rank r.
  const std::vector<std::vector<std::int64_t>>& slot_expert() const { return slot_expert_; }
  /// The logical experts in rank r's slots, by slot.
  std::span<const std::int64_t> experts_of(int rank) const { return slot_expert_[static_cast<std::size_t>(rank)]; }
  std::int64_t expert_at(int rank, std::int64_t slot) const {
    return slot_expert_[static_cast<std::size_t>(rank)][static_cast<std::size_t>(slot)];
  }
  /// Replicas of logical expert e as (rank, slot), ordered by rank then slot.
  std::span<const Replica> replicas(std::int64_t e) const {
    const auto b = static_cast<std::size_t>(replica_offsets_[static_cast<std::size_t>(e)]);
    const auto n = static_cast<std::size_t>(replica_offsets_[static_cast<std::size_t>(e) + 1]) - b;
    return std::span<const Replica>(replicas_).subspan(b, n);
  }
  std::int64_t num_replicas(std::int64_t e) const { return static_cast<std::int64_t>(replicas(e).size()); }

  /// Which replica of `expert` a token of `src_rank` goes to, as an index into replicas(expert): a
  /// replica on src_rank's node if there is one (among several there, the (token mod count)-th), else
  /// the (token mod count)-th of all replicas. Deterministic; a negative token counts from the
  /// other end (mathematical modulo). InvalidArgument on an expert or rank out of range or a
  /// topology of another world size.
  int choose(std::int64_t expert, int src_rank, std::int64_t token, const Topology& topology) const;

  /// InvalidArgument unless: num_experts matches, there is at least one rank, every rank has the same
  /// number (>= 1) of slots, every id is in [0, num_experts) and every expert has >= 1 replica.
  void validate(std::int64_t num_experts) const;

  /// Whether every replica of every expert of each of the `n_group` contiguous expert groups sits on
  /// the group's single node (so group-limited routing is node-limited routing). False when
  /// num_experts % n_group != 0 or the topology has another world size.
  bool groups_within_nodes(std::int64_t n_group, const Topology& topology) const;

  friend bool operator==(const ReplicaLayout& a, const ReplicaLayout& b) {
    return a.slot_expert_ == b.slot_expert_ && a.num_experts() == b.num_experts();
  }

 private:
  std::int64_t slots_per_rank_ = 0;
  std::vector<std::vector<std::int64_t>> slot_expert_;
  std::vector<std::int64_t> replica_offsets_{0};  // [E + 1] into replicas_
  std::vector<Replica> replicas_;                 // grouped by expert, then rank, then slot
};

/// Plans replicas for the expected per-expert `load` (e.g. LoadTracker::estimate()), hierarchically
/// like DeepSeek's EPLB (rebalance_experts_hierarchical), with local-search refinements:
///  (a) the `n_group` contiguous expert groups (E / n_group experts each) are packed onto the nodes,
///      the same number of groups per node, balancing the summed group load: greedy (heaviest group
///      first, to the least loaded node that still has room; ties to the lower index), then pairwise
///      group swaps between the heaviest node and another while they lower the heaviest load;
///  (b) in each node, starting from one replica per expert, the expert with the largest
///      load / replicas gets one more replica until the node's ranks_in_node * slots_per_rank slots
///      are used (ties to the lower expert id);
///  (c) the node's physical experts (load / replicas each) are packed onto its ranks, slots_per_rank
///      each: greedy, heaviest first to the least loaded rank with a free slot, preferring a rank
///      without that expert; then swaps that remove a second copy of an expert from a rank, then
///      swaps that lower the heaviest rank (never adding a same-rank copy). Two replicas of one
///      expert share a rank only when unavoidable (best effort). Each rank's slots are sorted by id;
///  (b') then, while it helps, one replica is moved from an expert with >= 2 to another expert
///      (pairs touching an expert on the heaviest rank; at most one round per slot), re-running (c),
///      accepted when the packing has fewer same-rank copies or a lower heaviest rank. EPLB's rule
///      in (b) alone can leave e.g. 3 replicas of a hot expert on 2 ranks (2/3 of it on one rank).
/// Every replica of a group's experts thus lives on the group's node: node-limited routing holds,
/// and the node-level balance is bounded by how evenly whole groups can be split over nodes.
///
/// Fallback (one pool): when num_groups % nodes != 0 or the nodes differ in size, all experts are
/// treated as one group on one node of all ranks: (b), (c), (b') over the whole world. Node-limited
/// routing is then not guaranteed (groups_within_nodes() tells).
///
/// Cost: (b') repacks the pool O(slots_per_rank * pool_experts) times per round; milliseconds for
/// 256 experts on 8 nodes x 8 ranks, seconds for a single pool of 64 ranks.
///
/// InvalidArgument unless E = load.size() >= 1, every load is finite and >= 0, n_group >= 1 divides
/// E, slots_per_rank >= 1, slots_per_rank * world >= E and (hierarchical) each node's slots >= its
/// E / nodes experts. Deterministic.
ReplicaLayout plan_replicas(std::span<const double> load, const Topology& topology, std::int64_t n_group,
                            std::int64_t slots_per_rank);

/// One replica per expert placed node by node like ExpertPlacement::node_aware (consecutive blocks
/// per node, then per rank; the first blocks get one more), padded to slots_per_rank slots per rank:
/// a rank's unused slots repeat its own experts cyclically (so each rank's share of the load is that
/// of the one-replica placement); a rank without experts takes its node's experts cyclically
/// (starting at the rank's local index), or all experts when its node has none.
/// InvalidArgument when experts < 1, slots_per_rank < 1, or some rank would need more than
/// slots_per_rank slots.
ReplicaLayout identity_layout(std::int64_t experts, const Topology& topology, std::int64_t slots_per_rank);

/// Expected max / mean per-rank load when each expert's load is split evenly among its replicas
/// (token spreading). 1.0 = perfect balance; 1.0 as well when the total load is 0.
/// InvalidArgument on a load size or topology world size that does not match the layout.
double max_mean_rank_load(const ReplicaLayout& layout, std::span<const double> load, const Topology& topology);

/// One physical slot of the new layout and where its expert's parameters (and optimizer state) come
/// from in the old layout. src == dst (same rank and slot) means the slot already holds it.
struct SlotMove {
  int src_rank;
  std::int32_t src_slot;
  int dst_rank;
  std::int32_t dst_slot;
  std::int64_t expert;
  bool in_place() const { return src_rank == dst_rank && src_slot == dst_slot; }
  bool local() const { return src_rank == dst_rank; }
  friend bool operator==(const SlotMove&, const SlotMove&) = default;
};

/// For every physical slot of `to` (by rank, then slot) the slot of `from` to copy its expert from:
/// the same slot if it already holds the expert, else another slot of the same rank (a local copy),
/// else a holder on the same node, else any holder; among several candidates of the same kind the
/// one used least so far as a source (spreads the sending), then the lower (rank, slot).
/// Sources refer to `from`: an executor must read every source before overwriting slots (or stage).
/// InvalidArgument when the layouts differ in experts or world size or the topology in world size.
std::vector<SlotMove> plan_migration(const ReplicaLayout& from, const ReplicaLayout& to, const Topology& topology);

}  // namespace moex::sched
