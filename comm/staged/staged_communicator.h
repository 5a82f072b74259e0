// Communicator for device buffers over a host Communicator (e.g. MpiCommunicator): data is staged
// through pinned host memory, so several ranks may share one GPU (NCCL refuses that).
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/device_communicator.h"

namespace moex::comm {

namespace detail {
struct StagedShared;  // comm stream, device and pinned staging pool (staged_communicator.cpp)
}  // namespace detail

/// Wraps a host Communicator for DEVICE buffers (host pointers work too: every copy is
/// cudaMemcpyDefault). Each op costs extra copies over PCIe compared with NCCL:
///   1. at issue, the data to send is copied device→host into a pinned staging buffer on the
///      staging stream, and the call waits (host side, bounded by the default timeout) for that
///      copy, so that the inner op is posted in issue order on every rank;
///   2. the inner (MPI) op moves the staged host data between the ranks;
///   3. when the inner op finished, the received data is copied host→device (only the blocks the
///      op writes: gaps between alltoallv blocks stay untouched), driven by completed()/wait().
/// In-place ops copy both ways; broadcast copies down on the root and up on the others only; gatherv
/// copies up on the root only; barrier moves no data.
///
/// Staging buffers come from a pool of pinned (page-locked) host blocks that are reused across
/// ops and grown (to the next power of two, at least 64 KiB) only when no free block is large
/// enough, so the steady state allocates nothing. Each outstanding op holds its own blocks.
///
/// Ordering: data produced on another stream must be finished when the op is issued, or made
/// visible with `wait_for_stream(producer)` first. When `wait()` returned (or `completed()` is
/// true) the received data is on the device and visible to every stream.
///
/// Timeouts: `wait(deadline)` throws TimeoutError naming the op, the rank, the peers and the phase
/// it was in; the op stays valid (as with MpiCommunicator) and can be waited on again. The staged
/// Work's sequence numbers count the ops issued through this communicator.
class StagedCommunicator final : public DeviceCommunicator {
 public:
  struct Options {
    /// Stream for the staging copies; null: the communicator creates (and owns) a non-blocking one.
    cudaStream_t stream = nullptr;
  };

  /// Takes ownership of `inner` (a host communicator; its default timeout follows this one's at
  /// each op). The current CUDA device is the one the buffers live on. Throws CudaError when
  /// there is no CUDA device, InvalidArgument when `inner` is null.
  explicit StagedCommunicator(std::unique_ptr<Communicator> inner, Options options);
  explicit StagedCommunicator(std::unique_ptr<Communicator> inner)
      : StagedCommunicator(std::move(inner), Options{}) {}
  ~StagedCommunicator() override;
  StagedCommunicator(const StagedCommunicator&) = delete;
  StagedCommunicator& operator=(const StagedCommunicator&) = delete;

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  /// The host communicator the staged data moves over.
  Communicator& inner() { return *inner_; }
  /// The stream the staging copies run on.
  cudaStream_t stream() const;
  /// The CUDA device the buffers are on (current at construction).
  int device() const;

  WorkPtr alltoall(const void* send, void* recv, std::int64_t count, DataType type,
                   std::string label) override;
  /// Stages only the span of `send` its blocks cover, exchanges packed host blocks, and copies each
  /// received block to its displacement in `recv` (the gaps are not written).
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
  std::vector<int> node_ids() override { return inner_->node_ids(); }
  bool allows_progress_thread() const override { return inner_->allows_progress_thread(); }

  /// Makes the staging stream wait (on the device) for everything enqueued on `producer` so far,
  /// so that ops issued afterwards stage the data `producer` writes. Does not block the host.
  void wait_for_stream(cudaStream_t producer) override;
  /// Waits on the host until `deadline`: then the received data is on the device for every stream.
  void consume(Work& work, cudaStream_t stream, Clock::time_point deadline) override;

  /// Pinned bytes the staging pool holds (free and in use).
  std::size_t staging_bytes() const;
  /// How many pinned blocks the pool has allocated so far (grows only when no free block fits).
  std::size_t staging_allocations() const;

 private:
  /// allreduce_sum (max = false) and allreduce_max: the same staging around the inner op.
  WorkPtr allreduce(void* data, std::int64_t count, DataType type, std::string label, bool max);

  std::unique_ptr<Communicator> inner_;
  std::shared_ptr<detail::StagedShared> shared_;
  std::uint64_t next_sequence_ = 0;
};

}  // namespace moex::comm
