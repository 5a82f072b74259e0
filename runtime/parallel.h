// parallel_for: splits a loop over the cores this rank may use (a Boost.Asio thread pool).
#pragma once

#include <cstdint>
#include <functional>

namespace moex {

/// Runs fn(begin, end) over [0, n) cut into at most `threads` contiguous chunks of at least
/// `min_chunk` items; the caller runs one chunk itself and returns when all are done. The partition
/// depends only on n, min_chunk and the thread count, so results are deterministic. An exception
/// from any chunk is rethrown (the first one) after all chunks finished.
void parallel_for(std::int64_t n, std::int64_t min_chunk, const std::function<void(std::int64_t, std::int64_t)>& fn);

/// Threads parallel_for uses (default 1: the caller alone). Call between loops, not during one.
void set_parallel_threads(int threads);
int parallel_threads();

}  // namespace moex
