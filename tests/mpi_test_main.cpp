// GoogleTest main for multi-rank tests: rank 0 prints the usual report, other ranks print only their
// failures, and the exit code is non-zero on every rank if any rank failed (77 when none failed and
// tests skipped for want of a CUDA device: tests/device_skips.h).
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>

#include "tests/device_skips.h"
#include "tests/mpi_test_env.h"

namespace moex::testing {
namespace {
comm::MpiCommunicator* g_world = nullptr;

/// Prints failed assertions of a non-zero rank, prefixed with the rank.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed()) {
      std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
    }
  }

 private:
  int rank_;
};
}  // namespace

comm::MpiCommunicator& world() { return *g_world; }

bool all_ranks(bool ok) {
  int flag = ok ? 0 : 1;
  world().allreduce_max(&flag, 1, comm::DataType::kInt32, "all_ranks")->wait();
  return flag == 0;
}
}  // namespace moex::testing

int main(int argc, char** argv) {
  moex::comm::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int result = 1;
  {
    moex::comm::MpiCommunicator world(MPI_COMM_WORLD);
    world.set_default_timeout(moex::comm::timeout_from_env(std::chrono::seconds(60)));
    moex::testing::g_world = &world;
    if (world.rank() != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new moex::testing::FailurePrinter(world.rank()));
    }
    auto* skips = new moex::testing::NoDeviceSkips();  // owned by GoogleTest's listener list
    ::testing::UnitTest::GetInstance()->listeners().Append(skips);
    result = RUN_ALL_TESTS();
    int flags[2] = {result != 0 ? 1 : 0, skips->count()};  // any rank failed; no-device skips
    MPI_Allreduce(MPI_IN_PLACE, &flags[0], 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &flags[1], 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (world.rank() == 0 && flags[0]) std::fprintf(stderr, "FAILED on at least one rank\n");
    result = moex::testing::exit_code(flags[0], flags[1], /*print=*/world.rank() == 0);
    moex::testing::g_world = nullptr;
  }
  return result;
}
