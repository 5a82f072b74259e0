// Teacher-student training loop.
#include "runtime/model/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <span>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "runtime/random.h"
#include "runtime/trace.h"

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
  const AdamWOptions& a = options_.adam;
  if (!(a.lr > 0.0f && a.lr <= 10.0f) || !(a.weight_decay >= 0.0f && a.weight_decay <= 10.0f) ||
      !(a.beta1 >= 0.0f && a.beta1 < 1.0f) || !(a.beta2 >= 0.0f && a.beta2 < 1.0f) || !(a.eps > 0.0f && std::isfinite(a.eps)))
    throw ConfigError("train: AdamW lr = " + num(a.lr) + ", weight_decay = " + num(a.weight_decay) + ", betas = (" +
                      num(a.beta1) + ", " + num(a.beta2) + "), eps = " + num(a.eps) +
                      ": expected lr in (0, 10], weight_decay in [0, 10], betas in [0, 1), eps > 0");
  if (options_.aux.seq_len < 0)
    throw ConfigError("train: aux.seq_len = " + std::to_string(options_.aux.seq_len) + " must be >= 0 (0 = whole shard)");
  require_non_negative("aux.seq_alpha", options_.aux.seq_alpha);
  require_non_negative("aux.expert_alpha", options_.aux.expert_alpha);
  require_non_negative("skew", options_.skew);
  if (options_.eval_tokens < 0 || options_.eval_every < 1)
    throw ConfigError("train: eval_tokens = " + std::to_string(options_.eval_tokens) + ", eval_every = " +
                      std::to_string(options_.eval_every) + ": expected eval_tokens >= 0 (0 = off), eval_every >= 1");
  const ReplicaOptions& ro = options_.replicas;
  if (ro.enabled) {
    if (ro.spare_slots < 1 || ro.interval < 1 || ro.lag < 1)
      throw ConfigError("train: replicas.spare_slots = " + std::to_string(ro.spare_slots) + ", interval = " +
                        std::to_string(ro.interval) + ", lag = " + std::to_string(ro.lag) + ": each must be >= 1");
    if (!(ro.ema > 0.0 && ro.ema <= 1.0))
      throw ConfigError("train: replicas.ema = " + num(ro.ema) + " must be in (0, 1]");
    require_non_negative("replicas.min_gain", ro.min_gain);
  }
  teacher_ = std::make_unique<MoeModel>(config_, comm_, placement_, topology_, options_.layer);
  teacher_->init_random(Rng::mix(options_.seed, 0x7eac4e2));
  if (ro.enabled) {
    // Start from one replica per expert, placed like the plain run, padded to the fixed slot count.
    const std::int64_t E = config_.n_routed_experts, P = comm_.size();
    slots_per_rank_ = (E + P - 1) / P + ro.spare_slots;
    student_ = std::make_unique<MoeModel>(config_, comm_, sched::identity_layout(E, topology_, slots_per_rank_), topology_,
                                          options_.layer);
    for (std::int64_t l = 0; l < config_.num_hidden_layers; ++l)
      trackers_.emplace_back(E, sched::LoadTracker::Mode::Ema, ro.ema);
    planner_ = std::make_unique<Stream>("replica planner", true);
  } else {
    student_ = std::make_unique<MoeModel>(config_, comm_, placement_, topology_, options_.layer);
  }
  student_->init_random(Rng::mix(options_.seed, 0x57d3e47));
  if (options_.skew > 0.0)
    for (auto& layer : student_->layers()) apply_zipf_selection_bias(*layer, options_.skew, Rng::mix(options_.seed, 0x5e3d));
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

Trainer::~Trainer() {
  // The planner's task reads this trainer's members: let it finish before they go.
  if (planner_) {
    try {
      planner_->synchronize(std::chrono::steady_clock::now() + std::chrono::minutes(10));
    } catch (...) {
    }
  }
}

void Trainer::request_plan() {
  // Inputs are copied: the planner thread touches nothing that training changes.
  std::vector<std::vector<double>> estimates;
  for (const auto& t : trackers_) estimates.push_back(t.estimate());
  std::vector<sched::ReplicaLayout> current;
  for (const auto& layer : student_->layers()) current.push_back(*layer->replica_layout());
  const std::int64_t n_group = config_.n_group, slots = slots_per_rank_;
  const double min_gain = options_.replicas.min_gain;
  planned_.reset();
  planned_layouts_.clear();
  planner_->enqueue([this, estimates = std::move(estimates), current = std::move(current), n_group, slots, min_gain] {
    std::vector<sched::ReplicaLayout> out;
    for (std::size_t l = 0; l < estimates.size(); ++l) {
      auto next = sched::plan_replicas(estimates[l], topology_, n_group, slots);
      const double now = sched::max_mean_rank_load(current[l], estimates[l], topology_);
      const double then = sched::max_mean_rank_load(next, estimates[l], topology_);
      out.push_back(then <= now - min_gain ? std::move(next) : current[l]);
    }
    planned_layouts_ = std::move(out);
  }, &planned_);
  plan_pending_ = true;
  apply_at_ = step_ + options_.replicas.lag;
}

std::int64_t Trainer::apply_planned_layouts() {
  planned_.wait(std::chrono::steady_clock::now() + comm_.default_timeout(), "replica planner");
  plan_pending_ = false;
  // Every rank planned from the same numbers; make sure they agree before moving anything.
  std::uint64_t h = 1469598103934665603ull;
  for (const auto& l : planned_layouts_)
    for (const auto& rank : l.slot_expert())
      for (const auto e : rank) h = (h ^ static_cast<std::uint64_t>(e + 1)) * 1099511628211ull;
  std::int64_t hh[2] = {static_cast<std::int64_t>(h >> 1), -static_cast<std::int64_t>(h >> 1)};
  comm_.allreduce_max(hh, 2, comm::DataType::kInt64, "replica layout hash")->wait();
  if (hh[0] != -hh[1]) throw InternalError("train: ranks planned different replica layouts (hash mismatch)");
  std::int64_t moved = 0;
  auto& layers = student_->layers();
  for (std::size_t l = 0; l < layers.size(); ++l) {
    if (*layers[l]->replica_layout() == planned_layouts_[l]) continue;
    auto m = optimizer_.moments(&layers[l]->experts());
    std::vector<std::vector<float>*> state{m[0], m[1]};
    moved += layers[l]->set_replica_layout(planned_layouts_[l], state);
  }
  comm_.allreduce_sum(&moved, 1, comm::DataType::kInt64, "migrated slots")->wait();
  return moved;
}

void Trainer::set_executor(LayerExecutor* executor) {
  if (executor)  // every layer of both models first, so a refusal leaves neither switched
    for (MoeModel* m : {teacher_.get(), student_.get()})
      for (auto& layer : m->layers()) executor->check(*layer);
  teacher_->set_executor(executor);
  student_->set_executor(executor);
}

StepRecord Trainer::step() {
  const auto start = std::chrono::steady_clock::now();
  std::int64_t migrated = 0;
  if (plan_pending_ && step_ >= apply_at_) {
    trace::Scope span("migration");
    migrated = apply_planned_layouts();
  }
  const std::int64_t T = options_.tokens_per_rank, H = config_.hidden_size;
  const auto n = static_cast<std::size_t>(T * H);
  x_.resize(n);
  target_.resize(n);
  y_.resize(n);
  dy_.resize(n);
  // Each token of the global batch has its own stream (step, global index): rank r trains tokens
  // [r T, (r + 1) T), so a step sees the same tokens at any rank count with the same global batch.
  for (std::int64_t t = 0; t < T; ++t) {
    Rng data(Rng::mix(options_.seed, 0xda7a, static_cast<std::uint64_t>(step_),
                      static_cast<std::uint64_t>(comm_.rank() * T + t)));
    data.fill_normal(x_.data() + t * H, H, 1.0);
  }
  {
    trace::Scope span("teacher forward");
    teacher_->forward(x_.data(), T, target_.data());
  }

  student_->zero_grad();
  const auto& layers = student_->layers();
  const std::size_t L = layers.size();
  bytes_seen_.resize(2 * L);
  bytes_.resize(2 * L);
  for (std::size_t l = 0; l < L; ++l) {
    bytes_seen_[2 * l] = layers[l]->counters().bytes_intra_node;
    bytes_seen_[2 * l + 1] = layers[l]->counters().bytes_inter_node;
  }
  {
    trace::Scope span("forward");
    student_->forward(x_.data(), T, y_.data());
  }
  const double global_elems = static_cast<double>(T) * static_cast<double>(comm_.size()) * static_cast<double>(H);
  double sq = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const float d = y_[i] - target_[i];
    sq += static_cast<double>(d) * d;
    dy_[i] = static_cast<float>(2.0 * d / global_elems);
  }
  // Loss (with the aux loss when on) and expert loads travel in one reduction each, started before
  // backward needs the network. Each layer's aux loss already carries the 1/world factor.
  const bool aux_on = options_.aux.enabled();
  sums_[0] = sq;
  sums_[1] = 0.0;
  if (aux_on)
    for (const auto& layer : layers) sums_[1] += layer->aux_loss_value().total();
  auto loss_work = comm_.allreduce_sum(sums_, aux_on ? 2 : 1, comm::DataType::kFloat64, "loss");
  const std::int64_t E = config_.n_routed_experts;
  const auto P = static_cast<std::size_t>(comm_.size());
  const std::size_t per_layer = static_cast<std::size_t>(E) + P + 1;
  loads_.assign(per_layer * layers.size(), 0);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& c = layers[l]->route_stats().expert_tokens;
    std::copy(c.begin(), c.end(), loads_.begin() + static_cast<std::ptrdiff_t>(l * per_layer));
    loads_[l * per_layer + static_cast<std::size_t>(E) + static_cast<std::size_t>(comm_.rank())] =
        layers[l]->route_stats().entries_processed;
    loads_[l * per_layer + static_cast<std::size_t>(E) + P] = layers[l]->route_stats().picks_dropped;
  }
  auto load_work = comm_.allreduce_sum(loads_.data(), static_cast<std::int64_t>(loads_.size()),
                                       comm::DataType::kInt64, "expert loads");
  {
    trace::Scope span("backward");
    student_->backward(dy_.data());
  }
  for (std::size_t l = 0; l < L; ++l) {
    bytes_[2 * l] = layers[l]->counters().bytes_intra_node - bytes_seen_[2 * l];
    bytes_[2 * l + 1] = layers[l]->counters().bytes_inter_node - bytes_seen_[2 * l + 1];
  }
  auto bytes_work = comm_.allreduce_sum(bytes_.data(), static_cast<std::int64_t>(bytes_.size()),
                                        comm::DataType::kInt64, "exchange bytes");
  {
    trace::Scope span("optimizer");
    optimizer_.step();
  }
  {
    trace::Scope span("all-reduce (loss, loads)");
    loss_work->wait();
    load_work->wait();
    bytes_work->wait();
  }
  if (options_.bias_update_speed > 0.0f) {
    // Same integer loads and the same float ops on every rank: the bias stays bit-identical.
    for (std::size_t l = 0; l < layers.size(); ++l)
      layers[l]->update_selection_bias(
          std::span<const std::int64_t>(loads_.data() + l * per_layer, static_cast<std::size_t>(E)),
          options_.bias_update_speed);
  }
  student_->parameters_changed();  // the optimiser step and the bias update

  if (options_.replicas.enabled) {
    for (std::size_t l = 0; l < layers.size(); ++l)
      trackers_[l].add(std::span<const std::int64_t>(loads_.data() + l * per_layer, static_cast<std::size_t>(E)));
    if (!plan_pending_ && (step_ + 1) % options_.replicas.interval == 0) request_plan();
  }

  StepRecord r;
  r.migrated_slots = migrated;
  r.step = ++step_;
  r.loss = sums_[0] / global_elems;
  r.aux_loss = sums_[1];
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  r.tokens_per_s = static_cast<double>(T) * comm_.size() / (r.ms / 1000.0);
  const double mean = static_cast<double>(T) * comm_.size() * static_cast<double>(config_.num_experts_per_tok) / static_cast<double>(E);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto first = loads_.begin() + static_cast<std::ptrdiff_t>(l * per_layer);
    const double mx = static_cast<double>(*std::max_element(first, first + E));
    r.max_mean_load = std::max(r.max_mean_load, mx / mean);
    const auto ranks_first = first + E, ranks_end = first + E + static_cast<std::ptrdiff_t>(P);
    const double rank_sum = static_cast<double>(std::accumulate(ranks_first, ranks_end, std::int64_t{0}));
    const double rmx = static_cast<double>(*std::max_element(ranks_first, ranks_end));
    if (rank_sum > 0) r.max_mean_rank_load = std::max(r.max_mean_rank_load, rmx * static_cast<double>(P) / rank_sum);
    r.picks_dropped += loads_[l * per_layer + static_cast<std::size_t>(E) + P];
    LayerTelemetry t;
    t.expert_load.assign(first, first + E);
    double sum = 0.0, sq = 0.0;
    for (const std::int64_t v : t.expert_load) {
      sum += static_cast<double>(v);
      sq += static_cast<double>(v) * static_cast<double>(v);
    }
    if (sq > 0.0) {
      const double m = sum / static_cast<double>(E);
      t.jain_index = sum * sum / (static_cast<double>(E) * sq);
      t.load_max_mean = mx / m;
      t.load_max_minus_mean_over_mean = (mx - m) / m;
    }
    t.picks_dropped = loads_[l * per_layer + static_cast<std::size_t>(E) + P];
    t.bytes_intra_node = bytes_[2 * l];
    t.bytes_inter_node = bytes_[2 * l + 1];
    r.layers.push_back(std::move(t));
  }
  const std::int64_t every = options_.eval_every;
  if (options_.eval_tokens > 0 && (step_ == 1 || step_ % every == 0 || step_ == options_.steps)) {
    const auto t0 = std::chrono::steady_clock::now();
    trace::Scope span("router evaluation");
    evaluate(r);
    r.eval_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  return r;
}

namespace {

/// (token, expert) selections two evaluations share: per token, the ids both top-K sets hold.
std::int64_t common_picks(const std::vector<std::int32_t>& a, const std::vector<std::int32_t>& b, std::int64_t K) {
  std::int64_t c = 0;
  for (std::size_t t = 0; t + static_cast<std::size_t>(K) <= a.size(); t += static_cast<std::size_t>(K))
    for (std::int64_t i = 0; i < K; ++i)
      for (std::int64_t j = 0; j < K; ++j)
        c += a[t + static_cast<std::size_t>(i)] == b[t + static_cast<std::size_t>(j)] ? 1 : 0;
  return c;
}

}  // namespace

void Trainer::evaluate(StepRecord& r) {
  const std::int64_t N = options_.eval_tokens, H = config_.hidden_size, K = config_.num_experts_per_tok;
  const int P = comm_.size(), me = comm_.rank();
  const auto& layers = student_->layers();
  const auto L = static_cast<std::int64_t>(layers.size());
  // Rank p evaluates tokens [N p / P, N (p + 1) / P); token g is drawn from its own stream, so the
  // set is the same at any rank count.
  auto share = [&](int p) { return N * p / P; };
  const std::int64_t first = share(me), n = share(me + 1) - first;
  if (eval_x_.size() != static_cast<std::size_t>(n * H)) {
    eval_x_.resize(static_cast<std::size_t>(n * H));
    for (std::int64_t t = 0; t < n; ++t) {
      Rng data(Rng::mix(options_.seed, 0xe7a15e7, static_cast<std::uint64_t>(first + t)));
      data.fill_normal(eval_x_.data() + t * H, H, 1.0);
    }
  }
  eval_y_.resize(static_cast<std::size_t>(n * H));
  student_->forward(eval_x_.data(), n, eval_y_.data(), /*on_host=*/true);
  eval_ids_.resize(static_cast<std::size_t>(L * n * K));
  for (std::int64_t l = 0; l < L; ++l)
    std::copy_n(layers[static_cast<std::size_t>(l)]->topk_ids().begin(), n * K, eval_ids_.begin() + l * n * K);
  std::vector<std::int64_t> counts(static_cast<std::size_t>(P)), x_counts(static_cast<std::size_t>(P));
  for (int p = 0; p < P; ++p) {
    counts[static_cast<std::size_t>(p)] = L * (share(p + 1) - share(p)) * K;
    x_counts[static_cast<std::size_t>(p)] = (share(p + 1) - share(p)) * H;
  }
  if (me == 0) eval_gathered_.resize(static_cast<std::size_t>(L * N * K));
  comm_.gatherv(eval_ids_.data(), L * n * K, eval_gathered_.data(), counts, comm::DataType::kInt32, 0,
                "router evaluation")->wait();
  if (!eval_inputs_gathered_) {  // the inputs, once: they do not change
    eval_inputs_gathered_ = true;
    if (me == 0) eval_x_all_.resize(static_cast<std::size_t>(N * H));
    comm_.gatherv(eval_x_.data(), n * H, me == 0 ? eval_x_all_.data() : nullptr, x_counts,
                  comm::DataType::kFloat32, 0, "router evaluation inputs")->wait();
    if (me != 0) eval_x_all_ = eval_x_;
  }
  std::vector<double> rates(static_cast<std::size_t>(L), -1.0);
  if (me == 0) {
    EvalRoutes e;
    e.step = step_;
    e.ids.assign(static_cast<std::size_t>(L), std::vector<std::int32_t>(static_cast<std::size_t>(N * K)));
    std::int64_t at = 0;
    for (int p = 0; p < P; ++p) {
      const std::int64_t np = share(p + 1) - share(p);
      for (std::int64_t l = 0; l < L; ++l) {
        std::copy_n(eval_gathered_.begin() + at, np * K, e.ids[static_cast<std::size_t>(l)].begin() + share(p) * K);
        at += np * K;
      }
    }
    if (!evals_.empty())
      for (std::int64_t l = 0; l < L; ++l) {
        const auto li = static_cast<std::size_t>(l);
        rates[li] = 100.0 - 100.0 * static_cast<double>(common_picks(e.ids[li], evals_.back().ids[li], K)) /
                                static_cast<double>(N * K);
      }
    evals_.push_back(std::move(e));
  }
  // Every rank's record holds the same numbers.
  comm_.broadcast(rates.data(), L, comm::DataType::kFloat64, 0, "router change rate")->wait();
  for (std::int64_t l = 0; l < L; ++l) r.layers[static_cast<std::size_t>(l)].router_change_rate = rates[static_cast<std::size_t>(l)];
  r.evaluated = true;
}

std::vector<RouterSaturation> Trainer::router_saturation() const {
  std::vector<RouterSaturation> out;
  if (evals_.empty()) return out;
  const std::int64_t K = config_.num_experts_per_tok, N = options_.eval_tokens;
  const EvalRoutes& last = evals_.back();
  for (const EvalRoutes& e : evals_) {
    RouterSaturation s;
    s.step = e.step;
    for (std::size_t l = 0; l < e.ids.size(); ++l)
      s.saturation.push_back(100.0 * static_cast<double>(common_picks(e.ids[l], last.ids[l], K)) /
                             static_cast<double>(N * K));
    out.push_back(std::move(s));
  }
  return out;
}

std::string step_header(bool with_aux) {
  std::string h = " step |         loss |       ms |   tokens/s | max/mean expert load | max/mean rank load";
  if (with_aux) h += " |     aux loss";
  return h;
}

std::string format_step(const StepRecord& r, bool with_aux) {
  char line[200];
  int n = std::snprintf(line, sizeof line, "%5lld | %12.6e | %8.2f | %10.0f | %20.3f | %18.3f",
                        static_cast<long long>(r.step), r.loss, r.ms, r.tokens_per_s, r.max_mean_load, r.max_mean_rank_load);
  if (with_aux && n > 0 && static_cast<std::size_t>(n) < sizeof line)
    std::snprintf(line + n, sizeof line - static_cast<std::size_t>(n), " | %12.6e", r.aux_loss);
  return line;
}

std::string step_json(const StepRecord& r) {
  nlohmann::json j{{"step", r.step}, {"loss", r.loss}, {"ms", r.ms}, {"tokens_per_s", r.tokens_per_s},
                   {"max_mean_load", r.max_mean_load}, {"aux_loss", r.aux_loss},
                   {"max_mean_rank_load", r.max_mean_rank_load}, {"migrated_slots", r.migrated_slots},
                   {"picks_dropped", r.picks_dropped}};
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerTelemetry& t : r.layers) {
    nlohmann::json l{{"jain_index", t.jain_index}, {"load_max_mean", t.load_max_mean},
                     {"load_max_minus_mean_over_mean", t.load_max_minus_mean_over_mean},
                     {"picks_dropped", t.picks_dropped}, {"bytes_intra_node", t.bytes_intra_node},
                     {"bytes_inter_node", t.bytes_inter_node}, {"expert_load", t.expert_load}};
    if (t.router_change_rate >= 0.0) l["router_change_rate"] = t.router_change_rate;
    layers.push_back(std::move(l));
  }
  j["layers"] = std::move(layers);
  if (r.evaluated) {
    j["evaluated"] = true;
    j["eval_ms"] = r.eval_ms;
  }
  return j.dump();
}

}  // namespace moex
