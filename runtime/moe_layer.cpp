// MoELayer forward and backward: gate, route, dispatch, experts, combine, shared experts.
#include "runtime/moe_layer.h"

#include <algorithm>
#include <cstring>

#include "base/error.h"
#include "runtime/kernels/expert_ffn.h"
#include "runtime/kernels/gate.h"
#include "runtime/kernels/permute.h"
#include "runtime/parallel.h"

namespace moex {
namespace {
template <typename T>
void grow(std::vector<T>& v, std::int64_t n) {
  // resize() never shrinks capacity, so buffers stop allocating once they reach a step's size.
  v.resize(static_cast<std::size_t>(n));
}
}  // namespace

MoELayer::MoELayer(const MoeConfig& config, comm::Communicator& comm,
                   sched::ExpertPlacement placement, std::string name)
    : config_(config),
      comm_(comm),
      placement_(std::move(placement)),
      name_(std::move(name)),
      hidden_(config.hidden_size),
      ffn_(config.moe_intermediate_size),
      shared_ffn_(config.shared_intermediate_size()),
      experts_total_(config.n_routed_experts),
      topk_(config.num_experts_per_tok) {
  config_.validate();
  if (placement_.num_experts() != experts_total_)
    throw InvalidArgument(name_ + ": placement covers " + std::to_string(placement_.num_experts()) +
                          " experts but n_routed_experts = " + std::to_string(experts_total_));
  if (placement_.world_size() != comm_.size())
    throw InvalidArgument(name_ + ": placement is for " + std::to_string(placement_.world_size()) +
                          " ranks but the communicator has " + std::to_string(comm_.size()));
  replicated_.resize(static_cast<std::size_t>(shared_w2_offset() + hidden_ * shared_ffn_));
  experts_.resize(static_cast<std::size_t>(num_local_experts() * expert_stride()));
  recv_rows_.assign(static_cast<std::size_t>(comm_.size()), 0);
  send_counts_.assign(static_cast<std::size_t>(comm_.size()), 0);
  recv_counts_.assign(static_cast<std::size_t>(comm_.size()), 0);
}

ParamBlock& MoELayer::experts() {
  if (expert_grads_stale_) {
    // Gradients are read before a backward overwrote them: clear them now.
    std::fill(experts_.grad.begin(), experts_.grad.end(), 0.0f);
    expert_grads_stale_ = false;
  }
  return experts_;
}

float* MoELayer::grad_of(float* param) {
  const float* rv = replicated_.value.data();
  if (param >= rv && param < rv + replicated_.value.size()) return replicated_.grad.data() + (param - rv);
  const float* ev = experts_.value.data();
  if (param >= ev && param < ev + experts_.value.size()) return experts().grad.data() + (param - ev);
  throw InvalidArgument(name_ + ": grad_of() was given a pointer outside this layer's parameters");
}

void MoELayer::zero_grad() {
  std::fill(replicated_.grad.begin(), replicated_.grad.end(), 0.0f);
  expert_grads_stale_ = true;
}

void MoELayer::set_counts(std::span<const std::int64_t> send_rows,
                          std::span<const std::int64_t> recv_rows, std::int64_t send_width,
                          std::int64_t recv_width) {
  for (std::size_t p = 0; p < send_counts_.size(); ++p) {
    send_counts_[p] = send_rows[p] * send_width;
    recv_counts_[p] = recv_rows[p] * recv_width;
  }
}

comm::WorkPtr MoELayer::exchange(const float* send, float* recv, const char* what) {
  comm::AlltoallvArgs args;
  args.send = send;
  args.send_counts = send_counts_;
  args.recv = recv;
  args.recv_counts = recv_counts_;
  args.type = comm::DataType::kFloat32;
  args.label = std::string(what) + " " + name_;
  return comm_.alltoallv(args);
}

void MoELayer::forward(const float* x, std::int64_t tokens, float* y) {
  if (tokens < 0) throw InvalidArgument(name_ + ": tokens = " + std::to_string(tokens) + " must be >= 0");
  const std::int64_t H = hidden_, K = topk_, E = experts_total_;
  tokens_ = tokens;
  grow(x_, tokens * H);
  if (tokens > 0) std::memcpy(x_.data(), x, sizeof(float) * static_cast<std::size_t>(tokens * H));

  // 1. gate
  const auto gp = kernels::GateParams::from_config(config_, tokens);
  grow(scores_, tokens * E);
  grow(topk_ids_, tokens * K);
  grow(topk_weights_, tokens * K);
  kernels::gate_forward(gp, x_.data(), gate_weight(), bias_.empty() ? nullptr : bias_.data(),
                        scores_.data(), topk_ids_.data(), topk_weights_.data());
  stats_.expert_tokens.assign(static_cast<std::size_t>(E), 0);
  for (std::int64_t i = 0; i < tokens * K; ++i) ++stats_.expert_tokens[static_cast<std::size_t>(topk_ids_[static_cast<std::size_t>(i)])];
  aux_value_ = {};
  if (aux_.enabled()) aux_value_ = kernels::balance_loss_forward(aux_params(tokens), scores_.data(), topk_ids_.data());

  // 2. route: one row per (token, destination rank); row counts travel first.
  plan_.build(topk_ids_, tokens, K, placement_);
  comm_.alltoall(plan_.rows_per_rank.data(), recv_rows_.data(), 1, comm::DataType::kInt64,
                 "dispatch counts " + name_)->wait();
  std::int64_t received = 0;
  for (auto r : recv_rows_) received += r;
  const std::int64_t rows = plan_.num_rows();
  const std::int64_t stride = kernels::dispatch_row_stride(H, K);

  // 3. permute into the send layout, 4. dispatch; the shared experts run while it is in flight.
  grow(send_, rows * stride);
  kernels::pack_dispatch(rows, H, K, plan_.row_token.data(), plan_.row_slot.data(), plan_.row_k.data(),
                         x_.data(), topk_weights_.data(), send_.data());
  grow(recv_, received * stride);
  set_counts(plan_.rows_per_rank, recv_rows_, stride, stride);
  auto dispatch = exchange(send_.data(), recv_.data(), "dispatch");
  if (shared_ffn_ > 0) {
    grow(shared_h13_, tokens * 2 * shared_ffn_);
    grow(shared_sig_, tokens * shared_ffn_);
    grow(shared_a_, tokens * shared_ffn_);
    kernels::swiglu_ffn_forward({tokens, H, shared_ffn_}, x_.data(), shared_w13(), shared_w2(),
                                shared_h13_.data(), shared_sig_.data(), shared_a_.data(), y);
  } else if (tokens > 0) {
    std::fill_n(y, tokens * H, 0.0f);
  }
  dispatch->wait();

  // 5. experts: group received picks by local expert and run each expert over its block.
  grow(recv_slot_, received * K);
  grow(recv_weight_, received * K);
  kernels::unpack_dispatch_meta(received, H, K, recv_.data(), recv_slot_.data(), recv_weight_.data());
  layout_.build(recv_slot_, received, K, num_local_experts());
  const std::int64_t entries = layout_.num_entries();
  grow(entry_weight_, entries);
  for (std::int64_t n = 0; n < entries; ++n)
    entry_weight_[static_cast<std::size_t>(n)] =
        recv_weight_[static_cast<std::size_t>(layout_.entry_row[static_cast<std::size_t>(n)] * K + layout_.entry_pick[static_cast<std::size_t>(n)])];
  grow(xe_, entries * H);
  grow(h13_, entries * 2 * ffn_);
  grow(sig_, entries * ffn_);
  grow(a_, entries * ffn_);
  grow(ye_, entries * H);
  kernels::gather_rows(entries, H, layout_.entry_row.data(), recv_.data(), stride, xe_.data(), H);
  for (std::int64_t s = 0; s < num_local_experts(); ++s) {
    const std::int64_t off = layout_.offsets[static_cast<std::size_t>(s)];
    kernels::swiglu_ffn_forward({layout_.count(s), H, ffn_}, xe_.data() + off * H, expert_w13(s),
                                expert_w2(s), h13_.data() + off * 2 * ffn_, sig_.data() + off * ffn_,
                                a_.data() + off * ffn_, ye_.data() + off * H);
  }

  // 6. combine: weighted sum per received row here, one row back per (token, rank).
  grow(out_rows_, received * H);
  std::fill(out_rows_.begin(), out_rows_.end(), 0.0f);
  kernels::scatter_add_rows(entries, H, layout_.entry_row.data(), entry_weight_.data(), ye_.data(), H,
                            out_rows_.data(), H);
  grow(back_, rows * H);
  set_counts(recv_rows_, plan_.rows_per_rank, H, H);
  exchange(out_rows_.data(), back_.data(), "combine")->wait();
  // 7. y = shared + routed
  kernels::scatter_add_rows(rows, H, plan_.row_token.data(), nullptr, back_.data(), H, y, H);

  stats_.rows_sent = rows;
  stats_.rows_received = received;
  const int me = comm_.rank();
  stats_.bytes_sent = (rows - plan_.rows_per_rank[static_cast<std::size_t>(me)]) * stride * 4 +
                      (received - recv_rows_[static_cast<std::size_t>(me)]) * H * 4;
}

void MoELayer::backward(const float* dy, float* dx) {
  const std::int64_t H = hidden_, K = topk_, E = experts_total_, tokens = tokens_;
  const std::int64_t rows = plan_.num_rows();
  const std::int64_t received = stats_.rows_received;
  const std::int64_t entries = layout_.num_entries();

  // Dispatch dL/dy rows along the forward routes; shared experts' backward runs meanwhile.
  grow(send_, rows * H);
  kernels::gather_rows(rows, H, plan_.row_token.data(), dy, H, send_.data(), H);
  grow(recv_, received * H);
  set_counts(plan_.rows_per_rank, recv_rows_, H, H);
  auto dispatch = exchange(send_.data(), recv_.data(), "dispatch grad");
  if (shared_ffn_ > 0) {
    grow(dh13_, tokens * 2 * shared_ffn_);
    kernels::swiglu_ffn_backward({tokens, H, shared_ffn_}, x_.data(), shared_w13(), shared_w2(),
                                 shared_h13_.data(), shared_sig_.data(), shared_a_.data(), dy, grad_of(shared_w13()),
                                 grad_of(shared_w2()), dx, dh13_.data());
  } else if (tokens > 0) {
    std::fill_n(dx, tokens * H, 0.0f);
  }
  dispatch->wait();

  // Each entry's output gradient is w * dy_row; the routing weight's gradient is dy_row . expert_out.
  grow(dye_, entries * H);
  grow(dpick_, received * K);
  std::fill(dpick_.begin(), dpick_.end(), 0.0f);
  // Entries write disjoint rows of dye_ and disjoint slots of dpick_, so they split freely.
  parallel_for(entries, 64, [&](std::int64_t n0, std::int64_t n1) {
    for (std::int64_t n = n0; n < n1; ++n) {
      const std::int64_t r = layout_.entry_row[static_cast<std::size_t>(n)];
      const float* g = recv_.data() + r * H;
      const float* yo = ye_.data() + n * H;
      float* d = dye_.data() + n * H;
      const float w = entry_weight_[static_cast<std::size_t>(n)];
      double dot = 0.0;
      for (std::int64_t j = 0; j < H; ++j) {
        d[j] = w * g[j];
        dot += static_cast<double>(g[j]) * yo[j];
      }
      dpick_[static_cast<std::size_t>(r * K + layout_.entry_pick[static_cast<std::size_t>(n)])] = static_cast<float>(dot);
    }
  });
  grow(dxe_, entries * H);
  std::int64_t max_block = 0;
  for (std::int64_t s = 0; s < num_local_experts(); ++s) max_block = std::max(max_block, layout_.count(s));
  grow(dh13_, max_block * 2 * ffn_);  // the shared backward above is done with it
  const bool overwrite = expert_grads_stale_;
  expert_grads_stale_ = false;
  for (std::int64_t s = 0; s < num_local_experts(); ++s) {
    const std::int64_t off = layout_.offsets[static_cast<std::size_t>(s)];
    float* g13 = experts_.grad.data() + s * expert_stride();
    kernels::swiglu_ffn_backward({layout_.count(s), H, ffn_}, xe_.data() + off * H, expert_w13(s),
                                 expert_w2(s), h13_.data() + off * 2 * ffn_, sig_.data() + off * ffn_,
                                 a_.data() + off * ffn_, dye_.data() + off * H, g13, g13 + 2 * ffn_ * hidden_,
                                 dxe_.data() + off * H, dh13_.data(), !overwrite);
  }

  // Return one row per received row: dx part, then the K routing-weight gradients.
  const std::int64_t ret = H + K;
  grow(out_rows_, received * ret);
  std::fill(out_rows_.begin(), out_rows_.end(), 0.0f);
  kernels::scatter_add_rows(entries, H, layout_.entry_row.data(), nullptr, dxe_.data(), H,
                            out_rows_.data(), ret);
  for (std::int64_t r = 0; r < received; ++r)
    std::memcpy(out_rows_.data() + r * ret + H, dpick_.data() + r * K, sizeof(float) * static_cast<std::size_t>(K));
  grow(back_, rows * ret);
  set_counts(recv_rows_, plan_.rows_per_rank, ret, ret);
  exchange(out_rows_.data(), back_.data(), "combine grad")->wait();

  kernels::scatter_add_rows(rows, H, plan_.row_token.data(), nullptr, back_.data(), ret, dx, H);
  grow(d_weights_, tokens * K);
  std::fill(d_weights_.begin(), d_weights_.end(), 0.0f);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t t = plan_.row_token[static_cast<std::size_t>(i)];
    for (std::int64_t j = 0; j < K; ++j) {
      const std::int32_t k = plan_.row_k[static_cast<std::size_t>(i * K + j)];
      if (k >= 0) d_weights_[static_cast<std::size_t>(t * K + k)] = back_[static_cast<std::size_t>(i * ret + H + j)];
    }
  }
  grow(dlogits_, tokens * E);
  const float* d_scores = nullptr;
  if (aux_.enabled() && tokens > 0) {
    grow(d_scores_, tokens * E);
    std::fill(d_scores_.begin(), d_scores_.end(), 0.0f);
    kernels::balance_loss_backward(aux_params(tokens), scores_.data(), topk_ids_.data(), 1.0f, d_scores_.data());
    d_scores = d_scores_.data();
  }
  const auto gp = kernels::GateParams::from_config(config_, tokens);
  kernels::gate_backward(gp, x_.data(), gate_weight(), scores_.data(), topk_ids_.data(),
                         d_weights_.data(), dx, grad_of(gate_weight()), dlogits_.data(), d_scores);
}

kernels::BalanceLossParams MoELayer::aux_params(std::int64_t tokens) const {
  kernels::BalanceLossParams p;
  p.tokens = tokens;
  p.experts = experts_total_;
  p.topk = topk_;
  p.seq_len = aux_.seq_len;
  p.seq_alpha = aux_.seq_alpha;
  p.expert_alpha = aux_.expert_alpha;
  return p;
}

void MoELayer::update_selection_bias(std::span<const std::int64_t> load, float speed) {
  if (static_cast<std::int64_t>(load.size()) != experts_total_)
    throw InvalidArgument(name_ + ": update_selection_bias got " + std::to_string(load.size()) +
                          " loads, expected n_routed_experts = " + std::to_string(experts_total_));
  if (bias_.empty()) bias_.assign(static_cast<std::size_t>(experts_total_), 0.0f);
  double total = 0.0;
  for (auto l : load) total += static_cast<double>(l);
  const double mean = total / static_cast<double>(experts_total_);
  for (std::size_t e = 0; e < bias_.size(); ++e) {
    const double l = static_cast<double>(load[e]);
    bias_[e] += l < mean ? speed : (l > mean ? -speed : 0.0f);
  }
}

comm::WorkPtr MoELayer::allreduce_replicated_grads() {
  return comm_.allreduce_sum(replicated_.grad.data(), static_cast<std::int64_t>(replicated_.grad.size()),
                             comm::DataType::kFloat32, "replicated grads " + name_);
}

}  // namespace moex
