// Timeline tracing (see trace.h).
#include "runtime/trace.h"

#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <vector>

#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "runtime/io/checkpoint_files.h"

namespace moex::trace {
namespace {

struct Event {
  const char* name;
  std::int64_t begin_ns, end_ns;
  std::string detail;
};

/// One thread's events; owned by the registry for the process's life, so a thread that ended
/// leaves its events behind for write().
struct Track {
  int id = 0;
  std::string name;
  bool named = false;  // a track of its own name (span_on: a CUDA stream), not of a thread
  std::mutex mutex;  // the owner appends, write() reads
  std::vector<Event> events;
};

constexpr std::size_t kMaxEventsPerTrack = 1u << 20;

std::atomic<bool> g_on{false};
Clock::time_point g_epoch;
int g_rank = 0;
std::mutex g_mutex;
std::vector<std::unique_ptr<Track>> g_tracks;
std::atomic<long long> g_dropped{0};
thread_local Track* t_track = nullptr;

Track& track() {
  if (!t_track) {
    std::lock_guard<std::mutex> g(g_mutex);
    g_tracks.push_back(std::make_unique<Track>());
    t_track = g_tracks.back().get();
    t_track->id = static_cast<int>(g_tracks.size());
  }
  return *t_track;
}

std::int64_t ns(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t - g_epoch).count();
}

}  // namespace

bool enabled() { return g_on.load(std::memory_order_relaxed); }

void start(comm::Communicator& comm) {
  comm.barrier("trace start")->wait();
  g_epoch = Clock::now();
  g_rank = comm.rank();
  g_on.store(true, std::memory_order_relaxed);
  name_thread("main (compute)");
}

void name_thread(const std::string& name) {
  if (!enabled()) return;
  Track& t = track();
  std::lock_guard<std::mutex> g(t.mutex);
  if (t.name.empty()) t.name = name;
}

namespace {
void add(Track& t, const char* name, Clock::time_point begin, Clock::time_point end, const std::string& detail) {
  std::lock_guard<std::mutex> g(t.mutex);
  if (t.events.size() >= kMaxEventsPerTrack) {
    g_dropped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  t.events.push_back({name, ns(begin), ns(end), detail});
}
}  // namespace

void span(const char* name, Clock::time_point begin, Clock::time_point end, const std::string& detail) {
  if (!enabled()) return;
  add(track(), name, begin, end, detail);
}

void span_on(const std::string& track_name, const char* name, Clock::time_point begin, Clock::time_point end,
             const std::string& detail) {
  if (!enabled()) return;
  Track* t = nullptr;
  {
    std::lock_guard<std::mutex> g(g_mutex);
    for (const auto& k : g_tracks)
      if (k->named && k->name == track_name) t = k.get();
    if (!t) {
      g_tracks.push_back(std::make_unique<Track>());
      t = g_tracks.back().get();
      t->id = static_cast<int>(g_tracks.size());
      t->name = track_name;
      t->named = true;
    }
  }
  add(*t, name, begin, end, detail);
}

Scope::Scope(const char* name, std::string detail)
    : name_(name), detail_(std::move(detail)), begin_(Clock::now()), on_(enabled()) {}

Scope::~Scope() {
  if (on_) span(name_, begin_, Clock::now(), detail_);
}

long long write(comm::Communicator& comm, const std::string& path) {
  // This rank's events as JSON array elements, then every rank's text to rank 0.
  nlohmann::json events = nlohmann::json::array();
  long long count = 0;
  events.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", g_rank}, {"args", {{"name", "rank " + std::to_string(g_rank)}}}});
  events.push_back({{"ph", "M"}, {"name", "process_sort_index"}, {"pid", g_rank}, {"args", {{"sort_index", g_rank}}}});
  {
    std::lock_guard<std::mutex> g(g_mutex);
    for (const auto& t : g_tracks) {
      std::lock_guard<std::mutex> l(t->mutex);
      if (t->events.empty()) continue;
      events.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", g_rank}, {"tid", t->id},
                        {"args", {{"name", t->name.empty() ? "thread " + std::to_string(t->id) : t->name}}}});
      for (const Event& e : t->events) {
        nlohmann::json j{{"ph", "X"}, {"name", e.name}, {"pid", g_rank}, {"tid", t->id},
                         {"ts", static_cast<double>(e.begin_ns) / 1000.0},
                         {"dur", static_cast<double>(e.end_ns - e.begin_ns) / 1000.0}};
        if (!e.detail.empty()) j["args"] = {{"layer", e.detail}};
        events.push_back(std::move(j));
        ++count;
      }
    }
  }
  std::string text = events.dump();
  text = text.substr(1, text.size() - 2);  // the elements, without the brackets
  const int P = comm.size();
  std::int64_t len = static_cast<std::int64_t>(text.size());
  std::vector<std::int64_t> lens(static_cast<std::size_t>(P));
  comm.allgather(&len, lens.data(), 1, comm::DataType::kInt64, "trace sizes")->wait();
  std::int64_t total = 0;
  for (auto l : lens) total += l;
  std::string all(comm.rank() == 0 ? static_cast<std::size_t>(total) : 0, '\0');
  comm.gatherv(text.data(), len, comm.rank() == 0 ? all.data() : nullptr, lens, comm::DataType::kByte, 0,
               "trace events")->wait();
  if (comm.rank() == 0) {
    std::string out = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[";
    std::size_t at = 0;
    bool first = true;
    for (auto l : lens) {
      if (l > 0) {
        if (!first) out += ",";
        out.append(all, at, static_cast<std::size_t>(l));
        first = false;
      }
      at += static_cast<std::size_t>(l);
    }
    out += "]}\n";
    write_file_atomic(path, out);
  }
  if (g_dropped.load() > 0)
    std::fprintf(stderr, "moex: trace: %lld spans dropped past %zu per thread\n", g_dropped.load(), kMaxEventsPerTrack);
  return count;
}

}  // namespace moex::trace
