// NcclCommunicator: NCCL ops on a comm stream over a non-blocking NCCL communicator; each op's
// launch and completion are polled against a deadline, and a deadline that passes aborts NCCL.
#include "comm/nccl/nccl_communicator.h"

#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iomanip>
#include <map>
#include <mutex>
#include <sstream>
#include <type_traits>
#include <utility>

#include "base/error.h"
#include "comm/cuda_check.h"
#include "comm/op_checks.h"

namespace moex::comm {
namespace detail {

/// The event that marks the end of one op on the comm stream. Recorded once NCCL finished
/// launching the op; destroyed with the last owner (the NcclWork, or the shared state meanwhile).
struct NcclOpEvent {
  cudaEvent_t event = nullptr;
  bool recorded = false;
  ~NcclOpEvent() {
    if (event != nullptr) cudaEventDestroy(event);
  }
};

/// State shared by the communicator and its Works: the NCCL communicator (null once aborted), the
/// comm stream, and the op whose launch NCCL still finishes in the background. Guarded by `mutex`.
struct NcclShared {
  std::mutex mutex;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  bool owns_stream = false;
  int device = 0;
  int rank = 0;
  int size = 1;
  void* scratch = nullptr;  ///< one int32 on the device, reduced by barrier()
  std::string abort_reason;  ///< non-empty once the communicator was aborted
  std::shared_ptr<NcclOpEvent> launching;  ///< op still being launched by NCCL (non-blocking mode)
  std::chrono::milliseconds finalize_timeout{300'000};

  NcclShared() = default;
  NcclShared(const NcclShared&) = delete;
  NcclShared& operator=(const NcclShared&) = delete;
  ~NcclShared();
};

}  // namespace detail

namespace {

using detail::NcclOpEvent;
using detail::NcclShared;
using cuda::DeviceGuard;
using op_checks::Backoff;
using op_checks::packed;
using op_checks::peer_list;
using op_checks::per_peer;
using op_checks::require_buffer;
using op_checks::require_count;
using op_checks::require_root;


/// NCCL's text for `code` plus its last-error message for `comm` (may be null).
std::string nccl_error_text(ncclResult_t code, ncclComm_t comm) {
  std::string text = std::string(ncclGetErrorString(code)) + " (ncclResult_t " + std::to_string(static_cast<int>(code)) + ")";
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') text += "; NCCL's last error: " + std::string(last);
  return text;
}


ncclDataType_t nccl_type(DataType type, const std::string& op) {
  switch (type) {
    case DataType::kFloat32: return ncclFloat32;
    case DataType::kFloat64: return ncclFloat64;
    case DataType::kInt32: return ncclInt32;
    case DataType::kInt64: return ncclInt64;
    case DataType::kByte: return ncclUint8;
  }
  throw InvalidArgument(op + ": DataType " + std::to_string(static_cast<int>(type)) +
                        " is not one of float32, float64, int32, int64, byte");
}



/// Elements a buffer must span: the end of the farthest non-empty block.
std::int64_t extent(const std::vector<std::int64_t>& counts, const std::vector<std::int64_t>& displs) {
  std::int64_t end = 0;
  for (std::size_t p = 0; p < counts.size(); ++p)
    if (counts[p] > 0) end = std::max(end, displs[p] + counts[p]);
  return end;
}



/// `base` advanced by `elements` elements of `type`.
template <typename T>
T* at_element(T* base, std::int64_t elements, DataType type) {
  using Byte = std::conditional_t<std::is_const_v<T>, const char, char>;
  return reinterpret_cast<T*>(reinterpret_cast<Byte*>(base) + elements * static_cast<std::int64_t>(element_size(type)));
}



/// Aborts the NCCL communicator (caller holds the mutex); later ops report `reason`.
void abort_locked(NcclShared& s, const std::string& reason) {
  if (s.comm != nullptr) {
    DeviceGuard guard(s.device);
    ncclCommAbort(s.comm);  // frees the communicator; its result cannot be acted on
    s.comm = nullptr;
  }
  if (s.abort_reason.empty()) s.abort_reason = reason;
  s.launching.reset();
}

/// The NcclError text for any op on an aborted communicator.
std::string aborted_message(const NcclShared& s, const std::string& op) {
  return op + ": the NCCL communicator was aborted after " + s.abort_reason +
         "; its unfinished ops are lost and it accepts no new ones (create a new communicator)";
}

/// Throws (and aborts) when NCCL reports an asynchronous error; returns NCCL's state (ncclSuccess
/// or ncclInProgress). Caller holds the mutex and the communicator is alive.
ncclResult_t async_state_locked(NcclShared& s, const std::string& op) {
  ncclResult_t state = ncclSuccess;
  const ncclResult_t rc = ncclCommGetAsyncError(s.comm, &state);
  if (rc != ncclSuccess) state = rc;
  if (state == ncclSuccess || state == ncclInProgress) return state;
  const std::string text = nccl_error_text(state, s.comm);
  abort_locked(s, "an NCCL error during " + op + ": " + text);
  throw NcclError(op + ": NCCL reported an error on rank " + std::to_string(s.rank) + " of " + std::to_string(s.size) +
                  ": " + text + "; the communicator was aborted");
}

/// One poll of the background launch (caller holds the mutex): records the pending op's event once
/// NCCL enqueued its kernels. True when no launch is pending any more.
bool poll_launch_locked(NcclShared& s, const std::string& op) {
  if (!s.launching) return true;
  if (async_state_locked(s, op) == ncclInProgress) return false;
  DeviceGuard guard(s.device);
  MOEX_COMM_CUDA_CHECK(cudaEventRecord(s.launching->event, s.stream));
  s.launching->recorded = true;
  s.launching.reset();
  return true;
}

std::string timeout_text(const std::string& what, double allowed_s, int rank, int size) {
  std::ostringstream os;
  os << what << " on rank " << rank << " of " << size << " did not complete within " << std::fixed
     << std::setprecision(1) << allowed_s << " s; peers: " << peer_list(rank, size)
     << " (a peer may have crashed, stalled, or issued collectives in a different order); raise MOEX_TIMEOUT_S or "
        "--timeout if the step is legitimately slower";
  return os.str();
}

/// Waits (mutex taken per poll) until NCCL finished launching the pending op, or aborts at
/// `deadline` and throws TimeoutError naming `op`.
void settle_launch(NcclShared& s, Clock::time_point deadline, const std::string& op) {
  const auto start = Clock::now();
  Backoff backoff;
  for (;;) {
    {
      std::lock_guard lock(s.mutex);
      if (s.comm == nullptr) throw NcclError(aborted_message(s, op));
      if (poll_launch_locked(s, op)) return;
      if (Clock::now() >= deadline) {
        const double allowed = std::chrono::duration<double>(deadline - start).count();
        std::string text = timeout_text(op + " (NCCL still launching the previous op in the background)",
                                         std::max(0.0, allowed), s.rank, s.size);
        abort_locked(s, "a timeout: " + text);
        throw TimeoutError(text + "; the NCCL communicator was aborted");
      }
    }
    backoff.pause();
  }
}

/// "0000:01:00.0"-style bus id, host and boot id of this rank's GPU, for the duplicate-GPU check.
struct GpuRecord {
  char host_key[48];  ///< /proc/sys/kernel/random/boot_id (one per machine), else the host name
  char host[64];
  char bus[32];
  char error[112];  ///< non-empty when this rank has no usable CUDA device
};

void copy_text(char* dst, std::size_t capacity, const std::string& text) {
  std::memset(dst, 0, capacity);
  std::memcpy(dst, text.data(), std::min(capacity - 1, text.size()));
}

GpuRecord local_gpu_record() {
  GpuRecord record{};
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "unknown-host");
  copy_text(record.host, sizeof record.host, host);
  std::string key = host;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  if (boot && std::getline(boot, boot_id) && !boot_id.empty()) key = boot_id;
  copy_text(record.host_key, sizeof record.host_key, key);
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0) {
    copy_text(record.error, sizeof record.error,
              rc != cudaSuccess ? std::string("cudaGetDeviceCount: ") + cudaGetErrorString(rc)
                                : std::string("cudaGetDeviceCount reported 0 devices"));
    cudaGetLastError();  // clear the error so that it does not surface in a later call
    return record;
  }
  int device = 0;
  char bus[32] = {};
  rc = cudaGetDevice(&device);
  if (rc == cudaSuccess) rc = cudaDeviceGetPCIBusId(bus, sizeof bus, device);
  if (rc != cudaSuccess) {
    copy_text(record.error, sizeof record.error, std::string("cudaDeviceGetPCIBusId: ") + cudaGetErrorString(rc));
    cudaGetLastError();
    return record;
  }
  copy_text(record.bus, sizeof record.bus, bus);
  return record;
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string out;
  for (int r : ranks) {
    if (!out.empty()) out += ',';
    out += std::to_string(r);
  }
  return out;
}

}  // namespace

namespace detail {

NcclShared::~NcclShared() {
  try {
    DeviceGuard guard(device);
    if (comm != nullptr) {
      // Flush and quiesce, then free; abort instead when that does not finish in time.
      ncclResult_t state = ncclCommFinalize(comm);
      const auto deadline = Clock::now() + finalize_timeout;
      Backoff backoff;
      while (state == ncclInProgress || state == ncclSuccess) {
        if (ncclCommGetAsyncError(comm, &state) != ncclSuccess) break;
        if (state != ncclInProgress || Clock::now() >= deadline) break;
        backoff.pause();
      }
      if (state == ncclSuccess) {
        ncclCommDestroy(comm);
      } else {
        std::fprintf(stderr, "%smoex: warning: NCCL communicator did not finalize cleanly (%s); aborting it\n",
                     rank_prefix().c_str(), ncclGetErrorString(state));
        ncclCommAbort(comm);
      }
      comm = nullptr;
    }
    launching.reset();
    if (scratch != nullptr) cudaFree(scratch);
    if (owns_stream && stream != nullptr) cudaStreamDestroy(stream);
  } catch (...) {
    // Destructors must not throw; a failing device guard leaves the resources to process exit.
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// NcclWork

NcclWork::NcclWork(std::uint64_t sequence, std::string op, std::chrono::milliseconds default_timeout,
                   std::shared_ptr<NcclShared> shared, std::shared_ptr<NcclOpEvent> event)
    : Work(sequence, std::move(op), default_timeout),
      shared_(std::move(shared)),
      event_(std::move(event)),
      posted_at_(Clock::now()),
      timeout_(default_timeout) {}

NcclWork::~NcclWork() {
  if (done_ || timed_out_) return;  // after a timeout the communicator is already aborted
  try {
    Work::wait();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moex: warning: unfinished %s #%llu dropped: %s\n", op().c_str(),
                 static_cast<unsigned long long>(sequence()), e.what());
  } catch (...) {
    std::fprintf(stderr, "%smoex: warning: unfinished %s #%llu dropped: unknown error\n", rank_prefix().c_str(),
                 op().c_str(), static_cast<unsigned long long>(sequence()));
  }
}

bool NcclWork::completed() {
  if (done_) return true;
  std::lock_guard lock(shared_->mutex);
  NcclShared& s = *shared_;
  const std::string name = op() + " #" + std::to_string(sequence());
  try {
    // An abort stops kernels midway, so an op not seen finished before it counts as lost.
    if (s.comm == nullptr) throw NcclError(aborted_message(s, name));
    if (!event_->recorded) {
      if (s.launching == event_) poll_launch_locked(s, name);
      if (!event_->recorded) return false;
    }
    DeviceGuard guard(s.device);
    const cudaError_t rc = cudaEventQuery(event_->event);
    if (rc == cudaSuccess) {
      done_ = true;
    } else if (rc == cudaErrorNotReady) {
      async_state_locked(s, name);  // throws on an asynchronous NCCL error (e.g. a peer failed)
    } else {
      cuda::check(rc, "cudaEventQuery(op event)", __FILE__, __LINE__);
    }
  } catch (const Error&) {
    error_ = std::current_exception();
    done_ = true;
  }
  return done_;
}

void NcclWork::wait(Clock::time_point deadline) {
  Backoff backoff;
  while (!completed()) {
    if (Clock::now() >= deadline) {
      timed_out_ = true;
      const std::string text = timeout_message(deadline);
      {
        std::lock_guard lock(shared_->mutex);
        abort_locked(*shared_, "a timeout: " + text);
      }
      throw TimeoutError(text + "; the NCCL communicator was aborted (its kernels cannot be cancelled otherwise), so "
                                "later ops on it throw NcclError");
    }
    backoff.pause();
  }
  if (error_) std::rethrow_exception(error_);
}

void NcclWork::ensure_recorded(Clock::time_point deadline) {
  {
    std::lock_guard lock(shared_->mutex);
    if (event_->recorded) return;
    if (shared_->comm == nullptr) throw NcclError(aborted_message(*shared_, op() + " #" + std::to_string(sequence())));
  }
  settle_launch(*shared_, deadline, op() + " #" + std::to_string(sequence()));
}

void NcclWork::wait_on_stream(cudaStream_t stream) {
  ensure_recorded(Clock::now() + timeout_);
  DeviceGuard guard(shared_->device);
  MOEX_COMM_CUDA_CHECK(cudaStreamWaitEvent(stream, event_->event, 0));
}

cudaEvent_t NcclWork::event() {
  ensure_recorded(Clock::now() + timeout_);
  return event_->event;
}

std::string NcclWork::timeout_message(Clock::time_point deadline) const {
  const double allowed = std::max(0.0, std::chrono::duration<double>(deadline - posted_at_).count());
  return timeout_text(op() + " #" + std::to_string(sequence()), allowed, shared_->rank, shared_->size);
}

// ---------------------------------------------------------------------------------------------
// NcclCommunicator

namespace {

/// "<name>(<label>)", the op text shown in errors.
std::string op_name(const char* name, const std::string& label) { return std::string(name) + "(" + label + ")"; }

/// Runs the NCCL calls of one op between ncclGroupStart and ncclGroupEnd (caller holds the mutex
/// and the launch of the previous op has settled). Returns the new op's event: recorded now, or
/// left to the background launch. Any NCCL failure aborts the communicator (its peers are already
/// committed to the op) and throws NcclError.
template <typename Calls>
std::shared_ptr<NcclOpEvent> launch_locked(NcclShared& s, const std::string& op, Calls&& calls) {
  DeviceGuard guard(s.device);
  auto event = std::make_shared<NcclOpEvent>();
  MOEX_COMM_CUDA_CHECK(cudaEventCreateWithFlags(&event->event, cudaEventDisableTiming));
  const auto fail = [&](ncclResult_t code, const char* call) {
    const std::string text = nccl_error_text(code, s.comm);
    abort_locked(s, "a failed " + std::string(call) + " in " + op + ": " + text);
    throw NcclError(op + ": " + call + " failed on rank " + std::to_string(s.rank) + ": " + text +
                    "; the communicator was aborted");
  };
  ncclResult_t rc = ncclGroupStart();
  if (rc != ncclSuccess) fail(rc, "ncclGroupStart");
  ncclResult_t first = ncclSuccess;
  const char* first_call = "";
  // Each call returns ncclSuccess (or ncclInProgress on a non-blocking communicator) when queued.
  const auto nccl = [&](ncclResult_t code, const char* call) {
    if (code != ncclSuccess && code != ncclInProgress && first == ncclSuccess) {
      first = code;
      first_call = call;
    }
  };
  cudaError_t cuda_error = cudaSuccess;
  const char* cuda_call = "";
  const auto cuda = [&](cudaError_t code, const char* call) {
    if (code != cudaSuccess && cuda_error == cudaSuccess) {
      cuda_error = code;
      cuda_call = call;
    }
  };
  calls(nccl, cuda);
  rc = ncclGroupEnd();  // always close the group, even after a failed call inside it
  if (first != ncclSuccess) fail(first, first_call);
  if (cuda_error != cudaSuccess) {
    abort_locked(s, "a failed " + std::string(cuda_call) + " in " + op);
    cuda::check(cuda_error, cuda_call, __FILE__, __LINE__);
  }
  if (rc == ncclSuccess) {
    MOEX_COMM_CUDA_CHECK(cudaEventRecord(event->event, s.stream));
    event->recorded = true;
  } else if (rc == ncclInProgress) {
    s.launching = event;  // recorded by poll_launch_locked once NCCL enqueued the kernels
  } else {
    fail(rc, "ncclGroupEnd");
  }
  return event;
}

}  // namespace

NcclCommunicator::NcclCommunicator(MPI_Comm base, Options options) {
  default_timeout_ = options.timeout;
  const auto start = Clock::now();
  const auto deadline = start + options.timeout;
  mpi_ = std::make_unique<MpiCommunicator>(base);
  mpi_->set_default_timeout(options.timeout);
  const int rank = mpi_->rank(), size = mpi_->size();

  if (std::string problem = gpu_sharing_problem(*mpi_); !problem.empty()) {
    throw ConfigError("NcclCommunicator: " + problem +
                      ". Give every rank its own GPU (cudaSetDevice(local rank) or CUDA_VISIBLE_DEVICES) or use "
                      "StagedCommunicator (comm/staged/staged_communicator.h), which stages device buffers through "
                      "pinned host memory over MPI and lets ranks share a GPU");
  }

  shared_ = std::make_shared<NcclShared>();
  shared_->rank = rank;
  shared_->size = size;
  shared_->finalize_timeout = options.timeout;
  MOEX_COMM_CUDA_CHECK(cudaGetDevice(&shared_->device));
  if (options.stream != nullptr) {
    shared_->stream = options.stream;
  } else {
    MOEX_COMM_CUDA_CHECK(cudaStreamCreateWithFlags(&shared_->stream, cudaStreamNonBlocking));
    shared_->owns_stream = true;
  }
  MOEX_COMM_CUDA_CHECK(cudaMalloc(&shared_->scratch, sizeof(std::int32_t)));
  // On the comm stream, so that the first barrier is ordered after it; sums of zeros stay zero.
  MOEX_COMM_CUDA_CHECK(cudaMemsetAsync(shared_->scratch, 0, sizeof(std::int32_t), shared_->stream));

  // Rank 0 creates the id; a leading status byte tells the others whether that worked, so that a
  // failure there is reported everywhere instead of leaving the peers waiting on NCCL init.
  std::array<char, 1 + sizeof(ncclUniqueId)> message{};
  ncclUniqueId id{};
  std::string id_error;
  if (rank == 0) {
    const ncclResult_t rc = ncclGetUniqueId(&id);
    message[0] = rc == ncclSuccess ? 1 : 0;
    if (rc == ncclSuccess) {
      std::memcpy(message.data() + 1, &id, sizeof id);
    } else {
      id_error = nccl_error_text(rc, nullptr);
    }
  }
  mpi_->broadcast(message.data(), static_cast<std::int64_t>(message.size()), DataType::kByte, 0, "nccl unique id")
      ->wait(deadline);
  if (message[0] != 1) {
    throw NcclError("NcclCommunicator: ncclGetUniqueId failed on rank 0" +
                    (id_error.empty() ? std::string(" (see rank 0's error)") : ": " + id_error));
  }
  std::memcpy(&id, message.data() + 1, sizeof id);

  // Non-blocking: init (and later launches) return ncclInProgress while NCCL connects in the
  // background, so every step is polled against a deadline instead of hanging on a missing peer.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t rc = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  if (rc != ncclSuccess && rc != ncclInProgress) {
    const std::string text = nccl_error_text(rc, comm);
    if (comm != nullptr) ncclCommAbort(comm);
    throw NcclError("NcclCommunicator: ncclCommInitRankConfig(rank " + std::to_string(rank) + " of " +
                    std::to_string(size) + ", device " + std::to_string(shared_->device) + ") failed: " + text);
  }
  ncclResult_t state = ncclInProgress;
  Backoff backoff;
  for (;;) {
    rc = ncclCommGetAsyncError(comm, &state);
    if (rc != ncclSuccess) state = rc;
    if (state != ncclInProgress) break;
    if (Clock::now() >= deadline) {
      ncclCommAbort(comm);
      throw TimeoutError(timeout_text("NcclCommunicator: ncclCommInitRankConfig",
                                      std::chrono::duration<double>(deadline - start).count(), rank, size));
    }
    backoff.pause();
  }
  if (state != ncclSuccess) {
    const std::string text = nccl_error_text(state, comm);
    ncclCommAbort(comm);
    throw NcclError("NcclCommunicator: NCCL init of rank " + std::to_string(rank) + " of " + std::to_string(size) +
                    " (device " + std::to_string(shared_->device) + ") failed: " + text);
  }
  shared_->comm = comm;
}

NcclCommunicator::~NcclCommunicator() {
  if (shared_) {
    std::lock_guard lock(shared_->mutex);
    shared_->finalize_timeout = default_timeout_;
  }
  // shared_ finalises NCCL when the last NcclWork referring to it is gone.
}

int NcclCommunicator::device() const { return shared_->device; }

cudaStream_t NcclCommunicator::stream() const { return shared_->stream; }

bool NcclCommunicator::aborted() const {
  std::lock_guard lock(shared_->mutex);
  return shared_->comm == nullptr;
}

void NcclCommunicator::abort(const std::string& reason) {
  std::lock_guard lock(shared_->mutex);
  abort_locked(*shared_, "abort(): " + reason);
}

void NcclCommunicator::consume(Work& work, cudaStream_t stream, Clock::time_point /*deadline*/) {
  auto* w = dynamic_cast<NcclWork*>(&work);  // its own ops' Work: an NcclWork, unless misused
  if (w == nullptr)
    throw InvalidArgument("NcclCommunicator::consume: " + work.op() + " is not an op of an NcclCommunicator");
  w->wait_on_stream(stream);
}

void NcclCommunicator::wait_for_stream(cudaStream_t producer) {
  // NCCL forbids other work on its stream while it still launches an op in the background
  // (ncclGroupEnd returned ncclInProgress): finish that launch first.
  settle_launch(*shared_, Clock::now() + default_timeout_, "wait_for_stream");
  DeviceGuard guard(shared_->device);
  cudaEvent_t event = nullptr;
  MOEX_COMM_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  const cudaError_t recorded = cudaEventRecord(event, producer);
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(shared_->stream, event, 0) : recorded;
  cudaEventDestroy(event);  // safe: the wait already captured the recorded work
  MOEX_COMM_CUDA_CHECK(waited);
}

WorkPtr NcclCommunicator::finish_issue(std::string op, std::shared_ptr<NcclOpEvent> event) {
  return std::make_unique<NcclWork>(next_sequence_++, std::move(op), default_timeout_, shared_, std::move(event));
}

std::string NcclCommunicator::gpu_sharing_problem(MpiCommunicator& comm) {
  const GpuRecord mine = local_gpu_record();
  std::vector<GpuRecord> all(static_cast<std::size_t>(comm.size()));
  comm.allgather(&mine, all.data(), sizeof(GpuRecord), DataType::kByte, "gpu bus ids")->wait();
  std::vector<int> missing;
  std::string first_error;
  std::map<std::pair<std::string, std::string>, std::vector<int>> by_gpu;  // (machine, bus id) -> ranks
  for (int r = 0; r < comm.size(); ++r) {
    const GpuRecord& g = all[static_cast<std::size_t>(r)];
    if (g.error[0] != '\0') {
      missing.push_back(r);
      if (first_error.empty()) first_error = g.error;
      continue;
    }
    by_gpu[{g.host_key, g.bus}].push_back(r);
  }
  if (!missing.empty()) {
    throw CudaError("no CUDA device on rank(s) " + rank_list(missing) + ": " + first_error +
                    "; NcclCommunicator needs one GPU per rank");
  }
  std::string problem;
  int sharing_ranks = 0, shared_devices = 0;
  for (const auto& [gpu, ranks] : by_gpu) {
    if (ranks.size() < 2) continue;
    const GpuRecord& g = all[static_cast<std::size_t>(ranks.front())];
    problem += (problem.empty() ? "" : "; ") + std::string("ranks ") + rank_list(ranks) + " share GPU " + g.bus +
               " on host " + g.host;
    sharing_ranks += static_cast<int>(ranks.size());
    ++shared_devices;
  }
  if (problem.empty()) return problem;
  return problem + "; NCCL needs one GPU per rank; " + std::to_string(sharing_ranks) + " ranks share " +
         std::to_string(shared_devices) + (shared_devices == 1 ? " device" : " devices");
}

// Issue path of every op: validate (no side effects), then under the mutex: refuse on an aborted
// communicator, settle the previous op's background launch, and launch this one.

WorkPtr NcclCommunicator::alltoall(const void* send, void* recv, std::int64_t count, DataType type,
                                   std::string label) {
  std::string op = op_name("alltoall", label);
  const ncclDataType_t dt = nccl_type(type, op);
  require_count(count, op, "count");
  const int n = size(), me = rank();
  require_buffer(send, count * n, op, "send");
  require_buffer(recv, count * n, op, "recv");
  settle_launch(*shared_, Clock::now() + default_timeout_, op);
  std::lock_guard lock(shared_->mutex);
  if (shared_->comm == nullptr) throw NcclError(aborted_message(*shared_, op));
  NcclShared& s = *shared_;
  auto event = launch_locked(s, op, [&](auto&& nccl, auto&& cuda) {
    if (count == 0) return;
    const auto bytes = static_cast<std::size_t>(count) * element_size(type);
    cuda(cudaMemcpyAsync(at_element(recv, count * me, type), at_element(send, count * me, type), bytes,
                         cudaMemcpyDefault, s.stream),
         "cudaMemcpyAsync(own block)");
    for (int p = 0; p < n; ++p) {
      if (p == me) continue;
      nccl(ncclSend(at_element(send, count * p, type), static_cast<std::size_t>(count), dt, p, s.comm, s.stream),
           "ncclSend");
      nccl(ncclRecv(at_element(recv, count * p, type), static_cast<std::size_t>(count), dt, p, s.comm, s.stream),
           "ncclRecv");
    }
  });
  return finish_issue(std::move(op), std::move(event));
}

WorkPtr NcclCommunicator::alltoallv(const AlltoallvArgs& args) {
  std::string op = op_name("alltoallv", args.label);
  const ncclDataType_t dt = nccl_type(args.type, op);
  const int n = size(), me = rank();
  const auto sc = per_peer(args.send_counts, n, op, "send_counts");
  const auto rc = per_peer(args.recv_counts, n, op, "recv_counts");
  const auto sd = args.send_displs.empty() ? packed(sc) : per_peer(args.send_displs, n, op, "send_displs");
  const auto rd = args.recv_displs.empty() ? packed(rc) : per_peer(args.recv_displs, n, op, "recv_displs");
  require_buffer(args.send, extent(sc, sd), op, "send");
  require_buffer(args.recv, extent(rc, rd), op, "recv");
  const auto self = static_cast<std::size_t>(me);
  if (sc[self] != rc[self]) {
    throw InvalidArgument(op + ": send_counts[" + std::to_string(me) + "] = " + std::to_string(sc[self]) +
                          " must equal recv_counts[" + std::to_string(me) + "] = " + std::to_string(rc[self]) +
                          " (this rank's block to itself)");
  }
  settle_launch(*shared_, Clock::now() + default_timeout_, op);
  std::lock_guard lock(shared_->mutex);
  if (shared_->comm == nullptr) throw NcclError(aborted_message(*shared_, op));
  NcclShared& s = *shared_;
  const DataType type = args.type;
  auto event = launch_locked(s, op, [&](auto&& nccl, auto&& cuda) {
    if (sc[self] > 0) {
      cuda(cudaMemcpyAsync(at_element(args.recv, rd[self], type), at_element(args.send, sd[self], type),
                           static_cast<std::size_t>(sc[self]) * element_size(type), cudaMemcpyDefault, s.stream),
           "cudaMemcpyAsync(own block)");
    }
    for (int p = 0; p < n; ++p) {
      const auto q = static_cast<std::size_t>(p);
      if (p == me) continue;
      if (sc[q] > 0)
        nccl(ncclSend(at_element(args.send, sd[q], type), static_cast<std::size_t>(sc[q]), dt, p, s.comm, s.stream),
             "ncclSend");
      if (rc[q] > 0)
        nccl(ncclRecv(at_element(args.recv, rd[q], type), static_cast<std::size_t>(rc[q]), dt, p, s.comm, s.stream),
             "ncclRecv");
    }
  });
  return finish_issue(std::move(op), std::move(event));
}

WorkPtr NcclCommunicator::allreduce(void* data, std::int64_t count, DataType type, std::string label, bool max) {
  std::string op = op_name(max ? "allreduce_max" : "allreduce_sum", label);
  const ncclDataType_t dt = nccl_type(type, op);
  if (type == DataType::kByte)
    throw InvalidArgument(op + ": type byte " + (max ? "has no max" : "cannot be summed") + "; use a numeric DataType");
  require_count(count, op, "count");
  require_buffer(data, count, op, "data");
  settle_launch(*shared_, Clock::now() + default_timeout_, op);
  std::lock_guard lock(shared_->mutex);
  if (shared_->comm == nullptr) throw NcclError(aborted_message(*shared_, op));
  NcclShared& s = *shared_;
  const ncclRedOp_t red = max ? ncclMax : ncclSum;
  auto event = launch_locked(s, op, [&](auto&& nccl, auto&& cuda) {
    if (count > 0)
      nccl(ncclAllReduce(data, data, static_cast<std::size_t>(count), dt, red, s.comm, s.stream), "ncclAllReduce");
  });
  return finish_issue(std::move(op), std::move(event));
}

WorkPtr NcclCommunicator::allreduce_sum(void* data, std::int64_t count, DataType type, std::string label) {
  return allreduce(data, count, type, std::move(label), false);
}

WorkPtr NcclCommunicator::allreduce_max(void* data, std::int64_t count, DataType type, std::string label) {
  return allreduce(data, count, type, std::move(label), true);
}

WorkPtr NcclCommunicator::allgather(const void* send, void* recv, std::int64_t count, DataType type,
                                    std::string label) {
  std::string op = op_name("allgather", label);
  const ncclDataType_t dt = nccl_type(type, op);
  require_count(count, op, "count");
  require_buffer(send, count, op, "send");
  require_buffer(recv, count * size(), op, "recv");
  settle_launch(*shared_, Clock::now() + default_timeout_, op);
  std::lock_guard lock(shared_->mutex);
  if (shared_->comm == nullptr) throw NcclError(aborted_message(*shared_, op));
  NcclShared& s = *shared_;
  auto event = launch_locked(s, op, [&](auto&& nccl, auto&& cuda) {
    if (count > 0)
      nccl(ncclAllGather(send, recv, static_cast<std::size_t>(count), dt, s.comm, s.stream), "ncclAllGather");
  });
  return finish_issue(std::move(op), std::move(event));
}

WorkPtr NcclCommunicator::gatherv(const void* send, std::int64_t send_count, void* recv,
                                  std::span<const std::int64_t> recv_counts, DataType type, int root,
                                  std::string label) {
  std::string op = op_name("gatherv", label);
  const ncclDataType_t dt = nccl_type(type, op);
  const int n = size(), me = rank();
  require_root(root, n, op);
  require_count(send_count, op, "send_count");
  require_buffer(send, send_count, op, "send");
  std::vector<std::int64_t> counts, displs;
  if (me == root) {
    counts = per_peer(recv_counts, n, op, "recv_counts");
    const std::int64_t own = counts[static_cast<std::size_t>(root)];
    if (own != send_count) {
      throw InvalidArgument(op + ": recv_counts[root " + std::to_string(root) + "] = " + std::to_string(own) +
                            " must equal the root's send_count = " + std::to_string(send_count));
    }
    displs = packed(counts);
    require_buffer(recv, extent(counts, displs), op, "recv");
  }
  settle_launch(*shared_, Clock::now() + default_timeout_, op);
  std::lock_guard lock(shared_->mutex);
  if (shared_->comm == nullptr) throw NcclError(aborted_message(*shared_, op));
  NcclShared& s = *shared_;
  auto event = launch_locked(s, op, [&](auto&& nccl, auto&& cuda) {
    if (me != root) {
      if (send_count > 0)
        nccl(ncclSend(send, static_cast<std::size_t>(send_count), dt, root, s.comm, s.stream), "ncclSend");
      return;
    }
    for (int p = 0; p < n; ++p) {
      const auto q = static_cast<std::size_t>(p);
      if (counts[q] == 0) continue;
      if (p == me) {
        cuda(cudaMemcpyAsync(at_element(recv, displs[q], type), send,
                             static_cast<std::size_t>(counts[q]) * element_size(type), cudaMemcpyDefault, s.stream),
             "cudaMemcpyAsync(root's own block)");
      } else {
        nccl(ncclRecv(at_element(recv, displs[q], type), static_cast<std::size_t>(counts[q]), dt, p, s.comm, s.stream),
             "ncclRecv");
      }
    }
  });
  return finish_issue(std::move(op), std::move(event));
}

WorkPtr NcclCommunicator::broadcast(void* data, std::int64_t count, DataType type, int root, std::string label) {
  std::string op = op_name("broadcast", label);
  const ncclDataType_t dt = nccl_type(type, op);
  require_root(root, size(), op);
  require_count(count, op, "count");
  require_buffer(data, count, op, "data");
  settle_launch(*shared_, Clock::now() + default_timeout_, op);
  std::lock_guard lock(shared_->mutex);
  if (shared_->comm == nullptr) throw NcclError(aborted_message(*shared_, op));
  NcclShared& s = *shared_;
  auto event = launch_locked(s, op, [&](auto&& nccl, auto&& cuda) {
    if (count > 0)
      nccl(ncclBroadcast(data, data, static_cast<std::size_t>(count), dt, root, s.comm, s.stream), "ncclBroadcast");
  });
  return finish_issue(std::move(op), std::move(event));
}

WorkPtr NcclCommunicator::barrier(std::string label) {
  std::string op = op_name("barrier", label);
  settle_launch(*shared_, Clock::now() + default_timeout_, op);
  std::lock_guard lock(shared_->mutex);
  if (shared_->comm == nullptr) throw NcclError(aborted_message(*shared_, op));
  NcclShared& s = *shared_;
  auto event = launch_locked(s, op, [&](auto&& nccl, auto&& cuda) {
    nccl(ncclAllReduce(s.scratch, s.scratch, 1, ncclInt32, ncclSum, s.comm, s.stream), "ncclAllReduce");
  });
  return finish_issue(std::move(op), std::move(event));
}

}  // namespace moex::comm
