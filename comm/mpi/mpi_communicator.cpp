// MpiCommunicator: nonblocking MPI collectives, each waited on against a deadline.
#include "comm/mpi/mpi_communicator.h"

#include <climits>
#include <cstdio>
#include <sstream>
#include <thread>

#include "comm/mpi/mpi_check.h"

namespace moex::comm {
namespace {

MPI_Datatype mpi_type(DataType t) {
  switch (t) {
    case DataType::kFloat32: return MPI_FLOAT;
    case DataType::kFloat64: return MPI_DOUBLE;
    case DataType::kInt32: return MPI_INT32_T;
    case DataType::kInt64: return MPI_INT64_T;
    case DataType::kByte: return MPI_BYTE;
  }
  throw InvalidArgument("MPI: unknown DataType " + std::to_string(static_cast<int>(t)));
}

int to_int(std::int64_t v, const std::string& op, const char* what) {
  if (v < 0) throw InvalidArgument(op + ": " + what + " = " + std::to_string(v) + " must be >= 0");
  if (v > INT_MAX)
    throw InvalidArgument(op + ": " + what + " = " + std::to_string(v) + " exceeds MPI's int range (2^31 - 1)");
  return static_cast<int>(v);
}

/// A posted MPI request plus the count arrays it reads until it completes.
class MpiWork final : public Work {
 public:
  MpiWork(std::uint64_t seq, std::string op, std::chrono::milliseconds timeout, int rank, int size)
      : Work(seq, std::move(op), timeout), rank_(rank), size_(size) {}
  ~MpiWork() override {
    if (request_ == MPI_REQUEST_NULL) return;
    try {
      Work::wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "moex: warning: unfinished %s abandoned: %s\n", op().c_str(), e.what());
    }
  }
  bool completed() override {
    if (request_ == MPI_REQUEST_NULL) return true;
    int done = 0;
    MOEX_MPI_CHECK(MPI_Test(&request_, &done, MPI_STATUS_IGNORE));
    return done != 0;
  }
  void wait(Clock::time_point deadline) override {
    const auto start = Clock::now();
    auto pause = std::chrono::microseconds(1);
    for (int polls = 0; !completed(); ++polls) {
      if (Clock::now() >= deadline) {
        const double waited = std::chrono::duration<double>(Clock::now() - start).count();
        std::ostringstream os;
        os << op() << " #" << sequence() << " on rank " << rank_ << " of " << size_ << " did not complete within "
           << waited << " s; peers:";
        for (int p = 0; p < size_; ++p)
          if (p != rank_) os << " " << p;
        os << " (a peer may have crashed or stalled, or ranks issued collectives in a different order); "
              "raise MOEX_TIMEOUT_S or --timeout if the step is legitimately slower";
        request_ = MPI_REQUEST_NULL;  // a collective cannot be cancelled; the job is expected to abort
        throw TimeoutError(os.str());
      }
      // Spin briefly for low latency, then back off so a waiting rank leaves the core to others.
      if (polls > 64) {
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::microseconds(1000));
      }
    }
  }
  MPI_Request* request() { return &request_; }
  std::vector<int> counts_a, displs_a, counts_b, displs_b;

 private:
  MPI_Request request_ = MPI_REQUEST_NULL;
  int rank_, size_;
};

void prefix_sums(const std::vector<int>& counts, std::vector<int>& displs, const std::string& op) {
  displs.resize(counts.size());
  std::int64_t at = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    displs[i] = to_int(at, op, "displacement");
    at += counts[i];
  }
  to_int(at, op, "total count");
}

std::vector<int> checked_counts(std::span<const std::int64_t> counts, int size, const std::string& op,
                                const char* what) {
  if (static_cast<int>(counts.size()) != size)
    throw InvalidArgument(op + ": " + what + " has " + std::to_string(counts.size()) + " entries; expected one per rank (" +
                          std::to_string(size) + ")");
  std::vector<int> out(counts.size());
  for (std::size_t i = 0; i < counts.size(); ++i) out[i] = to_int(counts[i], op, what);
  return out;
}

void require_buffer(const void* p, std::int64_t count, const std::string& op, const char* what) {
  if (!p && count > 0) throw InvalidArgument(op + ": " + what + " is null but " + std::to_string(count) + " elements are to be moved");
}
}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv, int requested) {
  int initialized = 0;
  MOEX_MPI_CHECK(MPI_Initialized(&initialized));
  if (!initialized) {
    MOEX_MPI_CHECK(MPI_Init_thread(argc, argv, requested, &provided_));
    owns_ = true;
  } else {
    MOEX_MPI_CHECK(MPI_Query_thread(&provided_));
  }
  MOEX_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_ && !finalized) MPI_Finalize();
}

MpiCommunicator::MpiCommunicator(MPI_Comm base) {
  MOEX_MPI_CHECK(MPI_Comm_dup(base, &comm_));
  MOEX_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MOEX_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MOEX_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  int world_rank = 0;
  MOEX_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank));
  set_process_rank(world_rank);
  default_timeout_ = timeout_from_env(default_timeout_);
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

#define MOEX_NEW_WORK(name) \
  auto work = std::make_unique<MpiWork>(next_sequence_++, std::string(name) + "(" + label + ")", default_timeout_, rank_, size_)

WorkPtr MpiCommunicator::alltoall(const void* send, void* recv, std::int64_t count, DataType type, std::string label) {
  const std::string op = "alltoall(" + label + ")";
  const int n = to_int(count, op, "count");
  require_buffer(send, count * size_, op, "send");
  require_buffer(recv, count * size_, op, "recv");
  MOEX_NEW_WORK("alltoall");
  MOEX_MPI_CHECK(MPI_Ialltoall(send, n, mpi_type(type), recv, n, mpi_type(type), comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::alltoallv(const AlltoallvArgs& a) {
  const std::string& label = a.label;
  const std::string op = "alltoallv(" + label + ")";
  std::vector<int> sc = checked_counts(a.send_counts, size_, op, "send_counts");
  std::vector<int> rc = checked_counts(a.recv_counts, size_, op, "recv_counts");
  std::int64_t ts = 0, tr = 0;
  for (int c : sc) ts += c;
  for (int c : rc) tr += c;
  require_buffer(a.send, ts, op, "send");
  require_buffer(a.recv, tr, op, "recv");
  MOEX_NEW_WORK("alltoallv");
  work->counts_a = std::move(sc);
  work->counts_b = std::move(rc);
  prefix_sums(work->counts_a, work->displs_a, op);
  prefix_sums(work->counts_b, work->displs_b, op);
  MOEX_MPI_CHECK(MPI_Ialltoallv(a.send, work->counts_a.data(), work->displs_a.data(), mpi_type(a.type), a.recv,
                                work->counts_b.data(), work->displs_b.data(), mpi_type(a.type), comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::allreduce_sum(void* data, std::int64_t count, DataType type, std::string label) {
  const std::string op = "allreduce_sum(" + label + ")";
  if (type == DataType::kByte) throw InvalidArgument(op + ": bytes cannot be summed; use a numeric DataType");
  const int n = to_int(count, op, "count");
  require_buffer(data, count, op, "data");
  MOEX_NEW_WORK("allreduce_sum");
  MOEX_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, n, mpi_type(type), MPI_SUM, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::allreduce_max(void* data, std::int64_t count, DataType type, std::string label) {
  const std::string op = "allreduce_max(" + label + ")";
  if (type == DataType::kByte) throw InvalidArgument(op + ": bytes have no max; use a numeric DataType");
  const int n = to_int(count, op, "count");
  require_buffer(data, count, op, "data");
  MOEX_NEW_WORK("allreduce_max");
  MOEX_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, n, mpi_type(type), MPI_MAX, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::allgather(const void* send, void* recv, std::int64_t count, DataType type, std::string label) {
  const std::string op = "allgather(" + label + ")";
  const int n = to_int(count, op, "count");
  require_buffer(send, count, op, "send");
  require_buffer(recv, count * size_, op, "recv");
  MOEX_NEW_WORK("allgather");
  MOEX_MPI_CHECK(MPI_Iallgather(send, n, mpi_type(type), recv, n, mpi_type(type), comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::gatherv(const void* send, std::int64_t send_count, void* recv,
                                 std::span<const std::int64_t> recv_counts, DataType type, int root, std::string label) {
  const std::string op = "gatherv(" + label + ")";
  if (root < 0 || root >= size_)
    throw InvalidArgument(op + ": root = " + std::to_string(root) + " is not a rank of this communicator (0.." +
                          std::to_string(size_ - 1) + ")");
  const int n = to_int(send_count, op, "send_count");
  require_buffer(send, send_count, op, "send");
  MOEX_NEW_WORK("gatherv");
  if (rank_ == root) {
    work->counts_a = checked_counts(recv_counts, size_, op, "recv_counts");
    if (work->counts_a[static_cast<std::size_t>(rank_)] != n)
      throw InvalidArgument(op + ": root sends " + std::to_string(n) + " elements but recv_counts[root] = " +
                            std::to_string(work->counts_a[static_cast<std::size_t>(rank_)]));
    prefix_sums(work->counts_a, work->displs_a, op);
    std::int64_t total = 0;
    for (int c : work->counts_a) total += c;
    require_buffer(recv, total, op, "recv");
  }
  MOEX_MPI_CHECK(MPI_Igatherv(send, n, mpi_type(type), recv, rank_ == root ? work->counts_a.data() : nullptr,
                              rank_ == root ? work->displs_a.data() : nullptr, mpi_type(type), root, comm_,
                              work->request()));
  return work;
}

WorkPtr MpiCommunicator::broadcast(void* data, std::int64_t count, DataType type, int root, std::string label) {
  const std::string op = "broadcast(" + label + ")";
  if (root < 0 || root >= size_)
    throw InvalidArgument(op + ": root = " + std::to_string(root) + " is not a rank of this communicator (0.." +
                          std::to_string(size_ - 1) + ")");
  const int n = to_int(count, op, "count");
  require_buffer(data, count, op, "data");
  MOEX_NEW_WORK("broadcast");
  MOEX_MPI_CHECK(MPI_Ibcast(data, n, mpi_type(type), root, comm_, work->request()));
  return work;
}

WorkPtr MpiCommunicator::barrier(std::string label) {
  MOEX_NEW_WORK("barrier");
  MOEX_MPI_CHECK(MPI_Ibarrier(comm_, work->request()));
  return work;
}

}  // namespace moex::comm
