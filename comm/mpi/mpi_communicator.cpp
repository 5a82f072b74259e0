// MpiCommunicator: nonblocking MPI collectives, each polled against a deadline.
#include "comm/mpi/mpi_communicator.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <exception>
#include <iomanip>
#include <memory>
#include <sstream>
#include <cstdlib>
#include <utility>

#include "comm/mpi/mpi_check.h"
#include "comm/mpi/peer_status.h"
#include "comm/op_checks.h"

namespace moex::comm {
namespace {

using op_checks::peer_list;
using op_checks::require_buffer;
using op_checks::require_root;

/// The MPI datatype of `type`; InvalidArgument for a value outside the enum.
MPI_Datatype mpi_type(DataType type, const std::string& op) {
  switch (type) {
    case DataType::kFloat32: return MPI_FLOAT;
    case DataType::kFloat64: return MPI_DOUBLE;
    case DataType::kInt32: return MPI_INT32_T;
    case DataType::kInt64: return MPI_INT64_T;
    case DataType::kByte: return MPI_BYTE;
  }
  throw InvalidArgument(op + ": DataType " + std::to_string(static_cast<int>(type)) +
                        " is not one of float32, float64, int32, int64, byte");
}

/// `value` as the int MPI takes; InvalidArgument when negative or above INT_MAX.
int to_mpi_int(std::int64_t value, const std::string& op, const std::string& what) {
  if (value < 0) throw InvalidArgument(op + ": " + what + " = " + std::to_string(value) + " must be >= 0");
  if (value > INT_MAX) {
    throw InvalidArgument(op + ": " + what + " = " + std::to_string(value) + " exceeds INT_MAX (" +
                          std::to_string(INT_MAX) + "), the largest count or displacement MPI accepts");
  }
  return static_cast<int>(value);
}

/// Per-peer counts as ints, one per rank of a communicator of `size` ranks.
std::vector<int> per_peer_counts(std::span<const std::int64_t> counts, int size, const std::string& op,
                                 const char* what) {
  if (counts.size() != static_cast<std::size_t>(size)) {
    throw InvalidArgument(op + ": " + what + " has " + std::to_string(counts.size()) +
                          " entries; expected one per rank (" + std::to_string(size) + ")");
  }
  std::vector<int> out(counts.size());
  for (std::size_t p = 0; p < counts.size(); ++p)
    out[p] = to_mpi_int(counts[p], op, std::string(what) + "[" + std::to_string(p) + "]");
  return out;
}

/// Displacements of blocks packed back to back: the exclusive prefix sums of `counts`.
std::vector<int> packed_displacements(const std::vector<int>& counts, const std::string& op, const char* what) {
  std::vector<int> displs(counts.size());
  std::int64_t at = 0;
  for (std::size_t p = 0; p < counts.size(); ++p) {
    displs[p] = to_mpi_int(at, op, std::string("displacement of ") + what + "[" + std::to_string(p) + "]");
    at += counts[p];
  }
  return displs;
}

std::int64_t total(const std::vector<int>& counts) {
  std::int64_t sum = 0;
  for (int c : counts) sum += c;
  return sum;
}

/// Elements a buffer must span: the end of the farthest non-empty block. Negative displacements
/// are rejected.
std::int64_t extent(const std::vector<int>& counts, const std::vector<int>& displs, const std::string& op,
                    const char* what) {
  std::int64_t end = 0;
  for (std::size_t p = 0; p < counts.size(); ++p) {
    if (displs[p] < 0)
      throw InvalidArgument(op + ": " + what + " displacement [" + std::to_string(p) + "] = " +
                            std::to_string(displs[p]) + " must be >= 0");
    if (counts[p] > 0) end = std::max<std::int64_t>(end, std::int64_t{displs[p]} + counts[p]);
  }
  return end;
}




/// One posted MPI request plus the count and displacement arrays MPI reads until it completes.
class MpiWork final : public Work {
 public:
  /// Arrays a v-collective hands to MPI by pointer; empty for the others.
  struct Arrays {
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
  };

  /// `status` (may be null) is told of the op and asked where the peers are when it times out.
  MpiWork(std::uint64_t sequence, std::string op, std::chrono::milliseconds default_timeout, int rank, int size,
          Arrays arrays, std::shared_ptr<PeerStatus> status = nullptr)
      : Work(sequence, std::move(op), default_timeout),
        rank_(rank),
        size_(size),
        posted_at_(Clock::now()),
        arrays_(std::move(arrays)),
        status_(std::move(status)) {
    if (status_) status_->posted(this->sequence(), this->op());
  }

  MpiWork(const MpiWork&) = delete;
  MpiWork& operator=(const MpiWork&) = delete;

  ~MpiWork() override {
    if (done_) return;
    try {
      if (timed_out_) {
        // The caller already saw the TimeoutError; waiting the full timeout again would only delay
        // the abort. A pending collective cannot be freed or cancelled, so it is left to MPI.
        if (!completed()) {
          std::fprintf(stderr, "%smoex: warning: %s #%llu abandoned after a timeout; its request stays pending\n",
                       rank_prefix().c_str(), op().c_str(), static_cast<unsigned long long>(sequence()));
        }
        return;
      }
      Work::wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "moex: warning: unfinished %s #%llu dropped: %s\n", op().c_str(),
                   static_cast<unsigned long long>(sequence()), e.what());
    } catch (...) {
      std::fprintf(stderr, "%smoex: warning: unfinished %s #%llu dropped: unknown error\n", rank_prefix().c_str(),
                   op().c_str(), static_cast<unsigned long long>(sequence()));
    }
  }

  /// The request MPI fills in when the op is posted.
  MPI_Request* request() { return &request_; }
  const Arrays& arrays() const { return arrays_; }

  bool completed() override {
    if (done_) return true;
    PeerStatus::serve_all();  // a rank that polls answers the others' "where are you?"
    int flag = 0;
    const int rc = MPI_Test(&request_, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      // An op that failed has finished too; wait() reports the failure.
      error_ = detail::mpi_failure_message(rc, "MPI_Test(&request_, &flag, MPI_STATUS_IGNORE)", __FILE__, __LINE__);
      error_ += " (while completing " + op() + " #" + std::to_string(sequence()) + ")";
      request_ = MPI_REQUEST_NULL;
      done_ = true;
    } else if (flag != 0) {
      done_ = true;
    }
    return done_;
  }

  void wait(Clock::time_point deadline) override {
    if (status_ && !done_) status_->waiting(sequence(), true);
    struct Done {
      PeerStatus* s;
      std::uint64_t seq;
      ~Done() {
        if (s) s->waiting(seq, false);
      }
    } done_waiting{done_ ? nullptr : status_.get(), sequence()};
    op_checks::Backoff backoff;
    while (!completed()) {
      if (Clock::now() >= deadline) {
        timed_out_ = true;
        throw TimeoutError(timeout_message(deadline));
      }
      backoff.pause();
    }
    if (!error_.empty()) throw MpiError(error_);
  }

 private:
  std::string timeout_message(Clock::time_point deadline) const {
    const double allowed = std::max(0.0, std::chrono::duration<double>(deadline - posted_at_).count());
    std::ostringstream os;
    os << op() << " #" << sequence() << " on rank " << rank_ << " of " << size_ << " did not complete within "
       << std::fixed << std::setprecision(1) << allowed << " s; ";
    // Ask the peers where they are (a bounded wait), unless there is no one to ask.
    const std::string where =
        status_ ? status_->report(sequence(), op(),
                                  std::clamp(default_timeout() / 10, std::chrono::milliseconds(200),
                                             std::chrono::milliseconds(2000)))
                : std::string();
    if (!where.empty()) {
      os << where;
    } else {
      os << "peers: " << peer_list(rank_, size_)
         << " (a peer may have crashed, stalled, or issued collectives in a different order)";
    }
    os << "; raise MOEX_TIMEOUT_S or --timeout if the step is legitimately slower";
    return os.str();
  }

  MPI_Request request_ = MPI_REQUEST_NULL;
  int rank_;
  int size_;
  Clock::time_point posted_at_;
  Arrays arrays_;
  std::shared_ptr<PeerStatus> status_;
  bool done_ = false;
  bool timed_out_ = false;
  std::string error_;
};

/// "<name>(<label>)", the op text shown in errors.
std::string op_name(const char* name, const std::string& label) { return std::string(name) + "(" + label + ")"; }

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv, int requested) {
  int initialized = 0;
  MOEX_MPI_CHECK(MPI_Initialized(&initialized));
  if (initialized) {
    int finalized = 0;
    MOEX_MPI_CHECK(MPI_Finalized(&finalized));
    if (finalized) throw MpiError("MpiRuntime: MPI was already finalized in this process and cannot be restarted");
    MOEX_MPI_CHECK(MPI_Query_thread(&provided_));
  } else {
    MOEX_MPI_CHECK(MPI_Init_thread(argc, argv, requested, &provided_));
    owns_ = true;
  }
  MOEX_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
}

MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  int finalized = 0;
  if (MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Finalize();
}

MpiCommunicator::MpiCommunicator(MPI_Comm base, std::chrono::milliseconds timeout) {
  default_timeout_ = timeout.count() > 0 ? timeout : timeout_from_env(default_timeout_);
  int base_rank = 0, base_size = 1;
  MOEX_MPI_CHECK(MPI_Comm_rank(base, &base_rank));
  MOEX_MPI_CHECK(MPI_Comm_size(base, &base_size));
  {
    // The duplication is a collective over `base`: nonblocking, so that a rank that never joins
    // becomes a TimeoutError here. On a timeout the pending request is left to MPI and comm_ stays
    // null; the handle MPI writes when it completes later lives on the heap and is left behind.
    auto dup = std::make_unique<MPI_Comm>(MPI_COMM_NULL);
    MpiWork work(0, "communicator duplication (MPI_Comm_idup)", default_timeout_, base_rank, base_size, {});
    MOEX_MPI_CHECK(MPI_Comm_idup(base, dup.get(), work.request()));
    try {
      work.wait(Clock::now() + default_timeout_);
    } catch (const TimeoutError&) {
      static_cast<void>(dup.release());  // still MPI's target
      throw;
    }
    comm_ = *dup;
  }
  try {
    MOEX_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    MOEX_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MOEX_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    MOEX_MPI_CHECK(MPI_Query_thread(&thread_level_));
    int world_rank = 0;
    MOEX_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank));
    set_process_rank(world_rank);
    if (size_ > 1) status_ = std::make_shared<PeerStatus>(comm_, rank_, size_);
  } catch (...) {
    MPI_Comm_free(&comm_);
    throw;
  }
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ == MPI_COMM_NULL) return;
  int finalized = 0;
  if (status_) status_->close();  // Works left behind may still hold it
  if (MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Comm_free(&comm_);
}

WorkPtr MpiCommunicator::alltoall(const void* send, void* recv, std::int64_t count, DataType type, std::string label) {
  std::string op = op_name("alltoall", label);
  const MPI_Datatype dt = mpi_type(type, op);
  const int n = to_mpi_int(count, op, "count");
  require_buffer(send, count * size_, op, "send");
  require_buffer(recv, count * size_, op, "recv");
  auto work = std::make_unique<MpiWork>(next_sequence_++, std::move(op), default_timeout_, rank_, size_,
                                        MpiWork::Arrays{}, status_);
  MOEX_MPI_CHECK(MPI_Ialltoall(send, n, dt, recv, n, dt, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::alltoallv(const AlltoallvArgs& args) {
  std::string op = op_name("alltoallv", args.label);
  const MPI_Datatype dt = mpi_type(args.type, op);
  MpiWork::Arrays arrays;
  arrays.send_counts = per_peer_counts(args.send_counts, size_, op, "send_counts");
  arrays.recv_counts = per_peer_counts(args.recv_counts, size_, op, "recv_counts");
  arrays.send_displs = args.send_displs.empty() ? packed_displacements(arrays.send_counts, op, "send_counts")
                                                : per_peer_counts(args.send_displs, size_, op, "send_displs");
  arrays.recv_displs = args.recv_displs.empty() ? packed_displacements(arrays.recv_counts, op, "recv_counts")
                                                : per_peer_counts(args.recv_displs, size_, op, "recv_displs");
  require_buffer(args.send, extent(arrays.send_counts, arrays.send_displs, op, "send"), op, "send");
  require_buffer(args.recv, extent(arrays.recv_counts, arrays.recv_displs, op, "recv"), op, "recv");
  auto work =
      std::make_unique<MpiWork>(next_sequence_++, std::move(op), default_timeout_, rank_, size_, std::move(arrays),
                                status_);
  const MpiWork::Arrays& a = work->arrays();
  MOEX_MPI_CHECK(MPI_Ialltoallv(args.send, a.send_counts.data(), a.send_displs.data(), dt, args.recv,
                                a.recv_counts.data(), a.recv_displs.data(), dt, comm_, work->request()));
  return work;
}

std::vector<int> MpiCommunicator::node_ids() {
  std::vector<int> ids(static_cast<std::size_t>(size_));
  if (const char* env = std::getenv("MOEX_RANKS_PER_NODE"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long r = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || r < 1)
      throw ConfigError(std::string("MOEX_RANKS_PER_NODE = '") + env + "': expected a whole number of ranks >= 1");
    for (int p = 0; p < size_; ++p) ids[static_cast<std::size_t>(p)] = p / static_cast<int>(r);
    return ids;
  }
  // Ranks that can share memory form one node; its id is the lowest rank on it. MPI has no
  // nonblocking MPI_Comm_split_type, so every rank first meets the others in a barrier with a
  // deadline: once all are there, the split cannot wait for an absent rank.
  barrier("node detection: every rank arrives")->wait();
  MPI_Comm node = MPI_COMM_NULL;
  MOEX_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
  int node_rank = 0, node_size = 1;
  MPI_Comm_rank(node, &node_rank);
  MPI_Comm_size(node, &node_size);
  // On the heap: after a timeout the pending reduction may still write it, so it is left behind then.
  auto leader = std::make_unique<int>(rank_);
  std::exception_ptr failure;
  try {
    MpiWork work(0, "node detection: lowest rank on the node (allreduce_min)", default_timeout_, node_rank, node_size,
                 {});
    MOEX_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, leader.get(), 1, MPI_INT, MPI_MIN, node, work.request()));
    try {
      work.wait(Clock::now() + default_timeout_);
    } catch (const TimeoutError&) {
      static_cast<void>(leader.release());
      throw;
    }
  } catch (...) {
    failure = std::current_exception();
  }
  MPI_Comm_free(&node);
  if (failure) std::rethrow_exception(failure);
  allgather(leader.get(), ids.data(), 1, DataType::kInt32, "node ids")->wait();
  return ids;
}

WorkPtr MpiCommunicator::allreduce_sum(void* data, std::int64_t count, DataType type, std::string label) {
  std::string op = op_name("allreduce_sum", label);
  const MPI_Datatype dt = mpi_type(type, op);
  if (type == DataType::kByte) throw InvalidArgument(op + ": type byte cannot be summed; use a numeric DataType");
  const int n = to_mpi_int(count, op, "count");
  require_buffer(data, count, op, "data");
  auto work = std::make_unique<MpiWork>(next_sequence_++, std::move(op), default_timeout_, rank_, size_,
                                        MpiWork::Arrays{}, status_);
  MOEX_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, n, dt, MPI_SUM, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::allreduce_max(void* data, std::int64_t count, DataType type, std::string label) {
  std::string op = op_name("allreduce_max", label);
  const MPI_Datatype dt = mpi_type(type, op);
  if (type == DataType::kByte) throw InvalidArgument(op + ": type byte has no max; use a numeric DataType");
  const int n = to_mpi_int(count, op, "count");
  require_buffer(data, count, op, "data");
  auto work = std::make_unique<MpiWork>(next_sequence_++, std::move(op), default_timeout_, rank_, size_,
                                        MpiWork::Arrays{}, status_);
  MOEX_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, n, dt, MPI_MAX, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::allgather(const void* send, void* recv, std::int64_t count, DataType type,
                                   std::string label) {
  std::string op = op_name("allgather", label);
  const MPI_Datatype dt = mpi_type(type, op);
  const int n = to_mpi_int(count, op, "count");
  require_buffer(send, count, op, "send");
  require_buffer(recv, count * size_, op, "recv");
  auto work = std::make_unique<MpiWork>(next_sequence_++, std::move(op), default_timeout_, rank_, size_,
                                        MpiWork::Arrays{}, status_);
  MOEX_MPI_CHECK(MPI_Iallgather(send, n, dt, recv, n, dt, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::gatherv(const void* send, std::int64_t send_count, void* recv,
                                 std::span<const std::int64_t> recv_counts, DataType type, int root,
                                 std::string label) {
  std::string op = op_name("gatherv", label);
  const MPI_Datatype dt = mpi_type(type, op);
  require_root(root, size_, op);
  const int n = to_mpi_int(send_count, op, "send_count");
  require_buffer(send, send_count, op, "send");
  MpiWork::Arrays arrays;
  if (rank_ == root) {
    arrays.recv_counts = per_peer_counts(recv_counts, size_, op, "recv_counts");
    const int own = arrays.recv_counts[static_cast<std::size_t>(root)];
    if (own != n) {
      throw InvalidArgument(op + ": recv_counts[root " + std::to_string(root) + "] = " + std::to_string(own) +
                            " must equal the root's send_count = " + std::to_string(n));
    }
    arrays.recv_displs = packed_displacements(arrays.recv_counts, op, "recv_counts");
    require_buffer(recv, total(arrays.recv_counts), op, "recv");
  }
  auto work =
      std::make_unique<MpiWork>(next_sequence_++, std::move(op), default_timeout_, rank_, size_, std::move(arrays),
                                status_);
  const MpiWork::Arrays& a = work->arrays();
  const bool is_root = rank_ == root;
  MOEX_MPI_CHECK(MPI_Igatherv(send, n, dt, recv, is_root ? a.recv_counts.data() : nullptr,
                              is_root ? a.recv_displs.data() : nullptr, dt, root, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::broadcast(void* data, std::int64_t count, DataType type, int root, std::string label) {
  std::string op = op_name("broadcast", label);
  const MPI_Datatype dt = mpi_type(type, op);
  require_root(root, size_, op);
  const int n = to_mpi_int(count, op, "count");
  require_buffer(data, count, op, "data");
  auto work = std::make_unique<MpiWork>(next_sequence_++, std::move(op), default_timeout_, rank_, size_,
                                        MpiWork::Arrays{}, status_);
  MOEX_MPI_CHECK(MPI_Ibcast(data, n, dt, root, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::barrier(std::string label) {
  auto work = std::make_unique<MpiWork>(next_sequence_++, op_name("barrier", label), default_timeout_, rank_, size_,
                                        MpiWork::Arrays{}, status_);
  MOEX_MPI_CHECK(MPI_Ibarrier(comm_, work->request()));
  return work;
}

}  // namespace moex::comm
