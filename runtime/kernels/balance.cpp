// CPU auxiliary load-balance losses.
#include "runtime/kernels/balance.h"

#include <algorithm>
#include <string>
#include <vector>

#include "base/error.h"

namespace moex::kernels {
namespace {

constexpr double kNormEps = 1e-20;  // DeepSeek-V3: scores / (scores.sum(-1) + 1e-20)

/// counts[i] = number of tokens in [begin, end) that picked expert i (each token counts once).
/// `stamp` is scratch of E entries, all < begin on entry.
void count_picks(const BalanceLossParams& p, const std::int32_t* topk_ids, std::int64_t begin, std::int64_t end,
                 std::vector<double>& counts, std::vector<std::int64_t>& stamp) {
  const std::int64_t E = p.experts, K = p.topk;
  std::fill(counts.begin(), counts.end(), 0.0);
  for (std::int64_t t = begin; t < end; ++t) {
    for (std::int64_t j = 0; j < K; ++j) {
      const std::int32_t e = topk_ids[t * K + j];
      if (e < 0 || e >= E)
        throw InvalidArgument("balance loss: topk_ids[" + std::to_string(t) + "][" + std::to_string(j) +
                              "] = " + std::to_string(e) + ", must be in [0, " + std::to_string(E) + ")");
      auto& last = stamp[static_cast<std::size_t>(e)];
      if (last == t) continue;  // the same expert twice in one row counts once
      last = t;
      counts[static_cast<std::size_t>(e)] += 1.0;
    }
  }
}

std::int64_t sequence_length(const BalanceLossParams& p) {
  return p.seq_len == 0 ? p.tokens : std::min(p.seq_len, p.tokens);
}

}  // namespace

void check_balance_params(const BalanceLossParams& p, const char* what) {
  auto bad = [&](const std::string& m) { throw InvalidArgument(std::string(what) + ": " + m); };
  if (p.tokens < 0) bad("tokens = " + std::to_string(p.tokens) + ", must be >= 0");
  if (p.tokens == 0) return;
  if (p.experts < 1) bad("experts = " + std::to_string(p.experts) + ", must be >= 1");
  if (p.topk < 1 || p.topk > p.experts)
    bad("topk = " + std::to_string(p.topk) + ", must be in [1, experts = " + std::to_string(p.experts) + "]");
  if (p.seq_len < 0) bad("seq_len = " + std::to_string(p.seq_len) + ", must be >= 0 (0 = one sequence)");
}

BalanceLossValue balance_loss_forward(const BalanceLossParams& p, const float* scores, const std::int32_t* topk_ids) {
  check_balance_params(p, "balance loss");
  BalanceLossValue v;
  if (p.tokens == 0) return v;
  const std::int64_t T = p.tokens, E = p.experts, K = p.topk;
  std::vector<double> counts(static_cast<std::size_t>(E)), psum(static_cast<std::size_t>(E));
  std::vector<std::int64_t> stamp(static_cast<std::size_t>(E), -1);

  // Expert-level: sum_i f_i P_i = E / (K T^2) * sum_i c_i * sum_t s_{i,t}.
  count_picks(p, topk_ids, 0, T, counts, stamp);
  std::fill(psum.begin(), psum.end(), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t e = 0; e < E; ++e) psum[static_cast<std::size_t>(e)] += scores[t * E + e];
  double acc = 0.0;
  for (std::int64_t e = 0; e < E; ++e) acc += counts[static_cast<std::size_t>(e)] * psum[static_cast<std::size_t>(e)];
  v.expert = static_cast<double>(p.expert_alpha) * static_cast<double>(E) / (static_cast<double>(K) * T * T) * acc;

  // Sequence-wise: mean over sequences of E / (K Ts^2) * sum_i c_i(S) * sum_{t in S} s'_{i,t}.
  const std::int64_t L = sequence_length(p);
  std::fill(stamp.begin(), stamp.end(), -1);
  double seq_total = 0.0;
  std::int64_t n_seq = 0;
  for (std::int64_t b = 0; b < T; b += L, ++n_seq) {
    const std::int64_t end = std::min(b + L, T), Ts = end - b;
    count_picks(p, topk_ids, b, end, counts, stamp);
    std::fill(psum.begin(), psum.end(), 0.0);
    for (std::int64_t t = b; t < end; ++t) {
      const float* s = scores + t * E;
      double z = 0.0;
      for (std::int64_t e = 0; e < E; ++e) z += s[e];
      const double inv = 1.0 / (z + kNormEps);
      for (std::int64_t e = 0; e < E; ++e) psum[static_cast<std::size_t>(e)] += s[e] * inv;
    }
    double a = 0.0;
    for (std::int64_t e = 0; e < E; ++e) a += counts[static_cast<std::size_t>(e)] * psum[static_cast<std::size_t>(e)];
    seq_total += static_cast<double>(E) / (static_cast<double>(K) * Ts * Ts) * a;
  }
  v.seq = static_cast<double>(p.seq_alpha) * seq_total / static_cast<double>(n_seq);
  return v;
}

void balance_loss_backward(const BalanceLossParams& p, const float* scores, const std::int32_t* topk_ids, float d_loss,
                           float* d_scores) {
  check_balance_params(p, "balance loss");
  if (p.tokens == 0) return;
  const std::int64_t T = p.tokens, E = p.experts, K = p.topk;
  const std::int64_t L = sequence_length(p);
  const std::int64_t n_seq = (T + L - 1) / L;
  std::vector<double> counts(static_cast<std::size_t>(E)), g_exp(static_cast<std::size_t>(E)),
      g_seq(static_cast<std::size_t>(E));
  std::vector<std::int64_t> stamp(static_cast<std::size_t>(E), -1);

  // Expert-level: dL/ds_{i,t} = alpha * f_i / T = alpha * E c_i / (K T^2), the same for every token.
  count_picks(p, topk_ids, 0, T, counts, stamp);
  const double c_exp = static_cast<double>(d_loss) * static_cast<double>(p.expert_alpha) * static_cast<double>(E) /
                       (static_cast<double>(K) * T * T);
  for (std::int64_t e = 0; e < E; ++e) g_exp[static_cast<std::size_t>(e)] = c_exp * counts[static_cast<std::size_t>(e)];

  // Sequence-wise: with g_i = dL/ds'_{i,t} = alpha * f_i / (Ts * n_seq) and z_t = sum_j s_{j,t},
  // dL/ds_{j,t} = (g_j - sum_i g_i s'_{i,t}) / z_t.
  std::fill(stamp.begin(), stamp.end(), -1);
  for (std::int64_t b = 0; b < T; b += L) {
    const std::int64_t end = std::min(b + L, T), Ts = end - b;
    count_picks(p, topk_ids, b, end, counts, stamp);
    const double c_seq = static_cast<double>(d_loss) * static_cast<double>(p.seq_alpha) * static_cast<double>(E) /
                         (static_cast<double>(K) * Ts * Ts * static_cast<double>(n_seq));
    for (std::int64_t e = 0; e < E; ++e) g_seq[static_cast<std::size_t>(e)] = c_seq * counts[static_cast<std::size_t>(e)];
    for (std::int64_t t = b; t < end; ++t) {
      const float* s = scores + t * E;
      float* ds = d_scores + t * E;
      double z = 0.0, dot = 0.0;
      for (std::int64_t e = 0; e < E; ++e) {
        z += s[e];
        dot += g_seq[static_cast<std::size_t>(e)] * s[e];
      }
      const double inv = 1.0 / (z + kNormEps);
      const double mean = dot * inv;  // sum_i g_i s'_{i,t}
      for (std::int64_t e = 0; e < E; ++e) {
        const double d = g_exp[static_cast<std::size_t>(e)] + (g_seq[static_cast<std::size_t>(e)] - mean) * inv;
        ds[e] = static_cast<float>(static_cast<double>(ds[e]) + d);
      }
    }
  }
}

}  // namespace moex::kernels
