// The Communicator interface: asynchronous collectives between the ranks of one job.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace moex::comm {

using Clock = std::chrono::steady_clock;

/// Element types a collective moves.
enum class DataType { kFloat32, kFloat64, kInt32, kInt64, kByte };

/// Size in bytes of one element of `type`.
std::size_t element_size(DataType type);

/// Handle to one asynchronous collective.
///
/// Contract: every rank of a communicator issues the same collectives in the same order (the
/// sequence number counts them). The buffers passed to the op must stay alive and untouched until
/// `completed()` returned true or `wait()` returned. `wait()` never blocks past its deadline: on
/// expiry it throws moex::TimeoutError naming the op, the rank and the peers involved. A failed op
/// throws moex::MpiError (or NcclError) from `wait()`. Destroying an unfinished Work waits for it
/// with the communicator's default timeout and swallows errors (destructors must not throw).
class Work {
 public:
  virtual ~Work() = default;
  /// Non-blocking: true once the op finished (successfully or not; `wait()` reports which).
  virtual bool completed() = 0;
  /// Blocks until the op finished or `deadline` passed.
  virtual void wait(Clock::time_point deadline) = 0;
  /// Blocks with the communicator's default timeout.
  void wait() { wait(Clock::now() + default_timeout_); }
  /// Position of this op in the communicator's op sequence (0, 1, 2, ...).
  std::uint64_t sequence() const { return sequence_; }
  /// Name of the op plus the caller's label, e.g. "alltoallv(dispatch layer 2)".
  const std::string& op() const { return op_; }

 protected:
  Work(std::uint64_t sequence, std::string op, std::chrono::milliseconds default_timeout)
      : sequence_(sequence), op_(std::move(op)), default_timeout_(default_timeout) {}
  std::chrono::milliseconds default_timeout() const { return default_timeout_; }

 private:
  std::uint64_t sequence_;
  std::string op_;
  std::chrono::milliseconds default_timeout_;
};

using WorkPtr = std::unique_ptr<Work>;

/// Arguments of an all-to-all with per-peer counts. Data for peer p is the p-th block of `send`:
/// blocks packed back to back in rank order, or at `send_displs[p]` elements when displacements are
/// given; likewise for `recv`.
struct AlltoallvArgs {
  const void* send = nullptr;
  std::span<const std::int64_t> send_counts;  ///< elements to each peer, size() == world size
  void* recv = nullptr;
  std::span<const std::int64_t> recv_counts;  ///< elements from each peer, size() == world size
  DataType type = DataType::kFloat32;
  std::string label;                          ///< shown in errors, e.g. "dispatch layer 0"
  std::span<const std::int64_t> send_displs;  ///< optional: element offset of each peer's block
  std::span<const std::int64_t> recv_displs;  ///< optional: element offset of each peer's block
};

/// A group of ranks that exchange data. One per process group; not thread-safe: issue ops from one
/// thread at a time.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  /// Each rank sends `count` elements to every peer (block p of `send` to peer p).
  virtual WorkPtr alltoall(const void* send, void* recv, std::int64_t count, DataType type,
                           std::string label) = 0;
  /// All-to-all with per-peer counts.
  virtual WorkPtr alltoallv(const AlltoallvArgs& args) = 0;
  /// In-place sum across ranks of `count` elements (float32, float64, int32 or int64).
  virtual WorkPtr allreduce_sum(void* data, std::int64_t count, DataType type, std::string label) = 0;
  /// In-place max across ranks.
  virtual WorkPtr allreduce_max(void* data, std::int64_t count, DataType type, std::string label) = 0;
  /// Gathers `count` elements from every rank into `recv` (rank order) on every rank.
  virtual WorkPtr allgather(const void* send, void* recv, std::int64_t count, DataType type,
                            std::string label) = 0;
  /// Gathers per-rank variable-length blocks to `root` (recv_counts needed only on root).
  virtual WorkPtr gatherv(const void* send, std::int64_t send_count, void* recv,
                          std::span<const std::int64_t> recv_counts, DataType type, int root,
                          std::string label) = 0;
  /// Copies `count` elements from `root` to every rank.
  virtual WorkPtr broadcast(void* data, std::int64_t count, DataType type, int root,
                            std::string label) = 0;
  virtual WorkPtr barrier(std::string label) = 0;

  /// Node id of every rank (a collective; equal ids = same node, numbered by lowest rank). Ranks that
  /// share memory (MPI_COMM_TYPE_SHARED) form a node, unless MOEX_RANKS_PER_NODE=R groups every R
  /// consecutive ranks into a node instead (for tests of multi-node code on one machine).
  virtual std::vector<int> node_ids() = 0;

  /// Whether ops may be issued from a second thread (a communication stream), one thread at a time.
  /// MPI needs MPI_THREAD_SERIALIZED or better for that.
  virtual bool allows_progress_thread() const = 0;

  /// Default deadline for `Work::wait()`: 300 s unless set (MOEX_TIMEOUT_S or --timeout).
  std::chrono::milliseconds default_timeout() const { return default_timeout_; }
  void set_default_timeout(std::chrono::milliseconds t) { default_timeout_ = t; }

 protected:
  std::chrono::milliseconds default_timeout_{300'000};
};

/// The longest timeout in seconds (about 115 days): far above any real step, and small enough that
/// neither the milliseconds nor a deadline of now + timeout can overflow.
inline constexpr double kMaxTimeoutSeconds = 1e7;
/// `seconds` as a timeout, rounded up to whole milliseconds so that a tiny positive value never
/// becomes 0; nullopt unless it is finite and in (0, kMaxTimeoutSeconds].
std::optional<std::chrono::milliseconds> timeout_from_seconds(double seconds);
/// Reads MOEX_TIMEOUT_S (seconds, > 0) if set, else returns `fallback`. Throws ConfigError on a
/// malformed value.
std::chrono::milliseconds timeout_from_env(std::chrono::milliseconds fallback);

}  // namespace moex::comm
