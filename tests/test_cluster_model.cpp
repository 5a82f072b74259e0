// The cluster cost model (scheduler/cluster_model.h): its expected traffic against closed forms,
// its step against hand-worked figures, and its errors. Pure arithmetic: no MPI, no timing.
#include <gtest/gtest.h>

#include <cmath>

#include "base/error.h"
#include "scheduler/cluster_model.h"

namespace moex::sched {
namespace {

/// C(n, k) as a double.
double choose(int n, int k) {
  if (k < 0 || k > n) return 0.0;
  double c = 1.0;
  for (int i = 1; i <= k; ++i) c = c * (n - k + i) / i;
  return c;
}

LayerSpec layer(std::int64_t E, std::int64_t K, std::int64_t T) {
  LayerSpec l;
  l.hidden = 64;
  l.ffn = 32;
  l.experts = E;
  l.topk = K;
  l.tokens_per_rank = T;
  return l;
}

TEST(ClusterModel, TrafficMatchesTheClosedForm) {
  // Uniform top-K of E, m experts per rank: a token reaches a given rank with probability
  // 1 - C(E - m, K) / C(E, K); a node of n ranks with 1 - C(E - n m, K) / C(E, K).
  ClusterSpec c;
  c.nodes = 2;
  c.ranks_per_node = 2;
  c.intra_GBps = c.inter_GBps = 1.0;
  const LayerSpec l = layer(16, 4, 1000);
  const ClusterTraffic t = expected_traffic(c, l, 200000);
  const double p_rank = 1.0 - choose(12, 4) / choose(16, 4), p_node = 1.0 - choose(8, 4) / choose(16, 4);
  EXPECT_NEAR(t.ranks_per_token, 4 * p_rank, 0.01);
  EXPECT_NEAR(t.nodes_per_token, 2 * p_node, 0.01);
  EXPECT_NEAR(t.rows_intra, 1000 * p_rank, 5.0);       // the other rank of the node
  EXPECT_NEAR(t.rows_inter, 1000 * 2 * p_rank, 8.0);   // the two ranks of the other node
  EXPECT_NEAR(t.rows_inter_hier, 1000 * p_node, 5.0);  // once to the other node
  // Stage B: of each (token, node) row, the owners other than the forwarder, on both nodes.
  EXPECT_NEAR(t.rows_stage_b, 1000 * 2 * p_rank, 8.0);
  EXPECT_NEAR(t.experts_per_node, 4 / (2 * p_node), 0.01);
}

TEST(ClusterModel, NodeLimitedRoutingReachesAtMostTopkGroupNodes) {
  ClusterSpec c;
  c.nodes = 8;
  c.ranks_per_node = 1;
  c.inter_GBps = 1.0;
  LayerSpec l = layer(64, 8, 100);
  l.groups = 8;
  l.topk_groups = 2;
  const ClusterTraffic t = expected_traffic(c, l, 20000);
  EXPECT_LE(t.nodes_per_token, 2.0 + 1e-12);
  EXPECT_GT(t.nodes_per_token, 1.9);  // 8 picks among 16 experts of 2 nodes: both nodes nearly always
  l.topk_groups = 8;
  EXPECT_GT(expected_traffic(c, l, 20000).nodes_per_token, 5.0);
}

TEST(ClusterModel, OneRankIsThePipelineModelWithoutLinks) {
  ClusterSpec c;
  const LayerSpec l = layer(4, 2, 100);
  ComputeSpec comp;
  comp.rates.gemm_fixed_ms = 1.0;
  comp.rates.gemm_row_ms = 0.01;
  comp.other_ms_per_token = 0.001;
  const ClusterPrediction p = predict_step(c, l, comp, {}, expected_traffic(c, l));
  // 4 experts x 50 entries: 1.5 ms each, forward, backward data and weights: 3 x 4 x 1.5 = 18 ms,
  // plus 0.1 ms of other work. No exchange, no all-reduce.
  EXPECT_NEAR(p.step_ms(), 18.1, 1e-9);
  EXPECT_DOUBLE_EQ(p.allreduce_ms, 0.0);
  EXPECT_DOUBLE_EQ(p.exchange_ms, 0.0);
  EXPECT_NEAR(p.compute_ms, 18.1, 1e-9);
}

TEST(ClusterModel, ExchangeAndAllReduceByHand) {
  // 2 nodes x 1 rank, E = 2, K = 1: every token goes to one expert, half to the other rank: 500
  // rows of 64 fp32 per exchange, 128,000 bytes at 1 GB/s (1e6 bytes/ms) = 0.128 ms + 0.05 latency.
  ClusterSpec c;
  c.nodes = 2;
  c.inter_GBps = 1.0;
  c.inter_latency_us = 50;
  LayerSpec l = layer(2, 1, 1000);
  ClusterTraffic t;
  t.rows_inter = t.rows_inter_hier = 500;
  ComputeSpec comp;  // no compute
  ClusterOption serial;
  serial.overlap = false;
  ClusterPrediction p = predict_step(c, l, comp, serial, t);
  EXPECT_NEAR(p.exchange_ms, 4 * (0.05 + 0.128), 1e-12);
  // Replicated gradients: the gate, 2 x 64 fp32 = 512 bytes; binomial over 2 ranks: 2 transfers.
  EXPECT_NEAR(p.allreduce_ms, 2 * 512 / 1e6 + 2 * 0.05, 1e-12);
  EXPECT_NEAR(p.step_ms(), p.exchange_ms + p.allreduce_ms, 1e-12);
  EXPECT_DOUBLE_EQ(p.bytes_inter, 500 * 64 * 16.0);  // 4 exchanges x 4 bytes
  c.ring_allreduce = true;  // 2 (P-1) / P = 1 transfer
  EXPECT_NEAR(predict_step(c, l, comp, serial, t).allreduce_ms, 512 / 1e6 + 2 * 0.05, 1e-12);
  // Half the link rate: twice the bytes' time.
  c.inter_GBps = 0.5;
  EXPECT_NEAR(predict_step(c, l, comp, serial, t).exchange_ms, 4 * (0.05 + 0.256), 1e-12);
  // Imbalance scales the busiest rank's rows; replicas bring it back.
  l.load_imbalance = 2.0;
  EXPECT_NEAR(predict_step(c, l, comp, serial, t).exchange_ms, 4 * (0.05 + 0.512), 1e-12);
  serial.replicas = true;
  EXPECT_NEAR(predict_step(c, l, comp, serial, t, 1.0).exchange_ms, 4 * (0.05 + 0.256), 1e-12);
}

TEST(ClusterModel, RanksOptionsFastestFirstAndHierarchicalOnlyAcrossNodes) {
  ClusterSpec c;
  c.nodes = 1;
  c.ranks_per_node = 2;
  c.intra_GBps = 1.0;
  ComputeSpec comp;
  comp.rates.gemm_row_ms = 0.001;
  const auto one = rank_options(c, layer(8, 2, 256), comp, expected_traffic(c, layer(8, 2, 256)));
  for (const auto& p : one) EXPECT_FALSE(p.option.hierarchical);
  c.nodes = 2;
  c.inter_GBps = 0.1;
  const auto two = rank_options(c, layer(8, 2, 256), comp, expected_traffic(c, layer(8, 2, 256)));
  bool hier = false;
  for (std::size_t i = 0; i < two.size(); ++i) {
    hier = hier || two[i].option.hierarchical;
    if (i > 0) {
      EXPECT_LE(two[i - 1].step_ms(), two[i].step_ms());
    }
  }
  EXPECT_TRUE(hier);
}

TEST(ClusterModel, RejectsInconsistentSpecs) {
  ClusterSpec c;
  c.nodes = 2;
  c.inter_GBps = 0.0;  // several nodes need a network rate
  EXPECT_THROW(expected_traffic(c, layer(8, 2, 10)), InvalidArgument);
  c.inter_GBps = 1.0;
  EXPECT_THROW(expected_traffic(c, layer(1, 1, 10)), InvalidArgument);  // fewer experts than ranks
  EXPECT_THROW(expected_traffic(c, layer(8, 9, 10)), InvalidArgument);  // top-K beyond the experts
  LayerSpec l = layer(8, 2, 10);
  l.groups = 3;  // does not divide 8
  EXPECT_THROW(expected_traffic(c, l), InvalidArgument);
  l.groups = 4;
  l.topk_groups = 1;
  l.topk = 3;  // more than the 2 experts of one group
  EXPECT_THROW(expected_traffic(c, l), InvalidArgument);
}

}  // namespace
}  // namespace moex::sched
