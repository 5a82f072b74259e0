// GpuMoELayer's expert-parallel mode (see gpu_layer.h): the exchange of routed rows between ranks,
// chunk by chunk, driven by an EpPlan built on the host.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/staged/staged_communicator.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/layer_helpers.h"
#include "scheduler/capacity.h"
#ifdef MOEX_HAVE_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif

namespace moex::cuda {
using namespace layer;  // NOLINT: the layer sources' shared helpers
namespace {

using std::int64_t;
using Clock = std::chrono::steady_clock;

/// Byte offset of row `row` of a [*, width] matrix of `es`-byte elements.
std::size_t row_bytes(int64_t row, int64_t width, std::size_t es) {
  return static_cast<std::size_t>(row) * static_cast<std::size_t>(width) * es;
}

}  // namespace

/// Buffers and pending exchanges of an expert-parallel layer. Device buffers live on the layer's
/// second stream (aux_) and only grow.
struct GpuMoELayer::EpState {
  comm::StagedCommunicator* staged = nullptr;
#ifdef MOEX_HAVE_NCCL
  comm::NcclCommunicator* nccl = nullptr;
#endif
  // The plan's index arrays (EpPlan names).
  DeviceBuffer<int64_t> send_token, token_offsets, token_rows, pick_back;
  DeviceBuffer<int64_t> entry_row, row_offsets, row_entries, row_dw_entry;
  DeviceBuffer<float> row_weight;
  // Rows: sent (S), received (R), combined per received row (R), come back (S); layer dtype.
  DeviceBuffer<unsigned char> send_rows, recv_rows, ret_rows, back_rows;
  DeviceBuffer<float> dw_out, dw_back;  // routing-weight gradients [R*K], [S*K]
  DeviceBuffer<float> grad32;           // bf16 shared gradients summed in fp32
  DeviceBuffer<float> replica32;        // replica mode: [multi-replica experts, 3FH] gradient sums
  // Host copies of the top-K of the last forward.
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  std::vector<std::uint8_t> kept;   // capacity-factor mode: the picks kept
  std::vector<int> pick_rank;       // replica mode: each pick's replica (rank, slot)
  std::vector<std::int32_t> pick_slot;
  std::vector<int64_t> order;       // scratch of sched::apply_capacity
  // Exchanges in flight (kept until the next pass settles them: a Work must outlive its op).
  std::vector<comm::WorkPtr> dispatch, combine, combine_dw, reduce;
  std::vector<int64_t> sc, sd, rc, rd;  // per-peer block counts / displacements scratch
  // Deterministic mode: every entry, slot by slot, in (source rank, chunk, entry) order.
  std::vector<int64_t> canon_host;
  DeviceBuffer<int64_t> canon;
  int64_t entry_capacity = 0;           // entries the layer's routed buffers (xe_, ...) hold

  /// Orders the device communicator's next ops after the work queued on `producer` so far.
  void producer_ready(cudaStream_t producer) {
#ifdef MOEX_HAVE_NCCL
    if (nccl) {
      nccl->wait_for_stream(producer);
      return;
    }
#endif
    staged->wait_for_stream(producer);
  }
  /// Makes `stream` see what `w` received: on the device for NCCL (the host goes on), by waiting on
  /// the host (until `deadline`) for the staged path, whose copies to the device the host drives.
  void consume(comm::Work& w, cudaStream_t stream, Clock::time_point deadline) {
#ifdef MOEX_HAVE_NCCL
    if (nccl) {
      static_cast<comm::NcclWork&>(w).wait_on_stream(stream);
      return;
    }
#endif
    w.wait(deadline);
  }
  /// Chunk c of a dispatch: the rows of `src` ([tokens, H] of `dtype`) this rank sends, gathered
  /// into send_rows, then moved to the peers' recv_rows (an alltoallv on `comm` after `stream`).
  comm::WorkPtr dispatch_chunk(const EpPlan& plan, comm::Communicator& comm, int c, DType dtype, int64_t H,
                               const void* src, cudaStream_t stream, const std::string& label) {
    const std::size_t es = dtype_size(dtype);
    const int64_t f = plan.chunk_send_first(c), n = plan.chunk_send_count(c);
    with_type(dtype, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      gather_rows(n, H, send_token.data() + f, static_cast<const T_*>(src), H,
                  reinterpret_cast<T_*>(send_rows.data() + row_bytes(f, H, es)), H, stream);
    });
    producer_ready(stream);
    return move_chunk(plan, comm, c, /*forward=*/true, send_rows.data() + row_bytes(f, H, es),
                      recv_rows.data() + row_bytes(plan.chunk_recv_first(c), H, es), H * static_cast<int64_t>(es),
                      comm::DataType::kByte, label);
  }
  /// Chunk c of an exchange: forward, this rank's send blocks to the peers' recv blocks; backward
  /// (the way back), its recv blocks to the peers' send blocks. `width` elements of `type` per row;
  /// `from` / `to` point at the chunk's first row. The caller has ordered the producer (producer_ready).
  comm::WorkPtr move_chunk(const EpPlan& plan, comm::Communicator& comm, int c, bool forward, const void* from,
                           void* to, int64_t width, comm::DataType type, const std::string& label) {
    comm::AlltoallvArgs a;
    a.send = from;
    a.recv = to;
    a.send_counts = forward ? plan.send_block_counts(c, width, sc) : plan.recv_block_counts(c, width, sc);
    a.send_displs = forward ? plan.send_block_displs(c, width, sd) : plan.recv_block_displs(c, width, sd);
    a.recv_counts = forward ? plan.recv_block_counts(c, width, rc) : plan.send_block_counts(c, width, rc);
    a.recv_displs = forward ? plan.recv_block_displs(c, width, rd) : plan.send_block_displs(c, width, rd);
    a.type = type;
    a.label = label + " chunk " + std::to_string(c);
    return comm.alltoallv(a);
  }
  /// Chunk c's combined rows (ret_rows, one per received row) back to their senders' back_rows.
  comm::WorkPtr return_chunk(const EpPlan& plan, comm::Communicator& comm, int c, int64_t H, std::size_t es,
                             const std::string& label) {
    return move_chunk(plan, comm, c, /*forward=*/false, ret_rows.data() + row_bytes(plan.chunk_recv_first(c), H, es),
                      back_rows.data() + row_bytes(plan.chunk_send_first(c), H, es), H * static_cast<int64_t>(es),
                      comm::DataType::kByte, label);
  }
  /// Chunk c's rows that came back (back_rows), summed per token into `out` ([tokens, H] of
  /// `dtype`; added to it when `accumulate`), in destination-rank order.
  void sum_per_token(const EpPlan& plan, int c, DType dtype, int64_t H, void* out, bool accumulate,
                     cudaStream_t stream) {
    const int64_t t0 = sched::chunk_begin(plan.tokens, plan.chunks, c);
    const int64_t t1 = sched::chunk_begin(plan.tokens, plan.chunks, c + 1);
    with_type(dtype, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      combine_rows(t1 - t0, H, token_offsets.data() + t0, token_rows.data(), nullptr,
                   reinterpret_cast<const T_*>(back_rows.data()), H, static_cast<T_*>(out) + t0 * H, H, accumulate,
                   stream);
    });
  }
  /// canon_host = the plan's entries slot by slot, each slot's in (source rank, chunk, entry) order.
  /// A slot's entries of chunk c are sorted by receive row, and chunk c's receive rows by source
  /// rank, so each (chunk, slot, source) is a contiguous run; a source's tokens come chunk after
  /// chunk in token order, so the result is the (source rank, token) order of a single chunk.
  void canonical_entries(const EpPlan& plan) {
    const int C = plan.chunks, P = plan.world;
    canon_host.clear();
    canon_host.reserve(static_cast<std::size_t>(plan.entries()));
    for (int64_t s = 0; s < plan.num_local; ++s)
      for (int p = 0; p < P; ++p)
        for (int c = 0; c < C; ++c) {
          const int64_t r0 = plan.recv_displ(c, p), r1 = plan.recv_offsets[plan.cp(c, p) + 1];
          const int64_t e0 = plan.entry_displ(c, s), e1 = e0 + plan.slot_counts(c, s);
          // The run of entries whose receive row lies in [r0, r1).
          const auto* first = std::lower_bound(plan.entry_row.data() + e0, plan.entry_row.data() + e1, r0);
          for (const auto* q = first; q != plan.entry_row.data() + e1 && *q < r1; ++q)
            canon_host.push_back(q - plan.entry_row.data());
        }
  }
  /// Waits for every exchange still in flight and drops it.
  void settle(Clock::time_point deadline) {
    for (auto* list : {&dispatch, &combine, &combine_dw, &reduce}) {
      for (comm::WorkPtr& w : *list)
        if (w) w->wait(deadline);
      list->clear();
    }
  }
};

void GpuMoELayer::EpStateDeleter::operator()(EpState* p) const { delete p; }

void GpuMoELayer::settle_ep() { ep_->settle(Clock::now() + device_comm_->default_timeout()); }

void GpuMoELayer::init_ep() {
  auto ep = std::unique_ptr<EpState, EpStateDeleter>(new EpState());
  ep->staged = dynamic_cast<comm::StagedCommunicator*>(device_comm_);
#ifdef MOEX_HAVE_NCCL
  ep->nccl = dynamic_cast<comm::NcclCommunicator*>(device_comm_);
#endif
  ep_ = std::move(ep);  // the constructor checked the kind (comm::is_device_communicator)
}

namespace {

/// Grows `b` to hold at least `need` elements (a quarter more, so that small variations do not
/// reallocate every pass); true when it reallocated.
template <typename T>
bool grow(DeviceBuffer<T>& b, int64_t need, cudaStream_t s) {
  if (need <= static_cast<int64_t>(b.size())) return false;
  b = DeviceBuffer<T>();
  b = DeviceBuffer<T>(static_cast<std::size_t>(need + need / 4), s);
  return true;
}

}  // namespace

void GpuMoELayer::forward_ep(const void* xin, void* out, bool accumulate, cudaStream_t stream) {
  EpState& ep = *ep_;
  const int64_t T = tokens_, K = topk_, H = hidden_, F = ffn_, S = local_;
  const int C = options_.chunks;
  const std::size_t es = dtype_size(dtype_);
  // (forward() settled the last pass's exchanges before it touched any buffer.)
  const Clock::time_point deadline = Clock::now() + device_comm_->default_timeout();

  // The top-K to the host, the plan, its metadata exchanged over the host communicator.
  ep.ids.resize(static_cast<std::size_t>(T * K));
  ep.weights.resize(static_cast<std::size_t>(T * K));
  if (T > 0) {
    MOEX_CUDA_CHECK(cudaMemcpyAsync(ep.ids.data(), topk_ids_.data(), ep.ids.size() * sizeof(std::int32_t),
                                    cudaMemcpyDeviceToHost, stream));
    MOEX_CUDA_CHECK(cudaMemcpyAsync(ep.weights.data(), topk_w_.data(), ep.weights.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream));
  }
  MOEX_CUDA_CHECK(cudaStreamSynchronize(stream));
  ep.kept.clear();
  if (options_.capacity_factor > 0.0)
    picks_dropped_ = sched::apply_capacity(ep.ids, ep.weights, experts_, options_.capacity_factor, ep.kept, ep.order);
  const int me = device_comm_->rank();
  if (layout_) {
    // Each kept pick goes to the replica the layout chooses for (expert, this rank, token), as MoELayer.
    ep.pick_rank.resize(static_cast<std::size_t>(T * K));
    ep.pick_slot.resize(static_cast<std::size_t>(T * K));
    for (int64_t i = 0; i < T * K; ++i) {
      const auto u = static_cast<std::size_t>(i);
      if (!ep.kept.empty() && !ep.kept[u]) {
        ep.pick_rank[u] = -1;
        ep.pick_slot[u] = -1;
        continue;
      }
      const std::int32_t e = ep.ids[u];
      if (e < 0 || e >= experts_)
        throw InternalError("GpuMoELayer: the gate picked expert " + std::to_string(e) + " outside [0, " +
                            std::to_string(experts_) + ")");
      const sched::ReplicaLayout::Replica& r = layout_->replicas(e)[static_cast<std::size_t>(
          layout_->choose(e, me, i / K, *topology_))];
      ep.pick_rank[u] = r.rank;
      ep.pick_slot[u] = static_cast<std::int32_t>(r.slot);
    }
    plan_.plan_send_picks(ep.weights, T, K, device_comm_->size(), local_, me, C, ep.pick_rank, ep.pick_slot);
  } else {
    plan_.plan_send(ep.ids, ep.weights, T, K, *placement_, me, C, ep.kept);
  }
  plan_.exchange_metadata(*host_comm_, device_comm_->default_timeout());
  const int64_t SR = plan_.send_rows(), R = plan_.recv_rows(), N = plan_.entries();

  // Workspace for this pass's rows (grows only; nothing in flight uses the old buffers: settled
  // above, and the caller's stream is synchronised).
  {
    const cudaStream_t s = aux_.get();
    bool grew = false;
    grew |= grow(ep.send_token, SR, s);
    grew |= grow(ep.token_rows, SR, s);
    grew |= grow(ep.token_offsets, T + 1, s);
    grew |= grow(ep.pick_back, T * K, s);
    grew |= grow(ep.entry_row, N, s);
    grew |= grow(ep.row_entries, N, s);
    grew |= grow(ep.row_weight, N, s);
    grew |= grow(ep.row_offsets, R + 1, s);
    grew |= grow(ep.row_dw_entry, R * K, s);
    grew |= grow(ep.send_rows, SR * H * static_cast<int64_t>(es), s);
    grew |= grow(ep.back_rows, SR * H * static_cast<int64_t>(es), s);
    grew |= grow(ep.recv_rows, R * H * static_cast<int64_t>(es), s);
    grew |= grow(ep.ret_rows, R * H * static_cast<int64_t>(es), s);
    grew |= grow(ep.dw_out, R * K, s);
    grew |= grow(ep.dw_back, SR * K, s);
    if (N > ep.entry_capacity) {
      const int64_t cap = N + N / 4;
      realloc_routed(cap, s);
      ep.entry_capacity = cap;
      grew = true;
    }
    if (grew) {
      aux_.synchronize();  // the new buffers are ready for any stream
      ++allocations_;
    }
  }
  copy_to_device(ep.send_token.data(), plan_.send_token.data(), static_cast<std::size_t>(SR), stream);
  copy_to_device(ep.token_rows.data(), plan_.token_rows.data(), static_cast<std::size_t>(SR), stream);
  copy_to_device(ep.token_offsets.data(), plan_.token_offsets.data(), static_cast<std::size_t>(T + 1), stream);
  copy_to_device(ep.pick_back.data(), plan_.pick_back.data(), static_cast<std::size_t>(T * K), stream);
  copy_to_device(ep.entry_row.data(), plan_.entry_row.data(), static_cast<std::size_t>(N), stream);
  copy_to_device(entry_w_.data(), plan_.entry_weight.data(), static_cast<std::size_t>(N), stream);
  copy_to_device(ep.row_entries.data(), plan_.row_entries.data(), static_cast<std::size_t>(N), stream);
  copy_to_device(ep.row_weight.data(), plan_.row_weight.data(), static_cast<std::size_t>(N), stream);
  copy_to_device(ep.row_offsets.data(), plan_.row_offsets.data(), static_cast<std::size_t>(R + 1), stream);
  copy_to_device(ep.row_dw_entry.data(), plan_.row_dw_entry.data(), static_cast<std::size_t>(R * K), stream);
  std::fill(counts_.begin(), counts_.end(), int64_t{0});
  for (int c = 0; c < C; ++c)
    for (int64_t s = 0; s < S; ++s) counts_[static_cast<std::size_t>(s)] += plan_.slot_counts(c, s);
  mark(kF1, stream);

  // Dispatch: gather chunk c's rows, then hand them to the communicator (its stream waits for the
  // gather on the device with NCCL).
  ep.dispatch.resize(static_cast<std::size_t>(C));
  for (int c = 0; c < C; ++c)
    ep.dispatch[static_cast<std::size_t>(c)] =
        ep.dispatch_chunk(plan_, *device_comm_, c, dtype_, H, xin, stream, "gpu dispatch");
  mark(kF2, stream);

  // Experts of chunk c once its rows arrived; the combined rows go back while chunk c+1 computes.
  ep.combine.resize(static_cast<std::size_t>(C));
  for (int c = 0; c < C; ++c) {
    ep.consume(*ep.dispatch[static_cast<std::size_t>(c)], stream, deadline);
    const int64_t ef = plan_.chunk_entry_first(c), en = plan_.chunk_entry_count(c);
    const int64_t rf = plan_.chunk_recv_first(c), rn = plan_.chunk_recv_count(c);
    with_type(dtype_, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      gather_rows(en, H, ep.entry_row.data() + ef, reinterpret_cast<const T_*>(ep.recv_rows.data()), H,
                  as<T_>(xe_) + ef * H, H, stream);
    });
    const std::span<const int64_t> rows(plan_.slot_count.data() + plan_.cs(c, 0), static_cast<std::size_t>(S));
    expert_ffn_.forward(blas_.get(), rows, xe_.data() + row_bytes(ef, H, es), expert_w_.data(),
                        expert_w_.data() + 2 * F * H * static_cast<int64_t>(es), h13_.data() + row_bytes(ef, 2 * F, es),
                        sig_.data() + row_bytes(ef, F, es), a_.data() + row_bytes(ef, F, es),
                        ye_.data() + row_bytes(ef, H, es), stream);
    with_type(dtype_, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      combine_rows(rn, H, ep.row_offsets.data() + rf, ep.row_entries.data(), ep.row_weight.data(), as<T_>(ye_), H,
                   reinterpret_cast<T_*>(ep.ret_rows.data() + row_bytes(rf, H, es)), H, false, stream);
    });
    ep.producer_ready(stream);
    ep.combine[static_cast<std::size_t>(c)] = ep.return_chunk(plan_, *device_comm_, c, H, es, "gpu combine");
  }
  mark(kF3, stream);

  // Sum each token's rows (one per rank it went to) onto the shared experts' output.
  join_shared(stream);
  for (int c = 0; c < C; ++c) {
    ep.consume(*ep.combine[static_cast<std::size_t>(c)], stream, deadline);
    ep.sum_per_token(plan_, c, dtype_, H, out, accumulate, stream);
  }
}

void GpuMoELayer::backward_ep(const void* dyin, void* out, bool accumulate, cudaStream_t stream) {
  EpState& ep = *ep_;
  const int64_t T = tokens_, K = topk_, H = hidden_, F = ffn_, S = local_;
  const int C = plan_.chunks;
  const std::size_t es = dtype_size(dtype_);
  const Clock::time_point deadline = Clock::now() + device_comm_->default_timeout();
  ep.settle(deadline);
  mark(kBP, stream);

  ep.dispatch.resize(static_cast<std::size_t>(C));
  for (int c = 0; c < C; ++c)
    ep.dispatch[static_cast<std::size_t>(c)] =
        ep.dispatch_chunk(plan_, *device_comm_, c, dtype_, H, dyin, stream, "gpu dispatch grad");
  mark(kB1, stream);

  ep.combine.resize(static_cast<std::size_t>(C));
  ep.combine_dw.resize(static_cast<std::size_t>(C));
  bool acc_experts = !expert_stale_;
  const std::size_t w2 = static_cast<std::size_t>(2 * F * H) * es;  // w2's byte offset in an expert block
  for (int c = 0; c < C; ++c) {
    ep.consume(*ep.dispatch[static_cast<std::size_t>(c)], stream, deadline);
    const int64_t ef = plan_.chunk_entry_first(c), en = plan_.chunk_entry_count(c);
    const int64_t rf = plan_.chunk_recv_first(c), rn = plan_.chunk_recv_count(c);
    // Routing-weight gradients dot(dy row, expert output) and the expert-output gradients w * dy row.
    with_type(dtype_, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      const T_* drecv = reinterpret_cast<const T_*>(ep.recv_rows.data());
      row_dot(en, H, ep.entry_row.data() + ef, drecv, H, as<T_>(ye_) + ef * H, H, d_entry_.data() + ef, stream);
      gather_rows_scaled(en, H, ep.entry_row.data() + ef, entry_w_.data() + ef, drecv, H, as<T_>(dye_) + ef * H, H,
                         stream);
    });
    const std::span<const int64_t> rows(plan_.slot_count.data() + plan_.cs(c, 0), static_cast<std::size_t>(S));
    if (options_.deterministic) {  // the weight gradients once, after the chunks (below)
      expert_ffn_.backward_data(blas_.get(), rows, expert_w_.data(), expert_w_.data() + w2, h13_.data() + row_bytes(ef, 2 * F, es),
                                sig_.data() + row_bytes(ef, F, es), dye_.data() + row_bytes(ef, H, es),
                                dxe_.data() + row_bytes(ef, H, es), dh13_.data() + row_bytes(ef, 2 * F, es), stream);
    } else {
      expert_ffn_.backward(blas_.get(), rows, xe_.data() + row_bytes(ef, H, es), expert_w_.data(),
                           expert_w_.data() + w2, h13_.data() + row_bytes(ef, 2 * F, es),
                           sig_.data() + row_bytes(ef, F, es), a_.data() + row_bytes(ef, F, es),
                           dye_.data() + row_bytes(ef, H, es), expert_g_.data(), expert_g_.data() + w2,
                           dxe_.data() + row_bytes(ef, H, es), dh13_.data() + row_bytes(ef, 2 * F, es), acc_experts,
                           stream);
      acc_experts = true;
    }
    // Per received row: the sum of its entries' input gradients, and its K routing-weight gradients.
    with_type(dtype_, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      combine_rows(rn, H, ep.row_offsets.data() + rf, ep.row_entries.data(), nullptr, as<T_>(dxe_), H,
                   reinterpret_cast<T_*>(ep.ret_rows.data() + row_bytes(rf, H, es)), H, false, stream);
    });
    gather_values(rn * K, ep.row_dw_entry.data() + rf * K, d_entry_.data(), ep.dw_out.data() + rf * K, stream);
    ep.producer_ready(stream);
    ep.combine[static_cast<std::size_t>(c)] = ep.return_chunk(plan_, *device_comm_, c, H, es, "gpu combine grad");
    ep.combine_dw[static_cast<std::size_t>(c)] =
        ep.move_chunk(plan_, *device_comm_, c, /*forward=*/false, ep.dw_out.data() + rf * K,
                      ep.dw_back.data() + plan_.chunk_send_first(c) * K, K, comm::DataType::kFloat32,
                      "gpu routing-weight grad");
  }
  if (options_.deterministic) {
    // Each slot's weight gradients over all its entries, in (source rank, token) order: the order
    // one chunk gives, whatever the chunk count.
    ep.canonical_entries(plan_);
    if (grow(ep.canon, plan_.entries(), aux_.get())) aux_.synchronize();
    copy_to_device(ep.canon.data(), ep.canon_host.data(), ep.canon_host.size(), stream);
    expert_ffn_.backward_weights(counts_, ep.canon.data(), xe_.data(), a_.data(), dye_.data(), dh13_.data(),
                                 expert_g_.data(), expert_g_.data() + w2, acc_experts, stream);
  }
  expert_stale_ = false;
  mark(kB2, stream);

  join_shared(stream);
  for (int c = 0; c < C; ++c) {
    ep.consume(*ep.combine[static_cast<std::size_t>(c)], stream, deadline);
    ep.consume(*ep.combine_dw[static_cast<std::size_t>(c)], stream, deadline);
    ep.sum_per_token(plan_, c, dtype_, H, out, accumulate, stream);
  }
  gather_values(T * K, ep.pick_back.data(), ep.dw_back.data(), d_weights_.data(), stream);
}

void GpuMoELayer::allreduce_replicated_grads(cudaStream_t stream) {
  if (!expert_parallel()) return;
  EpState& ep = *ep_;
  const Clock::time_point deadline = Clock::now() + device_comm_->default_timeout();
  ep.settle(deadline);
  const int64_t n_gate = experts_ * hidden_, n_shared = 3 * shared_ffn_ * hidden_;
  if (n_shared > 0 && shared_stale_) {
    MOEX_CUDA_CHECK(cudaMemsetAsync(shared_g_.data(), 0, shared_g_.bytes(), stream));
    shared_stale_ = false;
  }
  const bool bf = dtype_ == DType::kBf16;
  if (n_shared > 0 && bf) {
    grow(ep.grad32, n_shared, aux_.get());
    aux_.synchronize();
    convert(as<bf16>(shared_g_), ep.grad32.data(), n_shared, stream);
  }
  // Replica mode: this rank's slot gradients of every multi-replica expert, summed per expert in fp32
  // (zeros for the experts it holds no replica of), as MoELayer::start_replica_grad_reduce.
  const int me = device_comm_->rank();
  const int64_t stride = 3 * ffn_ * hidden_, n_multi = multi_experts_ * stride;
  if (n_multi > 0) {
    if (expert_stale_) {  // zero_grad() without a backward since: the gradients are zeros
      MOEX_CUDA_CHECK(cudaMemsetAsync(expert_g_.data(), 0, expert_g_.bytes(), stream));
      expert_stale_ = false;
    }
    grow(ep.replica32, n_multi, aux_.get());
    aux_.synchronize();
    MOEX_CUDA_CHECK(cudaMemsetAsync(ep.replica32.data(), 0, sizeof(float) * static_cast<std::size_t>(n_multi), stream));
    for (int64_t slot = 0; slot < local_; ++slot) {
      const int64_t m = multi_index_[static_cast<std::size_t>(layout_->expert_at(me, slot))];
      if (m < 0) continue;
      float* dst = ep.replica32.data() + m * stride;
      if (bf)
        add_to(as<bf16>(expert_g_) + slot * stride, dst, stride, stream);
      else
        add_to(as<float>(expert_g_) + slot * stride, dst, stride, stream);
    }
  }
  ep.producer_ready(stream);
  ep.reduce.push_back(device_comm_->allreduce_sum(gate_g_.data(), n_gate, comm::DataType::kFloat32, "gpu gate grads"));
  if (n_shared > 0)
    ep.reduce.push_back(device_comm_->allreduce_sum(bf ? static_cast<void*>(ep.grad32.data()) : shared_g_.data(),
                                                    n_shared, comm::DataType::kFloat32, "gpu shared expert grads"));
  if (n_multi > 0)
    ep.reduce.push_back(device_comm_->allreduce_sum(ep.replica32.data(), n_multi, comm::DataType::kFloat32,
                                                    "gpu replica expert grads"));
  for (comm::WorkPtr& w : ep.reduce) ep.consume(*w, stream, deadline);
  if (n_shared > 0 && bf) convert(ep.grad32.data(), as<bf16>(shared_g_), n_shared, stream);
  // Every replica of an expert takes the sum.
  for (int64_t slot = 0; n_multi > 0 && slot < local_; ++slot) {
    const int64_t m = multi_index_[static_cast<std::size_t>(layout_->expert_at(me, slot))];
    if (m < 0) continue;
    const float* src = ep.replica32.data() + m * stride;
    if (bf) {
      convert(src, as<bf16>(expert_g_) + slot * stride, stride, stream);
    } else {
      MOEX_CUDA_CHECK(cudaMemcpyAsync(as<float>(expert_g_) + slot * stride, src,
                                      sizeof(float) * static_cast<std::size_t>(stride), cudaMemcpyDeviceToDevice,
                                      stream));
    }
  }
  MOEX_CUDA_CHECK(cudaEventRecord(events_->last, stream));
}

}  // namespace moex::cuda
