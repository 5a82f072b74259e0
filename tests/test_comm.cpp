// Multi-rank tests of MpiCommunicator (every collective, timeouts, argument checks) and of the
// backend-independent helpers in comm/communicator.h. Every rank runs every test.
#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "comm/mpi/mpi_check.h"
#include "comm/mpi/mpi_communicator.h"
#include "tests/mpi_test_env.h"

namespace moex::comm {
namespace {

using moex::testing::all_ranks;
using moex::testing::world;

/// Makes a failure on any rank visible as a failure on every rank (rank 0 prints the report).
/// A collective: call it once at the end of a test on every rank, after no early return.
void expect_all_ranks_passed() {
  EXPECT_TRUE(all_ranks(!::testing::Test::HasFailure())) << "the test failed on at least one rank";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

TEST(CommElementSize, MatchesTheCTypes) {
  EXPECT_EQ(element_size(DataType::kFloat32), sizeof(float));
  EXPECT_EQ(element_size(DataType::kFloat64), sizeof(double));
  EXPECT_EQ(element_size(DataType::kInt32), sizeof(std::int32_t));
  EXPECT_EQ(element_size(DataType::kInt64), sizeof(std::int64_t));
  EXPECT_EQ(element_size(DataType::kByte), 1u);
}

/// Sets MOEX_TIMEOUT_S for one scope and restores the previous value (the test env sets it).
class ScopedTimeoutEnv {
 public:
  explicit ScopedTimeoutEnv(const char* value) {
    if (const char* old = std::getenv("MOEX_TIMEOUT_S")) old_ = old;
    if (value) {
      setenv("MOEX_TIMEOUT_S", value, 1);
    } else {
      unsetenv("MOEX_TIMEOUT_S");
    }
  }
  ~ScopedTimeoutEnv() {
    if (old_) {
      setenv("MOEX_TIMEOUT_S", old_->c_str(), 1);
    } else {
      unsetenv("MOEX_TIMEOUT_S");
    }
  }
  ScopedTimeoutEnv(const ScopedTimeoutEnv&) = delete;
  ScopedTimeoutEnv& operator=(const ScopedTimeoutEnv&) = delete;

 private:
  std::optional<std::string> old_;
};

TEST(CommTimeoutFromEnv, ParsesPositiveSeconds) {
  using std::chrono::milliseconds;
  {
    ScopedTimeoutEnv env(nullptr);
    EXPECT_EQ(timeout_from_env(milliseconds(1234)), milliseconds(1234));
  }
  {
    ScopedTimeoutEnv env("60");
    EXPECT_EQ(timeout_from_env(milliseconds(1)), milliseconds(60'000));
  }
  {
    ScopedTimeoutEnv env("2.5");
    EXPECT_EQ(timeout_from_env(milliseconds(1)), milliseconds(2'500));
  }
  {
    ScopedTimeoutEnv env("0.0001");  // rounds up: never a zero timeout
    EXPECT_EQ(timeout_from_env(milliseconds(1)), milliseconds(1));
  }
}

TEST(CommTimeoutFromEnv, RejectsMalformedOrNonPositiveValues) {
  for (const char* bad : {"abc", "", "0", "-3", "5s", "1.5.2", "inf", "nan", "1e400", " "}) {
    ScopedTimeoutEnv env(bad);
    try {
      timeout_from_env(std::chrono::milliseconds(1));
      ADD_FAILURE() << "MOEX_TIMEOUT_S='" << bad << "' was accepted";
    } catch (const ConfigError& e) {
      EXPECT_TRUE(contains(e.what(), std::string("MOEX_TIMEOUT_S='") + bad +
                                         "': expected a positive number of seconds"))
          << e.what();
    }
  }
}

TEST(CommMpiCheck, ThrowsMpiErrorWithCallSiteRankAndMpiText) {
  auto& w = world();
  int ignored = 0;
  std::string message;
  try {
    MOEX_MPI_CHECK(MPI_Comm_rank(MPI_COMM_NULL, &ignored));
  } catch (const MpiError& e) {
    message = e.what();
  }
  EXPECT_TRUE(contains(message, "test_comm.cpp:")) << message;
  EXPECT_TRUE(contains(message, "MPI_Comm_rank(MPI_COMM_NULL, &ignored)")) << message;
  EXPECT_TRUE(contains(message, "rank " + std::to_string(w.rank()))) << message;
  EXPECT_TRUE(contains(message, detail::mpi_error_text(MPI_ERR_COMM))) << message;
  expect_all_ranks_passed();
}

TEST(CommCollectives, Alltoall) {
  auto& w = world();
  const int r = w.rank();
  const int n = w.size();
  constexpr int kCount = 3;
  // Element k of the block from s to d is s * 1000 + d * 10 + k.
  std::vector<std::int32_t> send(static_cast<std::size_t>(n * kCount));
  for (int d = 0; d < n; ++d)
    for (int k = 0; k < kCount; ++k) send[static_cast<std::size_t>(d * kCount + k)] = r * 1000 + d * 10 + k;
  std::vector<std::int32_t> recv(send.size(), -1);
  auto work = w.alltoall(send.data(), recv.data(), kCount, DataType::kInt32, "a2a test");
  EXPECT_EQ(work->op(), "alltoall(a2a test)");
  work->wait();
  for (int s = 0; s < n; ++s)
    for (int k = 0; k < kCount; ++k)
      EXPECT_EQ(recv[static_cast<std::size_t>(s * kCount + k)], s * 1000 + r * 10 + k) << "from " << s << " k " << k;
  expect_all_ranks_passed();
}

/// Elements rank `s` sends to rank `d`: uneven, zero for some pairs, and the last rank (of two or
/// more) sends nothing at all.
std::int64_t v_count(int s, int d, int n) {
  if (n > 1 && s == n - 1) return 0;
  return (s + 2 * d + 1) % 3;
}

/// Runs one alltoallv with v_count() blocks whose elements are value(s, d, k), checking every
/// received element.
template <typename T, typename Value>
void check_alltoallv(DataType type, Value value) {
  auto& w = world();
  const int r = w.rank();
  const int n = w.size();
  std::vector<std::int64_t> send_counts(static_cast<std::size_t>(n)), recv_counts(static_cast<std::size_t>(n));
  std::vector<T> send;
  std::size_t recv_total = 0;
  for (int p = 0; p < n; ++p) {
    send_counts[static_cast<std::size_t>(p)] = v_count(r, p, n);
    recv_counts[static_cast<std::size_t>(p)] = v_count(p, r, n);
    for (std::int64_t k = 0; k < v_count(r, p, n); ++k) send.push_back(value(r, p, k));
    recv_total += static_cast<std::size_t>(v_count(p, r, n));
  }
  std::vector<T> recv(recv_total, T(-7));
  AlltoallvArgs args;
  // A rank with nothing to send or receive passes null buffers: allowed with all-zero counts.
  args.send = send.empty() ? nullptr : send.data();
  args.send_counts = send_counts;
  args.recv = recv.empty() ? nullptr : recv.data();
  args.recv_counts = recv_counts;
  args.type = type;
  args.label = "dispatch layer 0";
  auto work = w.alltoallv(args);
  EXPECT_EQ(work->op(), "alltoallv(dispatch layer 0)");
  work->wait();
  std::size_t at = 0;
  for (int s = 0; s < n; ++s) {
    for (std::int64_t k = 0; k < v_count(s, r, n); ++k, ++at) {
      EXPECT_EQ(recv[at], value(s, r, k)) << "element " << k << " from rank " << s;
    }
  }
  EXPECT_EQ(at, recv.size());
}

TEST(CommCollectives, AlltoallvUnevenFloat32) {
  check_alltoallv<float>(DataType::kFloat32, [](int s, int d, std::int64_t k) {
    return static_cast<float>(s * 100 + d * 10) + 0.25f * static_cast<float>(k);
  });
  expect_all_ranks_passed();
}

TEST(CommCollectives, AlltoallvUnevenInt64) {
  check_alltoallv<std::int64_t>(DataType::kInt64, [](int s, int d, std::int64_t k) {
    // Above 2^32 so that a 32-bit transfer would be caught.
    return (std::int64_t{1} << 40) * (s + 1) + std::int64_t{1000} * d + k;
  });
  expect_all_ranks_passed();
}

TEST(CommCollectives, AllreduceSum) {
  auto& w = world();
  const int r = w.rank();
  const std::int64_t n = w.size();
  const std::int64_t ranks_sum = n * (n + 1) / 2;  // sum of (r + 1) over all ranks
  constexpr int kCount = 5;

  std::vector<float> f(kCount);
  std::vector<double> d(kCount);
  std::vector<std::int64_t> l(kCount);
  std::vector<std::int32_t> i(kCount);
  for (int k = 0; k < kCount; ++k) {
    f[static_cast<std::size_t>(k)] = 0.5f * static_cast<float>(r + 1) + static_cast<float>(k);
    d[static_cast<std::size_t>(k)] = 0.125 * (r + 1) + k;
    l[static_cast<std::size_t>(k)] = (std::int64_t{1} << 40) * (r + 1) + k;
    i[static_cast<std::size_t>(k)] = -(r + 1) * 3 + k;
  }
  // Several ops in flight at once; all sums below are exact in their types.
  auto wf = w.allreduce_sum(f.data(), kCount, DataType::kFloat32, "grads f32");
  auto wd = w.allreduce_sum(d.data(), kCount, DataType::kFloat64, "grads f64");
  auto wl = w.allreduce_sum(l.data(), kCount, DataType::kInt64, "tokens");
  auto wi = w.allreduce_sum(i.data(), kCount, DataType::kInt32, "counts");
  EXPECT_EQ(wf->op(), "allreduce_sum(grads f32)");
  wi->wait();
  wl->wait();
  wd->wait();
  wf->wait();
  for (int k = 0; k < kCount; ++k) {
    const auto idx = static_cast<std::size_t>(k);
    EXPECT_EQ(f[idx], 0.5f * static_cast<float>(ranks_sum) + static_cast<float>(n * k)) << k;
    EXPECT_EQ(d[idx], 0.125 * static_cast<double>(ranks_sum) + static_cast<double>(n * k)) << k;
    EXPECT_EQ(l[idx], (std::int64_t{1} << 40) * ranks_sum + n * k) << k;
    EXPECT_EQ(i[idx], static_cast<std::int32_t>(-3 * ranks_sum + n * k)) << k;
  }
  expect_all_ranks_passed();
}

TEST(CommCollectives, AllreduceMax) {
  auto& w = world();
  const int r = w.rank();
  const int n = w.size();
  constexpr int kCount = 4;
  std::vector<std::int32_t> i(kCount);
  std::vector<float> f(kCount);
  std::vector<std::int64_t> l(kCount);
  for (int k = 0; k < kCount; ++k) {
    i[static_cast<std::size_t>(k)] = (r * 7 + k * 3) % 5;
    f[static_cast<std::size_t>(k)] = -static_cast<float>(r + 1) - static_cast<float>(k);
    l[static_cast<std::size_t>(k)] = (r == n - 1 && k == 2) ? (std::int64_t{1} << 50) : r;
  }
  w.allreduce_max(i.data(), kCount, DataType::kInt32, "max i32")->wait();
  auto work = w.allreduce_max(f.data(), kCount, DataType::kFloat32, "max f32");
  EXPECT_EQ(work->op(), "allreduce_max(max f32)");
  work->wait();
  w.allreduce_max(l.data(), kCount, DataType::kInt64, "max i64")->wait();
  for (int k = 0; k < kCount; ++k) {
    std::int32_t expected = INT32_MIN;
    for (int s = 0; s < n; ++s) expected = std::max(expected, (s * 7 + k * 3) % 5);
    const auto idx = static_cast<std::size_t>(k);
    EXPECT_EQ(i[idx], expected) << k;
    EXPECT_EQ(f[idx], -1.0f - static_cast<float>(k)) << k;
    EXPECT_EQ(l[idx], k == 2 ? (std::int64_t{1} << 50) : n - 1) << k;
  }
  expect_all_ranks_passed();
}

TEST(CommCollectives, Allgather) {
  auto& w = world();
  const int r = w.rank();
  const int n = w.size();
  const std::int32_t send[2] = {r * 10, r * 10 + 1};
  std::vector<std::int32_t> recv(static_cast<std::size_t>(2 * n), -1);
  auto work = w.allgather(send, recv.data(), 2, DataType::kInt32, "experts per rank");
  EXPECT_EQ(work->op(), "allgather(experts per rank)");
  work->wait();
  for (int s = 0; s < n; ++s) {
    EXPECT_EQ(recv[static_cast<std::size_t>(2 * s)], s * 10) << s;
    EXPECT_EQ(recv[static_cast<std::size_t>(2 * s + 1)], s * 10 + 1) << s;
  }
  expect_all_ranks_passed();
}

TEST(CommCollectives, GathervToRootWithZeroCounts) {
  auto& w = world();
  const int r = w.rank();
  const int n = w.size();
  // Rank 2 (with three or more ranks) sends nothing.
  auto count_of = [](int s) { return static_cast<std::int64_t>((s + 1) % 3); };
  auto value = [](int s, std::int64_t k) { return 100.0 * s + 0.5 * static_cast<double>(k); };
  std::vector<double> send;
  for (std::int64_t k = 0; k < count_of(r); ++k) send.push_back(value(r, k));
  std::vector<std::int64_t> recv_counts;
  std::vector<double> recv;
  if (r == 0) {
    std::int64_t total = 0;
    for (int s = 0; s < n; ++s) {
      recv_counts.push_back(count_of(s));
      total += count_of(s);
    }
    recv.assign(static_cast<std::size_t>(total), -1.0);
  }
  auto work = w.gatherv(send.empty() ? nullptr : send.data(), count_of(r), r == 0 ? recv.data() : nullptr,
                        recv_counts, DataType::kFloat64, 0, "metrics");
  EXPECT_EQ(work->op(), "gatherv(metrics)");
  work->wait();
  if (r == 0) {
    std::size_t at = 0;
    for (int s = 0; s < n; ++s)
      for (std::int64_t k = 0; k < count_of(s); ++k, ++at) EXPECT_EQ(recv[at], value(s, k)) << s << " " << k;
    EXPECT_EQ(at, recv.size());
  }
  expect_all_ranks_passed();
}

TEST(CommCollectives, BroadcastFromLastRank) {
  auto& w = world();
  const int r = w.rank();
  const int root = w.size() - 1;
  std::vector<std::int64_t> data(6, -1);
  std::string text = "................";
  if (r == root) {
    for (std::size_t k = 0; k < data.size(); ++k) data[k] = (std::int64_t{1} << 36) + static_cast<std::int64_t>(k);
    text = "weights from the";
  }
  auto a = w.broadcast(data.data(), static_cast<std::int64_t>(data.size()), DataType::kInt64, root, "params");
  auto b = w.broadcast(text.data(), static_cast<std::int64_t>(text.size()), DataType::kByte, root, "name");
  EXPECT_EQ(a->op(), "broadcast(params)");
  b->wait();
  a->wait();
  for (std::size_t k = 0; k < data.size(); ++k) EXPECT_EQ(data[k], (std::int64_t{1} << 36) + static_cast<std::int64_t>(k));
  EXPECT_EQ(text, "weights from the");
  expect_all_ranks_passed();
}

TEST(CommCollectives, Barrier) {
  auto& w = world();
  auto work = w.barrier("step end");
  EXPECT_EQ(work->op(), "barrier(step end)");
  work->wait();
  EXPECT_TRUE(work->completed());
  expect_all_ranks_passed();
}

TEST(CommWork, SequenceNumbersCountOpsPerCommunicator) {
  MpiCommunicator comm(world().native());
  EXPECT_EQ(comm.rank(), world().rank());
  EXPECT_EQ(comm.size(), world().size());
  std::int32_t x = 1;
  auto w0 = comm.barrier("first");
  auto w1 = comm.allreduce_sum(&x, 1, DataType::kInt32, "second");
  auto w2 = comm.barrier("third");
  EXPECT_EQ(w0->sequence(), 0u);
  EXPECT_EQ(w1->sequence(), 1u);
  EXPECT_EQ(w2->sequence(), 2u);
  w2->wait();
  w1->wait();
  w0->wait();
  EXPECT_EQ(x, comm.size());
  // The world communicator counts independently and keeps counting up.
  auto a = world().barrier("a");
  auto b = world().barrier("b");
  EXPECT_EQ(b->sequence(), a->sequence() + 1);
  b->wait();
  a->wait();
  expect_all_ranks_passed();
}

TEST(CommWork, CompletedEventuallyTrue) {
  auto& w = world();
  std::int64_t value = w.rank();
  auto work = w.allreduce_sum(&value, 1, DataType::kInt64, "poll");
  const auto give_up = Clock::now() + std::chrono::seconds(20);
  while (!work->completed() && Clock::now() < give_up) std::this_thread::sleep_for(std::chrono::microseconds(50));
  EXPECT_TRUE(work->completed());
  // Completed once: it stays completed, and wait() returns even with a deadline in the past.
  EXPECT_TRUE(work->completed());
  EXPECT_NO_THROW(work->wait(Clock::now() - std::chrono::seconds(1)));
  const std::int64_t n = w.size();
  EXPECT_EQ(value, n * (n - 1) / 2);
  expect_all_ranks_passed();
}

TEST(CommWork, DestroyingUnfinishedWorkWaitsForIt) {
  auto& w = world();
  std::int32_t value = 1;
  {
    // Never waited on explicitly: the destructor must complete it before `value` is read.
    auto work = w.allreduce_sum(&value, 1, DataType::kInt32, "dropped");
  }
  EXPECT_EQ(value, w.size());
  expect_all_ranks_passed();
}

TEST(CommWork, WaitPastDeadlineThrowsTimeoutError) {
  auto& w = world();
  if (w.size() == 1) GTEST_SKIP() << "needs a peer that does not join the collective; there is only one rank";
  // A separate communicator, so the deliberately unmatched barrier cannot pair with any other op.
  MpiCommunicator side(w.native());
  side.set_default_timeout(w.default_timeout());
  WorkPtr lonely;
  std::string first_message, second_message;
  double second_wait_s = 0.0;
  if (w.rank() == 0) {
    // The peers post their barrier only after the world barrier below, which rank 0 joins only
    // after both waits timed out, so this barrier cannot complete before then.
    lonely = side.barrier("lonely barrier");
    try {
      lonely->wait(Clock::now() - std::chrono::milliseconds(1));
    } catch (const TimeoutError& e) {
      first_message = e.what();
    }
    const auto start = Clock::now();
    try {
      lonely->wait(start + std::chrono::milliseconds(30));
    } catch (const TimeoutError& e) {
      second_message = e.what();
    }
    second_wait_s = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_FALSE(lonely->completed());
  }
  w.barrier("timeout test: rank 0 timed out")->wait();
  if (w.rank() == 0) {
    // The timed-out op is still valid: once the peers join it, it completes.
    lonely->wait();
    EXPECT_TRUE(lonely->completed());
    EXPECT_TRUE(contains(first_message, "barrier(lonely barrier) #0 on rank 0 of " + std::to_string(w.size()) +
                                            " did not complete within"))
        << first_message;
    EXPECT_TRUE(contains(first_message, "[rank 0]")) << first_message;
    EXPECT_TRUE(contains(first_message, "MOEX_TIMEOUT_S")) << first_message;
    // The peers are asked where they are: none has posted the side barrier; each waits in the world
    // communicator's barrier, which the message names, for every peer.
    EXPECT_TRUE(contains(first_message, "not arrived at #0: rank 1 (has posted no op yet; it waits in "
                                        "barrier(timeout test: rank 0 timed out)"))
        << first_message;
    EXPECT_TRUE(contains(first_message, "of another communicator")) << first_message;
    EXPECT_TRUE(contains(first_message, "rank " + std::to_string(w.size() - 1) + " (")) << first_message;
    EXPECT_FALSE(contains(first_message, "no answer")) << first_message;
    EXPECT_TRUE(contains(second_message, "lonely barrier")) << "the second wait did not time out: " << second_message;
    EXPECT_LT(second_wait_s, 2.0) << "wait() overshot its 30 ms deadline";
  } else {
    side.barrier("lonely barrier")->wait();
  }
  expect_all_ranks_passed();
}

// A peer that computes (no MPI call) while the others wait: the timed-out rank's message names it as
// the one that does not answer, and the ranks that posted the op as arrived.
TEST(CommWork, TimeoutNamesThePeerThatHasNotArrived) {
  auto& w = world();
  if (w.size() == 1) GTEST_SKIP() << "needs a peer; there is only one rank";
  MpiCommunicator side(w.native(), std::chrono::milliseconds(10'000));  // status answers within 1 s
  std::string message;
  if (w.rank() == 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2'500));  // "computing": no MPI call at all
    side.barrier("late barrier")->wait();
  } else {
    WorkPtr b = side.barrier("late barrier");
    if (w.rank() == 0) {
      try {
        b->wait(Clock::now() + std::chrono::milliseconds(50));
      } catch (const TimeoutError& e) {
        message = e.what();
      }
    }
    b->wait();
  }
  if (w.rank() == 0) {
    EXPECT_TRUE(contains(message, "barrier(late barrier) #0 on rank 0")) << message;
    EXPECT_TRUE(contains(message, "no answer within 1.0 s from rank(s) 1 (dead, or busy outside MPI)")) << message;
    if (w.size() >= 3) EXPECT_TRUE(contains(message, "arrived: rank(s) 2")) << message;
    EXPECT_FALSE(contains(message, "not arrived")) << message;
  }
  expect_all_ranks_passed();
}

TEST(CommArguments, InvalidArgumentsThrowOnEveryRankBeforeAnyMpiCall) {
  auto& w = world();
  const int n = w.size();
  const std::uint64_t before = w.barrier("before bad args")->sequence();

  auto expect_invalid = [](const auto& call, const std::string& part1, const std::string& part2) {
    try {
      call();
      ADD_FAILURE() << "no InvalidArgument; expected one mentioning '" << part1 << "' and '" << part2 << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_TRUE(contains(e.what(), part1)) << e.what();
      EXPECT_TRUE(contains(e.what(), part2)) << e.what();
    }
  };

  std::vector<float> buf(static_cast<std::size_t>(4 * n + 4), 0.0f);
  std::vector<std::int64_t> too_many(static_cast<std::size_t>(n + 1), 1);
  std::vector<std::int64_t> ok_counts(static_cast<std::size_t>(n), 1);
  std::vector<std::int64_t> negative(static_cast<std::size_t>(n), 1);
  negative.back() = -1;

  AlltoallvArgs wrong_size{buf.data(), too_many, buf.data(), ok_counts, DataType::kFloat32, "bad spans", {}, {}};
  expect_invalid([&] { w.alltoallv(wrong_size); }, "alltoallv(bad spans)", "send_counts has " + std::to_string(n + 1));
  AlltoallvArgs neg{buf.data(), ok_counts, buf.data(), negative, DataType::kFloat32, "bad count", {}, {}};
  expect_invalid([&] { w.alltoallv(neg); }, "alltoallv(bad count)", "recv_counts[" + std::to_string(n - 1) + "] = -1");
  AlltoallvArgs null_send{nullptr, ok_counts, buf.data(), ok_counts, DataType::kFloat32, "null send", {}, {}};
  expect_invalid([&] { w.alltoallv(null_send); }, "alltoallv(null send)", "send is null");
  expect_invalid([&] { w.alltoall(buf.data(), buf.data(), -2, DataType::kFloat32, "neg"); }, "alltoall(neg)",
                 "count = -2 must be >= 0");
  expect_invalid([&] { w.allreduce_sum(buf.data(), std::int64_t{INT_MAX} + 1, DataType::kFloat32, "huge"); },
                 "allreduce_sum(huge)", "exceeds INT_MAX");
  expect_invalid([&] { w.allreduce_sum(buf.data(), 1, DataType::kByte, "bytes"); }, "allreduce_sum(bytes)", "byte");
  expect_invalid([&] { w.allgather(nullptr, buf.data(), 1, DataType::kFloat32, "null"); }, "allgather(null)",
                 "null");
  expect_invalid([&] { w.gatherv(buf.data(), -1, buf.data(), ok_counts, DataType::kFloat32, 0, "neg"); },
                 "gatherv(neg)", "send_count = -1");
  expect_invalid([&] { w.broadcast(buf.data(), 1, DataType::kFloat32, n, "root"); }, "broadcast(root)",
                 "root = " + std::to_string(n));

  // Rejected calls post nothing and take no sequence number, so the ranks stay in step.
  EXPECT_EQ(w.barrier("after bad args")->sequence(), before + 1);
  expect_all_ranks_passed();
}

TEST(CommAlltoallv, DisplacementsPlaceBlocksAnywhere) {
  // Rank r sends r+1+p values to peer p, from a block at offset 3*p in reverse peer order, and
  // receives peer q's block at offset 2*(n-1-q)*(n+q+1) style gaps; untouched gaps stay -1.
  auto& w = world();
  const int n = w.size(), r = w.rank();
  std::vector<std::int64_t> sc(static_cast<std::size_t>(n)), sd(static_cast<std::size_t>(n)),
      rc(static_cast<std::size_t>(n)), rd(static_cast<std::size_t>(n));
  std::int64_t at = 0;
  for (int p = n - 1; p >= 0; --p) {  // blocks in reverse rank order, with a gap of 2 between them
    sc[static_cast<std::size_t>(p)] = r + 1 + p;
    sd[static_cast<std::size_t>(p)] = at;
    at += sc[static_cast<std::size_t>(p)] + 2;
  }
  std::vector<float> send(static_cast<std::size_t>(at), -7.0f);
  for (int p = 0; p < n; ++p)
    for (std::int64_t i = 0; i < sc[static_cast<std::size_t>(p)]; ++i)
      send[static_cast<std::size_t>(sd[static_cast<std::size_t>(p)] + i)] = static_cast<float>(1000 * r + 10 * p + i);
  at = 1;
  for (int q = 0; q < n; ++q) {
    rc[static_cast<std::size_t>(q)] = q + 1 + r;
    rd[static_cast<std::size_t>(q)] = at;
    at += rc[static_cast<std::size_t>(q)] + 3;
  }
  std::vector<float> recv(static_cast<std::size_t>(at), -1.0f);
  AlltoallvArgs args{send.data(), sc, recv.data(), rc, DataType::kFloat32, "displs", sd, rd};
  w.alltoallv(args)->wait();
  std::int64_t filled = 0;
  for (int q = 0; q < n; ++q)
    for (std::int64_t i = 0; i < rc[static_cast<std::size_t>(q)]; ++i, ++filled)
      EXPECT_EQ(recv[static_cast<std::size_t>(rd[static_cast<std::size_t>(q)] + i)], static_cast<float>(1000 * q + 10 * r + i));
  std::int64_t untouched = 0;
  for (float v : recv) untouched += v == -1.0f ? 1 : 0;
  EXPECT_EQ(untouched, at - filled);
  std::vector<std::int64_t> negative(rd);
  negative[0] = -1;
  AlltoallvArgs bad{send.data(), sc, recv.data(), rc, DataType::kFloat32, "neg displ", sd, negative};
  EXPECT_THROW(w.alltoallv(bad), InvalidArgument);
  expect_all_ranks_passed();
}

TEST(CommTopology, NodeIdsAreConsistentAndHonourTheOverride) {
  auto& w = world();
  const auto ids = w.node_ids();
  ASSERT_EQ(static_cast<int>(ids.size()), w.size());
  EXPECT_EQ(ids[0], 0);  // a node's id is its lowest rank
  for (int r = 0; r < w.size(); ++r) EXPECT_LE(ids[static_cast<std::size_t>(r)], r);
  std::vector<int> all(static_cast<std::size_t>(w.size() * w.size()));
  w.allgather(ids.data(), all.data(), w.size(), DataType::kInt32, "ids")->wait();
  for (int r = 0; r < w.size(); ++r)
    for (int i = 0; i < w.size(); ++i) EXPECT_EQ(all[static_cast<std::size_t>(r * w.size() + i)], ids[static_cast<std::size_t>(i)]);
  setenv("MOEX_RANKS_PER_NODE", "2", 1);
  const auto two = w.node_ids();
  for (int r = 0; r < w.size(); ++r) EXPECT_EQ(two[static_cast<std::size_t>(r)], r / 2);
  setenv("MOEX_RANKS_PER_NODE", "zero", 1);
  EXPECT_THROW(w.node_ids(), ConfigError);
  unsetenv("MOEX_RANKS_PER_NODE");
  expect_all_ranks_passed();
}

// The communicator's own setup collectives have deadlines too: a rank that never joins the
// duplication (MPI_Comm_idup) or node detection (MPI_Comm_split_type) becomes a TimeoutError naming
// it on the ranks that wait, instead of a hang.
TEST(CommTimeouts, DuplicationWithAnAbsentRankTimesOut) {
  auto& w = world();
  if (w.size() == 1) GTEST_SKIP() << "needs a peer that does not join the duplication; there is only one rank";
  MpiCommunicator side(w.native());
  std::string message;
  if (w.rank() == 0) {
    const auto start = Clock::now();
    try {
      MpiCommunicator lonely(side.native(), std::chrono::milliseconds(300));
      ADD_FAILURE() << "the duplication completed without the other ranks";
    } catch (const TimeoutError& e) {
      message = e.what();
    }
    const double s = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_TRUE(contains(message, "MPI_Comm_idup")) << message;
    EXPECT_LT(s, 5.0) << "the 300 ms deadline was overshot";
  }
  w.barrier("duplication test: rank 0 timed out")->wait();
  if (w.rank() != 0) MpiCommunicator late(side.native());  // completes rank 0's abandoned duplication too
  expect_all_ranks_passed();
}

TEST(CommTimeouts, NodeDetectionWithAnAbsentRankTimesOut) {
  auto& w = world();
  if (w.size() == 1) GTEST_SKIP() << "needs a peer that does not join node detection; there is only one rank";
  const char* env = std::getenv("MOEX_RANKS_PER_NODE");
  const std::string saved = env ? env : "";
  unsetenv("MOEX_RANKS_PER_NODE");
  MpiCommunicator side(w.native());
  side.set_default_timeout(std::chrono::milliseconds(300));
  if (w.rank() == 0) {
    std::string message;
    try {
      side.node_ids();
      ADD_FAILURE() << "node detection completed without the other ranks";
    } catch (const TimeoutError& e) {
      message = e.what();
    }
    EXPECT_TRUE(contains(message, "node detection")) << message;
  }
  w.barrier("node detection test: rank 0 timed out")->wait();
  if (w.rank() != 0) {
    side.set_default_timeout(w.default_timeout());
    side.barrier("matches rank 0's abandoned arrival barrier")->wait();
  }
  if (env) setenv("MOEX_RANKS_PER_NODE", saved.c_str(), 1);
  expect_all_ranks_passed();
}

TEST(CommArguments, NullBuffersWithZeroCountsAreAccepted) {
  auto& w = world();
  const std::vector<std::int64_t> zeros(static_cast<std::size_t>(w.size()), 0);
  w.alltoall(nullptr, nullptr, 0, DataType::kFloat32, "empty")->wait();
  w.alltoallv({nullptr, zeros, nullptr, zeros, DataType::kInt64, "empty", {}, {}})->wait();
  w.allreduce_sum(nullptr, 0, DataType::kFloat64, "empty")->wait();
  w.allgather(nullptr, nullptr, 0, DataType::kInt32, "empty")->wait();
  w.gatherv(nullptr, 0, nullptr, zeros, DataType::kFloat32, 0, "empty")->wait();
  w.broadcast(nullptr, 0, DataType::kByte, 0, "empty")->wait();
  expect_all_ranks_passed();
}

}  // namespace
}  // namespace moex::comm
