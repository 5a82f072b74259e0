// Hot-expert replicas: layout, hierarchical planner (EPLB-style), routing choice and migration plan.
#include "scheduler/replica_planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>

#include "base/error.h"

namespace moex::sched {
namespace {

std::string str(std::int64_t v) { return std::to_string(v); }

void check_topology(const ReplicaLayout& layout, const Topology& topology, const char* what) {
  if (topology.world_size() != layout.world_size())
    throw InvalidArgument(std::string(what) + ": topology has " + str(topology.world_size()) +
                          " ranks, the layout " + str(layout.world_size()));
}

/// Mathematical modulo of a token index by a positive count.
std::int64_t wrap(std::int64_t token, std::int64_t count) {
  const std::int64_t m = token % count;
  return m < 0 ? m + count : m;
}

/// Improves a greedy packing of weighted items into bins of fixed sizes by swapping items between
/// bins: repeatedly the swap between the heaviest bin (lowest index among equals) and another bin
/// that most lowers the larger of the two loads, as long as it lowers it below the heaviest load.
/// `allowed(h, x, b, y)`: whether item x of bin h may trade places with item y of bin b. Each swap
/// makes the loads sorted in descending order lexicographically smaller, so this ends; a cap on the
/// rounds guards against rounding. Deterministic (ties to the lower bin, then position).
template <typename Allowed>
void refine_by_swaps(std::vector<std::vector<std::size_t>>& bins, const std::vector<double>& weight,
                     Allowed allowed) {
  const auto nb = bins.size();
  if (nb < 2) return;
  std::vector<double> bin_load(nb, 0.0);
  for (std::size_t b = 0; b < nb; ++b)
    for (std::size_t x : bins[b]) bin_load[b] += weight[x];
  for (std::size_t round = 0; round < 64 * weight.size() + 64; ++round) {
    std::size_t h = 0;
    for (std::size_t b = 1; b < nb; ++b)
      if (bin_load[b] > bin_load[h]) h = b;
    const double limit = bin_load[h] - 1e-12 * std::max(1.0, std::abs(bin_load[h]));
    double best_max = limit;
    std::size_t best_b = nb, best_i = 0, best_j = 0;
    for (std::size_t b = 0; b < nb; ++b) {
      if (b == h) continue;
      for (std::size_t i = 0; i < bins[h].size(); ++i)
        for (std::size_t j = 0; j < bins[b].size(); ++j) {
          const double d = weight[bins[h][i]] - weight[bins[b][j]];
          if (!(d > 0.0)) continue;
          const double new_max = std::max(bin_load[h] - d, bin_load[b] + d);
          if (new_max < best_max && allowed(h, bins[h][i], b, bins[b][j])) {
            best_max = new_max;
            best_b = b;
            best_i = i;
            best_j = j;
          }
        }
    }
    if (best_b == nb) return;
    const double d = weight[bins[h][best_i]] - weight[bins[best_b][best_j]];
    std::swap(bins[h][best_i], bins[best_b][best_j]);
    bin_load[h] -= d;
    bin_load[best_b] += d;
  }
}

/// Step (c) for one pool: the physical experts (count[i] replicas of experts[i], load / count each)
/// packed onto `ranks` ranks of slots_per_rank slots: greedy, heaviest first to the least loaded rank
/// with a free slot (preferring one without that expert), then refined by swaps.
struct Packing {
  std::vector<std::vector<std::int64_t>> experts_of_rank;  // by rank index in the pool, sorted
  double max_load = 0.0;
  std::size_t heaviest = 0;  // rank index in the pool with max_load (lowest among equals)
  std::int64_t duplicates = 0;  // extra copies of an expert on a rank that already holds it
  /// Better: fewer duplicates, then a lower maximum (by more than rounding).
  bool better_than(const Packing& o) const {
    if (duplicates != o.duplicates) return duplicates < o.duplicates;
    return max_load < o.max_load * (1.0 - 1e-9);
  }
};

Packing pack_pool(const std::vector<std::int64_t>& experts, std::span<const double> load,
                  const std::vector<std::int64_t>& count, std::size_t ranks, std::int64_t slots_per_rank) {
  std::vector<double> weight;
  std::vector<std::int64_t> item_expert;
  for (std::size_t i = 0; i < experts.size(); ++i)
    for (std::int64_t c = 0; c < count[i]; ++c) {
      weight.push_back(load[static_cast<std::size_t>(experts[i])] / static_cast<double>(count[i]));
      item_expert.push_back(experts[i]);
    }
  MOEX_CHECK_EQ(static_cast<std::int64_t>(weight.size()), static_cast<std::int64_t>(ranks) * slots_per_rank);
  std::vector<std::size_t> order(weight.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return weight[a] > weight[b]; });
  std::vector<double> rank_load(ranks, 0.0);
  std::vector<std::vector<std::size_t>> held(ranks);  // item indices per rank
  const auto copies = [&](std::size_t rank, std::int64_t e) {
    std::int64_t c = 0;
    for (std::size_t x : held[rank]) c += item_expert[x] == e ? 1 : 0;
    return c;
  };
  for (std::size_t x : order) {
    std::size_t best = ranks;
    bool best_fresh = false;
    for (std::size_t j = 0; j < ranks; ++j) {
      if (static_cast<std::int64_t>(held[j].size()) >= slots_per_rank) continue;
      const bool fresh = copies(j, item_expert[x]) == 0;
      if (best == ranks || (fresh && !best_fresh) || (fresh == best_fresh && rank_load[j] < rank_load[best])) {
        best = j;
        best_fresh = fresh;
      }
    }
    MOEX_CHECK_LT(best, ranks);
    held[best].push_back(x);
    rank_load[best] += weight[x];
  }
  // Repair: the greedy tail can be forced to put a second copy of an expert on a rank (all ranks
  // with free slots hold it already). Swap such a copy with an item of a rank without that expert
  // whose own expert the first rank lacks (no new duplicate), the swap with the lowest resulting
  // load of the two ranks first.
  for (bool changed = true; changed;) {
    changed = false;
    for (std::size_t h = 0; h < ranks && !changed; ++h)
      for (std::size_t i = 0; i < held[h].size() && !changed; ++i) {
        const std::size_t x = held[h][i];
        if (copies(h, item_expert[x]) < 2) continue;
        std::size_t best_b = ranks, best_j = 0;
        double best_max = std::numeric_limits<double>::infinity();
        for (std::size_t b = 0; b < ranks; ++b) {
          if (b == h || copies(b, item_expert[x]) > 0) continue;
          for (std::size_t j = 0; j < held[b].size(); ++j) {
            const std::size_t y = held[b][j];
            if (copies(h, item_expert[y]) > 0) continue;
            const double d = weight[x] - weight[y];
            const double m = std::max(rank_load[h] - d, rank_load[b] + d);
            if (m < best_max) {
              best_max = m;
              best_b = b;
              best_j = j;
            }
          }
        }
        if (best_b == ranks) continue;
        const std::size_t y = held[best_b][best_j];
        rank_load[h] += weight[y] - weight[x];
        rank_load[best_b] += weight[x] - weight[y];
        std::swap(held[h][i], held[best_b][best_j]);
        changed = true;
      }
  }
  // A swap may not concentrate an expert: the receiving rank must hold fewer copies than the giving
  // one, so the number of same-rank duplicates never grows.
  refine_by_swaps(held, weight, [&](std::size_t h, std::size_t x, std::size_t b, std::size_t y) {
    const std::int64_t ex = item_expert[x], ey = item_expert[y];
    return ex != ey && copies(b, ex) < copies(h, ex) && copies(h, ey) < copies(b, ey);
  });
  Packing p;
  p.experts_of_rank.resize(ranks);
  for (std::size_t j = 0; j < ranks; ++j) {
    double sum = 0.0;
    for (std::size_t x : held[j]) {
      p.experts_of_rank[j].push_back(item_expert[x]);
      sum += weight[x];
    }
    std::sort(p.experts_of_rank[j].begin(), p.experts_of_rank[j].end());
    for (std::size_t k = 1; k < p.experts_of_rank[j].size(); ++k)
      p.duplicates += p.experts_of_rank[j][k] == p.experts_of_rank[j][k - 1] ? 1 : 0;
    if (j == 0 || sum > p.max_load) {
      p.max_load = sum;
      p.heaviest = j;
    }
  }
  return p;
}

/// Steps (b) and (c) for one pool: `experts` (ascending ids) with `load`, over `ranks`, filling
/// slots_per_rank slots on each. Writes slot_expert[rank] for those ranks.
void fill_pool(const std::vector<std::int64_t>& experts, std::span<const double> load, std::span<const int> ranks,
               std::int64_t slots_per_rank, std::vector<std::vector<std::int64_t>>& slot_expert) {
  const auto n = experts.size();
  const auto slots = static_cast<std::int64_t>(ranks.size()) * slots_per_rank;
  MOEX_CHECK_LE(static_cast<std::int64_t>(n), slots);
  // (b) replicas: one each, then one more to the largest load per replica.
  std::vector<std::int64_t> count(n, 1);
  for (std::int64_t extra = slots - static_cast<std::int64_t>(n); extra > 0; --extra) {
    std::size_t best = 0;
    for (std::size_t i = 1; i < n; ++i) {
      const double a = load[static_cast<std::size_t>(experts[i])] / static_cast<double>(count[i]);
      const double b = load[static_cast<std::size_t>(experts[best])] / static_cast<double>(count[best]);
      if (a > b) best = i;
    }
    ++count[best];
  }
  // (c) pack, then (b') move single replicas between experts while that lowers the packed maximum:
  // the largest load per replica is not always the best count once replicas must share ranks (3
  // replicas of a hot expert on 2 ranks put 2/3 of it on one rank; 2 replicas split it evenly).
  // Only moves that touch an expert on the heaviest rank are tried (from it, or to it), at most
  // `slots` rounds.
  Packing packed = pack_pool(experts, load, count, ranks.size(), slots_per_rank);
  std::vector<char> on_heaviest(n);
  for (std::int64_t round = 0; round < slots; ++round) {
    std::fill(on_heaviest.begin(), on_heaviest.end(), 0);
    for (std::int64_t e : packed.experts_of_rank[packed.heaviest])
      on_heaviest[static_cast<std::size_t>(std::lower_bound(experts.begin(), experts.end(), e) - experts.begin())] = 1;
    std::size_t best_from = n, best_to = n;
    Packing best = packed;
    for (std::size_t a = 0; a < n; ++a) {
      if (count[a] < 2) continue;
      for (std::size_t b = 0; b < n; ++b) {
        if (b == a || !(on_heaviest[a] || on_heaviest[b])) continue;
        --count[a];
        ++count[b];
        Packing trial = pack_pool(experts, load, count, ranks.size(), slots_per_rank);
        ++count[a];
        --count[b];
        if (trial.better_than(best)) {
          best = std::move(trial);
          best_from = a;
          best_to = b;
        }
      }
    }
    if (best_from == n) break;
    --count[best_from];
    ++count[best_to];
    packed = std::move(best);
  }
  for (std::size_t j = 0; j < ranks.size(); ++j)
    slot_expert[static_cast<std::size_t>(ranks[j])] = std::move(packed.experts_of_rank[j]);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// ReplicaLayout

ReplicaLayout ReplicaLayout::from_slots(std::int64_t num_experts, std::vector<std::vector<std::int64_t>> slot_expert) {
  ReplicaLayout l;
  l.slot_expert_ = std::move(slot_expert);
  l.slots_per_rank_ = l.slot_expert_.empty() ? 0 : static_cast<std::int64_t>(l.slot_expert_.front().size());
  if (num_experts < 1) throw InvalidArgument("replica layout: num_experts = " + str(num_experts) + " must be >= 1");
  // Structural checks first (sizes, ranges), then derive replicas, then the full validate().
  l.replica_offsets_.assign(static_cast<std::size_t>(num_experts) + 1, 0);
  for (std::size_t r = 0; r < l.slot_expert_.size(); ++r)
    for (std::size_t s = 0; s < l.slot_expert_[r].size(); ++s) {
      const std::int64_t e = l.slot_expert_[r][s];
      if (e < 0 || e >= num_experts)
        throw InvalidArgument("replica layout: rank " + str(static_cast<std::int64_t>(r)) + " slot " +
                              str(static_cast<std::int64_t>(s)) + " holds expert " + str(e) + ", outside [0, " +
                              str(num_experts) + ")");
      ++l.replica_offsets_[static_cast<std::size_t>(e) + 1];
    }
  std::partial_sum(l.replica_offsets_.begin(), l.replica_offsets_.end(), l.replica_offsets_.begin());
  l.replicas_.resize(static_cast<std::size_t>(l.replica_offsets_.back()));
  std::vector<std::int64_t> next(l.replica_offsets_.begin(), l.replica_offsets_.end() - 1);
  for (std::size_t r = 0; r < l.slot_expert_.size(); ++r)
    for (std::size_t s = 0; s < l.slot_expert_[r].size(); ++s)
      l.replicas_[static_cast<std::size_t>(next[static_cast<std::size_t>(l.slot_expert_[r][s])]++)] =
          Replica{static_cast<int>(r), static_cast<std::int32_t>(s)};
  l.validate(num_experts);
  return l;
}

void ReplicaLayout::validate(std::int64_t num_experts) const {
  if (num_experts != this->num_experts())
    throw InvalidArgument("replica layout: has " + str(this->num_experts()) + " experts, expected " + str(num_experts));
  if (slot_expert_.empty()) throw InvalidArgument("replica layout: needs at least one rank");
  if (slots_per_rank_ < 1) throw InvalidArgument("replica layout: rank 0 has 0 slots, needs >= 1");
  for (std::size_t r = 0; r < slot_expert_.size(); ++r) {
    if (static_cast<std::int64_t>(slot_expert_[r].size()) != slots_per_rank_)
      throw InvalidArgument("replica layout: rank " + str(static_cast<std::int64_t>(r)) + " has " +
                            str(static_cast<std::int64_t>(slot_expert_[r].size())) + " slots, rank 0 has " +
                            str(slots_per_rank_) + " (every rank needs the same number)");
    for (std::size_t s = 0; s < slot_expert_[r].size(); ++s) {
      const std::int64_t e = slot_expert_[r][s];
      if (e < 0 || e >= num_experts)
        throw InvalidArgument("replica layout: rank " + str(static_cast<std::int64_t>(r)) + " slot " +
                              str(static_cast<std::int64_t>(s)) + " holds expert " + str(e) + ", outside [0, " +
                              str(num_experts) + ")");
    }
  }
  for (std::int64_t e = 0; e < num_experts; ++e)
    if (num_replicas(e) < 1) throw InvalidArgument("replica layout: expert " + str(e) + " has no replica");
}

int ReplicaLayout::choose(std::int64_t expert, int src_rank, std::int64_t token, const Topology& topology) const {
  if (expert < 0 || expert >= num_experts())
    throw InvalidArgument("replica choice: expert " + str(expert) + " outside [0, " + str(num_experts()) + ")");
  check_topology(*this, topology, "replica choice");
  if (src_rank < 0 || src_rank >= world_size())
    throw InvalidArgument("replica choice: source rank " + str(src_rank) + " outside [0, " + str(world_size()) + ")");
  const auto reps = replicas(expert);
  const int node = topology.node_of(src_rank);
  std::int64_t on_node = 0;
  for (const Replica& r : reps) on_node += topology.node_of(r.rank) == node ? 1 : 0;
  if (on_node == 0) return static_cast<int>(wrap(token, static_cast<std::int64_t>(reps.size())));
  std::int64_t want = wrap(token, on_node);
  for (std::size_t i = 0; i < reps.size(); ++i)
    if (topology.node_of(reps[i].rank) == node && want-- == 0) return static_cast<int>(i);
  MOEX_CHECK(false);
}

bool ReplicaLayout::groups_within_nodes(std::int64_t n_group, const Topology& topology) const {
  if (n_group < 1 || num_experts() % n_group != 0 || topology.world_size() != world_size()) return false;
  const std::int64_t per = num_experts() / n_group;
  for (std::int64_t g = 0; g < n_group; ++g) {
    const int node = topology.node_of(replicas(g * per).front().rank);
    for (std::int64_t e = g * per; e < (g + 1) * per; ++e)
      for (const Replica& r : replicas(e))
        if (topology.node_of(r.rank) != node) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Planning

ReplicaLayout plan_replicas(std::span<const double> load, const Topology& topology, std::int64_t n_group,
                            std::int64_t slots_per_rank) {
  const auto E = static_cast<std::int64_t>(load.size());
  const int world = topology.world_size();
  const int nodes = topology.num_nodes();
  if (E < 1) throw InvalidArgument("replica plan: load has 0 experts, needs >= 1");
  for (std::size_t e = 0; e < load.size(); ++e)
    if (!(std::isfinite(load[e]) && load[e] >= 0.0)) {
      std::ostringstream os;
      os << "replica plan: load[" << e << "] = " << load[e] << " must be finite and >= 0";
      throw InvalidArgument(os.str());
    }
  if (n_group < 1 || E % n_group != 0)
    throw InvalidArgument("replica plan: n_group = " + str(n_group) + " must be >= 1 and divide the " + str(E) +
                          " experts");
  if (slots_per_rank < 1) throw InvalidArgument("replica plan: slots_per_rank = " + str(slots_per_rank) + " must be >= 1");
  if (slots_per_rank * world < E)
    throw InvalidArgument("replica plan: slots_per_rank * world = " + str(slots_per_rank) + " * " + str(world) + " = " +
                          str(slots_per_rank * world) + " slots < " + str(E) + " experts");

  std::vector<std::vector<std::int64_t>> slot_expert(static_cast<std::size_t>(world));
  bool even = true;
  for (int n = 0; n < nodes; ++n) even = even && topology.node_size(n) == topology.node_size(0);
  if (n_group % nodes != 0 || !even) {
    // Fallback: one pool over all ranks (node-limited routing not guaranteed).
    std::vector<std::int64_t> all(static_cast<std::size_t>(E));
    std::iota(all.begin(), all.end(), std::int64_t{0});
    std::vector<int> ranks(static_cast<std::size_t>(world));
    std::iota(ranks.begin(), ranks.end(), 0);
    fill_pool(all, load, ranks, slots_per_rank, slot_expert);
    return ReplicaLayout::from_slots(E, std::move(slot_expert));
  }

  const std::int64_t node_slots = static_cast<std::int64_t>(topology.node_size(0)) * slots_per_rank;
  const std::int64_t node_experts = E / nodes;
  if (node_slots < node_experts)
    throw InvalidArgument("replica plan: a node has " + str(topology.node_size(0)) + " ranks * " + str(slots_per_rank) +
                          " slots = " + str(node_slots) + " slots < its " + str(node_experts) + " experts (" + str(E) +
                          " experts over " + str(nodes) + " nodes)");
  // (a) groups onto nodes.
  const std::int64_t per_group = E / n_group;
  const std::int64_t groups_per_node = n_group / nodes;
  std::vector<double> group_load(static_cast<std::size_t>(n_group), 0.0);
  for (std::int64_t e = 0; e < E; ++e) group_load[static_cast<std::size_t>(e / per_group)] += load[static_cast<std::size_t>(e)];
  std::vector<std::int64_t> order(static_cast<std::size_t>(n_group));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return group_load[static_cast<std::size_t>(a)] > group_load[static_cast<std::size_t>(b)];
  });
  std::vector<double> node_load(static_cast<std::size_t>(nodes), 0.0);
  std::vector<std::vector<std::size_t>> node_groups(static_cast<std::size_t>(nodes));
  for (std::int64_t g : order) {
    int best = -1;
    for (int n = 0; n < nodes; ++n) {
      if (static_cast<std::int64_t>(node_groups[static_cast<std::size_t>(n)].size()) >= groups_per_node) continue;
      if (best < 0 || node_load[static_cast<std::size_t>(n)] < node_load[static_cast<std::size_t>(best)]) best = n;
    }
    MOEX_CHECK_GE(best, 0);
    node_groups[static_cast<std::size_t>(best)].push_back(static_cast<std::size_t>(g));
    node_load[static_cast<std::size_t>(best)] += group_load[static_cast<std::size_t>(g)];
  }
  refine_by_swaps(node_groups, group_load, [](std::size_t, std::size_t, std::size_t, std::size_t) { return true; });
  std::vector<std::vector<std::int64_t>> node_experts_list(static_cast<std::size_t>(nodes));
  for (int n = 0; n < nodes; ++n)
    for (std::size_t g : node_groups[static_cast<std::size_t>(n)])
      for (std::int64_t e = static_cast<std::int64_t>(g) * per_group; e < (static_cast<std::int64_t>(g) + 1) * per_group; ++e)
        node_experts_list[static_cast<std::size_t>(n)].push_back(e);
  // (b) + (c) in each node.
  for (int n = 0; n < nodes; ++n) {
    auto& list = node_experts_list[static_cast<std::size_t>(n)];
    std::sort(list.begin(), list.end());
    fill_pool(list, load, topology.ranks_of(n), slots_per_rank, slot_expert);
  }
  return ReplicaLayout::from_slots(E, std::move(slot_expert));
}

ReplicaLayout identity_layout(std::int64_t experts, const Topology& topology, std::int64_t slots_per_rank) {
  if (experts < 1) throw InvalidArgument("identity layout: experts = " + str(experts) + " must be >= 1");
  if (slots_per_rank < 1)
    throw InvalidArgument("identity layout: slots_per_rank = " + str(slots_per_rank) + " must be >= 1");
  const int nodes = topology.num_nodes();
  std::vector<std::vector<std::int64_t>> lists(static_cast<std::size_t>(topology.world_size()));
  std::vector<std::vector<std::int64_t>> node_block(static_cast<std::size_t>(nodes));
  std::int64_t e = 0;
  for (int n = 0; n < nodes; ++n) {
    const std::int64_t node_count = experts / nodes + (n < experts % nodes ? 1 : 0);
    const auto ranks = topology.ranks_of(n);
    const auto nr = static_cast<std::int64_t>(ranks.size());
    for (std::int64_t i = 0; i < nr; ++i) {
      const std::int64_t count = node_count / nr + (i < node_count % nr ? 1 : 0);
      if (count > slots_per_rank)
        throw InvalidArgument("identity layout: rank " + str(ranks[static_cast<std::size_t>(i)]) + " needs " +
                              str(count) + " slots for its experts > slots_per_rank = " + str(slots_per_rank) + " (" +
                              str(experts) + " experts on " + topology.describe() + ")");
      for (std::int64_t j = 0; j < count; ++j) {
        lists[static_cast<std::size_t>(ranks[static_cast<std::size_t>(i)])].push_back(e);
        node_block[static_cast<std::size_t>(n)].push_back(e);
        ++e;
      }
    }
  }
  for (int r = 0; r < topology.world_size(); ++r) {
    auto& list = lists[static_cast<std::size_t>(r)];
    const auto own = list.size();
    if (own > 0) {
      for (std::size_t i = 0; list.size() < static_cast<std::size_t>(slots_per_rank); ++i) list.push_back(list[i % own]);
      continue;
    }
    const auto& block = node_block[static_cast<std::size_t>(topology.node_of(r))];
    const auto start = static_cast<std::size_t>(topology.local_index(r));
    for (std::size_t i = 0; list.size() < static_cast<std::size_t>(slots_per_rank); ++i) {
      if (!block.empty())
        list.push_back(block[(start + i) % block.size()]);
      else
        list.push_back(static_cast<std::int64_t>((static_cast<std::size_t>(r) + i) % static_cast<std::size_t>(experts)));
    }
  }
  return ReplicaLayout::from_slots(experts, std::move(lists));
}

double max_mean_rank_load(const ReplicaLayout& layout, std::span<const double> load, const Topology& topology) {
  if (static_cast<std::int64_t>(load.size()) != layout.num_experts())
    throw InvalidArgument("rank load: load has " + str(static_cast<std::int64_t>(load.size())) +
                          " entries, the layout " + str(layout.num_experts()) + " experts");
  check_topology(layout, topology, "rank load");
  double total = 0.0, worst = 0.0;
  for (int r = 0; r < layout.world_size(); ++r) {
    double sum = 0.0;
    for (std::int64_t e : layout.experts_of(r))
      sum += load[static_cast<std::size_t>(e)] / static_cast<double>(layout.num_replicas(e));
    total += sum;
    worst = std::max(worst, sum);
  }
  if (!(total > 0.0)) return 1.0;
  return worst / (total / static_cast<double>(layout.world_size()));
}

std::vector<SlotMove> plan_migration(const ReplicaLayout& from, const ReplicaLayout& to, const Topology& topology) {
  if (from.num_experts() != to.num_experts())
    throw InvalidArgument("migration: layouts have " + str(from.num_experts()) + " and " + str(to.num_experts()) +
                          " experts");
  if (from.world_size() != to.world_size())
    throw InvalidArgument("migration: layouts have " + str(from.world_size()) + " and " + str(to.world_size()) +
                          " ranks");
  check_topology(to, topology, "migration");
  // Source use counts per (rank, slot) of `from`.
  std::vector<std::vector<std::int64_t>> used(static_cast<std::size_t>(from.world_size()),
                                              std::vector<std::int64_t>(static_cast<std::size_t>(from.slots_per_rank()), 0));
  std::vector<SlotMove> moves;
  moves.reserve(static_cast<std::size_t>(to.num_physical()));
  for (int r = 0; r < to.world_size(); ++r) {
    const int node = topology.node_of(r);
    for (std::int64_t s = 0; s < to.slots_per_rank(); ++s) {
      const std::int64_t e = to.expert_at(r, s);
      // Kind of a candidate: 0 = same slot, 1 = same rank, 2 = same node, 3 = elsewhere.
      const auto kind = [&](const ReplicaLayout::Replica& h) {
        if (h.rank == r) return h.slot == s ? 0 : 1;
        return topology.node_of(h.rank) == node ? 2 : 3;
      };
      const ReplicaLayout::Replica* best = nullptr;
      for (const auto& h : from.replicas(e)) {  // already in (rank, slot) order: ties keep the first
        if (best == nullptr) { best = &h; continue; }
        const int kh = kind(h), kb = kind(*best);
        const auto uh = used[static_cast<std::size_t>(h.rank)][static_cast<std::size_t>(h.slot)];
        const auto ub = used[static_cast<std::size_t>(best->rank)][static_cast<std::size_t>(best->slot)];
        if (kh < kb || (kh == kb && uh < ub)) best = &h;
      }
      MOEX_CHECK(best != nullptr);
      ++used[static_cast<std::size_t>(best->rank)][static_cast<std::size_t>(best->slot)];
      moves.push_back(SlotMove{best->rank, best->slot, r, static_cast<std::int32_t>(s), e});
    }
  }
  return moves;
}

}  // namespace moex::sched
