// EpPlan: every index array of one rank's expert-parallel pass (dispatch, expert batches, combine
// and their backward), built on the host from the rank's routing and the metadata its peers send.
// Executors that move rows with plain gather / combine primitives (the GPU layer) run a pass from
// it without looking at the routing themselves.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <vector>

#include "comm/communicator.h"
#include "scheduler/expert_placement.h"
#include "scheduler/route_plan.h"

namespace moex {

/// One rank's plan for one forward (and the matching backward) of a MoE layer whose routed
/// experts are placed by an ExpertPlacement, with the tokens cut into `chunks` pipeline chunks
/// (sched::chunk_begin). Built in two steps:
///   1. plan_send(): from this rank's top-K ids and weights (host copies), the send side;
///   2. exchange_metadata(): a blocking collective over a HOST communicator (every rank calls it,
///      in the same order as every other collective on that communicator) that moves the row counts
///      and the row metadata, then builds the receive side.
///
/// Row spaces (all indexes are global over the chunks; "rows" are [*, hidden] activations):
///   send rows    S = sum of send_counts: one per (token, destination rank) pair, ordered by chunk,
///                then destination rank, then token (so chunk c's rows to rank p are the contiguous
///                block at send_displ(c, p)).
///   recv rows    R = sum of recv_counts: what this rank's experts get, ordered by chunk, then
///                source rank, then the source's send order (chunk c's rows from p at
///                recv_displ(c, p)); the alltoallv of chunk c moves send block (c, p) of rank q to
///                recv block (c, q) of rank p.
///   entries      N = one per (recv row, pick on this rank): the rows the expert GEMMs see, ordered
///                by chunk, then local slot, then recv row, then top-K position (chunk c's entries
///                of slot s are the contiguous block at entry_displ(c, s), slot_counts(c, s) long).
///
/// Forward of chunk c:
///   send[i]      = x[send_token[i]]                                   i in chunk c's send rows
///   recv         = alltoallv(send)                                    chunk c's blocks
///   xe[n]        = recv[entry_row[n]]                                 n in chunk c's entries
///   ye           = experts(xe)  (slot s over its block of chunk c)
///   out[r]       = sum_{n in row_offsets[r]..row_offsets[r+1]} row_weight[n] * ye[row_entries[n]]
///                  (sum in top-K order; `row_entries` is an index into the entries and
///                  row_weight[n] = entry_weight[row_entries[n]])
///   back         = alltoallv(out)   (the reverse of the dispatch: recv block (c, q) to send block (c, p))
///   y[t]        += sum_{i in token_offsets[t]..token_offsets[t+1]} back[token_rows[i]]
///                  (in destination rank order)
/// Backward of chunk c, from dy:
///   send[i]      = dy[send_token[i]];  drecv = alltoallv(send)
///   dw_entry[n]  = dot(drecv[entry_row[n]], ye[n])                    routing-weight gradient
///   dye[n]       = entry_weight[n] * drecv[entry_row[n]]
///   dxe          = experts_backward(dye)        (and the expert weight gradients)
///   dx_out[r]    = sum_{n in row_offsets[r]..} dxe[row_entries[n]]
///   dw_out[r*K+j]= dw_entry[row_dw_entry[r*K+j]], or 0 where row_dw_entry is -1
///   dx_back, dw_back = alltoallv(dx_out), alltoallv(dw_out)  (dw blocks are K floats per row)
///   dx[t]       += sum_{i in token_offsets[t]..} dx_back[token_rows[i]]
///   d_weights[t*K+k] = dw_back[pick_back[t*K+k]], or 0 where pick_back is -1 (a dropped pick)
///
/// Every vector is reused across builds, so a warm plan allocates nothing.
struct EpPlan {
  int world = 0;
  int rank = 0;
  int chunks = 0;
  std::int64_t tokens = 0;
  std::int64_t topk = 0;
  std::int64_t num_local = 0;  ///< local expert slots of this rank
  /// [C + 1] the first token of each chunk (sched::chunk_begin, or plan_send_picks' chunk_starts).
  std::vector<std::int64_t> chunk_tokens;

  // ---- send side (plan_send) ----
  std::vector<std::int64_t> send_counts;  ///< [C*P] rows to rank p in chunk c, at c*P + p
  std::vector<std::int64_t> send_offsets; ///< [C*P + 1] exclusive prefix sums of send_counts
  std::vector<std::int64_t> send_token;   ///< [S] token of each send row
  /// [S * 2K] the metadata each send row carries to its destination: for j < K, [i*2K + j] is the
  /// local slot (at the destination, as a float) of the row's j-th pick there and [i*2K + K + j] its
  /// routing weight; unused positions are -1 and 0. Picks keep top-K order.
  std::vector<float> send_meta;
  std::vector<std::int64_t> token_offsets;  ///< [T + 1] per token, its send rows (CSR)
  std::vector<std::int64_t> token_rows;     ///< [S] the send rows of each token, by destination rank
  std::vector<std::int64_t> pick_back;      ///< [T*K] index into dw_back ([S*K]) of every pick; -1 = dropped

  // ---- receive side (exchange_metadata) ----
  std::vector<std::int64_t> recv_counts;   ///< [C*P] rows from rank p in chunk c, at c*P + p
  std::vector<std::int64_t> recv_offsets;  ///< [C*P + 1] exclusive prefix sums of recv_counts
  std::vector<float> recv_meta;            ///< [R * 2K] the metadata of every recv row
  std::vector<std::int64_t> slot_count;    ///< [C*S] entries of local slot s in chunk c, at c*S + s
  std::vector<std::int64_t> entry_offsets; ///< [C*S + 1] exclusive prefix sums of slot_count
  std::vector<std::int64_t> entry_row;     ///< [N] recv row of each entry
  std::vector<float> entry_weight;         ///< [N] routing weight of each entry
  std::vector<std::int64_t> row_offsets;   ///< [R + 1] per recv row, its entries (CSR)
  std::vector<std::int64_t> row_entries;   ///< [N] the entries of each recv row, in top-K order
  std::vector<float> row_weight;           ///< [N] entry_weight[row_entries[n]] (the combine's weights)
  std::vector<std::int64_t> row_dw_entry;  ///< [R*K] entry of position j of recv row r, or -1

  std::int64_t send_rows() const { return send_offsets.empty() ? 0 : send_offsets.back(); }
  std::int64_t recv_rows() const { return recv_offsets.empty() ? 0 : recv_offsets.back(); }
  std::int64_t entries() const { return entry_offsets.empty() ? 0 : entry_offsets.back(); }
  std::size_t cp(int c, int p) const {
    return static_cast<std::size_t>(c) * static_cast<std::size_t>(world) + static_cast<std::size_t>(p);
  }
  std::size_t cs(int c, std::int64_t s) const {
    return static_cast<std::size_t>(c) * static_cast<std::size_t>(num_local) + static_cast<std::size_t>(s);
  }
  /// First send / recv row of chunk c's block for rank p, and of chunk c (p = 0).
  std::int64_t send_displ(int c, int p) const { return send_offsets[cp(c, p)]; }
  std::int64_t recv_displ(int c, int p) const { return recv_offsets[cp(c, p)]; }
  /// First entry of chunk c's block for slot s; slot_counts(c, s) entries from there.
  std::int64_t entry_displ(int c, std::int64_t s) const { return entry_offsets[cs(c, s)]; }
  std::int64_t slot_counts(int c, std::int64_t s) const { return slot_count[cs(c, s)]; }
  /// Chunk c's send rows, recv rows and entries: [first, first + count).
  std::int64_t chunk_send_first(int c) const { return send_displ(c, 0); }
  std::int64_t chunk_send_count(int c) const {
    return send_offsets[cp(c, 0) + static_cast<std::size_t>(world)] - send_displ(c, 0);
  }
  std::int64_t chunk_recv_first(int c) const { return recv_displ(c, 0); }
  std::int64_t chunk_recv_count(int c) const {
    return recv_offsets[cp(c, 0) + static_cast<std::size_t>(world)] - recv_displ(c, 0);
  }
  std::int64_t chunk_entry_first(int c) const { return entry_displ(c, 0); }
  std::int64_t chunk_entry_count(int c) const {
    return entry_offsets[cs(c, 0) + static_cast<std::size_t>(num_local)] - entry_displ(c, 0);
  }
  /// Chunk c's block sizes / displacements per peer, in units of `width` elements per row (for
  /// AlltoallvArgs; relative to the chunk's first row). Written into `out` ([P]); returns it.
  std::span<const std::int64_t> send_block_counts(int c, std::int64_t width, std::vector<std::int64_t>& out) const;
  std::span<const std::int64_t> send_block_displs(int c, std::int64_t width, std::vector<std::int64_t>& out) const;
  std::span<const std::int64_t> recv_block_counts(int c, std::int64_t width, std::vector<std::int64_t>& out) const;
  std::span<const std::int64_t> recv_block_displs(int c, std::int64_t width, std::vector<std::int64_t>& out) const;

  /// Step 1. `topk_ids` / `topk_weights` are [tokens * K] host arrays; every id must be a routed
  /// expert of `placement` (InvalidArgument naming the token otherwise). chunks >= 1 (more chunks than
  /// tokens is allowed: some chunks are empty). `kept` ([tokens * K], or empty: every pick) marks the
  /// picks that reach their expert (sched::apply_capacity); a dropped pick makes no row and no entry,
  /// and its routing-weight gradient is 0.
  void plan_send(std::span<const std::int32_t> topk_ids, std::span<const float> topk_weights, std::int64_t tokens,
                 std::int64_t k, const sched::ExpertPlacement& placement, int rank, int chunks,
                 std::span<const std::uint8_t> kept = {});
  /// Step 1, general form (replica layouts: each pick chooses its replica): pick i = t*K + j goes to
  /// local slot pick_slot[i] of rank pick_rank[i] (-1: dropped), of `world` ranks; this rank
  /// (`rank`) holds `num_local` slots. `chunk_starts` ([chunks + 1], ascending from 0 to tokens)
  /// cuts the tokens into chunks instead of sched::chunk_begin (a forwarder's plan, whose "tokens"
  /// are the rows it received, chunk by chunk). InvalidArgument on sizes that differ, a rank outside
  /// [-1, world), a negative slot of a kept pick (a slot the destination does not hold is reported
  /// there, by build_receive()) or chunk starts that are not such a sequence.
  void plan_send_picks(std::span<const float> topk_weights, std::int64_t tokens, std::int64_t k, int world,
                       std::int64_t num_local, int rank, int chunks, std::span<const int> pick_rank,
                       std::span<const std::int32_t> pick_slot, std::span<const std::int64_t> chunk_starts = {});
  /// Step 2, a blocking collective over `host_comm` (host buffers; its rank and size must equal
  /// plan_send's): an allgather of every rank's chunk count (InvalidArgument naming the ranks and
  /// counts when they differ, on every rank), an alltoall of the [C] row counts per peer, then one
  /// alltoallv of the metadata of all chunks (packed peer by peer, unpacked into the recv row
  /// order), each waited on until `timeout` from the call (TimeoutError naming the step otherwise);
  /// then build_receive(). InvalidArgument when a received slot is not one of this rank's.
  void exchange_metadata(comm::Communicator& host_comm, std::chrono::milliseconds timeout);
  /// The receive side from already exchanged data (what exchange_metadata() does after its
  /// communication; public for tests): recv_counts and recv_meta set as described above.
  void build_receive();

 private:
  std::vector<std::int64_t> count_send_, count_recv_;
  std::vector<std::int64_t> meta_send_counts_, meta_recv_counts_, meta_send_displs_, meta_recv_displs_;
  std::vector<std::int64_t> cursor_;
  std::vector<int> pick_rank_;          // plan_send()'s picks for plan_send_picks()
  std::vector<std::int32_t> pick_slot_;
};

}  // namespace moex
