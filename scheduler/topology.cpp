// Topology construction.
#include "scheduler/topology.h"

#include <map>

#include "base/error.h"

namespace moex::sched {

Topology Topology::from_node_ids(std::span<const int> node_of_rank) {
  if (node_of_rank.empty()) throw InvalidArgument("topology: needs at least one rank");
  Topology t;
  std::map<int, int> number;  // node id -> node index, in order of first rank
  t.node_.resize(node_of_rank.size());
  t.local_.resize(node_of_rank.size());
  for (std::size_t r = 0; r < node_of_rank.size(); ++r) {
    auto [it, fresh] = number.try_emplace(node_of_rank[r], static_cast<int>(number.size()));
    if (fresh) t.ranks_of_.emplace_back();
    const int n = it->second;
    t.node_[r] = n;
    t.local_[r] = static_cast<int>(t.ranks_of_[static_cast<std::size_t>(n)].size());
    t.ranks_of_[static_cast<std::size_t>(n)].push_back(static_cast<int>(r));
  }
  return t;
}

Topology Topology::uniform(int world, int ranks_per_node) {
  if (world < 1) throw InvalidArgument("topology: world size " + std::to_string(world) + " must be >= 1");
  if (ranks_per_node < 1)
    throw InvalidArgument("topology: ranks per node " + std::to_string(ranks_per_node) + " must be >= 1");
  std::vector<int> ids(static_cast<std::size_t>(world));
  for (int r = 0; r < world; ++r) ids[static_cast<std::size_t>(r)] = r / ranks_per_node;
  return from_node_ids(ids);
}

int Topology::peer_on(int node, int rank) const {
  const auto& ranks = ranks_of_[static_cast<std::size_t>(node)];
  return ranks[static_cast<std::size_t>(local_index(rank)) % ranks.size()];
}

bool Topology::contiguous() const {
  for (std::size_t r = 1; r < node_.size(); ++r)
    if (node_[r] != node_[r - 1] && node_[r] != node_[r - 1] + 1) return false;
  return true;
}

std::string Topology::describe() const {
  bool even = true;
  for (const auto& n : ranks_of_) even = even && n.size() == ranks_of_.front().size();
  std::string s = std::to_string(num_nodes()) + (num_nodes() == 1 ? " node" : " nodes");
  if (even) return s + " x " + std::to_string(ranks_of_.front().size()) + " ranks";
  s += " (";
  for (std::size_t n = 0; n < ranks_of_.size(); ++n) {
    if (n > 0) s += ',';
    s += std::to_string(ranks_of_[n].size());
  }
  return s + " ranks)";
}

}  // namespace moex::sched
