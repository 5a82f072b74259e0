// Timeline tracing: spans of every stage on every thread, written as one Chrome trace / Perfetto
// JSON file (one process per rank, one track per thread or stream).
#pragma once

#include <chrono>
#include <string>

namespace moex::comm {
class Communicator;
}

namespace moex::trace {

using Clock = std::chrono::steady_clock;

/// True once start() ran in this process (one relaxed load: what the hooks cost when off).
bool enabled();

/// Starts recording on this rank (a collective: a barrier first, so every rank's time 0 is about the
/// same moment). Spans before it are not recorded.
void start(comm::Communicator& comm);

/// Names the calling thread's track ("compute", "comm layer 0", ...); the first name sticks.
void name_thread(const std::string& name);

/// Records the span [begin, end) of `name` (a string literal: kept by pointer) on the calling
/// thread's track, with an optional detail (e.g. the layer) shown in the viewer's arguments.
void span(const char* name, Clock::time_point begin, Clock::time_point end, const std::string& detail = {});

/// Records a span on the track named `track_name` (made on first use), not the calling thread's:
/// for work timed elsewhere, such as a CUDA stream's stages placed by their events.
void span_on(const std::string& track_name, const char* name, Clock::time_point begin, Clock::time_point end,
             const std::string& detail = {});

/// A span for the lifetime of the object (nothing when tracing is off).
class Scope {
 public:
  explicit Scope(const char* name, std::string detail = {});
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  const char* name_;
  std::string detail_;
  Clock::time_point begin_;
  bool on_;
};

/// Gathers every rank's spans to rank 0, which writes `path` atomically: {"traceEvents": [...]}
/// with complete ("X") events in microseconds, pid = rank, tid = track, and process / thread name
/// metadata. A collective; returns the number of spans written (rank 0) or sent (others).
long long write(comm::Communicator& comm, const std::string& path);

}  // namespace moex::trace
