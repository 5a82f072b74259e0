#include "runtime/model/train_metrics.h"

#include "comm/communicator.h"
#include "runtime/metrics_server.h"

namespace moex {

namespace {
// Stage times of LayerCounters in the order they are gathered and labelled.
constexpr double LayerCounters::* kStages[] = {&LayerCounters::gate,    &LayerCounters::permute,
                                               &LayerCounters::experts, &LayerCounters::combine,
                                               &LayerCounters::shared,  &LayerCounters::dispatch,
                                               &LayerCounters::combine_comm};
constexpr const char* kStageNames[] = {"gate", "permute", "experts", "combine", "shared", "dispatch", "combine_comm"};
constexpr std::size_t kNumStages = sizeof kStages / sizeof kStages[0];
}  // namespace

TrainMetrics::TrainMetrics(comm::Communicator& comm, std::int64_t tokens_per_rank, std::int64_t steps_target)
    : comm_(comm), tokens_per_rank_(tokens_per_rank), steps_target_(steps_target) {}

std::string TrainMetrics::collect(const StepRecord& r, MoeModel& student) {
  const auto& layers = student.layers();
  const std::size_t L = layers.size(), per_rank = 1 + L * kNumStages;
  const int P = comm_.size();
  mine_.assign(per_rank, 0.0);
  mine_[0] = r.ms;
  for (std::size_t l = 0; l < L; ++l)
    for (std::size_t s = 0; s < kNumStages; ++s) mine_[1 + l * kNumStages + s] = layers[l]->counters().*kStages[s];
  const bool lead = comm_.rank() == 0;
  counts_.assign(lead ? static_cast<std::size_t>(P) : 0, static_cast<std::int64_t>(per_rank));
  all_.resize(lead ? per_rank * static_cast<std::size_t>(P) : 0);
  comm_.gatherv(mine_.data(), static_cast<std::int64_t>(per_rank), all_.data(), counts_, comm::DataType::kFloat64, 0,
                "metrics gather")
      ->wait();
  // Totals (identical on every rank: the record is).
  ++steps_run_;
  tokens_total_ += static_cast<double>(tokens_per_rank_) * P;
  picks_dropped_total_ += r.picks_dropped;
  migrated_total_ += r.migrated_slots;
  if (r.evaluated) ++evaluations_;
  bytes_total_.resize(2 * r.layers.size(), 0.0);
  for (std::size_t l = 0; l < r.layers.size(); ++l) {
    bytes_total_[2 * l] += static_cast<double>(r.layers[l].bytes_intra_node);
    bytes_total_[2 * l + 1] += static_cast<double>(r.layers[l].bytes_inter_node);
  }
  if (!lead) return {};

  MetricsText m;
  m.family("moex_step", "gauge", "Last finished training step (counted from the run's start)").sample(double(r.step));
  m.family("moex_steps_target", "gauge", "Step the run trains up to (--steps)").sample(double(steps_target_));
  m.family("moex_ranks", "gauge", "Ranks of the run").sample(P);
  m.family("moex_loss", "gauge", "Mean squared error of the last step over all ranks' tokens").sample(r.loss);
  m.family("moex_aux_loss", "gauge", "Auxiliary balance loss of the last step (0 when off)").sample(r.aux_loss);
  m.family("moex_tokens_per_second", "gauge", "All ranks' tokens / last step's time").sample(r.tokens_per_s);
  m.family("moex_tokens_total", "counter", "Tokens trained on by all ranks since this process started")
      .sample(tokens_total_);
  m.family("moex_steps_total", "counter", "Steps run since this process started").sample(double(steps_run_));
  m.family("moex_step_seconds", "gauge", "Wall time of the last step on each rank");
  for (int p = 0; p < P; ++p) m.sample(all_[static_cast<std::size_t>(p) * per_rank] / 1e3, {{"rank", std::to_string(p)}});
  m.family("moex_load_max_mean", "gauge", "Worst layer's max/mean tokens per expert, last step").sample(r.max_mean_load);
  m.family("moex_rank_load_max_mean", "gauge", "Worst layer's max/mean expert entries computed per rank, last step")
      .sample(r.max_mean_rank_load);
  m.family("moex_picks_dropped_total", "counter", "Capacity mode: (token, expert) picks dropped, all ranks and layers")
      .sample(double(picks_dropped_total_));
  m.family("moex_migrated_slots_total", "counter", "Expert slot blocks moved between ranks by replica layouts")
      .sample(double(migrated_total_));
  m.family("moex_router_evaluations_total", "counter", "Router evaluations run (--eval-tokens)")
      .sample(double(evaluations_));

  auto per_layer = [&](const char* name, const char* help, double LayerTelemetry::* field) {
    m.family(name, "gauge", help);
    for (std::size_t l = 0; l < r.layers.size(); ++l) m.sample(r.layers[l].*field, {{"layer", std::to_string(l)}});
  };
  per_layer("moex_layer_jain_index", "Jain's index of the per-expert load, last step (1 = even, 1/E = one expert)",
            &LayerTelemetry::jain_index);
  per_layer("moex_layer_load_max_mean", "max/mean of the per-expert load, last step", &LayerTelemetry::load_max_mean);
  per_layer("moex_layer_load_max_minus_mean_over_mean", "(max - mean)/mean of the per-expert load, last step",
            &LayerTelemetry::load_max_minus_mean_over_mean);
  m.family("moex_layer_router_change_rate", "gauge",
           "Percent of the evaluation set's top-K selections that changed since the previous evaluation");
  for (std::size_t l = 0; l < r.layers.size(); ++l)
    if (r.layers[l].router_change_rate >= 0.0)
      m.sample(r.layers[l].router_change_rate, {{"layer", std::to_string(l)}});
  m.family("moex_layer_expert_load", "gauge", "(token, expert) picks per routed expert, all ranks, last step");
  for (std::size_t l = 0; l < r.layers.size(); ++l)
    for (std::size_t e = 0; e < r.layers[l].expert_load.size(); ++e)
      m.sample(double(r.layers[l].expert_load[e]), {{"layer", std::to_string(l)}, {"expert", std::to_string(e)}});
  m.family("moex_layer_bytes_total", "counter",
           "Hidden-vector bytes the student's passes sent to other ranks, all ranks, by link");
  for (std::size_t l = 0; l < r.layers.size(); ++l) {
    m.sample(bytes_total_[2 * l], {{"layer", std::to_string(l)}, {"link", "intra_node"}});
    m.sample(bytes_total_[2 * l + 1], {{"layer", std::to_string(l)}, {"link", "inter_node"}});
  }
  m.family("moex_layer_stage_seconds_total", "counter",
           "Time in each stage of the student layer's passes on each rank (comm stages: the comm stream's busy time)");
  for (int p = 0; p < P; ++p)
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t s = 0; s < kNumStages; ++s)
        m.sample(all_[static_cast<std::size_t>(p) * per_rank + 1 + l * kNumStages + s] / 1e3,
                 {{"rank", std::to_string(p)}, {"layer", std::to_string(l)}, {"stage", kStageNames[s]}});
  return m.str();
}

}  // namespace moex
