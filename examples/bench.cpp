// moex-bench: benchmarks of the MoE layer (forward + backward) against plain sgemm of the same shapes.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "examples/bench_tools.h"
#include "examples/tool.h"
#include "runtime/blas.h"
#include "runtime/moe_layer.h"
#include "runtime/model/moe_model.h"
#include "runtime/random.h"
#include "scheduler/load_tracker.h"
#include "scheduler/replica_planner.h"
#ifdef MOEX_TOOLS_WITH_CUDA
#include "examples/bench_layer_gpu.h"
#endif

namespace {
using Clock = moex::tools::BenchClock;
using moex::tools::max_over_ranks;
using moex::tools::median;
using moex::tools::ms_since;

/// The GEMMs one SwiGLU FFN runs forward and backward on `rows` rows, on scratch buffers. Returns FLOPs.
double ffn_gemms(std::int64_t rows, std::int64_t H, std::int64_t F, std::vector<float>& buf) {
  if (rows == 0) return 0.0;
  namespace b = moex::blas;
  const std::size_t need = static_cast<std::size_t>(rows * (3 * H + 6 * F) + 6 * F * H);
  if (buf.size() < need) buf.assign(need, 0.01f);
  float* x = buf.data();
  float* y = x + rows * H;
  float* dx = y + rows * H;
  float* h13 = dx + rows * H;
  float* a = h13 + rows * 2 * F;
  float* dh13 = a + rows * F;
  float* w13 = dh13 + rows * 2 * F;
  float* w2 = w13 + 2 * F * H;
  float* dw13 = w2 + H * F;
  float* dw2 = dw13 + 2 * F * H;
  b::sgemm(false, true, rows, 2 * F, H, 1.0f, x, H, w13, H, 0.0f, h13, 2 * F);
  b::sgemm(false, true, rows, H, F, 1.0f, a, F, w2, F, 0.0f, y, H);
  b::sgemm(false, false, rows, F, H, 1.0f, y, H, w2, F, 0.0f, dh13 + F, 2 * F);
  b::sgemm(true, false, H, F, rows, 1.0f, y, H, a, F, 1.0f, dw2, F);
  b::sgemm(true, false, 2 * F, H, rows, 1.0f, dh13, 2 * F, x, H, 1.0f, dw13, H);
  b::sgemm(false, false, rows, H, 2 * F, 1.0f, dh13, 2 * F, w13, H, 0.0f, dx, H);
  return 18.0 * static_cast<double>(rows) * static_cast<double>(H) * static_cast<double>(F);
}

int bench_layer(moex::comm::MpiCommunicator& world, int argc, char** argv) {
  moex::tools::Options opt("moex-bench layer",
                           "mpirun -np N moex-bench layer --hidden H --ffn F --experts E --shared S --topk K "
                           "--tokens-per-rank T --iters N [--json]");
  moex::tools::add_shape_options(opt);
  opt.value("tokens-per-rank", "2048", "tokens per rank per iteration")
      .value("iters", "10", "timed iterations")
      .value("warmup", "3", "untimed iterations first (auto schedules: two measured passes, then the choice)")
      .value("seed", "1", "seed of weights and inputs")
      .value("skew", "0", "Zipf exponent z of a router selection bias b_e = -0.1 z ln(1 + rank of e) (0 = none)")
      .value("replicas", "off",
             "on: hot-expert replicas: the warmup iterations' load is planned into a replica layout "
             "(--spare-slots extra expert slots per rank), migrated to before the timed iterations")
      .value("spare-slots", "1", "with --replicas on: slots per rank = ceil(experts / ranks) + this")
      .value("reference", "on", "on: time the plain sgemm reference after every iteration (the ratio)")
      .flag("json", "also print one JSON line per result");
  moex::tools::add_device_options(opt, "the timed layer (prints SKIPPED where there is no GPU)", "bf16");
  moex::tools::add_schedule_options(opt);
  if (!opt.parse(argc, argv, 2)) return 0;
  const moex::MoeConfig config = moex::tools::shape_config(opt);
  const std::int64_t T = opt.integer("tokens-per-rank"), iters = opt.integer("iters"), warmup = opt.integer("warmup");
  if (T < 0 || iters < 1 || warmup < 0)
    throw moex::ConfigError("--tokens-per-rank must be >= 0, --iters >= 1, --warmup >= 0");
  const std::int64_t H = config.hidden_size, F = config.moe_intermediate_size, Fs = config.shared_intermediate_size();
  const auto seed = static_cast<std::uint64_t>(opt.integer("seed"));

  const moex::LayerOptions lo = moex::tools::schedule_options(opt);
  const bool reference = opt.on_off("reference");
  const double skew = opt.number("skew");
  if (!(skew >= 0.0)) throw moex::ConfigError("--skew = " + opt.str("skew") + ": must be >= 0");
  const bool replicas = opt.on_off("replicas");
  const std::int64_t spare = opt.integer("spare-slots");
#ifdef MOEX_TOOLS_WITH_CUDA
  const moex::tools::DeviceChoice device = moex::tools::device_options(opt, true);
#else
  const moex::tools::DeviceChoice device = moex::tools::device_options(opt, false);
#endif
  if (replicas && (spare < 0 || warmup < 1))
    throw moex::ConfigError("--replicas on needs --spare-slots >= 0 and --warmup >= 1 (the plan uses the warmup load)");
  moex::tools::TraceOption trace(opt, world);
  if (device.cuda) {
#ifdef MOEX_TOOLS_WITH_CUDA
    moex::tools::GpuBenchArgs g;
    g.config = config;
    g.schedule = lo;
    g.tokens_per_rank = T;
    g.iters = iters;
    g.warmup = warmup;
    g.seed = seed;
    g.skew = skew;
    g.device_comm = device.comm;
    g.precision = device.precision;
    g.json = opt.on("json");
    g.replicas = replicas;
    g.spare_slots = spare;
    const int rc = moex::tools::bench_layer_gpu(world, g);
    trace.finish();
    return rc;
#endif
  }
  const auto topology = moex::sched::Topology::from_node_ids(world.node_ids());
  const std::int64_t E = config.n_routed_experts;
  const std::int64_t slots = (E + world.size() - 1) / world.size() + spare;
  std::unique_ptr<moex::MoELayer> layer_ptr =
      replicas ? std::make_unique<moex::MoELayer>(config, world, moex::sched::identity_layout(E, topology, slots),
                                                  "bench layer", topology, lo)
               : std::make_unique<moex::MoELayer>(config, world, moex::sched::ExpertPlacement::node_aware(E, topology),
                                                  "bench layer", topology, lo);
  moex::MoELayer& layer = *layer_ptr;
  moex::init_layer_random(layer, seed, 0);
  if (skew > 0.0) moex::apply_zipf_selection_bias(layer, skew, seed);
  moex::sched::LoadTracker tracker(E, moex::sched::LoadTracker::Mode::Window, static_cast<double>(std::max<std::int64_t>(warmup, 1)));
  std::vector<std::int64_t> expert_load(static_cast<std::size_t>(E));
  std::vector<float> x(static_cast<std::size_t>(T * H)), dy(x.size()), y(x.size()), dx(x.size());
  moex::Rng rng(moex::Rng::mix(seed, 0xbe7c4, static_cast<std::uint64_t>(world.rank())));
  rng.fill_normal(x.data(), T * H, 1.0);
  rng.fill_normal(dy.data(), T * H, 1.0);

  // Layer and reference GEMMs alternate, iteration by iteration, so drift in a shared machine's
  // speed hits both alike, and the ratio is the median of the iterations' own ratios (the layer and
  // the reference of the same moment: a burst of noise moves both). The reference runs this rank's
  // expert blocks of the previous layer iteration (same shapes, same FLOPs) and the shared expert,
  // on scratch buffers.
  std::vector<double> layer_ms, gemm_ms, comm_ms, compute_ms, load_ratio, allreduce_ms;
  std::vector<std::vector<double>> stage_ms(6);
  std::vector<float> scratch;
  double local_flops = 0.0;
  std::int64_t bytes[2] = {0, 0};
  std::int64_t dropped = 0;  // picks over capacity, all ranks, last timed iteration
  for (std::int64_t i = 0; i < warmup + iters; ++i) {
    world.barrier("bench iteration")->wait();
    layer.reset_counters();
    auto t0 = Clock::now();
    layer.zero_grad();
    layer.forward(x.data(), T, y.data());
    layer.backward(dy.data(), dx.data());
    const auto t_ar = Clock::now();
    layer.allreduce_replicated_grads()->wait();
    layer.reduce_replica_grads();
    const double ar = ms_since(t_ar);
    const double ms = max_over_ranks(world, ms_since(t0));
    const double ar_max = max_over_ranks(world, ar);
    const moex::LayerCounters& k = layer.counters();
    const double comm = max_over_ranks(world, k.comm()), compute = max_over_ranks(world, k.compute());
    const double stages[6] = {k.gate, k.permute, k.dispatch, k.experts, k.combine + k.combine_comm, k.shared};
    double stage_max[6];
    for (int st = 0; st < 6; ++st) stage_max[st] = max_over_ranks(world, stages[st]);
    std::int64_t drop = layer.route_stats().picks_dropped;
    world.allreduce_sum(&drop, 1, moex::comm::DataType::kInt64, "bench dropped")->wait();
    if (i >= warmup) dropped = drop;
    double load[2] = {static_cast<double>(layer.route_stats().entries_processed), 0.0};
    load[1] = load[0];
    world.allreduce_max(&load[0], 1, moex::comm::DataType::kFloat64, "bench load max")->wait();
    world.allreduce_sum(&load[1], 1, moex::comm::DataType::kFloat64, "bench load sum")->wait();
    std::int64_t b2[2] = {k.bytes_intra_node, k.bytes_inter_node};
    world.allreduce_sum(b2, 2, moex::comm::DataType::kInt64, "bench bytes")->wait();
    // Useful expert FLOPs: 18·d·F per routed entry (forward 6, backward 12) and per token for shared.
    double ref = 0.0;
    double f = 18.0 * static_cast<double>(H) * static_cast<double>(F) * static_cast<double>(layer.route_stats().entries_processed) +
               18.0 * static_cast<double>(H) * static_cast<double>(Fs) * static_cast<double>(T);
    if (reference) {
      const auto& plan = layer.exchange_plan();
      world.barrier("bench gemm")->wait();
      t0 = Clock::now();
      ffn_gemms(T, H, Fs, scratch);
      for (std::int64_t s = 0; s < layer.num_local_experts(); ++s) ffn_gemms(plan.slot_entries(s), H, F, scratch);
      ref = max_over_ranks(world, ms_since(t0));
    }
    local_flops = f;
    if (i >= warmup) {
      layer_ms.push_back(ms);
      allreduce_ms.push_back(ar_max);
      gemm_ms.push_back(ref);
      comm_ms.push_back(comm);
      compute_ms.push_back(compute);
      for (int st = 0; st < 6; ++st) stage_ms[static_cast<std::size_t>(st)].push_back(stage_max[st]);
      load_ratio.push_back(load[1] > 0 ? load[0] / (load[1] / world.size()) : 1.0);
      bytes[0] = b2[0];
      bytes[1] = b2[1];
    }
    if (replicas && i < warmup) {
      const auto& et = layer.route_stats().expert_tokens;
      std::copy(et.begin(), et.end(), expert_load.begin());
      world.allreduce_sum(expert_load.data(), E, moex::comm::DataType::kInt64, "bench expert load")->wait();
      tracker.add(expert_load);
      if (i + 1 == warmup)  // the same plan on every rank (same global load, deterministic planner)
        layer.set_replica_layout(moex::sched::plan_replicas(tracker.estimate(), topology, config.n_group, slots));
    }
  }
  const double ms_comm = median(comm_ms), ms_compute = median(compute_ms), max_mean_load = median(load_ratio);
  // The schedule the timed passes ran, and the cost model's prediction of it (auto only: the model
  // is fed by the layer's own measured passes).
  const moex::ScheduleChoice& choice = layer.schedule_choice();
  const double predicted = choice.decided ? choice.predicted_ms[choice.chosen] : 0.0;
  double global_flops = local_flops;
  world.allreduce_sum(&global_flops, 1, moex::comm::DataType::kFloat64, "bench flops")->wait();
  const double ms = median(layer_ms), ref_ms = median(gemm_ms);
  const double tokens_per_s = static_cast<double>(T) * world.size() / (ms / 1000.0);
  const double gflops = global_flops / (ms * 1e6);
  const double sgemm_gflops = global_flops / (ref_ms * 1e6);
  std::vector<double> ratios(layer_ms.size());
  for (std::size_t i = 0; i < ratios.size(); ++i) ratios[i] = gemm_ms[i] / layer_ms[i];  // same FLOPs
  const double ratio = median(ratios);

  if (world.rank() == 0) {
    std::printf("# moex-bench layer | ranks %d | hidden %lld ffn %lld experts %lld shared %lld topk %lld | "
                "tokens/rank %lld | BLAS %s | iters %lld (median)\n",
                world.size(), static_cast<long long>(H), static_cast<long long>(F),
                static_cast<long long>(config.n_routed_experts), static_cast<long long>(config.n_shared_experts),
                static_cast<long long>(config.num_experts_per_tok), static_cast<long long>(T),
                moex::blas::kernel_name().c_str(), static_cast<long long>(iters));
    std::printf("# nodes: %s | schedule %s%s | overlap %s | exchange %s | skew %.2f | replicas %s\n",
                topology.describe().c_str(), choice.schedule.describe().c_str(),
                choice.automatic ? (choice.decided ? " (auto)" : " (auto, undecided: too few warmup passes)") : "",
                lo.overlap ? "on" : "off", moex::to_string(lo.exchange), skew,
                replicas ? ("on, " + std::to_string(slots) + " slots/rank").c_str() : "off");
    if (choice.decided) {
      std::printf("# auto: GEMM %.3f ms + %.4f ms/row, link %.1f MB/s, %.2f ms per exchange (rank 0); predicted pass "
                  "ms (slowest rank):",
                  choice.rates.gemm_fixed_ms, choice.rates.gemm_row_ms, choice.rates.link_bytes_per_ms / 1000.0,
                  choice.rates.exchange_latency_ms);
      for (std::size_t i = 0; i < choice.candidates.size(); ++i)
        std::printf("%s %s %.1f", i == 0 ? "" : ",", choice.candidates[i].describe().c_str(), choice.predicted_ms[i]);
      std::printf("\n# auto: chose %s, predicted %.1f ms, measured %.1f ms (median)\n",
                  choice.schedule.describe().c_str(), predicted, median(layer_ms));
    }
    std::printf("# %12s %12s %12s %14s %14s %10s\n", "ms_step", "ms_min", "tokens/s", "expert_GF/s", "sgemm_GF/s",
                "ratio");
    std::printf("  %12.2f %12.2f %12.0f %14.1f %14.1f %10.3f\n", ms,
                *std::min_element(layer_ms.begin(), layer_ms.end()), tokens_per_s, gflops,
                reference ? sgemm_gflops : 0.0, reference ? ratio : 0.0);
    std::printf("# %10s %10s %10s %10s %10s %10s | %10s %10s %12s | %14s %14s %8s\n", "gate", "permute", "dispatch",
                "experts", "combine", "shared", "comm", "compute", "step/max", "bytes_intra", "bytes_inter", "max/mean");
    std::printf("  %10.2f %10.2f %10.2f %10.2f %10.2f %10.2f | %10.2f %10.2f %12.3f | %14lld %14lld %8.3f\n",
                median(stage_ms[0]), median(stage_ms[1]), median(stage_ms[2]), median(stage_ms[3]),
                median(stage_ms[4]), median(stage_ms[5]), ms_comm, ms_compute, ms / std::max(ms_comm, ms_compute),
                static_cast<long long>(bytes[0]), static_cast<long long>(bytes[1]), max_mean_load);
    std::printf("# after the backward, not in comm: the replicated gradients' all-reduce (and replica sums) %.2f ms\n",
                median(allreduce_ms));
    if (opt.on("json")) {
      nlohmann::json j{{"bench", "layer"}, {"ranks", world.size()}, {"hidden", H}, {"ffn", F},
                       {"experts", config.n_routed_experts}, {"shared", config.n_shared_experts},
                       {"topk", config.num_experts_per_tok}, {"tokens_per_rank", T}, {"iters", iters},
                       {"ms_step", ms}, {"tokens_per_s", tokens_per_s}, {"expert_gflops", gflops},
                       {"blas", moex::blas::kernel_name()}, {"nodes", topology.num_nodes()},
                       {"chunks", choice.schedule.chunks}, {"local_first", choice.schedule.local_first},
                       {"local_split", choice.schedule.local_split},
                       {"schedule", choice.automatic ? "auto" : "fixed"}, {"overlap", lo.overlap ? "on" : "off"},
                       {"exchange", moex::to_string(lo.exchange)}, {"skew", skew}, {"ms_comm", ms_comm},
                       {"ms_compute", ms_compute}, {"step_over_max_comm_compute", ms / std::max(ms_comm, ms_compute)},
                       {"ms_gate", median(stage_ms[0])}, {"ms_permute", median(stage_ms[1])},
                       {"ms_dispatch", median(stage_ms[2])}, {"ms_experts", median(stage_ms[3])},
                       {"ms_combine", median(stage_ms[4])}, {"ms_shared", median(stage_ms[5])},
                       {"ms_allreduce", median(allreduce_ms)},
                       {"bytes_intra_node", bytes[0]}, {"bytes_inter_node", bytes[1]},
                       {"max_mean_load", max_mean_load}, {"replicas", replicas ? "on" : "off"},
                       {"slots_per_rank", replicas ? slots : layer.num_local_experts()},
                       {"capacity_factor", lo.capacity_factor}, {"deterministic", lo.deterministic ? "on" : "off"}, {"picks_dropped", dropped},
                       {"dropped_fraction", static_cast<double>(dropped) /
                                                std::max(1.0, static_cast<double>(T * world.size() * config.num_experts_per_tok))}};
      if (choice.decided) j["ms_predicted"] = predicted;
      if (reference) {
        j["sgemm_ms"] = ref_ms;
        j["sgemm_gflops"] = sgemm_gflops;
        j["ratio"] = ratio;  // the median of the iterations' own ratios
        j["ratio_of_medians"] = gflops / sgemm_gflops;
      }
      std::printf("%s\n", j.dump().c_str());
    }
  }
  trace.finish();
  return 0;
}

int run(moex::comm::MpiCommunicator& world, int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  if (what == "layer") return bench_layer(world, argc, argv);
  if (what == "exchange") return moex::tools::bench_exchange(world, argc, argv);
  if (what == "model") return moex::tools::bench_model(world, argc, argv);
  throw moex::ConfigError("moex-bench: unknown benchmark '" + what +
                          "'; expected: layer, exchange or model (try moex-bench layer --help)");
}

}  // namespace

int main(int argc, char** argv) {
  return moex::tools::run_mpi_tool("moex-bench", argc, argv,
                                   [&](moex::comm::MpiCommunicator& world) { return run(world, argc, argv); });
}
