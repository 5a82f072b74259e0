// Communicator over NCCL for device buffers: grouped send/recv and NCCL collectives on a comm
// stream, each op tracked by a CUDA event and polled against a deadline.
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>

#include <chrono>
#include <exception>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/device_communicator.h"
#include "comm/mpi/mpi_communicator.h"

namespace moex::comm {

namespace detail {
struct NcclShared;  // the NCCL communicator, its stream and its abort state (nccl_communicator.cpp)
struct NcclOpEvent;
}  // namespace detail

/// Handle to one NCCL op. Besides the Work contract it lets a compute stream wait for the op on the
/// device, without blocking the host.
///
/// NCCL runs with non-blocking communicators, so an op may still be launching (NCCL connects to
/// peers in the background) when the call returns; the op's CUDA event is recorded on the comm
/// stream only once NCCL reports the launch done. `completed()` and `wait()` drive that step.
class NcclWork final : public Work {
 public:
  NcclWork(std::uint64_t sequence, std::string op, std::chrono::milliseconds default_timeout,
           std::shared_ptr<detail::NcclShared> shared, std::shared_ptr<detail::NcclOpEvent> event);
  ~NcclWork() override;
  NcclWork(const NcclWork&) = delete;
  NcclWork& operator=(const NcclWork&) = delete;

  /// True once the op's kernels finished on the device, or the op failed (wait() reports which).
  bool completed() override;
  /// Polls the op's event and NCCL's asynchronous error state until the op finished or `deadline`
  /// passed. On an NCCL error throws moex::NcclError (NCCL's error string and last-error text); on
  /// expiry aborts the NCCL communicator (its kernels cannot be cancelled otherwise) and throws
  /// moex::TimeoutError naming the op, the rank and the peers. Once the communicator was aborted,
  /// every wait on an unfinished op throws NcclError("communicator aborted after ...").
  void wait(Clock::time_point deadline) override;
  /// Makes `stream` wait on the device for this op (cudaStreamWaitEvent): work enqueued on `stream`
  /// afterwards sees the received data. Does not block the host, except for finishing NCCL's
  /// background launch of the op (bounded by the communicator's default timeout).
  void wait_on_stream(cudaStream_t stream);
  /// The event recorded on the comm stream after the op, once its launch finished (bounded by the
  /// default timeout as in wait_on_stream()). Owned by this Work: valid while it lives.
  cudaEvent_t event();

 private:
  /// Finishes NCCL's background launch by `deadline` so that the event is recorded.
  void ensure_recorded(Clock::time_point deadline);
  std::string timeout_message(Clock::time_point deadline) const;

  std::shared_ptr<detail::NcclShared> shared_;
  std::shared_ptr<detail::NcclOpEvent> event_;
  Clock::time_point posted_at_;
  std::chrono::milliseconds timeout_;  ///< the communicator's default timeout when the op was issued
  bool done_ = false;
  bool timed_out_ = false;
  std::exception_ptr error_;  ///< the failure wait() rethrows (NcclError, CudaError)
};

/// Communicator over NCCL. Every buffer passed to its ops is a DEVICE pointer on this rank's GPU
/// (the device current at construction). One GPU per rank: NCCL refuses two ranks on one device,
/// which the constructor detects and reports (use StagedCommunicator for shared GPUs).
///
/// Ordering: every op is enqueued on the comm stream. Data produced on another stream must be
/// finished before the op is issued, or made visible with `wait_for_stream(producer)` first; data
/// received is ready for another stream after `NcclWork::wait_on_stream()`, or on the host side
/// after `wait()`.
class NcclCommunicator final : public DeviceCommunicator {
 public:
  struct Options {
    /// Stream the ops are enqueued on; null: the communicator creates (and owns) a non-blocking one.
    cudaStream_t stream = nullptr;
    /// Deadline of the construction steps (id exchange, NCCL init) and the initial default timeout.
    std::chrono::milliseconds timeout{300'000};
  };

  /// Creates the NCCL communicator over the ranks of `base` (a collective over `base`, which is
  /// duplicated): checks that each rank has its own GPU, creates the NCCL unique id on rank 0,
  /// broadcasts it over MPI and initialises NCCL with it, all within `options.timeout`. Throws
  /// ConfigError when ranks share a GPU, CudaError when this rank has no CUDA device, NcclError when
  /// NCCL fails and TimeoutError when a rank does not join in time.
  explicit NcclCommunicator(MPI_Comm base, Options options);
  explicit NcclCommunicator(MPI_Comm base = MPI_COMM_WORLD) : NcclCommunicator(base, Options{}) {}
  /// Finalises the NCCL communicator once no NcclWork refers to it any more (aborting it if that
  /// does not finish within the default timeout).
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }
  /// The CUDA device of this rank's NCCL communicator.
  int device() const;
  /// The stream the ops are enqueued on.
  cudaStream_t stream() const;

  /// Grouped ncclSend/ncclRecv per peer (zero-count blocks skipped, the own block copied locally).
  WorkPtr alltoall(const void* send, void* recv, std::int64_t count, DataType type,
                   std::string label) override;
  /// Grouped ncclSend/ncclRecv per peer at the given (or packed) displacements. Counts must match
  /// pairwise (send_counts[p] here == recv_counts[me] on p): NCCL cannot detect a mismatch and the
  /// op then times out.
  WorkPtr alltoallv(const AlltoallvArgs& args) override;
  WorkPtr allreduce_sum(void* data, std::int64_t count, DataType type, std::string label) override;
  WorkPtr allreduce_max(void* data, std::int64_t count, DataType type, std::string label) override;
  WorkPtr allgather(const void* send, void* recv, std::int64_t count, DataType type,
                    std::string label) override;
  /// Grouped sends to `root`, receives on root (blocks packed in rank order).
  WorkPtr gatherv(const void* send, std::int64_t send_count, void* recv,
                  std::span<const std::int64_t> recv_counts, DataType type, int root,
                  std::string label) override;
  WorkPtr broadcast(void* data, std::int64_t count, DataType type, int root,
                    std::string label) override;
  /// A one-element allreduce on a device scratch value.
  WorkPtr barrier(std::string label) override;
  /// Node ids from the MPI communicator this one was built from.
  std::vector<int> node_ids() override { return mpi_->node_ids(); }
  bool allows_progress_thread() const override { return true; }

  /// Makes the comm stream wait (on the device) for everything enqueued on `producer` so far, so
  /// that ops issued afterwards read the data `producer` writes. Does not block the host, except
  /// for finishing NCCL's background launch of the previous op (bounded by the default timeout).
  void wait_for_stream(cudaStream_t producer) override;
  /// `stream` waits on the device for `work` (an NcclWork of this communicator): NcclWork::wait_on_stream.
  void consume(Work& work, cudaStream_t stream, Clock::time_point deadline) override;
  /// Aborts the NCCL communicator now (e.g. after another rank failed): kernels in flight stop,
  /// unfinished ops fail and later ops throw NcclError naming `reason`.
  void abort(const std::string& reason);
  /// Whether the communicator was aborted (by a timeout, an NCCL error or abort()).
  bool aborted() const;

  /// A collective over `comm`: "" when every rank of it uses its own GPU (the current CUDA device),
  /// else a description of the ranks that share one, e.g. "ranks 0,1 share GPU 0000:01:00.0 on
  /// host h; NCCL needs one GPU per rank; 2 ranks share 1 device". Every rank gets the same answer.
  /// Throws CudaError when this rank has no CUDA device.
  static std::string gpu_sharing_problem(MpiCommunicator& comm);

 private:
  WorkPtr finish_issue(std::string op, std::shared_ptr<detail::NcclOpEvent> event);
  /// allreduce_sum (max = false) and allreduce_max: the same checks and launch, ncclSum or ncclMax.
  WorkPtr allreduce(void* data, std::int64_t count, DataType type, std::string label, bool max);

  std::unique_ptr<MpiCommunicator> mpi_;
  std::shared_ptr<detail::NcclShared> shared_;
  std::uint64_t next_sequence_ = 0;
};

}  // namespace moex::comm
