// ExchangePlan: one rank's token exchange in one pass of a MoE layer, written once for every
// backend. Pure: no communication, no device; the layers move the bytes it describes.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "scheduler/expert_placement.h"
#include "scheduler/replica_planner.h"
#include "scheduler/topology.h"

namespace moex::sched {

/// Routing codes (a local expert slot, or rank-in-node * slots + slot for a forwarder) travel beside
/// the rows as float values, exact for integers below 2^24; -1 = no pick at that position.
inline constexpr std::int64_t kMaxRoutingCode = std::int64_t{1} << 24;

/// Where every pick i = t*K + j of this rank's `ids` ([tokens * K]) goes: the rank and the local slot
/// there that compute it. Placement mode (`layout` null): the expert's owner. Replica mode
/// (`placement` null): the replica ReplicaLayout::choose() names for (expert, rank, token), which
/// depends on the token's index in the whole batch, so not on the chunking. A pick whose `kept` flag
/// is 0 (capacity-factor mode; empty = every pick kept) goes nowhere: rank and slot -1.
/// InvalidArgument on an expert id outside the placement's or layout's experts.
void route_picks(std::span<const std::int32_t> ids, std::span<const std::uint8_t> kept, std::int64_t k,
                 const ExpertPlacement* placement, const ReplicaLayout* layout, const Topology& topology, int rank,
                 std::vector<int>& pick_rank, std::vector<std::int32_t>& pick_slot);

/// Stage A of the hierarchical exchange: a pick for rank d goes to d's node, to the rank there with
/// this rank's local index (its forwarder), with code local_index(d) * max_slots + slot; dropped
/// picks stay -1. InvalidArgument when codes would reach kMaxRoutingCode.
void forward_picks(std::span<const int> pick_rank, std::span<const std::int32_t> pick_slot, const Topology& topology,
                   int rank, std::int64_t max_slots, std::vector<int>& fwd_rank, std::vector<std::int32_t>& fwd_code);

/// Stage B of the hierarchical exchange, at the forwarder: the picks of the `rows` stage-A rows it
/// received (row i's K codes at meta[i*stride + j], its K weights at meta[i*stride + K + j]) to the
/// rank of this node the code names, node_ranks[code / max_slots], and the slot there,
/// code % max_slots; -1 (no pick) stays -1. Writes [rows * K] ranks, slots and, when `weights` is
/// not null, weights (0 where there is no pick). InvalidArgument on a code that is not -1 or below
/// node_ranks.size() * max_slots.
void forwarded_picks(const float* meta, std::int64_t rows, std::int64_t stride, std::int64_t k,
                     std::span<const int> node_ranks, std::int64_t max_slots, std::vector<int>& pick_rank,
                     std::vector<std::int32_t>& pick_slot, std::vector<float>* weights = nullptr);

/// One exchange of rows, both sides. Row spaces:
///
///   send rows  one per (token, destination rank) pair, so a token travels at most once to a rank
///              however many of its picks live there; ordered by chunk, then destination, then token
///              (chunk c's rows to rank p: the block at send_displ(c, p)). Each row carries up to K
///              (code, top-K position) picks in top-K order, padded with -1.
///   recv rows  what this rank's experts get, ordered by chunk, then source rank, then the source's
///              send order (chunk c's rows from p: the block at recv_displ(c, p)). Row positions are
///              storage only: no result depends on them.
///   entries    one per (recv row, pick on this rank), in the CANONICAL order: by local slot, then
///              source rank, then chunk, then row, then top-K position. A source's tokens come chunk
///              after chunk in token order, so this is the order a single chunk gives, for every
///              chunking, every schedule and every path the rows took (flat, or via a forwarder).
///              Expert GEMMs over a slot's entries therefore see the same rows in the same order:
///              deterministic mode gives the same bits for every schedule, and flat equals
///              hierarchical. Block (s, p, c), the entries of slot s from p in chunk c, starts at
///              entry_base[spc(s, p, c)], picks[spc(s, p, c)] long; slot s's entries are
///              [slot_offsets[s], slot_offsets[s + 1]).
///
/// Built in two steps, every vector reused so a warm plan allocates nothing:
///   1. build_send():               the send side, from each pick's destination and code;
///   2. build_receive_from_meta():  the receive side, from the codes and weights every source sent
///      ahead of the rows (build_receive() alone sizes a receive side without entries).
struct ExchangePlan {
  int world = 0;
  int rank = 0;
  int chunks = 0;
  std::int64_t tokens = 0;
  std::int64_t topk = 0;
  /// [C + 1] the first token of each chunk (chunk_begin(), or build_send()'s chunk_starts).
  std::vector<std::int64_t> chunk_tokens;

  // ---- send side ----
  std::vector<std::int64_t> send_counts;    ///< [C*P] rows to rank p in chunk c, at c*P + p
  std::vector<std::int64_t> send_offsets;   ///< [C*P + 1] exclusive prefix sums of send_counts
  std::vector<std::int64_t> send_token;     ///< [S] token of each send row
  std::vector<std::int32_t> send_code;      ///< [S*K] code of the row's f-th pick, -1 = none
  std::vector<std::int32_t> send_k;         ///< [S*K] top-K position of that pick, -1 = none
  std::vector<std::int64_t> token_offsets;  ///< [T + 1] per token, its send rows (CSR) ...
  std::vector<std::int64_t> token_rows;     ///< [S] ... in destination order
  std::vector<std::int64_t> pick_back;      ///< [T*K] send row * K + f of every pick; -1 = dropped

  // ---- receive side ----
  std::int64_t num_local = 0;               ///< local expert slots (codes a row may name)
  std::vector<std::int64_t> recv_counts;    ///< [C*P] rows from rank p in chunk c, at c*P + p
  std::vector<std::int64_t> recv_offsets;   ///< [C*P + 1] exclusive prefix sums of recv_counts
  std::vector<std::int64_t> picks;          ///< [S*P*C] entries of block (s, p, c), at spc(s, p, c)
  std::vector<std::int64_t> entry_base;     ///< [S*P*C] canonical index of the block's first entry
  std::vector<std::int64_t> slot_offsets;   ///< [S + 1] start of each slot's entries
  std::vector<std::int64_t> entry_row;      ///< [N] recv row of each entry
  std::vector<std::int32_t> entry_pick;     ///< [N] top-K position of the pick within its row
  std::vector<float> entry_weight;          ///< [N] its routing weight
  std::vector<std::int64_t> row_entry;      ///< [R*K] entry of position j of recv row r, or -1

  std::int64_t send_rows() const { return send_offsets.empty() ? 0 : send_offsets.back(); }
  std::int64_t recv_rows() const { return recv_offsets.empty() ? 0 : recv_offsets.back(); }
  std::int64_t entries() const { return slot_offsets.empty() ? 0 : slot_offsets.back(); }
  std::int64_t slot_entries(std::int64_t s) const { return slot_offsets[static_cast<std::size_t>(s) + 1] - slot_offsets[static_cast<std::size_t>(s)]; }
  std::size_t cp(int c, int p) const { return static_cast<std::size_t>(c) * static_cast<std::size_t>(world) + static_cast<std::size_t>(p); }
  std::size_t spc(std::int64_t s, int p, int c) const {
    return (static_cast<std::size_t>(s) * static_cast<std::size_t>(world) + static_cast<std::size_t>(p)) *
               static_cast<std::size_t>(chunks) + static_cast<std::size_t>(c);
  }
  std::int64_t send_displ(int c, int p) const { return send_offsets[cp(c, p)]; }
  std::int64_t recv_displ(int c, int p) const { return recv_offsets[cp(c, p)]; }
  std::int64_t chunk_send_first(int c) const { return send_displ(c, 0); }
  std::int64_t chunk_send_count(int c) const { return send_offsets[cp(c, 0) + static_cast<std::size_t>(world)] - send_displ(c, 0); }
  std::int64_t chunk_recv_first(int c) const { return recv_displ(c, 0); }
  std::int64_t chunk_recv_count(int c) const { return recv_offsets[cp(c, 0) + static_cast<std::size_t>(world)] - recv_displ(c, 0); }
  /// Chunk c's per-peer blocks of the send side (`send_side`) or the receive side, in units of
  /// `width` elements per row, relative to the chunk's first row ([P] counts and displacements).
  void chunk_blocks(int c, bool send_side, std::int64_t width, std::vector<std::int64_t>& counts,
                    std::vector<std::int64_t>& displs) const;
  /// Rows this rank sends to (`send_side`) or receives from the other ranks, over every chunk.
  std::int64_t remote_rows(bool send_side) const;

  /// Step 1. Pick i = t*K + j goes to rank pick_dest[i] of `world` (-1: dropped, no row) with code
  /// pick_code[i]. `chunk_starts` ([chunks + 1], ascending from 0 to tokens) cuts the tokens into
  /// chunks instead of chunk_begin() (a forwarder's plan, whose "tokens" are the rows it received).
  /// InvalidArgument on sizes that differ, a rank outside [-1, world), a code of a kept pick outside
  /// [0, kMaxRoutingCode), chunks < 1, or chunk starts that are not such a sequence.
  void build_send(std::span<const int> pick_dest, std::span<const std::int32_t> pick_code, std::int64_t tokens,
                  std::int64_t k, int world, int rank, int chunks, std::span<const std::int64_t> chunk_starts = {});
  /// The K codes and then the K routing weights of every send row ([S * 2K]; weights from
  /// `topk_weights` [tokens * K], 0 where there is no pick): the metadata a row carries.
  void pack_meta(std::span<const float> topk_weights, std::vector<float>& out) const;

  /// The canonical layout of `num_local` slots from the counts of every source: rows_pc[p*C + c]
  /// rows from p in chunk c, picks_pcs[(p*C + c)*S + s] of them for slot s. Sets world, chunks and
  /// the receive side's sizes (entries not placed); K is `topk`, set by build_send() (or by hand).
  /// InvalidArgument on topk < 1, a negative count or sizes that differ.
  void build_receive(int world, int chunks, std::int64_t num_local, std::span<const std::int64_t> rows_pc,
                     std::span<const std::int64_t> picks_pcs);
  /// Step 2, from the codes exchanged ahead of the rows: recv_counts [C*P] (chunk-major, as the
  /// member) and `meta` [R * 2K] in recv row order (each row's K codes, then its K weights). Every
  /// pick becomes an entry of block (slot, source, chunk) in row, then top-K order.
  /// InvalidArgument naming the row's code when it is not -1 or a slot of this rank, or on sizes
  /// that differ.
  void build_receive_from_meta(int world, int chunks, std::int64_t num_local,
                               std::span<const std::int64_t> recv_counts_cp, std::span<const float> meta);

  /// The entries in the order a backend computes them, for one that computes each group of a
  /// pass's entries as one contiguous block per slot. Groups, for C chunks and S slots:
  ///   self < 0 (every stage a whole chunk): group c is chunk c, every source;
  ///   self = this rank (local-first): group 0 is `self`'s own rows of every chunk for the slots
  ///     before `split`, group 1 + c chunk c's other sources, group C + 1 `self`'s own rows for the
  ///     slots from `split` (local-split; empty when split = S).
  /// Within a group's slot block the entries keep their canonical order (source, chunk, row, pick).
  /// The index arrays the gather and combine kernels read (every index below is a compute position
  /// n, not a canonical entry):
  ///   order[n]          the canonical entry at position n; position[e] its inverse (listing
  ///                     position[] slot by slot gives every slot's entries in canonical order: a
  ///                     weight gradient's rows in an order no schedule changes);
  ///   group_slot[g*S+s] entries of slot s in group g, from group_offsets[g*S+s] ([G*S + 1]);
  ///   entry_row[n], entry_weight[n]   the recv row and routing weight of position n;
  ///   row_offsets [R+1], row_entries [N], row_weight [N]   per recv row, its positions in top-K
  ///                     order and their weights (the combine: out[r] = sum w * ye[n]);
  ///   row_dw_entry[r*K+j]  the position of pick j of recv row r, or -1.
  struct ComputeOrder {
    int groups = 0;
    std::int64_t split = 0;  ///< local-first: the first slot of group C + 1
    std::vector<std::int64_t> order, position, group_slot, group_offsets;
    std::vector<std::int64_t> entry_row, row_offsets, row_entries, row_dw_entry;
    std::vector<float> entry_weight, row_weight;
    std::int64_t first(int g, std::int64_t s, std::int64_t slots) const {
      return group_offsets[static_cast<std::size_t>(g) * static_cast<std::size_t>(slots) + static_cast<std::size_t>(s)];
    }
  };
  /// InvalidArgument when `self` is not -1 or this plan's rank, or `split` is outside [0, S].
  void compute_order(ComputeOrder& out, int self = -1, std::int64_t split = 0) const;

 private:
  std::vector<std::int64_t> cursor_;
  std::vector<std::int64_t> rows_pc_, picks_pcs_;  // build_receive_from_meta()'s counts
};

/// Token range [begin, end) of chunk c when `tokens` are cut into `chunks` near-equal pieces.
inline std::int64_t chunk_begin(std::int64_t tokens, int chunks, int c) { return tokens * c / chunks; }

/// The float a routing code travels as, and back (InvalidArgument unless -1 or an integer in
/// [0, limit)).
inline float encode_code(std::int32_t code) { return static_cast<float>(code); }
std::int32_t decode_code(float v, std::int64_t limit, const char* what);

}  // namespace moex::sched
