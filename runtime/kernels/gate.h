// Gate kernel: router scores, selection bias, group limit, top-K and weight normalisation.
#pragma once

#include <cstdint>

#include "runtime/io/moe_config.h"

namespace moex::kernels {

/// Shape and routing rule of one gate call (plain values; no framework types).
struct GateParams {
  std::int64_t tokens = 0;
  std::int64_t hidden = 0;
  std::int64_t experts = 0;
  std::int64_t topk = 1;
  std::int64_t n_group = 1;
  std::int64_t topk_group = 1;
  ScoringFunc scoring = ScoringFunc::kSoftmax;
  TopkMethod method = TopkMethod::kGreedy;
  bool norm_topk_prob = false;         ///< divide the picked weights by their sum (+1e-20)
  float routed_scaling_factor = 1.0f;  ///< then multiply them by this

  /// The rule of the Hugging Face code of c.model_type, resolved into the two fields above:
  /// normalise only when top-K > 1 and norm_topk_prob; deepseek_v3 then always scales by
  /// routed_scaling_factor, deepseek_v2 and deepseek scale only when they did not normalise.
  static GateParams from_config(const MoeConfig& c, std::int64_t tokens);
};

/// Forward, DeepSeek-V3 semantics:
///   scores = softmax or sigmoid of x [T,H] . wg [E,H]^T;
///   selection uses scores + bias (bias may be null); with group_limited_greedy (group score = max)
///   or noaux_tc (group score = sum of the top-2) only the best topk_group groups stay eligible;
///   top-K by selection score, descending, ties to the lower expert id;
///   weights = unbiased scores of the picks, divided by their sum (+1e-20) when norm_topk_prob,
///   times routed_scaling_factor.
/// Writes `scores` [T,E] (kept for backward), `topk_ids` [T,K] and `topk_weights` [T,K].
void gate_forward(const GateParams& p, const float* x, const float* wg, const float* bias,
                  float* scores, std::int32_t* topk_ids, float* topk_weights);

/// Backward: from d_weights [T,K] accumulates dx [T,H] += and dwg [E,H] +=. No gradient reaches the
/// selection (top-K, groups, bias). `dlogits` is scratch of [T,E] floats.
/// `d_scores_extra` [T,E] (may be null) is a further gradient wrt `scores`, e.g. from
/// balance_loss_backward: it is added to the score gradient of EVERY expert (not only the top-K
/// picks) before the sigmoid / softmax Jacobian, so with sigmoid scoring unpicked experts then get
/// dlogit_e = dscore_e * s_e (1 - s_e) and the softmax inner product runs over all E experts. When it
/// is null the result is exactly that of the picks alone.
void gate_backward(const GateParams& p, const float* x, const float* wg, const float* scores,
                   const std::int32_t* topk_ids, const float* d_weights, float* dx, float* dwg,
                   float* dlogits, const float* d_scores_extra = nullptr);

}  // namespace moex::kernels
