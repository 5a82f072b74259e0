// moex-bench layer --device cuda (built only with CUDA): see bench_layer_gpu.cpp.
#pragma once

#include <cstdint>
#include <string>

#include "comm/mpi/mpi_communicator.h"
#include "runtime/io/moe_config.h"
#include "runtime/moe_layer.h"

namespace moex::tools {

/// What moex-bench layer parsed, for the GPU run.
struct GpuBenchArgs {
  MoeConfig config;
  LayerOptions schedule;
  std::int64_t tokens_per_rank = 0, iters = 1, warmup = 0;
  std::uint64_t seed = 1;
  double skew = 0.0;
  std::string device_comm = "staged";  ///< staged or nccl
  std::string precision = "bf16";      ///< fp32 or bf16
  bool json = false;
  /// Hot-expert replicas: the warmup passes' load planned into a layout (ceil(E / ranks) +
  /// spare_slots slots per rank), migrated to before the timed passes.
  bool replicas = false;
  std::int64_t spare_slots = 1;
};

/// Times the expert-parallel GpuMoELayer (each rank on GPU rank % devices). Prints "SKIPPED: no CUDA
/// device (...)" and returns 0 where there is none.
int bench_layer_gpu(comm::MpiCommunicator& world, const GpuBenchArgs& args);

}  // namespace moex::tools
