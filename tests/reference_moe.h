// Float64 single-process reference of a DeepSeekMoE layer and its analytic backward, to test against.
// Deliberately naive: per-token loops, weights in the Hugging Face layout (one matrix per projection),
// no BLAS and nothing shared with the moex implementation beyond the config enums.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "runtime/io/moe_config.h"

namespace moex::ref {

using Vec = std::vector<double>;

/// The routing rule of a gate.
struct GateSpec {
  std::int64_t experts = 1;
  std::int64_t topk = 1;
  std::int64_t n_group = 1;
  std::int64_t topk_group = 1;
  ScoringFunc scoring = ScoringFunc::kSoftmax;
  TopkMethod method = TopkMethod::kGreedy;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;

  static GateSpec of(const MoeConfig& c) {
    GateSpec g;
    g.experts = c.n_routed_experts;
    g.topk = c.num_experts_per_tok;
    g.n_group = c.n_group;
    g.topk_group = c.topk_group;
    g.scoring = c.scoring_func;
    g.method = c.topk_method;
    // As the Hugging Face modeling code of each model_type reads:
    //   if top_k > 1 and norm_topk_prob: w /= sum(w) + 1e-20
    //   deepseek_v3: w *= routed_scaling_factor (always); deepseek_v2 / deepseek: only in the else branch.
    const bool normalise = c.num_experts_per_tok > 1 && c.norm_topk_prob;
    g.norm_topk_prob = normalise;
    g.routed_scaling_factor = (c.model_type == "deepseek_v3" || !normalise) ? c.routed_scaling_factor : 1.0;
    return g;
  }
};

/// One SwiGLU MLP in the Hugging Face layout: gate_proj [width, hidden], up_proj [width, hidden],
/// down_proj [hidden, width]. Also used for its gradients (same shapes).
struct Mlp {
  std::int64_t hidden = 0;
  std::int64_t width = 0;
  Vec gate_proj, up_proj, down_proj;

  Mlp() = default;
  Mlp(std::int64_t h, std::int64_t w)
      : hidden(h),
        width(w),
        gate_proj(static_cast<std::size_t>(w * h), 0.0),
        up_proj(static_cast<std::size_t>(w * h), 0.0),
        down_proj(static_cast<std::size_t>(h * w), 0.0) {}
};

/// All weights of one layer. `bias` is the selection-only correction bias ([E] or empty).
struct LayerWeights {
  std::int64_t hidden = 0;
  Vec gate;  // [E, hidden]
  Vec bias;
  std::vector<Mlp> experts;
  Mlp shared;  // width 0 when there are no shared experts
};

struct GateOutput {
  std::vector<std::int32_t> ids;  // [T, K], by selection score descending
  Vec weights;                    // [T, K]
  Vec scores;                     // [T, E], unbiased
  /// [T] smallest gap between selection (or group) scores at any discrete decision the token's
  /// result depends on: consecutive picks, the K-th vs the (K+1)-th eligible expert, the last kept vs
  /// the first dropped group. +inf when there is no such decision.
  Vec margin;
};

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
inline double silu(double z) { return z * sigmoid(z); }
inline double silu_derivative(double z) {
  const double s = sigmoid(z);
  return s + z * s * (1.0 - s);
}

/// Gate forward for `tokens` rows of x [T, hidden].
inline GateOutput gate_forward(const GateSpec& g, const Vec& x, std::int64_t tokens, std::int64_t hidden,
                               const Vec& wg, const Vec& bias) {
  const std::int64_t E = g.experts, K = g.topk;
  const double inf = std::numeric_limits<double>::infinity();
  GateOutput out;
  out.ids.assign(static_cast<std::size_t>(tokens * K), -1);
  out.weights.assign(static_cast<std::size_t>(tokens * K), 0.0);
  out.scores.assign(static_cast<std::size_t>(tokens * E), 0.0);
  out.margin.assign(static_cast<std::size_t>(tokens), inf);
  for (std::int64_t t = 0; t < tokens; ++t) {
    Vec logit(static_cast<std::size_t>(E), 0.0);
    for (std::int64_t e = 0; e < E; ++e) {
      double acc = 0.0;
      for (std::int64_t h = 0; h < hidden; ++h) acc += x[static_cast<std::size_t>(t * hidden + h)] * wg[static_cast<std::size_t>(e * hidden + h)];
      logit[static_cast<std::size_t>(e)] = acc;
    }
    double* score = out.scores.data() + t * E;
    if (g.scoring == ScoringFunc::kSoftmax) {
      const double top = *std::max_element(logit.begin(), logit.end());
      double z = 0.0;
      for (std::int64_t e = 0; e < E; ++e) z += std::exp(logit[static_cast<std::size_t>(e)] - top);
      for (std::int64_t e = 0; e < E; ++e) score[e] = std::exp(logit[static_cast<std::size_t>(e)] - top) / z;
    } else {
      for (std::int64_t e = 0; e < E; ++e) score[e] = sigmoid(logit[static_cast<std::size_t>(e)]);
    }
    Vec sel(static_cast<std::size_t>(E));
    for (std::int64_t e = 0; e < E; ++e) sel[static_cast<std::size_t>(e)] = score[e] + (bias.empty() ? 0.0 : bias[static_cast<std::size_t>(e)]);

    double margin = inf;
    std::vector<bool> eligible(static_cast<std::size_t>(E), true);
    if (g.method != TopkMethod::kGreedy && g.n_group > 1) {
      const std::int64_t per = E / g.n_group;
      Vec group_score(static_cast<std::size_t>(g.n_group));
      for (std::int64_t grp = 0; grp < g.n_group; ++grp) {
        Vec members(sel.begin() + grp * per, sel.begin() + (grp + 1) * per);
        std::sort(members.begin(), members.end(), [](double a, double b) { return a > b; });
        group_score[static_cast<std::size_t>(grp)] =
            g.method == TopkMethod::kNoauxTc ? members[0] + members[1] : members[0];
      }
      std::vector<std::int64_t> order(static_cast<std::size_t>(g.n_group));
      std::iota(order.begin(), order.end(), 0);
      // stable_sort keeps equal scores in index order: ties go to the lower group.
      std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
        return group_score[static_cast<std::size_t>(a)] > group_score[static_cast<std::size_t>(b)];
      });
      if (g.topk_group < g.n_group)
        margin = std::min(margin, group_score[static_cast<std::size_t>(order[static_cast<std::size_t>(g.topk_group - 1)])] -
                                      group_score[static_cast<std::size_t>(order[static_cast<std::size_t>(g.topk_group)])]);
      for (std::int64_t i = g.topk_group; i < g.n_group; ++i)
        for (std::int64_t e = 0; e < per; ++e) eligible[static_cast<std::size_t>(order[static_cast<std::size_t>(i)] * per + e)] = false;
    }
    std::vector<std::int64_t> cand;
    for (std::int64_t e = 0; e < E; ++e)
      if (eligible[static_cast<std::size_t>(e)]) cand.push_back(e);
    std::stable_sort(cand.begin(), cand.end(), [&](std::int64_t a, std::int64_t b) {
      return sel[static_cast<std::size_t>(a)] > sel[static_cast<std::size_t>(b)];
    });
    const std::int64_t last = std::min<std::int64_t>(K, static_cast<std::int64_t>(cand.size()) - 1);
    for (std::int64_t j = 0; j < last; ++j)
      margin = std::min(margin, sel[static_cast<std::size_t>(cand[static_cast<std::size_t>(j)])] -
                                    sel[static_cast<std::size_t>(cand[static_cast<std::size_t>(j + 1)])]);
    out.margin[static_cast<std::size_t>(t)] = margin;

    double total = 0.0;
    for (std::int64_t j = 0; j < K; ++j) {
      const std::int64_t e = cand[static_cast<std::size_t>(j)];
      out.ids[static_cast<std::size_t>(t * K + j)] = static_cast<std::int32_t>(e);
      total += score[e];
    }
    for (std::int64_t j = 0; j < K; ++j) {
      double w = score[out.ids[static_cast<std::size_t>(t * K + j)]];
      if (g.norm_topk_prob) w /= total + 1e-20;
      out.weights[static_cast<std::size_t>(t * K + j)] = w * g.routed_scaling_factor;
    }
  }
  return out;
}

struct GateGrads {
  Vec dx;   // [T, hidden]
  Vec dwg;  // [E, hidden]
};

/// Gradients of sum(d_weights * weights) given the forward result; the picks are held fixed.
inline GateGrads gate_backward(const GateSpec& g, const Vec& x, std::int64_t tokens, std::int64_t hidden,
                               const Vec& wg, const GateOutput& fwd, const Vec& d_weights) {
  const std::int64_t E = g.experts, K = g.topk;
  GateGrads out;
  out.dx.assign(static_cast<std::size_t>(tokens * hidden), 0.0);
  out.dwg.assign(static_cast<std::size_t>(E * hidden), 0.0);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const double* score = fwd.scores.data() + t * E;
    const std::int32_t* ids = fwd.ids.data() + t * K;
    const double* dw = d_weights.data() + t * K;
    // d loss / d score_e (nonzero only at the picks).
    Vec dscore(static_cast<std::size_t>(E), 0.0);
    if (g.norm_topk_prob) {
      // w_j = c p_j / D with D = sum_i p_i + eps, so dL/dp_i = c (dw_i / D - sum_j dw_j p_j / D^2).
      double denom = 1e-20, weighted = 0.0;
      for (std::int64_t j = 0; j < K; ++j) denom += score[ids[j]];
      for (std::int64_t j = 0; j < K; ++j) weighted += dw[j] * score[ids[j]];
      for (std::int64_t j = 0; j < K; ++j)
        dscore[static_cast<std::size_t>(ids[j])] =
            g.routed_scaling_factor * (dw[j] / denom - weighted / (denom * denom));
    } else {
      for (std::int64_t j = 0; j < K; ++j) dscore[static_cast<std::size_t>(ids[j])] = g.routed_scaling_factor * dw[j];
    }
    Vec dlogit(static_cast<std::size_t>(E), 0.0);
    if (g.scoring == ScoringFunc::kSoftmax) {
      // d score_i / d logit_e = score_i (delta_ie - score_e).
      for (std::int64_t e = 0; e < E; ++e) {
        double acc = 0.0;
        for (std::int64_t i = 0; i < E; ++i)
          acc += dscore[static_cast<std::size_t>(i)] * score[i] * ((i == e ? 1.0 : 0.0) - score[e]);
        dlogit[static_cast<std::size_t>(e)] = acc;
      }
    } else {
      for (std::int64_t e = 0; e < E; ++e)
        dlogit[static_cast<std::size_t>(e)] = dscore[static_cast<std::size_t>(e)] * score[e] * (1.0 - score[e]);
    }
    for (std::int64_t e = 0; e < E; ++e) {
      const double d = dlogit[static_cast<std::size_t>(e)];
      for (std::int64_t h = 0; h < hidden; ++h) {
        out.dwg[static_cast<std::size_t>(e * hidden + h)] += d * x[static_cast<std::size_t>(t * hidden + h)];
        out.dx[static_cast<std::size_t>(t * hidden + h)] += d * wg[static_cast<std::size_t>(e * hidden + h)];
      }
    }
  }
  return out;
}

/// One row through a SwiGLU MLP: out [hidden] = down(silu(gate x) * (up x)).
inline Vec mlp_forward(const Mlp& m, const double* x) {
  Vec out(static_cast<std::size_t>(m.hidden), 0.0);
  for (std::int64_t f = 0; f < m.width; ++f) {
    double hg = 0.0, hu = 0.0;
    for (std::int64_t h = 0; h < m.hidden; ++h) {
      hg += m.gate_proj[static_cast<std::size_t>(f * m.hidden + h)] * x[h];
      hu += m.up_proj[static_cast<std::size_t>(f * m.hidden + h)] * x[h];
    }
    const double act = silu(hg) * hu;
    for (std::int64_t h = 0; h < m.hidden; ++h) out[static_cast<std::size_t>(h)] += m.down_proj[static_cast<std::size_t>(h * m.width + f)] * act;
  }
  return out;
}

/// Backward of one row through `m` for upstream gradient dy [hidden]: adds into `grad` and dx [hidden].
inline void mlp_backward(const Mlp& m, const double* x, const double* dy, Mlp& grad, double* dx) {
  for (std::int64_t f = 0; f < m.width; ++f) {
    double hg = 0.0, hu = 0.0;
    for (std::int64_t h = 0; h < m.hidden; ++h) {
      hg += m.gate_proj[static_cast<std::size_t>(f * m.hidden + h)] * x[h];
      hu += m.up_proj[static_cast<std::size_t>(f * m.hidden + h)] * x[h];
    }
    const double act = silu(hg) * hu;
    double dact = 0.0;
    for (std::int64_t h = 0; h < m.hidden; ++h) {
      dact += m.down_proj[static_cast<std::size_t>(h * m.width + f)] * dy[h];
      grad.down_proj[static_cast<std::size_t>(h * m.width + f)] += dy[h] * act;
    }
    const double dhg = dact * hu * silu_derivative(hg);
    const double dhu = dact * silu(hg);
    for (std::int64_t h = 0; h < m.hidden; ++h) {
      grad.gate_proj[static_cast<std::size_t>(f * m.hidden + h)] += dhg * x[h];
      grad.up_proj[static_cast<std::size_t>(f * m.hidden + h)] += dhu * x[h];
      dx[h] += dhg * m.gate_proj[static_cast<std::size_t>(f * m.hidden + h)] + dhu * m.up_proj[static_cast<std::size_t>(f * m.hidden + h)];
    }
  }
}

struct LayerOutput {
  GateOutput gate;
  Vec y;  // [T, hidden]
};

/// y = shared(x) + sum_k w_k expert_{id_k}(x). `keep` [T*K] (may be null): only picks with
/// keep != 0 contribute (capacity-factor drops).
inline LayerOutput layer_forward(const GateSpec& g, const LayerWeights& w, const Vec& x, std::int64_t tokens,
                                 const std::vector<std::uint8_t>* keep = nullptr) {
  const std::int64_t H = w.hidden, K = g.topk;
  LayerOutput out;
  out.gate = gate_forward(g, x, tokens, H, w.gate, w.bias);
  out.y.assign(static_cast<std::size_t>(tokens * H), 0.0);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const double* xt = x.data() + t * H;
    double* yt = out.y.data() + t * H;
    if (w.shared.width > 0) {
      const Vec s = mlp_forward(w.shared, xt);
      for (std::int64_t h = 0; h < H; ++h) yt[h] += s[static_cast<std::size_t>(h)];
    }
    for (std::int64_t j = 0; j < K; ++j) {
      if (keep != nullptr && !(*keep)[static_cast<std::size_t>(t * K + j)]) continue;
      const std::int32_t e = out.gate.ids[static_cast<std::size_t>(t * K + j)];
      const double wt = out.gate.weights[static_cast<std::size_t>(t * K + j)];
      const Vec ye = mlp_forward(w.experts[static_cast<std::size_t>(e)], xt);
      for (std::int64_t h = 0; h < H; ++h) yt[h] += wt * ye[static_cast<std::size_t>(h)];
    }
  }
  return out;
}

struct LayerGrads {
  Vec dx;     // [T, hidden]
  Vec dgate;  // [E, hidden]
  std::vector<Mlp> experts;
  Mlp shared;
};

/// Gradients of sum(dy * y): routed experts see w_k dy; each pick's weight gets dy . expert output,
/// which flows into the gate (selection itself is not differentiated). Dropped picks (keep == 0)
/// get nothing.
inline LayerGrads layer_backward(const GateSpec& g, const LayerWeights& w, const Vec& x, std::int64_t tokens,
                                 const Vec& dy, const std::vector<std::uint8_t>* keep = nullptr) {
  const std::int64_t H = w.hidden, K = g.topk;
  const LayerOutput fwd = layer_forward(g, w, x, tokens, keep);
  LayerGrads out;
  out.dx.assign(static_cast<std::size_t>(tokens * H), 0.0);
  for (const Mlp& e : w.experts) out.experts.emplace_back(e.hidden, e.width);
  out.shared = Mlp(w.shared.hidden, w.shared.width);
  Vec d_weights(static_cast<std::size_t>(tokens * K), 0.0);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const double* xt = x.data() + t * H;
    const double* dyt = dy.data() + t * H;
    double* dxt = out.dx.data() + t * H;
    if (w.shared.width > 0) mlp_backward(w.shared, xt, dyt, out.shared, dxt);
    for (std::int64_t j = 0; j < K; ++j) {
      if (keep != nullptr && !(*keep)[static_cast<std::size_t>(t * K + j)]) continue;
      const auto e = static_cast<std::size_t>(fwd.gate.ids[static_cast<std::size_t>(t * K + j)]);
      const double wt = fwd.gate.weights[static_cast<std::size_t>(t * K + j)];
      const Vec ye = mlp_forward(w.experts[e], xt);
      Vec scaled(static_cast<std::size_t>(H));
      double dot = 0.0;
      for (std::int64_t h = 0; h < H; ++h) {
        scaled[static_cast<std::size_t>(h)] = wt * dyt[h];
        dot += dyt[h] * ye[static_cast<std::size_t>(h)];
      }
      d_weights[static_cast<std::size_t>(t * K + j)] = dot;
      mlp_backward(w.experts[e], xt, scaled.data(), out.experts[e], dxt);
    }
  }
  const GateGrads gg = gate_backward(g, x, tokens, H, w.gate, fwd.gate, d_weights);
  out.dgate = gg.dwg;
  for (std::size_t i = 0; i < out.dx.size(); ++i) out.dx[i] += gg.dx[i];
  return out;
}

/// Central difference of `loss` in `param` with step `step` (param is restored).
template <typename Loss>
double central_difference(Loss&& loss, double& param, double step) {
  const double saved = param;
  param = saved + step;
  const double up = loss();
  param = saved - step;
  const double down = loss();
  param = saved;
  return (up - down) / (2.0 * step);
}

}  // namespace moex::ref
