// Teacher-student training loop.
#include "runtime/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <span>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "runtime/random.h"

namespace moex {
namespace {

std::string num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

void require_non_negative(const char* what, double v) {
  if (!std::isfinite(v) || v < 0.0) throw ConfigError(std::string("train: ") + what + " = " + num(v) + " must be a finite value >= 0");
}

}  // namespace

Trainer::Trainer(const MoeConfig& config, comm::Communicator& comm, TrainOptions options)
    : config_(config),
      comm_(comm),
      options_(options),
      topology_(sched::Topology::from_node_ids(comm.node_ids())),
      placement_(sched::ExpertPlacement::node_aware(config.n_routed_experts, topology_)),
      optimizer_(options.adam) {
  if (options_.steps < 0) throw ConfigError("train: steps = " + std::to_string(options_.steps) + " must be >= 0");
  if (options_.tokens_per_rank < 1)
    throw ConfigError("train: tokens_per_rank = " + std::to_string(options_.tokens_per_rank) + " must be >= 1");
  require_non_negative("bias_update_speed", options_.bias_update_speed);
  if (options_.aux.seq_len < 0)
    throw ConfigError("train: aux.seq_len = " + std::to_string(options_.aux.seq_len) + " must be >= 0 (0 = whole shard)");
  require_non_negative("aux.seq_alpha", options_.aux.seq_alpha);
  require_non_negative("aux.expert_alpha", options_.aux.expert_alpha);
  teacher_ = std::make_unique<MoeModel>(config_, comm_, placement_, topology_, options_.layer);
  teacher_->init_random(Rng::mix(options_.seed, 0x7eac4e2));
  student_ = std::make_unique<MoeModel>(config_, comm_, placement_, topology_, options_.layer);
  student_->init_random(Rng::mix(options_.seed, 0x57d3e47));
  for (ParamBlock* b : student_->param_blocks()) optimizer_.add(b);
  if (options_.aux.enabled()) {
    // Every rank adds its own loss gradient with upstream 1 and the replicated gradients are summed,
    // so scaling the coefficients by 1/world makes the optimised term the mean over ranks.
    AuxLossOptions per_rank = options_.aux;
    per_rank.seq_alpha /= static_cast<float>(comm_.size());
    per_rank.expert_alpha /= static_cast<float>(comm_.size());
    for (auto& layer : student_->layers()) layer->set_aux_loss(per_rank);
  }
}

StepRecord Trainer::step() {
  const auto start = std::chrono::steady_clock::now();
  const std::int64_t T = options_.tokens_per_rank, H = config_.hidden_size;
  const auto n = static_cast<std::size_t>(T * H);
  x_.resize(n);
  target_.resize(n);
  y_.resize(n);
  dy_.resize(n);
  Rng data(Rng::mix(options_.seed, 0xda7a, static_cast<std::uint64_t>(step_), static_cast<std::uint64_t>(comm_.rank())));
  data.fill_normal(x_.data(), T * H, 1.0);
  teacher_->forward(x_.data(), T, target_.data());

  student_->zero_grad();
  student_->forward(x_.data(), T, y_.data());
  const double global_elems = static_cast<double>(T) * static_cast<double>(comm_.size()) * static_cast<double>(H);
  double sq = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const float d = y_[i] - target_[i];
    sq += static_cast<double>(d) * d;
    dy_[i] = static_cast<float>(2.0 * d / global_elems);
  }
  const auto& layers = student_->layers();
  // Loss (with the aux loss when on) and expert loads travel in one reduction each, started before
  // backward needs the network. Each layer's aux loss already carries the 1/world factor.
  const bool aux_on = options_.aux.enabled();
  sums_[0] = sq;
  sums_[1] = 0.0;
  if (aux_on)
    for (const auto& layer : layers) sums_[1] += layer->aux_loss_value().total();
  auto loss_work = comm_.allreduce_sum(sums_, aux_on ? 2 : 1, comm::DataType::kFloat64, "loss");
  const std::int64_t E = config_.n_routed_experts;
  loads_.assign(static_cast<std::size_t>(E) * layers.size(), 0);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& c = layers[l]->route_stats().expert_tokens;
    std::copy(c.begin(), c.end(), loads_.begin() + static_cast<std::ptrdiff_t>(l * static_cast<std::size_t>(E)));
  }
  auto load_work = comm_.allreduce_sum(loads_.data(), static_cast<std::int64_t>(loads_.size()),
                                       comm::DataType::kInt64, "expert loads");
  student_->backward(dy_.data());
  optimizer_.step();
  loss_work->wait();
  load_work->wait();
  if (options_.bias_update_speed > 0.0f) {
    // Same integer loads and the same float ops on every rank: the bias stays bit-identical.
    for (std::size_t l = 0; l < layers.size(); ++l)
      layers[l]->update_selection_bias(
          std::span<const std::int64_t>(loads_.data() + l * static_cast<std::size_t>(E), static_cast<std::size_t>(E)),
          options_.bias_update_speed);
  }

  StepRecord r;
  r.step = ++step_;
  r.loss = sums_[0] / global_elems;
  r.aux_loss = sums_[1];
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  r.tokens_per_s = static_cast<double>(T) * comm_.size() / (r.ms / 1000.0);
  const double mean = static_cast<double>(T) * comm_.size() * static_cast<double>(config_.num_experts_per_tok) / static_cast<double>(E);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto first = loads_.begin() + static_cast<std::ptrdiff_t>(l * static_cast<std::size_t>(E));
    const double mx = static_cast<double>(*std::max_element(first, first + E));
    r.max_mean_load = std::max(r.max_mean_load, mx / mean);
  }
  return r;
}

std::string step_header(bool with_aux) {
  std::string h = " step |         loss |       ms |   tokens/s | max/mean expert load";
  if (with_aux) h += " |     aux loss";
  return h;
}

std::string format_step(const StepRecord& r, bool with_aux) {
  char line[200];
  int n = std::snprintf(line, sizeof line, "%5lld | %12.6e | %8.2f | %10.0f | %6.3f", static_cast<long long>(r.step),
                        r.loss, r.ms, r.tokens_per_s, r.max_mean_load);
  // Pad the load column to its header's width so the aux column lines up.
  if (with_aux && n > 0 && static_cast<std::size_t>(n) < sizeof line)
    std::snprintf(line + n, sizeof line - static_cast<std::size_t>(n), "%*s | %12.6e", 20 - 6, "", r.aux_loss);
  return line;
}

std::string step_json(const StepRecord& r) {
  nlohmann::json j{{"step", r.step}, {"loss", r.loss}, {"ms", r.ms}, {"tokens_per_s", r.tokens_per_s},
                   {"max_mean_load", r.max_mean_load}, {"aux_loss", r.aux_loss}};
  return j.dump();
}

}  // namespace moex
