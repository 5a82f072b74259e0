// The distributed MoE layer equals the same layer on one rank: output, input gradient and every
// parameter gradient, for DeepSeek-style configurations and degenerate routing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "runtime/moe_layer.h"
#include "runtime/model/moe_model.h"
#include "runtime/random.h"
#include "scheduler/replica_planner.h"
#include "tests/mpi_test_env.h"
#include "tests/tolerance.h"

namespace moex {
namespace {

struct Case {
  const char* name;
  const char* scoring;
  const char* method;
  std::int64_t experts, shared, topk, groups, topk_group, tokens;
  bool norm;
  double scale;
  bool skew;  ///< one gate row dominates: every token picks the same expert first
};

MoeConfig config_of(const Case& c) {
  nlohmann::json j{{"model_type", "deepseek_v3"}, {"hidden_size", 12}, {"moe_intermediate_size", 6},
                   {"n_routed_experts", c.experts}, {"n_shared_experts", c.shared},
                   {"num_experts_per_tok", c.topk}, {"n_group", c.groups}, {"topk_group", c.topk_group},
                   {"topk_method", c.method}, {"scoring_func", c.scoring}, {"norm_topk_prob", c.norm},
                   {"routed_scaling_factor", c.scale}, {"num_hidden_layers", 1}};
  return MoeConfig::from_json(j);
}

using testing::rel_err;

/// The skew of the `skew` cases: one gate row dominates, so expert 0 wins every token with positive
/// features.
void skew_gate(MoELayer& layer) {
  for (std::int64_t j = 0; j < layer.config().hidden_size; ++j) layer.gate_weight()[j] = 5.0f;
}

/// The global batch x [T, H] and dL/dy [T, H] from `seed`; with `skew`, x is made non-negative.
struct Inputs {
  std::vector<float> x, dy;
};
Inputs draw_inputs(std::int64_t T, std::int64_t H, std::uint64_t seed, bool skew) {
  Inputs in{std::vector<float>(static_cast<std::size_t>(T * H)), std::vector<float>(static_cast<std::size_t>(T * H))};
  Rng rng(seed);
  rng.fill_normal(in.x.data(), T * H, 1.0);
  rng.fill_normal(in.dy.data(), T * H, 1.0);
  if (skew)
    for (auto& v : in.x) v = std::abs(v);
  return in;
}

class LayerRanks : public ::testing::TestWithParam<Case> {};

TEST_P(LayerRanks, DistributedEqualsSingleRank) {
  const Case& c = GetParam();
  const MoeConfig cfg = config_of(c);
  auto& world = testing::world();
  const std::int64_t H = cfg.hidden_size, T = c.tokens;
  comm::MpiCommunicator self(MPI_COMM_SELF);
  MoELayer one(cfg, self, sched::ExpertPlacement::contiguous(cfg.n_routed_experts, 1), "single");
  MoELayer dist(cfg, world, sched::ExpertPlacement::contiguous(cfg.n_routed_experts, world.size()), "dist");
  init_layer_random(one, 5, 0);
  init_layer_random(dist, 5, 0);
  if (c.skew) {
    skew_gate(one);
    skew_gate(dist);
  }
  if (!one.selection_bias().empty()) {
    for (std::int64_t e = 0; e < cfg.n_routed_experts; ++e)
      one.selection_bias()[static_cast<std::size_t>(e)] = dist.selection_bias()[static_cast<std::size_t>(e)] = 0.05f * static_cast<float>(e % 3);
  }
  const auto [x, dy] = draw_inputs(T, H, 77, c.skew);

  std::vector<float> y1(x.size()), dx1(x.size());
  one.zero_grad();
  one.forward(x.data(), T, y1.data());
  one.backward(dy.data(), dx1.data());

  // This rank's share of the tokens (uneven; a rank gets none when T < ranks).
  const std::int64_t b = T * world.rank() / world.size(), e = T * (world.rank() + 1) / world.size();
  std::vector<float> y(static_cast<std::size_t>((e - b) * H)), dx(y.size());
  dist.zero_grad();
  dist.forward(x.data() + b * H, e - b, y.data());
  dist.backward(dy.data() + b * H, dx.data());
  dist.allreduce_replicated_grads()->wait();

  // fp32 with different summation orders (partial sums per rank): 1e-5 relative to the tensor's scale.
  const double tol = 1e-5;
  bool ok = true;
  auto check = [&](const char* what, const float* a, const float* ref, std::size_t n) {
    const double err = rel_err(a, ref, n);
    EXPECT_LE(err, tol) << what;
    ok = ok && err <= tol;
  };
  check("output", y.data(), y1.data() + b * H, y.size());
  check("input grad", dx.data(), dx1.data() + b * H, dx.size());
  check("replicated grads (gate, shared)", dist.replicated().grad.data(), one.replicated().grad.data(),
        one.replicated().grad.size());
  const auto mine = dist.placement().experts_of(world.rank());
  for (std::size_t s = 0; s < mine.size(); ++s) {
    const auto stride = static_cast<std::size_t>(dist.expert_stride());
    check("expert grads", dist.experts().grad.data() + s * stride,
          one.experts().grad.data() + static_cast<std::size_t>(mine[s]) * stride, stride);
  }
  EXPECT_TRUE(testing::all_ranks(ok));
}

/// Runs forward + backward + gradient all-reduce with `options` and returns every result (this
/// rank's output, input gradient, replicated and expert gradients), concatenated.
std::vector<float> run_layer(const MoeConfig& cfg, const sched::Topology& topo, const LayerOptions& options,
                             const std::vector<float>& x, const std::vector<float>& dy, std::int64_t b,
                             std::int64_t e, bool skew) {
  auto& world = testing::world();
  const std::int64_t H = cfg.hidden_size;
  MoELayer layer(cfg, world, sched::ExpertPlacement::node_aware(cfg.n_routed_experts, topo), "sched", topo, options);
  init_layer_random(layer, 9, 0);
  if (skew)
    skew_gate(layer);
  std::vector<float> y(static_cast<std::size_t>((e - b) * H)), dx(y.size());
  for (int step = 0; step < 2; ++step) {  // twice: buffers reused across steps must not leak state
    layer.zero_grad();
    layer.forward(x.data() + b * H, e - b, y.data());
    layer.backward(dy.data() + b * H, dx.data());
    layer.allreduce_replicated_grads()->wait();
  }
  std::vector<float> all(y);
  all.insert(all.end(), dx.begin(), dx.end());
  all.insert(all.end(), layer.replicated().grad.begin(), layer.replicated().grad.end());
  all.insert(all.end(), layer.experts().grad.begin(), layer.experts().grad.end());
  return all;
}

/// For a given chunk count, every schedule (overlap on or off, flat or hierarchical exchange) gives
/// bitwise the same output and gradients as the plain one (no overlap, flat) on the same topology.
/// Different chunk counts cut the expert GEMMs into different row blocks, and OpenBLAS's sgemm does
/// not give a row the same bits in every block size, so across chunk counts the results agree to
/// fp32 rounding (1e-5 of each result's scale) instead; with LayerOptions::deterministic (row-wise
/// GEMMs) every chunk count gives bitwise the one-chunk results.
void expect_schedules_agree(const MoeConfig& cfg, std::int64_t T, bool skew, std::uint64_t seed,
                            std::initializer_list<int> node_sizes, std::initializer_list<int> chunk_counts) {
  auto& world = testing::world();
  const std::int64_t H = cfg.hidden_size;
  const auto [x, dy] = draw_inputs(T, H, seed, skew);
  const std::int64_t b = T * world.rank() / world.size(), e = T * (world.rank() + 1) / world.size();
  bool ok = true;
  for (int per_node : node_sizes) {
    const auto topo = sched::Topology::uniform(world.size(), per_node);
    const auto one_chunk = run_layer(cfg, topo, {1, false, ExchangeKind::kFlat}, x, dy, b, e, skew);
    for (int chunks : chunk_counts) {
      const auto base = run_layer(cfg, topo, {chunks, false, ExchangeKind::kFlat}, x, dy, b, e, skew);
      const double err = rel_err(base.data(), one_chunk.data(), base.size());
      EXPECT_LE(err, 1e-5) << topo.describe() << ", chunks " << chunks << " vs 1 chunk";
      ok = ok && err <= 1e-5;
      for (bool overlap : {false, true})
        for (ExchangeKind ex : {ExchangeKind::kFlat, ExchangeKind::kHierarchical}) {
          const auto got = run_layer(cfg, topo, {chunks, overlap, ex}, x, dy, b, e, skew);
          std::size_t first = 0;
          while (first < got.size() && got[first] == base[first]) ++first;
          const bool same = got.size() == base.size() && first == got.size();
          EXPECT_TRUE(same) << topo.describe() << ", chunks " << chunks << ", overlap " << overlap << ", "
                            << to_string(ex) << ": first difference at " << first << " of " << got.size();
          ok = ok && same;
        }
      // Local-first: the own rows' GEMMs run apart from the others', so fp32 rounding again.
      // Local-split runs the same GEMMs and sums in the same order: local-first's bits.
      std::vector<float> local_first;
      for (bool split : {false, true})
        for (bool overlap : {false, true}) {
          const LayerOptions lo{chunks, overlap, ExchangeKind::kFlat, 0.0, false, true, split};
          const auto got = run_layer(cfg, topo, lo, x, dy, b, e, skew);
          const double lf_err = rel_err(got.data(), one_chunk.data(), got.size());
          EXPECT_LE(lf_err, 1e-5) << topo.describe() << ", chunks " << chunks << ", local-first, overlap " << overlap;
          ok = ok && lf_err <= 1e-5;
          if (local_first.empty()) local_first = got;
          const bool same = got == local_first;
          EXPECT_TRUE(same) << topo.describe() << ", chunks " << chunks << (split ? ", local-split" : ", local-first")
                            << ", overlap " << overlap << ": differs from local-first without overlap";
          ok = ok && same;
        }
    }
    // Deterministic schedule: bitwise the same for every chunk count too.
    const auto det_one = run_layer(cfg, topo, {1, false, ExchangeKind::kFlat, 0.0, true}, x, dy, b, e, skew);
    const double det_err = rel_err(det_one.data(), one_chunk.data(), det_one.size());
    EXPECT_LE(det_err, 1e-5) << topo.describe() << ": deterministic vs BLAS";
    ok = ok && det_err <= 1e-5;
    for (int chunks : chunk_counts)
      for (ExchangeKind ex : {ExchangeKind::kFlat, ExchangeKind::kHierarchical}) {
        const auto got = run_layer(cfg, topo, {chunks, true, ex, 0.0, true}, x, dy, b, e, skew);
        const bool same = got == det_one;
        EXPECT_TRUE(same) << topo.describe() << ", deterministic, chunks " << chunks << ", " << to_string(ex)
                          << ": differs from 1 chunk";
        ok = ok && same;
      }
    for (int chunks : chunk_counts)
      for (bool split : {false, true}) {
        const auto got =
            run_layer(cfg, topo, {chunks, true, ExchangeKind::kFlat, 0.0, true, true, split}, x, dy, b, e, skew);
        const bool same = got == det_one;
        EXPECT_TRUE(same) << topo.describe() << ", deterministic, chunks " << chunks
                          << (split ? ", local-split" : ", local-first") << ": differs";
        ok = ok && same;
      }
  }
  EXPECT_TRUE(testing::all_ranks(ok));
}

TEST_P(LayerRanks, EveryScheduleGivesTheSameResults) {
  const Case& c = GetParam();
  expect_schedules_agree(config_of(c), c.tokens, c.skew, 78, {1, 2, testing::world().size()}, {1, 2, 3, 5});
}

// --chunks auto: two measured passes of the unsplit schedule, then the same choice on every rank
// (the slowest rank's predictions), and results that agree with the one-chunk layer.
TEST(LayerSchedule, AutoChoosesOneScheduleOnEveryRank) {
  auto& world = testing::world();
  const MoeConfig cfg =
      config_of(Case{"v3_sigmoid_noaux_groups_bias", "sigmoid", "noaux_tc", 8, 1, 3, 4, 2, 40, true, 2.5, false});
  const std::int64_t H = cfg.hidden_size, T = 40;
  const auto [x, dy] = draw_inputs(T, H, 5, false);
  const std::int64_t b = T * world.rank() / world.size(), e = T * (world.rank() + 1) / world.size();
  const auto topo = sched::Topology::single_node(world.size());
  const auto placement = sched::ExpertPlacement::node_aware(cfg.n_routed_experts, topo);
  MoELayer autol(cfg, world, placement, "auto", topo, LayerOptions{});
  MoELayer plain(cfg, world, placement, "plain", topo, LayerOptions{1, false});
  init_layer_random(autol, 9, 0);
  init_layer_random(plain, 9, 0);
  std::vector<float> y(static_cast<std::size_t>((e - b) * H)), dx(y.size()), y1(y.size()), dx1(y.size());
  bool ok = true;
  for (int pass = 0; pass < 4; ++pass) {
    EXPECT_EQ(autol.schedule_choice().decided, pass > MoELayer::kAutoPasses) << "pass " << pass;
    for (MoELayer* l : {&autol, &plain}) l->zero_grad();
    autol.forward(x.data() + b * H, e - b, y.data());
    autol.backward(dy.data() + b * H, dx.data());
    plain.forward(x.data() + b * H, e - b, y1.data());
    plain.backward(dy.data() + b * H, dx1.data());
    const double err = std::max(rel_err(y.data(), y1.data(), y.size()), rel_err(dx.data(), dx1.data(), dx.size()));
    EXPECT_LE(err, 1e-5) << "pass " << pass << ", schedule " << autol.schedule_choice().schedule.describe();
    ok = ok && err <= 1e-5;
  }
  const ScheduleChoice& ch = autol.schedule_choice();
  ASSERT_TRUE(ch.decided);
  EXPECT_EQ(ch.candidates.size(), ch.predicted_ms.size());
  EXPECT_EQ(ch.candidates[ch.chosen], ch.schedule);
  for (double ms : ch.predicted_ms) EXPECT_GT(ms, 0.0);
  int mine[2] = {ch.schedule.chunks, (ch.schedule.local_first ? 1 : 0) + (ch.schedule.local_split ? 2 : 0)};
  std::vector<int> all(static_cast<std::size_t>(2 * world.size()));
  world.allgather(mine, all.data(), 2, comm::DataType::kInt32, "auto schedules")->wait();
  for (int r = 0; r < world.size(); ++r) {
    EXPECT_EQ(all[static_cast<std::size_t>(2 * r)], mine[0]) << "rank " << r << " chose other chunks";
    EXPECT_EQ(all[static_cast<std::size_t>(2 * r + 1)], mine[1]) << "rank " << r << " chose otherwise";
  }
  EXPECT_TRUE(testing::all_ranks(ok));
}

TEST(LayerSchedule, LargerShapesAgreeForEveryChunking) {
  // Shapes past BLAS micro-kernel sizes, with group-limited routing over 2 "nodes".
  nlohmann::json j{{"model_type", "deepseek_v3"}, {"hidden_size", 96}, {"moe_intermediate_size", 80},
                   {"n_routed_experts", 8}, {"n_shared_experts", 1}, {"num_experts_per_tok", 3},
                   {"n_group", 2}, {"topk_group", 1}, {"num_hidden_layers", 1}};
  expect_schedules_agree(MoeConfig::from_json(j), 150 * testing::world().size(), false, 79, {2}, {1, 4, 7});
}

/// A skewed expected load (Zipf 1.2 over a shuffled expert order) for planning test replicas.
std::vector<double> skewed_load(std::int64_t experts) {
  std::vector<double> load(static_cast<std::size_t>(experts));
  for (std::int64_t e = 0; e < experts; ++e)
    load[static_cast<std::size_t>((e * 5 + 3) % experts)] = 1000.0 / std::pow(static_cast<double>(e + 1), 1.2);
  return load;
}

/// Replica layouts to test on `topo`: the planner's answer for a skewed load with one spare slot per
/// rank, and the identity layout padded with repeats of each rank's own experts.
std::vector<sched::ReplicaLayout> test_layouts(const MoeConfig& cfg, const sched::Topology& topo) {
  const std::int64_t E = cfg.n_routed_experts, P = topo.world_size();
  const std::int64_t slots = (E + P - 1) / P + 1;
  std::vector<sched::ReplicaLayout> out;
  out.push_back(sched::plan_replicas(skewed_load(E), topo, cfg.n_group, slots));
  out.push_back(sched::identity_layout(E, topo, slots));
  return out;
}

/// With replicas (several copies of hot experts, tokens spread over them) the layer computes what
/// the single-rank layer computes, for every schedule: output, input gradient, replicated gradients,
/// and in every slot the full gradient of its expert (replica gradients summed). Each rank's experts
/// process exactly the picks that ReplicaLayout::choose() sends to them.
TEST_P(LayerRanks, ReplicasGiveTheSameResults) {
  const Case& c = GetParam();
  const MoeConfig cfg = config_of(c);
  auto& world = testing::world();
  const std::int64_t H = cfg.hidden_size, T = c.tokens, K = cfg.num_experts_per_tok;
  comm::MpiCommunicator self(MPI_COMM_SELF);
  MoELayer one(cfg, self, sched::ExpertPlacement::contiguous(cfg.n_routed_experts, 1), "single");
  init_layer_random(one, 5, 0);
  if (c.skew)
    skew_gate(one);
  const auto [x, dy] = draw_inputs(T, H, 81, c.skew);
  std::vector<float> y1(x.size()), dx1(x.size());
  one.zero_grad();
  one.forward(x.data(), T, y1.data());
  one.backward(dy.data(), dx1.data());
  const std::int64_t b = T * world.rank() / world.size(), e = T * (world.rank() + 1) / world.size();
  const double tol = 1e-5;
  bool ok = true;
  auto check = [&](const std::string& what, const float* a, const float* ref, std::size_t n) {
    const double err = rel_err(a, ref, n);
    EXPECT_LE(err, tol) << what;
    ok = ok && err <= tol;
  };
  for (int per_node : {1, 2, world.size()}) {
    const auto topo = sched::Topology::uniform(world.size(), per_node);
    for (const auto& layout : test_layouts(cfg, topo)) {
      for (const LayerOptions& o : {LayerOptions{1, false, ExchangeKind::kFlat}, LayerOptions{3, true, ExchangeKind::kFlat},
                                    LayerOptions{2, true, ExchangeKind::kHierarchical}}) {
        const std::string what = topo.describe() + ", " + std::to_string(layout.slots_per_rank()) + " slots, chunks " +
                                 std::to_string(o.chunks) + ", " + to_string(o.exchange) + ": ";
        MoELayer dist(cfg, world, layout, "replicas", topo, o);
        init_layer_random(dist, 5, 0);
        if (c.skew)
          skew_gate(dist);
        std::vector<float> y(static_cast<std::size_t>((e - b) * H)), dx(y.size());
        dist.zero_grad();
        dist.forward(x.data() + b * H, e - b, y.data());
        dist.backward(dy.data() + b * H, dx.data());
        dist.allreduce_replicated_grads()->wait();
        dist.reduce_replica_grads();
        check(what + "output", y.data(), y1.data() + b * H, y.size());
        check(what + "input grad", dx.data(), dx1.data() + b * H, dx.size());
        check(what + "replicated grads", dist.replicated().grad.data(), one.replicated().grad.data(),
              one.replicated().grad.size());
        const auto mine = dist.slot_experts(world.rank());
        const auto stride = static_cast<std::size_t>(dist.expert_stride());
        for (std::size_t s = 0; s < mine.size(); ++s)
          check(what + "expert " + std::to_string(mine[s]) + " grad in slot " + std::to_string(s),
                dist.experts().grad.data() + s * stride, one.experts().grad.data() + static_cast<std::size_t>(mine[s]) * stride,
                stride);
        // Entries each rank processed = the picks choose() sends there, from every rank's tokens.
        std::int64_t expected = 0;
        for (int src = 0; src < world.size(); ++src) {
          const std::int64_t sb = T * src / world.size(), se = T * (src + 1) / world.size();
          for (std::int64_t t = sb; t < se; ++t)
            for (std::int64_t j = 0; j < K; ++j) {
              const std::int64_t ex = one.topk_ids()[static_cast<std::size_t>(t * K + j)];
              const auto reps = layout.replicas(ex);
              expected += reps[static_cast<std::size_t>(layout.choose(ex, src, t - sb, topo))].rank == world.rank() ? 1 : 0;
            }
        }
        EXPECT_EQ(dist.route_stats().entries_processed, expected) << what << "entries processed";
        ok = ok && dist.route_stats().entries_processed == expected;
      }
    }
  }
  EXPECT_TRUE(testing::all_ranks(ok));
}

/// Moving to another replica layout carries every slot's parameters and its optimiser state along:
/// afterwards the layer equals one built in the new layout from the start, bit for bit, and computes
/// the same results.
TEST_P(LayerRanks, MigrationCarriesWeightsAndState) {
  const Case& c = GetParam();
  const MoeConfig cfg = config_of(c);
  auto& world = testing::world();
  const std::int64_t H = cfg.hidden_size, T = c.tokens, E = cfg.n_routed_experts;
  const auto topo = sched::Topology::uniform(world.size(), std::max(1, world.size() / 2));
  const std::int64_t slots = (E + world.size() - 1) / world.size() + 1;
  const auto from = sched::identity_layout(E, topo, slots);
  const auto to = sched::plan_replicas(skewed_load(E), topo, cfg.n_group, slots);
  MoELayer moved(cfg, world, from, "moved", topo);
  MoELayer fresh(cfg, world, to, "fresh", topo);
  init_layer_random(moved, 6, 0);
  init_layer_random(fresh, 6, 0);
  const auto stride = static_cast<std::size_t>(moved.expert_stride());
  // Optimiser-like state: a value that names the expert and the element.
  auto state_of = [&](std::span<const std::int64_t> experts) {
    std::vector<float> st(experts.size() * stride);
    for (std::size_t s = 0; s < experts.size(); ++s)
      for (std::size_t i = 0; i < stride; ++i) st[s * stride + i] = static_cast<float>(experts[s] * 100000 + static_cast<std::int64_t>(i));
    return st;
  };
  std::vector<float> m = state_of(moved.slot_experts(world.rank())), v = m, empty;
  std::vector<std::vector<float>*> state{&m, &v, &empty};
  moved.set_replica_layout(to, state);
  bool ok = moved.experts().value == fresh.experts().value;
  EXPECT_TRUE(ok) << "expert parameters after migration";
  const auto want = state_of(fresh.slot_experts(world.rank()));
  EXPECT_EQ(m, want);
  EXPECT_EQ(v, want);
  EXPECT_TRUE(empty.empty());
  ok = ok && m == want && v == want && empty.empty();
  std::vector<float> x(static_cast<std::size_t>(T * H));
  Rng rng(82);
  rng.fill_normal(x.data(), T * H, 1.0);
  const std::int64_t b = T * world.rank() / world.size(), e = T * (world.rank() + 1) / world.size();
  std::vector<float> y_moved(static_cast<std::size_t>((e - b) * H)), y_fresh(y_moved.size());
  moved.forward(x.data() + b * H, e - b, y_moved.data());
  fresh.forward(x.data() + b * H, e - b, y_fresh.data());
  EXPECT_EQ(y_moved, y_fresh);
  ok = ok && y_moved == y_fresh;
  std::vector<float> bad(3);
  std::vector<std::vector<float>*> bad_state{&bad};
  EXPECT_THROW(moved.set_replica_layout(from, bad_state), InvalidArgument);
  EXPECT_TRUE(testing::all_ranks(ok));
}

INSTANTIATE_TEST_SUITE_P(
    Configs, LayerRanks,
    ::testing::Values(
        Case{"v3_sigmoid_noaux_groups_bias", "sigmoid", "noaux_tc", 8, 1, 3, 4, 2, 13, true, 2.5, false},
        Case{"v2lite_softmax_greedy", "softmax", "greedy", 6, 2, 2, 1, 1, 11, false, 1.0, false},
        Case{"softmax_group_limited", "softmax", "group_limited_greedy", 9, 0, 3, 3, 2, 10, true, 1.5, false},
        Case{"top1", "sigmoid", "greedy", 5, 1, 1, 1, 1, 9, true, 1.0, false},
        Case{"topk_equals_experts", "softmax", "greedy", 3, 0, 3, 1, 1, 7, false, 1.0, false},
        Case{"fewer_experts_than_ranks", "sigmoid", "greedy", 3, 1, 2, 1, 1, 8, true, 1.0, false},
        Case{"all_tokens_one_expert", "sigmoid", "greedy", 8, 0, 1, 1, 1, 12, true, 1.0, true},
        Case{"fewer_tokens_than_ranks", "sigmoid", "noaux_tc", 8, 1, 2, 2, 1, 2, true, 2.5, false},
        Case{"no_tokens", "softmax", "greedy", 4, 1, 2, 1, 1, 0, false, 1.0, false}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace moex
