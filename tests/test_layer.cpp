// Multi-rank tests of MoELayer against the float64 reference and the single-rank layer, and of the exchange.
#include <gtest/gtest.h>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "base/error.h"
#include "comm/mpi/mpi_communicator.h"
#include "runtime/io/hf_layer.h"
#include "runtime/kernels/permute.h"
#include "runtime/moe_layer.h"
#include "runtime/parallel.h"
#include "runtime/random.h"
#include "scheduler/expert_placement.h"
#include "scheduler/exchange_plan.h"
#include "tests/mpi_test_env.h"
#include "tests/reference_moe.h"

namespace moex {
namespace {

using moex::testing::all_ranks;
using moex::testing::world;

/// A failure on any rank fails the test on every rank. A collective: call it once at the end of a test
/// on every rank, with no early return before it.
void expect_all_ranks_passed() {
  EXPECT_TRUE(all_ranks(!::testing::Test::HasFailure())) << "the test failed on at least one rank";
}

double max_abs(const double* v, std::size_t n) {
  double m = 0.0;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::abs(v[i]));
  return m;
}

/// Every |got[i] - want[i]| <= tol.
::testing::AssertionResult within(const float* got, const double* want, std::size_t n, double tol, const std::string& what) {
  for (std::size_t i = 0; i < n; ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= tol))
      return ::testing::AssertionFailure() << "rank " << world().rank() << ": " << what << "[" << i << "] = " << got[i]
                                           << ", expected " << want[i] << " (error " << err << " > tolerance " << tol << ")";
  }
  return ::testing::AssertionSuccess();
}

/// One layer configuration and batch, global over all ranks.
struct LayerCase {
  std::string name;
  std::int64_t experts = 8, topk = 2, n_group = 1, topk_group = 1, shared = 0;
  ScoringFunc scoring = ScoringFunc::kSoftmax;
  TopkMethod method = TopkMethod::kGreedy;
  bool norm = false;
  double scale = 1.0;
  bool bias = false;
  std::int64_t tokens = 8;       // global batch of the first step; the second uses tokens / 2 + 1
  std::int64_t forced_expert = -1;  // >= 0: the gate sends every token to this expert
  int threads = 1;                  // parallel_for threads of this rank
};

void PrintTo(const LayerCase& c, std::ostream* os) { *os << c.name; }

constexpr std::int64_t kHidden = 16, kFfn = 8;

MoeConfig config_of(const LayerCase& c) {
  MoeConfig cfg;
  cfg.hidden_size = kHidden;
  cfg.moe_intermediate_size = kFfn;
  cfg.n_routed_experts = c.experts;
  cfg.n_shared_experts = c.shared;
  cfg.num_experts_per_tok = c.topk;
  cfg.n_group = c.n_group;
  cfg.topk_group = c.topk_group;
  cfg.topk_method = c.method;
  cfg.scoring_func = c.scoring;
  cfg.norm_topk_prob = c.norm;
  cfg.routed_scaling_factor = c.scale;
  cfg.validate();
  return cfg;
}

/// The global weights in fp32 (what the layers hold) and the same values in float64 for the reference.
struct GlobalWeights {
  std::vector<float> gate, bias;
  std::vector<std::vector<float>> expert_w13, expert_w2;  // [E] of [2F*H] (gate_proj over up_proj), [H*F]
  std::vector<float> shared_w13, shared_w2;
  ref::LayerWeights ref;

  GlobalWeights(const LayerCase& c, std::uint64_t seed) {
    const std::int64_t H = kHidden, F = kFfn, E = c.experts, Fs = c.shared * kFfn;
    Rng rng(seed);
    gate.resize(static_cast<std::size_t>(E * H));
    rng.fill_normal(gate.data(), E * H, 2.0 / std::sqrt(static_cast<double>(H)));
    if (c.forced_expert >= 0) {
      // Feature 0 (always in [1, 2], see draw_batch) drives only the forced expert's logit (5 to 10):
      // tokens then pick it first, clearly but not so saturated that fp32 loses its gate gradient.
      for (std::int64_t e = 0; e < E; ++e) gate[static_cast<std::size_t>(e * H)] = 0.0f;
      for (std::int64_t h = 0; h < H; ++h) gate[static_cast<std::size_t>(c.forced_expert * H + h)] = h == 0 ? 5.0f : 0.0f;
    }
    if (c.bias) {
      bias.resize(static_cast<std::size_t>(E));
      rng.fill_normal(bias.data(), E, c.scoring == ScoringFunc::kSigmoid ? 0.1 : 0.03);
    }
    auto normal = [&](std::int64_t n, double sd) {
      std::vector<float> v(static_cast<std::size_t>(n));
      rng.fill_normal(v.data(), n, sd);
      return v;
    };
    const double in_sd = 1.0 / std::sqrt(static_cast<double>(H)), out_sd = 1.0 / std::sqrt(static_cast<double>(F));
    ref.hidden = H;
    ref.gate.assign(gate.begin(), gate.end());
    ref.bias.assign(bias.begin(), bias.end());
    for (std::int64_t e = 0; e < E; ++e) {
      expert_w13.push_back(normal(2 * F * H, in_sd));
      expert_w2.push_back(normal(H * F, out_sd));
      ref::Mlp m(H, F);
      const auto& w13 = expert_w13.back();
      m.gate_proj.assign(w13.begin(), w13.begin() + F * H);
      m.up_proj.assign(w13.begin() + F * H, w13.end());
      m.down_proj.assign(expert_w2.back().begin(), expert_w2.back().end());
      ref.experts.push_back(m);
    }
    shared_w13 = normal(2 * Fs * H, in_sd);
    shared_w2 = normal(H * Fs, 1.0 / std::sqrt(static_cast<double>(std::max<std::int64_t>(Fs, 1))));
    ref.shared = ref::Mlp(H, Fs);
    ref.shared.gate_proj.assign(shared_w13.begin(), shared_w13.begin() + Fs * H);
    ref.shared.up_proj.assign(shared_w13.begin() + Fs * H, shared_w13.end());
    ref.shared.down_proj.assign(shared_w2.begin(), shared_w2.end());
  }

  /// Loads the replicated parameters and the experts this layer's rank owns.
  void load_into(MoELayer& layer) const {
    std::copy(gate.begin(), gate.end(), layer.gate_weight());
    std::copy(shared_w13.begin(), shared_w13.end(), layer.shared_w13());
    std::copy(shared_w2.begin(), shared_w2.end(), layer.shared_w2());
    layer.selection_bias() = bias;
    const auto mine = layer.placement().experts_of(layer.rank());
    for (std::size_t s = 0; s < mine.size(); ++s) {
      const auto e = static_cast<std::size_t>(mine[s]);
      std::copy(expert_w13[e].begin(), expert_w13[e].end(), layer.expert_w13(static_cast<std::int64_t>(s)));
      std::copy(expert_w2[e].begin(), expert_w2[e].end(), layer.expert_w2(static_cast<std::int64_t>(s)));
    }
  }
};

/// The global batch: tokens drawn away from routing ties (gap >= 1e-4 in selection score, far beyond
/// fp32 rounding of the scores) so moex and the reference must route identically; and dL/dy.
struct Batch {
  std::int64_t tokens = 0;
  std::vector<float> x, dy;
  ref::Vec xd, dyd;
};

Batch draw_batch(const LayerCase& c, const GlobalWeights& w, std::int64_t tokens, std::uint64_t seed) {
  const std::int64_t H = kHidden;
  const ref::GateSpec spec = ref::GateSpec::of(config_of(c));
  Rng rng(seed);
  Batch b;
  b.tokens = tokens;
  b.x.resize(static_cast<std::size_t>(tokens * H));
  for (std::int64_t t = 0; t < tokens; ++t) {
    float* row = b.x.data() + t * H;
    for (int attempt = 0;; ++attempt) {
      if (attempt > 1000) throw std::runtime_error("cannot draw a token away from routing ties");
      rng.fill_normal(row, H, 1.0);
      if (c.forced_expert >= 0) row[0] = 1.0f + std::min(1.0f, std::abs(row[0]));
      const ref::GateOutput g = ref::gate_forward(spec, ref::Vec(row, row + H), 1, H, w.ref.gate, w.ref.bias);
      if (g.margin[0] < 1e-4) continue;
      if (c.forced_expert >= 0 && g.ids[0] != c.forced_expert) continue;
      break;
    }
  }
  b.dy.resize(static_cast<std::size_t>(tokens * H));
  rng.fill_normal(b.dy.data(), tokens * H, 1.0);
  b.xd.assign(b.x.begin(), b.x.end());
  b.dyd.assign(b.dy.begin(), b.dy.end());
  return b;
}

/// First global token of rank r: shares grow with the rank (uneven), and ranks get none when there
/// are fewer tokens than ranks.
std::int64_t first_token(std::int64_t tokens, int rank, int world_size) {
  const std::int64_t total = static_cast<std::int64_t>(world_size) * (world_size + 1) / 2;
  const std::int64_t before = static_cast<std::int64_t>(rank) * (rank + 1) / 2;
  return tokens * before / total;
}

/// What one rank's layer produced for its tokens, with the gradients it holds after the reduction.
struct LayerResult {
  std::vector<float> y, dx, replicated_grad;
  std::vector<std::int32_t> ids;
  std::vector<std::vector<float>> expert_grad;  // by local slot: [w13 grad | w2 grad]
};

LayerResult run_step(MoELayer& layer, const Batch& b, std::int64_t first, std::int64_t count) {
  const std::int64_t H = kHidden;
  LayerResult r;
  r.y.assign(static_cast<std::size_t>(count * H), -99.0f);
  r.dx.assign(static_cast<std::size_t>(count * H), -99.0f);
  layer.forward(b.x.data() + first * H, count, r.y.data());
  r.ids.assign(layer.topk_ids().begin(), layer.topk_ids().begin() + count * layer.config().num_experts_per_tok);
  layer.backward(b.dy.data() + first * H, r.dx.data());
  layer.allreduce_replicated_grads()->wait();
  r.replicated_grad = layer.replicated().grad;
  for (std::int64_t s = 0; s < layer.num_local_experts(); ++s) {
    const float* g = layer.grad_of(layer.expert_w13(s));
    r.expert_grad.emplace_back(g, g + layer.expert_stride());
  }
  return r;
}

/// The reference gradients in the layer's flat layouts.
struct FlatReference {
  ref::LayerOutput fwd;
  ref::LayerGrads grads;
  ref::Vec replicated;                 // [gate | shared gate_proj, up_proj | shared down_proj]
  std::vector<ref::Vec> expert;        // [E] of [gate_proj, up_proj | down_proj]
};

FlatReference reference_of(const LayerCase& c, const GlobalWeights& w, const Batch& b,
                           const std::vector<std::uint8_t>* keep = nullptr) {
  const ref::GateSpec spec = ref::GateSpec::of(config_of(c));
  FlatReference f;
  f.fwd = ref::layer_forward(spec, w.ref, b.xd, b.tokens, keep);
  f.grads = ref::layer_backward(spec, w.ref, b.xd, b.tokens, b.dyd, keep);
  auto append = [](ref::Vec& to, const ref::Vec& from) { to.insert(to.end(), from.begin(), from.end()); };
  append(f.replicated, f.grads.dgate);
  append(f.replicated, f.grads.shared.gate_proj);
  append(f.replicated, f.grads.shared.up_proj);
  append(f.replicated, f.grads.shared.down_proj);
  for (const ref::Mlp& m : f.grads.experts) {
    ref::Vec v;
    append(v, m.gate_proj);
    append(v, m.up_proj);
    append(v, m.down_proj);
    f.expert.push_back(std::move(v));
  }
  return f;
}

class LayerVsReference : public ::testing::TestWithParam<LayerCase> {};

TEST_P(LayerVsReference, DistributedMatchesFloat64ReferenceAndSingleRank) {
  const LayerCase& c = GetParam();
  auto& comm = world();
  const int W = comm.size(), me = comm.rank();
  const std::int64_t H = kHidden, K = c.topk;
  const MoeConfig cfg = config_of(c);
  const GlobalWeights w(c, 0xC0FFEE + static_cast<std::uint64_t>(c.experts));

  set_parallel_threads(c.threads);
  MoELayer layer(cfg, comm, sched::ExpertPlacement::contiguous(c.experts, W), "moe");
  w.load_into(layer);
  comm::MpiCommunicator self(MPI_COMM_SELF);
  MoELayer solo(cfg, self, sched::ExpertPlacement::contiguous(c.experts, 1), "solo");
  w.load_into(solo);
  EXPECT_EQ(solo.num_local_experts(), c.experts);

  // Two steps: a fresh layer, then a smaller batch after zero_grad() (expert gradients are cleared
  // lazily, including those of experts the second batch does not reach).
  const std::int64_t step_tokens[2] = {c.tokens, c.tokens / 2 + (c.tokens > 0 ? 1 : 0)};
  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE("step " + std::to_string(step) + ", rank " + std::to_string(me) + " of " + std::to_string(W));
    if (step > 0) {
      layer.zero_grad();
      solo.zero_grad();
    }
    const Batch b = draw_batch(c, w, step_tokens[step], 0xBA7C4 + static_cast<std::uint64_t>(step));
    const std::int64_t first = first_token(b.tokens, me, W), count = first_token(b.tokens, me + 1, W) - first;
    const FlatReference want = reference_of(c, w, b);

    const LayerResult got = run_step(layer, b, first, count);
    const LayerResult one = run_step(solo, b, 0, b.tokens);

    // Against the float64 reference: a chain of fp32 GEMMs, the gate's softmax/sigmoid and the
    // normalisation; errors stay ~1e-6 of each tensor's largest entry, so 1e-4 of it is a safe bound
    // that still catches any wrong term (which would be O(1) of the scale).
    constexpr double kRef = 1e-4;
    const auto row0 = static_cast<std::size_t>(first * H), rows = static_cast<std::size_t>(count * H);
    EXPECT_EQ(got.ids, std::vector<std::int32_t>(want.fwd.gate.ids.begin() + first * K,
                                                 want.fwd.gate.ids.begin() + (first + count) * K));
    EXPECT_TRUE(within(got.y.data(), want.fwd.y.data() + row0, rows, kRef * max_abs(want.fwd.y.data(), want.fwd.y.size()), "y"));
    EXPECT_TRUE(within(got.dx.data(), want.grads.dx.data() + row0, rows,
                       kRef * max_abs(want.grads.dx.data(), want.grads.dx.size()), "dx"));
    // No ASSERT before expect_all_ranks_passed(): an early return would leave the other ranks waiting.
    if (got.replicated_grad.size() != want.replicated.size() || one.replicated_grad.size() != want.replicated.size() ||
        got.expert_grad.size() != layer.placement().experts_of(me).size()) {
      ADD_FAILURE() << "rank " << me << ": gradient buffers have unexpected sizes";
      continue;
    }
    const std::size_t gate_n = want.grads.dgate.size();
    EXPECT_TRUE(within(got.replicated_grad.data(), want.replicated.data(), gate_n,
                       kRef * max_abs(want.grads.dgate.data(), gate_n), "gate grad"));
    EXPECT_TRUE(within(got.replicated_grad.data() + gate_n, want.replicated.data() + gate_n, want.replicated.size() - gate_n,
                       kRef * max_abs(want.replicated.data() + gate_n, want.replicated.size() - gate_n), "shared grads"));
    const auto mine = layer.placement().experts_of(me);
    for (std::size_t s = 0; s < mine.size(); ++s) {
      const ref::Vec& e = want.expert[static_cast<std::size_t>(mine[s])];
      EXPECT_TRUE(within(got.expert_grad[s].data(), e.data(), e.size(), kRef * max_abs(e.data(), e.size()),
                         "expert " + std::to_string(mine[s]) + " grad"));
    }

    // Against the same layer on one rank: identical routing and the same fp32 arithmetic per expert,
    // but different GEMM blockings and a different summation order of the replicated gradients
    // (per-rank partial sums, then the all-reduce), hence 1e-5 rather than bitwise.
    constexpr double kSolo = 1e-5;
    auto scale_of = [](const std::vector<float>& v, std::size_t from, std::size_t n) {
      double m = 0.0;
      for (std::size_t i = from; i < from + n; ++i) m = std::max(m, static_cast<double>(std::abs(v[i])));
      return m;
    };
    auto as_double = [](const std::vector<float>& v, std::size_t from, std::size_t n) {
      return ref::Vec(v.begin() + static_cast<std::ptrdiff_t>(from), v.begin() + static_cast<std::ptrdiff_t>(from + n));
    };
    EXPECT_EQ(got.ids, std::vector<std::int32_t>(one.ids.begin() + first * K, one.ids.begin() + (first + count) * K));
    EXPECT_TRUE(within(got.y.data(), as_double(one.y, row0, rows).data(), rows, kSolo * scale_of(one.y, 0, one.y.size()), "y vs 1 rank"));
    EXPECT_TRUE(within(got.dx.data(), as_double(one.dx, row0, rows).data(), rows, kSolo * scale_of(one.dx, 0, one.dx.size()),
                       "dx vs 1 rank"));
    EXPECT_TRUE(within(got.replicated_grad.data(), as_double(one.replicated_grad, 0, gate_n).data(), gate_n,
                       kSolo * scale_of(one.replicated_grad, 0, gate_n), "gate grad vs 1 rank"));
    const std::size_t shared_n = one.replicated_grad.size() - gate_n;
    EXPECT_TRUE(within(got.replicated_grad.data() + gate_n, as_double(one.replicated_grad, gate_n, shared_n).data(), shared_n,
                       kSolo * scale_of(one.replicated_grad, gate_n, shared_n), "shared grads vs 1 rank"));
    for (std::size_t s = 0; s < mine.size(); ++s) {
      const auto& e = one.expert_grad[static_cast<std::size_t>(mine[s])];
      EXPECT_TRUE(within(got.expert_grad[s].data(), as_double(e, 0, e.size()).data(), e.size(), kSolo * scale_of(e, 0, e.size()),
                         "expert " + std::to_string(mine[s]) + " grad vs 1 rank"));
    }

    // Routing statistics and the per-expert blocks follow from the global picks.
    {
      const auto& ids = want.fwd.gate.ids;
      const auto& placement = layer.placement();
      std::vector<std::int64_t> expert_tokens(static_cast<std::size_t>(c.experts), 0);
      std::vector<std::int64_t> picks_of(static_cast<std::size_t>(c.experts), 0);
      std::int64_t rows_sent = 0, rows_received = 0, rows_to_self = 0;
      for (std::int64_t t = 0; t < b.tokens; ++t) {
        const bool local = t >= first && t < first + count;
        std::vector<bool> to_rank(static_cast<std::size_t>(W), false);
        for (std::int64_t j = 0; j < K; ++j) {
          const std::int32_t e = ids[static_cast<std::size_t>(t * K + j)];
          ++picks_of[static_cast<std::size_t>(e)];
          if (local) ++expert_tokens[static_cast<std::size_t>(e)];
          to_rank[static_cast<std::size_t>(placement.owner(e))] = true;
        }
        for (int r = 0; r < W; ++r) rows_sent += local && to_rank[static_cast<std::size_t>(r)] ? 1 : 0;
        rows_received += to_rank[static_cast<std::size_t>(me)] ? 1 : 0;
        rows_to_self += local && to_rank[static_cast<std::size_t>(me)] ? 1 : 0;
      }
      const LayerRouteStats& stats = layer.route_stats();
      EXPECT_EQ(stats.expert_tokens, expert_tokens);
      EXPECT_EQ(stats.rows_sent, rows_sent);
      EXPECT_EQ(stats.rows_received, rows_received);
      EXPECT_EQ(stats.bytes_sent, ((rows_sent - rows_to_self) + (rows_received - rows_to_self)) * H * 4);
      for (std::int64_t s = 0; s < layer.num_local_experts(); ++s)
        EXPECT_EQ(layer.exchange_plan().slot_entries(s), picks_of[static_cast<std::size_t>(mine[static_cast<std::size_t>(s)])])
            << "expert " << mine[static_cast<std::size_t>(s)];
    }
    if (c.forced_expert >= 0) {
      // Only the forced expert's owner receives anything.
      const int owner = layer.placement().owner(c.forced_expert);
      if (me != owner) {
        EXPECT_EQ(layer.route_stats().rows_received, 0);
      }
      for (std::int64_t s = 0; s < layer.num_local_experts(); ++s) {
        if (layer.placement().experts_of(me)[static_cast<std::size_t>(s)] != c.forced_expert) {
          EXPECT_EQ(layer.exchange_plan().slot_entries(s), 0);
        }
      }
    }
    if (b.tokens == 0) {
      for (float g : got.replicated_grad) EXPECT_EQ(g, 0.0f);
      for (const auto& g : got.expert_grad)
        for (float v : g) EXPECT_EQ(v, 0.0f);
    }
  }
  set_parallel_threads(1);
  expect_all_ranks_passed();
}

LayerCase v3_like(std::string name, std::int64_t tokens) {
  LayerCase c;
  c.name = std::move(name);
  c.experts = 8;
  c.topk = 3;
  c.n_group = 4;
  c.topk_group = 2;
  c.shared = 1;
  c.scoring = ScoringFunc::kSigmoid;
  c.method = TopkMethod::kNoauxTc;
  c.norm = true;
  c.scale = 2.5;
  c.bias = true;
  c.tokens = tokens;
  return c;
}

std::vector<LayerCase> layer_cases() {
  std::vector<LayerCase> cases;
  cases.push_back(v3_like("V3LikeSigmoidNoauxTc", 13));
  {
    LayerCase c;
    c.name = "V2LiteLikeSoftmaxGreedy";
    c.experts = 6;
    c.topk = 2;
    c.shared = 2;
    c.tokens = 11;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "SoftmaxGroupLimitedNoShared";
    c.experts = 8;
    c.topk = 2;
    c.n_group = 4;
    c.topk_group = 2;
    c.method = TopkMethod::kGroupLimitedGreedy;
    c.norm = true;
    c.scale = 1.5;
    c.tokens = 10;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "Top1";
    c.experts = 4;
    c.topk = 1;
    c.shared = 1;
    c.tokens = 9;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "TopkEqualsExperts";
    c.experts = 4;
    c.topk = 4;
    c.shared = 1;
    c.scoring = ScoringFunc::kSigmoid;
    c.norm = true;
    c.scale = 2.0;
    c.bias = true;
    c.tokens = 7;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "FiveExperts";
    c.experts = 5;
    c.topk = 2;
    c.scoring = ScoringFunc::kSigmoid;
    c.norm = true;
    c.bias = true;
    c.tokens = 12;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "ThreeExperts";
    c.experts = 3;
    c.topk = 2;
    c.shared = 1;
    c.tokens = 10;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "AllTokensToOneExpert";
    c.experts = 8;
    c.topk = 1;
    c.shared = 1;
    c.tokens = 12;
    c.forced_expert = 7;
    cases.push_back(c);
  }
  {
    LayerCase c = v3_like("V3LikeThreeThreads", 40);
    c.threads = 3;
    cases.push_back(c);
  }
  cases.push_back(v3_like("NoTokens", 0));
  cases.push_back(v3_like("OneToken", 1));
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, LayerVsReference, ::testing::ValuesIn(layer_cases()),
                         [](const ::testing::TestParamInfo<LayerCase>& info) { return info.param.name; });

// ---------------------------------------------------------------------------------------------------
// Capacity-factor mode: which picks survive is the documented policy, and what survives is computed
// exactly like the float64 reference restricted to those picks.

/// The policy, written independently of the layer: per rank (its own tokens [first, first+count))
/// and expert, the ceil(cf * count * K / E) picks with the largest weight stay (ties: earlier token,
/// then earlier top-K position).
std::vector<std::uint8_t> expected_keep(const ref::GateOutput& g, std::int64_t tokens, std::int64_t K, std::int64_t E,
                                        int world_size, double cf, std::int64_t* dropped) {
  std::vector<std::uint8_t> keep(static_cast<std::size_t>(tokens * K), 1);
  *dropped = 0;
  for (int r = 0; r < world_size; ++r) {
    const std::int64_t first = first_token(tokens, r, world_size), count = first_token(tokens, r + 1, world_size) - first;
    const auto cap = static_cast<std::int64_t>(std::ceil(cf * static_cast<double>(count * K) / static_cast<double>(E)));
    for (std::int64_t e = 0; e < E; ++e) {
      std::vector<std::int64_t> picks;
      for (std::int64_t i = first * K; i < (first + count) * K; ++i)
        if (g.ids[static_cast<std::size_t>(i)] == e) picks.push_back(i);
      std::stable_sort(picks.begin(), picks.end(), [&](std::int64_t p, std::int64_t q) {
        return g.weights[static_cast<std::size_t>(p)] > g.weights[static_cast<std::size_t>(q)];
      });
      for (std::size_t n = static_cast<std::size_t>(std::max<std::int64_t>(cap, 0)); n < picks.size(); ++n) {
        keep[static_cast<std::size_t>(picks[n])] = 0;
        ++*dropped;
      }
    }
  }
  return keep;
}

/// Rows rank `me` sends to other ranks in one forward (every dispatch and every combine), written
/// independently of the layer from the global kept picks: flat, a row per (token, owner rank) out
/// and back; hierarchical, stage A a row per (token, destination node) to the origin's peer there
/// (its forwarder) and back, stage B a row per (token, owner rank) from that forwarder and back.
std::int64_t expected_rows_to_others(const std::vector<std::int32_t>& ids, const std::vector<std::uint8_t>& keep,
                                     std::int64_t tokens, std::int64_t K, int W, int me,
                                     const sched::ExpertPlacement& placement, const sched::Topology& topo,
                                     bool hierarchical) {
  std::int64_t n = 0;
  auto count = [&](int from, int to) { n += from == me && to != me ? 1 : 0; };  // a row me sends away
  for (int o = 0; o < W; ++o)
    for (std::int64_t t = first_token(tokens, o, W); t < first_token(tokens, o + 1, W); ++t) {
      std::vector<bool> owner(static_cast<std::size_t>(W), false), node(static_cast<std::size_t>(topo.num_nodes()), false);
      for (std::int64_t j = 0; j < K; ++j)
        if (keep[static_cast<std::size_t>(t * K + j)]) {
          const int d = placement.owner(ids[static_cast<std::size_t>(t * K + j)]);
          owner[static_cast<std::size_t>(d)] = true;
          node[static_cast<std::size_t>(topo.node_of(d))] = true;
        }
      for (int d = 0; d < W; ++d) {
        if (!owner[static_cast<std::size_t>(d)]) continue;
        const int from = hierarchical ? topo.peer_on(topo.node_of(d), o) : o;
        count(from, d);  // out
        count(d, from);  // back
      }
      for (int m = 0; hierarchical && m < topo.num_nodes(); ++m)
        if (node[static_cast<std::size_t>(m)]) {
          count(o, topo.peer_on(m, o));
          count(topo.peer_on(m, o), o);
        }
    }
  return n;
}

TEST(LayerCapacity, DropsByPolicyAndMatchesReferenceOnTheKeptPicks) {
  auto& comm = world();
  const int W = comm.size(), me = comm.rank();
  std::vector<LayerCase> cases{v3_like("V3Like", 40)};
  for (const LayerCase& c : layer_cases())
    if (c.name == layer_cases()[0].name || c.name == "AllTokensToOneExpert") cases.push_back(c);
  ASSERT_EQ(cases.size(), 3u);
  for (const LayerCase& c : cases) {
    const MoeConfig cfg = config_of(c);
    const std::int64_t H = kHidden, K = c.topk;
    const GlobalWeights w(c, 0xCAFE + static_cast<std::uint64_t>(c.experts));
    const Batch b = draw_batch(c, w, c.tokens, 0xCA9);
    const ref::GateOutput g = ref::gate_forward(ref::GateSpec::of(cfg), b.xd, b.tokens, H, w.ref.gate, w.ref.bias);
    const std::int64_t first = first_token(b.tokens, me, W), count = first_token(b.tokens, me + 1, W) - first;
    for (double cf : {0.5, 1.0, 1.5}) {
      std::int64_t dropped = 0;
      const auto keep = expected_keep(g, b.tokens, K, c.experts, W, cf, &dropped);
      const FlatReference want = reference_of(c, w, b, &keep);
      for (const LayerOptions& o : {LayerOptions{1, false, ExchangeKind::kFlat, cf}, LayerOptions{3, true, ExchangeKind::kHierarchical, cf}}) {
        SCOPED_TRACE(c.name + ", capacity factor " + std::to_string(cf) + ", chunks " + std::to_string(o.chunks) + ", " +
                     to_string(o.exchange) + ", rank " + std::to_string(me) + " of " + std::to_string(W));
        MoELayer layer(cfg, comm, sched::ExpertPlacement::contiguous(c.experts, W), "moe",
                       sched::Topology::uniform(W, std::max(1, W / 2)), o);
        w.load_into(layer);
        const LayerResult got = run_step(layer, b, first, count);
        EXPECT_EQ(layer.topk_kept(), std::vector<std::uint8_t>(keep.begin() + first * K, keep.begin() + (first + count) * K));
        std::int64_t total_dropped = layer.route_stats().picks_dropped;
        comm.allreduce_sum(&total_dropped, 1, comm::DataType::kInt64, "dropped")->wait();
        EXPECT_EQ(total_dropped, dropped);
        EXPECT_EQ(layer.route_stats().bytes_sent,
                  expected_rows_to_others(g.ids, keep, b.tokens, K, W, me, layer.placement(), layer.topology(),
                                          o.exchange == ExchangeKind::kHierarchical) * H * 4)
            << "bytes sent to other ranks over every exchange of the forward";
        constexpr double kRef = 1e-4;
        const auto row0 = static_cast<std::size_t>(first * H), rows = static_cast<std::size_t>(count * H);
        EXPECT_TRUE(within(got.y.data(), want.fwd.y.data() + row0, rows, kRef * max_abs(want.fwd.y.data(), want.fwd.y.size()), "y"));
        EXPECT_TRUE(within(got.dx.data(), want.grads.dx.data() + row0, rows,
                           kRef * max_abs(want.grads.dx.data(), want.grads.dx.size()), "dx"));
        EXPECT_TRUE(within(got.replicated_grad.data(), want.replicated.data(), want.replicated.size(),
                           kRef * max_abs(want.replicated.data(), want.replicated.size()), "replicated grads"));
        const auto mine = layer.slot_experts(me);
        for (std::size_t s = 0; s < mine.size(); ++s) {
          const ref::Vec& e = want.expert[static_cast<std::size_t>(mine[s])];
          EXPECT_TRUE(within(got.expert_grad[s].data(), e.data(), e.size(), kRef * std::max(max_abs(e.data(), e.size()), 1e-3),
                             "expert " + std::to_string(mine[s]) + " grad"));
        }
      }
    }
    if (c.forced_expert >= 0) {  // every token wants one expert: capacity 1.0 must drop most of them
      std::int64_t dropped = 0;
      expected_keep(g, b.tokens, K, c.experts, W, 1.0, &dropped);
      EXPECT_GT(dropped, 0);
    }
  }
  comm::MpiCommunicator self(MPI_COMM_SELF);
  MoELayer layer(config_of(cases[0]), self, sched::ExpertPlacement::contiguous(cases[0].experts, 1), "moe");
  EXPECT_THROW(layer.set_options(LayerOptions{1, true, ExchangeKind::kFlat, -0.5}), InvalidArgument);
  expect_all_ranks_passed();
}

TEST(LayerArguments, RejectsMismatchedPlacementAndNegativeTokens) {
  auto& comm = world();
  const MoeConfig cfg = config_of(v3_like("args", 1));
  EXPECT_THROW(MoELayer(cfg, comm, sched::ExpertPlacement::contiguous(cfg.n_routed_experts + 1, comm.size()), "moe"),
               InvalidArgument);
  EXPECT_THROW(MoELayer(cfg, comm, sched::ExpertPlacement::contiguous(cfg.n_routed_experts, comm.size() + 1), "moe"),
               InvalidArgument);
  MoELayer layer(cfg, comm, sched::ExpertPlacement::contiguous(cfg.n_routed_experts, comm.size()), "moe");
  float x = 0.0f, y = 0.0f;
  EXPECT_THROW(layer.forward(&x, -1, &y), InvalidArgument);
  expect_all_ranks_passed();
}

// load_hf_layer (runtime/io/hf_layer.h): a checkpoint written with Hugging Face names loads into a
// layer sharded over the ranks; every rank gets exactly its experts' tensors.
TEST(LayerCheckpoint, LoadsHuggingFaceNamesIntoEveryRanksSlots) {
  auto& comm = world();
  const MoeConfig cfg = config_of(v3_like("hf", 1));
  const std::int64_t H = cfg.hidden_size, F = cfg.moe_intermediate_size, Fs = cfg.shared_intermediate_size();
  const std::int64_t E = cfg.n_routed_experts;
  const std::string prefix = "model.layers.2.mlp.";
  // Tensor value = a code of (tensor, element), so a tensor in the wrong place shows.
  auto tensor = [](int code, std::vector<std::int64_t> shape) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    NamedTensor t{"", shape, std::vector<float>(static_cast<std::size_t>(n))};
    for (std::int64_t i = 0; i < n; ++i) t.data[static_cast<std::size_t>(i)] = static_cast<float>(code * 1000 + i % 997);
    return t;
  };
  std::vector<NamedTensor> ts;
  auto add = [&](const std::string& name, int code, std::vector<std::int64_t> shape) {
    ts.push_back(tensor(code, std::move(shape)));
    ts.back().name = prefix + name;
  };
  add("gate.weight", 1, {E, H});
  add("gate.e_score_correction_bias", 2, {E});
  add("shared_experts.gate_proj.weight", 3, {Fs, H});
  add("shared_experts.up_proj.weight", 4, {Fs, H});
  add("shared_experts.down_proj.weight", 5, {H, Fs});
  for (std::int64_t e = 0; e < E; ++e) {
    const std::string n = "experts." + std::to_string(e) + ".";
    add(n + "gate_proj.weight", static_cast<int>(10 + 3 * e), {F, H});
    add(n + "up_proj.weight", static_cast<int>(11 + 3 * e), {F, H});
    add(n + "down_proj.weight", static_cast<int>(12 + 3 * e), {H, F});
  }
  const std::string path = "/tmp/moex_test_hf_layer_" + std::to_string(comm.size()) + "_" + std::to_string(comm.rank()) +
                           ".safetensors";
  write_safetensors(path, ts);
  const HfCheckpoint file = HfCheckpoint::open(path);
  MoELayer layer(cfg, comm, sched::ExpertPlacement::contiguous(E, comm.size()), "hf");
  load_hf_layer(layer, file, prefix);
  auto same = [](const float* got, const NamedTensor& want) {
    return std::equal(want.data.begin(), want.data.end(), got);
  };
  EXPECT_TRUE(same(layer.gate_weight(), ts[0]));
  ASSERT_EQ(layer.selection_bias().size(), static_cast<std::size_t>(E));
  EXPECT_TRUE(same(layer.selection_bias().data(), ts[1]));
  EXPECT_TRUE(same(layer.shared_w13(), ts[2]));
  EXPECT_TRUE(same(layer.shared_w13() + Fs * H, ts[3]));
  EXPECT_TRUE(same(layer.shared_w2(), ts[4]));
  const auto mine = layer.slot_experts(comm.rank());
  for (std::size_t s = 0; s < mine.size(); ++s) {
    const auto e = static_cast<std::size_t>(mine[s]);
    const auto slot = static_cast<std::int64_t>(s);
    EXPECT_TRUE(same(layer.expert_w13(slot), ts[5 + 3 * e])) << "expert " << e << " gate_proj";
    EXPECT_TRUE(same(layer.expert_w13(slot) + F * H, ts[6 + 3 * e])) << "expert " << e << " up_proj";
    EXPECT_TRUE(same(layer.expert_w2(slot), ts[7 + 3 * e])) << "expert " << e << " down_proj";
  }
  // A missing tensor, and one of the wrong shape, are named.
  auto expect_io = [&](std::vector<NamedTensor> bad, const std::string& what) {
    write_safetensors(path, bad);
    const HfCheckpoint f = HfCheckpoint::open(path);
    MoELayer l(cfg, comm, sched::ExpertPlacement::contiguous(E, comm.size()), "hf");
    try {
      load_hf_layer(l, f, prefix);
      ADD_FAILURE() << "loaded a checkpoint with " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(prefix + "gate.weight"), std::string::npos) << e.what();
    }
  };
  std::vector<NamedTensor> missing(ts.begin() + 1, ts.end());
  expect_io(missing, "no gate.weight");
  std::vector<NamedTensor> wrong(ts);
  wrong[0] = tensor(1, {E, H + 1});
  wrong[0].name = prefix + "gate.weight";
  expect_io(wrong, "a gate.weight of the wrong shape");
  std::remove(path.c_str());
  expect_all_ranks_passed();
}

}  // namespace
}  // namespace moex
