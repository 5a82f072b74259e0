// StagedCommunicator: device buffers staged through a pool of pinned host blocks around the ops of
// a host Communicator; every copy and every wait is bounded by a deadline.
#include "comm/staged/staged_communicator.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <iomanip>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

#include "base/error.h"
#include "comm/cuda_check.h"
#include "comm/op_checks.h"

namespace moex::comm {
namespace detail {

/// A page-locked host block from the staging pool (null with capacity 0 for an empty transfer).
struct PinnedBlock {
  void* ptr = nullptr;
  std::size_t capacity = 0;
};

/// State shared by the communicator and its Works (which may outlive it): the staging stream, the
/// device, the event the issue-time copies are waited on with, and the pool of pinned blocks.
struct StagedShared {
  std::mutex mutex;  ///< guards the pool: Works may complete (and release blocks) on another thread
  std::vector<PinnedBlock> free_blocks;
  std::size_t bytes_held = 0;
  std::size_t allocations = 0;
  cudaStream_t stream = nullptr;
  bool owns_stream = false;
  int device = 0;
  cudaEvent_t copy_event = nullptr;  ///< used only inside one issue call at a time

  StagedShared() = default;
  StagedShared(const StagedShared&) = delete;
  StagedShared& operator=(const StagedShared&) = delete;
  ~StagedShared();

  /// A free block of at least `bytes` (the smallest that fits); else the largest free block is
  /// replaced by a bigger one, or a new block is allocated when none is free.
  PinnedBlock acquire(std::size_t bytes, const std::string& op);
  /// Returns `block` to the pool (no-op for an empty block) and empties the handle.
  void release(PinnedBlock& block);
  /// Gives up `block` for good: something (a pending copy or a pending inner op) may still use it,
  /// so it is neither reused nor freed. Empties the handle.
  static void leak(PinnedBlock& block) { block = PinnedBlock{}; }
};

}  // namespace detail

namespace {

using detail::PinnedBlock;
using detail::StagedShared;
using cuda::DeviceGuard;
using op_checks::Backoff;
using op_checks::packed;
using op_checks::peer_list;
using op_checks::per_peer;
using op_checks::require_buffer;
using op_checks::require_count;
using op_checks::require_root;






std::int64_t sum(const std::vector<std::int64_t>& counts) {
  std::int64_t total = 0;
  for (std::int64_t c : counts) total += c;
  return total;
}



std::size_t bytes_of(std::int64_t elements, DataType type) {
  return static_cast<std::size_t>(elements) * element_size(type);
}

const char* byte_ptr(const void* p, std::size_t offset) { return static_cast<const char*>(p) + offset; }
char* byte_ptr(void* p, std::size_t offset) { return static_cast<char*>(p) + offset; }


/// Blocks a call holds while it is being issued; returned to the pool unless handed to a Work.
struct Staging {
  explicit Staging(std::shared_ptr<StagedShared> s) : shared(std::move(s)) {}
  ~Staging() {
    shared->release(send);
    shared->release(recv);
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  std::shared_ptr<StagedShared> shared;
  PinnedBlock send;
  PinnedBlock recv;
};

/// Copies `bytes` from `src` (device or host) into `block` on the staging stream and waits for
/// the copy until `deadline`. On expiry the block is abandoned (the copy may still write it) and
/// TimeoutError names the op; the op is not posted.
void stage_down(StagedShared& s, PinnedBlock& block, const void* src, std::size_t bytes, Clock::time_point deadline,
                const std::string& op, int rank) {
  if (bytes == 0) return;
  DeviceGuard guard(s.device);
  const auto start = Clock::now();
  MOEX_COMM_CUDA_CHECK(cudaMemcpyAsync(block.ptr, src, bytes, cudaMemcpyDefault, s.stream));
  MOEX_COMM_CUDA_CHECK(cudaEventRecord(s.copy_event, s.stream));
  Backoff backoff;
  for (;;) {
    const cudaError_t rc = cudaEventQuery(s.copy_event);
    if (rc == cudaSuccess) return;
    if (rc != cudaErrorNotReady) cuda::check(rc, "cudaEventQuery(device->host staging copy)", __FILE__, __LINE__);
    if (Clock::now() >= deadline) {
      StagedShared::leak(block);
      std::ostringstream os;
      os << op << ": the device->host copy of " << bytes << " bytes of send data on rank " << rank
         << " did not finish within " << std::fixed << std::setprecision(1)
         << std::max(0.0, std::chrono::duration<double>(deadline - start).count())
         << " s (the GPU may be stalled, or a stream made a prerequisite with wait_for_stream() never finishes); "
            "the op was not posted";
      throw TimeoutError(os.str());
    }
    backoff.pause();
  }
}

/// One staged op: the inner (host) op, then the host->device copies of what it received.
class StagedWork final : public Work {
 public:
  /// One host->device copy of the received data: `bytes` from offset `host_offset` of the recv
  /// block to `device`.
  struct CopyBack {
    void* device;
    std::size_t host_offset;
    std::size_t bytes;
  };

  StagedWork(std::uint64_t sequence, std::string op, std::chrono::milliseconds default_timeout,
             std::shared_ptr<StagedShared> shared, int rank, int size, WorkPtr inner, Staging& staging,
             std::vector<CopyBack> copies)
      : Work(sequence, std::move(op), default_timeout),
        shared_(std::move(shared)),
        rank_(rank),
        size_(size),
        posted_at_(Clock::now()),
        timeout_(default_timeout),
        inner_(std::move(inner)),
        send_(std::exchange(staging.send, PinnedBlock{})),
        recv_(std::exchange(staging.recv, PinnedBlock{})),
        copies_(std::move(copies)) {}

  StagedWork(const StagedWork&) = delete;
  StagedWork& operator=(const StagedWork&) = delete;

  ~StagedWork() override {
    if (phase_ != Phase::kInner && phase_ != Phase::kCopyBack) {
      destroy_event();
      return;
    }
    if (!timed_out_) {
      try {
        Work::wait();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "moex: warning: unfinished %s #%llu dropped: %s\n", op().c_str(),
                     static_cast<unsigned long long>(sequence()), e.what());
      } catch (...) {
        std::fprintf(stderr, "%smoex: warning: unfinished %s #%llu dropped: unknown error\n", rank_prefix().c_str(),
                     op().c_str(), static_cast<unsigned long long>(sequence()));
      }
    } else {
      completed();  // one last poll: it may have finished since the timeout
    }
    if (phase_ == Phase::kInner || phase_ == Phase::kCopyBack) {
      // Still pending after a timeout: the inner op or a copy may still touch the staging blocks.
      std::fprintf(stderr,
                   "%smoex: warning: %s #%llu abandoned after a timeout; its %zu bytes of pinned staging memory stay "
                   "allocated because the pending op may still use them\n",
                   rank_prefix().c_str(), op().c_str(), static_cast<unsigned long long>(sequence()),
                   send_.capacity + recv_.capacity);
      StagedShared::leak(send_);
      StagedShared::leak(recv_);
    }
    destroy_event();  // CUDA releases an event still pending in a stream once it completes
  }

  bool completed() override {
    if (phase_ == Phase::kDone || phase_ == Phase::kFailed) return true;
    try {
      if (phase_ == Phase::kInner) {
        if (!inner_->completed()) return false;
        inner_->wait(Clock::now() + timeout_);  // finished: returns at once, or throws its error
        shared_->release(send_);  // the inner op no longer reads it
        if (copies_.empty()) {
          shared_->release(recv_);
          phase_ = Phase::kDone;
          return true;
        }
        start_copy_back();
      }
      const cudaError_t rc = cudaEventQuery(event_);
      if (rc == cudaErrorNotReady) return false;
      cuda::check(rc, "cudaEventQuery(host->device copy of the received data)", __FILE__, __LINE__);
      shared_->release(recv_);
      phase_ = Phase::kDone;
    } catch (...) {
      error_ = std::current_exception();
      if (phase_ == Phase::kCopyBack) {
        StagedShared::leak(recv_);  // a copy may be in flight: never hand the block out again
      } else {
        shared_->release(send_);  // the inner op finished (with an error): nothing uses them
        shared_->release(recv_);
      }
      phase_ = Phase::kFailed;
    }
    return true;
  }

  void wait(Clock::time_point deadline) override {
    Backoff backoff;
    while (!completed()) {
      if (Clock::now() >= deadline) {
        timed_out_ = true;
        if (phase_ == Phase::kInner) {
          // Marks the inner Work as timed out too, so that its destructor does not wait again.
          try {
            inner_->wait(deadline);
            continue;  // it finished just now
          } catch (const TimeoutError&) {
          } catch (...) {
            continue;  // it failed just now: completed() reports that
          }
        }
        throw TimeoutError(timeout_message(deadline));
      }
      backoff.pause();
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  enum class Phase { kInner, kCopyBack, kDone, kFailed };

  void start_copy_back() {
    DeviceGuard guard(shared_->device);
    phase_ = Phase::kCopyBack;  // from here a copy may be in flight
    for (const CopyBack& c : copies_) {
      MOEX_COMM_CUDA_CHECK(
          cudaMemcpyAsync(c.device, byte_ptr(recv_.ptr, c.host_offset), c.bytes, cudaMemcpyDefault, shared_->stream));
    }
    MOEX_COMM_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    MOEX_COMM_CUDA_CHECK(cudaEventRecord(event_, shared_->stream));
  }

  void destroy_event() {
    if (event_ != nullptr) cudaEventDestroy(event_);
    event_ = nullptr;
  }

  std::string timeout_message(Clock::time_point deadline) const {
    const double allowed = std::max(0.0, std::chrono::duration<double>(deadline - posted_at_).count());
    std::ostringstream os;
    os << op() << " #" << sequence() << " on rank " << rank_ << " of " << size_ << " did not complete within "
       << std::fixed << std::setprecision(1) << allowed << " s ("
       << (phase_ == Phase::kInner ? "waiting for the peers in the staged host op"
                                   : "copying the received data host->device")
       << "); peers: " << peer_list(rank_, size_)
       << " (a peer may have crashed, stalled, or issued collectives in a different order); raise MOEX_TIMEOUT_S or "
          "--timeout if the step is legitimately slower";
    return os.str();
  }

  std::shared_ptr<StagedShared> shared_;
  int rank_;
  int size_;
  Clock::time_point posted_at_;
  std::chrono::milliseconds timeout_;
  WorkPtr inner_;
  PinnedBlock send_;
  PinnedBlock recv_;
  std::vector<CopyBack> copies_;
  cudaEvent_t event_ = nullptr;
  Phase phase_ = Phase::kInner;
  bool timed_out_ = false;
  std::exception_ptr error_;
};

/// "<name>(<label>)", the op text shown in errors.
std::string op_name(const char* name, const std::string& label) { return std::string(name) + "(" + label + ")"; }

}  // namespace

namespace detail {

StagedShared::~StagedShared() {
  for (PinnedBlock& b : free_blocks) cudaFreeHost(b.ptr);
  if (copy_event != nullptr) cudaEventDestroy(copy_event);
  if (owns_stream && stream != nullptr) cudaStreamDestroy(stream);
}

PinnedBlock StagedShared::acquire(std::size_t bytes, const std::string& op) {
  if (bytes == 0) return {};
  std::lock_guard lock(mutex);
  auto best = free_blocks.end();
  for (auto it = free_blocks.begin(); it != free_blocks.end(); ++it)
    if (it->capacity >= bytes && (best == free_blocks.end() || it->capacity < best->capacity)) best = it;
  if (best != free_blocks.end()) {
    const PinnedBlock block = *best;
    free_blocks.erase(best);
    return block;
  }
  // No free block fits: grow the largest free one (free it, allocate bigger) or add a block.
  if (!free_blocks.empty()) {
    auto largest = std::max_element(free_blocks.begin(), free_blocks.end(),
                                    [](const PinnedBlock& a, const PinnedBlock& b) { return a.capacity < b.capacity; });
    cudaFreeHost(largest->ptr);
    bytes_held -= largest->capacity;
    free_blocks.erase(largest);
  }
  std::size_t capacity = std::size_t{64} << 10;
  while (capacity < bytes) capacity *= 2;
  PinnedBlock block;
  // Portable: pinned for every CUDA context, whichever thread (and current device) allocates it.
  const cudaError_t rc = cudaHostAlloc(&block.ptr, capacity, cudaHostAllocPortable);
  if (rc != cudaSuccess) {
    throw CudaError(op + ": cudaHostAlloc of " + std::to_string(capacity) + " bytes of pinned staging memory (for " +
                    std::to_string(bytes) + " bytes, " + std::to_string(bytes_held) + " already held) failed: " +
                    cudaGetErrorName(rc) + ": " + cudaGetErrorString(rc));
  }
  block.capacity = capacity;
  bytes_held += capacity;
  ++allocations;
  return block;
}

void StagedShared::release(PinnedBlock& block) {
  if (block.ptr == nullptr) return;
  std::lock_guard lock(mutex);
  free_blocks.push_back(block);
  block = PinnedBlock{};
}

}  // namespace detail

StagedCommunicator::StagedCommunicator(std::unique_ptr<Communicator> inner, Options options)
    : inner_(std::move(inner)) {
  if (!inner_) throw InvalidArgument("StagedCommunicator: the inner communicator is null; pass e.g. an MpiCommunicator");
  default_timeout_ = inner_->default_timeout();
  auto shared = std::make_shared<StagedShared>();
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw CudaError(std::string("StagedCommunicator: no CUDA device: ") +
                    (rc != cudaSuccess ? std::string("cudaGetDeviceCount: ") + cudaGetErrorString(rc)
                                       : std::string("cudaGetDeviceCount reported 0 devices")));
  }
  MOEX_COMM_CUDA_CHECK(cudaGetDevice(&shared->device));
  if (options.stream != nullptr) {
    shared->stream = options.stream;
  } else {
    MOEX_COMM_CUDA_CHECK(cudaStreamCreateWithFlags(&shared->stream, cudaStreamNonBlocking));
    shared->owns_stream = true;
  }
  MOEX_COMM_CUDA_CHECK(cudaEventCreateWithFlags(&shared->copy_event, cudaEventDisableTiming));
  shared_ = std::move(shared);
}

StagedCommunicator::~StagedCommunicator() = default;

cudaStream_t StagedCommunicator::stream() const { return shared_->stream; }

int StagedCommunicator::device() const { return shared_->device; }

std::size_t StagedCommunicator::staging_bytes() const {
  std::lock_guard lock(shared_->mutex);
  return shared_->bytes_held;
}

std::size_t StagedCommunicator::staging_allocations() const {
  std::lock_guard lock(shared_->mutex);
  return shared_->allocations;
}

void StagedCommunicator::consume(Work& work, cudaStream_t /*stream*/, Clock::time_point deadline) {
  work.wait(deadline);
}

void StagedCommunicator::wait_for_stream(cudaStream_t producer) {
  DeviceGuard guard(shared_->device);
  cudaEvent_t event = nullptr;
  MOEX_COMM_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  const cudaError_t recorded = cudaEventRecord(event, producer);
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(shared_->stream, event, 0) : recorded;
  cudaEventDestroy(event);  // safe: the wait already captured the recorded work
  MOEX_COMM_CUDA_CHECK(waited);
}

// Every op: validate (no side effects), take staging blocks, stage the send data down (waited for
// here), post the inner op on the staged host buffers, and hand blocks and copy-back list to the Work.

namespace {

/// The Work for an inner op that was posted; `copies` move the received data up on completion.
WorkPtr make_work(std::uint64_t& next_sequence, std::string op, std::chrono::milliseconds timeout,
                  const std::shared_ptr<StagedShared>& shared, int rank, int size, WorkPtr inner, Staging& staging,
                  std::vector<StagedWork::CopyBack> copies) {
  return std::make_unique<StagedWork>(next_sequence++, std::move(op), timeout, shared, rank, size, std::move(inner),
                                      staging, std::move(copies));
}

}  // namespace

WorkPtr StagedCommunicator::alltoall(const void* send, void* recv, std::int64_t count, DataType type,
                                     std::string label) {
  std::string op = op_name("alltoall", label);
  element_size(type);
  require_count(count, op, "count");
  require_buffer(send, count * size(), op, "send");
  require_buffer(recv, count * size(), op, "recv");
  const std::size_t bytes = bytes_of(count * size(), type);
  inner_->set_default_timeout(default_timeout_);
  Staging staging(shared_);
  staging.send = shared_->acquire(bytes, op);
  staging.recv = shared_->acquire(bytes, op);
  stage_down(*shared_, staging.send, send, bytes, Clock::now() + default_timeout_, op, rank());
  WorkPtr inner = inner_->alltoall(staging.send.ptr, staging.recv.ptr, count, type, label);
  std::vector<StagedWork::CopyBack> copies;
  if (bytes > 0) copies.push_back({recv, 0, bytes});
  return make_work(next_sequence_, std::move(op), default_timeout_, shared_, rank(), size(), std::move(inner), staging,
                   std::move(copies));
}

WorkPtr StagedCommunicator::alltoallv(const AlltoallvArgs& args) {
  std::string op = op_name("alltoallv", args.label);
  const int n = size();
  const std::size_t es = element_size(args.type);
  const auto sc = per_peer(args.send_counts, n, op, "send_counts");
  const auto rc = per_peer(args.recv_counts, n, op, "recv_counts");
  const auto sd = args.send_displs.empty() ? packed(sc) : per_peer(args.send_displs, n, op, "send_displs");
  const auto rd = args.recv_displs.empty() ? packed(rc) : per_peer(args.recv_displs, n, op, "recv_displs");

  // Send side: stage the span [lo, hi) the non-empty blocks cover, with displacements relative to lo.
  std::int64_t lo = -1, hi = 0;
  for (int p = 0; p < n; ++p) {
    const auto q = static_cast<std::size_t>(p);
    if (sc[q] == 0) continue;
    lo = lo < 0 ? sd[q] : std::min(lo, sd[q]);
    hi = std::max(hi, sd[q] + sc[q]);
  }
  if (lo < 0) lo = 0;
  require_buffer(args.send, hi, op, "send");
  std::vector<std::int64_t> staged_sd(sd.size(), 0);
  for (std::size_t q = 0; q < sd.size(); ++q) staged_sd[q] = sc[q] > 0 ? sd[q] - lo : 0;

  // Receive side: packed host blocks, each copied up to its displacement; adjacent blocks merge.
  std::int64_t recv_extent = 0;
  for (std::size_t q = 0; q < rc.size(); ++q)
    if (rc[q] > 0) recv_extent = std::max(recv_extent, rd[q] + rc[q]);
  require_buffer(args.recv, recv_extent, op, "recv");
  const auto staged_rd = packed(rc);
  std::vector<StagedWork::CopyBack> copies;
  for (std::size_t q = 0; q < rc.size(); ++q) {
    if (rc[q] == 0) continue;
    void* dst = byte_ptr(args.recv, static_cast<std::size_t>(rd[q]) * es);
    const std::size_t offset = static_cast<std::size_t>(staged_rd[q]) * es;
    const std::size_t bytes = static_cast<std::size_t>(rc[q]) * es;
    if (!copies.empty()) {
      StagedWork::CopyBack& last = copies.back();
      if (byte_ptr(last.device, last.bytes) == dst && last.host_offset + last.bytes == offset) {
        last.bytes += bytes;
        continue;
      }
    }
    copies.push_back({dst, offset, bytes});
  }

  const std::size_t send_bytes = static_cast<std::size_t>(hi - lo) * es;
  inner_->set_default_timeout(default_timeout_);
  Staging staging(shared_);
  staging.send = shared_->acquire(send_bytes, op);
  staging.recv = shared_->acquire(bytes_of(sum(rc), args.type), op);
  stage_down(*shared_, staging.send, send_bytes > 0 ? byte_ptr(args.send, static_cast<std::size_t>(lo) * es) : nullptr,
             send_bytes, Clock::now() + default_timeout_, op, rank());
  AlltoallvArgs inner_args{staging.send.ptr, sc,        staging.recv.ptr, rc,
                           args.type,        args.label, staged_sd,       staged_rd};
  WorkPtr inner = inner_->alltoallv(inner_args);  // the host backend copies counts and displacements
  return make_work(next_sequence_, std::move(op), default_timeout_, shared_, rank(), n, std::move(inner), staging,
                   std::move(copies));
}

WorkPtr StagedCommunicator::allreduce(void* data, std::int64_t count, DataType type, std::string label, bool max) {
  std::string op = op_name(max ? "allreduce_max" : "allreduce_sum", label);
  element_size(type);
  if (type == DataType::kByte)
    throw InvalidArgument(op + ": type byte " + (max ? "has no max" : "cannot be summed") + "; use a numeric DataType");
  require_count(count, op, "count");
  require_buffer(data, count, op, "data");
  const std::size_t bytes = bytes_of(count, type);
  inner_->set_default_timeout(default_timeout_);
  Staging staging(shared_);
  staging.recv = shared_->acquire(bytes, op);
  stage_down(*shared_, staging.recv, data, bytes, Clock::now() + default_timeout_, op, rank());
  WorkPtr inner = max ? inner_->allreduce_max(staging.recv.ptr, count, type, label)
                      : inner_->allreduce_sum(staging.recv.ptr, count, type, label);
  std::vector<StagedWork::CopyBack> copies;
  if (bytes > 0) copies.push_back({data, 0, bytes});
  return make_work(next_sequence_, std::move(op), default_timeout_, shared_, rank(), size(), std::move(inner), staging,
                   std::move(copies));
}

WorkPtr StagedCommunicator::allreduce_sum(void* data, std::int64_t count, DataType type, std::string label) {
  return allreduce(data, count, type, std::move(label), false);
}

WorkPtr StagedCommunicator::allreduce_max(void* data, std::int64_t count, DataType type, std::string label) {
  return allreduce(data, count, type, std::move(label), true);
}

WorkPtr StagedCommunicator::allgather(const void* send, void* recv, std::int64_t count, DataType type,
                                      std::string label) {
  std::string op = op_name("allgather", label);
  element_size(type);
  require_count(count, op, "count");
  require_buffer(send, count, op, "send");
  require_buffer(recv, count * size(), op, "recv");
  const std::size_t send_bytes = bytes_of(count, type);
  const std::size_t recv_bytes = bytes_of(count * size(), type);
  inner_->set_default_timeout(default_timeout_);
  Staging staging(shared_);
  staging.send = shared_->acquire(send_bytes, op);
  staging.recv = shared_->acquire(recv_bytes, op);
  stage_down(*shared_, staging.send, send, send_bytes, Clock::now() + default_timeout_, op, rank());
  WorkPtr inner = inner_->allgather(staging.send.ptr, staging.recv.ptr, count, type, label);
  std::vector<StagedWork::CopyBack> copies;
  if (recv_bytes > 0) copies.push_back({recv, 0, recv_bytes});
  return make_work(next_sequence_, std::move(op), default_timeout_, shared_, rank(), size(), std::move(inner), staging,
                   std::move(copies));
}

WorkPtr StagedCommunicator::gatherv(const void* send, std::int64_t send_count, void* recv,
                                    std::span<const std::int64_t> recv_counts, DataType type, int root,
                                    std::string label) {
  std::string op = op_name("gatherv", label);
  element_size(type);
  require_root(root, size(), op);
  require_count(send_count, op, "send_count");
  require_buffer(send, send_count, op, "send");
  const bool is_root = rank() == root;
  std::size_t recv_bytes = 0;
  if (is_root) {
    const auto counts = per_peer(recv_counts, size(), op, "recv_counts");
    const std::int64_t own = counts[static_cast<std::size_t>(root)];
    if (own != send_count) {
      throw InvalidArgument(op + ": recv_counts[root " + std::to_string(root) + "] = " + std::to_string(own) +
                            " must equal the root's send_count = " + std::to_string(send_count));
    }
    require_buffer(recv, sum(counts), op, "recv");
    recv_bytes = bytes_of(sum(counts), type);
  }
  const std::size_t send_bytes = bytes_of(send_count, type);
  inner_->set_default_timeout(default_timeout_);
  Staging staging(shared_);
  staging.send = shared_->acquire(send_bytes, op);
  staging.recv = shared_->acquire(recv_bytes, op);
  stage_down(*shared_, staging.send, send, send_bytes, Clock::now() + default_timeout_, op, rank());
  WorkPtr inner = inner_->gatherv(staging.send.ptr, send_count, is_root ? staging.recv.ptr : nullptr, recv_counts,
                                  type, root, label);
  std::vector<StagedWork::CopyBack> copies;
  if (recv_bytes > 0) copies.push_back({recv, 0, recv_bytes});
  return make_work(next_sequence_, std::move(op), default_timeout_, shared_, rank(), size(), std::move(inner), staging,
                   std::move(copies));
}

WorkPtr StagedCommunicator::broadcast(void* data, std::int64_t count, DataType type, int root, std::string label) {
  std::string op = op_name("broadcast", label);
  element_size(type);
  require_root(root, size(), op);
  require_count(count, op, "count");
  require_buffer(data, count, op, "data");
  const std::size_t bytes = bytes_of(count, type);
  const bool is_root = rank() == root;
  inner_->set_default_timeout(default_timeout_);
  Staging staging(shared_);
  staging.recv = shared_->acquire(bytes, op);
  if (is_root) stage_down(*shared_, staging.recv, data, bytes, Clock::now() + default_timeout_, op, rank());
  WorkPtr inner = inner_->broadcast(staging.recv.ptr, count, type, root, label);
  std::vector<StagedWork::CopyBack> copies;
  if (!is_root && bytes > 0) copies.push_back({data, 0, bytes});
  return make_work(next_sequence_, std::move(op), default_timeout_, shared_, rank(), size(), std::move(inner), staging,
                   std::move(copies));
}

WorkPtr StagedCommunicator::barrier(std::string label) {
  inner_->set_default_timeout(default_timeout_);
  WorkPtr inner = inner_->barrier(label);
  Staging staging(shared_);
  return make_work(next_sequence_, op_name("barrier", label), default_timeout_, shared_, rank(), size(),
                   std::move(inner), staging, {});
}

}  // namespace moex::comm
