#include "comm/device_communicator.h"

#include "base/error.h"
#include "comm/mpi/mpi_communicator.h"
#include "comm/staged/staged_communicator.h"
#ifdef MOEX_HAVE_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif

namespace moex::comm {

std::unique_ptr<DeviceCommunicator> make_device_communicator(const std::string& kind, MPI_Comm base,
                                                             std::chrono::milliseconds timeout) {
  std::unique_ptr<DeviceCommunicator> c;
  if (kind == "staged") {
    c = std::make_unique<StagedCommunicator>(std::make_unique<MpiCommunicator>(base));
  } else if (kind == "nccl") {
#ifdef MOEX_HAVE_NCCL
    NcclCommunicator::Options o;
    o.timeout = timeout;
    c = std::make_unique<NcclCommunicator>(base, o);
#else
    throw ConfigError("device communicator 'nccl': this build has no NCCL (use staged)");
#endif
  } else {
    throw ConfigError("device communicator '" + kind + "': expected staged or nccl");
  }
  c->set_default_timeout(timeout);
  return c;
}

DeviceCommunicator* as_device_communicator(Communicator& c) { return dynamic_cast<DeviceCommunicator*>(&c); }

bool is_device_communicator(const Communicator& c) { return dynamic_cast<const DeviceCommunicator*>(&c) != nullptr; }

}  // namespace moex::comm
