// PeerStatus: when a collective times out, ask the other ranks where they are, so that the error
// names the rank that has not arrived instead of listing every peer.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace moex::comm {

/// One per MpiCommunicator, as point-to-point messages on its communicator (MPI keeps them apart
/// from the collectives; the tags are moex's alone, since moex posts no other point-to-point). Each rank records the ops it posts and the waits it is in; every wait loop of the
/// process calls PeerStatus::serve_all(), which answers the queries that arrived. A rank whose op
/// timed out calls report(): it asks every peer, for a bounded time, what it last posted and what it
/// waits for, and turns the answers into text:
///   "not arrived at #41: rank 2 (its last op is #40 allreduce_sum(loss); it waits in no op: computing,
///    or stalled outside moex's collectives)"; "no answer within 1.0 s from rank(s) 3 (dead, or busy
///    outside MPI)"; "arrived: rank(s) 1".
/// Costs nothing on the data path: a lock and a ring write per posted op, one MPI_Test per poll.
class PeerStatus {
 public:
  /// Answers and asks on `comm`, which must outlive it or be left by close() first.
  PeerStatus(MPI_Comm comm, int rank, int size);
  ~PeerStatus();
  /// Stops answering and asking (before the communicator is freed); the Works that still hold this
  /// object then report nothing.
  void close();
  PeerStatus(const PeerStatus&) = delete;
  PeerStatus& operator=(const PeerStatus&) = delete;

  /// Op `sequence` (named `op`) was posted on this rank.
  void posted(std::uint64_t sequence, const std::string& op);
  /// This rank starts (`on`) or stops waiting on op `sequence`.
  void waiting(std::uint64_t sequence, bool on);

  /// What every peer says about op `sequence` (named `op` here), asked for at most `budget`.
  std::string report(std::uint64_t sequence, const std::string& op, std::chrono::milliseconds budget);

  /// Answers the status queries that reached any PeerStatus of this process (cheap; never blocks).
  static void serve_all();

  /// The wire format of a reply (fixed size, plain bytes).
  struct Reply {
    std::uint64_t query = 0;       // the sequence asked about
    std::uint64_t posted = 0;      // ops posted so far (the next op's sequence)
    std::uint64_t waiting_seq = 0;
    std::int64_t waiting_ms = -1;  // -1: not waiting on any op
    std::uint64_t waiting_other = 0;  // 1: the wait is on another communicator of the process
    char op_at_query[96] = {};     // the name this rank gave op `query`, when it posted it
    char last_op[96] = {};         // the name of its last posted op
    char waiting_op[96] = {};
  };

 private:
  void serve_locked();
  std::string name_of(std::uint64_t sequence) const;

  MPI_Comm comm_;  // MPI_COMM_NULL once closed
  int rank_, size_;
  mutable std::mutex mutex_;
  std::uint64_t posted_ = 0;
  std::vector<std::pair<std::uint64_t, std::string>> names_;  // ring of the last kNames posted ops
  struct Wait {
    std::uint64_t sequence;
    std::chrono::steady_clock::time_point since;
  };
  std::vector<Wait> waits_;
  // Buffers MPI may still write after a timeout or a late answer: kept for the object's life.
  std::uint64_t query_in_ = 0;
  MPI_Request query_req_ = MPI_REQUEST_NULL;
  std::vector<std::unique_ptr<Reply>> replies_out_;
  std::vector<MPI_Request> replies_out_req_;
  std::vector<std::uint64_t> queries_out_;
  std::vector<Reply> replies_in_;
};

}  // namespace moex::comm
