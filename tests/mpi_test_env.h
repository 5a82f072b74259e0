// Shared state of a multi-rank test binary: the world communicator created by mpi_test_main.cpp.
#pragma once

#include "comm/mpi/mpi_communicator.h"

namespace moex::testing {

/// The communicator over all ranks of this test run (valid inside TEST bodies).
comm::MpiCommunicator& world();

/// True on every rank iff `ok` is true on every rank (a collective: call it on all ranks).
bool all_ranks(bool ok);

}  // namespace moex::testing
