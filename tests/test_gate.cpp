// Single-process tests of the gate kernel, forward and backward, against the float64 reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "runtime/kernels/gate.h"
#include "runtime/random.h"
#include "tests/reference_moe.h"
#include "tests/tolerance.h"

namespace moex {

// Readable parameter values in gtest's messages (found by argument-dependent lookup).
void PrintTo(ScoringFunc f, std::ostream* os) { *os << to_string(f); }
void PrintTo(TopkMethod m, std::ostream* os) { *os << to_string(m); }

namespace {

using testing::close_to;
using testing::max_abs;

ref::Vec to_double(const std::vector<float>& v) { return ref::Vec(v.begin(), v.end()); }

ref::GateSpec spec_of(const kernels::GateParams& p) {
  ref::GateSpec g;
  g.experts = p.experts;
  g.topk = p.topk;
  g.n_group = p.n_group;
  g.topk_group = p.topk_group;
  g.scoring = p.scoring;
  g.method = p.method;
  g.norm_topk_prob = p.norm_topk_prob;
  g.routed_scaling_factor = p.routed_scaling_factor;
  return g;
}

/// A gate problem in fp32 (what the kernel sees) with the float64 reference run on the same values.
struct GateProblem {
  kernels::GateParams p;
  std::vector<float> x, wg, bias;
  ref::GateOutput want;

  /// Random x, wg (and bias); each token is drawn again while its routing is within `min_margin` of a
  /// tie, so fp32 rounding cannot legitimately change the picks or their order.
  GateProblem(const kernels::GateParams& params, bool with_bias, std::uint64_t seed, double min_margin = 1e-4) : p(params) {
    Rng rng(seed);
    const std::int64_t H = p.hidden, E = p.experts;
    wg.resize(static_cast<std::size_t>(E * H));
    rng.fill_normal(wg.data(), E * H, 2.0 / std::sqrt(static_cast<double>(H)));
    if (with_bias) {
      bias.resize(static_cast<std::size_t>(E));
      // Comparable to the gaps between scores, so the bias really reorders picks.
      rng.fill_normal(bias.data(), E, p.scoring == ScoringFunc::kSigmoid ? 0.1 : 0.03);
    }
    const ref::GateSpec g = spec_of(p);
    const ref::Vec wgd = to_double(wg), biasd = to_double(bias);
    x.resize(static_cast<std::size_t>(p.tokens * H));
    for (std::int64_t t = 0; t < p.tokens; ++t) {
      for (int attempt = 0;; ++attempt) {
        if (attempt > 1000) throw std::runtime_error("cannot draw a token away from ties");
        rng.fill_normal(x.data() + t * H, H, 1.0);
        const ref::Vec row(x.begin() + t * H, x.begin() + (t + 1) * H);
        if (ref::gate_forward(g, row, 1, H, wgd, biasd).margin[0] >= min_margin) break;
      }
    }
    want = ref::gate_forward(g, to_double(x), p.tokens, H, wgd, biasd);
  }
};

struct GateRun {
  std::vector<float> scores, weights;
  std::vector<std::int32_t> ids;
};

GateRun run_gate(const kernels::GateParams& p, const std::vector<float>& x, const std::vector<float>& wg,
                 const std::vector<float>& bias) {
  GateRun r;
  r.scores.assign(static_cast<std::size_t>(p.tokens * p.experts), -1.0f);
  r.ids.assign(static_cast<std::size_t>(p.tokens * p.topk), -7);
  r.weights.assign(static_cast<std::size_t>(p.tokens * p.topk), -1.0f);
  kernels::gate_forward(p, x.data(), wg.data(), bias.empty() ? nullptr : bias.data(), r.scores.data(), r.ids.data(),
                        r.weights.data());
  return r;
}

kernels::GateParams params(std::int64_t tokens, std::int64_t hidden, std::int64_t experts, std::int64_t topk,
                           std::int64_t n_group, std::int64_t topk_group, ScoringFunc scoring, TopkMethod method,
                           bool norm, float scale) {
  kernels::GateParams p;
  p.tokens = tokens;
  p.hidden = hidden;
  p.experts = experts;
  p.topk = topk;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.scoring = scoring;
  p.method = method;
  p.norm_topk_prob = norm;
  p.routed_scaling_factor = scale;
  return p;
}

// ---------------------------------------------------------------------------------------------------
// Forward: every topk_method x scoring x bias x norm x grouping against the reference.

using ForwardParam = std::tuple<TopkMethod, ScoringFunc, bool /*bias*/, bool /*norm*/, int /*n_group*/>;

class GateForwardMatrix : public ::testing::TestWithParam<ForwardParam> {};

TEST_P(GateForwardMatrix, MatchesReference) {
  const auto [method, scoring, with_bias, norm, n_group] = GetParam();
  // 16 experts; with 4 groups keep 2 (8 eligible experts for K = 4).
  const auto p = params(64, 24, 16, 4, n_group, n_group > 1 ? 2 : 1, scoring, method, norm, 2.5f);
  const auto seed = 1000 + 97 * static_cast<std::uint64_t>(method) + 31 * static_cast<std::uint64_t>(scoring) +
                    7 * static_cast<std::uint64_t>(with_bias) + 3 * static_cast<std::uint64_t>(norm) +
                    static_cast<std::uint64_t>(n_group);
  const GateProblem prob(p, with_bias, seed);
  const GateRun got = run_gate(p, prob.x, prob.wg, prob.bias);
  EXPECT_EQ(got.ids, prob.want.ids);
  // fp32 logits of length-24 dot products carry ~1e-6 relative error into the scores; 1e-5 leaves room.
  for (std::size_t i = 0; i < got.weights.size(); ++i)
    EXPECT_NEAR(got.weights[i], prob.want.weights[i], 1e-5 * std::abs(prob.want.weights[i])) << "weight " << i;
  for (std::size_t i = 0; i < got.scores.size(); ++i)
    EXPECT_NEAR(got.scores[i], prob.want.scores[i], 1e-5 * std::abs(prob.want.scores[i])) << "score " << i;
  if (method != TopkMethod::kGreedy && n_group > 1) {
    // Sanity of the setup: every pick lies in one of topk_group groups.
    const std::int64_t per_group = p.experts / p.n_group;
    for (std::int64_t t = 0; t < p.tokens; ++t) {
      std::vector<bool> used(static_cast<std::size_t>(p.n_group), false);
      for (std::int64_t j = 0; j < p.topk; ++j)
        used[static_cast<std::size_t>(got.ids[static_cast<std::size_t>(t * p.topk + j)] / per_group)] = true;
      EXPECT_LE(std::count(used.begin(), used.end(), true), p.topk_group) << "token " << t;
    }
  }
}

std::string forward_name(const ::testing::TestParamInfo<ForwardParam>& info) {
  const auto [method, scoring, with_bias, norm, n_group] = info.param;
  return std::string(to_string(method)) + "_" + to_string(scoring) + (with_bias ? "_bias" : "_nobias") +
         (norm ? "_norm" : "_nonorm") + "_groups" + std::to_string(n_group);
}

INSTANTIATE_TEST_SUITE_P(AllRules, GateForwardMatrix,
                         ::testing::Combine(::testing::Values(TopkMethod::kGreedy, TopkMethod::kGroupLimitedGreedy,
                                                              TopkMethod::kNoauxTc),
                                            ::testing::Values(ScoringFunc::kSoftmax, ScoringFunc::kSigmoid),
                                            ::testing::Bool(), ::testing::Bool(), ::testing::Values(1, 4)),
                         forward_name);

TEST(GateForward, OtherShapes) {
  struct Shape {
    std::int64_t tokens, hidden, experts, topk, n_group, topk_group;
    TopkMethod method;
    ScoringFunc scoring;
  };
  const Shape shapes[] = {
      {5, 7, 1, 1, 1, 1, TopkMethod::kGreedy, ScoringFunc::kSoftmax},        // a single expert
      {9, 3, 6, 6, 1, 1, TopkMethod::kGreedy, ScoringFunc::kSigmoid},        // K == E
      {9, 3, 6, 6, 3, 3, TopkMethod::kNoauxTc, ScoringFunc::kSigmoid},       // K == E, all groups kept
      {17, 8, 12, 1, 6, 1, TopkMethod::kNoauxTc, ScoringFunc::kSigmoid},     // top-1 out of one group
      {17, 8, 12, 3, 12, 3, TopkMethod::kGroupLimitedGreedy, ScoringFunc::kSoftmax},  // 1 expert per group
      {11, 5, 64, 8, 8, 4, TopkMethod::kNoauxTc, ScoringFunc::kSigmoid},     // V3 routing, scaled down
  };
  int index = 0;
  for (const Shape& s : shapes) {
    for (const bool norm : {false, true}) {
      SCOPED_TRACE("shape " + std::to_string(index) + (norm ? " norm" : ""));
      const auto p = params(s.tokens, s.hidden, s.experts, s.topk, s.n_group, s.topk_group, s.scoring, s.method, norm, 1.5f);
      const GateProblem prob(p, s.scoring == ScoringFunc::kSigmoid, 77 + static_cast<std::uint64_t>(index));
      const GateRun got = run_gate(p, prob.x, prob.wg, prob.bias);
      EXPECT_EQ(got.ids, prob.want.ids);
      for (std::size_t i = 0; i < got.weights.size(); ++i)
        EXPECT_NEAR(got.weights[i], prob.want.weights[i], 1e-5 * std::abs(prob.want.weights[i])) << "weight " << i;
    }
    ++index;
  }
}

// The picked weights follow the Hugging Face code of each model_type (hand-worked values; the
// float64 layer reference checks the same rule end to end in layer_reference).
TEST(GateForward, WeightRuleFollowsEachModelType) {
  struct Case {
    const char* model_type;
    std::int64_t topk;
    bool norm;
    bool want_norm;
    float want_scale;
  };
  const Case cases[] = {
      {"deepseek_v3", 4, true, true, 2.5f},   {"deepseek_v3", 1, true, false, 2.5f},
      {"deepseek_v3", 4, false, false, 2.5f}, {"deepseek_v2", 4, true, true, 1.0f},
      {"deepseek_v2", 4, false, false, 2.5f}, {"deepseek_v2", 1, true, false, 2.5f},
      {"deepseek", 6, true, true, 1.0f},      {"deepseek", 6, false, false, 2.5f},
  };
  for (const Case& c : cases) {
    MoeConfig cfg = MoeConfig::defaults_for(c.model_type);
    cfg.hidden_size = 2;
    cfg.moe_intermediate_size = 2;
    cfg.n_routed_experts = 8;
    cfg.num_experts_per_tok = c.topk;
    cfg.n_group = 1;
    cfg.topk_group = 1;
    cfg.topk_method = TopkMethod::kGreedy;
    cfg.scoring_func = ScoringFunc::kSigmoid;
    cfg.norm_topk_prob = c.norm;
    cfg.routed_scaling_factor = 2.5;
    const auto p = kernels::GateParams::from_config(cfg, 1);
    SCOPED_TRACE(std::string(c.model_type) + " top-" + std::to_string(c.topk) + (c.norm ? " norm" : ""));
    EXPECT_EQ(p.norm_topk_prob, c.want_norm);
    EXPECT_EQ(p.routed_scaling_factor, c.want_scale);
    // One token: expert e has logit e / 4 along x = (1, 0); the weights of the kernel's picks.
    std::vector<float> x{1.0f, 0.0f}, wg(16, 0.0f), scores(8);
    for (int e = 0; e < 8; ++e) wg[static_cast<std::size_t>(2 * e)] = static_cast<float>(e) / 4.0f;
    std::vector<std::int32_t> ids(static_cast<std::size_t>(c.topk));
    std::vector<float> w(static_cast<std::size_t>(c.topk));
    kernels::gate_forward(p, x.data(), wg.data(), nullptr, scores.data(), ids.data(), w.data());
    double sum = 0.0;
    for (std::int64_t j = 0; j < c.topk; ++j) sum += 1.0 / (1.0 + std::exp(-(7.0 - static_cast<double>(j)) / 4.0));
    for (std::int64_t j = 0; j < c.topk; ++j) {
      EXPECT_EQ(ids[static_cast<std::size_t>(j)], 7 - j);
      const double s = 1.0 / (1.0 + std::exp(-(7.0 - static_cast<double>(j)) / 4.0));
      const double want = c.want_norm ? s / (sum + 1e-20) * c.want_scale : s * c.want_scale;
      EXPECT_NEAR(w[static_cast<std::size_t>(j)], want, 1e-6) << "pick " << j;
    }
  }
}

TEST(GateForward, ZeroTokensWriteNothing) {
  const auto p = params(0, 4, 8, 2, 1, 1, ScoringFunc::kSigmoid, TopkMethod::kGreedy, true, 1.0f);
  const std::vector<float> wg(32, 0.5f);
  float sentinel = 3.0f;
  std::int32_t id = 9;
  kernels::gate_forward(p, nullptr, wg.data(), nullptr, &sentinel, &id, &sentinel);
  EXPECT_EQ(sentinel, 3.0f);
  EXPECT_EQ(id, 9);
}

// ---------------------------------------------------------------------------------------------------
// Hand-built cases. hidden = 1 and x = [1] make every logit exactly the gate weight of its expert.

std::vector<float> logits_for_sigmoid(const std::vector<double>& probs) {
  std::vector<float> out;
  for (double q : probs) out.push_back(static_cast<float>(std::log(q / (1.0 - q))));
  return out;
}

TEST(GateForward, BiasChangesSelectionButNotWeights) {
  const std::vector<float> x = {1.0f};
  const std::vector<float> wg = {0.5f, 1.0f, -0.3f, 2.0f, 0.1f, -1.0f, 0.7f, 1.5f};
  auto p = params(1, 1, 8, 2, 1, 1, ScoringFunc::kSigmoid, TopkMethod::kGreedy, false, 1.0f);

  const GateRun plain = run_gate(p, x, wg, {});
  EXPECT_EQ(plain.ids, (std::vector<std::int32_t>{3, 7}));

  // A large bias on expert 5 (the lowest score) forces it in first; its weight is its unbiased score.
  std::vector<float> bias(8, 0.0f);
  bias[5] = 10.0f;
  const GateRun forced = run_gate(p, x, wg, bias);
  EXPECT_EQ(forced.ids, (std::vector<std::int32_t>{5, 3}));
  EXPECT_FLOAT_EQ(forced.weights[0], static_cast<float>(ref::sigmoid(-1.0)));
  EXPECT_EQ(forced.weights[1], plain.weights[0]) << "expert 3's weight must not depend on the bias";
  for (std::size_t e = 0; e < 8; ++e) EXPECT_EQ(forced.scores[e], plain.scores[e]) << "scores are unbiased";

  // A large negative bias drops the best expert.
  std::vector<float> drop(8, 0.0f);
  drop[3] = -10.0f;
  EXPECT_EQ(run_gate(p, x, wg, drop).ids, (std::vector<std::int32_t>{7, 1}));

  // With normalisation and scaling the weights are the unbiased scores of the picks, renormalised.
  p.norm_topk_prob = true;
  p.routed_scaling_factor = 2.5f;
  const GateRun normed = run_gate(p, x, wg, bias);
  const double s5 = ref::sigmoid(-1.0), s3 = ref::sigmoid(2.0);
  EXPECT_NEAR(normed.weights[0], 2.5 * s5 / (s5 + s3), 1e-6);
  EXPECT_NEAR(normed.weights[1], 2.5 * s3 / (s5 + s3), 1e-6);
}

TEST(GateForward, NoauxTcScoresGroupsByTopTwoSumGroupLimitedByMax) {
  // Group 0 has the best single expert (0.9) but group 1 the best pair (0.8 + 0.7 = 1.5 > 1.0).
  const std::vector<double> probs = {0.9, 0.1, 0.8, 0.7, 0.3, 0.2, 0.4, 0.05};
  const std::vector<float> x = {1.0f}, wg = logits_for_sigmoid(probs);
  for (const bool norm : {false, true}) {
    auto limited = params(1, 1, 8, 2, 4, 1, ScoringFunc::kSigmoid, TopkMethod::kGroupLimitedGreedy, norm, 1.0f);
    auto noaux = limited;
    noaux.method = TopkMethod::kNoauxTc;
    auto greedy = limited;
    greedy.method = TopkMethod::kGreedy;
    EXPECT_EQ(run_gate(limited, x, wg, {}).ids, (std::vector<std::int32_t>{0, 1}));
    EXPECT_EQ(run_gate(noaux, x, wg, {}).ids, (std::vector<std::int32_t>{2, 3}));
    EXPECT_EQ(run_gate(greedy, x, wg, {}).ids, (std::vector<std::int32_t>{0, 2}));
    // The reference agrees on the same construction.
    const ref::Vec xd = {1.0}, wgd(wg.begin(), wg.end());
    EXPECT_EQ(ref::gate_forward(spec_of(limited), xd, 1, 1, wgd, {}).ids, (std::vector<std::int32_t>{0, 1}));
    EXPECT_EQ(ref::gate_forward(spec_of(noaux), xd, 1, 1, wgd, {}).ids, (std::vector<std::int32_t>{2, 3}));
  }
  // The bias enters the group score: lift group 3's pair above group 1's.
  std::vector<float> bias(8, 0.0f);
  bias[6] = 0.6f;
  bias[7] = 0.6f;
  auto noaux = params(1, 1, 8, 2, 4, 1, ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, true, 1.0f);
  const GateRun lifted = run_gate(noaux, x, wg, bias);
  EXPECT_EQ(lifted.ids, (std::vector<std::int32_t>{6, 7}));
  EXPECT_NEAR(lifted.weights[0], 0.4 / 0.45, 1e-6);
}

TEST(GateForward, TiesGoToTheLowerExpert) {
  const std::vector<float> x = {1.0f};
  for (const ScoringFunc scoring : {ScoringFunc::kSoftmax, ScoringFunc::kSigmoid}) {
    SCOPED_TRACE(to_string(scoring));
    const std::vector<float> wg = {1.0f, 2.0f, 2.0f, 0.0f, 2.0f};
    EXPECT_EQ(run_gate(params(1, 1, 5, 1, 1, 1, scoring, TopkMethod::kGreedy, false, 1.0f), x, wg, {}).ids,
              (std::vector<std::int32_t>{1}));
    EXPECT_EQ(run_gate(params(1, 1, 5, 2, 1, 1, scoring, TopkMethod::kGreedy, false, 1.0f), x, wg, {}).ids,
              (std::vector<std::int32_t>{1, 2}));
    EXPECT_EQ(run_gate(params(1, 1, 5, 4, 1, 1, scoring, TopkMethod::kGreedy, false, 1.0f), x, wg, {}).ids,
              (std::vector<std::int32_t>{1, 2, 4, 0}));
    // An all-equal row picks 0, 1, ..., K-1.
    EXPECT_EQ(run_gate(params(1, 1, 5, 3, 1, 1, scoring, TopkMethod::kGreedy, true, 1.0f), x, std::vector<float>(5, 0.25f), {}).ids,
              (std::vector<std::int32_t>{0, 1, 2}));
  }
}

TEST(GateForward, TiedGroupsGoToTheLowerGroup) {
  // Groups {0,1} and {2,3} tie on max (1.0) and on top-2 sum (1.5 vs 1.0 + 0.5); only one is kept.
  const std::vector<float> x = {1.0f};
  for (const ScoringFunc scoring : {ScoringFunc::kSoftmax, ScoringFunc::kSigmoid}) {
    SCOPED_TRACE(to_string(scoring));
    const std::vector<float> max_tie = {0.5f, 1.0f, 1.0f, 0.9f};
    EXPECT_EQ(run_gate(params(1, 1, 4, 2, 2, 1, scoring, TopkMethod::kGroupLimitedGreedy, false, 1.0f), x, max_tie, {}).ids,
              (std::vector<std::int32_t>{1, 0}))
        << "greedy would take {1, 2}; group 1 must lose the tie";
    const std::vector<float> sum_tie = {0.5f, 1.0f, 1.0f, 0.5f};
    EXPECT_EQ(run_gate(params(1, 1, 4, 2, 2, 1, scoring, TopkMethod::kNoauxTc, false, 1.0f), x, sum_tie, {}).ids,
              (std::vector<std::int32_t>{1, 0}));
    const std::vector<float> sum_tie_reversed = {1.0f, 0.5f, 0.5f, 1.0f};
    EXPECT_EQ(run_gate(params(1, 1, 4, 1, 2, 1, scoring, TopkMethod::kNoauxTc, false, 1.0f), x, sum_tie_reversed, {}).ids,
              (std::vector<std::int32_t>{0}));
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward

using BackwardParam = std::tuple<ScoringFunc, TopkMethod, bool /*norm*/, bool /*bias*/>;

class GateBackwardMatrix : public ::testing::TestWithParam<BackwardParam> {};

TEST_P(GateBackwardMatrix, MatchesReferenceAndFiniteDifferences) {
  const auto [scoring, method, norm, with_bias] = GetParam();
  const std::int64_t T = 6, H = 7, E = 8, K = 3;
  const bool grouped = method != TopkMethod::kGreedy;
  const auto p = params(T, H, E, K, grouped ? 4 : 1, grouped ? 2 : 1, scoring, method, norm, 1.7f);
  // Margin 1e-3 keeps the finite-difference steps (1e-6) from flipping any pick.
  const GateProblem prob(p, with_bias, 4242, 1e-3);
  const ref::GateSpec g = spec_of(p);
  Rng rng(99);
  std::vector<float> dweights(static_cast<std::size_t>(T * K));
  rng.fill_normal(dweights.data(), T * K, 1.0);
  ref::Vec xd = to_double(prob.x), wgd = to_double(prob.wg);
  const ref::Vec biasd = to_double(prob.bias), dwd = to_double(dweights);
  const ref::GateGrads want = ref::gate_backward(g, xd, T, H, wgd, prob.want, dwd);

  // 1) The reference's analytic gradient against its own finite differences (float64, step 1e-6:
  //    truncation ~1e-12 and rounding ~1e-10 against O(0.1) gradients, so 1e-6 relative holds).
  auto loss = [&] {
    const ref::GateOutput o = ref::gate_forward(g, xd, T, H, wgd, biasd);
    EXPECT_EQ(o.ids, prob.want.ids) << "a finite-difference step changed the routing";
    double l = 0.0;
    for (std::size_t i = 0; i < dwd.size(); ++i) l += dwd[i] * o.weights[i];
    return l;
  };
  ref::Vec fd_x(xd.size()), fd_wg(wgd.size());
  for (std::size_t i = 0; i < xd.size(); ++i) fd_x[i] = ref::central_difference(loss, xd[i], 1e-6);
  for (std::size_t i = 0; i < wgd.size(); ++i) fd_wg[i] = ref::central_difference(loss, wgd[i], 1e-6);
  EXPECT_TRUE(close_to(want.dx, fd_x, 1e-6, "reference dx vs finite differences"));
  EXPECT_TRUE(close_to(want.dwg, fd_wg, 1e-6, "reference dwg vs finite differences"));

  // 2) The fp32 kernel against the reference: fp32 rounding of scores (~1e-7 relative) is amplified by
  //    the softmax Jacobian's cancellation, so 1e-4 of each tensor's scale.
  const GateRun fwd = run_gate(p, prob.x, prob.wg, prob.bias);
  ASSERT_EQ(fwd.ids, prob.want.ids);
  std::vector<float> dx(static_cast<std::size_t>(T * H), 0.0f), dwg(static_cast<std::size_t>(E * H), 0.0f),
      scratch(static_cast<std::size_t>(T * E));
  kernels::gate_backward(p, prob.x.data(), prob.wg.data(), fwd.scores.data(), fwd.ids.data(), dweights.data(), dx.data(),
                         dwg.data(), scratch.data());
  EXPECT_TRUE(close_to(dx, want.dx, 1e-4, "dx"));
  EXPECT_TRUE(close_to(dwg, want.dwg, 1e-4, "dwg"));

  // 3) It accumulates: a second call onto the first result doubles it (up to one rounding).
  std::vector<float> dx2 = dx, dwg2 = dwg;
  kernels::gate_backward(p, prob.x.data(), prob.wg.data(), fwd.scores.data(), fwd.ids.data(), dweights.data(), dx2.data(),
                         dwg2.data(), scratch.data());
  const double dx_scale = max_abs(to_double(dx)), dwg_scale = max_abs(to_double(dwg));
  for (std::size_t i = 0; i < dx.size(); ++i) EXPECT_NEAR(dx2[i], 2.0f * dx[i], 1e-6 * dx_scale);
  for (std::size_t i = 0; i < dwg.size(); ++i) EXPECT_NEAR(dwg2[i], 2.0f * dwg[i], 1e-6 * dwg_scale);
}

std::string backward_name(const ::testing::TestParamInfo<BackwardParam>& info) {
  const auto [scoring, method, norm, with_bias] = info.param;
  return std::string(to_string(scoring)) + "_" + to_string(method) + (norm ? "_norm" : "_nonorm") +
         (with_bias ? "_bias" : "_nobias");
}

INSTANTIATE_TEST_SUITE_P(AllRules, GateBackwardMatrix,
                         ::testing::Combine(::testing::Values(ScoringFunc::kSoftmax, ScoringFunc::kSigmoid),
                                            ::testing::Values(TopkMethod::kGreedy, TopkMethod::kGroupLimitedGreedy,
                                                              TopkMethod::kNoauxTc),
                                            ::testing::Bool(), ::testing::Bool()),
                         backward_name);

/// Runs forward and backward on a few tokens; returns the kernel's dwg and the expert ids picked.
std::pair<std::vector<float>, std::vector<std::int32_t>> gate_grad_rows(ScoringFunc scoring, bool norm) {
  const std::int64_t T = 2, H = 5, E = 8, K = 2;
  const auto p = params(T, H, E, K, 1, 1, scoring, TopkMethod::kGreedy, norm, 1.0f);
  const GateProblem prob(p, false, 31337);
  const GateRun fwd = run_gate(p, prob.x, prob.wg, prob.bias);
  const std::vector<float> dweights = {0.7f, -1.3f, 0.4f, 2.1f};
  std::vector<float> dx(static_cast<std::size_t>(T * H), 0.0f), dwg(static_cast<std::size_t>(E * H), 0.0f),
      scratch(static_cast<std::size_t>(T * E));
  kernels::gate_backward(p, prob.x.data(), prob.wg.data(), fwd.scores.data(), fwd.ids.data(), dweights.data(), dx.data(),
                         dwg.data(), scratch.data());
  return {dwg, fwd.ids};
}

TEST(GateBackward, SoftmaxGivesEveryExpertRowAGradient) {
  for (const bool norm : {false, true}) {
    const auto [dwg, ids] = gate_grad_rows(ScoringFunc::kSoftmax, norm);
    for (std::int64_t e = 0; e < 8; ++e) {
      float row = 0.0f;
      for (std::int64_t h = 0; h < 5; ++h) row = std::max(row, std::abs(dwg[static_cast<std::size_t>(e * 5 + h)]));
      EXPECT_GT(row, 0.0f) << "expert " << e << " norm=" << norm;
    }
  }
}

TEST(GateBackward, SigmoidLeavesUnpickedExpertsExactlyZero) {
  for (const bool norm : {false, true}) {
    const auto [dwg, ids] = gate_grad_rows(ScoringFunc::kSigmoid, norm);
    int unpicked = 0;
    for (std::int32_t e = 0; e < 8; ++e) {
      const bool picked = std::find(ids.begin(), ids.end(), e) != ids.end();
      float row = 0.0f;
      for (std::int64_t h = 0; h < 5; ++h) row = std::max(row, std::abs(dwg[static_cast<std::size_t>(e * 5 + h)]));
      if (picked) {
        EXPECT_GT(row, 0.0f) << "picked expert " << e;
      } else {
        ++unpicked;
        EXPECT_EQ(row, 0.0f) << "unpicked expert " << e << " norm=" << norm;
      }
    }
    EXPECT_GE(unpicked, 4);  // 2 tokens x top-2 out of 8
  }
}

TEST(GateBackward, ZeroTokensLeaveGradientsAlone) {
  const auto p = params(0, 3, 4, 2, 1, 1, ScoringFunc::kSoftmax, TopkMethod::kGreedy, true, 1.0f);
  const std::vector<float> wg(12, 0.5f);
  std::vector<float> dwg(12, 1.5f);
  kernels::gate_backward(p, nullptr, wg.data(), nullptr, nullptr, nullptr, nullptr, dwg.data(), nullptr);
  for (float v : dwg) EXPECT_EQ(v, 1.5f);
}

}  // namespace
}  // namespace moex
