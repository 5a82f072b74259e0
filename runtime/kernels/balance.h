// Auxiliary load-balance losses of the router, forward and backward (CPU).
//
// Inputs are the router's outputs: `scores` [T,E], the probabilities gate_forward writes (softmax or
// sigmoid of the logits, no bias), and `topk_ids` [T,K], the experts each token was sent to. Write
// c_i(S) = #{t in S : i in topk(t)} for a set S of tokens (a token counts once per expert).
//
// Expert-level balance loss (DeepSeekMoE, eq. 12-14), over all T tokens:
//   f_i   = E / (K * T) * c_i(all tokens)
//   P_i   = (1/T) * sum_t s_{i,t}                       (the raw scores)
//   L_exp = expert_alpha * sum_i f_i * P_i
//
// Sequence-wise balance loss (DeepSeek-V3, eq. 17-20): the tokens are split into consecutive
// sequences of seq_len tokens (the last one may be shorter; seq_len = 0 means one sequence of all T).
// In a sequence S of Ts tokens:
//   s'_{i,t} = s_{i,t} / sum_j s_{j,t}                  (normalised over all E experts; the sum gets
//                                                        + 1e-20 as in DeepSeek-V3's code, so an
//                                                        all-zero row cannot divide by zero)
//   f_i      = E / (K * Ts) * c_i(S)
//   P_i      = (1/Ts) * sum_{t in S} s'_{i,t}
//   L_seq(S) = seq_alpha * sum_i f_i * P_i
// and the loss is the MEAN of L_seq(S) over the sequences.
//
// f is a count and carries no gradient: gradients flow only through P into the scores. With T = 0
// both losses are 0 and the backward adds nothing. Sums are taken in double.
#pragma once

#include <cstdint>

namespace moex::kernels {

struct BalanceLossParams {
  std::int64_t tokens = 0, experts = 0, topk = 1;
  std::int64_t seq_len = 0;   // sequence length for the sequence-wise loss; 0 = all tokens are one sequence
  float seq_alpha = 0.0f;     // coefficient of the sequence-wise balance loss (DeepSeek-V3)
  float expert_alpha = 0.0f;  // coefficient of the expert-level balance loss (DeepSeekMoE)
};

struct BalanceLossValue {
  double seq = 0.0, expert = 0.0;
  double total() const { return seq + expert; }
};

/// The shape checks of both functions (also the device versions'): InvalidArgument, its message
/// starting with `what`, unless tokens >= 0 and, with tokens > 0, experts >= 1, 1 <= topk <= experts
/// and seq_len >= 0.
void check_balance_params(const BalanceLossParams& p, const char* what);

/// Both losses (see above). scores: [T,E]; topk_ids: [T,K] with ids in [0, E).
/// Throws InvalidArgument on bad shapes (tokens < 0, experts < 1, topk not in [1, E], seq_len < 0)
/// or an id out of range. With tokens = 0 the pointers are not read.
BalanceLossValue balance_loss_forward(const BalanceLossParams& p, const float* scores, const std::int32_t* topk_ids);

/// Adds d_loss * d(L_seq + L_exp)/d(scores) into d_scores [T,E] (accumulates; every expert of every
/// token gets an entry). d_loss is the upstream gradient of the total loss. Pass d_scores to
/// gate_backward as `d_scores_extra` to carry it to the logits, the gate weight and x:
///   d L_exp / d s_{i,t} = expert_alpha * f_i / T
///   d L_seq / d s_{j,t} = (g_j - sum_i g_i s'_{i,t}) / sum_i s_{i,t},  g_i = seq_alpha * f_i / (Ts * n_seq)
/// Same checks as the forward.
void balance_loss_backward(const BalanceLossParams& p, const float* scores, const std::int32_t* topk_ids, float d_loss,
                           float* d_scores);

}  // namespace moex::kernels
