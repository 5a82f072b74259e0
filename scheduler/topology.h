// Topology: which node each rank runs on, and each rank's index within its node.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moex::sched {

/// The ranks of a job grouped into nodes. Nodes are numbered in order of their lowest rank; within a
/// node, ranks are numbered (local index) in rank order. Pure data: detection lives in comm/.
class Topology {
 public:
  /// From the node id of every rank (any integers; equal ids = same node).
  static Topology from_node_ids(std::span<const int> node_of_rank);
  /// `world` ranks, `ranks_per_node` consecutive ranks per node (the last node may be smaller).
  static Topology uniform(int world, int ranks_per_node);
  /// Every rank on a single node.
  static Topology single_node(int world) { return uniform(world, world); }

  int world_size() const { return static_cast<int>(node_.size()); }
  int num_nodes() const { return static_cast<int>(ranks_of_.size()); }
  int node_of(int rank) const { return node_[static_cast<std::size_t>(rank)]; }
  int local_index(int rank) const { return local_[static_cast<std::size_t>(rank)]; }
  /// Ranks of node `n` in rank order.
  std::span<const int> ranks_of(int node) const { return ranks_of_[static_cast<std::size_t>(node)]; }
  int node_size(int node) const { return static_cast<int>(ranks_of(node).size()); }
  /// The rank on `node` that forwards traffic from `rank` in a hierarchical exchange: the one with
  /// the same local index (modulo the node's size when nodes differ in size).
  int peer_on(int node, int rank) const;
  /// Whether every node holds a consecutive block of ranks (node 0 = ranks 0.., node 1 next, ...).
  bool contiguous() const;
  /// "2 nodes x 2 ranks" or "3 nodes (2,2,1 ranks)".
  std::string describe() const;
  /// The same ranks on the same nodes (nodes are numbered canonically, so the node map decides).
  friend bool operator==(const Topology& a, const Topology& b) { return a.node_ == b.node_; }

 private:
  std::vector<int> node_, local_;
  std::vector<std::vector<int>> ranks_of_;
};

}  // namespace moex::sched
