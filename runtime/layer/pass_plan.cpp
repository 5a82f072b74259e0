// PassPlan: the host side of an expert-parallel pass, for every backend.
#include "runtime/layer/pass_plan.h"

#include "base/error.h"
#include "scheduler/capacity.h"
#include "scheduler/pipeline_model.h"

namespace moex::layer {
namespace {
std::size_t z(std::int64_t v) { return static_cast<std::size_t>(v); }
}  // namespace

void PassPlan::route(const PassLayout& layout, int rank, int world, std::span<const std::int32_t> ids,
                     std::span<const float> weights, std::int64_t tokens, int chunks) {
  layout_ = layout;
  const std::int64_t K = layout.topk;
  if (static_cast<std::int64_t>(ids.size()) != tokens * K || static_cast<std::int64_t>(weights.size()) != tokens * K)
    throw InvalidArgument(layout.name + ": " + std::to_string(ids.size()) + " top-K ids and " +
                          std::to_string(weights.size()) + " weights for " + std::to_string(tokens) +
                          " tokens; expected tokens * K = " + std::to_string(tokens * K) + " of each");
  weights_.assign(weights.begin(), weights.end());
  // Every pick kept when dropless (kept all ones), else the capacity-factor rule.
  if (!layout.experts) throw InvalidArgument(layout.name + ": a pass plan without an expert layout");
  const ExpertLayout& where = *layout.experts;
  dropped = sched::apply_capacity(ids, weights, where.num_experts(), layout.capacity_factor, kept, order_);
  // Each kept pick's destination (rank, slot): the placement's owner, or in replica mode the replica
  // ReplicaLayout::choose() names for (expert, this rank, token).
  const auto& placement = where.placement();
  const auto& replicas = where.replicas();
  sched::route_picks(ids, kept, K, placement ? &*placement : nullptr, replicas ? &*replicas : nullptr, where.topology(),
                     rank, pick_rank_, pick_slot_);
  main.build_send(pick_rank_, pick_slot_, tokens, K, world, rank, chunks);
  if (layout.hierarchical) {
    // Stage A: a pick for rank d goes to d's node, to the rank there with this rank's local index.
    sched::forward_picks(pick_rank_, pick_slot_, where.topology(), rank, where.max_slots(), fwd_rank_, fwd_code_);
    a.build_send(fwd_rank_, fwd_code_, tokens, K, world, rank, chunks);
  }
}

void PassPlan::exchange_metadata(comm::Communicator& host, std::chrono::milliseconds timeout) {
  try {
    // Main's metadata always goes straight to the owners (2K floats a row), so its receive side is
    // the flat exchange's whichever way the rows travel.
    const ExpertLayout& where = *layout_.experts;
    meta_main.run(main, weights_, static_cast<std::int64_t>(where.slots(main.rank).size()), host, timeout);
    if (layout_.hierarchical) {
      const sched::Topology& topo = where.topology();
      meta_a.run(a, weights_, topo.node_size(topo.node_of(main.rank)) * where.max_slots(), host, timeout);
    }
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(layout_.name + ": " + e.what());
  }
}

void PassPlan::finish() {
  const sched::Topology& topo = layout_.experts->topology();
  const int P = main.world, C = main.chunks, me = main.rank;
  const std::int64_t K = layout_.topk;
  sched::own_entries(main, own_entries_);
  own_split = sched::own_split_slot(own_entries_);
  if (layout_.hierarchical) {
    per_node = false;
    // Stage B: the forwarder's "tokens" are the rows stage A brought it, chunk by chunk; each row's
    // picks go to their rank on this node.
    const int my_node = topo.node_of(me);
    const std::int64_t RA = a.recv_rows();
    sched::forwarded_picks(meta_a.recv_meta.data(), RA, 2 * K, K, topo.ranks_of(my_node), layout_.experts->max_slots(),
                           pick_rank_, pick_slot_);
    b_chunks_.resize(z(C) + 1);
    for (int c = 0; c < C; ++c) b_chunks_[z(c)] = a.chunk_recv_first(c);
    b_chunks_[z(C)] = RA;
    b.build_send(pick_rank_, pick_slot_, RA, K, P, me, C, b_chunks_);
    // Its receive side from what the origins announced: origin p's rows come through its forwarder
    // on this node, forwarder by forwarder, each forwarder's by origin, then token.
    b_rows_pc_.assign(z(P) * z(C), 0);
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < C; ++c) b_rows_pc_[z(topo.peer_on(my_node, p)) * z(C) + z(c)] += main.recv_counts[main.cp(c, p)];
    b.build_receive(P, C, 0, b_rows_pc_, {});
    const std::int64_t R = main.recv_rows();
    arrival_row.resize(z(R));
    row_arrival.resize(z(R));
    for (int c = 0; c < C; ++c) {
      std::int64_t i = b.chunk_recv_first(c);
      for (int q = 0; q < P; ++q)
        for (int p = 0; p < P; ++p) {
          if (topo.peer_on(my_node, p) != q) continue;
          for (std::int64_t r = main.recv_displ(c, p); r < main.recv_offsets[main.cp(c, p) + 1]; ++r, ++i) {
            arrival_row[z(i)] = r;
            row_arrival[z(r)] = i;
          }
        }
    }
    return;
  }
  per_node = false;
  for (int m = 0; m < topo.num_nodes(); ++m) per_node |= topo.node_size(m) > 1;
  if (!per_node) return;
  const std::int64_t S = main.send_rows(), T = main.tokens;
  row_node_.resize(z(S));
  for (int c = 0; c < C; ++c)
    for (int p = 0; p < P; ++p)
      for (std::int64_t r = main.send_displ(c, p); r < main.send_offsets[main.cp(c, p) + 1]; ++r)
        row_node_[z(r)] = topo.node_of(p);
  group_offsets.assign(1, 0);
  group_rows.clear();
  token_groups.assign(1, 0);
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int64_t i0 = main.token_offsets[z(t)], i1 = main.token_offsets[z(t) + 1];
    for (int m = 0; m < topo.num_nodes(); ++m) {
      const std::size_t before = group_rows.size();
      for (std::int64_t i = i0; i < i1; ++i) {  // a token's rows are in destination rank order
        const std::int64_t r = main.token_rows[z(i)];
        if (row_node_[z(r)] == m) group_rows.push_back(r);
      }
      if (group_rows.size() > before) group_offsets.push_back(static_cast<std::int64_t>(group_rows.size()));
    }
    token_groups.push_back(static_cast<std::int64_t>(group_offsets.size()) - 1);
  }
  group_ids.resize(group_offsets.size() - 1);
  for (std::size_t g = 0; g < group_ids.size(); ++g) group_ids[g] = static_cast<std::int64_t>(g);
}

void PassPlan::count(RouteStats& stats, std::int64_t row_bytes) const {
  stats.rows_sent = main.send_rows();
  stats.rows_received = main.recv_rows();
  stats.entries_processed = main.entries();
  stats.picks_dropped = dropped;
  // Dispatched rows to other ranks, and received rows from them, which the combine sends back.
  std::int64_t rows = origin().remote_rows(true) + origin().remote_rows(false);
  if (hierarchical()) rows += b.remote_rows(true) + b.remote_rows(false);  // the forwarders' stage
  stats.bytes_sent = rows * row_bytes;
}

}  // namespace moex::layer
