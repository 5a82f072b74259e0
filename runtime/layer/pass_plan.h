// PassPlan: everything an expert-parallel pass decides on the host before a row moves, written once
// for the CPU and the CUDA layer: capacity, each pick's destination, the exchange plans (flat, or
// the two stages of the hierarchical exchange), their metadata exchanged ahead of the rows, where
// forwarded rows land, and how a token's returned rows are summed.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "runtime/layer/exchange_metadata.h"
#include "runtime/layer/expert_layout.h"
#include "scheduler/exchange_plan.h"
#include "scheduler/expert_placement.h"
#include "scheduler/replica_planner.h"
#include "scheduler/topology.h"

namespace moex::layer {

/// What a pass plan needs of its layer: where the experts live (kept pointing at the current
/// layout: it may change between passes in replica mode) and the pass's routing settings.
struct PassLayout {
  const ExpertLayout* experts = nullptr;
  std::int64_t topk = 0;         ///< K
  bool hierarchical = false;     ///< two-stage exchange through a forwarder per node
  double capacity_factor = 0.0;  ///< 0 = dropless (sched::apply_capacity otherwise)
  std::string name;              ///< prefixed to errors
};

/// What one forward pass routed (MoELayer::route_stats()), for logs and balancing.
struct RouteStats {
  std::vector<std::int64_t> expert_tokens;  ///< [E] picks of this rank's tokens per expert
  std::int64_t rows_sent = 0;               ///< rows of this rank's tokens, one per (token, destination rank)
  std::int64_t rows_received = 0;           ///< rows this rank's experts received
  std::int64_t entries_processed = 0;       ///< (row, expert) pairs this rank's experts computed
  /// Bytes of rows this rank sent to other ranks in the forward: every dispatch and combine, both
  /// stages of the hierarchical exchange (the metadata exchange ahead of them not counted).
  std::int64_t bytes_sent = 0;
  std::int64_t picks_dropped = 0;           ///< capacity-factor mode: this rank's picks over capacity
};

/// One rank's plan of one pass. Row spaces (all reused across passes, so a warm plan allocates
/// nothing):
///   main   this rank's tokens -> the ranks of their experts (the flat exchange), and what this
///          rank's slots receive, by ORIGIN: its receive side fixes the canonical entry order, so
///          every schedule and both exchanges compute the same entries in the same order;
///   a, b   hierarchical only: stage A (origin -> its peer with the same local index on each
///          destination node, one row per (token, node)) and stage B (that forwarder -> the owners on
///          its node; its "tokens" are stage A's receive rows, its receive rows arrive by chunk,
///          forwarder, origin, token). Stage B's arrival i is main's receive row arrival_row[i].
/// The rows carry only the hidden vector: codes and weights travel in the metadata exchange.
class PassPlan {
 public:
  /// Step 1 (local): drops the picks over capacity, routes the kept ones to (rank, slot), and builds
  /// the send sides for `tokens` tokens with top-K `ids` / `weights` ([tokens * K]) cut into `chunks`.
  void route(const PassLayout& layout, int rank, int world, std::span<const std::int32_t> ids,
             std::span<const float> weights, std::int64_t tokens, int chunks);
  /// Step 2, a blocking collective over `host` (every rank, in the same order as its other
  /// collectives; the CPU layer runs it on its communication thread): the metadata of main (and of
  /// stage A), within `timeout`.
  void exchange_metadata(comm::Communicator& host, std::chrono::milliseconds timeout);
  /// Step 3 (local): main's receive side (entries in canonical order), stage B and the arrival
  /// maps, and the per-node sum groups.
  void finish();

  const PassLayout& layout() const { return layout_; }
  bool hierarchical() const { return layout_.hierarchical; }
  /// The plan of the rows this rank sends first: main (flat) or stage A (hierarchical); a token's
  /// returned rows come back into it.
  const sched::ExchangePlan& origin() const { return hierarchical() ? a : main; }

  sched::ExchangePlan main, a, b;
  MetadataExchange meta_main, meta_a;
  std::vector<std::uint8_t> kept;  ///< [T*K] 1 where the pick is kept, 0 where capacity dropped it
  std::int64_t dropped = 0;        ///< this rank's picks over capacity
  /// Hierarchical: stage B's arrival i is main's receive row arrival_row[i]; row_arrival inverts it.
  std::vector<std::int64_t> arrival_row, row_arrival;
  /// How a token's rows coming back into origin() are summed: per node first (ranks in rank order),
  /// then the nodes' sums in node order, as a forwarder sums them, so that flat and hierarchical
  /// give the same bits. `per_node` (flat exchange with a node of several ranks): groups are the
  /// (token, node) pairs in token, then node order; group g sums the rows
  /// group_rows[group_offsets[g] .. group_offsets[g+1]); token t sums groups group_ids[
  /// token_groups[t] .. token_groups[t+1]) (group_ids = 0, 1, ...). Otherwise each token sums its
  /// rows origin().token_rows[token_offsets[t] ..] directly (one per node already).
  bool per_node = false;
  std::vector<std::int64_t> group_offsets, group_rows, token_groups, group_ids;
  std::int64_t groups() const { return static_cast<std::int64_t>(group_ids.size()); }
  /// Local-split: the first local slot whose own rows compute after the other ranks' rows
  /// (sched::own_split_slot of this rank's own entries per slot; set by finish()).
  std::int64_t own_split = 0;
  /// This pass's RouteStats but expert_tokens, for rows of `row_bytes` bytes.
  void count(RouteStats& stats, std::int64_t row_bytes) const;
  /// The milliseconds the last metadata exchange spent on its counts (a latency of the link).
  double counts_ms() const { return meta_main.counts_ms; }

 private:
  PassLayout layout_;
  std::vector<float> weights_;
  std::vector<std::int64_t> order_, b_chunks_, b_rows_pc_;
  std::vector<int> pick_rank_, fwd_rank_;
  std::vector<std::int32_t> pick_slot_, fwd_code_;
  std::vector<int> row_node_;
  std::vector<std::int64_t> own_entries_;
};

}  // namespace moex::layer
