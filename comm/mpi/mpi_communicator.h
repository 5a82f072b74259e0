// Communicator over MPI for host buffers: nonblocking collectives polled against a deadline.
#pragma once

#include <mpi.h>

#include <memory>

#include "comm/communicator.h"

namespace moex::comm {

class PeerStatus;

/// Initialises MPI (if needed) for the whole process and finalises it on destruction.
/// Asks for the `requested` thread level (MULTIPLE by default, so a communication stream may drive
/// MPI beside the compute thread) and records what was provided.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv, int requested = MPI_THREAD_MULTIPLE);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  int provided_thread_level() const { return provided_; }

 private:
  int provided_ = 0;
  bool owns_ = false;
};

/// Communicator over an MPI communicator (duplicated on construction, freed on destruction).
class MpiCommunicator final : public Communicator {
 public:
  /// Duplicates `base` (a collective over it, MPI_Comm_idup) and waits for that until `timeout`
  /// (0: MOEX_TIMEOUT_S, else 300 s), which also becomes default_timeout(); TimeoutError naming
  /// the duplication when a rank of `base` does not join in time.
  explicit MpiCommunicator(MPI_Comm base = MPI_COMM_WORLD, std::chrono::milliseconds timeout = {});
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm native() const { return comm_; }

  WorkPtr alltoall(const void* send, void* recv, std::int64_t count, DataType type,
                   std::string label) override;
  WorkPtr alltoallv(const AlltoallvArgs& args) override;
  WorkPtr allreduce_sum(void* data, std::int64_t count, DataType type, std::string label) override;
  WorkPtr allreduce_max(void* data, std::int64_t count, DataType type, std::string label) override;
  WorkPtr allgather(const void* send, void* recv, std::int64_t count, DataType type,
                    std::string label) override;
  WorkPtr gatherv(const void* send, std::int64_t send_count, void* recv,
                  std::span<const std::int64_t> recv_counts, DataType type, int root,
                  std::string label) override;
  WorkPtr broadcast(void* data, std::int64_t count, DataType type, int root,
                    std::string label) override;
  WorkPtr barrier(std::string label) override;
  /// Node detection (MPI_Comm_split_type over shared memory) is guarded: every rank first meets
  /// the others in a nonblocking barrier with the default deadline, so a missing rank becomes a
  /// TimeoutError naming node detection instead of a hang.
  std::vector<int> node_ids() override;
  bool allows_progress_thread() const override { return thread_level_ >= MPI_THREAD_SERIALIZED; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  std::uint64_t next_sequence_ = 0;
  int thread_level_ = MPI_THREAD_SINGLE;
  std::shared_ptr<PeerStatus> status_;  // where the peers are when an op times out; null alone
};

}  // namespace moex::comm
