// Communicators for device buffers, by name: what the tools' --device-comm option picks.
#pragma once

#include <mpi.h>

#include <chrono>
#include <memory>
#include <string>

#include "comm/communicator.h"

namespace moex::comm {

/// A communicator for DEVICE buffers over the ranks of `base` (duplicated), on the current CUDA
/// device, with `timeout` as its default deadline:
///   "staged": StagedCommunicator over an MpiCommunicator (ranks may share a GPU);
///   "nccl":   NcclCommunicator (one GPU per rank).
/// A collective over `base`. ConfigError for another name, or "nccl" in a build without NCCL.
std::unique_ptr<Communicator> make_device_communicator(const std::string& kind, MPI_Comm base,
                                                       std::chrono::milliseconds timeout);

/// Whether `c` moves device buffers in step with CUDA streams (a NcclCommunicator or a
/// StagedCommunicator), as the GPU layer needs.
bool is_device_communicator(const Communicator& c);

}  // namespace moex::comm
