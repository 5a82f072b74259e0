// GpuMoELayer: one DeepSeekMoE layer, forward and backward, on one GPU: all routed experts here, or
// this rank's share of them with the rows exchanged between ranks (expert-parallel mode).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "comm/communicator.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/grouped_gemm.h"
#include "runtime/cuda/stage_profile.h"
#include "runtime/layer/expert_layout.h"
#include "runtime/layer/pass_plan.h"
#include "scheduler/auto_schedule.h"
#include "scheduler/exchange_plan.h"
#include "runtime/kernels/gate.h"
#include "runtime/io/moe_config.h"
#include "runtime/moe_layer.h"
#include "scheduler/expert_placement.h"
#include "scheduler/replica_planner.h"
#include "scheduler/topology.h"

namespace moex {
class MoELayer;
}

namespace moex::cuda {

/// Arithmetic of a GpuMoELayer. The layer's inputs and outputs (x, y, dy, dx) are fp32 either way.
///   kFp32: everything fp32 (cuBLAS without TF32): equals the CPU MoELayer up to summation order.
///   kBf16: the shared and routed expert weights, their gradients and the activations of their GEMMs
///          (gathered rows, h13, sig, a, expert outputs, their gradients) are bf16, every GEMM
///          accumulates in fp32; the gate (weights, scores, top-K, its gradients) stays fp32.
enum class LayerPrecision { kFp32, kBf16 };
const char* to_string(LayerPrecision p);
/// "fp32" or "bf16"; throws ConfigError otherwise.
LayerPrecision precision_from_string(const std::string& s);

struct GpuLayerOptions {
  LayerPrecision precision = LayerPrecision::kFp32;
  GroupedGemmImpl gemm = GroupedGemmImpl::kGroupedBatched;
  /// Shared experts on the layer's own second stream, overlapping gate, permute and routed experts
  /// (joined with an event before the combine). Off: everything runs on the caller's stream.
  bool overlap_shared = true;
  /// Record CUDA events between stages (see GpuLayerTimes); costs a few microseconds per pass.
  bool profile = false;
  // The schedule: each as the LayerOptions field of the same name, the same on every rank
  // (make_gpu_layer_like copies them from a CPU layer).
  /// Expert-parallel layers. Off: each exchange is waited for on the host as soon as it is issued
  /// (nothing computes while rows travel).
  bool overlap = true;
  /// Expert-parallel layers, pipeline chunks: chunk i+1's rows travel (on the device communicator's
  /// stream) while chunk i's experts run on the caller's stream.
  int chunks = 1;
  /// Expert-parallel layers over the flat exchange with more than one rank: the rows a rank routes
  /// to itself skip the exchange and compute while the other ranks' rows travel (LayerOptions
  /// local_first); with local_split, the forward's own rows in two halves, the second hiding the
  /// last return (implies local_first). Both are ignored elsewhere, as on the CPU.
  bool local_first = false;
  bool local_split = false;
  /// 0 = dropless; > 0 = capacity-factor mode (sched::apply_capacity). Single-GPU layers are
  /// dropless only.
  double capacity_factor = 0.0;
  /// The routed experts' GEMMs through fixed_order_gemm (GroupedGemmImpl::kFixedOrder, overriding
  /// `gemm`) and, in expert-parallel mode, their weight gradients once per backward over each
  /// slot's rows in canonical order: bitwise the same results for every `chunks`. Slower.
  bool deterministic = false;
  /// kHierarchical: a token goes once to each destination node, to the rank there with this rank's
  /// local index (the constructor's topology), which forwards it inside its node. Single-GPU
  /// layers need kFlat.
  ExchangeKind exchange = ExchangeKind::kFlat;
};

/// One MoE layer on the current CUDA device:
///   y = shared(x) + sum_k w_k(x) * expert_{id_k}(x)
/// with MoELayer's semantics: the gate of kernels::gate_forward (softmax / sigmoid, selection bias,
/// group limit, top-K, normalisation, scaling) and the auxiliary balance losses (set_aux_loss).
/// Two modes:
///   single GPU (first constructor): all E experts here, dropless. The picks are sorted by expert
///     on the device (a stable counting sort); forward waits once, after queuing the gather, for
///     the E row counts the grouped GEMM needs on the host.
///   expert-parallel (the others): this rank's slots of a placement or replica layout. forward()
///     and backward() are collectives (every rank, in the same order, each with its own tokens, 0
///     allowed) running the pass of runtime/layer/pass.h: the top-K to the host, the layer::PassPlan
///     (its metadata over the HOST communicator, capacity factor and replica choice included), then
///     chunk by chunk the rows over the DEVICE communicator (NcclCommunicator: on its stream,
///     ordered by CUDA events; StagedCommunicator: through pinned host memory), this rank's
///     experts, and the sums back (flat, or hierarchical through a forwarder per node).
/// Both modes run the routed experts of a stage through expert_stage(). The results equal those
/// of a CPU MoELayer of the same layout (fp32 mode: up to summation order).
///
/// Parameters and gradients live in device buffers with the CPU layer's layouts:
///   gate_weight() / gate_grad()      fp32 [E, H]
///   shared_params() / shared_grads() [w13 2Fs*H | w2 H*Fs] (Fs = n_shared * ffn; empty when 0)
///   expert_params() / expert_grads() per slot: [w13 2F*H | w2 H*F] at slot * 3F*H
/// the last two of element type dtype(). Gradients accumulate over backward() calls (bf16 ones
/// with one rounding per call, and per chunk in expert-parallel mode); zero_grad() clears them
/// (the shared and expert ones lazily: the next backward overwrites them). In expert-parallel mode
/// the replicated gradients hold this rank's share until allreduce_replicated_grads().
///
/// Streams: forward() and backward() queue on the caller's `stream` (and the layer's second
/// stream) and return before the results are ready. `x` must stay unchanged until the matching
/// backward() has run (it is read again, not copied). Use one stream per layer, alive as long as
/// the layer (the grouped GEMM's pointer table lives on it). Workspace grows to the largest pass
/// seen (or reserve()d): once warm, no pass allocates device memory. Not thread-safe.
class GpuMoELayer {
 public:
  /// Validates `config` and allocates the parameters (zeros, no selection bias) and gradients
  /// (zeros) on the current device. Throws ConfigError for an invalid config, CudaError without a
  /// usable device. (A gate too wide for the device kernels is reported by the first forward.)
  explicit GpuMoELayer(const MoeConfig& config, GpuLayerOptions options = {});
  /// Expert-parallel mode. `host_comm` (host buffers, e.g. an MpiCommunicator) and `device_comm`
  /// (device buffers: a NcclCommunicator or a StagedCommunicator) span the same ranks in the same
  /// order, with the placement's world size; both must outlive the layer. `topology` (the nodes of
  /// the ranks; default: one node) matters to the hierarchical exchange only. Throws InvalidArgument
  /// when they do not match, when `device_comm` is neither kind, when chunks < 1, or when this rank
  /// holds no routed expert.
  GpuMoELayer(const MoeConfig& config, comm::Communicator& host_comm, comm::Communicator& device_comm,
              sched::ExpertPlacement placement, GpuLayerOptions options = {},
              std::optional<sched::Topology> topology = std::nullopt);
  /// Expert-parallel replica mode (MoELayer's): the routed experts live in the physical slots of
  /// `layout` (layout.slots_per_rank() on every rank; hot experts may have several replicas), and
  /// each pick goes to the replica ReplicaLayout::choose(expert, this rank, token, topology) names, as
  /// on the CPU. After backward the expert gradients are per slot (each replica of an expert holds
  /// the part its tokens gave); allreduce_replicated_grads() sums them over the replicas. InvalidArgument
  /// as above, or for a layout or topology of another world size or expert count.
  GpuMoELayer(const MoeConfig& config, comm::Communicator& host_comm, comm::Communicator& device_comm,
              sched::ReplicaLayout layout, sched::Topology topology, GpuLayerOptions options = {});
  ~GpuMoELayer();
  GpuMoELayer(const GpuMoELayer&) = delete;
  GpuMoELayer& operator=(const GpuMoELayer&) = delete;

  const MoeConfig& config() const { return config_; }
  const GpuLayerOptions& options() const { return options_; }
  /// The schedule of the last pass (the first pass's before any): the options' (sched::fixed_schedule:
  /// local-first only over the flat exchange with more than one rank), or with chunks 0 (auto) the
  /// candidate it tried, then the one chosen (see schedule_choice()). A forward fixes its pass's.
  sched::Schedule schedule() const;
  /// Expert-parallel layers: the schedule and, with chunks 0, how the trials chose it
  /// (sched::TrialSchedule: every candidate timed on the device over two passes, the slowest rank's
  /// times compared). Null for a single-GPU layer.
  const sched::ScheduleChoice* schedule_choice() const;
  /// Expert-parallel, chunks 0: takes over another layer's decided trials (`from`, e.g. the layer
  /// this one replaces after a replica migration) instead of trying again (TrialSchedule::adopt).
  void keep_schedule(const sched::ScheduleChoice& from);
  /// The host's deadline for waits on the device: the device communicator's timeout, else
  /// default_wait_timeout().
  std::chrono::milliseconds wait_timeout() const {
    return device_comm_ ? device_comm_->default_timeout() : default_wait_timeout();
  }
  /// Element type of the shared and expert parameters, gradients and activations.
  DType dtype() const { return dtype_; }

  /// Copies every parameter (gate, shared and routed experts, converted to dtype()) and the
  /// selection bias from `cpu`, a layer of the same config holding the same experts in the same
  /// slots (single-GPU mode: all E in order, slot e = expert e; expert-parallel mode: this rank's
  /// experts of the placement), and its auxiliary loss options. Synchronous. Gradients are not
  /// touched. InvalidArgument naming the mismatch otherwise (the capacity factor included: it is
  /// this layer's GpuLayerOptions::capacity_factor).
  void load_from(MoELayer& cpu);
  /// The auxiliary balance losses (MoELayer's options; off by default): each forward computes them
  /// on the device from the gate's scores over this layer's tokens (in expert-parallel mode, this
  /// rank's, as MoELayer does), and backward adds their gradient (upstream gradient 1) to the gate's.
  /// InvalidArgument for seq_len < 0.
  void set_aux_loss(const AuxLossOptions& options);
  const AuxLossOptions& aux_loss() const { return balance_; }
  /// The auxiliary losses of the last forward (zeros when off or without tokens); synchronises
  /// `stream`.
  kernels::BalanceLossValue aux_loss_value(cudaStream_t stream) const;
  /// Sets the selection bias (e_score_correction_bias): `bias` has E values, or none to remove it.
  /// Synchronous.
  void set_selection_bias(const std::vector<float>& bias);

  /// Sets every gradient to zero (queued on `stream`; the shared and expert ones lazily).
  void zero_grad(cudaStream_t stream);
  /// Grows the workspace to `tokens` tokens now (synchronises `stream` and the layer's stream when
  /// it has to grow); forward() does it itself when needed.
  void reserve(std::int64_t tokens, cudaStream_t stream);

  /// y [tokens, H] = layer(x [tokens, H]), fp32 device pointers (null allowed when tokens == 0).
  /// Keeps what backward needs. InvalidArgument for tokens < 0 or a null pointer.
  void forward(const float* x, std::int64_t tokens, float* y, cudaStream_t stream);
  /// From dy [tokens, H] of the last forward: writes dx [tokens, H] (fp32 device pointers) and
  /// accumulates every parameter gradient. InvalidArgument without a forward before it.
  void backward(const float* dy, float* dx, cudaStream_t stream);
  /// Expert-parallel mode, a collective: sums the gate's and the shared experts' gradients over the
  /// ranks (in place, on the device communicator; bf16 shared gradients are summed in fp32), and in
  /// replica mode the gradient of each expert with several replicas over its replicas (in fp32, as
  /// MoELayer::reduce_replica_grads; every replica then holds the sum), after the work queued on
  /// `stream`, which then waits for the result. Nothing to do in single-GPU mode.
  void allreduce_replicated_grads(cudaStream_t stream);

  /// Whether the layer is expert-parallel (second constructor).
  bool expert_parallel() const { return device_comm_ != nullptr; }
  /// Routed expert slots this layer holds (E in single-GPU mode).
  std::int64_t num_local_experts() const { return local_; }
  /// The replica layout of a replica-mode layer (null otherwise).
  const sched::ReplicaLayout* replica_layout() const { return where_.replicas() ? &*where_.replicas() : nullptr; }
  /// The plans of the last expert-parallel forward (layer::PassPlan: the flat exchange's, or the
  /// hierarchical one's two stages); null in single-GPU mode.
  const moex::layer::PassPlan* pass_plan() const;

  // Device parameters and gradients (layouts in the class comment).
  float* gate_weight() { return gate_w_.data(); }
  float* gate_grad() { return gate_g_.data(); }
  void* shared_params() { return shared_w_.data(); }
  void* shared_grads() { return shared_g_.data(); }
  void* expert_params() { return expert_w_.data(); }
  void* expert_grads() { return expert_g_.data(); }
  /// Device selection bias [E], or null when there is none.
  const float* selection_bias() const { return has_bias_ ? bias_.data() : nullptr; }

  /// Host copies (synchronise `stream`), converted to fp32 and in MoELayer's layouts:
  /// replicated_grads_host() = [gate E*H | shared w13 | shared w2] (MoELayer::replicated().grad),
  /// expert_grads_host() = per expert [w13 | w2] (MoELayer::experts().grad on one rank).
  std::vector<float> replicated_grads_host(cudaStream_t stream);
  std::vector<float> expert_grads_host(cudaStream_t stream);
  /// Writes the gradients into `cpu`'s replicated().grad and experts().grad (same checks as
  /// load_from); synchronises `stream`.
  void copy_grads_to(MoELayer& cpu, cudaStream_t stream);

  /// Tokens of the last forward.
  std::int64_t tokens() const { return tokens_; }
  /// Top-K expert ids [tokens, K] and routing weights of the last forward (synchronise `stream`).
  std::vector<std::int32_t> topk_ids_host(cudaStream_t stream) const;
  std::vector<float> topk_weights_host(cudaStream_t stream) const;
  /// Rows each local expert slot processed in the last forward (host, [num_local_experts()]).
  const std::vector<std::int64_t>& expert_counts() const { return counts_; }
  /// Capacity-factor mode: this rank's picks the last forward dropped (0 when dropless).
  std::int64_t picks_dropped() const { return picks_dropped_; }
  /// Times the workspace was (re)allocated since construction (stays put once warm).
  std::int64_t workspace_allocations() const { return allocations_; }
  /// Stage times of the last forward and backward (profile on); synchronises their events.
  GpuLayerTimes last_times() const;
  /// Turns the stage events (GpuLayerOptions::profile) on or off for the next passes.
  void set_profile(bool on);

 private:
  struct Events;   // the layer's CUDA events (gpu_layer.cu)
  struct EpState;  // expert-parallel buffers and pending exchanges (gpu_layer_ep.cu)
  struct EpStateDeleter {
    void operator()(EpState* p) const;
  };
  // Both public constructors (placement and communicators set together, or none).
  GpuMoELayer(const MoeConfig& config, GpuLayerOptions options, comm::Communicator* host_comm,
              comm::Communicator* device_comm, std::optional<sched::ExpertPlacement> placement,
              std::optional<sched::ReplicaLayout> layout = std::nullopt,
              std::optional<sched::Topology> topology = std::nullopt);
  void check_cpu_layer(MoELayer& cpu, const char* what) const;
  void init_ep();    // creates ep_ (gpu_layer_ep.cu)
  void settle_ep();  // waits (until the device communicator's timeout) for ep_'s exchanges in flight
  /// --chunks auto, before a pass: the last pass's device time to the trials, and once all are
  /// timed, the choice (a max-reduce over the host communicator). Waits for `stream` while trying.
  void schedule_ep(cudaStream_t stream);
  /// The expert-parallel pass (layer::run_forward / run_backward over EpState's steps) from `xin` /
  /// `dyin` ([tokens, H], the layer dtype) into `out` (added to when `accumulate`).
  void forward_ep(const void* xin, void* out, bool accumulate, cudaStream_t stream);
  void backward_ep(const void* dyin, void* out, bool accumulate, cudaStream_t stream);
  /// The top-K to the host and the pass's plans (capacity, replica choice, hierarchical stages),
  /// their metadata exchanged over the host communicator (gpu_layer_ep.cu).
  void plan_ep(cudaStream_t stream);
  /// Queues the shared experts' forward (backward) on the layer's second stream when overlapping
  /// (joined later by join_shared()), else on `stream`; writes `out` (backward: dx, which the routed
  /// combine then adds to).
  void shared_forward(const void* xin, void* out, cudaStream_t stream);
  void shared_backward(const void* xin, const void* dyin, void* out, cudaStream_t stream);
  void join_shared(cudaStream_t stream);
  /// One stage of routed-expert work, for the single-GPU and the expert-parallel paths alike: the
  /// entries [first, first + count) in slot order read their rows of `in` at entry_row[e]
  /// (entry_row, entry_w_ and the entry buffers are indexed by entry). Forward: into xe_, the
  /// expert FFN, then output row r < rows of `out` = (add ? out[r] : 0) + the sum over i in
  /// [row_offsets[r], row_offsets[r+1]) of row_weight[i] * ye[row_entries[i]]. Backward: each
  /// entry's routing-weight gradient (d_entry_) and output gradient, the FFN's backward (its weight
  /// gradients later, in weight_grads, when `weights_later`), the same sums of the entries' input
  /// gradients, and dw_out[j] = d_entry_[dw_index[j]] for j < rows * K. `before_ffn` runs on the
  /// host once the rows are gathered (the single-GPU path reads its counts there).
  struct StageRows {
    std::int64_t first = 0, count = 0;        // the entries
    std::span<const std::int64_t> slot_rows;  // their split over the slots (read after before_ffn)
    const std::int64_t* entry_row = nullptr;
    const void* in = nullptr;
    std::int64_t rows = 0;
    const std::int64_t *row_offsets = nullptr, *row_entries = nullptr;
    const float* row_weight = nullptr;  // forward
    void* out = nullptr;
    bool add = false;  // the sums add to `out` (after join_shared: it holds the shared experts' part)
    const std::int64_t* dw_index = nullptr;  // backward
    float* dw_out = nullptr;                 // backward
    bool marks = false;  // the permute / experts / combine marks of the profile (single-GPU path)
  };
  void expert_stage(const StageRows& r, bool grad, bool weights_later, cudaStream_t stream,
                    const std::function<void()>& before_ffn = {});
  /// expert_stage's two halves: the entries' gathers and expert GEMMs, then the per-row sums (a
  /// stage whose rows have entries in several groups, as local-first's own rows, runs the GEMMs of
  /// each group, then the sums once).
  void expert_gemms(const StageRows& r, bool grad, bool weights_later, cudaStream_t stream,
                    const std::function<void()>& before_ffn = {});
  void expert_combine(const StageRows& r, bool grad, cudaStream_t stream);
  /// (Re)allocates the per-entry buffers of the routed experts (entry_w_ ... dh13_) for `rows` rows on `s`.
  void realloc_routed(std::int64_t rows, cudaStream_t s);
  /// Where the shared experts run: the second stream (after the work on `stream` so far) and its
  /// cuBLAS handle when overlapping, else `stream` itself.
  std::pair<cudaStream_t, cublasHandle_t> shared_stream(cudaStream_t stream);
  void upload_params(const float* host, std::int64_t n, void* dst);
  std::vector<float> download(const void* src, std::int64_t n, cudaStream_t stream) const;
  void mark(layer::Mark m, cudaStream_t stream);  // into the stage profile when profiling or tracing
  /// Queues the auxiliary losses of a forward of `tokens` tokens (sizing their buffers first).
  void balance_forward(std::int64_t tokens, cudaStream_t stream);

  MoeConfig config_;
  GpuLayerOptions options_;
  DType dtype_;
  std::int64_t hidden_, ffn_, shared_ffn_, experts_, topk_;
  moex::layer::ExpertLayout where_;  // where the routed experts live (one rank holding all E on one GPU)
  std::int64_t local_;               // routed expert slots held here (experts_ in single-GPU mode)

  // Expert-parallel mode (null / empty otherwise).
  comm::Communicator* host_comm_ = nullptr;
  comm::Communicator* device_comm_ = nullptr;
  kernels::GateParams gate_params_;

  // Declared first so that they outlive every buffer: the buffers are freed on aux_ (after waiting
  // for the caller's last pass, see the destructor).
  Stream aux_;
  CublasHandle blas_, blas_aux_;
  Events* events_ = nullptr;
  std::int64_t* counts_pinned_ = nullptr;  // [E] page-locked host copy of the device counts

  // Parameters, gradients.
  DeviceBuffer<float> gate_w_, gate_g_, bias_;
  DeviceBuffer<unsigned char> shared_w_, shared_g_, expert_w_, expert_g_;
  bool has_bias_ = false;
  bool shared_stale_ = false, expert_stale_ = false;  // zero_grad() happened; not cleared yet

  GroupedFfn expert_ffn_;
  std::optional<GroupedFfn> shared_mlp_;  // the shared experts as one FFN; none without them

  // Workspace, sized for capacity_ tokens (N = capacity_ * K routed rows).
  std::int64_t capacity_ = -1;
  std::int64_t allocations_ = 0;
  DeviceBuffer<float> scores_, topk_w_, d_weights_, dlogits_, entry_w_, d_entry_;
  DeviceBuffer<std::int32_t> topk_ids_;
  DeviceBuffer<std::int64_t> entry_token_, pick_entry_, csr_offsets_, counts_dev_;
  DeviceBuffer<unsigned char> xe_, h13_, sig_, a_, ye_, dye_, dxe_, dh13_;             // routed rows
  DeviceBuffer<unsigned char> sh_h13_, sh_sig_, sh_a_, sh_dh13_;                      // shared, per token
  DeviceBuffer<unsigned char> x_lp_, dy_lp_, out_lp_;                                 // bf16 [T, H] copies

  // Auxiliary balance losses: options, statistics of the last forward, its value and score gradient.
  AuxLossOptions balance_;
  kernels::BalanceLossParams balance_params_;  // of the last forward; tokens 0 = none computed
  DeviceBuffer<double> balance_scratch_, balance_value_;
  DeviceBuffer<float> d_scores_;  // [T, E]

  // State of the last forward.
  std::int64_t tokens_ = 0;
  bool have_forward_ = false;
  bool timing_ = false;  // --chunks auto trials: the stage profile's marks time every pass
  const float* x_ = nullptr;
  std::vector<std::int64_t> counts_;
  std::vector<std::int64_t> shared_rows_;  // {tokens}
  std::int64_t picks_dropped_ = 0;

  // Expert-parallel buffers (device buffers on aux_: declared after it, so released before it).
  std::unique_ptr<EpState, EpStateDeleter> ep_;
};

/// An expert-parallel GpuMoELayer laid out as the CPU layer `cpu` (its replica layout and topology
/// in replica mode, else its placement), with `options` but `cpu`'s schedule (chunks, 0 = auto by
/// trial; local-first and local-split, overlap, exchange, deterministic; overlap off also turns
/// overlap_shared off) and capacity factor;
/// its parameters are not loaded yet (load_from). Same errors as the constructors.
std::unique_ptr<GpuMoELayer> make_gpu_layer_like(const MoELayer& cpu, comm::Communicator& host_comm,
                                                 comm::Communicator& device_comm, GpuLayerOptions options);

}  // namespace moex::cuda
