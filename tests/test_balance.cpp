// Single-process tests of the auxiliary load-balance losses (forward, backward) and of their
// gradient's path through gate_backward's d_scores_extra, against a plain float64 reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "base/error.h"
#include "runtime/kernels/balance.h"
#include "runtime/kernels/gate.h"
#include "runtime/random.h"
#include "tests/reference_moe.h"
#include "tests/tolerance.h"

namespace moex {

void PrintTo(ScoringFunc f, std::ostream* os) { *os << to_string(f); }

namespace {

using Vec = std::vector<double>;
using Ids = std::vector<std::int32_t>;
using kernels::BalanceLossParams;

// ---------------------------------------------------------------------------------------------------
// float64 reference, written straight from the definitions in balance.h.

struct RefLoss {
  double seq = 0.0, expert = 0.0;
  double total() const { return seq + expert; }
};

bool picked(const Ids& ids, std::int64_t K, std::int64_t t, std::int64_t e) {
  const auto row = ids.begin() + t * K;
  return std::find(row, row + K, static_cast<std::int32_t>(e)) != row + K;
}

RefLoss ref_balance(const BalanceLossParams& p, const Vec& s, const Ids& ids) {
  RefLoss r;
  const std::int64_t T = p.tokens, E = p.experts, K = p.topk;
  if (T == 0) return r;
  // Expert-level (DeepSeekMoE eq. 12-14).
  for (std::int64_t i = 0; i < E; ++i) {
    double count = 0.0, P = 0.0;
    for (std::int64_t t = 0; t < T; ++t) {
      count += picked(ids, K, t, i) ? 1.0 : 0.0;
      P += s[static_cast<std::size_t>(t * E + i)] / static_cast<double>(T);
    }
    const double f = static_cast<double>(E) / static_cast<double>(K * T) * count;
    r.expert += f * P;
  }
  r.expert *= p.expert_alpha;
  // Sequence-wise (DeepSeek-V3 eq. 17-20), mean over sequences.
  const std::int64_t L = p.seq_len == 0 ? T : p.seq_len;
  double sum = 0.0;
  int n_seq = 0;
  for (std::int64_t b = 0; b < T; b += L) {
    const std::int64_t end = std::min(T, b + L), Ts = end - b;
    double l = 0.0;
    for (std::int64_t i = 0; i < E; ++i) {
      double count = 0.0, P = 0.0;
      for (std::int64_t t = b; t < end; ++t) {
        double z = 0.0;
        for (std::int64_t j = 0; j < E; ++j) z += s[static_cast<std::size_t>(t * E + j)];
        count += picked(ids, K, t, i) ? 1.0 : 0.0;
        P += s[static_cast<std::size_t>(t * E + i)] / z / static_cast<double>(Ts);
      }
      l += static_cast<double>(E) / static_cast<double>(K * Ts) * count * P;
    }
    sum += p.seq_alpha * l;
    ++n_seq;
  }
  r.seq = sum / n_seq;
  return r;
}

using testing::close_to;
using testing::max_abs;

BalanceLossParams bparams(std::int64_t T, std::int64_t E, std::int64_t K, std::int64_t seq_len, float seq_alpha,
                          float expert_alpha) {
  BalanceLossParams p;
  p.tokens = T;
  p.experts = E;
  p.topk = K;
  p.seq_len = seq_len;
  p.seq_alpha = seq_alpha;
  p.expert_alpha = expert_alpha;
  return p;
}

kernels::GateParams gparams(std::int64_t T, std::int64_t H, std::int64_t E, std::int64_t K, ScoringFunc scoring,
                            bool norm, float scale) {
  kernels::GateParams g;
  g.tokens = T;
  g.hidden = H;
  g.experts = E;
  g.topk = K;
  g.scoring = scoring;
  g.method = TopkMethod::kGreedy;
  g.norm_topk_prob = norm;
  g.routed_scaling_factor = scale;
  return g;
}

/// Router outputs as gate_forward writes them, from random x and wg.
struct Routed {
  std::vector<float> x, wg, scores, weights;
  Ids ids;
};

Routed route(const kernels::GateParams& g, std::uint64_t seed) {
  Rng rng(seed);
  Routed r;
  r.x.resize(static_cast<std::size_t>(g.tokens * g.hidden));
  r.wg.resize(static_cast<std::size_t>(g.experts * g.hidden));
  rng.fill_normal(r.x.data(), g.tokens * g.hidden, 1.0);
  rng.fill_normal(r.wg.data(), g.experts * g.hidden, 2.0 / std::sqrt(static_cast<double>(g.hidden)));
  r.scores.assign(static_cast<std::size_t>(g.tokens * g.experts), 0.0f);
  r.ids.assign(static_cast<std::size_t>(g.tokens * g.topk), 0);
  r.weights.assign(static_cast<std::size_t>(g.tokens * g.topk), 0.0f);
  kernels::gate_forward(g, r.x.data(), r.wg.data(), nullptr, r.scores.data(), r.ids.data(), r.weights.data());
  return r;
}

Vec to_double(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }

// ---------------------------------------------------------------------------------------------------
// Values

TEST(BalanceLoss, HandComputedValues) {
  // T = 2, E = 2, K = 1; raw rows (0.6, 0.2) and (0.3, 0.3) normalise to (0.75, 0.25) and (0.5, 0.5);
  // token 0 picks expert 0, token 1 expert 1.
  //   expert-level: f = (1, 1), P = (0.45, 0.25)                            -> 0.7 * expert_alpha
  //   one sequence: f = (1, 1), P = (0.625, 0.375)                          -> 1.0 * seq_alpha
  //   seq_len = 1:  (f = (2, 0), P0 = 0.75) -> 1.5, (f = (0, 2), P1 = 0.5) -> 1.0; mean 1.25 * seq_alpha
  const std::vector<float> scores = {0.6f, 0.2f, 0.3f, 0.3f};
  const Ids ids = {0, 1};
  for (const std::int64_t seq_len : {0, 2, 5}) {
    const auto v = kernels::balance_loss_forward(bparams(2, 2, 1, seq_len, 0.1f, 0.01f), scores.data(), ids.data());
    EXPECT_NEAR(v.expert, 0.7 * 0.01, 1e-8) << "seq_len " << seq_len;
    EXPECT_NEAR(v.seq, 1.0 * 0.1, 1e-8) << "seq_len " << seq_len;
    EXPECT_NEAR(v.total(), 0.007 + 0.1, 1e-8);
  }
  const auto v1 = kernels::balance_loss_forward(bparams(2, 2, 1, 1, 0.1f, 0.01f), scores.data(), ids.data());
  EXPECT_NEAR(v1.seq, 1.25 * 0.1, 1e-8);
  EXPECT_NEAR(v1.expert, 0.7 * 0.01, 1e-8);
}

TEST(BalanceLoss, AllExpertsPickedGivesSeqAlpha) {
  // K = E: every f_i = 1 and sum_i P_i = 1 in every sequence, so L_seq = seq_alpha exactly, while
  // L_exp = expert_alpha * mean_t sum_i s_{i,t}.
  for (const ScoringFunc scoring : {ScoringFunc::kSoftmax, ScoringFunc::kSigmoid}) {
    const auto g = gparams(11, 4, 6, 6, scoring, false, 1.0f);
    const Routed r = route(g, 5);
    double mean_row_sum = 0.0;
    for (float s : r.scores) mean_row_sum += s / 11.0;
    for (const std::int64_t seq_len : {0, 3, 4, 11}) {
      const auto v = kernels::balance_loss_forward(bparams(11, 6, 6, seq_len, 0.25f, 0.5f), r.scores.data(), r.ids.data());
      EXPECT_NEAR(v.seq, 0.25, 1e-12) << to_string(scoring) << " seq_len " << seq_len;
      EXPECT_NEAR(v.expert, 0.5 * mean_row_sum, 1e-12) << to_string(scoring);
    }
  }
}

struct Shape {
  std::int64_t tokens, experts, topk, seq_len;
};
// Includes exact splits, a short last sequence (13 = 5 + 5 + 3, 7 = 3 + 3 + 1), seq_len > T, K == E,
// a single token and T = 0.
const Shape kShapes[] = {{12, 8, 2, 0}, {12, 8, 2, 4},   {13, 8, 3, 5}, {13, 8, 3, 13}, {7, 16, 4, 3},
                         {5, 8, 2, 100}, {9, 6, 6, 4},   {1, 4, 1, 0},  {0, 8, 2, 0},   {0, 8, 2, 4}};

using ShapeParam = std::tuple<ScoringFunc, int /*shape index*/>;
class BalanceShapes : public ::testing::TestWithParam<ShapeParam> {};

TEST_P(BalanceShapes, ValuesMatchReference) {
  const auto [scoring, index] = GetParam();
  const Shape sh = kShapes[index];
  const BalanceLossParams p = bparams(sh.tokens, sh.experts, sh.topk, sh.seq_len, 0.3f, 0.05f);
  if (sh.tokens == 0) {
    const auto v = kernels::balance_loss_forward(p, nullptr, nullptr);
    EXPECT_EQ(v.seq, 0.0);
    EXPECT_EQ(v.expert, 0.0);
    return;
  }
  const Routed r = route(gparams(sh.tokens, 6, sh.experts, sh.topk, scoring, false, 1.0f), 100 + index);
  const RefLoss want = ref_balance(p, to_double(r.scores), r.ids);
  const auto got = kernels::balance_loss_forward(p, r.scores.data(), r.ids.data());
  // Both sides sum the same fp32 scores in double: only double rounding separates them.
  EXPECT_NEAR(got.seq, want.seq, 1e-9 * std::abs(want.seq));
  EXPECT_NEAR(got.expert, want.expert, 1e-9 * std::abs(want.expert));
  EXPECT_GT(want.seq, 0.0);
  EXPECT_GT(want.expert, 0.0);
  // Each coefficient scales only its own term.
  const auto only_seq = kernels::balance_loss_forward(bparams(sh.tokens, sh.experts, sh.topk, sh.seq_len, 0.3f, 0.0f),
                                                      r.scores.data(), r.ids.data());
  EXPECT_EQ(only_seq.expert, 0.0);
  EXPECT_EQ(only_seq.seq, got.seq);
}

TEST_P(BalanceShapes, GradientMatchesFiniteDifferences) {
  const auto [scoring, index] = GetParam();
  const Shape sh = kShapes[index];
  const float d_loss = -0.8f;  // not 1, and negative: a sign or scale slip shows
  struct Alphas {
    float seq, expert;
  };
  for (const Alphas a : {Alphas{0.3f, 0.0f}, Alphas{0.0f, 0.05f}, Alphas{0.3f, 0.05f}}) {
    SCOPED_TRACE("seq_alpha " + std::to_string(a.seq) + " expert_alpha " + std::to_string(a.expert));
    const BalanceLossParams p = bparams(sh.tokens, sh.experts, sh.topk, sh.seq_len, a.seq, a.expert);
    if (sh.tokens == 0) {
      float sentinel = 2.5f;
      kernels::balance_loss_backward(p, nullptr, nullptr, d_loss, &sentinel);
      EXPECT_EQ(sentinel, 2.5f);
      continue;
    }
    const Routed r = route(gparams(sh.tokens, 6, sh.experts, sh.topk, scoring, false, 1.0f), 200 + index);
    // float64 central differences of the reference in every score (ids fixed: f is a count), step
    // 1e-6: truncation ~1e-13 and rounding ~1e-10 against gradients of ~1e-2.
    Vec s = to_double(r.scores), want(s.size());
    for (std::size_t i = 0; i < s.size(); ++i)
      want[i] = d_loss * ref::central_difference([&] { return ref_balance(p, s, r.ids).total(); }, s[i], 1e-6);
    std::vector<float> got(s.size(), 0.0f);
    kernels::balance_loss_backward(p, r.scores.data(), r.ids.data(), d_loss, got.data());
    // The kernel works in double and rounds once to fp32 (~6e-8 relative): 1e-6 of the largest entry,
    // plus 1e-9 absolute for the finite differences' rounding noise where the gradient is exactly 0
    // (K == E with only the sequence-wise loss: L_seq = seq_alpha whatever the scores).
    EXPECT_TRUE(close_to(got, want, 1e-6, "d_scores", 1e-9));

    // It accumulates into d_scores.
    Rng rng(7);
    std::vector<float> acc(s.size());
    rng.fill_normal(acc.data(), static_cast<std::int64_t>(acc.size()), 0.05);
    const std::vector<float> before = acc;
    kernels::balance_loss_backward(p, r.scores.data(), r.ids.data(), d_loss, acc.data());
    const double scale = max_abs(want) + 0.25;
    for (std::size_t i = 0; i < acc.size(); ++i)
      EXPECT_NEAR(acc[i], static_cast<double>(before[i]) + got[i], 1e-6 * scale) << "entry " << i;
  }
}

std::string shape_name(const ::testing::TestParamInfo<ShapeParam>& info) {
  const auto [scoring, index] = info.param;
  const Shape s = kShapes[index];
  return std::string(to_string(scoring)) + "_T" + std::to_string(s.tokens) + "_E" + std::to_string(s.experts) + "_K" +
         std::to_string(s.topk) + "_L" + std::to_string(s.seq_len);
}

INSTANTIATE_TEST_SUITE_P(Shapes, BalanceShapes,
                         ::testing::Combine(::testing::Values(ScoringFunc::kSoftmax, ScoringFunc::kSigmoid),
                                            ::testing::Range(0, static_cast<int>(std::size(kShapes)))),
                         shape_name);

TEST(BalanceLoss, RejectsBadArguments) {
  const std::vector<float> scores(8, 0.25f);
  const Ids ids = {0, 1};
  EXPECT_THROW(kernels::balance_loss_forward(bparams(-1, 4, 1, 0, 1.0f, 1.0f), nullptr, nullptr), InvalidArgument);
  const Ids ids10 = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1};  // valid ids for T = 2, K = 5: only K > E is wrong
  EXPECT_THROW(kernels::balance_loss_forward(bparams(2, 4, 5, 0, 1.0f, 1.0f), scores.data(), ids10.data()), InvalidArgument);
  EXPECT_THROW(kernels::balance_loss_forward(bparams(2, 4, 0, 0, 1.0f, 1.0f), scores.data(), ids.data()), InvalidArgument);
  EXPECT_THROW(kernels::balance_loss_forward(bparams(2, 4, 1, -3, 1.0f, 1.0f), scores.data(), ids.data()), InvalidArgument);
  const Ids bad = {0, 4};
  EXPECT_THROW(kernels::balance_loss_forward(bparams(2, 4, 1, 0, 1.0f, 1.0f), scores.data(), bad.data()), InvalidArgument);
  std::vector<float> d(8, 0.0f);
  EXPECT_THROW(kernels::balance_loss_backward(bparams(2, 4, 1, 0, 1.0f, 1.0f), scores.data(), bad.data(), 1.0f, d.data()),
               InvalidArgument);
}

// ---------------------------------------------------------------------------------------------------
// The full chain: logits -> scores -> balance loss (+ the routed weights) -> dlogits -> dwg, dx.

/// float64 scores of x . wg^T.
Vec ref_scores(ScoringFunc scoring, const Vec& x, const Vec& wg, std::int64_t T, std::int64_t H, std::int64_t E) {
  Vec s(static_cast<std::size_t>(T * E));
  for (std::int64_t t = 0; t < T; ++t) {
    double mx = -1e300;
    for (std::int64_t e = 0; e < E; ++e) {
      double z = 0.0;
      for (std::int64_t h = 0; h < H; ++h) z += x[static_cast<std::size_t>(t * H + h)] * wg[static_cast<std::size_t>(e * H + h)];
      s[static_cast<std::size_t>(t * E + e)] = z;
      mx = std::max(mx, z);
    }
    double sum = 0.0;
    for (std::int64_t e = 0; e < E; ++e) {
      double& v = s[static_cast<std::size_t>(t * E + e)];
      v = scoring == ScoringFunc::kSigmoid ? ref::sigmoid(v) : std::exp(v - mx);
      sum += v;
    }
    if (scoring == ScoringFunc::kSoftmax)
      for (std::int64_t e = 0; e < E; ++e) s[static_cast<std::size_t>(t * E + e)] /= sum;
  }
  return s;
}

using ChainParam = std::tuple<ScoringFunc, bool /*also routed weights*/>;
class BalanceChain : public ::testing::TestWithParam<ChainParam> {};

TEST_P(BalanceChain, GateWeightAndInputGradientsMatchFiniteDifferences) {
  const auto [scoring, with_weights] = GetParam();
  const std::int64_t T = 10, H = 5, E = 8, K = 2;
  const float d_loss = 0.9f, scale = 1.7f;
  const auto g = gparams(T, H, E, K, scoring, /*norm=*/true, scale);
  const BalanceLossParams bp = bparams(T, E, K, /*seq_len=*/4, 0.3f, 0.1f);  // sequences of 4, 4, 2
  const Routed r = route(g, scoring == ScoringFunc::kSigmoid ? 11 : 12);
  std::vector<float> dweights(static_cast<std::size_t>(T * K), 0.0f);
  if (with_weights) {
    Rng rng(13);
    rng.fill_normal(dweights.data(), T * K, 1.0);
  }

  // Kernel: balance backward into d_scores, then gate_backward with it as d_scores_extra.
  std::vector<float> dscores(static_cast<std::size_t>(T * E), 0.0f);
  kernels::balance_loss_backward(bp, r.scores.data(), r.ids.data(), d_loss, dscores.data());
  std::vector<float> dx(static_cast<std::size_t>(T * H), 0.0f), dwg(static_cast<std::size_t>(E * H), 0.0f),
      scratch(static_cast<std::size_t>(T * E));
  kernels::gate_backward(g, r.x.data(), r.wg.data(), r.scores.data(), r.ids.data(), dweights.data(), dx.data(), dwg.data(),
                         scratch.data(), dscores.data());

  // Reference: loss(x, wg) = d_loss * (L_seq + L_exp) + sum dweights * weights in float64, with the
  // top-K selection HELD FIXED at the kernel's forward picks (no step can change the routing, so the
  // loss is smooth and the difference quotient is exact up to truncation and rounding).
  Vec xd = to_double(r.x), wgd = to_double(r.wg);
  auto loss = [&] {
    const Vec s = ref_scores(scoring, xd, wgd, T, H, E);
    double l = d_loss * ref_balance(bp, s, r.ids).total();
    for (std::int64_t t = 0; t < T; ++t) {
      double sum = 0.0;
      for (std::int64_t j = 0; j < K; ++j) sum += s[static_cast<std::size_t>(t * E + r.ids[static_cast<std::size_t>(t * K + j)])];
      for (std::int64_t j = 0; j < K; ++j) {
        const double w = scale * s[static_cast<std::size_t>(t * E + r.ids[static_cast<std::size_t>(t * K + j)])] / sum;
        l += dweights[static_cast<std::size_t>(t * K + j)] * w;
      }
    }
    return l;
  };
  Vec fd_x(xd.size()), fd_wg(wgd.size());
  for (std::size_t i = 0; i < xd.size(); ++i) fd_x[i] = ref::central_difference(loss, xd[i], 1e-6);
  for (std::size_t i = 0; i < wgd.size(); ++i) fd_wg[i] = ref::central_difference(loss, wgd[i], 1e-6);
  // fp32 scores, dlogits and GEMMs against float64: errors seen ~2e-7 of each tensor's scale; 1e-5.
  EXPECT_TRUE(close_to(dwg, fd_wg, 1e-5, "dwg"));
  EXPECT_TRUE(close_to(dx, fd_x, 1e-5, "dx"));
  EXPECT_GT(max_abs(fd_wg), 1e-3);
}

std::string chain_name(const ::testing::TestParamInfo<ChainParam>& info) {
  const auto [scoring, with_weights] = info.param;
  return std::string(to_string(scoring)) + (with_weights ? "_balance_and_weights" : "_balance_only");
}

INSTANTIATE_TEST_SUITE_P(Scoring, BalanceChain,
                         ::testing::Combine(::testing::Values(ScoringFunc::kSoftmax, ScoringFunc::kSigmoid),
                                            ::testing::Bool()),
                         chain_name);

TEST(BalanceChain, SigmoidExtraReachesUnpickedExperts) {
  // One token, top-2 of 8, sequence-wise loss only: the normalisation s' = s / sum s gives every
  // expert a score gradient, so every gate-weight row must get one (without d_scores_extra only the
  // two picks would).
  const auto g = gparams(1, 5, 8, 2, ScoringFunc::kSigmoid, false, 1.0f);
  const Routed r = route(g, 21);
  std::vector<float> dscores(8, 0.0f), dweights(2, 0.0f), dx(5, 0.0f), dwg(40, 0.0f), scratch(8);
  kernels::balance_loss_backward(bparams(1, 8, 2, 0, 1.0f, 0.0f), r.scores.data(), r.ids.data(), 1.0f, dscores.data());
  kernels::gate_backward(g, r.x.data(), r.wg.data(), r.scores.data(), r.ids.data(), dweights.data(), dx.data(), dwg.data(),
                         scratch.data(), dscores.data());
  for (std::int64_t e = 0; e < 8; ++e) {
    float row = 0.0f;
    for (std::int64_t h = 0; h < 5; ++h) row = std::max(row, std::abs(dwg[static_cast<std::size_t>(e * 5 + h)]));
    EXPECT_GT(row, 0.0f) << "expert " << e;
    // dlogits (left in the scratch) = dscore * s (1 - s) for every expert, picked or not.
    const double s = r.scores[static_cast<std::size_t>(e)];
    const double want = dscores[static_cast<std::size_t>(e)] * s * (1.0 - s);
    EXPECT_NEAR(scratch[static_cast<std::size_t>(e)], want, 1e-6 * std::abs(want)) << "expert " << e;
  }
}

TEST(BalanceChain, ZeroExtraMatchesNoExtra) {
  for (const ScoringFunc scoring : {ScoringFunc::kSoftmax, ScoringFunc::kSigmoid}) {
    SCOPED_TRACE(to_string(scoring));
    const std::int64_t T = 6, H = 4, E = 8, K = 3;
    const auto g = gparams(T, H, E, K, scoring, true, 2.5f);
    const Routed r = route(g, 31);
    std::vector<float> dweights(static_cast<std::size_t>(T * K));
    Rng(3).fill_normal(dweights.data(), T * K, 1.0);
    std::vector<float> zeros(static_cast<std::size_t>(T * E), 0.0f), scratch(static_cast<std::size_t>(T * E));
    std::vector<float> dx0(static_cast<std::size_t>(T * H), 0.0f), dwg0(static_cast<std::size_t>(E * H), 0.0f);
    std::vector<float> dx1 = dx0, dwg1 = dwg0;
    kernels::gate_backward(g, r.x.data(), r.wg.data(), r.scores.data(), r.ids.data(), dweights.data(), dx0.data(),
                           dwg0.data(), scratch.data());
    kernels::gate_backward(g, r.x.data(), r.wg.data(), r.scores.data(), r.ids.data(), dweights.data(), dx1.data(),
                           dwg1.data(), scratch.data(), zeros.data());
    // Only the order of the softmax inner product differs (all E experts instead of the K picks).
    EXPECT_TRUE(close_to(dx1, to_double(dx0), 1e-6, "dx"));
    EXPECT_TRUE(close_to(dwg1, to_double(dwg0), 1e-6, "dwg"));
  }
}

}  // namespace
}  // namespace moex
