// moex-bench model: the cluster cost model (scheduler/cluster_model.h) for a layer shape, a token
// count, nodes of ranks and link rates. The compute rates are measured here (the calibration of
// `--chunks auto`: a one-rank layer's fitted expert GEMM and its other stages per token) or given
// (--gemm-tflops for another machine); the link rates are given (from `moex-bench exchange`).
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "examples/bench_tools.h"
#include "runtime/io/moe_config.h"
#include "runtime/model/moe_model.h"
#include "runtime/moe_layer.h"
#include "runtime/random.h"
#include "scheduler/cluster_model.h"
#include "scheduler/expert_placement.h"
#include "scheduler/topology.h"

namespace moex::tools {
namespace {

/// The compute rates of `config` on this rank: a one-rank layer with `--chunks auto` runs its
/// measured passes and fits its expert GEMM (MoELayer's own calibration); then three passes time
/// the stages that are neither expert nor shared GEMMs, per token.
sched::ComputeSpec measure_compute(const MoeConfig& config, comm::MpiCommunicator& world, std::int64_t tokens,
                                   std::uint64_t seed) {
  const auto topology = sched::Topology::from_node_ids(std::vector<int>{0});
  LayerOptions lo;
  lo.chunks = 0;
  MoELayer layer(config, world, sched::ExpertPlacement::contiguous(config.n_routed_experts, 1), "calibration",
                 topology, lo);
  init_layer_random(layer, seed, 0);
  const std::int64_t H = config.hidden_size;
  std::vector<float> x(static_cast<std::size_t>(tokens * H)), dy(x.size()), y(x.size()), dx(x.size());
  Rng rng(seed);
  rng.fill_normal(x.data(), tokens * H, 1.0);
  rng.fill_normal(dy.data(), tokens * H, 1.0);
  auto pass = [&] {
    layer.zero_grad();
    layer.forward(x.data(), tokens, y.data());
    layer.backward(dy.data(), dx.data());
  };
  for (int i = 0; i < MoELayer::kAutoPasses + 1; ++i) pass();
  if (!layer.schedule_choice().decided)
    throw InternalError("moex-bench model: the calibration layer did not measure its rates");
  sched::ComputeSpec c;
  c.rates = layer.schedule_choice().rates;
  layer.reset_counters();
  constexpr int kPasses = 3;
  for (int i = 0; i < kPasses; ++i) pass();
  const LayerCounters& k = layer.counters();
  c.other_ms_per_token = (k.gate + k.permute + k.combine) / kPasses / static_cast<double>(std::max<std::int64_t>(tokens, 1));
  return c;
}

}  // namespace

int bench_model(comm::MpiCommunicator& world, int argc, char** argv) {
  Options opt("moex-bench model",
              "moex-bench model [--config C.json | --hidden H --ffn F --experts E --shared S --topk K] "
              "--tokens-per-rank T --nodes N --ranks-per-node R --inter-gbps G --intra-gbps G [--json]");
  opt.value("config", "", "a Hugging Face DeepSeek config.json (else the shape flags)");
  add_shape_options(opt);
  opt.value("tokens-per-rank", "2048", "tokens per rank per step")
      .value("nodes", "1", "nodes")
      .value("ranks-per-node", "1", "ranks (GPUs) per node")
      .value("intra-gbps", "10", "GB/s per rank to the ranks of its node (each direction)")
      .value("inter-gbps", "0.1", "GB/s per rank across nodes (its share of the node's network)")
      .value("intra-latency-us", "20", "microseconds one exchange costs within a node beyond its bytes")
      .value("inter-latency-us", "100", "microseconds one exchange costs across nodes beyond its bytes")
      .value("allreduce", "binomial",
             "binomial (2 ceil(log2 P) full transfers: Open MPI's in-place MPI_Iallreduce, moex's CPU path) or ring (NCCL): the replicated "
             "gradients' all-reduce")
      .value("dispatch-bytes", "4", "bytes per element of the rows going out (4 fp32, 2 bf16, 1 fp8)")
      .value("combine-bytes", "4", "bytes per element coming back and of the gradients")
      .value("load-imbalance", "1", "the busiest rank's routed entries over the mean (moex-train's max/mean rank load)")
      .value("compute-share", "1", "multiplies every compute time (ranks sharing cores: ranks / cores)")
      .value("gemm-tflops", "0", "> 0: the expert GEMM rate in TFLOP/s instead of measuring it here")
      .value("gemm-fixed-us", "10", "with --gemm-tflops: the fixed cost of one expert's GEMMs (launches)")
      .value("other-us-per-token", "-1", ">= 0: gate, permutes and sums per token instead of measuring them")
      .value("overlap", "on", "on, off or both: the schedules with the exchange overlapped or serialised")
      .value("show", "8", "options to print, fastest first (0: all)")
      .value("seed", "1", "seed of the calibration layer")
      .flag("json", "also print one JSON line per option");
  if (!opt.parse(argc, argv, 2)) return 0;
  const MoeConfig config = opt.str("config").empty() ? shape_config(opt) : MoeConfig::from_file(opt.str("config"));
  sched::ClusterSpec c;
  c.nodes = static_cast<int>(opt.integer("nodes"));
  c.ranks_per_node = static_cast<int>(opt.integer("ranks-per-node"));
  c.intra_GBps = opt.non_negative("intra-gbps");
  c.inter_GBps = opt.non_negative("inter-gbps");
  c.intra_latency_us = opt.non_negative("intra-latency-us");
  c.inter_latency_us = opt.non_negative("inter-latency-us");
  if (opt.str("allreduce") != "binomial" && opt.str("allreduce") != "ring")
    throw ConfigError("--allreduce = " + opt.str("allreduce") + ": expected binomial or ring");
  c.ring_allreduce = opt.str("allreduce") == "ring";
  sched::LayerSpec l;
  l.hidden = config.hidden_size;
  l.ffn = config.moe_intermediate_size;
  l.experts = config.n_routed_experts;
  l.topk = config.num_experts_per_tok;
  l.shared_ffn = config.n_shared_experts > 0 ? config.shared_intermediate_size() : 0;
  l.groups = config.n_group;
  l.topk_groups = config.topk_group;
  l.tokens_per_rank = opt.integer("tokens-per-rank");
  l.dispatch_elem_bytes = opt.non_negative("dispatch-bytes");
  l.combine_elem_bytes = opt.non_negative("combine-bytes");
  l.load_imbalance = opt.number("load-imbalance");
  const std::string overlap = opt.str("overlap");
  if (overlap != "on" && overlap != "off" && overlap != "both")
    throw ConfigError("--overlap = " + overlap + ": expected on, off or both");

  sched::ComputeSpec compute;
  const double tflops = opt.non_negative("gemm-tflops");
  const bool measured = tflops <= 0;
  if (!measured) {
    // One expert's forward GEMMs per row: 2*H*2F (gate and up) + 2*F*H (down) FLOPs.
    compute.rates.gemm_row_ms = 6.0 * static_cast<double>(l.hidden) * static_cast<double>(l.ffn) / (tflops * 1e9);
    compute.rates.gemm_fixed_ms = opt.non_negative("gemm-fixed-us") / 1000.0;
  } else {
    if (world.size() != 1)
      throw ConfigError("moex-bench model measures its compute rates on one rank: run it without mpirun or with "
                        "-np 1 (or give --gemm-tflops)");
    const double bytes = 4.0 * 3.0 * static_cast<double>(l.hidden * l.ffn) * static_cast<double>(l.experts);
    if (bytes > 4e9)
      throw ConfigError("moex-bench model: measuring this shape here needs " + std::to_string(bytes / 1e9) +
                        " GB of expert weights; give --gemm-tflops (and --other-us-per-token) for its machine");
    compute = measure_compute(config, world, std::min<std::int64_t>(std::max<std::int64_t>(l.tokens_per_rank, 64), 4096),
                              static_cast<std::uint64_t>(opt.integer("seed")));
  }
  if (opt.number("other-us-per-token") >= 0) compute.other_ms_per_token = opt.number("other-us-per-token") / 1000.0;
  compute.share = opt.number("compute-share");

  // Every option for a routing rule, fastest first.
  const auto rank = [&](const sched::LayerSpec& spec, const sched::ClusterTraffic& t) {
    return sched::rank_options(c, spec, compute, t, overlap != "off", overlap != "on");
  };
  const sched::ClusterTraffic traffic = sched::expected_traffic(c, l);
  const std::vector<sched::ClusterPrediction> options = rank(l, traffic);
  if (world.rank() != 0) return 0;
  std::printf("# moex-bench model | %d nodes x %d ranks | hidden %lld ffn %lld experts %lld shared ffn %lld topk %lld "
              "groups %lld/%lld | tokens/rank %lld\n",
              c.nodes, c.ranks_per_node, static_cast<long long>(l.hidden), static_cast<long long>(l.ffn),
              static_cast<long long>(l.experts), static_cast<long long>(l.shared_ffn), static_cast<long long>(l.topk),
              static_cast<long long>(l.topk_groups), static_cast<long long>(l.groups),
              static_cast<long long>(l.tokens_per_rank));
  std::printf("# links: intra %.3f GB/s + %.0f us, inter %.3f GB/s + %.0f us per rank | elements %.0f B out, %.0f B "
              "back | load imbalance %.2f\n",
              c.intra_GBps, c.intra_latency_us, c.inter_GBps, c.inter_latency_us, l.dispatch_elem_bytes,
              l.combine_elem_bytes, l.load_imbalance);
  std::printf("# compute (%s): expert GEMM %.4f ms + %.6f ms/row, other %.3f us/token, x%.2f share\n",
              measured ? "measured here" : "given", compute.rates.gemm_fixed_ms, compute.rates.gemm_row_ms,
              compute.other_ms_per_token * 1000.0, compute.share);
  std::printf("# traffic per token: %.2f ranks, %.2f nodes, %.2f experts per node | per rank and dispatch: flat %.0f "
              "rows intra + %.0f inter; hierarchical %.0f across + %.0f within\n",
              traffic.ranks_per_token, traffic.nodes_per_token, traffic.experts_per_node, traffic.rows_intra,
              traffic.rows_inter, traffic.rows_inter_hier, traffic.rows_stage_b);
  std::printf("# %-44s %10s %9s %9s %9s %10s %10s %8s %12s %12s\n", "option", "step_ms", "fwd_ms", "bwd_ms",
              "allred_ms", "exch_ms", "compute_ms", "comm/cmp", "bytes_intra", "bytes_inter");
  const auto show = static_cast<std::size_t>(std::max<std::int64_t>(0, opt.integer("show")));
  for (std::size_t i = 0; i < options.size(); ++i) {
    const auto& p = options[i];
    if (show == 0 || i < show)
      std::printf("  %-44s %10.3f %9.3f %9.3f %9.3f %10.3f %10.3f %8.2f %12.0f %12.0f\n", p.option.describe().c_str(),
                  p.step_ms(), p.pass.forward_ms, p.pass.backward_ms, p.allreduce_ms, p.exchange_ms, p.compute_ms,
                  p.compute_ms > 0 ? p.exchange_ms / p.compute_ms : 0.0, p.bytes_intra, p.bytes_inter);
    if (opt.on("json")) {
      nlohmann::json j{{"bench", "model"}, {"nodes", c.nodes}, {"ranks_per_node", c.ranks_per_node},
                       {"tokens_per_rank", l.tokens_per_rank}, {"exchange", p.option.hierarchical ? "hierarchical" : "flat"},
                       {"chunks", p.option.schedule.chunks}, {"local_first", p.option.schedule.local_first},
                       {"local_split", p.option.schedule.local_split},
                       {"overlap", p.option.overlap ? "on" : "off"}, {"replicas", p.option.replicas ? "on" : "off"},
                       {"ms_step", p.step_ms()}, {"ms_forward", p.pass.forward_ms}, {"ms_backward", p.pass.backward_ms},
                       {"ms_allreduce", p.allreduce_ms}, {"ms_exchange", p.exchange_ms}, {"ms_compute", p.compute_ms},
                       {"bytes_intra", p.bytes_intra}, {"bytes_inter", p.bytes_inter}, {"rank", i},
                       {"gemm_fixed_ms", compute.rates.gemm_fixed_ms}, {"gemm_row_ms", compute.rates.gemm_row_ms},
                       {"other_us_per_token", compute.other_ms_per_token * 1000.0},
                       {"nodes_per_token", traffic.nodes_per_token}, {"experts_per_node", traffic.experts_per_node}};
      std::printf("%s\n", j.dump().c_str());
    }
  }
  std::printf("# best: %s, %.3f ms per step\n", options.front().option.describe().c_str(), options.front().step_ms());
  // Node-limited routing (DeepSeek-V3: groups = nodes, each token to at most M of them) changes what
  // the model computes, so it is shown beside the schedules, not among them.
  if (c.nodes > 1 && l.experts % c.nodes == 0 && l.groups != c.nodes) {
    for (std::int64_t m = 1; m < std::min<std::int64_t>(c.nodes, 5); ++m) {
      sched::LayerSpec limited = l;
      limited.groups = c.nodes;
      limited.topk_groups = m;
      if (limited.topk > m * (l.experts / c.nodes)) continue;
      const auto t = sched::expected_traffic(c, limited);
      const auto best = rank(limited, t).front();
      std::printf("# with node-limited routing (n_group %d, topk_group %lld; a routing change): %.2f nodes per token, "
                  "best %s, %.3f ms per step\n",
                  c.nodes, static_cast<long long>(m), t.nodes_per_token, best.option.describe().c_str(), best.step_ms());
    }
  }
  return 0;
}

}  // namespace moex::tools
