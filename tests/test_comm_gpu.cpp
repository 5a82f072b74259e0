// Multi-rank tests of the device-buffer communicators: StagedCommunicator (device data staged
// through pinned host memory over MPI; ranks may share a GPU) and NcclCommunicator (one GPU per
// rank). Every rank runs every test; each rank uses GPU (local rank % device count). Every test
// skips, with the reason, where a rank has no CUDA device; the NCCL ones also where ranks share one.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/mpi/mpi_communicator.h"
#include "comm/staged/staged_communicator.h"
#ifdef MOEX_HAVE_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif
#include "tests/mpi_test_env.h"

namespace moex::comm {
namespace {

using moex::testing::all_ranks;
using moex::testing::world;

/// Makes a failure on any rank visible as a failure on every rank (a collective: call it once at
/// the end of a test on every rank).
void expect_all_ranks_passed() {
  EXPECT_TRUE(all_ranks(!::testing::Test::HasFailure())) << "the test failed on at least one rank";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

void cuda_ok(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(rc));
}

/// "" when every rank has a CUDA device (each then uses GPU local rank % device count), else why
/// not, the same on every rank. A collective, evaluated once (by the first test, on every rank).
const std::string& gpu_skip_reason() {
  static const std::string reason = [] {
    // The split is a collective: every rank takes part, whether or not it has a device.
    MPI_Comm node = MPI_COMM_NULL;
    MPI_Comm_split_type(world().native(), MPI_COMM_TYPE_SHARED, world().rank(), MPI_INFO_NULL, &node);
    int local_rank = 0;
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_free(&node);
    std::string local;
    int count = 0;
    const cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess) {
      local = std::string("no CUDA device: cudaGetDeviceCount: ") + cudaGetErrorString(rc);
      cudaGetLastError();
    } else if (count == 0) {
      local = "no CUDA device: cudaGetDeviceCount reported 0 devices";
    } else {
      const cudaError_t set = cudaSetDevice(local_rank % count);
      if (set != cudaSuccess) local = std::string("no CUDA device: cudaSetDevice: ") + cudaGetErrorString(set);
    }
    if (all_ranks(local.empty())) return std::string();
    return local.empty() ? std::string("no CUDA device on another rank of this job") : local;
  }();
  return reason;
}

/// A device array filled from (and read back into) host vectors. Uploads finish before the
/// constructor returns, so that an op on any stream sees the data.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(const std::vector<T>& host) : size_(host.size()) {
    if (size_ == 0) return;
    cuda_ok(cudaMalloc(reinterpret_cast<void**>(&ptr_), bytes()), "cudaMalloc");
    cuda_ok(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice), "cudaMemcpy host->device");
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  /// Null for an empty array (allowed by the ops with zero counts).
  T* get() const { return ptr_; }
  std::vector<T> to_host() const {
    std::vector<T> out(size_);
    if (size_ > 0) cuda_ok(cudaMemcpy(out.data(), ptr_, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy device->host");
    return out;
  }

 private:
  std::size_t bytes() const { return size_ * sizeof(T); }
  std::size_t size_;
  T* ptr_ = nullptr;
};

/// A StagedCommunicator over its own duplicate of the world communicator.
std::unique_ptr<StagedCommunicator> make_staged() {
  auto comm = std::make_unique<StagedCommunicator>(std::make_unique<MpiCommunicator>(world().native()));
  comm->set_default_timeout(world().default_timeout());
  return comm;
}

#ifdef MOEX_HAVE_NCCL
/// The NcclCommunicator over the world's ranks, or the reason there can be none (a collective).
std::string make_nccl(std::unique_ptr<NcclCommunicator>& out) {
  std::string problem = NcclCommunicator::gpu_sharing_problem(world());
  if (!problem.empty()) return problem;
  NcclCommunicator::Options options;
  options.timeout = world().default_timeout();
  out = std::make_unique<NcclCommunicator>(world().native(), options);
  return "";
}
#endif

enum class Backend { kStaged, kNccl };

std::string backend_name(const ::testing::TestParamInfo<Backend>& info) {
  return info.param == Backend::kStaged ? "staged" : "nccl";
}

/// The collective checks, run once per backend. SetUp skips (on every rank alike) where the
/// backend cannot run here.
class GpuComm : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    if (const std::string& why = gpu_skip_reason(); !why.empty()) GTEST_SKIP() << why;
    if (GetParam() == Backend::kStaged) {
      comm_ = make_staged();
      return;
    }
#ifdef MOEX_HAVE_NCCL
    std::unique_ptr<NcclCommunicator> nccl;
    if (const std::string why = make_nccl(nccl); !why.empty()) GTEST_SKIP() << why;
    comm_ = std::move(nccl);
#else
    GTEST_SKIP() << "moex was built without NCCL (nccl.h or libnccl not found at configure time)";
#endif
  }
  void TearDown() override { comm_.reset(); }

  Communicator& comm() { return *comm_; }

 private:
  std::unique_ptr<Communicator> comm_;
};

// --- alltoallv: values encode (source, destination, index), so any misplaced element shows -----

/// Elements rank `s` sends to rank `d`: uneven and zero for some pairs; `scale` makes the blocks
/// large (beyond the smallest staging block) without changing which ones are empty.
std::int64_t a2a_count(int s, int d, std::int64_t scale) { return ((3 * s + 5 * d + 1) % 4) * scale; }
std::int64_t a2a_value(int s, int d, std::int64_t k) { return std::int64_t{1'000'000'000} * s + 1'000'000 * d + k; }

void check_alltoallv_with_displacements(Communicator& c, std::int64_t scale) {
  const int n = c.size(), r = c.rank();
  const auto un = static_cast<std::size_t>(n);
  constexpr std::int64_t kSendGap = 2, kRecvGap = 3, kSendFill = -7, kRecvFill = -1;
  std::vector<std::int64_t> sc(un), sd(un), rc(un), rd(un);
  // Send blocks in reverse peer order with gaps; receive blocks in an order rotated by the rank.
  std::int64_t at = 1;
  for (int p = n - 1; p >= 0; --p) {
    sc[static_cast<std::size_t>(p)] = a2a_count(r, p, scale);
    sd[static_cast<std::size_t>(p)] = at;
    at += sc[static_cast<std::size_t>(p)] + kSendGap;
  }
  std::vector<std::int64_t> send(static_cast<std::size_t>(at), kSendFill);
  for (int p = 0; p < n; ++p)
    for (std::int64_t k = 0; k < sc[static_cast<std::size_t>(p)]; ++k)
      send[static_cast<std::size_t>(sd[static_cast<std::size_t>(p)] + k)] = a2a_value(r, p, k);
  at = 2;
  for (int i = 0; i < n; ++i) {
    const auto q = static_cast<std::size_t>((i + r) % n);
    rc[q] = a2a_count(static_cast<int>(q), r, scale);
    rd[q] = at;
    at += rc[q] + kRecvGap;
  }
  DeviceArray<std::int64_t> d_send(send);
  DeviceArray<std::int64_t> d_recv(std::vector<std::int64_t>(static_cast<std::size_t>(at), kRecvFill));

  AlltoallvArgs args{d_send.get(), sc, d_recv.get(), rc, DataType::kInt64, "dispatch displs", sd, rd};
  auto work = c.alltoallv(args);
  EXPECT_EQ(work->op(), "alltoallv(dispatch displs)");
  work->wait();
  EXPECT_TRUE(work->completed());

  const auto recv = d_recv.to_host();
  std::int64_t filled = 0, wrong = 0;
  for (int s = 0; s < n; ++s) {
    const auto q = static_cast<std::size_t>(s);
    for (std::int64_t k = 0; k < rc[q]; ++k, ++filled) {
      const std::int64_t got = recv[static_cast<std::size_t>(rd[q] + k)];
      if (got != a2a_value(s, r, k) && ++wrong <= 5)
        ADD_FAILURE() << "element " << k << " from rank " << s << ": got " << got << ", expected " << a2a_value(s, r, k);
    }
  }
  EXPECT_EQ(wrong, 0);
  std::int64_t untouched = 0;
  for (std::int64_t v : recv) untouched += v == kRecvFill ? 1 : 0;
  EXPECT_EQ(untouched, at - filled) << "elements outside the received blocks were overwritten";
  // The send buffer is only read.
  EXPECT_EQ(d_send.to_host(), send);
}

TEST_P(GpuComm, AlltoallvUnevenWithDisplacements) {
  check_alltoallv_with_displacements(comm(), 1);
  expect_all_ranks_passed();
}

TEST_P(GpuComm, AlltoallvLargeBlocksWithDisplacements) {
  check_alltoallv_with_displacements(comm(), 7001);  // up to 3 * 7001 int64 per block (168 KB)
  expect_all_ranks_passed();
}

TEST_P(GpuComm, AlltoallvPackedFloat32) {
  auto& c = comm();
  const int n = c.size(), r = c.rank();
  auto value = [](int s, int d, std::int64_t k) { return static_cast<float>(100 * s + 10 * d) + 0.25f * static_cast<float>(k); };
  std::vector<std::int64_t> sc, rc;
  std::vector<float> send;
  std::int64_t recv_total = 0;
  for (int p = 0; p < n; ++p) {
    sc.push_back(a2a_count(r, p, 1));
    rc.push_back(a2a_count(p, r, 1));
    for (std::int64_t k = 0; k < sc.back(); ++k) send.push_back(value(r, p, k));
    recv_total += rc.back();
  }
  DeviceArray<float> d_send(send);
  DeviceArray<float> d_recv(std::vector<float>(static_cast<std::size_t>(recv_total), -7.0f));
  AlltoallvArgs args{d_send.get(), sc, d_recv.get(), rc, DataType::kFloat32, "packed", {}, {}};
  c.alltoallv(args)->wait();
  const auto recv = d_recv.to_host();
  std::size_t at = 0;
  for (int s = 0; s < n; ++s)
    for (std::int64_t k = 0; k < rc[static_cast<std::size_t>(s)]; ++k, ++at)
      EXPECT_EQ(recv[at], value(s, r, k)) << "element " << k << " from rank " << s;
  EXPECT_EQ(at, recv.size());
  expect_all_ranks_passed();
}

TEST_P(GpuComm, Alltoall) {
  auto& c = comm();
  const int n = c.size(), r = c.rank();
  constexpr int kCount = 3;
  std::vector<std::int32_t> send(static_cast<std::size_t>(n * kCount));
  for (int d = 0; d < n; ++d)
    for (int k = 0; k < kCount; ++k) send[static_cast<std::size_t>(d * kCount + k)] = r * 10000 + d * 100 + k;
  DeviceArray<std::int32_t> d_send(send);
  DeviceArray<std::int32_t> d_recv(std::vector<std::int32_t>(send.size(), -1));
  auto work = c.alltoall(d_send.get(), d_recv.get(), kCount, DataType::kInt32, "a2a");
  EXPECT_EQ(work->op(), "alltoall(a2a)");
  work->wait();
  const auto recv = d_recv.to_host();
  for (int s = 0; s < n; ++s)
    for (int k = 0; k < kCount; ++k)
      EXPECT_EQ(recv[static_cast<std::size_t>(s * kCount + k)], s * 10000 + r * 100 + k) << "from " << s << " k " << k;
  expect_all_ranks_passed();
}

TEST_P(GpuComm, AllreduceSumAndMax) {
  auto& c = comm();
  const int n = c.size(), r = c.rank();
  constexpr std::size_t kCount = 5000;  // 20 KB of float32, 40 KB of int64 and float64
  std::vector<float> f(kCount);
  std::vector<std::int64_t> i64(kCount);
  std::vector<double> mx(kCount);
  for (std::size_t i = 0; i < kCount; ++i) {
    f[i] = static_cast<float>((r + 1) * static_cast<int>(i % 7));
    i64[i] = (std::int64_t{1} << 40) * r + static_cast<std::int64_t>(i);
    mx[i] = static_cast<int>(i) % n == r ? 1000.0 + static_cast<double>(i) : -static_cast<double>(r) - 1.0;
  }
  DeviceArray<float> d_f(f);
  DeviceArray<std::int64_t> d_i64(i64);
  DeviceArray<double> d_mx(mx);
  auto a = c.allreduce_sum(d_f.get(), static_cast<std::int64_t>(kCount), DataType::kFloat32, "grads");
  auto b = c.allreduce_sum(d_i64.get(), static_cast<std::int64_t>(kCount), DataType::kInt64, "counts");
  auto m = c.allreduce_max(d_mx.get(), static_cast<std::int64_t>(kCount), DataType::kFloat64, "max");
  EXPECT_EQ(a->op(), "allreduce_sum(grads)");
  EXPECT_EQ(m->op(), "allreduce_max(max)");
  m->wait();  // waited out of issue order on purpose
  a->wait();
  b->wait();
  const auto rf = d_f.to_host();
  const auto ri = d_i64.to_host();
  const auto rm = d_mx.to_host();
  const int rank_sum = n * (n + 1) / 2;
  std::int64_t wrong = 0;
  for (std::size_t i = 0; i < kCount; ++i) {
    const auto ii = static_cast<std::int64_t>(i);
    wrong += rf[i] != static_cast<float>(rank_sum * static_cast<int>(i % 7)) ? 1 : 0;
    wrong += ri[i] != (std::int64_t{1} << 40) * (n * (n - 1) / 2) + n * ii ? 1 : 0;
    wrong += rm[i] != 1000.0 + static_cast<double>(i) ? 1 : 0;
  }
  EXPECT_EQ(wrong, 0) << "first elements: " << rf[1] << " " << ri[1] << " " << rm[1];
  expect_all_ranks_passed();
}

TEST_P(GpuComm, Allgather) {
  auto& c = comm();
  const int n = c.size(), r = c.rank();
  constexpr int kCount = 5;
  std::vector<std::int32_t> send;
  for (int k = 0; k < kCount; ++k) send.push_back(r * 100 + k);
  DeviceArray<std::int32_t> d_send(send);
  DeviceArray<std::int32_t> d_recv(std::vector<std::int32_t>(static_cast<std::size_t>(n * kCount), -1));
  c.allgather(d_send.get(), d_recv.get(), kCount, DataType::kInt32, "loads")->wait();
  const auto recv = d_recv.to_host();
  for (int s = 0; s < n; ++s)
    for (int k = 0; k < kCount; ++k) EXPECT_EQ(recv[static_cast<std::size_t>(s * kCount + k)], s * 100 + k) << s << " " << k;
  expect_all_ranks_passed();
}

TEST_P(GpuComm, BroadcastFromLastRank) {
  auto& c = comm();
  const int r = c.rank(), root = c.size() - 1;
  constexpr std::size_t kCount = 3000;
  std::vector<double> data(kCount, -1.0);
  std::vector<char> text(16, '.');
  if (r == root) {
    for (std::size_t k = 0; k < kCount; ++k) data[k] = 0.5 * static_cast<double>(k) + 1e9;
    const std::string name = "weights from the";
    text.assign(name.begin(), name.end());
  }
  DeviceArray<double> d_data(data);
  DeviceArray<char> d_text(text);
  auto a = c.broadcast(d_data.get(), static_cast<std::int64_t>(kCount), DataType::kFloat64, root, "params");
  auto b = c.broadcast(d_text.get(), static_cast<std::int64_t>(text.size()), DataType::kByte, root, "name");
  EXPECT_EQ(a->op(), "broadcast(params)");
  b->wait();
  a->wait();
  const auto got = d_data.to_host();
  std::int64_t wrong = 0;
  for (std::size_t k = 0; k < kCount; ++k) wrong += got[k] != 0.5 * static_cast<double>(k) + 1e9 ? 1 : 0;
  EXPECT_EQ(wrong, 0);
  const auto name = d_text.to_host();
  EXPECT_EQ(std::string(name.begin(), name.end()), "weights from the");
  expect_all_ranks_passed();
}

TEST_P(GpuComm, GathervToRootWithZeroCounts) {
  auto& c = comm();
  const int n = c.size(), r = c.rank();
  auto count_of = [](int s) { return static_cast<std::int64_t>((s + 1) % 3); };
  auto value = [](int s, std::int64_t k) { return 100.0 * s + 0.5 * static_cast<double>(k); };
  std::vector<double> send;
  for (std::int64_t k = 0; k < count_of(r); ++k) send.push_back(value(r, k));
  std::vector<std::int64_t> recv_counts;
  std::int64_t total = 0;
  if (r == 0) {
    for (int s = 0; s < n; ++s) {
      recv_counts.push_back(count_of(s));
      total += count_of(s);
    }
  }
  DeviceArray<double> d_send(send);
  DeviceArray<double> d_recv(std::vector<double>(static_cast<std::size_t>(total), -1.0));
  auto work = c.gatherv(d_send.get(), count_of(r), d_recv.get(), recv_counts, DataType::kFloat64, 0, "metrics");
  EXPECT_EQ(work->op(), "gatherv(metrics)");
  work->wait();
  if (r == 0) {
    const auto recv = d_recv.to_host();
    std::size_t at = 0;
    for (int s = 0; s < n; ++s)
      for (std::int64_t k = 0; k < count_of(s); ++k, ++at) EXPECT_EQ(recv[at], value(s, k)) << s << " " << k;
    EXPECT_EQ(at, recv.size());
  }
  expect_all_ranks_passed();
}

TEST_P(GpuComm, BarrierAndSequenceNumbers) {
  auto& c = comm();
  auto first = c.barrier("step end");
  EXPECT_EQ(first->op(), "barrier(step end)");
  first->wait();
  EXPECT_TRUE(first->completed());
  auto second = c.barrier("again");
  EXPECT_EQ(second->sequence(), first->sequence() + 1);
  second->wait();
  // A dropped op is completed by its destructor.
  DeviceArray<std::int32_t> one(std::vector<std::int32_t>{1});
  { auto dropped = c.allreduce_sum(one.get(), 1, DataType::kInt32, "dropped"); }
  EXPECT_EQ(one.to_host()[0], c.size());
  expect_all_ranks_passed();
}

TEST_P(GpuComm, InvalidArgumentsThrowBeforeAnyTransfer) {
  auto& c = comm();
  const int n = c.size();
  const std::uint64_t before = c.barrier("before bad args")->sequence();
  auto expect_invalid = [](const auto& call, const std::string& part1, const std::string& part2) {
    try {
      call();
      ADD_FAILURE() << "no InvalidArgument; expected one mentioning '" << part1 << "' and '" << part2 << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_TRUE(contains(e.what(), part1)) << e.what();
      EXPECT_TRUE(contains(e.what(), part2)) << e.what();
    }
  };
  DeviceArray<float> buf(std::vector<float>(static_cast<std::size_t>(4 * n + 4), 0.0f));
  std::vector<std::int64_t> too_many(static_cast<std::size_t>(n + 1), 1), ok(static_cast<std::size_t>(n), 1);
  std::vector<std::int64_t> negative(ok);
  negative.back() = -1;
  AlltoallvArgs wrong_size{buf.get(), too_many, buf.get(), ok, DataType::kFloat32, "bad spans", {}, {}};
  expect_invalid([&] { c.alltoallv(wrong_size); }, "alltoallv(bad spans)", "send_counts has " + std::to_string(n + 1));
  AlltoallvArgs neg{buf.get(), ok, buf.get(), negative, DataType::kFloat32, "bad count", {}, {}};
  expect_invalid([&] { c.alltoallv(neg); }, "alltoallv(bad count)", "recv_counts[" + std::to_string(n - 1) + "] = -1");
  AlltoallvArgs null_send{nullptr, ok, buf.get(), ok, DataType::kFloat32, "null send", {}, {}};
  expect_invalid([&] { c.alltoallv(null_send); }, "alltoallv(null send)", "send is null");
  expect_invalid([&] { c.allreduce_sum(buf.get(), 1, DataType::kByte, "bytes"); }, "allreduce_sum(bytes)", "byte");
  expect_invalid([&] { c.broadcast(buf.get(), 1, DataType::kFloat32, n, "root"); }, "broadcast(root)",
                 "root = " + std::to_string(n));
  // Rejected calls post nothing and take no sequence number, so the ranks stay in step.
  EXPECT_EQ(c.barrier("after bad args")->sequence(), before + 1);
  expect_all_ranks_passed();
}

INSTANTIATE_TEST_SUITE_P(Backends, GpuComm, ::testing::Values(Backend::kStaged, Backend::kNccl), backend_name);

// --- StagedCommunicator only ------------------------------------------------------------------

TEST(GpuStaged, PinnedBlocksAreReusedAcrossOps) {
  if (const std::string& why = gpu_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  auto c = make_staged();
  DeviceArray<float> data(std::vector<float>(100'000, 1.0f));  // 400 KB: beyond the smallest block
  c->allreduce_sum(data.get(), 100'000, DataType::kFloat32, "warm up")->wait();
  const std::size_t allocations = c->staging_allocations(), bytes = c->staging_bytes();
  EXPECT_GE(bytes, 400'000u);
  for (int i = 0; i < 5; ++i) c->allreduce_sum(data.get(), 100'000, DataType::kFloat32, "steady")->wait();
  for (int i = 0; i < 5; ++i) c->allreduce_sum(data.get(), 1000, DataType::kFloat32, "smaller")->wait();
  EXPECT_EQ(c->staging_allocations(), allocations) << "a block that fits was not reused";
  EXPECT_EQ(c->staging_bytes(), bytes);
  const int n = c->size();
  // Each sum multiplies the reduced elements by n: 6 times for all, 5 more for the first 1000.
  const auto got = data.to_host();
  float expected_tail = 1.0f;
  for (int i = 0; i < 6; ++i) expected_tail *= static_cast<float>(n);
  float expected_head = expected_tail;
  for (int i = 0; i < 5; ++i) expected_head *= static_cast<float>(n);
  EXPECT_EQ(got[0], expected_head);
  EXPECT_EQ(got[99'999], expected_tail);
  expect_all_ranks_passed();
}

TEST(GpuStaged, WaitPastDeadlineThrowsTimeoutErrorAndTheOpStaysValid) {
  if (const std::string& why = gpu_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  auto& w = world();
  if (w.size() == 1) GTEST_SKIP() << "needs a peer that does not join the collective; there is only one rank";
  // Its own MPI communicator, so the deliberately unmatched op cannot pair with any other op.
  auto c = make_staged();
  const int r = w.rank(), n = w.size();
  DeviceArray<std::int32_t> data(std::vector<std::int32_t>{r + 1, 10 * (r + 1), 0, -r});
  WorkPtr lonely;
  std::string message;
  double waited_s = 0.0;
  if (r == 0) {
    // The peers post theirs only after the world barrier below, which rank 0 joins only after it
    // timed out, so the op cannot complete before then.
    lonely = c->allreduce_sum(data.get(), 4, DataType::kInt32, "lonely");
    const auto start = Clock::now();
    try {
      lonely->wait(start + std::chrono::milliseconds(200));
      ADD_FAILURE() << "wait() returned although rank 0's peers never joined";
    } catch (const TimeoutError& e) {
      message = e.what();
    }
    waited_s = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_FALSE(lonely->completed());
  }
  w.barrier("staged timeout: rank 0 timed out")->wait();
  if (r == 0) {
    lonely->wait();  // the timed-out op is still valid: once the peers join, it completes
    EXPECT_TRUE(contains(message, "allreduce_sum(lonely) #0 on rank 0 of " + std::to_string(n))) << message;
    EXPECT_TRUE(contains(message, "peers: 1")) << message;
    EXPECT_TRUE(contains(message, "waiting for the peers")) << message;
    EXPECT_TRUE(contains(message, "MOEX_TIMEOUT_S")) << message;
    EXPECT_GE(waited_s, 0.19);
    EXPECT_LT(waited_s, 5.0) << "wait() overshot its 200 ms deadline";
  } else {
    c->allreduce_sum(data.get(), 4, DataType::kInt32, "lonely")->wait();
  }
  const auto got = data.to_host();
  EXPECT_EQ(got[0], n * (n + 1) / 2);
  EXPECT_EQ(got[1], 10 * n * (n + 1) / 2);
  EXPECT_EQ(got[3], -n * (n - 1) / 2);
  expect_all_ranks_passed();
}

// --- NcclCommunicator only --------------------------------------------------------------------

#ifdef MOEX_HAVE_NCCL

TEST(GpuNccl, RanksSharingAGpuAreRefusedWithAHint) {
  if (const std::string& why = gpu_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  const std::string problem = NcclCommunicator::gpu_sharing_problem(world());
  if (problem.empty()) GTEST_SKIP() << "every rank has its own GPU here; nothing to refuse";
  EXPECT_TRUE(contains(problem, "NCCL needs one GPU per rank")) << problem;
  std::string message;
  try {
    NcclCommunicator comm(world().native());
    ADD_FAILURE() << "NcclCommunicator accepted ranks that share a GPU";
  } catch (const ConfigError& e) {
    message = e.what();
  }
  EXPECT_TRUE(contains(message, "share GPU")) << message;
  EXPECT_TRUE(contains(message, "StagedCommunicator")) << message;
  expect_all_ranks_passed();
}

TEST(GpuNccl, ComputeStreamWaitsOnTheOpWithoutBlockingTheHost) {
  if (const std::string& why = gpu_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  std::unique_ptr<NcclCommunicator> c;
  if (const std::string why = make_nccl(c); !why.empty()) GTEST_SKIP() << why;
  const int n = c->size(), r = c->rank();
  constexpr std::size_t kCount = 1 << 16;
  DeviceArray<float> data(std::vector<float>(kCount, static_cast<float>(r + 1)));
  cudaStream_t compute = nullptr;
  cuda_ok(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  std::vector<float> host(kCount, -1.0f);
  {
    auto work = c->allreduce_sum(data.get(), static_cast<std::int64_t>(kCount), DataType::kFloat32, "on stream");
    auto* nccl_work = dynamic_cast<NcclWork*>(work.get());
    ASSERT_NE(nccl_work, nullptr);
    nccl_work->wait_on_stream(compute);
    EXPECT_NE(nccl_work->event(), nullptr);
    // Ordered after the reduction on the device, not by a host wait.
    cuda_ok(cudaMemcpyAsync(host.data(), data.get(), kCount * sizeof(float), cudaMemcpyDeviceToHost, compute),
            "cudaMemcpyAsync");
    cuda_ok(cudaStreamSynchronize(compute), "cudaStreamSynchronize");
    EXPECT_TRUE(work->completed());
    work->wait();
  }
  cudaStreamDestroy(compute);
  const float expected = static_cast<float>(n * (n + 1) / 2);
  std::int64_t wrong = 0;
  for (float v : host) wrong += v != expected ? 1 : 0;
  EXPECT_EQ(wrong, 0) << "host[0] = " << host[0] << ", expected " << expected;
  EXPECT_FALSE(c->aborted());
  EXPECT_EQ(c->node_ids(), world().node_ids());
  expect_all_ranks_passed();
}

TEST(GpuNccl, TimeoutAbortsTheCommunicatorAndLaterOpsThrow) {
  if (const std::string& why = gpu_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  auto& w = world();
  if (w.size() == 1) GTEST_SKIP() << "needs a peer that does not join the collective; there is only one rank";
  std::unique_ptr<NcclCommunicator> c;
  if (const std::string why = make_nccl(c); !why.empty()) GTEST_SKIP() << why;
  const int r = c->rank();
  DeviceArray<float> data(std::vector<float>(1024, 1.0f));
  if (r == 0) {
    auto lonely = c->allreduce_sum(data.get(), 1024, DataType::kFloat32, "lonely");
    std::string message;
    const auto start = Clock::now();
    try {
      lonely->wait(start + std::chrono::milliseconds(300));
      ADD_FAILURE() << "wait() returned although the peers never joined";
    } catch (const TimeoutError& e) {
      message = e.what();
    }
    const double waited_s = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_LT(waited_s, 15.0) << "the timeout (and the abort) took far longer than the 300 ms deadline";
    EXPECT_TRUE(contains(message, "allreduce_sum(lonely) #0 on rank 0 of " + std::to_string(w.size()))) << message;
    EXPECT_TRUE(contains(message, "peers: 1")) << message;
    EXPECT_TRUE(contains(message, "aborted")) << message;
    EXPECT_TRUE(c->aborted());
    try {
      c->barrier("after the abort");
      ADD_FAILURE() << "an op on an aborted communicator was accepted";
    } catch (const NcclError& e) {
      EXPECT_TRUE(contains(e.what(), "communicator was aborted after a timeout")) << e.what();
    }
    EXPECT_THROW(lonely->wait(), NcclError);
  }
  w.barrier("nccl timeout: rank 0 timed out")->wait();
  if (r != 0) {
    // The peers never posted the op; they tear their side down without waiting on rank 0.
    c->abort("rank 0 timed out on purpose in this test");
    EXPECT_THROW(c->barrier("after the abort"), NcclError);
  }
  expect_all_ranks_passed();
}

#endif  // MOEX_HAVE_NCCL

}  // namespace
}  // namespace moex::comm
