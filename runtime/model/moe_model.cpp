// MoeModel forward/backward and random initialisation.
#include "runtime/model/moe_model.h"
#include "runtime/trace.h"

#include <cmath>
#include <cstring>
#include <utility>

#include "base/error.h"

#include "runtime/random.h"

namespace moex {

void init_layer_random(MoELayer& layer, std::uint64_t seed, std::int64_t layer_index) {
  const MoeConfig& c = layer.config();
  const std::int64_t H = c.hidden_size, F = c.moe_intermediate_size, Fs = c.shared_intermediate_size();
  const auto li = static_cast<std::uint64_t>(layer_index);
  Rng gate(Rng::mix(seed, li, 1));
  gate.fill_normal(layer.gate_weight(), c.n_routed_experts * H, 1.0 / std::sqrt(static_cast<double>(H)));
  if (Fs > 0) {
    Rng shared(Rng::mix(seed, li, 2));
    shared.fill_normal(layer.shared_w13(), 2 * Fs * H, 1.0 / std::sqrt(static_cast<double>(H)));
    shared.fill_normal(layer.shared_w2(), H * Fs, 1.0 / std::sqrt(static_cast<double>(Fs)));
  }
  const auto experts = layer.slot_experts(layer.rank());  // replicas of one expert get the same values
  for (std::size_t slot = 0; slot < experts.size(); ++slot) {
    Rng r(Rng::mix(seed, li, 3, static_cast<std::uint64_t>(experts[slot])));
    const auto s = static_cast<std::int64_t>(slot);
    r.fill_normal(layer.expert_w13(s), 2 * F * H, 1.0 / std::sqrt(static_cast<double>(H)));
    r.fill_normal(layer.expert_w2(s), H * F, 1.0 / std::sqrt(static_cast<double>(F)));
  }
  if (c.topk_method == TopkMethod::kNoauxTc) layer.selection_bias().assign(static_cast<std::size_t>(c.n_routed_experts), 0.0f);
}

void apply_zipf_selection_bias(MoELayer& layer, double z, std::uint64_t seed) {
  if (!std::isfinite(z) || z < 0.0)
    throw InvalidArgument(layer.name() + ": Zipf skew exponent " + std::to_string(z) + " must be finite and >= 0");
  const std::int64_t E = layer.config().n_routed_experts;
  std::vector<std::int64_t> order(static_cast<std::size_t>(E));
  for (std::int64_t e = 0; e < E; ++e) order[static_cast<std::size_t>(e)] = e;
  Rng shuffle(Rng::mix(seed, 0x5cee));
  for (std::int64_t i = E - 1; i > 0; --i)
    std::swap(order[static_cast<std::size_t>(i)],
              order[static_cast<std::size_t>(static_cast<std::int64_t>(shuffle.uniform() * static_cast<double>(i + 1)))]);
  layer.selection_bias().assign(static_cast<std::size_t>(E), 0.0f);
  for (std::int64_t r = 0; r < E; ++r)
    layer.selection_bias()[static_cast<std::size_t>(order[static_cast<std::size_t>(r)])] =
        static_cast<float>(-0.1 * z * std::log(1.0 + static_cast<double>(r)));
}

MoeModel::MoeModel(const MoeConfig& config, comm::Communicator& comm,
                   const sched::ExpertPlacement& placement, const std::optional<sched::Topology>& topology,
                   const LayerOptions& options)
    : config_(config), comm_(comm) {
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l)
    layers_.push_back(
        std::make_unique<MoELayer>(config, comm, placement, "layer " + std::to_string(l), topology, options));
  init_buffers();
}

MoeModel::MoeModel(const MoeConfig& config, comm::Communicator& comm, const sched::ReplicaLayout& layout,
                   const std::optional<sched::Topology>& topology, const LayerOptions& options)
    : config_(config), comm_(comm) {
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l)
    layers_.push_back(std::make_unique<MoELayer>(config, comm, layout, "layer " + std::to_string(l), topology, options));
  init_buffers();
}

void MoeModel::init_buffers() {
  norms_.resize(static_cast<std::size_t>(config_.num_hidden_layers * config_.hidden_size));
  std::fill(norms_.value.begin(), norms_.value.end(), 1.0f);
  h_.resize(static_cast<std::size_t>(config_.num_hidden_layers + 1));
  normed_.resize(static_cast<std::size_t>(config_.num_hidden_layers));
  rstd_.resize(static_cast<std::size_t>(config_.num_hidden_layers));
}

void MoeModel::init_random(std::uint64_t seed) {
  for (std::size_t l = 0; l < layers_.size(); ++l) init_layer_random(*layers_[l], seed, static_cast<std::int64_t>(l));
  std::fill(norms_.value.begin(), norms_.value.end(), 1.0f);
  parameters_changed();
}

void MoeModel::forward(const float* x, std::int64_t tokens, float* y, bool on_host) {
  const std::int64_t H = config_.hidden_size;
  const auto eps = static_cast<float>(config_.rms_norm_eps);
  tokens_ = tokens;
  const auto n = static_cast<std::size_t>(tokens * H);
  h_[0].assign(x, x + n);
  moe_out_.resize(n);
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    const float* h = h_[l].data();
    auto& nm = normed_[l];
    auto& rs = rstd_[l];
    nm.resize(n);
    rs.resize(static_cast<std::size_t>(tokens));
    const float* g = norms_.value.data() + l * static_cast<std::size_t>(H);
    for (std::int64_t t = 0; t < tokens; ++t) {
      double ss = 0.0;
      for (std::int64_t j = 0; j < H; ++j) ss += static_cast<double>(h[t * H + j]) * h[t * H + j];
      const float r = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(H)) + eps);
      rs[static_cast<std::size_t>(t)] = r;
      for (std::int64_t j = 0; j < H; ++j) nm[static_cast<std::size_t>(t * H + j)] = h[t * H + j] * r * g[j];
    }
    if (executor_ && !on_host)
      executor_->forward(*layers_[l], nm.data(), tokens, moe_out_.data());
    else
      layers_[l]->forward(nm.data(), tokens, moe_out_.data());
    h_[l + 1].resize(n);
    for (std::size_t i = 0; i < n; ++i) h_[l + 1][i] = h[i] + moe_out_[i];
  }
  if (n > 0) std::memcpy(y, h_.back().data(), n * sizeof(float));
}

void MoeModel::backward(const float* dy) {
  const std::int64_t H = config_.hidden_size, tokens = tokens_;
  const auto n = static_cast<std::size_t>(tokens * H);
  dh_.assign(dy, dy + n);
  dnormed_.resize(n);
  for (std::size_t l = layers_.size(); l-- > 0;) {
    if (executor_)
      executor_->backward(*layers_[l], dh_.data(), dnormed_.data());
    else
      layers_[l]->backward(dh_.data(), dnormed_.data());
    // RMSNorm backward: n = x * r * g, r = (mean x^2 + eps)^-1/2.
    const float* x = h_[l].data();
    const float* g = norms_.value.data() + l * static_cast<std::size_t>(H);
    float* dg = norms_.grad.data() + l * static_cast<std::size_t>(H);
    for (std::int64_t t = 0; t < tokens; ++t) {
      const float r = rstd_[l][static_cast<std::size_t>(t)];
      const float* xt = x + t * H;
      const float* dn = dnormed_.data() + t * H;
      double dot = 0.0;
      for (std::int64_t j = 0; j < H; ++j) {
        dg[j] += dn[j] * xt[j] * r;
        dot += static_cast<double>(dn[j]) * g[j] * xt[j];
      }
      const float c = static_cast<float>(dot / static_cast<double>(H)) * r * r * r;
      float* dx = dh_.data() + t * H;  // residual path already holds dL/dh_{l+1}
      for (std::int64_t j = 0; j < H; ++j) dx[j] += dn[j] * g[j] * r - c * xt[j];
    }
  }
  std::vector<comm::WorkPtr> pending;
  pending.push_back(comm_.allreduce_sum(norms_.grad.data(), static_cast<std::int64_t>(norms_.grad.size()),
                                        comm::DataType::kFloat32, "norm grads"));
  for (auto& layer : layers_) pending.push_back(layer->allreduce_replicated_grads());
  for (auto& layer : layers_)  // replica mode only: sums over each multi-replica expert's replicas
    if (auto w = layer->start_replica_grad_reduce()) pending.push_back(std::move(w));
  {
    trace::Scope wait("all-reduce (replicated grads)");
    for (auto& w : pending) w->wait();
  }
  for (auto& layer : layers_) layer->finish_replica_grad_reduce();
}

void MoeModel::set_executor(LayerExecutor* executor) {
  if (executor)
    for (auto& layer : layers_) executor->check(*layer);
  executor_ = executor;
  parameters_changed();
}

void MoeModel::parameters_changed() {
  if (executor_)
    for (auto& layer : layers_) executor_->parameters_changed(*layer);
}

void MoeModel::zero_grad() {
  std::fill(norms_.grad.begin(), norms_.grad.end(), 0.0f);
  for (auto& layer : layers_) layer->zero_grad();
}

std::vector<ParamBlock*> MoeModel::param_blocks() {
  std::vector<ParamBlock*> blocks{&norms_};
  for (auto& layer : layers_) {
    blocks.push_back(&layer->replicated());
    blocks.push_back(&layer->experts());
  }
  return blocks;
}

}  // namespace moex
