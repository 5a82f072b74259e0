// One tiny DeepSeekMoE layer over the MPI ranks this runs on (experts sharded across them): a forward
// of a few tokens per rank, then a checksum of the output.
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <vector>

#include "comm/mpi/mpi_communicator.h"
#include "runtime/moe_layer.h"
#include "runtime/random.h"
#include "scheduler/expert_placement.h"
#ifdef MOEX_CONSUMER_WITH_CUDA
#include "runtime/cuda/device.h"
#endif

int main(int argc, char** argv) {
  moex::comm::MpiRuntime mpi(&argc, &argv);  // MPI_Init_thread now, MPI_Finalize at the end
  try {
    moex::comm::MpiCommunicator comm(MPI_COMM_WORLD);
    moex::MoeConfig cfg;  // DeepSeek-V3 routing (sigmoid, noaux_tc over 2 groups), tiny shapes
    cfg.hidden_size = 16, cfg.moe_intermediate_size = 8, cfg.n_routed_experts = 8, cfg.n_shared_experts = 1;
    cfg.num_experts_per_tok = 2, cfg.n_group = 2, cfg.topk_group = 1;
    cfg.validate();
    moex::MoELayer layer(cfg, comm, moex::sched::ExpertPlacement::contiguous(cfg.n_routed_experts, comm.size()), "moe");
    moex::Rng rng(2024);  // the same seed on every rank keeps the replicated parameters identical
    rng.fill_normal(layer.replicated().value.data(), static_cast<std::int64_t>(layer.replicated().value.size()), 0.25);
    moex::Rng own(7 + static_cast<std::uint64_t>(comm.rank()));
    own.fill_normal(layer.experts().value.data(), static_cast<std::int64_t>(layer.experts().value.size()), 0.25);
    const std::int64_t tokens = 4;
    std::vector<float> x(static_cast<std::size_t>(tokens * cfg.hidden_size)), y(x.size());
    own.fill_normal(x.data(), static_cast<std::int64_t>(x.size()), 1.0);
    layer.forward(x.data(), tokens, y.data());
    double checksum = 0.0;
    for (float v : y) checksum += std::abs(v);
    if (!std::isfinite(checksum) || checksum == 0.0) throw std::runtime_error("forward gave no finite output");
    std::printf("moex consumer: rank %d of %d, %lld tokens, %lld local experts, checksum %.6f\n", comm.rank(),
                comm.size(), static_cast<long long>(tokens), static_cast<long long>(layer.num_local_experts()), checksum);
#ifdef MOEX_CONSUMER_WITH_CUDA
    std::printf("moex consumer: moex::cuda linked, %d CUDA device(s)\n", moex::cuda::cuda_device_count());
#endif
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moex consumer: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);  // the other ranks may be waiting in a collective
  }
  return 0;
}
