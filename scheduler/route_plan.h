// RoutePlan (sender side) and ExpertBatchLayout (receiver side) of one token exchange.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "scheduler/exchange_plan.h"  // chunk_begin
#include "scheduler/expert_placement.h"

namespace moex::sched {

/// Sender side of a dispatch: every (token, destination rank) pair becomes one row, so a token is
/// sent at most once to each rank however many of its experts live there. Rows are ordered by
/// destination rank, then token; each row carries up to K (local slot, top-K index) picks, padded
/// with -1.
struct RoutePlan {
  std::int64_t topk = 0;
  std::vector<std::int64_t> rows_per_rank;   ///< [world] rows sent to each rank
  std::vector<std::int64_t> row_token;       ///< [rows] local token index of each row
  std::vector<std::int32_t> row_slot;        ///< [rows * K] destination local expert slot, -1 = none
  std::vector<std::int32_t> row_k;           ///< [rows * K] top-K position of that pick, -1 = none
  std::int64_t num_rows() const { return static_cast<std::int64_t>(row_token.size()); }

  /// Builds the plan for `tokens` tokens whose top-K expert ids are `topk_ids` [tokens * K].
  /// Reuses this object's storage. Throws InvalidArgument on an expert id out of range.
  void build(std::span<const std::int32_t> topk_ids, std::int64_t tokens, std::int64_t k,
             const ExpertPlacement& placement);
  /// General form: expert e goes to destination dest_of_expert[e] (of num_dest; a rank or a node)
  /// with code code_of_expert[e] (a local slot, or the global id); row_slot then holds codes.
  void build(std::span<const std::int32_t> topk_ids, std::int64_t tokens, std::int64_t k, int num_dest,
             std::span<const int> dest_of_expert, std::span<const std::int32_t> code_of_expert);
  /// Most general form: pick i = t*K + j goes to destination pick_dest[i] with code pick_code[i]
  /// (e.g. the replica each pick chose); -1 = the pick goes nowhere (dropped). InvalidArgument on a
  /// destination outside [-1, num_dest).
  void build_picks(std::int64_t tokens, std::int64_t k, int num_dest, std::span<const int> pick_dest,
                   std::span<const std::int32_t> pick_code);

 private:
  std::vector<int> pick_dest_;           // scratch of build()
  std::vector<std::int32_t> pick_code_;
};

/// Receiver side: the (row, pick) entries of received rows grouped by local expert, so each expert
/// runs one GEMM over a contiguous block (MoELayer fills it in ReceiveLayout's canonical order).
struct ExpertBatchLayout {
  std::vector<std::int64_t> offsets;  ///< [num_local + 1] start of each expert's block
  std::vector<std::int64_t> entry_row;   ///< [entries] received row index
  std::vector<std::int32_t> entry_pick;  ///< [entries] pick index j within the row (0..K-1)
  std::int64_t num_entries() const { return static_cast<std::int64_t>(entry_row.size()); }
  std::int64_t count(std::int64_t slot) const { return offsets[slot + 1] - offsets[slot]; }
};

/// Receiver side of a chunked exchange, fixed before any token moves, from the counts each sender
/// announced for every chunk. It gives received rows and expert entries one canonical order that does
/// not depend on the number of chunks or on the path the rows took (flat or via a forwarder):
///   rows:    by source rank, then the source's token order;
///   entries: by local expert, then source rank, then token order.
/// So the expert GEMMs see the same rows in the same order, and produce bitwise the same results,
/// however the batch was chunked or exchanged.
struct ReceiveLayout {
  int world = 0;
  int chunks = 0;
  std::int64_t num_local = 0;
  std::vector<std::int64_t> rows;            ///< [p*C + c] rows from rank p in chunk c
  std::vector<std::int64_t> row_base;        ///< [p*C + c] canonical index of the first of them
  std::vector<std::int64_t> picks;           ///< [(s*P + p)*C + c] entries for local expert s
  std::vector<std::int64_t> entry_base;      ///< [(s*P + p)*C + c] canonical index of the first
  std::vector<std::int64_t> expert_offsets;  ///< [S + 1] start of each expert's entries
  std::int64_t total_rows = 0;
  std::int64_t total_entries = 0;

  /// rows_pc: [P*C] rows from p in chunk c; picks_pcs: [(p*C + c)*S + s] entries for slot s.
  void build(int world_size, int num_chunks, std::int64_t num_local_experts,
             std::span<const std::int64_t> rows_pc, std::span<const std::int64_t> picks_pcs);
  std::size_t rc(int p, int c) const { return static_cast<std::size_t>(p) * static_cast<std::size_t>(chunks) + static_cast<std::size_t>(c); }
  std::size_t spc(std::int64_t s, int p, int c) const {
    return (static_cast<std::size_t>(s) * static_cast<std::size_t>(world) + static_cast<std::size_t>(p)) * static_cast<std::size_t>(chunks) + static_cast<std::size_t>(c);
  }
  /// Rows of chunk c (all sources).
  std::int64_t chunk_rows(int c) const;
};


}  // namespace moex::sched
