// A process-wide worker pool for parallel_for.
#include "runtime/parallel.h"

#include <algorithm>
#include <exception>
#include <latch>
#include <memory>
#include <mutex>

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

namespace moex {
namespace {
struct Pool {
  int threads = 1;
  std::unique_ptr<boost::asio::thread_pool> workers;  // threads - 1 workers; the caller is the last
};
Pool& pool() {
  static Pool p;
  return p;
}
}  // namespace

void set_parallel_threads(int threads) {
  Pool& p = pool();
  threads = std::max(1, threads);
  if (threads == p.threads) return;
  if (p.workers) p.workers->join();
  p.workers.reset();
  p.threads = threads;
  if (threads > 1) p.workers = std::make_unique<boost::asio::thread_pool>(static_cast<std::size_t>(threads - 1));
}

int parallel_threads() { return pool().threads; }

void parallel_for(std::int64_t n, std::int64_t min_chunk, const std::function<void(std::int64_t, std::int64_t)>& fn) {
  if (n <= 0) return;
  Pool& p = pool();
  const std::int64_t chunks = std::min<std::int64_t>(p.threads, std::max<std::int64_t>(1, n / std::max<std::int64_t>(1, min_chunk)));
  if (chunks <= 1 || !p.workers) {
    fn(0, n);
    return;
  }
  std::latch done(static_cast<std::ptrdiff_t>(chunks - 1));
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](std::int64_t c) {
    try {
      fn(n * c / chunks, n * (c + 1) / chunks);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  for (std::int64_t c = 1; c < chunks; ++c)
    boost::asio::post(*p.workers, [&, c] {
      run(c);
      done.count_down();
    });
  run(0);
  done.wait();
  if (error) std::rethrow_exception(error);
}

}  // namespace moex
