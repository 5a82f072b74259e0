// Argument checks, wait back-off and message helpers shared by the Communicator backends
// (comm/mpi, comm/nccl, comm/staged), so every backend rejects bad input with the same words.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace moex::comm::op_checks {

/// InvalidArgument "<op>: <what> = <value> must be >= 0" for a negative count.
void require_count(std::int64_t value, const std::string& op, const std::string& what);
/// A null buffer is fine only when nothing is read from or written to it.
void require_buffer(const void* buffer, std::int64_t elements, const std::string& op, const char* what);
/// InvalidArgument unless 0 <= root < size.
void require_root(int root, int size, const std::string& op);
/// Per-peer counts (or displacements), validated: one per rank, each >= 0.
std::vector<std::int64_t> per_peer(std::span<const std::int64_t> values, int size, const std::string& op,
                                   const char* what);
/// Displacements of blocks packed back to back: the exclusive prefix sums of `counts`.
std::vector<std::int64_t> packed(const std::vector<std::int64_t>& counts);
/// "0,1,3" for the ranks other than `self`; runs of three or more shrink to "4-9" so that large
/// jobs keep the message readable.
std::string peer_list(int self, int size);

/// How a waiting loop polls: spin briefly for latency, then sleep with a growing pause (1 us
/// doubling to 1 ms), so that ranks oversubscribing the cores leave them to the peers they wait for.
class Backoff {
 public:
  void pause() {
    if (++polls_ <= 64) return;
    std::this_thread::sleep_for(pause_);
    pause_ = std::min(pause_ * 2, std::chrono::microseconds(1000));
  }

 private:
  int polls_ = 0;
  std::chrono::microseconds pause_{1};
};

}  // namespace moex::comm::op_checks
