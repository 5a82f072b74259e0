// The moves of an expert-parallel pass's rows over a PassPlan, written once for both layers: the
// flat exchange, the hierarchical one's two stages with the forwarder's gather and sum between
// them, and each token's sum of what came back. A backend (the CPU layer over MPI on its
// communication thread, the CUDA layer over its device communicator) supplies the five moves.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/layer/pass_plan.h"

namespace moex::layer {

/// The row buffers a pass moves between (each backend maps them to its memory). Rows are the hidden
/// vector in the backend's element type; a buffer's `dw` twin holds K fp32 routing-weight
/// gradients per row (backward only).
enum class Buf : int {
  kOriginSend,  ///< [origin send rows] the rows this rank sends first (main, or stage A)
  kOriginBack,  ///< [origin send rows] their sums coming back (dw twin)
  kRecv,        ///< [main recv rows] received rows at their canonical place
  kRet,         ///< [main recv rows] one row back per received row (dw twin)
  kARecv,       ///< forwarder: [stage-A recv rows] the rows stage A brought
  kARet,        ///< forwarder: [stage-A recv rows] their sums going back to the origins (dw twin)
  kBSend,       ///< forwarder: [stage-B send rows] the rows on to the owners
  kBBack,       ///< forwarder: [stage-B send rows] what the owners return (dw twin)
  kBRecv,       ///< owner: [stage-B recv rows] arrivals in arrival order
  kBRet,        ///< owner: [stage-B recv rows] the rows back, in arrival order (dw twin)
  kPartial,     ///< [groups] per-(token, node) partial sums (PassPlan::per_node)
  kOut,         ///< [tokens] the pass's result, which the returned rows are summed into
  kPicks,       ///< dw only: [tokens * K] the routing-weight gradient of every pick
};

/// The buffers a backend owns and sizes per pass (kOut and kPicks are the pass's result, given by
/// its caller): Buf values 0 .. kOwnedBufs - 1.
inline constexpr int kOwnedBufs = static_cast<int>(Buf::kPartial) + 1;
/// The rows buffer `b` needs this pass (0 where the pass does not use it: the forwarder's buffers of
/// the flat exchange, kPartial without per-node sums), and whether it has a dw twin (K fp32 per row,
/// backward only): the one sizing table of both backends.
std::int64_t buffer_rows(const PassPlan& plan, Buf b);
bool has_dw_twin(Buf b);

/// The moves a backend supplies. Index arrays are PassPlan's host vectors; a device backend maps
/// each to its uploaded copy. Row arguments are row numbers within the buffer.
class RowMoves {
 public:
  virtual ~RowMoves() = default;
  /// dst[dst_row + i] = src[index[at + i]] for i < n (dw: the K-wide dw twins).
  virtual void gather(std::int64_t n, const std::vector<std::int64_t>& index, std::int64_t at, Buf src, Buf dst,
                      std::int64_t dst_row, bool dw) = 0;
  /// dst[dst_row + i] = src[src_row + i] for i < n (dw: the K-wide dw twins).
  virtual void copy(std::int64_t n, Buf src, std::int64_t src_row, Buf dst, std::int64_t dst_row, bool dw) = 0;
  /// dw twins as flat value arrays: dst[dst_at + i] = index[at + i] >= 0 ? src[index[at + i]] : 0.
  virtual void gather_values(std::int64_t n, const std::vector<std::int64_t>& index, std::int64_t at, Buf src, Buf dst,
                             std::int64_t dst_at) = 0;
  /// For rows r < n: dst[dst_row + r] = (accumulate ? dst[dst_row + r] : 0) + the rows
  /// src[members[i]] for i in [offsets[at + r], offsets[at + r + 1]), in that order.
  virtual void sum(std::int64_t n, const std::vector<std::int64_t>& offsets, std::int64_t at,
                   const std::vector<std::int64_t>& members, Buf src, Buf dst, std::int64_t dst_row, bool accumulate) = 0;
  /// Chunk c of `plan`: out, its send blocks (from `from` at chunk_send_first) to the peers' receive
  /// blocks (into `to` at chunk_recv_first); back, the reverse. `skip_self` leaves this rank's own
  /// block out (local-first). A CPU backend completes it before returning; a device backend may
  /// return once it is issued.
  virtual void exchange(const sched::ExchangePlan& plan, int c, bool out, Buf from, Buf to, bool dw, bool skip_self,
                        const std::string& label) = 0;
  /// What the exchanges issued so far received may be read by the moves that follow.
  virtual void ready() = 0;
};

/// The count and displacement arrays of one chunk exchange (reused across exchanges).
struct HostBlocks {
  std::vector<std::int64_t> send_counts, send_displs, recv_counts, recv_displs;
};

/// Chunk c of `plan` as one alltoallv over `comm` (a backend's RowMoves::exchange), rows `width`
/// elements of `type` wide, `from` / `to` at row 0 of their buffers: out, the send blocks (from
/// chunk_send_first) to the receive blocks (at chunk_recv_first); back, the reverse. `skip_self`
/// leaves this rank's own block out. Fills `blocks` (send_counts: the elements sent to each peer)
/// and returns the pending op.
comm::WorkPtr exchange_chunk(comm::Communicator& comm, const sched::ExchangePlan& plan, int c, bool out,
                             std::int64_t width, comm::DataType type, const void* from, void* to, bool skip_self,
                             std::string label, HostBlocks& blocks);

/// Chunk c's rows from kOriginSend towards kRecv: flat, one exchange; hierarchical, stage A, the
/// forwarder's gather, stage B issued. Then arrive() puts them at their place.
void dispatch(const PassPlan& plan, RowMoves& m, int c, bool skip_self, const std::string& label);
/// After dispatch(): chunk c's rows readable in kRecv (hierarchical: stage B's arrivals put at their
/// rows).
void arrive(const PassPlan& plan, RowMoves& m, int c);
/// Chunk c's rows of kRet (and with `dw` their routing-weight gradients) on their way back: flat,
/// the exchange into kOriginBack; hierarchical, into arrival order and stage B back. Then relay()
/// finishes the hierarchical way.
void give_back(const PassPlan& plan, RowMoves& m, int c, bool dw, bool skip_self, const std::string& label);
/// Hierarchical, after give_back(): the forwarder sums each stage-A row's returns (ranks in rank
/// order) and sends the sums (and the gradients at their stage-A pick positions) back into
/// kOriginBack. Nothing to do for the flat exchange.
void relay(const PassPlan& plan, RowMoves& m, int c, bool dw, const std::string& label);
/// Local-first (flat exchange): this rank's own block of every chunk, which the exchanges leave out
/// (skip_self), from kOriginSend to its place in kRecv; after its stage, from kRet back into
/// kOriginBack (with `dw` their routing-weight gradients too).
void keep_own(const PassPlan& plan, RowMoves& m);
void own_back(const PassPlan& plan, RowMoves& m, bool dw);
/// Chunk c's tokens: the rows that came back summed into kOut (added when `accumulate`), per node
/// first, then the nodes in node order; with `dw` the routing-weight gradients into kPicks.
void sum_returns(const PassPlan& plan, RowMoves& m, int c, bool accumulate, bool dw);

}  // namespace moex::layer
