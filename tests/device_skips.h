// How a test binary reports tests that could not run for want of a CUDA device. GoogleTest counts a
// skipped test as passed, so a GPU test binary on a machine without a GPU would show "Passed" in
// ctest. The test mains install NoDeviceSkips and end with exit_code(): when no test failed and at
// least one skipped with a reason that contains "no CUDA device", the binary exits kSkipExit (77),
// which ctest (SKIP_RETURN_CODE) reports as "Not Run (Skipped)". Tests skipped for other reasons
// (e.g. NCCL refusing two ranks on one GPU) leave the exit code alone.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>

namespace moex::testing {

inline constexpr int kSkipExit = 77;
inline constexpr const char* kNoDevicePrefix = "no CUDA device";

/// Counts the tests skipped because there is no CUDA device.
class NoDeviceSkips : public ::testing::EmptyTestEventListener {
 public:
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.skipped() && r.message() && std::strstr(r.message(), kNoDevicePrefix)) ++count_;
  }
  int count() const { return count_; }

 private:
  int count_ = 0;
};

/// The exit code of a test binary: `gtest_result` (RUN_ALL_TESTS) when it failed or nothing skipped
/// for want of a device (`no_device_skips` test parts, summed over ranks), else kSkipExit, with a
/// line saying so when `print`.
inline int exit_code(int gtest_result, int no_device_skips, bool print) {
  if (gtest_result != 0 || no_device_skips == 0) return gtest_result;
  if (print)
    std::fprintf(stderr, "SKIPPED: tests that need a CUDA device did not run (%d skips over all ranks); exit %d "
                         "(ctest: skipped)\n",
                 no_device_skips, kSkipExit);
  return kSkipExit;
}

}  // namespace moex::testing
