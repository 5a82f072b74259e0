// The pipeline schedule of one expert-parallel pass and the cost model that chooses it
// (`--chunks auto`): pure arithmetic over measured rates, no MPI, no timing of its own.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "scheduler/exchange_plan.h"

namespace moex::sched {

/// How one pass is staged.
///   chunks:      the tokens are cut into this many ranges; chunk i+1's rows travel while chunk i's
///                experts compute (each expert's GEMM is cut into as many pieces).
///   local_first: the rows a rank routes to itself skip the exchange and are computed first, every
///                chunk's in one GEMM per expert, while the other ranks' rows travel.
///   local_split: (with local_first) in the forward only the own rows of the slots before
///                own_split_slot() are computed first; the rest after the last chunk's combine is
///                issued, so that they hide the last return as the first ones hide the first
///                dispatch. Every expert keeps one GEMM over its own rows. The backward runs as
///                local_first: its weight gradients already hide its last return.
struct Schedule {
  int chunks = 1;
  bool local_first = false;
  bool local_split = false;
  bool operator==(const Schedule&) const = default;
  std::string describe() const;  ///< e.g. "chunks 2, local-first"
};

/// The schedule a layer runs for fixed options: local_split implies local_first, and both hold only
/// for the flat exchange with more than one rank (else a rank's own rows are all there is, or they
/// travel through a forwarder); the same rule for every backend.
Schedule fixed_schedule(int chunks, bool local_first, bool local_split, bool flat_exchange, int world);

/// Rates measured on this machine.
struct MachineRates {
  double gemm_fixed_ms = 0.0;  ///< one expert FFN GEMM pair (forward) at zero rows: packing, calls
  double gemm_row_ms = 0.0;    ///< ... and per row
  /// This rank's exchange rate (bytes it sends or receives, whichever is more, per ms); <= 0 when
  /// nothing was measured (no other rank): exchanges then cost nothing.
  double link_bytes_per_ms = 0.0;
  /// What every exchange costs on top of its bytes (a small all-to-all's time): a chunked schedule
  /// pays it once per chunk and exchange.
  double exchange_latency_ms = 0.0;
};

/// One rank's work in one pass; none of it depends on the schedule.
struct PassWork {
  std::vector<std::int64_t> self_entries;                  ///< [S] entries of each local expert from own tokens
  std::vector<std::vector<std::int64_t>> remote_entries;   ///< [S][other sources] entries from each other rank
  /// Bytes to and from other ranks (the larger of the two) of the four exchanges of a pass.
  double fwd_dispatch_bytes = 0, fwd_combine_bytes = 0, bwd_dispatch_bytes = 0, bwd_combine_bytes = 0;
  double shared_fwd_ms = 0, shared_bwd_ms = 0;  ///< the shared experts (they overlap the first dispatch)
  double other_ms = 0;  ///< gate, permutes, weighted sums: the same for every schedule
};

/// The entries each local slot of `plan` receives from its own rank, over every chunk, into `out`
/// ([num_local]; reused, so a warm caller allocates nothing).
void own_entries(const ExchangePlan& plan, std::vector<std::int64_t>& out);

/// The schedule-independent work of the pass `plan` describes (rows `hidden` fp32 wide, top-`topk`):
/// the entries of each local slot by source, and the exchanges' bytes to and from other ranks. The
/// times (shared_*_ms, other_ms) are the caller's measurements.
PassWork pass_work(const ExchangePlan& plan, std::int64_t hidden, std::int64_t topk);

/// Predicted milliseconds of one forward + backward.
struct Prediction {
  double forward_ms = 0, backward_ms = 0;
  double total_ms() const { return forward_ms + backward_ms; }
};

/// Local-split: the slot where the own rows computed last begin: the first s whose own entries in
/// slots [0, s) come closest to half of all (`self_entries`: per local slot; 0 when there are none).
std::int64_t own_split_slot(std::span<const std::int64_t> self_entries);

/// The time of one expert's forward GEMMs over `rows` rows (0 for none). Backward data and weight
/// GEMMs have the same shapes and are modelled alike.
double gemm_ms(const MachineRates& r, std::int64_t rows);

/// Simulates the pass on two resources (the compute thread; the communication stream, exchanges
/// in the order they are issued), as MoELayer runs it: dispatches issued at once, shared experts
/// then (local_first) the own rows while they travel, per chunk {wait dispatch, experts, issue the
/// combine}, (local_split) the own rows of the later slots; backward the same (no split), then the weight gradients over each expert's whole block while the
/// last combines travel. overlap = false: everything in sequence.
Prediction predict(const PassWork& work, const MachineRates& rates, Schedule schedule, bool overlap);

/// The schedules `--chunks auto` considers: chunks 1, 2, 3, 4, 6, 8, each also with local_first and
/// with local_split where they apply (more than one rank, the flat exchange).
std::vector<Schedule> candidate_schedules(int world, bool flat_exchange);

/// Index of the schedule to run among `candidates` (candidates[0] must be {1, false}), given each
/// one's predicted time (the slowest rank's): the fastest, unless it saves less than `min_gain` (a
/// fraction) or `min_gain_ms` over candidates[0], which needs no splitting at all (so a small or
/// noisy pass keeps the schedule whose results a run with --chunks 1 reproduces bit for bit).
std::size_t choose_schedule(const std::vector<Schedule>& candidates, const std::vector<double>& predicted_ms,
                            double min_gain = 0.03, double min_gain_ms = 2.0);

}  // namespace moex::sched
