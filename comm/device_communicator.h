// Communicators for device buffers, by name: what the tools' --device-comm option picks.
#pragma once

#include <cuda_runtime_api.h>
#include <mpi.h>

#include <chrono>
#include <memory>
#include <string>

#include "comm/communicator.h"

namespace moex::comm {

/// What communicators of DEVICE buffers add to Communicator: ordering against CUDA streams. The
/// GPU layer drives its exchanges through this interface only, whichever backend it holds
/// (NcclCommunicator: on the device; StagedCommunicator: through pinned host memory over MPI).
class DeviceCommunicator : public Communicator {
 public:
  /// Orders this communicator's next ops after the work queued on `producer` so far (on the
  /// device; the host goes on).
  virtual void wait_for_stream(cudaStream_t producer) = 0;
  /// Makes `stream` see what `work` (an op of this communicator) received: on the device where the
  /// backend can (NCCL: the host goes on), else by waiting on the host until `deadline` (staged:
  /// the host drives its copies to the device). TimeoutError after the deadline.
  virtual void consume(Work& work, cudaStream_t stream, Clock::time_point deadline) = 0;
};

/// A communicator for DEVICE buffers over the ranks of `base` (duplicated), on the current CUDA
/// device, with `timeout` as its default deadline:
///   "staged": StagedCommunicator over an MpiCommunicator (ranks may share a GPU);
///   "nccl":   NcclCommunicator (one GPU per rank).
/// A collective over `base`. ConfigError for another name, or "nccl" in a build without NCCL.
std::unique_ptr<DeviceCommunicator> make_device_communicator(const std::string& kind, MPI_Comm base,
                                                             std::chrono::milliseconds timeout);

/// `c` as a DeviceCommunicator (a NcclCommunicator or a StagedCommunicator), or null when it moves
/// host buffers: the one check at the boundary where a layer is handed a plain Communicator.
DeviceCommunicator* as_device_communicator(Communicator& c);
bool is_device_communicator(const Communicator& c);

}  // namespace moex::comm
