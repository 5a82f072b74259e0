// moex-bench's benchmarks beyond `layer` (bench.cpp): each one's entry point, called with the
// subcommand at argv[1].
#pragma once

#include "comm/mpi/mpi_communicator.h"
#include "examples/tool.h"

namespace moex::tools {

/// `moex-bench exchange`: the token exchange alone over a range of sizes (bench_exchange.cpp).
int bench_exchange(comm::MpiCommunicator& world, int argc, char** argv);
/// `moex-bench model`: the cluster cost model's predictions for every schedule (bench_model.cpp).
int bench_model(comm::MpiCommunicator& world, int argc, char** argv);

}  // namespace moex::tools
