// MoELayer: one DeepSeekMoE layer, forward and backward, with routed experts sharded across ranks.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "runtime/kernels/balance.h"
#include "runtime/kernels/expert_ffn.h"
#include "runtime/io/moe_config.h"
#include "runtime/layer/expert_layout.h"
#include "runtime/layer/pass.h"
#include "runtime/layer/pass_plan.h"
#include "runtime/stream.h"
#include "scheduler/auto_schedule.h"
#include "scheduler/expert_placement.h"
#include "scheduler/pipeline_model.h"
#include "scheduler/replica_planner.h"
#include "scheduler/exchange_plan.h"
#include "scheduler/topology.h"

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
  /// The balance-loss kernels' parameters for `tokens` tokens of a layer with `experts` routed
  /// experts and top-`topk` routing.
  kernels::BalanceLossParams params(std::int64_t tokens, std::int64_t experts, std::int64_t topk) const {
    kernels::BalanceLossParams p;
    p.tokens = tokens;
    p.experts = experts;
    p.topk = topk;
    p.seq_len = seq_len;
    p.seq_alpha = seq_alpha;
    p.expert_alpha = expert_alpha;
    return p;
  }
};

/// How routed tokens travel between ranks.
enum class ExchangeKind {
  kFlat,          ///< one all-to-all: each token goes straight to every rank holding its experts
  kHierarchical,  ///< a token crosses to another node once per node (to the rank with this rank's
                  ///< local index there), which forwards it inside its node; combine reverses it
};
const char* to_string(ExchangeKind k);
/// "flat" or "hierarchical"; throws ConfigError otherwise.
ExchangeKind exchange_from_string(const std::string& s);

/// How a layer schedules one pass. Every rank must use the same options. Results are bitwise the
/// same for every overlap and exchange choice (the canonical orders of sched::ExchangePlan make them
/// so), and for every chunk count too with `deterministic`.
struct LayerOptions {
  /// Pipeline chunks: chunk i+1's exchange runs while chunk i computes. 0 = auto (the default): the
  /// first passes run unsplit and are measured, then a cost model (sched::predict over the measured
  /// GEMM and link rates) picks chunks and local_first for the slowest rank (see ScheduleChoice).
  int chunks = 0;
  bool overlap = true;   ///< exchanges on a communication stream (thread) beside the compute
  ExchangeKind exchange = ExchangeKind::kFlat;
  /// 0 (default): dropless. > 0: capacity-factor mode. Each rank lets at most
  /// C = ceil(capacity_factor * tokens * K / E) of its own `tokens` picks reach each expert (the
  /// GShard / DeepSpeed-MoE rule over the rank's local tokens); of an expert's picks the C with the
  /// largest routing weight are kept (ties to the earlier token, then the earlier top-K position), the
  /// rest are dropped: they add nothing to the output and get no gradient. Counted in
  /// LayerRouteStats::picks_dropped. Results stay independent of chunks, overlap and exchange.
  double capacity_factor = 0.0;
  /// Bitwise the same results for every chunk count: the routed experts' row-wise GEMMs use
  /// kernels::rowwise_gemm (each row's result independent of the rows it is computed with) instead
  /// of BLAS sgemm, whose result for a row changes with the rows in the call. Slower. Without it,
  /// results are bitwise the same across overlap and exchange for a fixed chunk count, and agree
  /// across chunk counts to fp32 rounding.
  bool deterministic = false;
  /// Flat exchange, more than one rank: the rows a rank routes to itself skip the exchange and are
  /// computed first (one GEMM per expert over every chunk's) while the other ranks' rows travel.
  /// Only read when chunks > 0 (auto decides it).
  bool local_first = false;
  /// Local-first with the forward's own rows in two halves (sched::Schedule::local_split): the first
  /// while the other ranks' rows travel in, the second while their results travel back; the
  /// backward runs as local_first. Implies local_first.
  bool local_split = false;
};

/// The schedule a layer runs and, with `chunks = 0` (auto), how it was chosen.
using ScheduleChoice = sched::ScheduleChoice;

/// What one forward pass routed (layer::RouteStats, counted by layer::PassPlan::count).
using LayerRouteStats = layer::RouteStats;

/// Bytes this rank sent to other ranks, and stage times (milliseconds), summed over forward and
/// backward passes since reset_counters(). Compute stages run on the calling thread; `comm` is the
/// busy time of the communication stream (time inside exchanges, waiting for peers included).
struct LayerCounters {
  std::int64_t bytes_intra_node = 0, bytes_inter_node = 0;
  double gate = 0, permute = 0, experts = 0, combine = 0, shared = 0;  // compute thread
  double dispatch = 0, combine_comm = 0;                                // comm stream
  double compute() const { return gate + permute + experts + combine + shared; }
  double comm() const { return dispatch + combine_comm; }
};

/// One MoE layer on this rank:
///   y = shared(x) + sum_{k} w_k(x) * expert_{id_k}(x)
/// The gate and the shared experts are replicated on every rank; the routed experts this rank owns
/// (per `placement`) are stored here. forward() and backward() are collectives over `comm`: every
/// rank calls them in the same order, each with its own tokens (0 allowed).
///
/// Parameter layout: replicated() = [gate.weight E*H | shared w13 2Fs*H | shared w2 H*Fs];
/// experts() = per local slot [w13 2F*H | w2 H*F], where w13 stacks gate_proj over up_proj.
class MoELayer : private layer::PassSteps {
 public:
  /// `topology` defaults to every rank on one node.
  MoELayer(const MoeConfig& config, comm::Communicator& comm, sched::ExpertPlacement placement,
           std::string name, std::optional<sched::Topology> topology = std::nullopt, LayerOptions options = {});
  /// Replica mode: the routed experts live in the physical slots of `layout` (every rank has
  /// layout.slots_per_rank() slots; hot experts may have several replicas). A token's pick goes to the
  /// replica ReplicaLayout::choose() names (one on the token's node when there is one), and
  /// reduce_replica_grads() keeps the replicas identical. set_replica_layout() changes the layout.
  MoELayer(const MoeConfig& config, comm::Communicator& comm, sched::ReplicaLayout layout, std::string name,
           std::optional<sched::Topology> topology = std::nullopt, LayerOptions options = {});
  ~MoELayer();

  /// Changes the schedule (between passes; every rank alike; auto measures and chooses again). Throws
  /// InvalidArgument on chunks < 0.
  void set_options(const LayerOptions& options);
  const LayerOptions& options() const { return options_; }
  const sched::Topology& topology() const { return where_.topology(); }
  const LayerCounters& counters() const { return counters_; }
  /// The schedule of the next pass (and with auto how it was chosen).
  const ScheduleChoice& schedule_choice() const { return auto_.choice(); }
  /// Passes auto measures before it chooses (the first pays first touches; the second is measured).
  static constexpr int kAutoPasses = sched::AutoSchedule::kMeasuredPasses;
  void reset_counters() { counters_ = {}; }

  const MoeConfig& config() const { return config_; }
  /// The one-replica placement the layer was built with. InvalidArgument in replica mode.
  const sched::ExpertPlacement& placement() const;
  /// The replica layout (replica mode), or nullopt.
  const std::optional<sched::ReplicaLayout>& replica_layout() const { return where_.replicas(); }
  /// Logical expert held in each physical slot of rank `r` (placement mode: the experts it owns).
  std::span<const std::int64_t> slot_experts(int r) const { return where_.slots(r); }
  /// Where the routed experts live (placement or replica layout, topology).
  const layer::ExpertLayout& expert_layout() const { return where_; }
  const std::string& name() const { return name_; }
  int rank() const { return comm_.rank(); }
  comm::Communicator& communicator() { return comm_; }
  /// Physical expert slots on this rank.
  std::int64_t num_local_experts() const { return static_cast<std::int64_t>(slot_experts(comm_.rank()).size()); }

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
  /// For a LayerExecutor that ran this layer's forward elsewhere: the auxiliary losses of that pass.
  void set_aux_loss_value(const kernels::BalanceLossValue& value) { aux_value_ = value; }

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
  /// Replica mode: sums the gradients of every expert that has several replicas over those replicas
  /// (one all-reduce of the multi-replica experts' blocks over all ranks; a rank holding none
  /// contributes zeros), so every replica gets the expert's full gradient and, updated by the same
  /// optimiser, stays identical. A blocking collective; nothing to do (and no communication) when
  /// every expert has one replica. Call it where allreduce_replicated_grads() is called.
  void reduce_replica_grads();
  /// reduce_replica_grads() in two halves, so the all-reduce can travel beside others: start returns
  /// the all-reduce (null when there is nothing to reduce); after it completed, finish copies the sums
  /// into every replica's gradient.
  comm::WorkPtr start_replica_grad_reduce();
  void finish_replica_grad_reduce();
  /// Replica mode, a collective at a step boundary: moves to layout `to` (same experts and world
  /// size; slots per rank may change). Every new slot's parameters are copied from a replica of its
  /// expert in the current layout (sched::plan_migration: same slot, same rank, same node, else any
  /// holder), and so are the per-slot buffers in `slot_state` (e.g. the optimiser's moments of
  /// experts(): each [slots * expert_stride()] floats, resized to the new slot count; empty ones are
  /// left alone). Expert gradients are cleared. Returns the number of slot blocks this rank received
  /// from other ranks. InvalidArgument outside replica mode or on a mismatched layout or buffer.
  std::int64_t set_replica_layout(const sched::ReplicaLayout& to, std::span<std::vector<float>* const> slot_state = {});

  const LayerRouteStats& route_stats() const { return stats_; }
  /// For a LayerExecutor that ran this layer's forward elsewhere: the statistics of that pass.
  void set_route_stats(const LayerRouteStats& stats) { stats_ = stats; }
  /// The exchange of the last forward: its send rows, and this rank's receive layout (entries each
  /// local slot processed: slot_entries()).
  const sched::ExchangePlan& exchange_plan() const { return pass_.main; }
  /// Top-K expert ids [tokens, K] and weights of the last forward.
  const std::vector<std::int32_t>& topk_ids() const { return topk_ids_; }
  const std::vector<float>& topk_weights() const { return topk_weights_; }
  /// [tokens, K] of the last forward: 1 where the pick reached its expert, 0 where capacity dropped it.
  const std::vector<std::uint8_t>& topk_kept() const { return pass_.kept; }

 private:
  struct Chunk;  // per pipeline chunk: the events of its exchanges (moe_layer.cpp)

  MoeConfig config_;
  comm::Communicator& comm_;
  std::string name_;
  layer::ExpertLayout where_;  // placement or replica layout, and the topology
  LayerOptions options_;
  std::int64_t hidden_, ffn_, shared_ffn_, experts_total_, topk_;

  ParamBlock replicated_;
  ParamBlock experts_;
  bool expert_grads_stale_ = false;  // zero_grad() happened; experts_.grad not cleared yet
  std::vector<float> bias_;
  AuxLossOptions aux_;
  kernels::BalanceLossValue aux_value_;
  std::vector<float> d_scores_;
  std::unique_ptr<Stream> comm_stream_;
  bool comm_stream_threaded_ = false;
  std::vector<float> replica_grad_;                      // reduce_replica_grads() buffer
  bool replica_reduce_pending_ = false;

  // Saved by forward for backward; reused across steps so no step allocates once warm.
  std::int64_t tokens_ = 0;
  int chunks_used_ = 1;
  layer::OwnRows own_rows_;                               // this pass: local-first / local-split
  std::vector<std::pair<int, int>> stage_;                // (source, chunk) blocks of the current stage,
  std::pair<std::int64_t, std::int64_t> stage_slots_;    // its local slots [first, second),
  bool stage_starts_ = true, stage_completes_ = true;    // whether it starts / completes its rows' sums
  std::vector<float> x_, scores_, topk_weights_;
  std::vector<std::int32_t> topk_ids_;
  std::vector<std::unique_ptr<Chunk>> chunks_;
  layer::PassPlan pass_;         // the pass's plans (written once with the GPU layer)
  // The row buffers a pass moves between, by layer::Buf (sized by layer::buffer_rows), and the
  // dw twins of those that return rows in backward (the K routing-weight gradients of each row).
  std::array<std::vector<float>, layer::kOwnedBufs> rows_, rows_dw_;
  bool grad_pass_ = false;           // layer::Buf::kRecv is rgrad_ (backward) or its rows_
  const float* pass_in_ = nullptr;   // the rows sent: x_ (forward) or dy (backward)
  float* pass_out_ = nullptr;        // layer::Buf::kOut: y (forward) or dx (backward)
  std::vector<float> rgrad_;                              // [rows, H] canonical received dL/dy rows
  std::vector<float> xe_, h13_, sig_, a_, ye_;            // per-entry expert activations
  std::vector<float> shared_h13_, shared_sig_, shared_a_, shared_dh13_;
  std::vector<float> dye_, dxe_, dh13_, dpick_, d_weights_, dlogits_;
  LayerRouteStats stats_;
  LayerCounters counters_;
  // --chunks auto: counters nobody resets and their values at this pass's start and forward's end
  // (the measured pass's stage times), and the schedule over the passes.
  LayerCounters own_, pass_start_, fwd_end_;
  sched::AutoSchedule auto_;

  // Both public constructors: exactly one of placement and layout is set.
  MoELayer(const MoeConfig& config, comm::Communicator& comm, std::string name,
           std::optional<sched::ExpertPlacement> placement, std::optional<sched::ReplicaLayout> layout,
           std::optional<sched::Topology> topology, const LayerOptions& options);
  bool hierarchical() const { return options_.exchange == ExchangeKind::kHierarchical; }
  kernels::GemmKind gemm_kind() const {
    return options_.deterministic ? kernels::GemmKind::kRowwise : kernels::GemmKind::kBlas;
  }
  kernels::BalanceLossParams aux_params(std::int64_t tokens) const;
  std::chrono::steady_clock::time_point deadline() const;
  /// Routes this pass's picks, exchanges their metadata (on the communication stream) and finishes
  /// the plans (PassPlan).
  void plan_pass(int chunks);
  void size_rows(bool dw);
  // layer::RowMoves: the moves of layer::dispatch / give_back / relay / sum_returns on host memory
  // (the exchanges run on the communication stream and complete before they return).
  float* rows(layer::Buf b, bool dw);
  void gather(std::int64_t n, const std::vector<std::int64_t>& index, std::int64_t at, layer::Buf src, layer::Buf dst,
              std::int64_t dst_row, bool dw) override;
  void copy(std::int64_t n, layer::Buf src, std::int64_t src_row, layer::Buf dst, std::int64_t dst_row,
            bool dw) override;
  void gather_values(std::int64_t n, const std::vector<std::int64_t>& index, std::int64_t at, layer::Buf src,
                     layer::Buf dst, std::int64_t dst_at) override;
  void sum(std::int64_t n, const std::vector<std::int64_t>& offsets, std::int64_t at,
           const std::vector<std::int64_t>& members, layer::Buf src, layer::Buf dst, std::int64_t dst_row,
           bool accumulate) override;
  void exchange(const sched::ExchangePlan& plan, int c, bool out, layer::Buf from, layer::Buf to, bool dw,
                bool skip_self, const std::string& label) override;
  void ready() override {}
  // layer::PassSteps: the steps of layer::run_forward / run_backward on the host (the exchanges
  // queued on the communication stream, waited for by events; the compute on this thread).
  const layer::PassPlan& pass_plan() const override { return pass_; }
  void send(int c, bool grad, bool skip_self) override;
  void shared(bool grad) override;
  void arrived(int c, bool grad) override;
  void experts(layer::Stage stage, bool grad) override;
  void start_return(int c, bool grad, bool skip_self) override;  // give_back and relay
  void weight_grads() override;
  void returning(int, bool) override {}  // start_return relayed on the communication stream
  void returned(int c, bool grad) override;
  bool accumulate() const override { return true; }  // shared() wrote kOut (zeros without shared experts)
  void run_experts_forward();   // over stage_
  void run_experts_backward();  // over stage_
  void tally(double LayerCounters::*field, double ms);  // into counters_ and own_
  void record_pass();
  /// Milliseconds of one expert FFN forward over `rows` rows (the best of two after a first run).
  double time_expert_ffn(std::int64_t rows);
  void resolve_schedule();
  void count_bytes(std::span<const std::int64_t> send_elems, std::int64_t elem_bytes);
  layer::HostBlocks blocks_;  // the row exchanges' counts and displacements (communication stream)
};

}  // namespace moex
