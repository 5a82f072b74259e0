// The metadata exchange of the expert-parallel pass (rows carry no routing codes): every rank's
// row counts and its rows' (code, weight) pairs move over a host communicator ahead of the rows,
// and each rank's sched::ExchangePlan gets its receive side from them.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <vector>

#include "comm/communicator.h"
#include "scheduler/exchange_plan.h"

namespace moex {

/// One rank's side of the exchange, its buffers reused across passes.
struct MetadataExchange {
  std::vector<float> send_meta;  ///< [S * 2K] this rank's send rows' codes, then weights (pack_meta)
  std::vector<float> recv_meta;  ///< [R * 2K] those of its receive rows, in receive row order
  double counts_ms = 0.0;        ///< the last run's alltoall of row counts (a latency: few bytes)

  /// A blocking collective over `host_comm` (every rank calls it, in the same order as every other
  /// collective on that communicator) for `plan`, whose send side is built (build_send) with
  /// routing weights `weights` ([tokens * K] of the plan): an allgather of every rank's chunk count
  /// and K (InvalidArgument naming the ranks that differ, on every rank), an alltoall of the row
  /// counts per (peer, chunk), an alltoallv of every chunk's metadata, each waited on until
  /// `timeout` from the call (TimeoutError naming the step otherwise); then
  /// plan.build_receive_from_meta() for `num_local` codes. InvalidArgument when the communicator's
  /// rank or size differ from the plan's, or a received code is not one of this rank's.
  void run(sched::ExchangePlan& plan, std::span<const float> weights, std::int64_t num_local,
           comm::Communicator& host_comm, std::chrono::milliseconds timeout);

 private:
  std::vector<std::int64_t> count_send_, count_recv_, recv_counts_;
  std::vector<std::int64_t> send_counts_, recv_counts_peer_, send_displs_, recv_displs_;
  std::vector<float> packed_send_, packed_recv_;
};

}  // namespace moex
