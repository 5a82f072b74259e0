// GpuMoELayer in expert-parallel mode against the CPU MoELayer with the same placement, at 1, 2 and 4
// ranks: top-K ids and weights, rows per local expert slot, y, dx, this rank's gradients, and the
// replicated gradients after their all-reduce, for the configs of test_cuda_layer.cpp, fp32 and
// bf16, 1 and 3 pipeline chunks, uneven token counts (rank 1 has none).
//
// The device communicator is a StagedCommunicator over MPI, so every rank may share the single GPU
// of a test machine; at one rank the same runs over NCCL too (NCCL refuses ranks sharing a GPU, so
// those tests skip at more ranks unless every rank has its own GPU). The constructor's checks run
// without a device; every other test skips with "no CUDA device: <reason>" where there is none.
//
// Tolerances as in test_cuda_layer.cpp (max |got - want| / max |want| per tensor): 1e-5 in fp32,
// 2e-2 in bf16.
#include <gtest/gtest.h>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "base/error.h"
#include "comm/mpi/mpi_communicator.h"
#include "comm/staged/staged_communicator.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_executor.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/model/trainer.h"
#include "runtime/moe_layer.h"
#include "scheduler/expert_placement.h"
#include "tests/cuda_layer_cases.h"
#ifdef MOEX_HAVE_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif

namespace moex::cuda {
namespace {

/// Tokens of rank r in step `step`: uneven, and none on rank 1.
int64_t tokens_of(int rank, int step) {
  static constexpr int64_t kTokens[] = {37, 0, 61, 16};
  return kTokens[rank % 4] + (rank == 1 ? 0 : 11 * step);
}

// ---------------------------------------------------------------------------------------------------
// Host-only: the expert-parallel constructor's checks run before any CUDA call.

TEST(CudaEpLayerHost, RejectsBadCommunicatorsAndPlacements) {
  comm::MpiCommunicator world(MPI_COMM_WORLD);
  const MoeConfig cfg = v3_like();
  const int P = world.size();
  const auto placement = sched::ExpertPlacement::contiguous(cfg.n_routed_experts, P);
  auto expect_invalid = [&](const std::string& what, const std::string& needle, auto&& make) {
    try {
      make();
      ADD_FAILURE() << what << ": accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
          << what << ": the error should mention '" << needle << "'; got: " << e.what();
    }
  };
  expect_invalid("a host MpiCommunicator as the device communicator", "NcclCommunicator or a StagedCommunicator",
                 [&] { GpuMoELayer gpu(cfg, world, world, placement); });
  GpuLayerOptions zero_chunks;
  zero_chunks.chunks = -1;
  expect_invalid("chunks = -1", "chunks = -1", [&] { GpuMoELayer gpu(cfg, world, world, placement, zero_chunks); });
  expect_invalid("a topology for another world size", "topology is for", [&] {
    GpuMoELayer gpu(cfg, world, world, placement, {}, sched::Topology::single_node(P + 1));
  });
  expect_invalid("a placement for another world size", "placement is for",
                 [&] { GpuMoELayer gpu(cfg, world, world, sched::ExpertPlacement::contiguous(cfg.n_routed_experts, P + 1)); });
  expect_invalid("a placement of another expert count", "n_routed_experts",
                 [&] { GpuMoELayer gpu(cfg, world, world, sched::ExpertPlacement::contiguous(cfg.n_routed_experts * 2, P)); });
  const sched::Topology wider = sched::Topology::from_node_ids(std::vector<int>(static_cast<std::size_t>(P + 1), 0));
  expect_invalid("a replica layout for another world size", "replica layout is for", [&] {
    const auto layout = sched::identity_layout(cfg.n_routed_experts, wider, cfg.n_routed_experts);
    GpuMoELayer gpu(cfg, world, world, layout, wider);
  });
}

// ---------------------------------------------------------------------------------------------------
// GPU vs CPU

struct EpParam {
  const char* config;
  LayerPrecision precision;
  int chunks;
  bool aux = false;        // auxiliary balance losses on (large coefficients, several sequences per rank)
  double capacity = 0.0;   // capacity factor (0 = dropless)
  bool replicas = false;   // replica mode: a layout planned for a skewed load (hot experts replicated)
  bool deterministic = false;  // fixed-order expert GEMMs, weight gradients once per backward
  bool hier = false;           // the hierarchical exchange, on 2-rank nodes
  bool serial = false;         // overlap off: every exchange waited for once issued, shared experts inline
  int own = 0;                 // 1: local-first (own rows skip the exchange); 2: local-split
};
std::string name_of(const EpParam& p) {
  return std::string(p.config) + "_" + to_string(p.precision) + "_c" + std::to_string(p.chunks) +
         (p.aux ? "_aux" : "") + (p.capacity > 0.0 ? "_capacity" : "") + (p.replicas ? "_replicas" : "") +
         (p.deterministic ? "_det" : "") + (p.hier ? "_hier" : "") + (p.serial ? "_serial" : "") +
         (p.own == 1 ? "_localfirst" : p.own == 2 ? "_localsplit" : "");
}

/// Replica mode at P ranks on 2-rank nodes: every rank ceil(E / P) + 1 slots, the layout planned for
/// a Zipf-like load, so the hot experts have several replicas (on other nodes too at 4 ranks).
struct ReplicaSetup {
  sched::Topology topology;
  sched::ReplicaLayout identity, planned;
};
ReplicaSetup replica_setup(const MoeConfig& cfg, int P) {
  std::vector<int> nodes(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) nodes[static_cast<std::size_t>(r)] = r / 2;
  const sched::Topology topo = sched::Topology::from_node_ids(nodes);
  const int64_t E = cfg.n_routed_experts, slots = (E + P - 1) / P + 1;
  std::vector<double> load(static_cast<std::size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    load[static_cast<std::size_t>(e)] = 1000.0 / std::pow(static_cast<double>(e + 1), 1.2);
  return {topo, sched::identity_layout(E, topo, slots), sched::plan_replicas(load, topo, cfg.n_group, slots)};
}
void PrintTo(const EpParam& p, std::ostream* os) { *os << name_of(p); }

class CudaEpLayer : public ::testing::TestWithParam<EpParam> {
 protected:
  void SetUp() override {
    std::string why;
    // Every rank sees the same machine, so every rank skips alike.
    const int devices = cuda_device_count(&why);
    if (devices == 0) GTEST_SKIP() << "no CUDA device: " << why;
    host_ = std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD);
    MOEX_CUDA_CHECK(cudaSetDevice(host_->rank() % devices));  // one GPU: every rank shares it
    stream_.emplace();
  }
  cudaStream_t stream() const { return stream_->get(); }

  /// Steps of a CPU layer and a GPU layer over `device_comm`, compared after each (rank r draws its
  /// own tokens), then the replicated gradients after both all-reduces.
  void run_and_compare(const EpParam& p, comm::Communicator& device_comm, const std::string& backend) {
    const LayerCase c = case_of(p.config);
    const bool bf16 = p.precision == LayerPrecision::kBf16;
    const double tol = bf16 ? kBf16Tol : kFp32Tol;
    const int P = host_->size(), r = host_->rank();
    const auto placement = sched::ExpertPlacement::contiguous(c.config.n_routed_experts, P);
    LayerOptions cpu_opt;
    cpu_opt.chunks = p.chunks;
    cpu_opt.capacity_factor = p.capacity;
    cpu_opt.deterministic = p.deterministic;
    cpu_opt.exchange = p.hier ? ExchangeKind::kHierarchical : ExchangeKind::kFlat;
    cpu_opt.local_first = p.own >= 1;
    cpu_opt.local_split = p.own == 2;
    std::optional<ReplicaSetup> rs;
    std::unique_ptr<MoELayer> cpu;
    if (p.replicas) {
      rs = replica_setup(c.config, P);
      cpu = make_cpu_layer(c, bf16, 21, *host_, rs->identity, rs->topology, cpu_opt);
      cpu->set_replica_layout(rs->planned);  // a collective: moves the slot blocks
      int64_t multi = 0;
      for (int64_t e = 0; e < c.config.n_routed_experts; ++e) multi += rs->planned.num_replicas(e) > 1 ? 1 : 0;
      EXPECT_GT(multi, 0) << "the planned layout should replicate some hot expert";
    } else {
      cpu = make_cpu_layer(c, bf16, 21, *host_, placement, cpu_opt, replica_setup(c.config, P).topology);
    }
    if (p.aux) {
      AuxLossOptions aux;
      aux.seq_alpha = 0.5f;
      aux.seq_len = 6;
      aux.expert_alpha = 0.1f;
      cpu->set_aux_loss(aux);
    }
    GpuLayerOptions opt;
    opt.precision = p.precision;
    opt.chunks = p.chunks;
    opt.capacity_factor = p.capacity;
    opt.deterministic = p.deterministic;
    opt.exchange = cpu_opt.exchange;
    opt.overlap = opt.overlap_shared = !p.serial;
    opt.local_first = cpu_opt.local_first;
    opt.local_split = cpu_opt.local_split;
    std::unique_ptr<GpuMoELayer> made =
        rs ? std::make_unique<GpuMoELayer>(c.config, *host_, device_comm, rs->planned, rs->topology, opt)
           : std::make_unique<GpuMoELayer>(c.config, *host_, device_comm, placement, opt, cpu->topology());
    GpuMoELayer& gpu = *made;
    gpu.load_from(*cpu);
    ASSERT_EQ(gpu.num_local_experts(), rs ? rs->planned.slots_per_rank() : placement.num_local(r));

    for (int step = 0; step < 3; ++step) {
      const int64_t T = tokens_of(r, step);
      const std::string tag = "[" + backend + " " + name_of(p) + " rank " + std::to_string(r) + "/" +
                              std::to_string(P) + " T=" + std::to_string(T) + " step " + std::to_string(step) + "]";
      step_and_compare(tag, *cpu, gpu, draw_batch(*cpu, T, 1000 + 17 * static_cast<std::uint64_t>(r) + step, bf16), T,
                       tol, stream());
      EXPECT_EQ(gpu.picks_dropped(), cpu->route_stats().picks_dropped) << tag << " picks dropped by capacity";
      LayerRouteStats stats;
      gpu.pass_plan()->count(stats, 4 * c.config.hidden_size);
      EXPECT_EQ(stats.rows_sent, cpu->route_stats().rows_sent) << tag << " (token, rank) rows sent";
      EXPECT_EQ(stats.rows_received, cpu->route_stats().rows_received) << tag << " rows the experts received";
      EXPECT_EQ(stats.bytes_sent, cpu->route_stats().bytes_sent) << tag << " bytes sent";
      if (p.capacity > 0.0 && T > 0) {
        EXPECT_GT(cpu->route_stats().picks_dropped, 0) << tag << " the case should drop picks";
      }
    }
    // Replicated gradients summed over the ranks on both sides (and in replica mode each expert's
    // gradient over its replicas).
    cpu->allreduce_replicated_grads()->wait();
    cpu->reduce_replica_grads();
    gpu.allreduce_replicated_grads(stream());
    const std::string tag = "[" + backend + " " + name_of(p) + " rank " + std::to_string(r) + "] all-reduced ";
    EXPECT_TRUE(
        within(gpu.replicated_grads_host(stream()), cpu->replicated().grad, tol, tag + "gate and shared grads"));
    EXPECT_TRUE(within(gpu.expert_grads_host(stream()), cpu->experts().grad, tol, tag + "expert grads"));
    if (rs) {  // a GPU layer in another layout refuses the CPU layer's parameters
      GpuMoELayer stale(c.config, *host_, device_comm, rs->identity, rs->topology, opt);
      try {
        stale.load_from(*cpu);
        ADD_FAILURE() << tag << "load_from accepted a CPU layer in another replica layout";
      } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("replica layout differs"), std::string::npos) << e.what();
      }
    }
  }

 private:
  std::optional<Stream> stream_;

 protected:
  std::unique_ptr<comm::MpiCommunicator> host_;
};

/// The same device setup for tests that are not parameterised (they never call GetParam()).
class CudaEpLayerSchedule : public CudaEpLayer {};

TEST_P(CudaEpLayer, StagedMatchesCpuLayer) {
  comm::StagedCommunicator device(std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD));
  run_and_compare(GetParam(), device, "staged");
}

TEST_P(CudaEpLayer, NcclMatchesCpuLayer) {
#ifndef MOEX_HAVE_NCCL
  GTEST_SKIP() << "built without NCCL";
#else
  int devices = 0;
  MOEX_CUDA_CHECK(cudaGetDeviceCount(&devices));
  if (host_->size() > devices)
    GTEST_SKIP() << host_->size() << " ranks share " << devices
                 << " GPU(s); NCCL needs one GPU per rank (the staged test covers this case)";
  comm::NcclCommunicator device(MPI_COMM_WORLD);
  run_and_compare(GetParam(), device, "nccl");
#endif
}

INSTANTIATE_TEST_SUITE_P(Configs, CudaEpLayer,
                         ::testing::Values(EpParam{"v3_like", LayerPrecision::kFp32, 1},
                                           EpParam{"v3_like", LayerPrecision::kFp32, 3},
                                           EpParam{"v3_like", LayerPrecision::kBf16, 3},
                                           EpParam{"v2_lite_like", LayerPrecision::kFp32, 2},
                                           EpParam{"v2_lite_like", LayerPrecision::kBf16, 1},
                                           EpParam{"v3_like", LayerPrecision::kFp32, 2, true},
                                           EpParam{"v3_like", LayerPrecision::kFp32, 2, false, 0.75},
                                           EpParam{"v2_lite_like", LayerPrecision::kBf16, 3, false, 1.0},
                                           EpParam{"v3_like", LayerPrecision::kFp32, 2, false, 0.0, true},
                                           EpParam{"v2_lite_like", LayerPrecision::kBf16, 1, true, 1.25, true},
                                           EpParam{"v3_like", LayerPrecision::kFp32, 3, false, 0.0, false, true},
                                           EpParam{"v2_lite_like", LayerPrecision::kBf16, 2, true, 1.25, true, true},
                                           EpParam{"v3_like", LayerPrecision::kFp32, 3, false, 0.0, false, false, true},
                                           EpParam{"v2_lite_like", LayerPrecision::kFp32, 2, true, 1.25, true, false,
                                                   true},
                                           EpParam{"v2_lite_like", LayerPrecision::kBf16, 1, false, 0.0, false, false,
                                                   true},
                                           EpParam{"v3_like", LayerPrecision::kFp32, 3, false, 0.0, false, false, false,
                                                   true},
                                           EpParam{"v2_lite_like", LayerPrecision::kFp32, 2, true, 0.0, false, false,
                                                   true, true},
                                           // Local-first and local-split: the own rows skip the exchange.
                                           EpParam{"v3_like", LayerPrecision::kFp32, 2, false, 0.0, false, false, false,
                                                   false, 1},
                                           EpParam{"v3_like", LayerPrecision::kFp32, 3, true, 0.0, false, false, false,
                                                   false, 2},
                                           EpParam{"v2_lite_like", LayerPrecision::kBf16, 1, false, 1.25, true, false,
                                                   false, false, 2},
                                           EpParam{"v2_lite_like", LayerPrecision::kFp32, 2, false, 0.0, false, true,
                                                   false, false, 2},
                                           EpParam{"v3_like", LayerPrecision::kBf16, 3, false, 0.0, false, false, false,
                                                   true, 1}),
                         [](const ::testing::TestParamInfo<EpParam>& i) { return name_of(i.param); });

// The CPU layer's schedule reaches the GPU layer laid out like it: overlap off serialises the
// exchanges and runs the shared experts on the caller's stream.
TEST_F(CudaEpLayerSchedule, MakeGpuLayerLikeHonoursTheSchedule) {
  const LayerCase c = case_of("v3_like");
  const int P = host_->size();
  for (const bool overlap : {true, false}) {
    LayerOptions o;
    o.chunks = 2;
    o.overlap = overlap;
    o.exchange = ExchangeKind::kHierarchical;
    const auto placement = sched::ExpertPlacement::contiguous(c.config.n_routed_experts, P);
    MoELayer cpu(c.config, *host_, placement, "cpu", std::nullopt, o);
    comm::StagedCommunicator device(std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD));
    GpuLayerOptions g;  // overlap_shared defaults to on
    const auto gpu = make_gpu_layer_like(cpu, *host_, device, g);
    EXPECT_EQ(gpu->options().overlap, overlap);
    EXPECT_EQ(gpu->options().overlap_shared, overlap);
    EXPECT_EQ(gpu->options().chunks, 2);
    EXPECT_EQ(gpu->options().exchange, ExchangeKind::kHierarchical);
  }
}

/// --chunks auto on the GPU (sched::TrialSchedule): every candidate schedule runs two passes, the
/// second timed on the device, then every rank keeps the one the slowest rank's times favour; every
/// pass, tried or chosen, equals the CPU layer's.
TEST_F(CudaEpLayerSchedule, AutoTriesEveryScheduleThenKeepsOne) {
  const LayerCase c = case_of("v3_like");
  const int P = host_->size(), r = host_->rank();
  const auto placement = sched::ExpertPlacement::contiguous(c.config.n_routed_experts, P);
  LayerOptions lo;
  lo.chunks = 1;
  std::unique_ptr<MoELayer> cpu = make_cpu_layer(c, false, 41, *host_, placement, lo);
  comm::StagedCommunicator device(std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD));
  LayerOptions auto_lo;  // chunks 0: the GPU twin of an auto CPU layer tries
  MoELayer like(c.config, *host_, placement, "auto", std::nullopt, auto_lo);
  const auto gpu = make_gpu_layer_like(like, *host_, device, GpuLayerOptions{});
  gpu->load_from(*cpu);
  const sched::ScheduleChoice* choice = gpu->schedule_choice();
  ASSERT_NE(choice, nullptr);
  ASSERT_TRUE(choice->automatic);
  const std::vector<sched::Schedule> candidates = sched::candidate_schedules(P, true);
  ASSERT_EQ(choice->candidates, candidates);
  const std::size_t trials = candidates.size() * sched::TrialSchedule::kTrialPasses;
  for (std::size_t pass = 0; pass < trials + 2; ++pass) {
    const std::string at =
        "[auto rank " + std::to_string(r) + "/" + std::to_string(P) + " pass " + std::to_string(pass);
    step_and_compare(at + "]", *cpu, *gpu,
                     draw_batch(*cpu, 40 + 7 * r, 900 + 31 * static_cast<std::uint64_t>(r) + pass, false), 40 + 7 * r,
                     kFp32Tol, stream());
    const sched::Schedule ran = gpu->schedule();  // the pass's
    const std::string tag = at + " " + ran.describe() + "]";
    if (pass < trials) {
      EXPECT_EQ(ran, candidates[pass / sched::TrialSchedule::kTrialPasses]) << tag << " the candidates in order";
      EXPECT_FALSE(choice->decided) << tag;
    } else {
      ASSERT_TRUE(choice->decided) << tag << " decided after every candidate's trial";
      EXPECT_EQ(ran, choice->schedule) << tag;
    }
  }
  for (double ms : choice->predicted_ms) EXPECT_GT(ms, 0.0) << "every candidate timed";
  // A layer rebuilt in its place (as after a replica migration) keeps the choice.
  const auto rebuilt = make_gpu_layer_like(like, *host_, device, GpuLayerOptions{});
  rebuilt->keep_schedule(*choice);
  EXPECT_TRUE(rebuilt->schedule_choice()->decided);
  EXPECT_EQ(rebuilt->schedule(), choice->schedule);
  // The same choice on every rank.
  double chosen[2] = {static_cast<double>(choice->chosen), -static_cast<double>(choice->chosen)};
  host_->allreduce_max(chosen, 2, comm::DataType::kFloat64, "chosen")->wait();
  EXPECT_EQ(chosen[0], -chosen[1]) << "ranks chose different schedules";
}

/// Deterministic mode: the same layer run with 1, 2 and 3 pipeline chunks, and local-first and
/// local-split, gives the same bits for y, dx and every gradient (this rank's, and after the
/// all-reduce), over two steps whose gradients accumulate. (Without it, the weight gradients already differ with the chunk count: each chunk's
/// part is added to them separately.) The hierarchical exchange (2-rank nodes) gives those bits too:
/// the same entries, and a token's rows summed per node, then over the nodes, on both paths.
TEST(CudaEpDeterministic, SameBitsForEveryChunkCount) {
  std::string why;
  const int devices = cuda_device_count(&why);
  if (devices == 0) GTEST_SKIP() << "no CUDA device: " << why;
  comm::MpiCommunicator host(MPI_COMM_WORLD);
  MOEX_CUDA_CHECK(cudaSetDevice(host.rank() % devices));
  comm::StagedCommunicator device(std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD));
  Stream stream;
  const cudaStream_t s = stream.get();
  const int P = host.size(), r = host.rank();
  // The hierarchical exchange on 2-rank nodes (its receive rows are put by origin, so the entries'
  // canonical order is the flat one's).
  std::vector<int> node_ids(static_cast<std::size_t>(P));
  for (int q = 0; q < P; ++q) node_ids[static_cast<std::size_t>(q)] = q / 2;
  const sched::Topology nodes = sched::Topology::from_node_ids(node_ids);
  for (const bool bf16 : {false, true}) {
    std::vector<Vec> flat;  // the placement over the flat exchange, 1 chunk
    for (const int variant : {0, 1, 2}) {  // placement, replicas, placement over the hierarchical exchange
      const bool replicas = variant == 1, hier = variant == 2;
      const LayerCase c = case_of(bf16 ? "v2_lite_like" : "v3_like");
      std::optional<ReplicaSetup> rs;
      std::unique_ptr<MoELayer> cpu;
      const auto placement = sched::ExpertPlacement::contiguous(c.config.n_routed_experts, P);
      LayerOptions lo;  // the parameters' source only; with replicas also capacity-factor drops
      lo.capacity_factor = replicas ? 1.25 : 0.0;
      if (replicas) {
        rs = replica_setup(c.config, P);
        cpu = make_cpu_layer(c, bf16, 31, host, rs->planned, rs->topology, lo);
      } else {
        cpu = make_cpu_layer(c, bf16, 31, host, placement, lo);
      }
      std::vector<Vec> first;  // chunks = 1: y, dx per step, then the gradients
      // (chunks, own rows: 0 exchanged, 1 local-first, 2 local-split; the hierarchical exchange runs
      // the last two as the first).
      const std::vector<std::pair<int, int>> schedules{{1, 0}, {2, 0}, {3, 0}, {2, 1}, {1, 2}, {3, 2}};
      for (const auto& [chunks, own] : schedules) {
        const std::string tag = std::string(bf16 ? "bf16" : "fp32") + (replicas ? " replicas" : "") +
                                (hier ? " hierarchical" : "") + " rank " + std::to_string(r) + "/" +
                                std::to_string(P) + " chunks " + std::to_string(chunks) +
                                (own == 1 ? " local-first" : own == 2 ? " local-split" : "");
        GpuLayerOptions opt;
        opt.precision = bf16 ? LayerPrecision::kBf16 : LayerPrecision::kFp32;
        opt.chunks = chunks;
        opt.local_first = own >= 1;
        opt.local_split = own == 2;
        opt.deterministic = true;
        opt.capacity_factor = lo.capacity_factor;
        if (hier) opt.exchange = ExchangeKind::kHierarchical;
        std::unique_ptr<GpuMoELayer> gpu =
            rs ? std::make_unique<GpuMoELayer>(c.config, host, device, rs->planned, rs->topology, opt)
               : std::make_unique<GpuMoELayer>(c.config, host, device, placement, opt, nodes);
        gpu->load_from(*cpu);
        std::vector<Vec> got;
        gpu->zero_grad(s);
        for (int step = 0; step < 2; ++step) {
          const int64_t T = 60 + 17 * r + 9 * step;  // every rank sends: the sources' order matters
          const Batch b = draw_batch(*cpu, T, 500 + 13 * static_cast<std::uint64_t>(r) + step, bf16);
          DeviceBuffer<float> d_x = to_device(b.x, s), d_dy = to_device(b.dy, s);
          DeviceBuffer<float> d_y(b.x.size(), s), d_dx(b.x.size(), s);
          gpu->forward(d_x.data(), T, d_y.data(), s);
          gpu->backward(d_dy.data(), d_dx.data(), s);
          got.push_back(to_host(d_y, s));
          got.push_back(to_host(d_dx, s));
        }
        got.push_back(gpu->expert_grads_host(s));
        gpu->allreduce_replicated_grads(s);
        got.push_back(gpu->replicated_grads_host(s));
        got.push_back(gpu->expert_grads_host(s));
        static const char* kWhat[] = {"y step 0", "dx step 0", "y step 1", "dx step 1", "expert grads",
                                      "all-reduced gate and shared grads", "all-reduced expert grads"};
        if (chunks == 1 && own == 0) {
          first = got;
          if (variant == 0) flat = got;
          if (variant == 2) {  // the hierarchical exchange gives the flat one's bits
            ASSERT_EQ(got.size(), flat.size());
            for (std::size_t i = 0; i < got.size(); ++i) {
              ASSERT_EQ(got[i].size(), flat[i].size()) << tag << " " << kWhat[i];
              EXPECT_EQ(std::memcmp(got[i].data(), flat[i].data(), got[i].size() * sizeof(float)), 0)
                  << tag << ": " << kWhat[i] << " differ from the flat exchange's";
            }
          }
          continue;
        }
        ASSERT_EQ(got.size(), first.size());
        for (std::size_t i = 0; i < got.size(); ++i) {
          ASSERT_EQ(got[i].size(), first[i].size()) << tag << " " << kWhat[i];
          EXPECT_EQ(std::memcmp(got[i].data(), first[i].data(), got[i].size() * sizeof(float)), 0)
              << tag << ": " << kWhat[i] << " differ from 1 chunk's, own rows exchanged";
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Training with the MoE layers on the GPU (GpuLayerExecutor) against training on the CPU.

/// Five steps of `o` with the MoE layers on the GPU against the same on the CPU.
void expect_trains_like_the_cpu(const TrainOptions& o) {
  std::string why;
  const int devices = cuda_device_count(&why);
  if (devices == 0) GTEST_SKIP() << "no CUDA device: " << why;
  comm::MpiCommunicator world(MPI_COMM_WORLD);
  MOEX_CUDA_CHECK(cudaSetDevice(world.rank() % devices));
  comm::StagedCommunicator device(std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD));
  MoeConfig cfg = v3_like();
  cfg.num_hidden_layers = 2;
  cfg.validate();
  Trainer cpu(cfg, world, o), gpu(cfg, world, o);
  std::int64_t migrated = 0;
  GpuLayerExecutor exec(world, device);
  gpu.set_executor(&exec);
  // fp32 on both sides: the only differences are summation orders. The loss agrees far inside 1e-4
  // (2e-7 in a host emulation with injected rounding noise). The load statistic is exact: these
  // seeds' smallest routing margin is >= 2e-6, 20x the fp32 noise of the scores, and a flipped pick
  // would also move the loss by O(1 / tokens).
  for (int s = 0; s < 5; ++s) {
    const StepRecord a = cpu.step(), b = gpu.step();
    EXPECT_NEAR(b.loss, a.loss, 1e-4 * std::abs(a.loss)) << "step " << s << " rank " << world.rank();
    EXPECT_EQ(b.max_mean_load, a.max_mean_load) << "step " << s << ": route statistics from the GPU";
    EXPECT_EQ(b.picks_dropped, a.picks_dropped) << "step " << s << ": picks dropped by capacity";
    EXPECT_EQ(b.migrated_slots, a.migrated_slots) << "step " << s << ": replica slots migrated";
    migrated += a.migrated_slots;
    EXPECT_NEAR(b.aux_loss, a.aux_loss, 1e-5 * std::abs(a.aux_loss)) << "step " << s << ": auxiliary losses";
    if (o.aux.enabled()) {
      EXPECT_GT(a.aux_loss, 0.0) << "step " << s;
    }
  }
  if (o.replicas.enabled && world.size() > 1) {  // one rank has nothing to balance
    EXPECT_GT(migrated, 0) << "the replica planner should have moved slots within five steps";
  }
  // Parameters: AdamW moves a weight by about lr per step whatever the gradient's size, so a
  // gradient that is zero but for rounding can move one weight by up to 2 lr differently: compare
  // the relative L2 norm (1e-5 under 1e-6 injected noise on the host), and every element within
  // 2 lr per step.
  auto close = [&](const Vec& got, const Vec& want, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    double d2 = 0.0, w2 = 0.0, worst = 0.0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const double d = static_cast<double>(got[i]) - want[i];
      d2 += d * d;
      w2 += static_cast<double>(want[i]) * want[i];
      worst = std::max(worst, std::abs(d));
    }
    EXPECT_LE(std::sqrt(d2 / std::max(w2, 1e-30)), 1e-4) << what << ": relative L2 difference";
    EXPECT_LE(worst, 2.0 * o.adam.lr * 5) << what << ": largest element difference";
  };
  for (std::size_t l = 0; l < cpu.student().layers().size(); ++l) {
    const std::string tag = "layer " + std::to_string(l) + " rank " + std::to_string(world.rank());
    close(gpu.student().layers()[l]->experts().value, cpu.student().layers()[l]->experts().value,
          tag + " expert parameters after 5 steps");
    close(gpu.student().layers()[l]->replicated().value, cpu.student().layers()[l]->replicated().value,
          tag + " gate and shared parameters after 5 steps");
  }
}

TEST(CudaEpTrain, ExecutorTrainsLikeTheCpu) {
  TrainOptions o;
  o.tokens_per_rank = 40;
  o.bias_update_speed = 0.001f;
  o.layer.chunks = 2;
  expect_trains_like_the_cpu(o);
}

// Capacity-factor mode on the GPU: the same picks dropped, the same training.
TEST(CudaEpTrain, ExecutorTrainsLikeTheCpuWithACapacityFactor) {
  TrainOptions o;
  o.tokens_per_rank = 40;
  o.layer.chunks = 3;
  o.layer.capacity_factor = 1.0;
  expect_trains_like_the_cpu(o);
}

// Hot-expert replicas: planned from the (skewed) load while training, migrated on the host, and the
// GPU layers rebuilt in the new layout; the same losses, loads and migrations as on the CPU.
TEST(CudaEpTrain, ExecutorTrainsLikeTheCpuWithReplicas) {
  TrainOptions o;
  o.tokens_per_rank = 40;
  o.layer.chunks = 2;
  o.skew = 1.2;
  o.replicas.enabled = true;
  o.replicas.interval = 2;
  o.replicas.lag = 1;
  o.replicas.ema = 0.5;
  expect_trains_like_the_cpu(o);
}

// The auxiliary balance losses run on the GPU (value and gradient); coefficients far above
// DeepSeek-V3's 1e-4, so that their gradient moves the gate visibly within five steps.
TEST(CudaEpTrain, ExecutorTrainsLikeTheCpuWithAuxiliaryLosses) {
  TrainOptions o;
  o.tokens_per_rank = 40;
  o.layer.chunks = 2;
  o.aux.seq_alpha = 0.05f;
  o.aux.seq_len = 16;  // 40 tokens per rank: sequences of 16, 16 and 8
  o.aux.expert_alpha = 0.02f;
  expect_trains_like_the_cpu(o);
}

// The hierarchical exchange (on the nodes the trainer finds: one node here, unless MOEX_RANKS_PER_NODE
// makes more), with replicas migrating while training.
TEST(CudaEpTrain, ExecutorTrainsLikeTheCpuOverTheHierarchicalExchange) {
  TrainOptions o;
  o.tokens_per_rank = 40;
  o.layer.chunks = 2;
  o.layer.exchange = ExchangeKind::kHierarchical;
  o.skew = 1.2;
  o.replicas.enabled = true;
  o.replicas.interval = 2;
  o.replicas.lag = 1;
  o.replicas.ema = 0.5;
  expect_trains_like_the_cpu(o);
}

TEST(CudaEpTrain, ExecutorTrainsLikeTheCpuWithLocalSplit) {
  TrainOptions o;
  o.tokens_per_rank = 40;
  o.layer.chunks = 2;
  o.layer.local_first = o.layer.local_split = true;
  expect_trains_like_the_cpu(o);
}

}  // namespace
}  // namespace moex::cuda
