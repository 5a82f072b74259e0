// moex-bench exchange --device cuda: the exchange's rows on a GPU, moved by the layer's moves over a
// device communicator (staged through pinned host memory over MPI, or NCCL).
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/device_communicator.h"
#include "examples/bench_exchange.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/kernels.h"

namespace moex::tools {
namespace {

using Clock = std::chrono::steady_clock;

class DeviceRows final : public BenchRows {
 public:
  DeviceRows(std::unique_ptr<comm::DeviceCommunicator> dev, std::string kind, std::int64_t hidden, std::int64_t topk)
      : dev_(std::move(dev)), kind_(std::move(kind)), H_(hidden), K_(topk) {}
  ~DeviceRows() override {
    // Pending exchanges write into the buffers: they finish before the buffers go.
    try {
      settle();
      stream_.synchronize();
    } catch (...) {  // a destructor reports nothing; the exchange's own error was thrown already
    }
  }

  void prepare(const layer::PassPlan& plan, std::int64_t tokens) override {
    const std::vector<std::int64_t> need = buffer_elems(plan, tokens, H_, K_);
    for (std::size_t b = 0; b < need.size(); ++b) fit(static_cast<layer::Buf>(b), need[b]);
    if (static_cast<std::int64_t>(x_.size()) < tokens * H_) {
      stream_.synchronize();
      x_ = cuda::DeviceBuffer<float>(static_cast<std::size_t>(tokens * H_), stream_);
    }
    // Every index array the moves may name, uploaded (the plan's vectors are its members: stable keys).
    for (const sched::ExchangePlan* p : {&plan.main, &plan.a, &plan.b})
      for (const std::vector<std::int64_t>* v : {&p->send_token, &p->token_offsets, &p->token_rows, &p->pick_back})
        upload(*v);
    for (const std::vector<std::int64_t>* v :
         {&plan.arrival_row, &plan.row_arrival, &plan.group_offsets, &plan.group_rows, &plan.token_groups,
          &plan.group_ids})
      upload(*v);
  }
  void load(const layer::PassPlan& plan, const std::vector<float>& x) override {
    cuda::copy_to_device(x_.data(), x.data(), x.size(), stream_);
    const auto& o = plan.origin();
    cuda::gather_rows(o.send_rows(), H_, ix(o.send_token), x_.data(), H_, buf(layer::Buf::kOriginSend), H_, stream_);
  }
  void clear_recv(std::int64_t rows) override {
    host_.assign(static_cast<std::size_t>(rows * H_), -1.0f);
    cuda::copy_to_device(buf(layer::Buf::kRecv), host_.data(), host_.size(), stream_);
    stream_.synchronize();  // host_ is pageable and reused
  }
  void echo(std::int64_t rows) override {
    if (rows > 0)
      MOEX_CUDA_CHECK(cudaMemcpyAsync(buf(layer::Buf::kRet), buf(layer::Buf::kRecv),
                                      static_cast<std::size_t>(rows * H_) * sizeof(float), cudaMemcpyDeviceToDevice,
                                      stream_));
  }
  void finish() override {
    ready();
    stream_.synchronize();
    settle();
  }
  void read(layer::Buf b, std::int64_t elems, std::vector<float>& out) override {
    out.resize(static_cast<std::size_t>(elems));
    cuda::copy_to_host(out.data(), buf(b), out.size(), stream_);
  }
  std::string describe() const override { return "device buffers over the " + kind_ + " device communicator"; }

  void gather(std::int64_t n, const std::vector<std::int64_t>& index, std::int64_t at, layer::Buf src, layer::Buf dst,
              std::int64_t dst_row, bool) override {
    cuda::gather_rows(n, H_, ix(index) + at, buf(src), H_, buf(dst) + dst_row * H_, H_, stream_);
  }
  void sum(std::int64_t n, const std::vector<std::int64_t>& offsets, std::int64_t at,
           const std::vector<std::int64_t>& members, layer::Buf src, layer::Buf dst, std::int64_t dst_row,
           bool accumulate) override {
    cuda::combine_rows(n, H_, ix(offsets) + at, ix(members), nullptr, buf(src), H_, buf(dst) + dst_row * H_, H_,
                       accumulate, stream_);
  }
  void exchange(const sched::ExchangePlan& plan, int c, bool out, layer::Buf from, layer::Buf to, bool, bool skip_self,
                const std::string& label) override {
    if (skip_self) throw InternalError("moex-bench exchange: every block is exchanged here (no local-first)");
    dev_->wait_for_stream(stream_);  // the gathers queued so far are what this exchange sends
    pending_.push_back(layer::exchange_chunk(*dev_, plan, c, out, H_, comm::DataType::kFloat32, buf(from), buf(to),
                                             false, label, blocks_));
    for (std::size_t p = 0; p < blocks_.send_counts.size(); ++p)
      if (static_cast<int>(p) != dev_->rank()) remote_bytes += 4.0 * static_cast<double>(blocks_.send_counts[p]);
  }
  void ready() override {
    const auto deadline = Clock::now() + dev_->default_timeout();
    for (; consumed_ < pending_.size(); ++consumed_) dev_->consume(*pending_[consumed_], stream_, deadline);
  }

 private:
  float* buf(layer::Buf b) { return bufs_[static_cast<std::size_t>(b)].data(); }
  void fit(layer::Buf b, std::int64_t elems) {
    auto& d = bufs_[static_cast<std::size_t>(b)];
    if (static_cast<std::int64_t>(d.size()) < elems) {
      stream_.synchronize();  // nothing queued may still use the old buffer
      d = cuda::DeviceBuffer<float>(static_cast<std::size_t>(elems), stream_);
    }
  }
  void upload(const std::vector<std::int64_t>& v) {
    auto& d = index_[&v];
    if (d.size() < v.size()) {
      stream_.synchronize();
      d = cuda::DeviceBuffer<std::int64_t>(v.size(), stream_);
    }
    cuda::copy_to_device(d.data(), v.data(), v.size(), stream_);
  }
  const std::int64_t* ix(const std::vector<std::int64_t>& v) {
    auto it = index_.find(&v);
    if (it == index_.end()) throw InternalError("moex-bench exchange: an index array that was not uploaded");
    return it->second.data();
  }
  /// Waits for every exchange issued and drops it (a Work must outlive its op).
  void settle() {
    const auto deadline = Clock::now() + dev_->default_timeout();
    for (auto& w : pending_)
      if (w) w->wait(deadline);
    pending_.clear();
    consumed_ = 0;
  }

  std::unique_ptr<comm::DeviceCommunicator> dev_;
  std::string kind_;
  std::int64_t H_, K_;
  cuda::Stream stream_;  // declared before the buffers, which free on it
  cuda::DeviceBuffer<float> bufs_[static_cast<int>(layer::Buf::kPicks) + 1];
  cuda::DeviceBuffer<float> x_;
  std::map<const void*, cuda::DeviceBuffer<std::int64_t>> index_;
  std::vector<float> host_;
  std::vector<comm::WorkPtr> pending_;
  std::size_t consumed_ = 0;
  layer::HostBlocks blocks_;
};

}  // namespace

std::unique_ptr<BenchRows> make_device_rows(comm::MpiCommunicator& world, const std::string& kind, std::int64_t hidden,
                                            std::int64_t topk, std::string* why) {
  // Every rank learns whether every rank has a device, so that none goes on alone.
  const int devices = cuda::cuda_device_count(why);
  std::int32_t lacking = devices > 0 ? 0 : 1;
  world.allreduce_sum(&lacking, 1, comm::DataType::kInt32, "bench exchange devices")->wait();
  if (lacking > 0) {
    if (why && devices > 0) *why = std::to_string(lacking) + " rank(s) have no CUDA device";
    return nullptr;
  }
  MOEX_CUDA_CHECK(cudaSetDevice(world.rank() % devices));
  auto dev = comm::make_device_communicator(kind, MPI_COMM_WORLD, world.default_timeout());
  return std::make_unique<DeviceRows>(std::move(dev), kind, hidden, topk);
}

}  // namespace moex::tools
