// GpuMoELayer: one MoE layer, forward and backward, on one GPU (see gpu_layer.h).
#include "runtime/cuda/gpu_layer.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "runtime/cuda/kernels.h"
#include "comm/device_communicator.h"
#include "runtime/cuda/layer_helpers.h"
#include "runtime/moe_layer.h"
#include "runtime/trace.h"
#include "scheduler/capacity.h"

namespace moex::cuda {
using namespace layer;  // NOLINT: the layer sources' shared helpers
namespace {

using std::int64_t;

float bf16_bits_to_float(std::uint16_t h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// Where the layer's routed experts live: all E on one GPU (a layout of one rank), or the ranks'
/// placement or replica layout, validated against the communicators.
moex::layer::ExpertLayout layout_of(const MoeConfig& c, const GpuLayerOptions& o, const comm::Communicator* host,
                                    const comm::Communicator* device, std::optional<sched::ExpertPlacement> placement,
                                    std::optional<sched::ReplicaLayout> layout,
                                    std::optional<sched::Topology> topology) {
  sched::check_capacity_factor(o.capacity_factor, "GpuMoELayer");
  const std::int64_t E = c.n_routed_experts;
  if (!device) {
    if (o.capacity_factor > 0.0)
      throw InvalidArgument("GpuMoELayer: capacity_factor = " + std::to_string(o.capacity_factor) +
                            ": the single-GPU layer is dropless only (use the expert-parallel constructor)");
    if (o.exchange != ExchangeKind::kFlat)
      throw InvalidArgument("GpuMoELayer: the hierarchical exchange needs the expert-parallel constructor");
    return moex::layer::ExpertLayout(sched::ExpertPlacement::contiguous(E, 1), std::nullopt, std::nullopt, E, 1,
                                     "GpuMoELayer");
  }
  const std::string what = "GpuMoELayer (expert-parallel)";
  if (o.chunks < 0)
    throw InvalidArgument(what + ": chunks = " + std::to_string(o.chunks) + ": must be >= 1, or 0 (auto)");
  if (host->size() != device->size() || host->rank() != device->rank())
    throw InvalidArgument(what + ": the host communicator is rank " + std::to_string(host->rank()) + " of " +
                          std::to_string(host->size()) + " but the device communicator rank " +
                          std::to_string(device->rank()) + " of " + std::to_string(device->size()) +
                          "; they must span the same ranks in the same order");
  moex::layer::ExpertLayout l(std::move(placement), std::move(layout), std::move(topology), E, device->size(), what);
  if (!comm::is_device_communicator(*device))
    throw InvalidArgument(what + ": the device communicator must be a NcclCommunicator or a StagedCommunicator "
                                 "(device buffers, ordered against CUDA streams); got another kind");
  if (l.slots(device->rank()).empty())
    throw InvalidArgument(what + ": rank " + std::to_string(device->rank()) +
                          " holds no routed expert; every rank needs at least one");
  return l;
}
}  // namespace

const char* to_string(LayerPrecision p) { return p == LayerPrecision::kFp32 ? "fp32" : "bf16"; }

LayerPrecision precision_from_string(const std::string& s) {
  if (s == "fp32") return LayerPrecision::kFp32;
  if (s == "bf16") return LayerPrecision::kBf16;
  throw ConfigError("precision '" + s + "': expected fp32 or bf16");
}

GpuMoELayer::GpuMoELayer(const MoeConfig& config, GpuLayerOptions options)
    : GpuMoELayer(config, options, nullptr, nullptr, std::nullopt) {}

GpuMoELayer::GpuMoELayer(const MoeConfig& config, comm::Communicator& host_comm, comm::Communicator& device_comm,
                         sched::ExpertPlacement placement, GpuLayerOptions options,
                         std::optional<sched::Topology> topology)
    : GpuMoELayer(config, options, &host_comm, &device_comm, std::move(placement), std::nullopt, std::move(topology)) {}

GpuMoELayer::GpuMoELayer(const MoeConfig& config, comm::Communicator& host_comm, comm::Communicator& device_comm,
                         sched::ReplicaLayout layout, sched::Topology topology, GpuLayerOptions options)
    : GpuMoELayer(config, options, &host_comm, &device_comm, std::nullopt, std::move(layout), std::move(topology)) {}

GpuMoELayer::GpuMoELayer(const MoeConfig& config, GpuLayerOptions options, comm::Communicator* host_comm,
                         comm::Communicator* device_comm, std::optional<sched::ExpertPlacement> placement,
                         std::optional<sched::ReplicaLayout> layout, std::optional<sched::Topology> topology)
    : config_(config.validated()),
      options_(options),
      dtype_(options.precision == LayerPrecision::kFp32 ? DType::kFp32 : DType::kBf16),
      hidden_(config.hidden_size),
      ffn_(config.moe_intermediate_size),
      shared_ffn_(config.shared_intermediate_size()),
      experts_(config.n_routed_experts),
      topk_(config.num_experts_per_tok),
      where_(layout_of(config, options, host_comm, device_comm, std::move(placement), std::move(layout),
                       std::move(topology))),
      local_(static_cast<int64_t>(where_.slots(device_comm ? device_comm->rank() : 0).size())),
      host_comm_(host_comm),
      device_comm_(device_comm),
      gate_params_(kernels::GateParams::from_config(config, 0)),
      expert_ffn_(GroupedFfnShape{local_, config.hidden_size, config.moe_intermediate_size,
                                  3 * config.moe_intermediate_size * config.hidden_size},
                  options.precision == LayerPrecision::kFp32 ? DType::kFp32 : DType::kBf16,
                  options.deterministic ? GroupedGemmImpl::kFixedOrder : options.gemm) {
  if (shared_ffn_ > 0) shared_mlp_.emplace(GroupedFfnShape{1, hidden_, shared_ffn_}, dtype_, options_.gemm);
  events_ = new Events();
  try {
    if (expert_parallel()) init_ep();
    void* pinned = nullptr;
    MOEX_CUDA_CHECK(cudaMallocHost(&pinned, sizeof(int64_t) * static_cast<std::size_t>(experts_)));
    counts_pinned_ = static_cast<int64_t*>(pinned);
    const cudaStream_t s = aux_.get();
    const std::size_t es = dtype_size(dtype_);
    const int64_t H = hidden_, E = experts_;
    gate_w_ = DeviceBuffer<float>(static_cast<std::size_t>(E * H), s);
    gate_g_ = DeviceBuffer<float>(static_cast<std::size_t>(E * H), s);
    bias_ = DeviceBuffer<float>(static_cast<std::size_t>(E), s);
    counts_dev_ = DeviceBuffer<int64_t>(static_cast<std::size_t>(E), s);
    realloc_bytes(shared_w_, 3 * shared_ffn_ * H, es, s);
    realloc_bytes(shared_g_, 3 * shared_ffn_ * H, es, s);
    realloc_bytes(expert_w_, local_ * 3 * ffn_ * H, es, s);
    realloc_bytes(expert_g_, local_ * 3 * ffn_ * H, es, s);
    for (DeviceBuffer<unsigned char>* b : {&shared_w_, &expert_w_})
      if (!b->empty()) MOEX_CUDA_CHECK(cudaMemsetAsync(b->data(), 0, b->bytes(), s));
    MOEX_CUDA_CHECK(cudaMemsetAsync(gate_w_.data(), 0, gate_w_.bytes(), s));
    MOEX_CUDA_CHECK(cudaMemsetAsync(gate_g_.data(), 0, gate_g_.bytes(), s));
    shared_stale_ = expert_stale_ = true;  // zero gradients, cleared lazily
    counts_.assign(static_cast<std::size_t>(local_), 0);
    shared_rows_.assign(1, 0);
    aux_.synchronize();
  } catch (...) {
    if (counts_pinned_) static_cast<void>(cudaFreeHost(counts_pinned_));
    delete events_;
    throw;
  }
}

GpuMoELayer::~GpuMoELayer() {
  // Exchanges still in flight end first, within their deadline (an NCCL wait would not).
  if (ep_) {
    try {
      settle_ep();
    } catch (...) {
    }
  }
  // The buffers are freed on aux_ as the members go: first make aux_ wait for the caller's last
  // pass (and the host for everything, so the pinned counts buffer is no longer a copy target).
  static_cast<void>(cudaStreamWaitEvent(aux_.get(), events_->last, 0));
  static_cast<void>(cudaStreamSynchronize(aux_.get()));
  static_cast<void>(cudaEventSynchronize(events_->last));
  if (counts_pinned_) static_cast<void>(cudaFreeHost(counts_pinned_));
  delete events_;
}

// ---------------------------------------------------------------------------------------------------
// Parameters

void GpuMoELayer::check_cpu_layer(MoELayer& cpu, const char* what) const {
  // The same config field by field (as config.json holds them), the same experts in the same slots.
  const nlohmann::json have = cpu.config().to_json(), want = config_.to_json();
  for (const auto& [field, value] : want.items()) {
    const nlohmann::json got = have.value(field, nlohmann::json());
    if (got != value)
      throw InvalidArgument(std::string(what) + ": the CPU layer's " + field + " is " + got.dump() +
                            "; this GPU layer has " + value.dump());
  }
  const moex::layer::ExpertLayout& cl = cpu.expert_layout();
  const bool replicas = where_.replicas().has_value();
  const char* part = cl.replicas().has_value() != replicas ? "mode (replicas or a placement)"
                     : replicas && !(cl.topology() == where_.topology())
                         ? "topology (rank -> node, on which the replica choice depends)"
                     : !cl.same_slots(where_) ? (replicas ? "replica layout" : "expert placement")
                                              : nullptr;
  if (part)
    throw InvalidArgument(std::string(what) + ": the CPU layer's " + part + " differs from this GPU layer's (build "
                          "the GPU layer from the CPU layer's current layout: make_gpu_layer_like)");
  if (cpu.options().capacity_factor != options_.capacity_factor)
    throw InvalidArgument(std::string(what) + ": the CPU layer's capacity_factor is " +
                          std::to_string(cpu.options().capacity_factor) + "; this GPU layer has " +
                          std::to_string(options_.capacity_factor));
}

void GpuMoELayer::upload_params(const float* host, int64_t n, void* dst) {
  if (n == 0) return;
  const cudaStream_t s = aux_.get();
  if (dtype_ == DType::kFp32) {
    copy_to_device(static_cast<float*>(dst), host, static_cast<std::size_t>(n), s);
  } else {
    DeviceBuffer<float> tmp(static_cast<std::size_t>(n), s);
    copy_to_device(tmp.data(), host, static_cast<std::size_t>(n), s);
    convert(tmp.data(), static_cast<bf16*>(dst), n, s);
    aux_.synchronize();
  }
}

void GpuMoELayer::load_from(MoELayer& cpu) {
  check_cpu_layer(cpu, "GpuMoELayer::load_from");
  const int64_t H = hidden_, E = experts_;
  const cudaStream_t s = aux_.get();
  // Nothing queued may still read the parameters being replaced.
  MOEX_CUDA_CHECK(cudaStreamWaitEvent(s, events_->last, 0));
  const std::vector<float>& rep = cpu.replicated().value;
  copy_to_device(gate_w_.data(), rep.data(), static_cast<std::size_t>(E * H), s);
  upload_params(rep.data() + E * H, 3 * shared_ffn_ * H, shared_w_.data());
  upload_params(cpu.experts().value.data(), local_ * 3 * ffn_ * H, expert_w_.data());
  set_selection_bias(cpu.selection_bias());
  set_aux_loss(cpu.aux_loss());
  aux_.synchronize();
}

sched::Schedule GpuMoELayer::schedule() const {
  if (const sched::ScheduleChoice* c = schedule_choice()) return c->schedule;
  return {};  // single GPU: no exchange to schedule
}

std::unique_ptr<GpuMoELayer> make_gpu_layer_like(const MoELayer& cpu, comm::Communicator& host_comm,
                                                 comm::Communicator& device_comm, GpuLayerOptions options) {
  options.chunks = cpu.options().chunks;  // auto (0): the GPU layer's trials choose
  options.local_first = cpu.options().local_first;
  options.local_split = cpu.options().local_split;
  options.capacity_factor = cpu.options().capacity_factor;
  options.deterministic = cpu.options().deterministic;
  options.exchange = cpu.options().exchange;
  options.overlap = cpu.options().overlap;
  if (!options.overlap) options.overlap_shared = false;
  if (const std::optional<sched::ReplicaLayout>& layout = cpu.replica_layout())
    return std::make_unique<GpuMoELayer>(cpu.config(), host_comm, device_comm, *layout, cpu.topology(), options);
  return std::make_unique<GpuMoELayer>(cpu.config(), host_comm, device_comm, cpu.placement(), options,
                                       cpu.topology());
}

void GpuMoELayer::set_aux_loss(const AuxLossOptions& options) {
  if (options.seq_len < 0)
    throw InvalidArgument("GpuMoELayer::set_aux_loss: seq_len = " + std::to_string(options.seq_len) +
                          ": must be >= 0 (0 = all tokens are one sequence)");
  balance_ = options;
}

kernels::BalanceLossValue GpuMoELayer::aux_loss_value(cudaStream_t stream) const {
  if (balance_params_.tokens == 0) return {};
  const std::vector<double> v = to_host(balance_value_, stream);
  return {v[0], v[1]};
}

void GpuMoELayer::balance_forward(int64_t tokens, cudaStream_t stream) {
  const kernels::BalanceLossParams p = balance_.params(tokens, experts_, topk_);
  const auto need = static_cast<int64_t>((balance_loss_scratch_bytes(p) + sizeof(double) - 1) / sizeof(double));
  if (need > static_cast<int64_t>(balance_scratch_.size()) ||
      tokens * experts_ > static_cast<int64_t>(d_scores_.size()) || balance_value_.empty()) {
    // The buffers about to be replaced may still be read by work queued on either stream.
    synchronize(stream, "before growing the balance-loss buffers", wait_timeout());
    aux_.synchronize();
    const cudaStream_t s = aux_.get();
    realloc_typed(balance_scratch_, std::max(need, static_cast<int64_t>(balance_scratch_.size())), s);
    realloc_typed(d_scores_, std::max(capacity_, tokens) * experts_, s);
    if (balance_value_.empty()) realloc_typed(balance_value_, 2, s);
    aux_.synchronize();
  }
  balance_loss_forward(p, scores_.data(), topk_ids_.data(), balance_scratch_.data(), balance_value_.data(), stream);
  balance_params_ = p;
}

void GpuMoELayer::set_selection_bias(const std::vector<float>& bias) {
  if (!bias.empty() && static_cast<int64_t>(bias.size()) != experts_)
    throw InvalidArgument("GpuMoELayer::set_selection_bias: " + std::to_string(bias.size()) +
                          " values; expected none or one per routed expert (" + std::to_string(experts_) + ")");
  const cudaStream_t s = aux_.get();
  MOEX_CUDA_CHECK(cudaStreamWaitEvent(s, events_->last, 0));
  if (!bias.empty()) copy_to_device(bias_.data(), bias.data(), bias.size(), s);
  aux_.synchronize();
  has_bias_ = !bias.empty();
}

void GpuMoELayer::zero_grad(cudaStream_t stream) {
  MOEX_CUDA_CHECK(cudaMemsetAsync(gate_g_.data(), 0, gate_g_.bytes(), stream));
  shared_stale_ = expert_stale_ = true;
}

std::vector<float> GpuMoELayer::download(const void* src, int64_t n, cudaStream_t stream) const {
  std::vector<float> out(static_cast<std::size_t>(n));
  if (dtype_ == DType::kFp32) {
    copy_to_host(out.data(), static_cast<const float*>(src), out.size(), stream);
  } else {
    std::vector<std::uint16_t> raw(out.size());
    copy_to_host(raw.data(), static_cast<const std::uint16_t*>(src), raw.size(), stream);
    for (std::size_t i = 0; i < raw.size(); ++i) out[i] = bf16_bits_to_float(raw[i]);
  }
  return out;
}

std::vector<float> GpuMoELayer::replicated_grads_host(cudaStream_t stream) {
  const int64_t H = hidden_, E = experts_, n_shared = 3 * shared_ffn_ * H;
  std::vector<float> out(static_cast<std::size_t>(E * H + n_shared), 0.0f);
  copy_to_host(out.data(), gate_g_.data(), static_cast<std::size_t>(E * H), stream);
  if (!shared_stale_ && n_shared > 0) {
    const std::vector<float> sh = download(shared_g_.data(), n_shared, stream);
    std::copy(sh.begin(), sh.end(), out.begin() + E * H);
  }
  return out;
}

std::vector<float> GpuMoELayer::expert_grads_host(cudaStream_t stream) {
  const int64_t n = local_ * 3 * ffn_ * hidden_;
  if (expert_stale_) {
    synchronize(stream, "expert gradients to the host", wait_timeout());
    return std::vector<float>(static_cast<std::size_t>(n), 0.0f);
  }
  return download(expert_g_.data(), n, stream);
}

void GpuMoELayer::copy_grads_to(MoELayer& cpu, cudaStream_t stream) {
  check_cpu_layer(cpu, "GpuMoELayer::copy_grads_to");
  cpu.replicated().grad = replicated_grads_host(stream);
  cpu.experts().grad = expert_grads_host(stream);
}

std::vector<std::int32_t> GpuMoELayer::topk_ids_host(cudaStream_t stream) const {
  std::vector<std::int32_t> out(static_cast<std::size_t>(tokens_ * topk_));
  copy_to_host(out.data(), topk_ids_.data(), out.size(), stream);
  return out;
}

std::vector<float> GpuMoELayer::topk_weights_host(cudaStream_t stream) const {
  std::vector<float> out(static_cast<std::size_t>(tokens_ * topk_));
  copy_to_host(out.data(), topk_w_.data(), out.size(), stream);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Workspace

void GpuMoELayer::reserve(int64_t tokens, cudaStream_t stream) {
  if (tokens < 0)
    throw InvalidArgument("GpuMoELayer::reserve: tokens = " + std::to_string(tokens) + ": must be >= 0");
  if (tokens <= capacity_) return;
  // The buffers about to be replaced may still be in use by work queued on either stream.
  synchronize(stream, "before growing the layer's buffers", wait_timeout());
  aux_.synchronize();
  const cudaStream_t s = aux_.get();
  const std::size_t es = dtype_size(dtype_);
  const int64_t T = tokens, N = tokens * topk_, H = hidden_, Fs = shared_ffn_, E = experts_;
  realloc_typed(scores_, T * E, s);
  realloc_typed(dlogits_, T * E, s);
  realloc_typed(topk_w_, N, s);
  realloc_typed(d_weights_, N, s);
  realloc_typed(topk_ids_, N, s);
  // The routed rows: T * K of them on one GPU. In expert-parallel mode their number depends on
  // what the other ranks send: forward_ep grows them (tracking their size in EpState::entry_capacity),
  // so they must not be touched here (freeing them would leave entry_capacity stale).
  if (!expert_parallel()) {
    realloc_typed(entry_token_, N, s);
    realloc_typed(pick_entry_, N, s);
    realloc_typed(csr_offsets_, T + 1, s);
    fill_step(T + 1, topk_, csr_offsets_.data(), s);  // every token has K sources in the combine
    realloc_routed(N, s);
  }
  realloc_bytes(sh_h13_, T * 2 * Fs, es, s);
  realloc_bytes(sh_sig_, T * Fs, es, s);
  realloc_bytes(sh_a_, T * Fs, es, s);
  realloc_bytes(sh_dh13_, T * 2 * Fs, es, s);
  const int64_t lp = dtype_ == DType::kBf16 ? T * H : 0;
  realloc_bytes(x_lp_, lp, es, s);
  realloc_bytes(dy_lp_, lp, es, s);
  realloc_bytes(out_lp_, lp, es, s);
  aux_.synchronize();  // the new buffers are ready for any stream
  capacity_ = tokens;
  ++allocations_;
  have_forward_ = false;  // what a forward saved is gone
}

void GpuMoELayer::realloc_routed(int64_t rows, cudaStream_t s) {
  const std::size_t es = dtype_size(dtype_);
  const int64_t H = hidden_, F = ffn_;
  realloc_typed(entry_w_, rows, s);
  realloc_typed(d_entry_, rows, s);
  realloc_bytes(xe_, rows * H, es, s);
  realloc_bytes(h13_, rows * 2 * F, es, s);
  realloc_bytes(sig_, rows * F, es, s);
  realloc_bytes(a_, rows * F, es, s);
  realloc_bytes(ye_, rows * H, es, s);
  realloc_bytes(dye_, rows * H, es, s);
  realloc_bytes(dxe_, rows * H, es, s);
  realloc_bytes(dh13_, rows * 2 * F, es, s);
}

void GpuMoELayer::set_profile(bool on) {
  options_.profile = on;
  events_->profile.clear();
}

void GpuMoELayer::mark(Mark m, cudaStream_t stream) {
  if (options_.profile || timing_ || trace::enabled()) events_->profile.mark(m, stream);
}

GpuLayerTimes GpuMoELayer::last_times() const { return options_.profile ? events_->profile.times() : GpuLayerTimes{}; }

// ---------------------------------------------------------------------------------------------------
// Forward and backward

std::pair<cudaStream_t, cublasHandle_t> GpuMoELayer::shared_stream(cudaStream_t stream) {
  if (!options_.overlap_shared) return {stream, blas_.get()};
  MOEX_CUDA_CHECK(cudaEventRecord(events_->input, stream));
  MOEX_CUDA_CHECK(cudaStreamWaitEvent(aux_.get(), events_->input, 0));
  return {aux_.get(), blas_aux_.get()};
}

void GpuMoELayer::shared_forward(const void* xin, void* out, cudaStream_t stream) {
  const int64_t H = hidden_, Fs = shared_ffn_;
  const std::size_t es = dtype_size(dtype_);
  const auto [ss, sb] = shared_stream(stream);
  mark(kFS0, ss);
  shared_rows_[0] = tokens_;
  shared_mlp_->forward(sb, shared_rows_, xin, shared_w_.data(), shared_w_.data() + 2 * Fs * H * es, sh_h13_.data(),
                       sh_sig_.data(), sh_a_.data(), out, ss);
  mark(kFS1, ss);
  events_->profile.end(false, true);
  if (options_.overlap_shared) MOEX_CUDA_CHECK(cudaEventRecord(events_->shared, ss));
}

void GpuMoELayer::shared_backward(const void* xin, const void* dyin, void* out, cudaStream_t stream) {
  const int64_t H = hidden_, Fs = shared_ffn_;
  const std::size_t es = dtype_size(dtype_);
  const auto [ss, sb] = shared_stream(stream);
  mark(kBS0, ss);
  shared_rows_[0] = tokens_;
  unsigned char* w = shared_w_.data();
  unsigned char* g = shared_g_.data();
  shared_mlp_->backward(sb, shared_rows_, xin, w, w + 2 * Fs * H * es, sh_h13_.data(), sh_sig_.data(), sh_a_.data(),
                        dyin, g, g + 2 * Fs * H * es, out, sh_dh13_.data(), !shared_stale_, ss);
  mark(kBS1, ss);
  events_->profile.end(true, true);
  if (options_.overlap_shared) MOEX_CUDA_CHECK(cudaEventRecord(events_->shared, ss));
}

void GpuMoELayer::join_shared(cudaStream_t stream) {
  if (shared_ffn_ > 0 && options_.overlap_shared) MOEX_CUDA_CHECK(cudaStreamWaitEvent(stream, events_->shared, 0));
}

void GpuMoELayer::expert_stage(const StageRows& r, bool grad, bool weights_later, cudaStream_t stream,
                               const std::function<void()>& before_ffn) {
  expert_gemms(r, grad, weights_later, stream, before_ffn);
  if (r.marks) mark(grad ? kB2 : kF3, stream);
  expert_combine(r, grad, stream);
}

void GpuMoELayer::expert_gemms(const StageRows& r, bool grad, bool weights_later, cudaStream_t stream,
                               const std::function<void()>& before_ffn) {
  const int64_t H = hidden_, F = ffn_, e0 = r.first, n = r.count;
  const std::size_t es = dtype_size(dtype_);
  const std::size_t w2 = static_cast<std::size_t>(2 * F * H) * es;  // w2's byte offset in an expert block
  auto at = [&](DeviceBuffer<unsigned char>& b, int64_t width) {
    return b.data() + static_cast<std::size_t>(e0 * width) * es;
  };
  with_type(dtype_, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    const T_* in = static_cast<const T_*>(r.in);
    if (!grad) {
      gather_rows(n, H, r.entry_row + e0, in, H, as<T_>(xe_) + e0 * H, H, stream);
      return;
    }
    // Routing-weight gradients dot(dy row, expert output) and the expert-output gradients w * dy row.
    row_dot(n, H, r.entry_row + e0, in, H, as<T_>(ye_) + e0 * H, H, d_entry_.data() + e0, stream);
    gather_rows_scaled(n, H, r.entry_row + e0, entry_w_.data() + e0, in, H, as<T_>(dye_) + e0 * H, H, stream);
  });
  if (r.marks) mark(grad ? kB1 : kF2, stream);
  if (before_ffn) before_ffn();
  unsigned char* w = expert_w_.data();
  if (!grad) {
    expert_ffn_.forward(blas_.get(), r.slot_rows, at(xe_, H), w, w + w2, at(h13_, 2 * F), at(sig_, F), at(a_, F),
                        at(ye_, H), stream);
  } else if (weights_later) {
    expert_ffn_.backward_data(blas_.get(), r.slot_rows, w, w + w2, at(h13_, 2 * F), at(sig_, F), at(dye_, H),
                              at(dxe_, H), at(dh13_, 2 * F), stream);
  } else {
    expert_ffn_.backward(blas_.get(), r.slot_rows, at(xe_, H), w, w + w2, at(h13_, 2 * F), at(sig_, F), at(a_, F),
                         at(dye_, H), expert_g_.data(), expert_g_.data() + w2, at(dxe_, H), at(dh13_, 2 * F),
                         !expert_stale_, stream);
    expert_stale_ = false;
  }
}

void GpuMoELayer::expert_combine(const StageRows& r, bool grad, cudaStream_t stream) {
  if (r.add) join_shared(stream);
  with_type(dtype_, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    combine_rows(r.rows, hidden_, r.row_offsets, r.row_entries, grad ? nullptr : r.row_weight,
                 as<T_>(grad ? dxe_ : ye_), hidden_, static_cast<T_*>(r.out), hidden_, r.add, stream);
  });
  if (grad) cuda::gather_values(r.rows * topk_, r.dw_index, d_entry_.data(), r.dw_out, stream);
}

void GpuMoELayer::forward(const float* x, int64_t tokens, float* y, cudaStream_t stream) {
  if (tokens < 0) throw InvalidArgument("GpuMoELayer::forward: tokens = " + std::to_string(tokens) + ": must be >= 0");
  if (tokens > 0 && (!x || !y))
    throw InvalidArgument("GpuMoELayer::forward: x or y is null with tokens = " + std::to_string(tokens) +
                          " (expected device pointers to [tokens, hidden] floats)");
  // The last pass's exchanges end (or time out) before reserve() may synchronise the stream on them.
  if (expert_parallel()) {
    settle_ep();
    schedule_ep(stream);
  }
  reserve(tokens, stream);
  const int64_t T = tokens, N = tokens * topk_, H = hidden_, E = experts_;
  tokens_ = T;
  x_ = x;
  have_forward_ = true;
  balance_params_.tokens = 0;  // no auxiliary losses until balance_forward() queues them
  std::fill(counts_.begin(), counts_.end(), int64_t{0});
  picks_dropped_ = 0;
  events_->profile.begin(false);
  // An expert-parallel layer takes part in the exchanges even without tokens of its own.
  if (T == 0 && !expert_parallel()) {
    MOEX_CUDA_CHECK(cudaEventRecord(events_->last, stream));
    return;
  }
  const bool bf = dtype_ == DType::kBf16;
  const bool has_shared = shared_ffn_ > 0;
  mark(kF0, stream);
  // The GEMM input: x itself, or its bf16 copy.
  const void* xin = x;
  if (bf) {
    convert(x, as<bf16>(x_lp_), T * H, stream);
    xin = x_lp_.data();
  }
  // What the combine adds the routed rows to (the shared output), or overwrites without shared experts.
  void* out = bf ? static_cast<void*>(out_lp_.data()) : static_cast<void*>(y);
  if (has_shared && T > 0) shared_forward(xin, out, stream);

  // Gate, then the counting sort of the picks by expert.
  mark(kFG, stream);
  kernels::GateParams gp = gate_params_;
  gp.tokens = T;
  gate_forward(blas_.get(), gp, x, gate_w_.data(), has_bias_ ? bias_.data() : nullptr, scores_.data(),
               topk_ids_.data(), topk_w_.data(), stream);
  if (balance_.enabled() && T > 0) balance_forward(T, stream);
  if (expert_parallel()) {
    forward_ep(xin, out, has_shared && T > 0, stream);
  } else {
    route_by_expert(topk_ids_.data(), topk_w_.data(), N, topk_, E, counts_dev_.data(), entry_token_.data(),
                    entry_w_.data(), pick_entry_.data(), stream);
    MOEX_CUDA_CHECK(cudaMemcpyAsync(counts_pinned_, counts_dev_.data(),
                                    sizeof(int64_t) * static_cast<std::size_t>(E), cudaMemcpyDeviceToHost, stream));
    MOEX_CUDA_CHECK(cudaEventRecord(events_->counts, stream));
    mark(kF1, stream);
    // Gather the rows into expert order (needs no host counts: N = T * K), meanwhile fetch the counts.
    expert_stage({0, N, counts_, entry_token_.data(), xin, T, csr_offsets_.data(), pick_entry_.data(), topk_w_.data(),
                  out, has_shared, nullptr, nullptr, true},
                 false, false, stream, [&] {
                   MOEX_CUDA_CHECK(cudaEventSynchronize(events_->counts));
                   int64_t total = 0;
                   for (int64_t e = 0; e < E; ++e) total += counts_[static_cast<std::size_t>(e)] = counts_pinned_[e];
                   if (total != N)
                     throw InternalError("GpuMoELayer::forward: the device counted " + std::to_string(total) +
                                         " routed rows over all experts; expected tokens * topk = " + std::to_string(N));
                 });
  }
  if (bf) convert(as<bf16>(out_lp_), y, T * H, stream);
  mark(kF4, stream);
  events_->profile.end(false, false);
  MOEX_CUDA_CHECK(cudaEventRecord(events_->last, stream));
}

void GpuMoELayer::backward(const float* dy, float* dx, cudaStream_t stream) {
  if (!have_forward_)
    throw InvalidArgument("GpuMoELayer::backward: no forward() to go back through (call forward first; a "
                          "reserve() that grew the workspace also discards the last forward)");
  const int64_t T = tokens_, N = T * topk_, H = hidden_;
  events_->profile.begin(true);
  if (T == 0 && !expert_parallel()) {
    // Nothing flows back; gradients zeroed lazily become real zeros.
    if (shared_stale_ && !shared_g_.empty())
      MOEX_CUDA_CHECK(cudaMemsetAsync(shared_g_.data(), 0, shared_g_.bytes(), stream));
    if (expert_stale_) MOEX_CUDA_CHECK(cudaMemsetAsync(expert_g_.data(), 0, expert_g_.bytes(), stream));
    shared_stale_ = expert_stale_ = false;
    MOEX_CUDA_CHECK(cudaEventRecord(events_->last, stream));
    return;
  }
  if (T > 0 && (!dy || !dx))
    throw InvalidArgument("GpuMoELayer::backward: dy or dx is null with tokens = " + std::to_string(T) +
                          " (expected device pointers to [tokens, hidden] floats)");
  const bool bf = dtype_ == DType::kBf16;
  const bool has_shared = shared_ffn_ > 0;
  mark(kB0, stream);
  const void* xin = bf ? static_cast<const void*>(x_lp_.data()) : static_cast<const void*>(x_);
  const void* dyin = dy;
  if (bf) {
    convert(dy, as<bf16>(dy_lp_), T * H, stream);
    dyin = dy_lp_.data();
  }
  // Where the input-row gradients are summed per token (the shared experts' dx first, if any).
  void* out = bf ? static_cast<void*>(out_lp_.data()) : static_cast<void*>(dx);
  if (has_shared) {
    if (T > 0) {
      shared_backward(xin, dyin, out, stream);
    } else if (shared_stale_) {
      MOEX_CUDA_CHECK(cudaMemsetAsync(shared_g_.data(), 0, shared_g_.bytes(), stream));
    }
  }
  shared_stale_ = false;

  if (expert_parallel()) {
    backward_ep(dyin, out, has_shared && T > 0, stream);
  } else {
    // Routing-weight gradients d_w[t,k] = dy[t] . expert_out[pick] (each pick's entry is its dw
    // source), the experts' backward, and dx summed per token.
    mark(kBP, stream);
    expert_stage({0, N, counts_, entry_token_.data(), dyin, T, csr_offsets_.data(), pick_entry_.data(), nullptr, out,
                  has_shared, pick_entry_.data(), d_weights_.data(), true},
                 true, false, stream);
  }
  if (bf) convert(as<bf16>(out_lp_), dx, T * H, stream);
  mark(kB3, stream);

  kernels::GateParams gp = gate_params_;
  gp.tokens = T;
  // The auxiliary losses' gradient wrt the scores joins the gate's.
  const float* d_scores = nullptr;
  if (balance_params_.tokens > 0) {
    MOEX_CUDA_CHECK(cudaMemsetAsync(d_scores_.data(), 0, sizeof(float) * static_cast<std::size_t>(T * experts_),
                                    stream));
    balance_loss_backward(balance_params_, scores_.data(), balance_scratch_.data(), 1.0f, d_scores_.data(), stream);
    d_scores = d_scores_.data();
  }
  gate_backward(blas_.get(), gp, x_, gate_w_.data(), scores_.data(), topk_ids_.data(), d_weights_.data(), dx,
                gate_g_.data(), dlogits_.data(), d_scores, stream);
  mark(kB4, stream);
  events_->profile.end(true, false);
  MOEX_CUDA_CHECK(cudaEventRecord(events_->last, stream));
  if (trace::enabled()) events_->profile.trace(stream);  // one host wait per backward while tracing
}

}  // namespace moex::cuda
