// Capacity-factor token dropping: which of a rank's top-K picks reach their expert.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moex::sched {

/// InvalidArgument naming `who` unless capacity_factor is finite and >= 0 (0 = dropless).
void check_capacity_factor(double capacity_factor, const std::string& who);

/// The per-rank capacity of every expert for `picks` picks (tokens * K) over `experts` experts:
/// ceil(capacity_factor * picks / experts), at most `picks`. capacity_factor must be > 0.
std::int64_t expert_capacity(double capacity_factor, std::int64_t picks, std::int64_t experts);

/// Capacity-factor mode (GShard / DeepSpeed-MoE rule, applied by each rank to its own picks): of the
/// picks i = t*K + j that chose expert e (`topk_ids` [picks], ids in [0, experts)), at most
/// expert_capacity(capacity_factor, picks, experts) are kept: those with the largest routing weights
/// (`topk_weights` [picks]), ties going to the earlier pick. Writes kept[i] = 1 (kept) or 0 (dropped)
/// and returns the number dropped. capacity_factor <= 0 keeps every pick. `order` is scratch (reused
/// across calls). InvalidArgument for sizes that differ, experts < 1 or an id out of range.
std::int64_t apply_capacity(std::span<const std::int32_t> topk_ids, std::span<const float> topk_weights,
                            std::int64_t experts, double capacity_factor, std::vector<std::uint8_t>& kept,
                            std::vector<std::int64_t>& order);

}  // namespace moex::sched
