// MoELayer: one DeepSeekMoE layer, forward and backward, with routed experts sharded across ranks.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "runtime/kernels/balance.h"
#include "runtime/moe_config.h"
#include "scheduler/expert_placement.h"
#include "scheduler/route_plan.h"

namespace moex {

/// Parameters and their gradients in one flat buffer each (what the optimiser and the gradient
/// all-reduce operate on).
struct ParamBlock {
  std::vector<float> value;
  std::vector<float> grad;
  void resize(std::size_t n) {
    value.assign(n, 0.0f);
    grad.assign(n, 0.0f);
  }
};

/// Auxiliary balance losses of the router (off when both coefficients are 0). Each rank's loss is over
/// its own tokens; its gradient joins the gate's in backward().
struct AuxLossOptions {
  std::int64_t seq_len = 0;   ///< tokens per sequence for the sequence-wise loss (0 = all tokens)
  float seq_alpha = 0.0f;     ///< sequence-wise balance loss coefficient (DeepSeek-V3 uses 1e-4)
  float expert_alpha = 0.0f;  ///< expert-level balance loss coefficient (DeepSeekMoE)
  bool enabled() const { return seq_alpha != 0.0f || expert_alpha != 0.0f; }
};

/// What one forward pass routed, for logs and balancing.
struct LayerRouteStats {
  std::vector<std::int64_t> expert_tokens;  ///< [E] picks of this rank's tokens per expert
  std::int64_t rows_sent = 0;               ///< dispatch rows this rank sent (one per token and rank)
  std::int64_t rows_received = 0;           ///< dispatch rows this rank's experts received
  std::int64_t bytes_sent = 0;              ///< payload bytes sent to other ranks, forward
};

/// One MoE layer on this rank:
///   y = shared(x) + sum_{k} w_k(x) * expert_{id_k}(x)
/// The gate and the shared experts are replicated on every rank; the routed experts this rank owns
/// (per `placement`) are stored here. forward() and backward() are collectives over `comm`: every
/// rank calls them in the same order, each with its own tokens (0 allowed).
///
/// Parameter layout: replicated() = [gate.weight E*H | shared w13 2Fs*H | shared w2 H*Fs];
/// experts() = per local slot [w13 2F*H | w2 H*F], where w13 stacks gate_proj over up_proj.
class MoELayer {
 public:
  MoELayer(const MoeConfig& config, comm::Communicator& comm, sched::ExpertPlacement placement,
           std::string name);

  const MoeConfig& config() const { return config_; }
  const sched::ExpertPlacement& placement() const { return placement_; }
  const std::string& name() const { return name_; }
  int rank() const { return comm_.rank(); }
  comm::Communicator& communicator() { return comm_; }
  std::int64_t num_local_experts() const { return placement_.num_local(comm_.rank()); }

  ParamBlock& replicated() { return replicated_; }
  /// This rank's experts (values and gradients; see zero_grad()).
  ParamBlock& experts();
  float* gate_weight() { return replicated_.value.data(); }
  float* shared_w13() { return replicated_.value.data() + shared_w13_offset(); }
  float* shared_w2() { return replicated_.value.data() + shared_w2_offset(); }
  float* expert_w13(std::int64_t slot) { return experts_.value.data() + slot * expert_stride(); }
  float* expert_w2(std::int64_t slot) { return expert_w13(slot) + 2 * ffn_ * hidden_; }
  /// Gradient of the same parameter (same offsets into grad).
  float* grad_of(float* param);
  /// Selection-only bias (e_score_correction_bias): empty = none, else [E]. Gets no gradient.
  std::vector<float>& selection_bias() { return bias_; }
  /// Aux-loss-free balancing (DeepSeek-V3): b_e += speed * sign(mean_load - load_e) for the global
  /// per-expert load `load` [E] (identical on every rank, so the bias stays replicated). Creates a
  /// zero bias first if the layer had none.
  void update_selection_bias(std::span<const std::int64_t> load, float speed);

  void set_aux_loss(const AuxLossOptions& o) { aux_ = o; }
  const AuxLossOptions& aux_loss() const { return aux_; }
  /// The auxiliary balance losses of the last forward (zeros when off).
  const kernels::BalanceLossValue& aux_loss_value() const { return aux_value_; }

  std::int64_t shared_w13_offset() const { return experts_total_ * hidden_; }
  std::int64_t shared_w2_offset() const { return shared_w13_offset() + 2 * shared_ffn_ * hidden_; }
  std::int64_t expert_stride() const { return 3 * ffn_ * hidden_; }

  /// Sets every gradient to zero. Expert gradients are zeroed lazily: the next backward overwrites
  /// them instead of adding (and clears those of experts that received no token), which saves a
  /// pass over the largest buffer of the layer.
  void zero_grad();

  /// y [tokens, H] = layer(x [tokens, H]). Saves what backward needs (x is copied).
  void forward(const float* x, std::int64_t tokens, float* y);
  /// From dy [tokens, H] of the last forward: writes dx [tokens, H] and accumulates every parameter
  /// gradient of this rank (replicated gradients hold this rank's share until reduced).
  void backward(const float* dy, float* dx);
  /// Sums the replicated parameters' gradients across ranks (a collective).
  comm::WorkPtr allreduce_replicated_grads();

  const LayerRouteStats& route_stats() const { return stats_; }
  /// Per-local-expert blocks of the last forward (rows each expert processed).
  const sched::ExpertBatchLayout& expert_layout() const { return layout_; }
  /// Top-K expert ids [tokens, K] and weights of the last forward.
  const std::vector<std::int32_t>& topk_ids() const { return topk_ids_; }
  const std::vector<float>& topk_weights() const { return topk_weights_; }

 private:
  MoeConfig config_;
  comm::Communicator& comm_;
  sched::ExpertPlacement placement_;
  std::string name_;
  std::int64_t hidden_, ffn_, shared_ffn_, experts_total_, topk_;

  ParamBlock replicated_;
  ParamBlock experts_;
  bool expert_grads_stale_ = false;  // zero_grad() happened; experts_.grad not cleared yet
  std::vector<float> bias_;
  AuxLossOptions aux_;
  kernels::BalanceLossValue aux_value_;
  std::vector<float> d_scores_;

  // Saved by forward for backward; reused across steps so no step allocates once warm.
  std::int64_t tokens_ = 0;
  std::vector<float> x_, scores_, topk_weights_;
  std::vector<std::int32_t> topk_ids_;
  sched::RoutePlan plan_;
  sched::ExpertBatchLayout layout_;
  std::vector<std::int64_t> recv_rows_;                 // [world] rows received from each rank
  std::vector<std::int64_t> send_counts_, recv_counts_;  // [world] floats, per exchange
  std::vector<float> send_, recv_;                       // dispatch rows
  std::vector<std::int32_t> recv_slot_;
  std::vector<float> recv_weight_;
  std::vector<float> entry_weight_;                      // [entries] routing weight of each entry
  std::vector<float> xe_, h13_, sig_, a_, ye_;                 // per-expert blocks
  std::vector<float> shared_h13_, shared_sig_, shared_a_;
  std::vector<float> out_rows_, back_;                   // combine buffers
  // Backward scratch.
  std::vector<float> dye_, dxe_, dh13_, dpick_, d_weights_, dlogits_;
  LayerRouteStats stats_;

  kernels::BalanceLossParams aux_params(std::int64_t tokens) const;
  void set_counts(std::span<const std::int64_t> send_rows, std::span<const std::int64_t> recv_rows,
                  std::int64_t send_width, std::int64_t recv_width);
  comm::WorkPtr exchange(const float* send, float* recv, const char* what);
};

}  // namespace moex
