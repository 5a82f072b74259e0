// CPU gate kernel.
#include "runtime/kernels/gate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "base/error.h"
#include "runtime/blas.h"
#include "runtime/kernels/math.h"

namespace moex::kernels {
namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

/// Index of the largest value among `n` (ties: lowest index), skipping entries already taken.
std::int64_t argmax_untaken(const float* v, const std::uint8_t* taken, std::int64_t n) {
  std::int64_t best = -1;
  for (std::int64_t i = 0; i < n; ++i) {
    if (taken[i]) continue;
    if (best < 0 || v[i] > v[best]) best = i;
  }
  return best;
}
}  // namespace

GateParams GateParams::from_config(const MoeConfig& c, std::int64_t tokens) {
  GateParams p;
  p.tokens = tokens;
  p.hidden = c.hidden_size;
  p.experts = c.n_routed_experts;
  p.topk = c.num_experts_per_tok;
  p.n_group = c.n_group;
  p.topk_group = c.topk_group;
  p.scoring = c.scoring_func;
  p.method = c.topk_method;
  // The Hugging Face code of each model_type: every one normalises the picked weights only when
  // top_k > 1 and norm_topk_prob; deepseek_v3 then always multiplies by routed_scaling_factor,
  // deepseek_v2 and deepseek multiply by it only when they did not normalise (never both).
  p.norm_topk_prob = c.norm_topk_prob && c.num_experts_per_tok > 1;
  const bool scale = c.model_type == "deepseek_v3" || !p.norm_topk_prob;
  p.routed_scaling_factor = scale ? static_cast<float>(c.routed_scaling_factor) : 1.0f;
  return p;
}

void gate_forward(const GateParams& p, const float* x, const float* wg, const float* bias,
                  float* scores, std::int32_t* topk_ids, float* topk_weights) {
  const std::int64_t E = p.experts, K = p.topk;
  blas::sgemm(false, true, p.tokens, E, p.hidden, 1.0f, x, p.hidden, wg, p.hidden, 0.0f, scores, E);
  const bool grouped = p.method != TopkMethod::kGreedy && p.n_group > 1;
  const std::int64_t per_group = E / p.n_group;
  std::vector<float> choice(static_cast<std::size_t>(E));
  std::vector<float> group_score(static_cast<std::size_t>(p.n_group));
  std::vector<std::uint8_t> taken(static_cast<std::size_t>(std::max(E, p.n_group)));
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    float* s = scores + t * E;
    if (p.scoring == ScoringFunc::kSoftmax) {
      float mx = s[0];
      for (std::int64_t e = 1; e < E; ++e) mx = std::max(mx, s[e]);
      float sum = 0.0f;
      for (std::int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(s[e] - mx));
      const float inv = 1.0f / sum;
      for (std::int64_t e = 0; e < E; ++e) s[e] *= inv;
    } else {
      for (std::int64_t e = 0; e < E; ++e) s[e] = math::sigmoid(s[e]);
    }
    for (std::int64_t e = 0; e < E; ++e) choice[static_cast<std::size_t>(e)] = s[e] + (bias ? bias[e] : 0.0f);
    if (grouped) {
      for (std::int64_t g = 0; g < p.n_group; ++g) {
        const float* c = choice.data() + g * per_group;
        float first = kNegInf, second = kNegInf;
        for (std::int64_t i = 0; i < per_group; ++i) {
          if (c[i] > first) {
            second = first;
            first = c[i];
          } else if (c[i] > second) {
            second = c[i];
          }
        }
        group_score[static_cast<std::size_t>(g)] =
            p.method == TopkMethod::kNoauxTc ? first + second : first;
      }
      std::fill(taken.begin(), taken.end(), 0);
      for (std::int64_t i = 0; i < p.topk_group; ++i) {
        const std::int64_t g = argmax_untaken(group_score.data(), taken.data(), p.n_group);
        MOEX_CHECK_GE(g, 0);
        taken[static_cast<std::size_t>(g)] = 1;
      }
      // `taken` now marks kept groups; experts of the others become ineligible.
      for (std::int64_t g = 0; g < p.n_group; ++g)
        if (!taken[static_cast<std::size_t>(g)])
          std::fill_n(choice.begin() + g * per_group, per_group, kNegInf);
    }
    std::fill(taken.begin(), taken.end(), 0);
    float sum = 0.0f;
    for (std::int64_t j = 0; j < K; ++j) {
      const std::int64_t e = argmax_untaken(choice.data(), taken.data(), E);
      MOEX_CHECK_GE(e, 0);
      taken[static_cast<std::size_t>(e)] = 1;
      topk_ids[t * K + j] = static_cast<std::int32_t>(e);
      topk_weights[t * K + j] = s[e];
      sum += s[e];
    }
    const float scale = p.norm_topk_prob ? p.routed_scaling_factor / (sum + 1e-20f) : p.routed_scaling_factor;
    for (std::int64_t j = 0; j < K; ++j) topk_weights[t * K + j] *= scale;
  }
}

void gate_backward(const GateParams& p, const float* x, const float* wg, const float* scores,
                   const std::int32_t* topk_ids, const float* d_weights, float* dx, float* dwg,
                   float* dlogits, const float* d_scores_extra) {
  const std::int64_t E = p.experts, K = p.topk;
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    const float* s = scores + t * E;
    const std::int32_t* ids = topk_ids + t * K;
    const float* dw = d_weights + t * K;
    float* dl = dlogits + t * E;
    if (d_scores_extra)
      std::copy_n(d_scores_extra + t * E, E, dl);  // every expert's extra d(score)
    else
      std::fill_n(dl, E, 0.0f);
    // d(score of pick j) through the normalisation w_j = c * s_j / (sum_i s_i + eps).
    float sum = 0.0f, dot = 0.0f;
    for (std::int64_t j = 0; j < K; ++j) {
      sum += s[ids[j]];
      dot += dw[j] * s[ids[j]];
    }
    const float c = p.routed_scaling_factor;
    for (std::int64_t j = 0; j < K; ++j) {
      const float ds = p.norm_topk_prob
                           ? c * (dw[j] / (sum + 1e-20f) - dot / ((sum + 1e-20f) * (sum + 1e-20f)))
                           : c * dw[j];
      dl[ids[j]] += ds;  // holds d(score) until converted below
    }
    if (p.scoring == ScoringFunc::kSigmoid) {
      if (d_scores_extra) {
        // Every expert carries a d(score): convert them all.
        for (std::int64_t e = 0; e < E; ++e) dl[e] *= s[e] * (1.0f - s[e]);
      } else {
        for (std::int64_t j = 0; j < K; ++j) {
          const float sj = s[ids[j]];
          dl[ids[j]] *= sj * (1.0f - sj);
        }
      }
    } else {
      // Softmax Jacobian: dlogit_i = s_i * (dscore_i - sum_j dscore_j s_j); every expert gets one.
      // Without d_scores_extra only the picks hold a d(score); with it every expert does.
      float inner = 0.0f;
      if (d_scores_extra)
        for (std::int64_t e = 0; e < E; ++e) inner += dl[e] * s[e];
      else
        for (std::int64_t j = 0; j < K; ++j) inner += dl[ids[j]] * s[ids[j]];
      for (std::int64_t e = 0; e < E; ++e) dl[e] = s[e] * (dl[e] - inner);
    }
  }
  blas::sgemm(true, false, E, p.hidden, p.tokens, 1.0f, dlogits, E, x, p.hidden, 1.0f, dwg, p.hidden);
  blas::sgemm(false, false, p.tokens, p.hidden, E, 1.0f, dlogits, E, wg, p.hidden, 1.0f, dx, p.hidden);
}

}  // namespace moex::kernels
