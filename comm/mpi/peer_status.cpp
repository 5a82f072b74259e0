// PeerStatus: where the other ranks are when a collective times out (see peer_status.h).
#include "comm/mpi/peer_status.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iomanip>
#include <sstream>
#include <thread>

namespace moex::comm {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kQueryTag = 7301;
constexpr int kReplyTag = 7302;
constexpr std::size_t kNames = 32;

/// Every live PeerStatus of the process, so that any wait loop answers queries about any communicator.
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::vector<PeerStatus*>& registry() {
  static std::vector<PeerStatus*> r;
  return r;
}

/// Every wait in progress in the process, on any communicator: a rank that waits on another
/// communicator says so (the test of a stalled peer often finds it there).
struct ProcessWait {
  const PeerStatus* board;
  std::uint64_t sequence;
  std::string op;
  std::chrono::steady_clock::time_point since;
};
std::mutex& waits_mutex() {
  static std::mutex m;
  return m;
}
std::vector<ProcessWait>& process_waits() {
  static std::vector<ProcessWait> w;
  return w;
}

void copy_name(char (&to)[96], const std::string& from) {
  const std::size_t n = std::min(from.size(), sizeof(to) - 1);
  std::memcpy(to, from.data(), n);
  to[n] = '\0';
}

/// A name from the wire: bounded and printable, whatever arrived.
std::string read_name(const char (&from)[96]) {
  std::string s(from, strnlen(from, sizeof(from)));
  for (char& c : s)
    if (c < 0x20 || c > 0x7e) c = '?';
  return s;
}

}  // namespace

PeerStatus::PeerStatus(MPI_Comm comm, int rank, int size)
    : comm_(comm),
      rank_(rank),
      size_(size),
      queries_out_(static_cast<std::size_t>(size)),
      replies_in_(static_cast<std::size_t>(size)) {
  if (MPI_Irecv(&query_in_, 1, MPI_UINT64_T, MPI_ANY_SOURCE, kQueryTag, comm_, &query_req_) != MPI_SUCCESS)
    query_req_ = MPI_REQUEST_NULL;
  std::lock_guard<std::mutex> g(registry_mutex());
  registry().push_back(this);
}

PeerStatus::~PeerStatus() { close(); }

void PeerStatus::close() {
  {
    std::lock_guard<std::mutex> g(registry_mutex());
    auto& r = registry();
    r.erase(std::remove(r.begin(), r.end(), this), r.end());
  }
  std::lock_guard<std::mutex> g(mutex_);
  if (comm_ == MPI_COMM_NULL) return;
  comm_ = MPI_COMM_NULL;
  int finalized = 0;
  if (MPI_Finalized(&finalized) != MPI_SUCCESS || finalized) return;
  if (query_req_ != MPI_REQUEST_NULL) {
    MPI_Cancel(&query_req_);
    MPI_Wait(&query_req_, MPI_STATUS_IGNORE);  // local once cancelled
  }
  // Replies still in flight go on without us: MPI keeps a freed send request until it completes,
  // but its buffer must stay, so the few unfinished ones are left behind.
  for (std::size_t i = 0; i < replies_out_req_.size(); ++i) {
    int done = 0;
    MPI_Test(&replies_out_req_[i], &done, MPI_STATUS_IGNORE);
    if (!done) {
      MPI_Request_free(&replies_out_req_[i]);
      static_cast<void>(replies_out_[i].release());
    }
  }
  replies_out_req_.clear();
  replies_out_.clear();
}

void PeerStatus::posted(std::uint64_t sequence, const std::string& op) {
  std::lock_guard<std::mutex> g(mutex_);
  posted_ = std::max(posted_, sequence + 1);
  if (names_.size() < kNames) {
    names_.emplace_back(sequence, op);
  } else {
    names_[static_cast<std::size_t>(sequence % kNames)] = {sequence, op};
  }
}

void PeerStatus::waiting(std::uint64_t sequence, bool on) {
  std::string name;
  {
    std::lock_guard<std::mutex> g(mutex_);
    if (on) {
      waits_.push_back({sequence, Clock::now()});
      name = name_of(sequence);
    } else {
      waits_.erase(std::remove_if(waits_.begin(), waits_.end(), [&](const Wait& w) { return w.sequence == sequence; }),
                   waits_.end());
    }
  }
  std::lock_guard<std::mutex> g(waits_mutex());
  auto& all = process_waits();
  if (on) {
    all.push_back({this, sequence, std::move(name), Clock::now()});
  } else {
    all.erase(std::remove_if(all.begin(), all.end(),
                             [&](const ProcessWait& w) { return w.board == this && w.sequence == sequence; }),
              all.end());
  }
}

std::string PeerStatus::name_of(std::uint64_t sequence) const {
  for (const auto& [s, name] : names_)
    if (s == sequence) return name;
  return {};
}

void PeerStatus::serve_all() {
  std::unique_lock<std::mutex> g(registry_mutex(), std::try_to_lock);
  if (!g.owns_lock()) return;
  for (PeerStatus* p : registry()) {
    std::unique_lock<std::mutex> l(p->mutex_, std::try_to_lock);
    if (l.owns_lock()) p->serve_locked();
  }
}

void PeerStatus::serve_locked() {
  if (comm_ == MPI_COMM_NULL) return;
  // Let finished replies go.
  for (std::size_t i = 0; i < replies_out_req_.size();) {
    int done = 0;
    if (MPI_Test(&replies_out_req_[i], &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || done) {
      replies_out_req_.erase(replies_out_req_.begin() + static_cast<std::ptrdiff_t>(i));
      replies_out_.erase(replies_out_.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
  while (query_req_ != MPI_REQUEST_NULL) {
    int arrived = 0;
    MPI_Status st;
    if (MPI_Test(&query_req_, &arrived, &st) != MPI_SUCCESS) {
      query_req_ = MPI_REQUEST_NULL;
      return;
    }
    if (!arrived) return;
    auto r = std::make_unique<Reply>();
    r->query = query_in_;
    r->posted = posted_;
    copy_name(r->op_at_query, name_of(query_in_));
    if (posted_ > 0) copy_name(r->last_op, name_of(posted_ - 1));
    if (!waits_.empty()) {  // the oldest wait on this communicator
      const Wait& w = *std::min_element(waits_.begin(), waits_.end(),
                                        [](const Wait& a, const Wait& b) { return a.sequence < b.sequence; });
      r->waiting_seq = w.sequence;
      r->waiting_ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - w.since).count();
      copy_name(r->waiting_op, name_of(w.sequence));
    } else {
      std::lock_guard<std::mutex> g(waits_mutex());
      const auto& all = process_waits();
      if (!all.empty()) {  // the oldest wait of the process, on another communicator
        const ProcessWait& w = all.front();
        r->waiting_seq = w.sequence;
        r->waiting_ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - w.since).count();
        r->waiting_other = 1;
        copy_name(r->waiting_op, w.op);
      }
    }
    MPI_Request req = MPI_REQUEST_NULL;
    if (MPI_Isend(r.get(), sizeof(Reply), MPI_BYTE, st.MPI_SOURCE, kReplyTag, comm_, &req) == MPI_SUCCESS) {
      replies_out_.push_back(std::move(r));
      replies_out_req_.push_back(req);
    }
    if (MPI_Irecv(&query_in_, 1, MPI_UINT64_T, MPI_ANY_SOURCE, kQueryTag, comm_, &query_req_) != MPI_SUCCESS)
      query_req_ = MPI_REQUEST_NULL;
  }
}

std::string PeerStatus::report(std::uint64_t sequence, const std::string& op, std::chrono::milliseconds budget) {
  std::lock_guard<std::mutex> g(mutex_);
  if (comm_ == MPI_COMM_NULL) return {};
  const std::size_t P = static_cast<std::size_t>(size_);
  std::vector<MPI_Request> recv(P, MPI_REQUEST_NULL);
  std::vector<bool> answered(P, false);
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    const auto i = static_cast<std::size_t>(p);
    queries_out_[i] = sequence;
    replies_in_[i] = Reply{};
    MPI_Request send = MPI_REQUEST_NULL;
    if (MPI_Isend(&queries_out_[i], 1, MPI_UINT64_T, p, kQueryTag, comm_, &send) == MPI_SUCCESS)
      MPI_Request_free(&send);  // a query to a dead rank may never complete; its buffer stays
    if (MPI_Irecv(&replies_in_[i], sizeof(Reply), MPI_BYTE, p, kReplyTag, comm_, &recv[i]) != MPI_SUCCESS)
      recv[i] = MPI_REQUEST_NULL;
  }
  const auto until = Clock::now() + budget;
  std::size_t missing = P - 1;
  while (missing > 0 && Clock::now() < until) {
    serve_locked();  // the others are asking too
    for (std::size_t i = 0; i < P; ++i) {
      if (recv[i] == MPI_REQUEST_NULL || answered[i]) continue;
      int done = 0;
      if (MPI_Test(&recv[i], &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
        recv[i] = MPI_REQUEST_NULL;
        --missing;
        continue;
      }
      if (!done) continue;
      if (replies_in_[i].query != sequence) {  // a late answer to an earlier question: ask again
        if (MPI_Irecv(&replies_in_[i], sizeof(Reply), MPI_BYTE, static_cast<int>(i), kReplyTag, comm_, &recv[i]) !=
            MPI_SUCCESS)
          recv[i] = MPI_REQUEST_NULL;
        continue;
      }
      answered[i] = true;
      --missing;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  for (auto& r : recv) {
    if (r == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&r);
    MPI_Wait(&r, MPI_STATUS_IGNORE);  // local once cancelled
  }

  std::ostringstream behind, silent, mismatch;
  std::vector<int> arrived;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    const auto i = static_cast<std::size_t>(p);
    if (!answered[i]) {
      silent << (silent.tellp() > 0 ? ", " : "") << p;
      continue;
    }
    const Reply& r = replies_in_[i];
    if (r.posted > sequence) {
      const std::string theirs = read_name(r.op_at_query);
      if (!theirs.empty() && theirs != op)
        mismatch << "; rank " << p << " posted #" << sequence << " as " << theirs << " (a different op: the ranks "
                 << "issued collectives in different orders)";
      arrived.push_back(p);
      continue;
    }
    behind << (behind.tellp() > 0 ? "; " : "") << "rank " << p << " (";
    if (r.posted == 0) {
      behind << "has posted no op yet";
    } else {
      behind << "its last op is #" << (r.posted - 1) << " " << read_name(r.last_op);
    }
    if (r.waiting_ms >= 0) {
      behind << "; it waits in " << read_name(r.waiting_op) << " #" << r.waiting_seq
             << (r.waiting_other ? " of another communicator" : "") << " for " << std::fixed << std::setprecision(1)
             << static_cast<double>(r.waiting_ms) / 1000.0 << " s)";
    } else {
      behind << "; it waits in no op: computing, or stalled outside moex's collectives)";
    }
  }
  std::ostringstream os;
  if (behind.tellp() > 0) os << "not arrived at #" << sequence << ": " << behind.str();
  if (silent.tellp() > 0)
    os << (os.tellp() > 0 ? "; " : "") << "no answer within " << std::fixed << std::setprecision(1)
       << std::chrono::duration<double>(budget).count() << " s from rank(s) " << silent.str()
       << " (dead, or busy outside MPI)";
  if (!arrived.empty()) {
    os << (os.tellp() > 0 ? "; " : "") << "arrived: rank(s) ";
    for (std::size_t k = 0; k < arrived.size(); ++k) os << (k ? "," : "") << arrived[k];
  }
  os << mismatch.str();
  return os.str();
}

}  // namespace moex::comm
