// GpuMoELayer's expert-parallel mode (see gpu_layer.h): the exchange of routed rows between ranks,
// chunk by chunk, driven by a sched::ExchangePlan built on the host.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/device_communicator.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/layer_helpers.h"
#include "runtime/layer/row_exchange.h"
#include "scheduler/capacity.h"

namespace moex::cuda {
using namespace layer;  // NOLINT: the layer sources' shared helpers
namespace {

using std::int64_t;
using Clock = std::chrono::steady_clock;

}  // namespace

/// Buffers and pending exchanges of an expert-parallel layer. Device buffers live on the layer's
/// second stream (aux_) and only grow.
struct GpuMoELayer::EpState : moex::layer::PassSteps {
  bool serial = false;  // GpuLayerOptions::overlap off: each exchange is waited for once issued
  comm::DeviceCommunicator* device = nullptr;
  /// The row buffers of a pass by layer::Buf (layer dtype; sized by layer::buffer_rows: the flat
  /// exchange's, or the hierarchical one's stages A and B, whose owner still receives into kRecv at
  /// the rows' canonical place (chunk, ORIGIN, token), which makes the entries' order, and so the
  /// results, those of the flat exchange), and their dw twins (K fp32 routing-weight gradients a row).
  std::array<DeviceBuffer<unsigned char>, moex::layer::kOwnedBufs> bufs;
  std::array<DeviceBuffer<float>, moex::layer::kOwnedBufs> dws;
  /// The host side of every pass (written once with the CPU layer): the plans, their metadata,
  /// the arrival maps and the per-node sum groups.
  moex::layer::PassPlan pass;
  /// Device copies of the pass plan's index arrays that the pass steps read (each exchange plan's
  /// send side, the arrival maps, the per-node sum groups), found by their host array (ix()).
  struct Mirror {
    const std::vector<int64_t>* host = nullptr;
    DeviceBuffer<int64_t> dev;
  };
  std::vector<Mirror> mirrors;

  /// Grows the mirrors to this pass's arrays; true when any reallocated. The list of host arrays
  /// (members of `pass`, so their addresses never change) is made on the first call.
  bool reserve_mirrors(cudaStream_t s) {
    if (mirrors.empty()) {
      for (const std::vector<int64_t>* v : {&pass.arrival_row, &pass.row_arrival, &pass.group_offsets, &pass.group_rows,
                                            &pass.token_groups, &pass.group_ids})
        mirrors.emplace_back().host = v;
      for (const sched::ExchangePlan* p : {&pass.main, &pass.a, &pass.b})
        for (const std::vector<int64_t>* v : {&p->send_token, &p->token_offsets, &p->token_rows, &p->pick_back})
          mirrors.emplace_back().host = v;
    }
    bool grew = false;
    for (Mirror& m : mirrors) grew |= grow(m.dev, static_cast<int64_t>(m.host->size()), s);
    return grew;
  }
  void upload_mirrors(cudaStream_t stream) {
    for (Mirror& m : mirrors) copy_to_device(m.dev.data(), m.host->data(), m.host->size(), stream);
  }

  /// The schedule: fixed, or --chunks auto's trials, then their choice.
  sched::TrialSchedule trial;
  bool timed_pass = false;  // trying: the last forward had its backward, every stage marked
  /// This forward's schedule of the own rows (GpuLayerOptions local_first, local_split; the flat
  /// exchange with more than one rank), which its backward keeps.
  moex::layer::OwnRows own;
  // The main plan's receive side in the compute order of the expert GEMMs (group, slot; the groups
  // of `own`), on the host (position: deterministic mode's canonical order) and on the device.
  sched::ExchangePlan::ComputeOrder view;
  DeviceBuffer<int64_t> entry_row, row_offsets, row_entries, row_dw_entry;
  DeviceBuffer<float> row_weight;
  DeviceBuffer<float> grad32;     // bf16 shared gradients summed in fp32
  DeviceBuffer<float> replica32;  // replica mode: [multi-replica experts, 3FH] gradient sums
  // Host copies of the top-K of the last forward.
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  std::vector<comm::WorkPtr> reduce;
  moex::layer::HostBlocks blocks;       // per-peer block counts / displacements scratch
  int64_t entry_capacity = 0;           // entries the layer's routed buffers (xe_, ...) hold
  DeviceBuffer<int64_t> canon;  // deterministic mode: view.position on the device

  /// Orders the device communicator's next ops after the work queued on `producer` so far.
  void producer_ready(cudaStream_t producer) { device->wait_for_stream(producer); }
  /// Makes `stream` see what `w` received: on the device for NCCL (the host goes on), by waiting on
  /// the host (until `deadline`) for the staged path, whose copies to the device the host drives.
  void consume(comm::Work& w, cudaStream_t stream, Clock::time_point deadline) {
    device->consume(w, stream, deadline);
  }

  // ---- layer::RowMoves: the shared moves (moex::layer::dispatch ...) on device buffers, queued on
  // `stream`; each chunk's exchanges are kept (a Work must outlive its op) until settled.
  struct Works {
    std::vector<comm::WorkPtr> list;
    std::size_t ready = 0;  // the first not yet consumed on the stream
  };
  std::vector<Works> dispatch_works, combine_works;
  Works* current = nullptr;  // where the next exchanges go (the chunk and phase the layer is at)
  GpuMoELayer* layer = nullptr;
  comm::Communicator* comm = nullptr;
  cudaStream_t stream = nullptr;
  Clock::time_point deadline;
  DType dtype = DType::kFp32;
  int64_t H = 0, K = 0;
  const void* src = nullptr;  // the rows sent: x (forward) or dy (backward), layer dtype
  void* out = nullptr;        // layer::Buf::kOut
  float* picks = nullptr;     // layer::Buf::kPicks (d_weights_)
  bool add = false;           // the sums add to kOut (the shared experts' output)

  /// The pass's settings for the steps and moves that follow: from `in` into `result` on `s`.
  void begin(GpuMoELayer& l, cudaStream_t s, Clock::time_point d, const void* in, void* result, bool acc, int chunks);

  // layer::PassSteps (defined after GpuMoELayer's expert-parallel methods).
  const moex::layer::PassPlan& pass_plan() const override { return pass; }
  void send(int c, bool grad, bool skip_self) override;
  /// Queued by forward() / backward() on the layer's side stream before the gate and the plan (so
  /// that it also hides the plan's round trip through the host); joined in returned().
  void shared(bool) override {}
  void arrived(int c, bool grad) override;
  void experts(moex::layer::Stage stage, bool grad) override;
  void start_return(int c, bool grad, bool skip_self) override;
  void weight_grads() override;
  void returning(int c, bool grad) override;
  void returned(int c, bool grad) override;
  bool accumulate() const override { return add; }
  void* rows(moex::layer::Buf which, bool dw) {
    if (which == moex::layer::Buf::kOut) return out;
    if (which == moex::layer::Buf::kPicks) return picks;
    const auto i = static_cast<std::size_t>(which);
    return dw ? static_cast<void*>(dws[i].data()) : bufs[i].data();
  }
  /// The device copy of one of the pass plan's index arrays.
  const int64_t* ix(const std::vector<int64_t>& v) {
    for (const Mirror& m : mirrors)
      if (m.host == &v) return m.dev.data();
    throw InternalError("GpuMoELayer: an index array of the pass plan that was not uploaded");
  }
  void gather(int64_t n, const std::vector<int64_t>& index, int64_t at, moex::layer::Buf src, moex::layer::Buf dst,
              int64_t dst_row, bool dw) override {
    if (dw) {
      gather_rows(n, K, ix(index) + at, static_cast<const float*>(rows(src, true)), K,
                  static_cast<float*>(rows(dst, true)) + dst_row * K, K, stream);
      return;
    }
    with_type(dtype, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      gather_rows(n, H, ix(index) + at, static_cast<const T_*>(rows(src, false)), H,
                  static_cast<T_*>(rows(dst, false)) + dst_row * H, H, stream);
    });
  }
  void copy(int64_t n, moex::layer::Buf src, int64_t src_row, moex::layer::Buf dst, int64_t dst_row,
            bool dw) override {
    if (n <= 0) return;
    const auto row = static_cast<int64_t>(dw ? sizeof(float) * static_cast<std::size_t>(K) : H * dtype_size(dtype));
    MOEX_CUDA_CHECK(cudaMemcpyAsync(static_cast<unsigned char*>(rows(dst, dw)) + dst_row * row,
                                    static_cast<const unsigned char*>(rows(src, dw)) + src_row * row,
                                    static_cast<std::size_t>(n * row), cudaMemcpyDeviceToDevice, stream));
  }
  void gather_values(int64_t n, const std::vector<int64_t>& index, int64_t at, moex::layer::Buf src,
                     moex::layer::Buf dst, int64_t dst_at) override {
    cuda::gather_values(n, ix(index) + at, static_cast<const float*>(rows(src, true)),
                        static_cast<float*>(rows(dst, true)) + dst_at, stream);
  }
  void sum(int64_t n, const std::vector<int64_t>& offsets, int64_t at, const std::vector<int64_t>& members,
           moex::layer::Buf src, moex::layer::Buf dst, int64_t dst_row, bool accumulate) override {
    with_type(dtype, [&](auto tag) {
      using T_ = typename decltype(tag)::type;
      combine_rows(n, H, ix(offsets) + at, ix(members), nullptr, static_cast<const T_*>(rows(src, false)), H,
                   static_cast<T_*>(rows(dst, false)) + dst_row * H, H, accumulate, stream);
    });
  }
  void exchange(const sched::ExchangePlan& plan, int c, bool out_, moex::layer::Buf from, moex::layer::Buf to, bool dw,
                bool skip_self, const std::string& label) override {
    producer_ready(stream);  // the gathers queued so far are what this exchange sends
    comm::WorkPtr w = exchange_chunk(*comm, plan, c, out_, dw ? K : H * static_cast<int64_t>(dtype_size(dtype)),
                                     dw ? comm::DataType::kFloat32 : comm::DataType::kByte, rows(from, dw),
                                     rows(to, dw), skip_self, label + " chunk " + std::to_string(c), blocks);
    if (serial) w->wait(Clock::now() + comm->default_timeout());
    current->list.push_back(std::move(w));
  }
  void ready() override {
    for (; current->ready < current->list.size(); ++current->ready)
      consume(*current->list[current->ready], stream, deadline);
  }
  /// Waits for every exchange still in flight and drops it.
  void settle(Clock::time_point deadline) {
    for (auto* phase : {&dispatch_works, &combine_works})
      for (Works& works : *phase) {
        for (comm::WorkPtr& w : works.list)
          if (w) w->wait(deadline);
        works = {};
      }
    for (comm::WorkPtr& w : reduce)
      if (w) w->wait(deadline);
    reduce.clear();
  }
};

void GpuMoELayer::EpStateDeleter::operator()(EpState* p) const { delete p; }

const moex::layer::PassPlan* GpuMoELayer::pass_plan() const { return ep_ ? &ep_->pass : nullptr; }

void GpuMoELayer::settle_ep() { ep_->settle(Clock::now() + device_comm_->default_timeout()); }

void GpuMoELayer::init_ep() {
  auto ep = std::unique_ptr<EpState, EpStateDeleter>(new EpState());
  ep->serial = !options_.overlap;
  ep->device = comm::as_device_communicator(*device_comm_);
  ep->trial.reset(options_.chunks, options_.local_first, options_.local_split, options_.exchange == ExchangeKind::kFlat,
                  device_comm_->size());
  ep_ = std::move(ep);  // not null: the constructor checked the kind (comm::is_device_communicator)
}

const sched::ScheduleChoice* GpuMoELayer::schedule_choice() const { return ep_ ? &ep_->trial.choice() : nullptr; }

void GpuMoELayer::keep_schedule(const sched::ScheduleChoice& from) {
  if (ep_) ep_->trial.adopt(from);
}

void GpuMoELayer::schedule_ep(cudaStream_t stream) {
  EpState& ep = *ep_;
  if (ep.trial.trying() && ep.timed_pass) {
    synchronize(stream, "timing a schedule trial", device_comm_->default_timeout());
    const GpuLayerTimes t = events_->profile.times();
    ep.trial.timed(t.fwd_total + t.bwd_total);
  }
  ep.timed_pass = false;
  if (ep.trial.deciding()) {
    // Every rank times the same passes; the slowest rank's time of each candidate decides.
    std::vector<double>& times = ep.trial.times();
    host_comm_->allreduce_max(times.data(), static_cast<int64_t>(times.size()), comm::DataType::kFloat64,
                              "gpu schedule trials")
        ->wait(Clock::now() + host_comm_->default_timeout());
    ep.trial.choose(/*min_gain_ms=*/0.0);
  }
  timing_ = ep.trial.trying();
}

void GpuMoELayer::plan_ep(cudaStream_t stream) {
  EpState& ep = *ep_;
  const int64_t T = tokens_, K = topk_;
  const int C = schedule().chunks;
  // The top-K to the host, the plan(s), their metadata exchanged over the host communicator.
  ep.ids.resize(static_cast<std::size_t>(T * K));
  ep.weights.resize(static_cast<std::size_t>(T * K));
  if (T > 0) {
    MOEX_CUDA_CHECK(cudaMemcpyAsync(ep.ids.data(), topk_ids_.data(), ep.ids.size() * sizeof(std::int32_t),
                                    cudaMemcpyDeviceToHost, stream));
    MOEX_CUDA_CHECK(cudaMemcpyAsync(ep.weights.data(), topk_w_.data(), ep.weights.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream));
  }
  synchronize(stream, "top-K to the host", device_comm_->default_timeout());
  ep.pass.route({&where_, K, options_.exchange == ExchangeKind::kHierarchical, options_.capacity_factor, "GpuMoELayer"},
                device_comm_->rank(), device_comm_->size(), ep.ids, ep.weights, T, C);
  ep.pass.exchange_metadata(*host_comm_, device_comm_->default_timeout());
  ep.pass.finish();
  picks_dropped_ = ep.pass.dropped;
  const sched::Schedule sc = schedule();
  ep.own = {sc.local_first, sc.local_split};
  ep.pass.main.compute_order(ep.view, sc.local_first ? device_comm_->rank() : -1,
                             sc.local_split ? ep.pass.own_split : local_);
}

void GpuMoELayer::forward_ep(const void* xin, void* out, bool accumulate, cudaStream_t stream) {
  EpState& ep = *ep_;
  const sched::ExchangePlan& plan_ = ep.pass.main;
  const int64_t H = hidden_, S = local_;
  const int C = schedule().chunks;
  const std::size_t es = dtype_size(dtype_);
  const int64_t rb = H * static_cast<int64_t>(es);  // bytes per row
  // (forward() settled the last pass's exchanges before it touched any buffer.)
  const Clock::time_point deadline = Clock::now() + device_comm_->default_timeout();
  plan_ep(stream);
  const int64_t R = plan_.recv_rows(), N = plan_.entries();

  // Workspace for this pass's rows (grows only; nothing in flight uses the old buffers: settled
  // above, and the caller's stream is synchronised).
  {
    const cudaStream_t s = aux_.get();
    bool grew = ep.reserve_mirrors(s);
    for (int i = 0; i < moex::layer::kOwnedBufs; ++i) {
      const auto b = static_cast<moex::layer::Buf>(i);
      const int64_t n = moex::layer::buffer_rows(ep.pass, b);
      grew |= grow(ep.bufs[static_cast<std::size_t>(i)], n * rb, s);
      if (moex::layer::has_dw_twin(b)) grew |= grow(ep.dws[static_cast<std::size_t>(i)], n * topk_, s);
    }
    grew |= grow(ep.entry_row, N, s);
    grew |= grow(ep.row_entries, N, s);
    grew |= grow(ep.row_weight, N, s);
    grew |= grow(ep.row_offsets, R + 1, s);
    grew |= grow(ep.row_dw_entry, R * topk_, s);
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
  ep.upload_mirrors(stream);
  const sched::ExchangePlan::ComputeOrder& v = ep.view;
  copy_to_device(ep.entry_row.data(), v.entry_row.data(), static_cast<std::size_t>(N), stream);
  copy_to_device(entry_w_.data(), v.entry_weight.data(), static_cast<std::size_t>(N), stream);
  copy_to_device(ep.row_entries.data(), v.row_entries.data(), static_cast<std::size_t>(N), stream);
  copy_to_device(ep.row_weight.data(), v.row_weight.data(), static_cast<std::size_t>(N), stream);
  copy_to_device(ep.row_offsets.data(), v.row_offsets.data(), static_cast<std::size_t>(R + 1), stream);
  copy_to_device(ep.row_dw_entry.data(), v.row_dw_entry.data(), static_cast<std::size_t>(R * topk_), stream);
  for (int64_t s = 0; s < S; ++s) counts_[static_cast<std::size_t>(s)] = plan_.slot_entries(s);
  mark(kF1, stream);

  ep.begin(*this, stream, deadline, xin, out, accumulate, C);
  moex::layer::run_forward(ep, ep.own);
}

void GpuMoELayer::backward_ep(const void* dyin, void* out, bool accumulate, cudaStream_t stream) {
  EpState& ep = *ep_;
  const Clock::time_point deadline = Clock::now() + device_comm_->default_timeout();
  ep.settle(deadline);
  mark(kBP, stream);
  ep.begin(*this, stream, deadline, dyin, out, accumulate, ep.pass.main.chunks);
  moex::layer::run_backward(ep, ep.own);
  ep.timed_pass = timing_;  // this pass's marks are queued: the next forward reads its time
}

// ---- EpState's layer::PassSteps: the steps of layer::run_forward / run_backward on the device.

void GpuMoELayer::EpState::begin(GpuMoELayer& l, cudaStream_t s, Clock::time_point d, const void* in, void* result,
                                 bool acc, int chunks) {
  layer = &l;
  comm = l.device_comm_;
  stream = s;
  deadline = d;
  dtype = l.dtype_;
  H = l.hidden_;
  K = l.topk_;
  src = in;
  out = result;
  picks = l.d_weights_.data();
  add = acc;
  dispatch_works.resize(static_cast<std::size_t>(chunks));
  combine_works.resize(static_cast<std::size_t>(chunks));
}

void GpuMoELayer::EpState::send(int c, bool grad, bool skip_self) {
  // Chunk c's rows gathered and handed to the communicator (its stream waits for the gather on the
  // device with NCCL); stage B of the hierarchical exchange once stage A brought them.
  const sched::ExchangePlan& origin = pass.origin();
  const int64_t f = origin.chunk_send_first(c);
  with_type(dtype, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    gather_rows(origin.chunk_send_count(c), H, ix(origin.send_token) + f, static_cast<const T_*>(src), H,
                static_cast<T_*>(rows(moex::layer::Buf::kOriginSend, false)) + f * H, H, stream);
  });
  current = &dispatch_works[static_cast<std::size_t>(c)];
  moex::layer::dispatch(pass, *this, c, skip_self, grad ? "gpu dispatch grad" : "gpu dispatch");
  if (c + 1 == origin.chunks) layer->mark(grad ? kB1 : kF2, stream);
}

void GpuMoELayer::EpState::arrived(int c, bool) {
  current = &dispatch_works[static_cast<std::size_t>(c)];
  moex::layer::arrive(pass, *this, c);
}

void GpuMoELayer::EpState::experts(moex::layer::Stage stage, bool grad) {
  using moex::layer::Buf;
  using moex::layer::Part;
  const sched::ExchangePlan& L = pass.main;
  const int64_t S = L.num_local;
  const int C = L.chunks, me = L.rank, c = stage.chunk;
  const std::size_t row = static_cast<std::size_t>(H) * dtype_size(dtype);
  // Group g's entries (one contiguous block per slot): their gathers and expert GEMMs.
  const auto gemms = [&](int g) {
    const int64_t f = view.first(g, 0, S);
    GpuMoELayer::StageRows r;
    r.first = f;
    r.count = view.first(g + 1, 0, S) - f;
    r.slot_rows = std::span<const int64_t>(view.group_slot.data() + g * S, static_cast<std::size_t>(S));
    r.entry_row = entry_row.data();
    r.in = rows(Buf::kRecv, false);
    layer->expert_gemms(r, grad, layer->options_.deterministic, stream);
  };
  // Recv rows [r0, r0 + n), whose entries are all computed: one row back each into kRet (backward:
  // and its K routing-weight gradients into kRet's dw twin).
  const auto combine = [&](int64_t r0, int64_t n) {
    GpuMoELayer::StageRows r;
    r.rows = n;
    r.row_offsets = row_offsets.data() + r0;
    r.row_entries = row_entries.data();
    r.row_weight = row_weight.data();
    r.out = static_cast<unsigned char*>(rows(Buf::kRet, false)) + static_cast<std::size_t>(r0) * row;
    r.dw_index = row_dw_entry.data() + r0 * K;
    r.dw_out = static_cast<float*>(rows(Buf::kRet, true)) + r0 * K;
    layer->expert_combine(r, grad, stream);
  };
  switch (stage.part) {
    case Part::kAll:
      gemms(c);
      combine(L.chunk_recv_first(c), L.chunk_recv_count(c));
      return;
    case Part::kRemote: {  // chunk c's rows from the ranks before this one, then after it
      gemms(1 + c);
      const int64_t f = L.chunk_recv_first(c), own_f = L.recv_displ(c, me);
      const int64_t own_end = own_f + L.recv_counts[L.cp(c, me)];
      combine(f, own_f - f);
      combine(own_end, f + L.chunk_recv_count(c) - own_end);
      return;
    }
    case Part::kSelf: {
      // The own rows' slots [first_slot, end_slot): whole groups of the view (forward: the slots
      // before its split, then the rest; backward: all); their sums once the last slot is done.
      const int64_t a = stage.first_slot, b = stage.end_slot, split = view.split;
      if (!(a == 0 || a == split) || !(b == split || b == S) || a > b)
        throw InternalError("GpuMoELayer: own-row slots [" + std::to_string(a) + ", " + std::to_string(b) +
                            ") are not groups of this pass's compute order (split " + std::to_string(split) + ")");
      if (a < split) gemms(0);
      if (b > split) gemms(C + 1);
      if (b == S)
        for (int k = 0; k < C; ++k) combine(L.recv_displ(k, me), L.recv_counts[L.cp(k, me)]);
      return;
    }
  }
}

void GpuMoELayer::EpState::start_return(int c, bool grad, bool skip_self) {
  current = &combine_works[static_cast<std::size_t>(c)];
  moex::layer::give_back(pass, *this, c, grad, skip_self, grad ? "gpu combine grad" : "gpu combine");
  if (!grad && c + 1 == pass.main.chunks) layer->mark(kF3, stream);
}

void GpuMoELayer::EpState::weight_grads() {
  GpuMoELayer& l = *layer;
  if (l.options_.deterministic) {
    // Each slot's weight gradients over all its entries, in (source rank, token) order: the order
    // one chunk gives, whatever the chunk count.
    const std::size_t w2 = static_cast<std::size_t>(2 * l.ffn_ * H) * dtype_size(dtype);
    if (grow(canon, pass.main.entries(), l.aux_.get())) l.aux_.synchronize();
    copy_to_device(canon.data(), view.position.data(), view.position.size(), stream);
    l.expert_ffn_.backward_weights(l.counts_, canon.data(), l.xe_.data(), l.a_.data(), l.dye_.data(), l.dh13_.data(),
                                   l.expert_g_.data(), l.expert_g_.data() + w2, !l.expert_stale_, stream);
  }
  l.expert_stale_ = false;
  l.mark(kB2, stream);
}

void GpuMoELayer::EpState::returning(int c, bool grad) {
  // Hierarchical: the forwarders' sums back to the origins (after every chunk's give_back, so that
  // a host-driven communicator's waits hold none of them up).
  current = &combine_works[static_cast<std::size_t>(c)];
  moex::layer::relay(pass, *this, c, grad, grad ? "gpu combine grad" : "gpu combine");
}

void GpuMoELayer::EpState::returned(int c, bool) {
  if (c == 0) layer->join_shared(stream);  // the sums add to the shared experts' output
  current = &combine_works[static_cast<std::size_t>(c)];
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
  const int64_t stride = 3 * ffn_ * hidden_, n_multi = where_.multi_experts() * stride;
  if (n_multi > 0) {
    if (expert_stale_) {  // zero_grad() without a backward since: the gradients are zeros
      MOEX_CUDA_CHECK(cudaMemsetAsync(expert_g_.data(), 0, expert_g_.bytes(), stream));
      expert_stale_ = false;
    }
    grow(ep.replica32, n_multi, aux_.get());
    aux_.synchronize();
    MOEX_CUDA_CHECK(cudaMemsetAsync(ep.replica32.data(), 0, sizeof(float) * static_cast<std::size_t>(n_multi), stream));
    for (const auto& [slot, m] : where_.multi_slots(me))
      with_type(dtype_, [&](auto tag) {
        add_to(as<typename decltype(tag)::type>(expert_g_) + slot * stride, ep.replica32.data() + m * stride, stride,
               stream);
      });
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
  for (const auto& [slot, m] : where_.multi_slots(me))
    with_type(dtype_, [&](auto tag) {
      convert(ep.replica32.data() + m * stride, as<typename decltype(tag)::type>(expert_g_) + slot * stride, stride,
              stream);
    });
  MOEX_CUDA_CHECK(cudaEventRecord(events_->last, stream));
}

}  // namespace moex::cuda
