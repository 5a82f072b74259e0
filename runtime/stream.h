// Stream and Event on the CPU: an ordered executor (a Boost.Asio strand on its own thread) and a
// completion flag with a deadline, the CPU counterparts of CUDA streams and events.
#pragma once

#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

namespace moex {

/// Set once by the task it marks; waited on, with a deadline, by another thread. A task's exception
/// travels to whoever waits on its event.
class Event {
 public:
  void reset();
  void set();
  void fail(std::exception_ptr error);
  bool ready() const;
  /// Blocks until set; rethrows the task's error; throws TimeoutError naming `what` at `deadline`.
  void wait(std::chrono::steady_clock::time_point deadline, const std::string& what) const;

 private:
  mutable std::mutex mutex_;
  mutable std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

/// Runs tasks one after another in the order they were enqueued. A threaded stream runs them on its
/// own worker thread (a Boost.Asio thread_pool of one thread behind a strand), so they overlap the
/// caller's work; an inline stream runs each task at enqueue time on the caller's thread (used when
/// MPI cannot be called from a second thread, and for the overlap-off baseline).
class Stream {
 public:
  Stream(std::string name, bool threaded);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  bool threaded() const { return impl_ != nullptr; }
  const std::string& name() const { return name_; }
  /// Enqueues `task`; `done` (may be null) is set when it finished, or failed with its exception.
  /// After a task failed, later tasks are skipped (their events fail with the same error) until
  /// reset_error().
  void enqueue(std::function<void()> task, Event* done);
  /// Waits until every task enqueued so far has run.
  void synchronize(std::chrono::steady_clock::time_point deadline);
  void reset_error();

 private:
  struct Impl;
  std::string name_;
  std::unique_ptr<Impl> impl_;
  std::exception_ptr error_;  // first failure; guarded by the strand (or the caller when inline)
  std::mutex error_mutex_;
  void run(const std::function<void()>& task, Event* done);
};

}  // namespace moex
