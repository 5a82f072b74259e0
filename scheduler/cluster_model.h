// The cost model at cluster scale (`moex-bench model`): what one training step of a MoE layer costs
// on N nodes of R ranks each, for every schedule moex can run, from measured rates. Pure: no MPI,
// no timing. It builds on the pipeline model that `--chunks auto` runs (pipeline_model.h): the same
// two-resource simulation of a pass, fed with the expected traffic of a cluster instead of one
// measured pass, so the two share their calibration (MachineRates).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "scheduler/pipeline_model.h"

namespace moex::sched {

/// The machines: nodes of ranks, and the rates of their links (per rank, each direction).
struct ClusterSpec {
  int nodes = 1;
  int ranks_per_node = 1;
  double intra_GBps = 0.0;  ///< a rank's rate to the ranks of its node (NVLink, shared memory)
  double inter_GBps = 0.0;  ///< a rank's share of its node's network rate (NIC / ranks per node)
  double intra_latency_us = 0.0, inter_latency_us = 0.0;  ///< what one exchange costs beyond its bytes
  /// How the replicated gradients are all-reduced: false, as a tree (reduce, then broadcast:
  /// 2 ceil(log2 P) full-buffer transfers; what Open MPI's in-place MPI_Iallreduce, moex's CPU
  /// path, measures on namespace nodes: see BENCHMARKS.md); true, a ring (2 (P-1) / P of the
  /// buffer; NCCL).
  bool ring_allreduce = false;
  int world() const { return nodes * ranks_per_node; }
};

/// One MoE layer and the tokens each rank brings to it per step.
struct LayerSpec {
  std::int64_t hidden = 0, ffn = 0, experts = 0, topk = 0;
  std::int64_t shared_ffn = 0;  ///< n_shared_experts * moe_intermediate_size (0: none)
  std::int64_t groups = 1, topk_groups = 1;  ///< n_group, topk_group (groups limited per token)
  std::int64_t tokens_per_rank = 0;
  double dispatch_elem_bytes = 4.0;  ///< bytes per hidden element going out (fp32 4, bf16 2, fp8 ~1)
  double combine_elem_bytes = 4.0;   ///< ... coming back, and of the gradients of backward
  double grad_elem_bytes = 4.0;      ///< the replicated gradients' all-reduce (gate, shared experts)
  double load_imbalance = 1.0;       ///< the busiest rank's routed entries over the mean (>= 1)
};

/// The compute of one rank: the expert FFN's GEMM rate (MachineRates' gemm part, at `ffn`), and
/// the rest of a pass (gate, permutes, weighted sums) per token. `share` scales every compute time
/// (ranks sharing cores: ranks / cores).
struct ComputeSpec {
  MachineRates rates;
  double other_ms_per_token = 0.0;
  double share = 1.0;
};

/// A way to run the layer: the pipeline schedule, flat or hierarchical, overlap, replicas (which
/// bring the load imbalance to `replica_imbalance`).
struct ClusterOption {
  Schedule schedule;
  bool hierarchical = false;
  bool overlap = true;
  bool replicas = false;
  std::string describe() const;
};

/// The expected traffic of one forward dispatch, per rank (the mean rank), from the routing rule
/// and the node-aware placement (experts in consecutive blocks per node, then per rank).
struct ClusterTraffic {
  double rows_intra = 0;       ///< flat: rows to the other ranks of this node
  double rows_inter = 0;       ///< flat: rows to ranks of other nodes (one per token and rank)
  double rows_inter_hier = 0;  ///< hierarchical stage A: rows to other nodes (one per token and node)
  double rows_stage_b = 0;     ///< hierarchical stage B: rows a forwarder passes on within its node
  double ranks_per_token = 0, nodes_per_token = 0, experts_per_node = 0;  ///< per token, mean
};

/// The prediction of one option: a training step of the layer (forward, backward, the all-reduce of
/// the replicated gradients, as `moex-bench layer` times it).
struct ClusterPrediction {
  ClusterOption option;
  ClusterTraffic traffic;
  Prediction pass;
  double allreduce_ms = 0;    ///< replicated gradients, after the backward
  double exchange_ms = 0;     ///< the four exchanges' time, if nothing overlapped them
  double compute_ms = 0;      ///< all compute of the pass, the busiest rank
  double bytes_intra = 0, bytes_inter = 0;  ///< per rank and step: bytes over node-local links and the network
  double step_ms() const { return pass.total_ms() + allreduce_ms; }
};

/// The expected traffic per rank (a deterministic Monte Carlo over `samples` tokens of the routing
/// rule: topk_groups of the groups uniformly, then top-K uniformly among their experts).
/// InvalidArgument on inconsistent specs (naming the field).
ClusterTraffic expected_traffic(const ClusterSpec& cluster, const LayerSpec& layer, std::int64_t samples = 20000);

/// One option's step. `replica_imbalance`: the load imbalance replicas reach.
ClusterPrediction predict_step(const ClusterSpec& cluster, const LayerSpec& layer, const ComputeSpec& compute,
                               const ClusterOption& option, const ClusterTraffic& traffic,
                               double replica_imbalance = 1.02);

/// Every option moex can run on `cluster` (the candidate schedules of `--chunks auto`, flat and,
/// with several nodes, hierarchical; replicas where the load is imbalanced), with the exchange
/// overlapped and / or serialised as asked, fastest first, for `traffic`.
std::vector<ClusterPrediction> rank_options(const ClusterSpec& cluster, const LayerSpec& layer,
                                            const ComputeSpec& compute, const ClusterTraffic& traffic,
                                            bool overlapped = true, bool serialised = false);

}  // namespace moex::sched
