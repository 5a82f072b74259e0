// RoutePlan (sender side) and ExpertBatchLayout (receiver side) of one token exchange.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

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
};

/// Receiver side: the (row, pick) entries of received rows grouped by local expert, so each expert
/// runs one GEMM over a contiguous block. Entries of one expert keep row order.
struct ExpertBatchLayout {
  std::vector<std::int64_t> offsets;  ///< [num_local + 1] start of each expert's block
  std::vector<std::int64_t> entry_row;   ///< [entries] received row index
  std::vector<std::int32_t> entry_pick;  ///< [entries] pick index j within the row (0..K-1)
  std::int64_t num_entries() const { return static_cast<std::int64_t>(entry_row.size()); }
  std::int64_t count(std::int64_t slot) const { return offsets[slot + 1] - offsets[slot]; }

  /// Groups the picks `row_slot` [rows * K] (-1 = empty) by local slot. Throws InvalidArgument on a
  /// slot >= num_local (a corrupted or mismatched message).
  void build(std::span<const std::int32_t> row_slot, std::int64_t rows, std::int64_t k,
             std::int64_t num_local);
};

}  // namespace moex::sched
