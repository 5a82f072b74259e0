// Deterministic random numbers that are identical on every platform (no std distributions).
#pragma once

#include <cmath>
#include <cstdint>

namespace moex {

/// SplitMix64 generator with a Box-Muller normal: the same stream for the same seed everywhere, so
/// every rank can draw the same global weights and a run is reproducible.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  /// Seed derived from several integers (e.g. seed, layer, expert).
  static std::uint64_t mix(std::uint64_t a, std::uint64_t b, std::uint64_t c = 0, std::uint64_t d = 0) {
    Rng r(a ^ 0x9e3779b97f4a7c15ull);
    std::uint64_t h = r.next() ^ b;
    Rng r2(h);
    h = r2.next() ^ c;
    Rng r3(h);
    h = r3.next() ^ d;
    Rng r4(h);
    return r4.next();
  }
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in (0, 1).
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  /// Standard normal.
  double normal() {
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  /// Fills `n` floats with normal(0, stddev).
  void fill_normal(float* out, std::int64_t n, double stddev) {
    for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(normal() * stddev);
  }

 private:
  std::uint64_t state_;
};

}  // namespace moex
