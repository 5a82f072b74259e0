// Tolerance checks shared by the tests. Errors are relative to the tensor's scale: max |want| (or
// max |b|), not each element's own size.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <vector>

namespace moex::testing {

/// Largest |v[i]| (0 for an empty v).
inline double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

/// Every |got[i] - want[i]| <= rel * max |want| + abs, i < want.size() (`got` holds that many); an
/// all-zero `want` with abs = 0 must be matched exactly. Names the first element out of bounds.
template <typename T>
::testing::AssertionResult close_to(const T* got, const std::vector<double>& want, double rel, const std::string& what,
                                    double abs = 0.0) {
  const double tol = rel * max_abs(want) + abs;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= tol))
      return ::testing::AssertionFailure() << what << "[" << i << "] = " << got[i] << ", expected " << want[i]
                                           << " (error " << err << " > tolerance " << tol << ")";
  }
  return ::testing::AssertionSuccess();
}
template <typename T>
::testing::AssertionResult close_to(const std::vector<T>& got, const std::vector<double>& want, double rel,
                                    const std::string& what, double abs = 0.0) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << ", expected " << want.size();
  return close_to(got.data(), want, rel, what, abs);
}

/// Max |a - b| over max(max |b|, 1e-6): fp32 results whose only difference is summation order.
inline double rel_err(const float* a, const float* b, std::size_t n) {
  double diff = 0.0, mag = 1e-6;
  for (std::size_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    mag = std::max(mag, std::abs(static_cast<double>(b[i])));
  }
  return diff / mag;
}

/// max |got - want| / max |want| <= tol over n values (an all-zero `want` needs max |got| <= tol).
inline ::testing::AssertionResult within(const float* got, const float* want, std::size_t n, double tol,
                                         const std::string& what) {
  double max_diff = 0.0, max_ref = 0.0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(d <= max_diff)) {  // also catches NaN
      max_diff = std::isnan(d) ? std::numeric_limits<double>::infinity() : d;
      at = i;
    }
    max_ref = std::max(max_ref, std::abs(static_cast<double>(want[i])));
  }
  const double rel = max_ref > 0.0 ? max_diff / max_ref : max_diff;
  if (rel <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": max |got - want| = " << max_diff << " at [" << at << "] of " << n
                                       << " (got " << got[at] << ", want " << want[at] << "), max |want| = " << max_ref
                                       << ", relative " << rel << " > tolerance " << tol;
}
inline ::testing::AssertionResult within(const std::vector<float>& got, const std::vector<float>& want, double tol,
                                         const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": got has " << got.size() << " values, want has " << want.size();
  return within(got.data(), want.data(), got.size(), tol, what);
}

}  // namespace moex::testing
