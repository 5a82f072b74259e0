// MoELayer forward and backward: gate, route, dispatch, experts, combine, shared experts.
#include "runtime/moe_layer.h"
#include "runtime/trace.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>

#include "base/error.h"
#include "runtime/kernels/expert_ffn.h"
#include "runtime/kernels/gate.h"
#include "runtime/kernels/permute.h"
#include "runtime/layer/row_exchange.h"
#include "scheduler/capacity.h"

namespace moex {
namespace {
template <typename T>
void grow(std::vector<T>& v, std::int64_t n) {
  // resize() never shrinks capacity, so buffers stop allocating once they reach a step's size.
  v.resize(static_cast<std::size_t>(n));
}
}  // namespace

const char* to_string(ExchangeKind k) { return k == ExchangeKind::kFlat ? "flat" : "hierarchical"; }

ExchangeKind exchange_from_string(const std::string& s) {
  if (s == "flat") return ExchangeKind::kFlat;
  if (s == "hierarchical") return ExchangeKind::kHierarchical;
  throw ConfigError("exchange = '" + s + "': expected flat or hierarchical");
}

/// One pipeline chunk's exchanges in flight.
struct MoELayer::Chunk {
  Event dispatched, combined;
};

namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

MoELayer::MoELayer(const MoeConfig& config, comm::Communicator& comm, sched::ExpertPlacement placement,
                   std::string name, std::optional<sched::Topology> topology, LayerOptions options)
    : MoELayer(config, comm, std::move(name), std::move(placement), std::nullopt, std::move(topology), options) {}

MoELayer::MoELayer(const MoeConfig& config, comm::Communicator& comm, sched::ReplicaLayout layout, std::string name,
                   std::optional<sched::Topology> topology, LayerOptions options)
    : MoELayer(config, comm, std::move(name), std::nullopt, std::move(layout), std::move(topology), options) {}

MoELayer::MoELayer(const MoeConfig& config, comm::Communicator& comm, std::string name,
                   std::optional<sched::ExpertPlacement> placement, std::optional<sched::ReplicaLayout> layout,
                   std::optional<sched::Topology> topology, const LayerOptions& options)
    : config_(config.validated()),
      comm_(comm),
      name_(std::move(name)),
      where_(std::move(placement), std::move(layout), std::move(topology), config.n_routed_experts, comm.size(), name_),
      hidden_(config.hidden_size),
      ffn_(config.moe_intermediate_size),
      shared_ffn_(config.shared_intermediate_size()),
      experts_total_(config.n_routed_experts),
      topk_(config.num_experts_per_tok) {
  replicated_.resize(static_cast<std::size_t>(shared_w2_offset() + hidden_ * shared_ffn_));
  experts_.resize(static_cast<std::size_t>(num_local_experts() * expert_stride()));
  set_options(options);
}

const sched::ExpertPlacement& MoELayer::placement() const {
  if (!where_.placement())
    throw InvalidArgument(name_ + ": placement() is for layers built from an ExpertPlacement; this one uses a "
                                  "replica layout (see replica_layout() and slot_experts())");
  return *where_.placement();
}

MoELayer::~MoELayer() {
  // The communication stream's queued exchanges read and write the buffers below (declared after
  // it, so destroyed before it): join its thread first, on every path, exception unwinding included.
  comm_stream_.reset();
}

void MoELayer::set_options(const LayerOptions& options) {
  if (options.chunks < 0)
    throw InvalidArgument(name_ + ": chunks = " + std::to_string(options.chunks) + " must be >= 1, or 0 (auto)");
  sched::check_capacity_factor(options.capacity_factor, name_);
  options_ = options;
  auto_.reset(options_.chunks, options_.local_first, options_.local_split, options_.exchange == ExchangeKind::kFlat,
              comm_.size(), options_.overlap);
  // The communication stream is a thread only when overlapping and MPI lets a second thread call it.
  const bool threaded = options_.overlap && comm_.allows_progress_thread();
  if (options_.overlap && !threaded) {
    static bool noted = false;  // once per process
    if (!noted && comm_.rank() == 0)
      std::fprintf(stderr, "moex: note: MPI gives less than MPI_THREAD_SERIALIZED; exchanges run on the compute "
                           "thread (nonblocking, overlapping only the shared experts)\n");
    noted = true;
  }
  if (!comm_stream_ || comm_stream_threaded_ != threaded) {
    comm_stream_ = std::make_unique<Stream>("comm " + name_, threaded);
    comm_stream_threaded_ = threaded;
  }
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

std::chrono::steady_clock::time_point MoELayer::deadline() const {
  // The exchange itself gives up at the communicator's timeout; waiting for its event allows a
  // little more so the exchange's own, more precise, TimeoutError is the one reported.
  return std::chrono::steady_clock::now() + comm_.default_timeout() + std::chrono::seconds(5);
}

void MoELayer::count_bytes(std::span<const std::int64_t> send_elems, std::int64_t elem_bytes) {
  const int me = comm_.rank();
  for (int q = 0; q < comm_.size(); ++q) {
    if (q == me) continue;
    const std::int64_t b = send_elems[static_cast<std::size_t>(q)] * elem_bytes;
    std::int64_t LayerCounters::*field =
        topology().node_of(q) == topology().node_of(me) ? &LayerCounters::bytes_intra_node
                                                        : &LayerCounters::bytes_inter_node;
    counters_.*field += b;
    own_.*field += b;
  }
}

// ---------------------------------------------------------------------------------------------------
// Routing plans and the up-front counts exchange

void MoELayer::plan_pass(int chunks) {
  while (static_cast<int>(chunks_.size()) < chunks) chunks_.push_back(std::make_unique<Chunk>());
  const auto n = static_cast<std::size_t>(tokens_ * topk_);
  pass_.route({&where_, topk_, hierarchical(), options_.capacity_factor, name_}, comm_.rank(), comm_.size(),
              std::span<const std::int32_t>(topk_ids_).first(n), std::span<const float>(topk_weights_).first(n),
              tokens_, chunks);
  // Every rank learns what it receives (codes and weights ahead of the rows) before any row moves,
  // on the communication stream (every MPI call of the layer is made there).
  Event done;
  comm_stream_->enqueue([&] { pass_.exchange_metadata(comm_, comm_.default_timeout()); }, &done);
  done.wait(deadline(), "metadata exchange " + name_);
  pass_.finish();
}

// ---------------------------------------------------------------------------------------------------
// Exchanges (these run on the communication stream)

float* MoELayer::rows(layer::Buf b, bool dw) {
  if (b == layer::Buf::kOut) return pass_out_;
  if (b == layer::Buf::kPicks) return d_weights_.data();
  if (b == layer::Buf::kRecv && grad_pass_) return rgrad_.data();
  return (dw ? rows_dw_ : rows_)[static_cast<std::size_t>(b)].data();
}

void MoELayer::gather(std::int64_t n, const std::vector<std::int64_t>& index, std::int64_t at, layer::Buf src,
                      layer::Buf dst, std::int64_t dst_row, bool dw) {
  const std::int64_t W = dw ? topk_ : hidden_;
  kernels::gather_rows(n, W, index.data() + at, rows(src, dw), W, rows(dst, dw) + dst_row * W, W);
}

void MoELayer::copy(std::int64_t n, layer::Buf src, std::int64_t src_row, layer::Buf dst, std::int64_t dst_row,
                    bool dw) {
  const std::int64_t W = dw ? topk_ : hidden_;
  std::copy_n(rows(src, dw) + src_row * W, n * W, rows(dst, dw) + dst_row * W);
}

void MoELayer::gather_values(std::int64_t n, const std::vector<std::int64_t>& index, std::int64_t at, layer::Buf src,
                             layer::Buf dst, std::int64_t dst_at) {
  const auto t0 = std::chrono::steady_clock::now();
  kernels::gather_values(n, index.data() + at, rows(src, true), rows(dst, true) + dst_at);
  if (dst == layer::Buf::kPicks) tally(&LayerCounters::combine, ms_since(t0));
}

void MoELayer::sum(std::int64_t n, const std::vector<std::int64_t>& offsets, std::int64_t at,
                   const std::vector<std::int64_t>& members, layer::Buf src, layer::Buf dst, std::int64_t dst_row,
                   bool accumulate) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::int64_t H = hidden_;
  kernels::combine_rows(n, H, offsets.data() + at, members.data(), nullptr, rows(src, false), H,
                        rows(dst, false) + dst_row * H, H, accumulate);
  // The per-token sums (sum_returns, on the compute thread) count as combine; the forwarder's sums
  // are part of the communication stream's time.
  if (dst == layer::Buf::kOut || dst == layer::Buf::kPartial) tally(&LayerCounters::combine, ms_since(t0));
}

void MoELayer::exchange(const sched::ExchangePlan& plan, int c, bool out, layer::Buf from, layer::Buf to, bool dw,
                        bool skip_self, const std::string& label) {
  // On the communication stream: complete before returning.
  const std::int64_t W = dw ? topk_ : hidden_;
  comm::WorkPtr work = layer::exchange_chunk(comm_, plan, c, out, W, comm::DataType::kFloat32, rows(from, dw),
                                             rows(to, dw), skip_self, label + " " + name_, blocks_);
  count_bytes(blocks_.send_counts, 4);
  work->wait();
}

void MoELayer::send(int c, bool grad, bool skip_self) {
  Chunk& ch = *chunks_[static_cast<std::size_t>(c)];
  const std::int64_t H = hidden_;
  const sched::ExchangePlan& plan = pass_.origin();
  const std::int64_t r0 = plan.chunk_send_first(c), n = plan.chunk_send_count(c);
  const auto t_pack = std::chrono::steady_clock::now();
  // The send rows were sized for every chunk before the first was packed: the exchanges read them
  // meanwhile.
  float* const send = rows(layer::Buf::kOriginSend, false);
  kernels::gather_rows(n, H, plan.send_token.data() + r0, pass_in_, H, send + r0 * H, H);
  tally(&LayerCounters::permute, ms_since(t_pack));
  comm_stream_->enqueue([this, c, grad, skip_self] {
    const auto t0 = std::chrono::steady_clock::now();
    const std::int64_t b0 = own_.bytes_intra_node + own_.bytes_inter_node;
    layer::dispatch(pass_, *this, c, skip_self, grad ? "dispatch grad " + name_ : "dispatch " + name_);
    layer::arrive(pass_, *this, c);
    const double ms = ms_since(t0);
    tally(&LayerCounters::dispatch, ms);
    auto_.dispatched(static_cast<double>(own_.bytes_intra_node + own_.bytes_inter_node - b0), ms);
  }, &ch.dispatched);
}

void MoELayer::start_return(int c, bool dw, bool skip_self) {
  Chunk& ch = *chunks_[static_cast<std::size_t>(c)];
  comm_stream_->enqueue([this, c, dw, skip_self] {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string label = (dw ? "combine grad " : "combine ") + name_;
    layer::give_back(pass_, *this, c, dw, skip_self, label);
    layer::relay(pass_, *this, c, dw, label);
    tally(&LayerCounters::combine_comm, ms_since(t0));
  }, &ch.combined);
}

void MoELayer::arrived(int c, bool grad) {
  chunks_[static_cast<std::size_t>(c)]->dispatched.wait(deadline(), (grad ? "dispatch grad " : "dispatch ") + name_);
}

void MoELayer::returned(int c, bool grad) {
  chunks_[static_cast<std::size_t>(c)]->combined.wait(deadline(), (grad ? "combine grad " : "combine ") + name_);
}

void MoELayer::size_rows(bool dw) {
  // Rows are H wide; backward also returns K routing-weight gradients per row (the dw twins). Sized
  // for every chunk before the first exchange is queued.
  for (int i = 0; i < layer::kOwnedBufs; ++i) {
    const auto b = static_cast<layer::Buf>(i);
    const std::int64_t n = layer::buffer_rows(pass_, b);
    grow(rows_[static_cast<std::size_t>(i)], n * hidden_);
    if (dw && layer::has_dw_twin(b)) grow(rows_dw_[static_cast<std::size_t>(i)], n * topk_);
  }
}

// ---------------------------------------------------------------------------------------------------
// Expert computation of one stage

void MoELayer::experts(layer::Stage stage, bool grad) {
  const int P = comm_.size(), me = comm_.rank();
  const std::int64_t S = pass_.main.num_local;
  stage_.clear();
  const bool own = stage.part == layer::Part::kSelf;
  if (own) {
    for (int k = 0; k < chunks_used_; ++k) stage_.emplace_back(me, k);
  } else {
    for (int p = 0; p < P; ++p)
      if (stage.part == layer::Part::kAll || p != me) stage_.emplace_back(p, stage.chunk);
  }
  // Local-split runs the own rows in two stages over the slots: the first starts their sums, the
  // second adds to them and completes them.
  stage_slots_ = {own ? stage.first_slot : 0, own ? stage.end_slot : S};
  stage_starts_ = stage_slots_.first == 0;
  stage_completes_ = stage_slots_.second == S;
  if (grad) run_experts_backward();
  else run_experts_forward();
}

namespace {
/// Calls fn(s, begin, count) for each slot s in [slots.first, slots.second) and each maximal run of
/// consecutive blocks of s among `blocks` ((source, chunk) pairs in canonical order), so each run
/// is one GEMM.
template <typename Fn>
void for_each_block(const sched::ExchangePlan& L, std::span<const std::pair<int, int>> blocks,
                    std::pair<std::int64_t, std::int64_t> slots, Fn&& fn) {
  for (std::int64_t s = slots.first; s < slots.second; ++s) {
    std::int64_t begin = -1, count = 0;
    for (const auto& [p, c] : blocks) {
      const std::int64_t b = L.entry_base[L.spc(s, p, c)], n = L.picks[L.spc(s, p, c)];
      if (n == 0) continue;
      if (begin >= 0 && begin + count == b) {
        count += n;
        continue;
      }
      if (count > 0) fn(s, begin, count);
      begin = b;
      count = n;
    }
    if (count > 0) fn(s, begin, count);
  }
}
}  // namespace

void MoELayer::run_experts_forward() {
  float* const recv = rows(layer::Buf::kRecv, false), *const out = rows(layer::Buf::kRet, false);
  const std::int64_t H = hidden_, F = ffn_;
  const sched::ExchangePlan& plan_ = pass_.main;
  auto t0 = std::chrono::steady_clock::now();
  for_each_block(plan_, stage_, stage_slots_, [&](std::int64_t, std::int64_t b, std::int64_t n) {
    kernels::gather_rows(n, H, plan_.entry_row.data() + b, recv, H, xe_.data() + b * H, H);
  });
  tally(&LayerCounters::permute, ms_since(t0));
  t0 = std::chrono::steady_clock::now();
  for_each_block(plan_, stage_, stage_slots_, [&](std::int64_t s, std::int64_t b, std::int64_t n) {
    kernels::swiglu_ffn_forward({n, H, F}, xe_.data() + b * H, expert_w13(s), expert_w2(s), h13_.data() + b * 2 * F,
                                sig_.data() + b * F, a_.data() + b * F, ye_.data() + b * H, gemm_kind());
  });
  tally(&LayerCounters::experts, ms_since(t0));
  // Weighted sum per received row, experts in slot order (the same order for every chunking).
  t0 = std::chrono::steady_clock::now();
  if (stage_starts_)
    for (const auto& [p, c] : stage_)
      std::fill_n(out + plan_.recv_displ(c, p) * H, plan_.recv_counts[plan_.cp(c, p)] * H, 0.0f);
  for_each_block(plan_, stage_, stage_slots_, [&](std::int64_t, std::int64_t b, std::int64_t n) {
    kernels::scatter_add_rows(n, H, plan_.entry_row.data() + b, plan_.entry_weight.data() + b, ye_.data() + b * H, H,
                              out, H);
  });
  tally(&LayerCounters::combine, ms_since(t0));
}

void MoELayer::run_experts_backward() {
  float* const out = rows(layer::Buf::kRet, false), *const out_dw = rows(layer::Buf::kRet, true);
  const std::int64_t H = hidden_, F = ffn_, K = topk_;
  const sched::ExchangePlan& plan_ = pass_.main;
  auto t0 = std::chrono::steady_clock::now();
  // Each entry's output gradient is w * dy_row; the routing weight's gradient is dy_row . expert_out.
  for_each_block(plan_, stage_, stage_slots_, [&](std::int64_t, std::int64_t b, std::int64_t n) {
    kernels::gather_rows_scaled_dot(n, H, plan_.entry_row.data() + b, plan_.entry_weight.data() + b, rgrad_.data(), H,
                                    ye_.data() + b * H, dye_.data() + b * H, H, dpick_.data() + b);
  });
  tally(&LayerCounters::combine, ms_since(t0));
  t0 = std::chrono::steady_clock::now();
  for_each_block(plan_, stage_, stage_slots_, [&](std::int64_t s, std::int64_t b, std::int64_t n) {
    kernels::swiglu_ffn_backward_data({n, H, F}, expert_w13(s), expert_w2(s), h13_.data() + b * 2 * F,
                                      sig_.data() + b * F, dye_.data() + b * H, dh13_.data() + b * 2 * F,
                                      dxe_.data() + b * H, gemm_kind());
  });
  tally(&LayerCounters::experts, ms_since(t0));
  // One row back per received row: its dx (experts in slot order), and its K weight gradients.
  t0 = std::chrono::steady_clock::now();
  for (const auto& [p, c] : stage_) {
    const std::int64_t r0 = plan_.recv_displ(c, p), rows = plan_.recv_counts[plan_.cp(c, p)];
    if (stage_starts_) std::fill_n(out + r0 * H, rows * H, 0.0f);
    if (stage_completes_)
      kernels::gather_values(rows * K, plan_.row_entry.data() + r0 * K, dpick_.data(), out_dw + r0 * K);
  }
  for_each_block(plan_, stage_, stage_slots_, [&](std::int64_t, std::int64_t b, std::int64_t n) {
    kernels::scatter_add_rows(n, H, plan_.entry_row.data() + b, nullptr, dxe_.data() + b * H, H, out, H);
  });
  tally(&LayerCounters::combine, ms_since(t0));
}

// ---------------------------------------------------------------------------------------------------
// Forward and backward

void MoELayer::shared(bool grad) {
  const std::int64_t H = hidden_, tokens = tokens_;
  const auto t0 = std::chrono::steady_clock::now();
  if (shared_ffn_ > 0 && !grad) {
    grow(shared_h13_, tokens * 2 * shared_ffn_);
    grow(shared_sig_, tokens * shared_ffn_);
    grow(shared_a_, tokens * shared_ffn_);
    kernels::swiglu_ffn_forward({tokens, H, shared_ffn_}, x_.data(), shared_w13(), shared_w2(),
                                shared_h13_.data(), shared_sig_.data(), shared_a_.data(), pass_out_);
  } else if (shared_ffn_ > 0) {
    grow(shared_dh13_, tokens * 2 * shared_ffn_);
    kernels::swiglu_ffn_backward({tokens, H, shared_ffn_}, x_.data(), shared_w13(), shared_w2(),
                                 shared_h13_.data(), shared_sig_.data(), shared_a_.data(), pass_in_,
                                 grad_of(shared_w13()), grad_of(shared_w2()), pass_out_, shared_dh13_.data());
  } else if (tokens > 0) {
    std::fill_n(pass_out_, tokens * H, 0.0f);  // the routed sums add to it
  }
  tally(&LayerCounters::shared, ms_since(t0));
}

void MoELayer::weight_grads() {
  // Over each expert's whole block, in canonical order, while the last returns travel: the same
  // GEMMs over the same rows for every chunking.
  const std::int64_t H = hidden_, F = ffn_;
  const sched::ExchangePlan& plan = pass_.main;
  const auto t0 = std::chrono::steady_clock::now();
  const bool overwrite = expert_grads_stale_;
  expert_grads_stale_ = false;
  for (std::int64_t s = 0; s < num_local_experts(); ++s) {
    const std::int64_t off = plan.slot_offsets[static_cast<std::size_t>(s)];
    float* g13 = experts_.grad.data() + s * expert_stride();
    kernels::swiglu_ffn_backward_weights({plan.slot_entries(s), H, F}, xe_.data() + off * H, a_.data() + off * F,
                                         dye_.data() + off * H, dh13_.data() + off * 2 * F, g13,
                                         g13 + 2 * F * H, !overwrite);
  }
  tally(&LayerCounters::experts, ms_since(t0));
}

void MoELayer::forward(const float* x, std::int64_t tokens, float* y) {
  if (tokens < 0) throw InvalidArgument(name_ + ": tokens = " + std::to_string(tokens) + " must be >= 0");
  const std::int64_t H = hidden_, K = topk_, E = experts_total_, F = ffn_;
  tokens_ = tokens;
  resolve_schedule();
  pass_start_ = own_;
  chunks_used_ = auto_.choice().schedule.chunks;
  own_rows_ = {auto_.choice().schedule.local_first, auto_.choice().schedule.local_split};
  grow(x_, tokens * H);
  if (tokens > 0) std::memcpy(x_.data(), x, sizeof(float) * static_cast<std::size_t>(tokens * H));

  // 1. gate (the whole batch: it is cheap, and its GEMM then sees the same rows for any chunking)
  auto t0 = std::chrono::steady_clock::now();
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

  // 2. drop picks over capacity (capacity-factor mode), route every chunk, and tell every rank what
  //    it will receive (one small all-to-all), so each receiver fixes the canonical place of every
  //    row and entry before any token moves.
  plan_pass(chunks_used_);
  tally(&LayerCounters::gate, ms_since(t0));
  const std::int64_t entries = pass_.main.entries();
  grad_pass_ = false;
  pass_in_ = x_.data();
  pass_out_ = y;
  size_rows(false);  // once: the exchanges read them while later chunks pack
  grow(xe_, entries * H);
  grow(h13_, entries * 2 * F);
  grow(sig_, entries * F);
  grow(a_, entries * F);
  grow(ye_, entries * H);

  // 3-7. dispatch, shared experts, routed experts per stage, combine, y = shared + routed.
  layer::run_forward(*this, own_rows_);

  pass_.count(stats_, H * 4);
  fwd_end_ = own_;
}

void MoELayer::backward(const float* dy, float* dx) {
  const std::int64_t H = hidden_, K = topk_, E = experts_total_, F = ffn_, tokens = tokens_;
  const sched::ExchangePlan& plan = pass_.main;
  const std::int64_t rows_total = plan.recv_rows(), entries = plan.entries();
  grad_pass_ = true;
  pass_in_ = dy;
  pass_out_ = dx;
  size_rows(true);
  grow(rgrad_, rows_total * H);
  grow(dye_, entries * H);
  grow(dxe_, entries * H);
  grow(dh13_, entries * 2 * F);
  grow(dpick_, entries);
  grow(d_weights_, tokens * K);
  std::fill(d_weights_.begin(), d_weights_.end(), 0.0f);

  // dL/dy rows along the forward's routes, the shared experts' backward meanwhile, the experts' data
  // gradients per stage, their weight gradients, and dx and the routing-weight gradients summed.
  layer::run_backward(*this, own_rows_);

  auto t0 = std::chrono::steady_clock::now();
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
  tally(&LayerCounters::gate, ms_since(t0));
  if (auto_.measuring()) record_pass();
}

// ---------------------------------------------------------------------------------------------------
// --chunks auto: measure two passes of the unsplit schedule, then let the cost model choose

void MoELayer::tally(double LayerCounters::*field, double ms) {
  counters_.*field += ms;
  own_.*field += ms;
  if (trace::enabled()) {  // the stage just ended on this thread: its span on the timeline
    const char* what = field == &LayerCounters::gate       ? "gate"
                       : field == &LayerCounters::permute  ? "permute"
                       : field == &LayerCounters::experts  ? "experts"
                       : field == &LayerCounters::combine  ? "combine"
                       : field == &LayerCounters::shared   ? "shared experts"
                       : field == &LayerCounters::dispatch ? "dispatch"
                                                           : "return";
    const auto end = std::chrono::steady_clock::now();
    trace::span(what, end - std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                std::chrono::duration<double, std::milli>(ms)),
                end, name_);
  }
}

void MoELayer::record_pass() {
  // The work of this pass (schedule-independent) and the times its stages took.
  sched::PassWork w = sched::pass_work(pass_.main, hidden_, topk_);
  w.shared_fwd_ms = fwd_end_.shared - pass_start_.shared;
  w.shared_bwd_ms = own_.shared - fwd_end_.shared;
  w.other_ms = (own_.gate - pass_start_.gate) + (own_.permute - pass_start_.permute) +
               (own_.combine - pass_start_.combine);
  auto_.measured(w, pass_.counts_ms(), chunks_used_);
}

double MoELayer::time_expert_ffn(std::int64_t n) {
  if (n == 0) return 0.0;
  const std::int64_t H = hidden_, F = ffn_;
  // The pass's own expert buffers as scratch (before the forward that overwrites them; already
  // touched by the measured passes, so no fresh page is timed).
  grow(xe_, n * H);
  grow(h13_, n * 2 * F);
  grow(sig_, n * F);
  grow(a_, n * F);
  grow(ye_, n * H);
  double best = 1e300;
  for (int rep = 0; rep < 3; ++rep) {  // the first run warms the caches
    const auto t0 = std::chrono::steady_clock::now();
    kernels::swiglu_ffn_forward({n, H, F}, xe_.data(), expert_w13(0), expert_w2(0), h13_.data(), sig_.data(),
                                a_.data(), ye_.data(), gemm_kind());
    if (rep > 0) best = std::min(best, ms_since(t0));
  }
  return best;
}

void MoELayer::resolve_schedule() {
  if (!auto_.deciding()) return;
  // Every rank reaches this in the same pass (the passes are collectives), predicts every candidate
  // from its own work and rates, and takes the slowest rank's prediction of each.
  const auto [small, big] = auto_.calibration_rows();
  const double small_ms = time_expert_ffn(small);
  std::vector<double>& predicted = auto_.calibrated(small, small_ms, big, time_expert_ffn(big));
  Event done;
  comm_stream_->enqueue([&] {
    comm_.allreduce_max(predicted.data(), static_cast<std::int64_t>(predicted.size()), comm::DataType::kFloat64,
                        "schedule predictions " + name_)->wait();
  }, &done);
  done.wait(deadline(), "schedule predictions " + name_);
  auto_.choose();
}

kernels::BalanceLossParams MoELayer::aux_params(std::int64_t tokens) const {
  return aux_.params(tokens, experts_total_, topk_);
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

void MoELayer::reduce_replica_grads() {
  if (auto work = start_replica_grad_reduce()) work->wait();
  finish_replica_grad_reduce();
}

comm::WorkPtr MoELayer::start_replica_grad_reduce() {
  replica_reduce_pending_ = false;
  const std::int64_t multi = where_.multi_experts();
  if (multi == 0) return nullptr;  // the same on every rank: the layout is
  const std::int64_t stride = expert_stride();
  ParamBlock& ex = experts();  // clears stale gradients first
  replica_grad_.assign(static_cast<std::size_t>(multi * stride), 0.0f);
  for (const auto& [s, m] : where_.multi_slots(comm_.rank())) {
    float* dst = replica_grad_.data() + m * stride;
    const float* src = ex.grad.data() + s * stride;
    for (std::int64_t i = 0; i < stride; ++i) dst[i] += src[i];
  }
  replica_reduce_pending_ = true;
  return comm_.allreduce_sum(replica_grad_.data(), multi * stride, comm::DataType::kFloat32, "replica grads " + name_);
}

void MoELayer::finish_replica_grad_reduce() {
  if (!replica_reduce_pending_) return;
  replica_reduce_pending_ = false;
  const std::int64_t stride = expert_stride();
  ParamBlock& ex = experts();
  for (const auto& [s, m] : where_.multi_slots(comm_.rank()))
    std::memcpy(ex.grad.data() + s * stride, replica_grad_.data() + m * stride,
                sizeof(float) * static_cast<std::size_t>(stride));
}

std::int64_t MoELayer::set_replica_layout(const sched::ReplicaLayout& to, std::span<std::vector<float>* const> slot_state) {
  if (!replica_layout())
    throw InvalidArgument(name_ + ": set_replica_layout() needs a layer built from a ReplicaLayout (replica mode)");
  if (to.num_experts() != experts_total_ || to.world_size() != comm_.size())
    throw InvalidArgument(name_ + ": new replica layout has " + std::to_string(to.num_experts()) + " experts on " +
                          std::to_string(to.world_size()) + " ranks, expected " + std::to_string(experts_total_) +
                          " on " + std::to_string(comm_.size()));
  const int P = comm_.size(), me = comm_.rank();
  const std::int64_t stride = expert_stride();
  const std::int64_t old_slots = num_local_experts(), new_slots = to.slots_per_rank();
  for (const auto* b : slot_state)
    if (b == nullptr || (!b->empty() && static_cast<std::int64_t>(b->size()) != old_slots * stride))
      throw InvalidArgument(name_ + ": set_replica_layout() got a slot buffer of " +
                            std::to_string(b == nullptr ? -1 : static_cast<std::int64_t>(b->size())) +
                            " floats, expected " + std::to_string(old_slots * stride) + " (slots x expert_stride) or 0");
  const auto moves = sched::plan_migration(*replica_layout(), to, topology());
  // Blocks to send, in move order (by destination rank, then slot), and blocks to receive from each
  // source, in the same order: both sides walk the same list.
  std::vector<std::int64_t> sc(static_cast<std::size_t>(P), 0), rc(static_cast<std::size_t>(P), 0),
      rd(static_cast<std::size_t>(P), 0);
  for (const auto& m : moves) {
    if (m.src_rank == me && m.dst_rank != me) sc[static_cast<std::size_t>(m.dst_rank)] += stride;
    if (m.dst_rank == me && m.src_rank != me) rc[static_cast<std::size_t>(m.src_rank)] += stride;
  }
  std::int64_t recv_total = 0, send_total = 0;
  for (int p = 0; p < P; ++p) {
    rd[static_cast<std::size_t>(p)] = recv_total;
    recv_total += rc[static_cast<std::size_t>(p)];
    send_total += sc[static_cast<std::size_t>(p)];
  }
  std::vector<std::vector<float>*> buffers{&experts_.value};
  for (auto* b : slot_state)
    if (!b->empty()) buffers.push_back(b);
  std::vector<float> send(static_cast<std::size_t>(send_total)), recv(static_cast<std::size_t>(recv_total));
  for (std::vector<float>* buf : buffers) {
    const std::vector<float> old = std::move(*buf);
    std::int64_t at = 0;
    for (const auto& m : moves)
      if (m.src_rank == me && m.dst_rank != me) {
        std::memcpy(send.data() + at, old.data() + m.src_slot * stride, sizeof(float) * static_cast<std::size_t>(stride));
        at += stride;
      }
    comm::AlltoallvArgs args;
    args.send = send.data();
    args.send_counts = sc;
    args.recv = recv.data();
    args.recv_counts = rc;
    args.recv_displs = rd;
    args.type = comm::DataType::kFloat32;
    args.label = "replica migration " + name_;
    comm_.alltoallv(args)->wait();
    buf->assign(static_cast<std::size_t>(new_slots * stride), 0.0f);
    std::vector<std::int64_t> next(rd);
    for (const auto& m : moves) {
      if (m.dst_rank != me) continue;
      const float* src = m.src_rank == me ? old.data() + m.src_slot * stride
                                          : recv.data() + next[static_cast<std::size_t>(m.src_rank)];
      if (m.src_rank != me) next[static_cast<std::size_t>(m.src_rank)] += stride;
      std::memcpy(buf->data() + m.dst_slot * stride, src, sizeof(float) * static_cast<std::size_t>(stride));
    }
  }
  experts_.grad.assign(static_cast<std::size_t>(new_slots * stride), 0.0f);
  expert_grads_stale_ = false;
  where_.set_replicas(to);
  return recv_total / std::max<std::int64_t>(stride, 1);
}

comm::WorkPtr MoELayer::allreduce_replicated_grads() {
  return comm_.allreduce_sum(replicated_.grad.data(), static_cast<std::int64_t>(replicated_.grad.size()),
                             comm::DataType::kFloat32, "replicated grads " + name_);
}

}  // namespace moex
