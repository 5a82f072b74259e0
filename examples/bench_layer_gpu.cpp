// moex-bench layer --device cuda: the expert-parallel GpuMoELayer, forward + backward + the replicated
// gradients' all-reduce, timed per iteration (wall clock from a barrier to the stream's end, max
// over ranks), with the stage times of profiled passes.
#include "examples/bench_layer_gpu.h"

#include "examples/bench_tools.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "comm/device_communicator.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/cuda/kernels.h"
#include "runtime/model/moe_model.h"

namespace moex::tools {
namespace {
using Clock = BenchClock;
}  // namespace

int bench_layer_gpu(comm::MpiCommunicator& world, const GpuBenchArgs& a) {
  namespace cuda = moex::cuda;
  std::string why;
  const int devices = cuda::cuda_device_count(&why);
  if (devices == 0) {
    if (world.rank() == 0) std::printf("SKIPPED: no CUDA device: %s\n", why.c_str());
    return 0;
  }
  MOEX_CUDA_CHECK(cudaSetDevice(world.rank() % devices));
  cudaDeviceProp prop{};
  MOEX_CUDA_CHECK(cudaGetDeviceProperties(&prop, world.rank() % devices));
  const LayerOptions& lo = a.schedule;

  const auto dev = comm::make_device_communicator(a.device_comm, MPI_COMM_WORLD, world.default_timeout());

  // Parameters drawn on the CPU layer (identical on every rank), then copied to the device.
  const MoeConfig& config = a.config;
  const std::int64_t E = config.n_routed_experts, H = config.hidden_size, F = config.moe_intermediate_size,
                     Fs = config.shared_intermediate_size(), K = config.num_experts_per_tok, T = a.tokens_per_rank;
  const auto placement = sched::ExpertPlacement::contiguous(E, world.size());
  const auto topology = sched::Topology::from_node_ids(world.node_ids());
  const std::int64_t slots = (E + world.size() - 1) / world.size() + a.spare_slots;
  std::unique_ptr<MoELayer> cpu_ptr =
      a.replicas ? std::make_unique<MoELayer>(config, world, sched::identity_layout(E, topology, slots),
                                              "bench layer (parameters)", topology, lo)
                 : std::make_unique<MoELayer>(config, world, placement, "bench layer (parameters)", topology, lo);
  MoELayer& cpu = *cpu_ptr;
  init_layer_random(cpu, a.seed, 0);
  if (a.skew > 0.0) apply_zipf_selection_bias(cpu, a.skew, a.seed);
  cuda::Stream stream;  // declared before the layer, which must not outlive it
  cuda::GpuLayerOptions go;
  go.precision = cuda::precision_from_string(a.precision);
  auto make_layer = [&] {  // chunks and capacity factor from the CPU layer's options (lo)
    auto l = cuda::make_gpu_layer_like(cpu, world, *dev, go);
    l->load_from(cpu);
    return l;
  };
  std::unique_ptr<cuda::GpuMoELayer> layer_ptr = make_layer();

  const cudaStream_t s = stream.get();
  const auto TH = static_cast<std::size_t>(T * H);
  cuda::DeviceBuffer<float> x(TH, s), y(TH, s), dy(TH, s), dx(TH, s);
  const std::uint64_t rseed = a.seed * 1000003u + static_cast<std::uint64_t>(world.rank());
  cuda::fill_uniform(x.data(), T * H, rseed + 1, 1.7f, s);
  cuda::fill_uniform(dy.data(), T * H, rseed + 2, 1.7f, s);
  stream.synchronize();
  std::int64_t migrated = 0;
  // The load of the warmup passes planned into replicas and migrated to, as moex-bench on the CPU; the timed
  // steps then include the replicas' gradient sum (in allreduce_replicated_grads).
  if (a.replicas) {
    std::vector<std::int64_t> load(static_cast<std::size_t>(E), 0);
    for (std::int64_t i = 0; i < std::max<std::int64_t>(a.warmup, 1); ++i) {
      layer_ptr->forward(x.data(), T, y.data(), s);
      for (const std::int32_t e : layer_ptr->topk_ids_host(s)) ++load[static_cast<std::size_t>(e)];
    }
    world.allreduce_sum(load.data(), E, comm::DataType::kInt64, "gpu bench expert load")->wait();
    migrated = cpu.set_replica_layout(
        sched::plan_replicas(std::vector<double>(load.begin(), load.end()), topology, config.n_group, slots));
    world.allreduce_sum(&migrated, 1, comm::DataType::kInt64, "gpu bench migrated slots")->wait();
    layer_ptr.reset();
    layer_ptr = make_layer();
  }
  cuda::GpuMoELayer& layer = *layer_ptr;

  const auto step = [&] {
    layer.zero_grad(s);
    layer.forward(x.data(), T, y.data(), s);
    layer.backward(dy.data(), dx.data(), s);
    layer.allreduce_replicated_grads(s);
    stream.synchronize();
  };
  // --chunks auto: the layer's trials (every candidate kTrialPasses passes) before the timed steps.
  const sched::ScheduleChoice& choice = *layer.schedule_choice();  // expert-parallel: never null
  const std::size_t trials = sched::TrialSchedule::kTrialPasses * choice.candidates.size();
  for (std::size_t i = 0; choice.automatic && !choice.decided && i <= trials + 1; ++i) step();
  const sched::Schedule sc = layer.schedule();
  std::vector<double> step_ms;
  for (std::int64_t i = 0; i < a.warmup + a.iters; ++i) {
    world.barrier("gpu bench iteration")->wait();
    const auto t0 = Clock::now();
    step();
    const double ms = max_over_ranks(world, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    if (i >= a.warmup) step_ms.push_back(ms);
  }
  // Stage times from separate profiled passes (their events cost a little); max over ranks.
  layer.set_profile(true);
  constexpr int kStages = 12;
  std::vector<std::vector<double>> st(kStages);
  for (std::int64_t i = 0; i < a.iters; ++i) {
    world.barrier("gpu bench profiled iteration")->wait();
    step();
    const cuda::GpuLayerTimes t = layer.last_times();
    const double v[kStages] = {t.fwd_total, t.fwd_gate, t.fwd_permute, t.fwd_experts, t.fwd_combine, t.fwd_shared,
                               t.bwd_total, t.bwd_permute, t.bwd_experts, t.bwd_combine, t.bwd_gate, t.bwd_shared};
    for (int j = 0; j < kStages; ++j) st[static_cast<std::size_t>(j)].push_back(max_over_ranks(world, v[j]));
  }
  const char* names[kStages] = {"fwd_total", "fwd_gate", "fwd_dispatch", "fwd_experts", "fwd_combine", "fwd_shared",
                                "bwd_total", "bwd_dispatch", "bwd_experts", "bwd_combine", "bwd_gate", "bwd_shared"};

  // Useful FLOPs over all ranks: routed 18 H F per kept pick, shared 18 H Fs per token, gate 6 T H E.
  const std::int64_t kept = T * K - layer.picks_dropped();
  double flops = 18.0 * static_cast<double>(H) *
                     (static_cast<double>(F) * static_cast<double>(kept) + static_cast<double>(Fs * T)) +
                 6.0 * static_cast<double>(T * H * E);
  world.allreduce_sum(&flops, 1, comm::DataType::kFloat64, "gpu bench flops")->wait();
  const double ms = median(step_ms);
  const double tokens_per_s = static_cast<double>(T) * world.size() / (ms * 1e-3);
  const double tflops = flops / (ms * 1e9);
  // Rows moved per pass, over every stage (stage A to the nodes too when hierarchical).
  const auto& pp = *layer.pass_plan();  // expert-parallel: never null
  const bool hier = pp.hierarchical();
  std::int64_t rows[3] = {hier ? pp.a.send_rows() + pp.b.send_rows() : pp.main.send_rows(),
                          pp.main.recv_rows() + (hier ? pp.a.recv_rows() : 0), layer.picks_dropped()};
  world.allreduce_sum(rows, 3, comm::DataType::kInt64, "gpu bench rows")->wait();
  if (world.rank() == 0) {
    std::printf("# moex-bench layer --device cuda | %s | ranks %d (%d GPU(s)) | %s over %s | hidden %lld ffn %lld "
                "experts %lld shared %lld topk %lld | tokens/rank %lld | %s | %s exchange | "
                "iters %lld (median)\n",
                prop.name, world.size(), devices, a.precision.c_str(), a.device_comm.c_str(),
                static_cast<long long>(H), static_cast<long long>(F), static_cast<long long>(E),
                static_cast<long long>(config.n_shared_experts), static_cast<long long>(K), static_cast<long long>(T),
                sc.describe().c_str(), lo.exchange == ExchangeKind::kFlat ? "flat" : "hierarchical",
                static_cast<long long>(a.iters));
    if (choice.automatic)
      std::printf("# --chunks auto: %zu schedules tried on the device (%d passes each), chose %s: %.3f ms in its "
                  "trial, %.3f ms with one chunk (slowest rank)\n",
                  choice.candidates.size(), sched::TrialSchedule::kTrialPasses, sc.describe().c_str(), choice.predicted_ms[choice.chosen],
                  choice.predicted_ms[0]);
    if (a.replicas)
      std::printf("# replicas: %lld slots per rank, %lld slot blocks migrated to the layout planned from the warmup\n",
                  static_cast<long long>(slots), static_cast<long long>(migrated));
    if (lo.capacity_factor > 0.0)
      std::printf("# capacity factor %g: %lld of %lld picks dropped in the last pass\n", lo.capacity_factor,
                  static_cast<long long>(rows[2]), static_cast<long long>(T * K * world.size()));
    std::printf("# %12s %12s %12s %10s\n", "ms_step", "ms_min", "tokens/s", "TFLOP/s");
    std::printf("  %12.3f %12.3f %12.0f %10.2f\n", ms, *std::min_element(step_ms.begin(), step_ms.end()),
                tokens_per_s, tflops);
    std::printf("# stages (ms, profiled passes, max over ranks; dispatch includes the plan and its metadata "
                "exchange, experts the waits for the rows):\n");
    for (int j = 0; j < kStages; ++j) std::printf("    %-13s %9.3f\n", names[j], median(st[static_cast<std::size_t>(j)]));
    if (a.json) {
      nlohmann::json stages = nlohmann::json::object();
      for (int j = 0; j < kStages; ++j) stages[names[j]] = median(st[static_cast<std::size_t>(j)]);
      nlohmann::json j{{"bench", "layer"},       {"device", "cuda"},        {"gpu", prop.name},
                       {"ranks", world.size()},  {"gpus", devices},         {"precision", a.precision},
                       {"device_comm", a.device_comm}, {"hidden", H},      {"ffn", F},
                       {"experts", E},           {"shared", config.n_shared_experts}, {"topk", K},
                       {"tokens_per_rank", T},   {"chunks", sc.chunks},     {"iters", a.iters},
                       {"local_first", sc.local_first}, {"local_split", sc.local_split},
                       {"skew", a.skew},         {"ms_step", ms},           {"tokens_per_s", tokens_per_s},
                       {"tflops", tflops},       {"rows_sent", rows[0]},    {"rows_received", rows[1]},
                       {"capacity_factor", lo.capacity_factor}, {"picks_dropped", rows[2]},
                       {"replicas", a.replicas ? "on" : "off"}, {"slots_per_rank", a.replicas ? slots : 0},
                       {"migrated_slots", migrated}, {"deterministic", lo.deterministic ? "on" : "off"},
                       {"exchange", lo.exchange == ExchangeKind::kFlat ? "flat" : "hierarchical"},
                       {"stages_ms", stages}, {"schedule", choice.automatic ? "auto" : "fixed"}};
      if (choice.automatic) {
        nlohmann::json trials = nlohmann::json::object();
        for (std::size_t i = 0; i < choice.candidates.size(); ++i)
          trials[choice.candidates[i].describe()] = choice.predicted_ms[i];
        j["trial_ms"] = trials;
      }
      std::printf("%s\n", j.dump().c_str());
    }
  }
  return 0;
}

}  // namespace moex::tools
