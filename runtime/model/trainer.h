// Trainer: teacher-student expert estimation with AdamW across the ranks.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "runtime/model/adamw.h"
#include "runtime/model/moe_model.h"
#include "runtime/stream.h"
#include "scheduler/load_tracker.h"
#include "scheduler/replica_planner.h"

namespace moex {

/// Hot-expert replicas during training (EPLB-style). Every `interval` steps the global per-expert
/// load estimate (a LoadTracker moving average, identical on every rank) goes to the replica planner,
/// which runs on its own thread (a Boost.Asio strand) while training continues; its layout is applied
/// at the start of step `lag` steps later, migrating expert parameters and AdamW moments between
/// ranks. Every rank plans from the same numbers with the same deterministic planner, so all apply the
/// same layout (checked with a hash). Routing and the model's function do not change.
struct ReplicaOptions {
  bool enabled = false;
  std::int64_t spare_slots = 1;  ///< physical slots per rank = ceil(E / ranks) + spare_slots (>= 1)
  std::int64_t interval = 20;    ///< steps between plans (>= 1)
  std::int64_t lag = 2;          ///< steps between requesting a plan and applying it (>= 1)
  double ema = 0.2;              ///< LoadTracker EMA weight of the newest step, in (0, 1]
  /// A new layout replaces the current one only when it lowers the expected max/mean rank load (for
  /// the load estimate) by at least this much, so a steady load does not move experts back and forth.
  double min_gain = 0.02;
};

/// Settings of one training run.
struct TrainOptions {
  LayerOptions layer{};  ///< chunks, overlap, flat or hierarchical exchange (results do not change)
  std::int64_t steps = 200;
  std::int64_t tokens_per_rank = 256;
  std::uint64_t seed = 1;
  AdamWOptions adam{};
  /// Aux-loss-free balancing (DeepSeek-V3): after each optimiser step every student layer updates
  /// its selection bias b_e += gamma * sign(mean_load - load_e) from the global per-expert load of
  /// that step (summed over all ranks, so the bias is identical on every rank). 0 = off;
  /// DeepSeek-V3 uses 0.001. Must be >= 0.
  float bias_update_speed = 0.0f;
  /// Auxiliary balance losses of every student layer (off when both coefficients are 0). Each rank's
  /// loss is over its own shard (seq_len = 0: the whole shard is one sequence). The coefficients mean
  /// the same at any world size: the optimised term is the MEAN over ranks of the per-rank loss with
  /// these coefficients (the trainer hands each layer alpha / world_size, because the layer adds its
  /// loss gradient with upstream 1 on every rank and replicated gradients are summed across ranks).
  /// All three must be >= 0.
  AuxLossOptions aux{};
  ReplicaOptions replicas{};
  /// A fixed skew of the student's router for balancing experiments: apply_zipf_selection_bias with
  /// this exponent (0 = none; >= 0). Bias updates, when on, then work against it.
  double skew = 0.0;
  /// Router evaluation (DeepSeekMoE statistics paper, arXiv 2505.10860): a fixed set of this many
  /// tokens (the same at every evaluation and at any rank count; 0 = off) goes through the student
  /// after steps 1, eval_every, 2 eval_every, ... and the last one, and each layer's top-K selections
  /// are kept (on rank 0) for the router change rate and saturation.
  std::int64_t eval_tokens = 0;
  std::int64_t eval_every = 10;  ///< >= 1
};

/// One layer's router telemetry of a step (global: every rank's tokens).
struct LayerTelemetry {
  std::vector<std::int64_t> expert_load;  ///< [E] picks per routed expert (before capacity drops)
  double jain_index = 0.0;                ///< (sum l)^2 / (E sum l^2): 1 = perfectly even, 1/E = one expert
  double load_max_mean = 0.0;             ///< max / mean of expert_load
  double load_max_minus_mean_over_mean = 0.0;  ///< (max - mean) / mean
  std::int64_t picks_dropped = 0;         ///< capacity-factor mode: picks over capacity
  /// Hidden-vector bytes the student's forward and backward of this step sent to ranks on the same
  /// node / on other nodes (all ranks; the small metadata exchanges not counted).
  std::int64_t bytes_intra_node = 0, bytes_inter_node = 0;
  /// Evaluation steps after the first: 100 - |S_t n S_t-1| / |S_t-1| x 100 of the evaluation set's
  /// (token, expert) selections; -1 elsewhere.
  double router_change_rate = -1.0;
};

/// Router saturation of one evaluation: |S_t n S_T| / |S_T| x 100 per layer, S_T the last evaluation's.
struct RouterSaturation {
  std::int64_t step = 0;
  std::vector<double> saturation;  ///< per layer, percent
};

/// What one step measured (identical on every rank except `ms`, which is this rank's).
struct StepRecord {
  std::int64_t step = 0;
  double loss = 0.0;             ///< mean squared error over all ranks' tokens
  double ms = 0.0;               ///< wall time of the step on this rank
  double tokens_per_s = 0.0;     ///< all ranks' tokens / step time
  double max_mean_load = 0.0;    ///< worst layer's max/mean tokens per expert
  /// Auxiliary balance loss (sequence-wise + expert-level), summed over layers and averaged over
  /// ranks: exactly the term the step optimised on top of `loss` (see TrainOptions::aux). 0 when off.
  double aux_loss = 0.0;
  /// Worst layer's max over ranks / mean of the (token, expert) entries each rank's experts computed:
  /// the compute imbalance that replicas flatten.
  double max_mean_rank_load = 0.0;
  /// Expert slot blocks moved between ranks at the start of this step (all layers and ranks).
  std::int64_t migrated_slots = 0;
  /// Capacity-factor mode: (token, expert) picks dropped over capacity, all ranks and layers.
  std::int64_t picks_dropped = 0;
  std::vector<LayerTelemetry> layers;  ///< per student layer
  bool evaluated = false;              ///< the router evaluation ran after this step
  double eval_ms = 0.0;                ///< its wall time on this rank (not in `ms`)
};

/// The seed paper's expert-estimation task: a fixed random teacher DeepSeekMoE model produces
/// targets from random inputs; a student of the same shape learns them with MSE and AdamW. Each rank
/// draws its own data shard; expert parameters are sharded, replicated ones all-reduced.
/// Optional load balancing: auxiliary losses, the aux-loss-free selection bias, and hot-expert
/// replicas with migration (TrainOptions).
class Trainer {
 public:
  /// Throws ConfigError for invalid options (steps < 0, tokens_per_rank < 1, negative
  /// bias_update_speed, aux settings or skew, non-finite values, replica settings out of range).
  Trainer(const MoeConfig& config, comm::Communicator& comm, TrainOptions options);
  ~Trainer();
  /// Runs one step (a collective).
  StepRecord step();
  MoeModel& student() { return *student_; }
  MoeModel& teacher() { return *teacher_; }
  /// Runs the MoE layers of the teacher and the student through `executor` (e.g. on a GPU; see
  /// LayerExecutor), null: on the host again. The trainer tells it after every optimiser step and
  /// selection-bias update and replica migration. ConfigError when the executor rejects a layer (its
  /// check(), e.g. a schedule it cannot run).
  void set_executor(LayerExecutor* executor);
  const TrainOptions& options() const { return options_; }
  /// Steps trained so far (a loaded checkpoint's included).
  std::int64_t steps_done() const { return step_; }

  /// Saves a checkpoint of this step into `dir`/step-NNNNNNNN (a collective; `dir` must be one folder
  /// every rank sees) and returns that folder. In it: the student in Hugging Face DeepSeek names as
  /// safetensors shards model-0000k-of-0000{P+1} (shard 1 the replicated tensors, written by rank 0;
  /// shard r+2 the experts whose first replica rank r holds) with model.safetensors.index.json and
  /// config.json; the AdamW moments of the same tensors (`NAME.exp_avg`, `NAME.exp_avg_sq`) in the
  /// trainer-* shards of the same numbers; trainer_state.json (step, seed, world size, optimiser step, each layer's schedule,
  /// replica layouts, load trackers and a plan in flight); checksums.json (every file's size and
  /// a word-wise FNV-1a 64, Checksum). Written under a temporary name, synced, then renamed: a crash leaves the previous
  /// checkpoints as they were. Then `dir`/latest names it, and with keep > 0 only the newest `keep`
  /// checkpoints stay. IoError on every rank when any rank fails.
  std::string save_checkpoint(const std::string& dir, std::int64_t keep = 0);
  /// Loads a checkpoint (a folder save_checkpoint() wrote, or `dir` whose `latest` names one; a
  /// collective) into this trainer built with the same model config and seed: every file's checksum
  /// is verified before it is read, every tensor's name and shape; the student's weights, selection
  /// biases and AdamW state, the step, the schedules fixed at saving (explicit, or chosen by auto),
  /// and with replicas the layouts, trackers and a pending plan. Saved at another world size, the
  /// tensors load by name from whichever shard holds them (replica layouts restart from this run's).
  /// Training on gives bitwise the uninterrupted run's results at the same world size and schedule.
  /// ConfigError (model or seed differ) or IoError naming the file and rule, on every rank.
  void load_checkpoint(const std::string& path);
  /// Starts the student from a Hugging Face DeepSeek checkpoint (HfCheckpoint::open: a file, a
  /// sharded folder or its index; F32, BF16, F16 or FP8 with block scales): student layer i takes the
  /// i-th MoE layer the checkpoint holds (model.layers.N.mlp., in N order; load_hf_layer) and that
  /// block's `post_attention_layernorm.weight` when present. Every rank reads the replicated tensors
  /// and its own experts. A collective; IoError (on every rank) when the checkpoint holds fewer MoE
  /// layers than the model has, or for any tensor load_hf_layer refuses.
  void init_from(const std::string& path);
  /// Router saturation of every evaluation so far against the latest (rank 0; empty elsewhere or
  /// without evaluations). The evaluations are not saved in checkpoints: after a resume they start again.
  std::vector<RouterSaturation> router_saturation() const;
  /// The evaluations' routing decisions (rank 0): per evaluation its step and, per layer, the
  /// [eval_tokens, K] expert ids in global token order.
  struct EvalRoutes {
    std::int64_t step = 0;
    std::vector<std::vector<std::int32_t>> ids;
  };
  const std::vector<EvalRoutes>& eval_routes() const { return evals_; }
  /// The evaluation set's tokens, [eval_tokens, H] in global order (rank 0; this rank's share elsewhere).
  const std::vector<float>& eval_inputs() const { return eval_x_all_; }

 private:
  /// A collective after each phase of a save or load: rethrows this rank's error, or throws one
  /// naming the rank that failed.
  void agree(const std::string& what, std::exception_ptr error);
  MoeConfig config_;
  comm::Communicator& comm_;
  TrainOptions options_;
  sched::Topology topology_;
  sched::ExpertPlacement placement_;
  std::unique_ptr<MoeModel> teacher_, student_;
  AdamW optimizer_;
  std::int64_t step_ = 0;
  std::vector<float> x_, target_, y_, dy_;
  std::vector<std::int64_t> loads_;  // [L][E + P + 1]: per-expert picks, per-rank entries, drops
  double sums_[2] = {0.0, 0.0};  // squared error, aux loss: reduced together
  // Replicas: a load tracker per layer, the planner's thread, and the plan in flight.
  std::vector<sched::LoadTracker> trackers_;
  std::int64_t slots_per_rank_ = 0;
  std::unique_ptr<Stream> planner_;
  Event planned_;
  bool plan_pending_ = false;
  std::int64_t apply_at_ = 0;
  std::vector<sched::ReplicaLayout> planned_layouts_;
  std::int64_t apply_planned_layouts();
  void request_plan();
  /// The router evaluation after a step (a collective): fills r.layers[*].router_change_rate.
  void evaluate(StepRecord& r);
  std::vector<std::int64_t> bytes_;       // [L][2] this step's intra/inter-node bytes, reduced
  std::vector<std::int64_t> bytes_seen_;  // [L][2] the layers' counters at the step's start
  std::vector<float> eval_x_, eval_y_, eval_x_all_;
  std::vector<std::int32_t> eval_ids_, eval_gathered_;
  std::vector<EvalRoutes> evals_;  // rank 0
  bool eval_inputs_gathered_ = false;
};

/// The per-step line of the training log: `step | loss | ms | tokens/s | max/mean expert load |
/// max/mean rank load`, plus a seventh column `aux loss` when `with_aux` (auxiliary losses on).
std::string format_step(const StepRecord& r, bool with_aux = false);
/// The header that goes above those lines (same `with_aux`).
std::string step_header(bool with_aux = false);
/// One JSON object (a line) for `--log-json`.
std::string step_json(const StepRecord& r);

}  // namespace moex
