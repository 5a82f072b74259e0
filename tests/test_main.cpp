// GoogleTest main for single-process tests: GoogleTest's own, except that a binary whose tests
// skipped for want of a CUDA device exits 77 (tests/device_skips.h), so ctest reports it skipped.
#include <gtest/gtest.h>

#include "tests/device_skips.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto* skips = new moex::testing::NoDeviceSkips();  // owned by GoogleTest's listener list
  ::testing::UnitTest::GetInstance()->listeners().Append(skips);
  const int result = RUN_ALL_TESTS();
  return moex::testing::exit_code(result, skips->count(), /*print=*/true);
}
