// Single-process tests of the math, SwiGLU FFN and permute kernels and ExpertPlacement.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "base/error.h"
#include "runtime/blas.h"
#include "runtime/kernels/expert_ffn.h"
#include "runtime/kernels/math.h"
#include "runtime/kernels/permute.h"
#include "runtime/kernels/rowwise_gemm.h"
#include "runtime/kernels/swiglu_rows.h"
#include "runtime/parallel.h"
#include "runtime/random.h"
#include "scheduler/expert_placement.h"
#include "tests/reference_moe.h"
#include "tests/tolerance.h"

namespace moex {
namespace {

std::vector<float> random_floats(Rng& rng, std::int64_t n, double stddev) {
  std::vector<float> v(static_cast<std::size_t>(n));
  rng.fill_normal(v.data(), n, stddev);
  return v;
}

ref::Vec to_double(const float* p, std::int64_t n) { return ref::Vec(p, p + n); }

using testing::close_to;
using testing::max_abs;

// ---------------------------------------------------------------------------------------------------
// math.h

std::vector<float> probe_points() {
  std::vector<float> xs;
  for (int i = -400; i <= 400; ++i) xs.push_back(static_cast<float>(i) * 0.075f);
  for (float v : {-1e4f, -200.0f, -100.0f, -88.7f, -87.0f, -50.0f, -20.0f, -1e-6f, 0.0f, 1e-6f, 20.0f, 50.0f, 87.0f,
                  88.7f, 100.0f, 200.0f, 1e4f, std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()})
    xs.push_back(v);
  return xs;
}

double sigmoid64(double x) { return 1.0 / (1.0 + std::exp(-x)); }

TEST(KernelMath, SigmoidMatchesFloat64AndStaysFiniteForHugeInputs) {
  for (float x : probe_points()) {
    const float got = math::sigmoid(x);
    const double want = sigmoid64(x);
    ASSERT_TRUE(std::isfinite(got)) << "x=" << x;
    EXPECT_GE(got, 0.0f);
    EXPECT_LE(got, 1.0f);
    // A few float ulps relative, plus an absolute floor for results in the subnormal range.
    EXPECT_NEAR(got, want, 1e-6 * want + 1e-37) << "x=" << x;
  }
}

TEST(KernelMath, SiluAndItsDerivativeMatchFloat64) {
  for (float x : probe_points()) {
    const double xd = x, s = sigmoid64(xd);
    const double silu = xd * s, grad = s * (1.0 + xd * (1.0 - s));
    const float got = math::silu(x), got_grad = math::silu_grad(x);
    ASSERT_TRUE(std::isfinite(got)) << "x=" << x;
    ASSERT_TRUE(std::isfinite(got_grad)) << "x=" << x;
    EXPECT_NEAR(got, silu, 1e-6 * std::abs(silu) + 1e-37 * std::max(1.0, std::abs(xd))) << "x=" << x;
    // 1 + x(1 - s) cancels near x = -1.28, so the error scales with the size of its terms.
    EXPECT_NEAR(got_grad, grad, 2e-6 * std::max(std::abs(grad), s * (1.0 + std::abs(xd))) + 1e-37) << "x=" << x;
  }
}

TEST(KernelMath, SiluGradIsTheDerivativeOfSilu) {
  // Independent of the closed form: a float64 central difference of x * sigmoid(x).
  for (double x = -12.0; x <= 12.0; x += 0.37) {
    const double h = 1e-5;
    const double fd = ((x + h) * sigmoid64(x + h) - (x - h) * sigmoid64(x - h)) / (2.0 * h);
    EXPECT_NEAR(math::silu_grad(static_cast<float>(x)), fd, 2e-6 * (1.0 + std::abs(x))) << "x=" << x;
  }
}

TEST(KernelMath, SwigluForwardAndBackwardMatchFloat64) {
  Rng rng(11);
  for (int i = 0; i < 2000; ++i) {
    const float g = static_cast<float>(rng.normal() * 4.0), u = static_cast<float>(rng.normal() * 2.0);
    const float da = static_cast<float>(rng.normal());
    const double s = sigmoid64(g);
    const double fwd = g * s * u;
    EXPECT_NEAR(math::swiglu(g, u), fwd, 2e-6 * std::abs(fwd) + 1e-30);
    float dg = 0, du = 0;
    math::swiglu_backward(g, u, da, &dg, &du);
    const double want_du = static_cast<double>(da) * g * s;
    const double want_dg = static_cast<double>(da) * u * s * (1.0 + g * (1.0 - s));
    EXPECT_NEAR(du, want_du, 2e-6 * std::abs(want_du) + 1e-30);
    EXPECT_NEAR(dg, want_dg, 4e-6 * std::abs(static_cast<double>(da) * u) * s * (1.0 + std::abs(g)) + 1e-30);
    // The saved-sigmoid variant is the same arithmetic, so it must agree bit for bit.
    float dg2 = 0, du2 = 0;
    math::swiglu_backward_saved(g, u, math::sigmoid(g), da, &dg2, &du2);
    EXPECT_EQ(dg, dg2);
    EXPECT_EQ(du, du2);
  }
}

TEST(KernelMath, SwigluRowMatchesFloat64OverTheWholeRange) {
  // Values across the exp range, the clamp (-87.3) and beyond, signed zeros, and every row length
  // around the vector width so both the vector body and the scalar tail run.
  std::vector<float> g = {0.0f, -0.0f, 1e-30f, -1e-30f, 0.5f, -0.5f, 1.0f, -1.0f, 10.0f, -10.0f,
                          20.0f, -20.0f, 87.0f, -87.0f, 88.0f, -88.0f, 100.0f, -100.0f, 3.3e4f, -3.3e4f};
  Rng rng(11);
  for (int i = 0; i < 300; ++i) g.push_back(static_cast<float>(rng.normal() * 8.0));
  std::vector<float> u(g.size());
  for (auto& v : u) v = static_cast<float>(rng.normal());
  for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{8}, std::size_t{9},
                        std::size_t{17}, g.size()}) {
    std::vector<float> sig(n, -1.0f), a(n, -1.0f);
    kernels::swiglu_forward_row(g.data(), u.data(), sig.data(), a.data(), static_cast<std::int64_t>(n));
    for (std::size_t j = 0; j < n; ++j) {
      const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(g[j])));
      const double av = static_cast<double>(g[j]) * s * u[j];
      // 4e-7 relative (a few ulp); below 1.2e-38 (g < -87.3) the clamp allows an absolute 2e-38.
      EXPECT_NEAR(sig[j], s, 4e-7 * s + 2e-38) << "g = " << g[j] << " n = " << n;
      EXPECT_NEAR(a[j], av, 6e-7 * std::abs(av) + 1e-33) << "g = " << g[j] << " n = " << n;
    }
  }
  // A value's result does not depend on the row length or on its neighbours.
  std::vector<float> s_full(g.size()), a_full(g.size()), s_part(g.size()), a_part(g.size());
  kernels::swiglu_forward_row(g.data(), u.data(), s_full.data(), a_full.data(), static_cast<std::int64_t>(g.size()));
  kernels::swiglu_forward_row(g.data(), u.data(), s_part.data(), a_part.data(), 24);
  for (std::size_t j = 0; j < 24; ++j) EXPECT_EQ(s_full[j], s_part[j]);
  std::cout << "[ info     ] swiglu row kernel vectorised: " << (kernels::swiglu_row_vectorised() ? "yes" : "no") << "\n";
}

// ---------------------------------------------------------------------------------------------------
// SwiGLU FFN

/// One expert's weights in both layouts: the kernel's (w13 = gate_proj over up_proj, w2 = down_proj)
/// and the reference's.
struct FfnCase {
  kernels::FfnShape shape;
  std::vector<float> x, w13, w2, dy;
  ref::Mlp mlp;
  ref::Vec xd, dyd;

  FfnCase(std::int64_t rows, std::int64_t hidden, std::int64_t ffn, std::uint64_t seed) : shape{rows, hidden, ffn} {
    Rng rng(seed);
    x = random_floats(rng, rows * hidden, 1.0);
    w13 = random_floats(rng, 2 * ffn * hidden, 1.0 / std::sqrt(static_cast<double>(hidden)));
    w2 = random_floats(rng, hidden * ffn, 1.0 / std::sqrt(static_cast<double>(ffn)));
    dy = random_floats(rng, rows * hidden, 1.0);
    mlp = ref::Mlp(hidden, ffn);
    mlp.gate_proj = to_double(w13.data(), ffn * hidden);
    mlp.up_proj = to_double(w13.data() + ffn * hidden, ffn * hidden);
    mlp.down_proj = to_double(w2.data(), hidden * ffn);
    xd = to_double(x.data(), rows * hidden);
    dyd = to_double(dy.data(), rows * hidden);
  }

  /// Reference gradients of sum(dy * y) over all rows.
  std::pair<ref::Mlp, ref::Vec> reference_grads() const {
    ref::Mlp g(shape.hidden, shape.ffn);
    ref::Vec dx(static_cast<std::size_t>(shape.rows * shape.hidden), 0.0);
    for (std::int64_t r = 0; r < shape.rows; ++r)
      ref::mlp_backward(mlp, xd.data() + r * shape.hidden, dyd.data() + r * shape.hidden, g, dx.data() + r * shape.hidden);
    return {g, dx};
  }
};

TEST(KernelFfn, ForwardMatchesReferenceAndSavesActivations) {
  for (auto [rows, hidden, ffn] : {std::tuple<int, int, int>{7, 10, 6}, {1, 5, 3}, {33, 16, 24}}) {
    FfnCase c(rows, hidden, ffn, 100 + static_cast<std::uint64_t>(rows));
    const std::int64_t F = ffn;
    std::vector<float> h13(static_cast<std::size_t>(rows * 2 * F)), sig(static_cast<std::size_t>(rows * F)),
        a(static_cast<std::size_t>(rows * F)), y(static_cast<std::size_t>(rows * hidden), 12345.0f);
    kernels::swiglu_ffn_forward(c.shape, c.x.data(), c.w13.data(), c.w2.data(), h13.data(), sig.data(), a.data(),
                                y.data());
    ref::Vec want_y, want_h13, want_sig, want_a;
    for (std::int64_t r = 0; r < rows; ++r) {
      const ref::Vec yr = ref::mlp_forward(c.mlp, c.xd.data() + r * hidden);
      want_y.insert(want_y.end(), yr.begin(), yr.end());
      ref::Vec g(static_cast<std::size_t>(F), 0.0), u(static_cast<std::size_t>(F), 0.0);
      for (std::int64_t f = 0; f < F; ++f)
        for (std::int64_t h = 0; h < hidden; ++h) {
          g[static_cast<std::size_t>(f)] += c.mlp.gate_proj[static_cast<std::size_t>(f * hidden + h)] * c.xd[static_cast<std::size_t>(r * hidden + h)];
          u[static_cast<std::size_t>(f)] += c.mlp.up_proj[static_cast<std::size_t>(f * hidden + h)] * c.xd[static_cast<std::size_t>(r * hidden + h)];
        }
      want_h13.insert(want_h13.end(), g.begin(), g.end());
      want_h13.insert(want_h13.end(), u.begin(), u.end());
      for (std::int64_t f = 0; f < F; ++f) {
        want_sig.push_back(ref::sigmoid(g[static_cast<std::size_t>(f)]));
        want_a.push_back(ref::silu(g[static_cast<std::size_t>(f)]) * u[static_cast<std::size_t>(f)]);
      }
    }
    // fp32 dot products of length <= 24 with O(1) terms: errors ~1e-6 of the output scale.
    const std::string tag = " rows=" + std::to_string(rows);
    EXPECT_TRUE(close_to(y.data(), want_y, 1e-5, "y" + tag));
    EXPECT_TRUE(close_to(h13.data(), want_h13, 1e-5, "h13" + tag));
    EXPECT_TRUE(close_to(sig.data(), want_sig, 1e-5, "sig" + tag));
    EXPECT_TRUE(close_to(a.data(), want_a, 1e-5, "a" + tag));
  }
}

TEST(KernelFfn, ReferenceBackwardMatchesFiniteDifferences) {
  // Validates the float64 reference itself. Central differences with step 1e-5 have truncation error
  // ~1e-10 and rounding error ~1e-11 here, so 1e-6 of the largest gradient is a real check.
  FfnCase c(3, 5, 4, 7);
  const auto [grad, dx] = c.reference_grads();
  ref::Mlp m = c.mlp;
  ref::Vec x = c.xd;
  auto loss = [&] {
    double l = 0.0;
    for (std::int64_t r = 0; r < c.shape.rows; ++r) {
      const ref::Vec y = ref::mlp_forward(m, x.data() + r * c.shape.hidden);
      for (std::int64_t h = 0; h < c.shape.hidden; ++h) l += c.dyd[static_cast<std::size_t>(r * c.shape.hidden + h)] * y[static_cast<std::size_t>(h)];
    }
    return l;
  };
  const double step = 1e-5;
  auto fd_of = [&](ref::Vec& params) {
    ref::Vec out(params.size());
    for (std::size_t i = 0; i < params.size(); ++i) out[i] = ref::central_difference(loss, params[i], step);
    return out;
  };
  EXPECT_TRUE(close_to(grad.gate_proj, fd_of(m.gate_proj), 1e-6, "d gate_proj"));
  EXPECT_TRUE(close_to(grad.up_proj, fd_of(m.up_proj), 1e-6, "d up_proj"));
  EXPECT_TRUE(close_to(grad.down_proj, fd_of(m.down_proj), 1e-6, "d down_proj"));
  EXPECT_TRUE(close_to(dx, fd_of(x), 1e-6, "dx"));
}

TEST(KernelFfn, BackwardMatchesReferenceGradients) {
  // Finite differences of the fp32 kernel would drown in rounding (eps_f32 / step), so the kernel's
  // analytic gradients are compared with the float64 reference's (checked against finite differences
  // above). fp32 GEMMs over <= 33 rows keep errors near 1e-6 of each tensor's scale: 1e-4 is loose
  // enough to be robust and tight enough to catch any wrong term.
  for (auto [rows, hidden, ffn] : {std::tuple<int, int, int>{7, 10, 6}, {1, 5, 3}, {33, 16, 24}}) {
    FfnCase c(rows, hidden, ffn, 300 + static_cast<std::uint64_t>(rows));
    const std::int64_t F = ffn, H = hidden;
    std::vector<float> h13(static_cast<std::size_t>(rows * 2 * F)), sig(static_cast<std::size_t>(rows * F)),
        a(static_cast<std::size_t>(rows * F)), y(static_cast<std::size_t>(rows * H));
    kernels::swiglu_ffn_forward(c.shape, c.x.data(), c.w13.data(), c.w2.data(), h13.data(), sig.data(), a.data(),
                                y.data());
    const auto [grad, dx] = c.reference_grads();
    ref::Vec want_w13 = grad.gate_proj;
    want_w13.insert(want_w13.end(), grad.up_proj.begin(), grad.up_proj.end());
    const std::string tag = " rows=" + std::to_string(rows);

    // accumulate = false overwrites whatever the gradient buffers held.
    std::vector<float> dw13(static_cast<std::size_t>(2 * F * H), 12345.0f), dw2(static_cast<std::size_t>(H * F), 12345.0f);
    std::vector<float> dxk(static_cast<std::size_t>(rows * H), 12345.0f), scratch(static_cast<std::size_t>(rows * 2 * F));
    kernels::swiglu_ffn_backward(c.shape, c.x.data(), c.w13.data(), c.w2.data(), h13.data(), sig.data(), a.data(),
                                 c.dy.data(), dw13.data(), dw2.data(), dxk.data(), scratch.data(), false);
    EXPECT_TRUE(close_to(dw13.data(), want_w13, 1e-4, "dw13 (overwrite)" + tag));
    EXPECT_TRUE(close_to(dw2.data(), grad.down_proj, 1e-4, "dw2 (overwrite)" + tag));
    EXPECT_TRUE(close_to(dxk.data(), dx, 1e-4, "dx" + tag));

    // accumulate = true adds onto what is there: start from 1 everywhere.
    std::vector<float> acc13(dw13.size(), 1.0f), acc2(dw2.size(), 1.0f);
    kernels::swiglu_ffn_backward(c.shape, c.x.data(), c.w13.data(), c.w2.data(), h13.data(), sig.data(), a.data(),
                                 c.dy.data(), acc13.data(), acc2.data(), dxk.data(), scratch.data(), true);
    ref::Vec plus13 = want_w13, plus2 = grad.down_proj;
    for (double& v : plus13) v += 1.0;
    for (double& v : plus2) v += 1.0;
    // Tolerance relative to the gradient scale, not the +1 offset.
    const double tol13 = 1e-4 * max_abs(want_w13), tol2 = 1e-4 * max_abs(grad.down_proj);
    for (std::size_t i = 0; i < plus13.size(); ++i) ASSERT_NEAR(acc13[i], plus13[i], tol13 + 2e-7) << "dw13 accumulate" << tag;
    for (std::size_t i = 0; i < plus2.size(); ++i) ASSERT_NEAR(acc2[i], plus2[i], tol2 + 2e-7) << "dw2 accumulate" << tag;
  }
}

TEST(KernelFfn, ZeroRowsLeaveOutputsAloneAndAccumulateNothing) {
  FfnCase c(0, 4, 3, 1);
  std::vector<float> dw13(24, 2.0f), dw2(12, 3.0f);
  float dummy = 0.0f;
  kernels::swiglu_ffn_forward(c.shape, nullptr, c.w13.data(), c.w2.data(), &dummy, &dummy, &dummy, &dummy);
  kernels::swiglu_ffn_backward(c.shape, nullptr, c.w13.data(), c.w2.data(), nullptr, nullptr, nullptr, nullptr,
                               dw13.data(), dw2.data(), nullptr, nullptr, true);
  for (float v : dw13) EXPECT_EQ(v, 2.0f);
  for (float v : dw2) EXPECT_EQ(v, 3.0f);
}

TEST(KernelFfn, ZeroRowsOverwriteClearsGradients) {
  // accumulate = false means "the gradient is this block's": over zero rows that is exactly zero.
  FfnCase c(0, 4, 3, 1);
  std::vector<float> dw13(24, 2.0f), dw2(12, 3.0f);
  kernels::swiglu_ffn_backward(c.shape, nullptr, c.w13.data(), c.w2.data(), nullptr, nullptr, nullptr, nullptr,
                               dw13.data(), dw2.data(), nullptr, nullptr, false);
  for (float v : dw13) EXPECT_EQ(v, 0.0f) << "dw13 not overwritten for a block of 0 rows";
  for (float v : dw2) EXPECT_EQ(v, 0.0f) << "dw2 not overwritten for a block of 0 rows";
}

// ---------------------------------------------------------------------------------------------------
// Reference layer self-check (the ground truth of test_gate and test_layer)

TEST(ReferenceLayer, BackwardMatchesFiniteDifferences) {
  // Every configuration family once; picks are held by the margin check (finite-difference steps of
  // 1e-6 cannot flip a decision that is >= 1e-3 away).
  struct Cfg {
    ScoringFunc scoring;
    TopkMethod method;
    std::int64_t n_group, topk_group;
    bool norm, bias;
    std::int64_t shared;
  };
  const Cfg cfgs[] = {
      {ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 2, 1, true, true, 1},
      {ScoringFunc::kSoftmax, TopkMethod::kGreedy, 1, 1, false, false, 2},
      {ScoringFunc::kSoftmax, TopkMethod::kGroupLimitedGreedy, 2, 1, true, false, 0},
      {ScoringFunc::kSigmoid, TopkMethod::kGreedy, 1, 1, false, true, 0},
  };
  const std::int64_t H = 5, F = 3, E = 4, K = 2, T = 3;
  int index = 0;
  for (const Cfg& cfg : cfgs) {
    SCOPED_TRACE("config " + std::to_string(index++));
    ref::GateSpec g;
    g.experts = E;
    g.topk = K;
    g.n_group = cfg.n_group;
    g.topk_group = cfg.topk_group;
    g.scoring = cfg.scoring;
    g.method = cfg.method;
    g.norm_topk_prob = cfg.norm;
    g.routed_scaling_factor = 1.7;
    Rng rng(900 + static_cast<std::uint64_t>(index));
    ref::LayerWeights w;
    w.hidden = H;
    auto normal = [&](std::size_t n, double sd) {
      ref::Vec v(n);
      for (double& e : v) e = rng.normal() * sd;
      return v;
    };
    w.gate = normal(static_cast<std::size_t>(E * H), 0.8);
    if (cfg.bias) w.bias = normal(static_cast<std::size_t>(E), 0.05);
    for (std::int64_t e = 0; e < E; ++e) {
      ref::Mlp m(H, F);
      m.gate_proj = normal(m.gate_proj.size(), 0.5);
      m.up_proj = normal(m.up_proj.size(), 0.5);
      m.down_proj = normal(m.down_proj.size(), 0.5);
      w.experts.push_back(m);
    }
    w.shared = ref::Mlp(H, F * cfg.shared);
    w.shared.gate_proj = normal(w.shared.gate_proj.size(), 0.5);
    w.shared.up_proj = normal(w.shared.up_proj.size(), 0.5);
    w.shared.down_proj = normal(w.shared.down_proj.size(), 0.5);
    ref::Vec x;
    for (std::int64_t t = 0; t < T; ++t) {
      for (;;) {  // draw the token again until its routing is far from any tie
        const ref::Vec row = normal(static_cast<std::size_t>(H), 1.0);
        if (ref::gate_forward(g, row, 1, H, w.gate, w.bias).margin[0] >= 1e-3) {
          x.insert(x.end(), row.begin(), row.end());
          break;
        }
      }
    }
    const ref::Vec dy = normal(static_cast<std::size_t>(T * H), 1.0);
    const ref::LayerGrads grads = ref::layer_backward(g, w, x, T, dy);
    const auto ids = ref::layer_forward(g, w, x, T).gate.ids;
    auto loss = [&] {
      const ref::LayerOutput o = ref::layer_forward(g, w, x, T);
      EXPECT_EQ(o.gate.ids, ids) << "a finite-difference step changed the routing";
      double l = 0.0;
      for (std::size_t i = 0; i < dy.size(); ++i) l += dy[i] * o.y[i];
      return l;
    };
    auto fd_of = [&](ref::Vec& params) {
      ref::Vec out(params.size());
      for (std::size_t i = 0; i < params.size(); ++i) out[i] = ref::central_difference(loss, params[i], 1e-6);
      return out;
    };
    // Step 1e-6: truncation ~1e-12, rounding ~1e-10 of O(1) gradients; 1e-6 relative is a real check.
    EXPECT_TRUE(close_to(grads.dx, fd_of(x), 1e-6, "dx"));
    EXPECT_TRUE(close_to(grads.dgate, fd_of(w.gate), 1e-6, "dgate"));
    for (std::int64_t e = 0; e < E; ++e) {
      const std::string tag = " expert " + std::to_string(e);
      auto& m = w.experts[static_cast<std::size_t>(e)];
      const auto& gm = grads.experts[static_cast<std::size_t>(e)];
      EXPECT_TRUE(close_to(gm.gate_proj, fd_of(m.gate_proj), 1e-6, "gate_proj" + tag));
      EXPECT_TRUE(close_to(gm.up_proj, fd_of(m.up_proj), 1e-6, "up_proj" + tag));
      EXPECT_TRUE(close_to(gm.down_proj, fd_of(m.down_proj), 1e-6, "down_proj" + tag));
    }
    EXPECT_TRUE(close_to(grads.shared.gate_proj, fd_of(w.shared.gate_proj), 1e-6, "shared gate_proj"));
    EXPECT_TRUE(close_to(grads.shared.up_proj, fd_of(w.shared.up_proj), 1e-6, "shared up_proj"));
    EXPECT_TRUE(close_to(grads.shared.down_proj, fd_of(w.shared.down_proj), 1e-6, "shared down_proj"));
  }
}

// ---------------------------------------------------------------------------------------------------
// Row-independent GEMM

TEST(RowwiseGemm, MatchesFloat64AndEveryRowSubsetGivesTheSameBits) {
  Rng rng(31);
  // Shapes with column tails (n % 16), row tails (m % 4), several k passes (k > 256) and k = 0.
  const std::int64_t shapes[][3] = {{13, 37, 5}, {9, 16, 300}, {33, 70, 513}, {4, 8, 1}, {6, 21, 0}, {1, 1, 7}};
  for (const auto& sh : shapes) {
    const std::int64_t m = sh[0], n = sh[1], k = sh[2];
    std::vector<float> a(static_cast<std::size_t>(m * k)), b(static_cast<std::size_t>(k * n)), c(static_cast<std::size_t>(m * n), 7.0f);
    rng.fill_normal(a.data(), m * k, 1.0);
    rng.fill_normal(b.data(), k * n, 1.0);
    kernels::rowwise_gemm_nn(m, n, k, a.data(), k, b.data(), n, c.data(), n);
    double err = 0.0, mag = 1e-30;
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double want = 0.0;
        for (std::int64_t kk = 0; kk < k; ++kk) want += static_cast<double>(a[static_cast<std::size_t>(i * k + kk)]) * b[static_cast<std::size_t>(kk * n + j)];
        err = std::max(err, std::abs(want - c[static_cast<std::size_t>(i * n + j)]));
        mag = std::max(mag, std::abs(want));
      }
    EXPECT_LE(err, k == 0 ? 0.0 : 1e-5 * mag) << m << "x" << n << "x" << k;
    // Any row range, computed alone and with other threads, gives the full product's bits.
    for (int threads : {1, 3}) {
      set_parallel_threads(threads);
      for (std::int64_t r0 = 0; r0 < m; r0 += 3)
        for (std::int64_t len : {std::int64_t{1}, std::int64_t{2}, std::int64_t{5}, m}) {
          const std::int64_t r1 = std::min(m, r0 + len);
          std::vector<float> part(static_cast<std::size_t>((r1 - r0) * n), -1.0f);
          kernels::rowwise_gemm_nn(r1 - r0, n, k, a.data() + r0 * k, k, b.data(), n, part.data(), n);
          EXPECT_EQ(std::memcmp(part.data(), c.data() + r0 * n, part.size() * sizeof(float)), 0)
              << m << "x" << n << "x" << k << ": rows [" << r0 << ", " << r1 << ") with " << threads << " threads";
        }
    }
    set_parallel_threads(1);
    // The transposed form equals the plain one on the explicitly transposed B.
    std::vector<float> bt(static_cast<std::size_t>(n * k)), c2(c.size()), scratch;
    for (std::int64_t kk = 0; kk < k; ++kk)
      for (std::int64_t j = 0; j < n; ++j) bt[static_cast<std::size_t>(j * k + kk)] = b[static_cast<std::size_t>(kk * n + j)];
    kernels::rowwise_gemm_nt(m, n, k, a.data(), k, bt.data(), k, c2.data(), n, scratch);
    EXPECT_EQ(c2, c) << m << "x" << n << "x" << k;
  }
}

TEST(RowwiseGemm, FfnWithRowwiseGemmsIsChunkIndependentAndMatchesBlas) {
  const std::int64_t R = 23, H = 40, F = 24;
  Rng rng(32);
  std::vector<float> x(R * H), w13(2 * F * H), w2(H * F), dy(R * H);
  rng.fill_normal(x.data(), R * H, 1.0);
  rng.fill_normal(w13.data(), 2 * F * H, 0.2);
  rng.fill_normal(w2.data(), H * F, 0.2);
  rng.fill_normal(dy.data(), R * H, 1.0);
  auto run = [&](std::int64_t r0, std::int64_t r1, kernels::GemmKind g, std::vector<float>& y, std::vector<float>& dx) {
    const std::int64_t n = r1 - r0;
    std::vector<float> h13(n * 2 * F), sig(n * F), a(n * F), dh13(n * 2 * F);
    y.resize(n * H);
    dx.resize(n * H);
    kernels::swiglu_ffn_forward({n, H, F}, x.data() + r0 * H, w13.data(), w2.data(), h13.data(), sig.data(), a.data(), y.data(), g);
    kernels::swiglu_ffn_backward_data({n, H, F}, w13.data(), w2.data(), h13.data(), sig.data(), dy.data() + r0 * H,
                                      dh13.data(), dx.data(), g);
  };
  std::vector<float> y, dx, yb, dxb;
  run(0, R, kernels::GemmKind::kRowwise, y, dx);
  run(0, R, kernels::GemmKind::kBlas, yb, dxb);
  for (std::size_t i = 0; i < y.size(); ++i) {
    EXPECT_NEAR(y[i], yb[i], 1e-4f) << i;
    EXPECT_NEAR(dx[i], dxb[i], 1e-4f) << i;
  }
  for (std::int64_t cut : {1, 7, 16, 22}) {
    std::vector<float> y1, dx1, y2, dx2;
    run(0, cut, kernels::GemmKind::kRowwise, y1, dx1);
    run(cut, R, kernels::GemmKind::kRowwise, y2, dx2);
    y1.insert(y1.end(), y2.begin(), y2.end());
    dx1.insert(dx1.end(), dx2.begin(), dx2.end());
    EXPECT_EQ(y1, y) << "cut at " << cut;
    EXPECT_EQ(dx1, dx) << "cut at " << cut;
  }
}

// ---------------------------------------------------------------------------------------------------
// Permute kernels

TEST(KernelPermute, CombineRowsSumsEachDestinationInCsrOrder) {
  // 3 destinations from 5 source rows of width 3: d0 = 2*s4 + 0.5*s1, d1 = nothing, d2 = s0 + s0 + s3.
  const std::int64_t width = 3, src_stride = 4, dst_stride = 5;
  std::vector<float> src(5 * src_stride);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = 0.25f * static_cast<float>(i) - 1.0f;
  const std::vector<std::int64_t> offsets = {0, 2, 2, 5}, rows = {4, 1, 0, 0, 3};
  const std::vector<float> w = {2.0f, 0.5f, 1.0f, 1.0f, 1.0f};
  for (const bool accumulate : {false, true}) {
    std::vector<float> dst(3 * dst_stride, 10.0f);
    kernels::combine_rows(3, width, offsets.data(), rows.data(), w.data(), src.data(), src_stride, dst.data(),
                          dst_stride, accumulate);
    for (std::int64_t r = 0; r < 3; ++r)
      for (std::int64_t j = 0; j < dst_stride; ++j) {
        float want = j < width ? (accumulate ? 10.0f : 0.0f) : 10.0f;  // columns past width untouched
        if (j < width)
          for (std::int64_t i = offsets[static_cast<std::size_t>(r)]; i < offsets[static_cast<std::size_t>(r) + 1]; ++i)
            want += w[static_cast<std::size_t>(i)] * src[static_cast<std::size_t>(rows[static_cast<std::size_t>(i)] * src_stride + j)];
        EXPECT_EQ(dst[static_cast<std::size_t>(r * dst_stride + j)], want) << "dest " << r << " col " << j;
      }
  }
  // Without weights, and over a range of destinations (offsets + 1: destinations 1 and 2 only).
  std::vector<float> dst(2 * width, 0.0f);
  kernels::combine_rows(2, width, offsets.data() + 1, rows.data(), nullptr, src.data(), src_stride, dst.data(), width,
                        false);
  for (std::int64_t j = 0; j < width; ++j) {
    EXPECT_EQ(dst[static_cast<std::size_t>(j)], 0.0f);
    EXPECT_EQ(dst[static_cast<std::size_t>(width + j)], src[static_cast<std::size_t>(j)] + src[static_cast<std::size_t>(j)] +
                                                              src[static_cast<std::size_t>(3 * src_stride + j)]);
  }
}

TEST(KernelPermute, ZeroRowsWriteNothing) {
  float out = 3.0f;
  kernels::combine_rows(0, 4, nullptr, nullptr, nullptr, nullptr, 4, &out, 4, false);
  kernels::gather_rows(0, 4, nullptr, &out, 4, nullptr, 4);
  kernels::scatter_add_rows(0, 4, nullptr, nullptr, nullptr, 4, &out, 4);
  EXPECT_EQ(out, 3.0f);
}

TEST(KernelPermute, GatherRowsWithStridesAndRepeats) {
  const std::int64_t width = 3, src_stride = 5, dst_stride = 4;
  std::vector<float> src(6 * src_stride);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(i);
  const std::vector<std::int64_t> index = {4, 0, 4, 2, 5};
  std::vector<float> dst(index.size() * dst_stride, -1.0f);
  kernels::gather_rows(static_cast<std::int64_t>(index.size()), width, index.data(), src.data(), src_stride, dst.data(),
                       dst_stride);
  for (std::size_t n = 0; n < index.size(); ++n) {
    for (std::int64_t j = 0; j < width; ++j)
      EXPECT_EQ(dst[n * dst_stride + static_cast<std::size_t>(j)], src[static_cast<std::size_t>(index[n] * src_stride + j)]);
    EXPECT_EQ(dst[n * dst_stride + 3], -1.0f) << "padding column written";
  }
}

TEST(KernelPermute, GatherValuesWritesZeroForNoSource) {
  const std::vector<std::int64_t> index{2, -1, 0, 2};
  const std::vector<float> src{1.5f, -2.0f, 4.0f};
  std::vector<float> dst(index.size(), 9.0f);
  kernels::gather_values(4, index.data(), src.data(), dst.data());
  EXPECT_EQ(dst, (std::vector<float>{4.0f, 0.0f, 1.5f, 4.0f}));
}

TEST(KernelPermute, GatherRowsScaledDotMatchesFloat64) {
  // Entries 0..3 read rows 2, 0, 2, 1 of a 3-row source 5 wide (stride 6: the padding is not read).
  const std::int64_t width = 5, src_stride = 6;
  const std::vector<std::int64_t> index{2, 0, 2, 1};
  const std::vector<float> scale{0.5f, -2.0f, 1.0f, 0.25f};
  std::vector<float> src(3 * src_stride), other(index.size() * width), dst(other.size()), dot(index.size());
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = 0.1f * static_cast<float>(i) - 0.7f;
  for (std::size_t i = 0; i < other.size(); ++i) other[i] = 0.3f - 0.05f * static_cast<float>(i);
  kernels::gather_rows_scaled_dot(4, width, index.data(), scale.data(), src.data(), src_stride, other.data(),
                                  dst.data(), width, dot.data());
  for (std::size_t n = 0; n < index.size(); ++n) {
    double want = 0.0;
    for (std::int64_t j = 0; j < width; ++j) {
      const float g = src[static_cast<std::size_t>(index[n] * src_stride + j)];
      EXPECT_EQ(dst[n * width + static_cast<std::size_t>(j)], scale[n] * g) << n << " " << j;
      want += static_cast<double>(g) * other[n * width + static_cast<std::size_t>(j)];
    }
    EXPECT_NEAR(dot[n], want, 1e-6 * (1.0 + std::abs(want))) << n;
  }
}

TEST(KernelPermute, ScatterAddRowsAccumulatesInOrderAndIsThreadCountIndependent) {
  Rng rng(5);
  const std::int64_t count = 300, width = 130, dst_rows = 7, src_stride = 131, dst_stride = 133;
  std::vector<float> src = random_floats(rng, count * src_stride, 1.0), scale = random_floats(rng, count, 1.0);
  std::vector<std::int64_t> index(static_cast<std::size_t>(count));
  for (auto& v : index) v = static_cast<std::int64_t>(rng.next() % dst_rows);
  std::vector<float> init = random_floats(rng, dst_rows * dst_stride, 1.0);

  for (const bool scaled : {true, false}) {
    // Expected: the documented order n = 0, 1, ... in float.
    std::vector<float> want = init;
    for (std::int64_t n = 0; n < count; ++n)
      for (std::int64_t j = 0; j < width; ++j) {
        const float c = scaled ? scale[static_cast<std::size_t>(n)] : 1.0f;
        want[static_cast<std::size_t>(index[static_cast<std::size_t>(n)] * dst_stride + j)] += c * src[static_cast<std::size_t>(n * src_stride + j)];
      }
    for (const int threads : {1, 3}) {
      set_parallel_threads(threads);
      std::vector<float> got = init;
      kernels::scatter_add_rows(count, width, index.data(), scaled ? scale.data() : nullptr, src.data(), src_stride,
                                got.data(), dst_stride);
      EXPECT_EQ(got, want) << "scaled=" << scaled << " threads=" << threads;
    }
    set_parallel_threads(1);
  }
}

// ---------------------------------------------------------------------------------------------------
// ExpertPlacement

TEST(Placement, ContiguousEvenSplit) {
  const auto p = sched::ExpertPlacement::contiguous(8, 4);
  EXPECT_EQ(p.num_experts(), 8);
  EXPECT_EQ(p.world_size(), 4);
  for (std::int64_t e = 0; e < 8; ++e) {
    EXPECT_EQ(p.owner(e), e / 2);
    EXPECT_EQ(p.local_slot(e), e % 2);
  }
}

TEST(Placement, ContiguousUnevenGivesTheFirstRanksOneMore) {
  const auto p = sched::ExpertPlacement::contiguous(5, 3);
  EXPECT_EQ(p.num_local(0), 2);
  EXPECT_EQ(p.num_local(1), 2);
  EXPECT_EQ(p.num_local(2), 1);
  const std::vector<std::vector<std::int64_t>> want = {{0, 1}, {2, 3}, {4}};
  for (int r = 0; r < 3; ++r) {
    const auto got = p.experts_of(r);
    EXPECT_EQ(std::vector<std::int64_t>(got.begin(), got.end()), want[static_cast<std::size_t>(r)]) << "rank " << r;
    for (std::size_t s = 0; s < got.size(); ++s) {
      EXPECT_EQ(p.owner(got[s]), r);
      EXPECT_EQ(p.local_slot(got[s]), static_cast<std::int32_t>(s));
    }
  }
}

TEST(Placement, FewerExpertsThanRanksLeavesTheLastRanksEmpty) {
  const auto p = sched::ExpertPlacement::contiguous(2, 4);
  EXPECT_EQ(p.num_local(0), 1);
  EXPECT_EQ(p.num_local(1), 1);
  EXPECT_EQ(p.num_local(2), 0);
  EXPECT_EQ(p.num_local(3), 0);
  EXPECT_EQ(p.owner(0), 0);
  EXPECT_EQ(p.owner(1), 1);
  EXPECT_EQ(p.local_slot(0), 0);
  EXPECT_EQ(p.local_slot(1), 0);
  EXPECT_TRUE(p.experts_of(3).empty());
}

TEST(Placement, RejectsEmptyShapes) {
  EXPECT_THROW(sched::ExpertPlacement::contiguous(0, 2), InvalidArgument);
  EXPECT_THROW(sched::ExpertPlacement::contiguous(4, 0), InvalidArgument);
}

}  // namespace
}  // namespace moex

// The OpenBLAS kernel family moex re-runs with: only a later generation of a listed family, so an
// unknown CPU model's fallback (Prescott) is replaced, Zen's AVX2 kernels (Haswell's) are kept on an
// AVX2 CPU, and names of other architectures are left alone.
TEST(BlasKernels, ReplacesOnlyOlderKnownFamilies) {
  using moex::blas::core_generation;
  using moex::blas::faster_core;
  EXPECT_EQ(core_generation("Prescott"), 0);
  EXPECT_EQ(core_generation("SANDYBRIDGE"), 1);
  EXPECT_EQ(core_generation("zen"), core_generation("Haswell"));
  EXPECT_LT(core_generation("Haswell"), core_generation("SkylakeX"));
  EXPECT_LT(core_generation("SkylakeX"), core_generation("Cooperlake"));
  EXPECT_EQ(core_generation("NeoverseN1"), -1);
  EXPECT_EQ(core_generation(""), -1);
  EXPECT_EQ(faster_core("Prescott", "SkylakeX"), "SkylakeX");  // a model newer than the library
  EXPECT_EQ(faster_core("Haswell", "Cooperlake"), "Cooperlake");  // a preset older family
  EXPECT_EQ(faster_core("Zen", "Haswell"), "");        // the same kernels
  EXPECT_EQ(faster_core("SkylakeX", "SkylakeX"), "");
  EXPECT_EQ(faster_core("Cooperlake", "SkylakeX"), "");  // never older
  EXPECT_EQ(faster_core("Prescott", ""), "");           // no AVX2: nothing better known
  EXPECT_EQ(faster_core("ARMV8", "Haswell"), "");        // another architecture's name
}
