// Stream (a Boost.Asio strand on one worker thread) and Event.
#include "runtime/stream.h"

#include "runtime/trace.h"

#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>

#include "base/error.h"

namespace moex {

void Event::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  done_ = false;
  error_ = nullptr;
}

// Notify while holding the lock: a waiter cannot return (and perhaps destroy the event) until the
// setter is done touching it.
void Event::set() {
  std::lock_guard<std::mutex> lock(mutex_);
  done_ = true;
  cv_.notify_all();
}

void Event::fail(std::exception_ptr error) {
  std::lock_guard<std::mutex> lock(mutex_);
  done_ = true;
  error_ = std::move(error);
  cv_.notify_all();
}

bool Event::ready() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

void Event::wait(std::chrono::steady_clock::time_point deadline, const std::string& what) const {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!cv_.wait_until(lock, deadline, [this] { return done_; }))
    throw TimeoutError(what + ": not finished by its deadline (the stream's task is still running or stuck)");
  if (error_) std::rethrow_exception(error_);
}

struct Stream::Impl {
  boost::asio::thread_pool pool{1};
  boost::asio::strand<boost::asio::thread_pool::executor_type> strand{pool.get_executor()};
};

Stream::Stream(std::string name, bool threaded) : name_(std::move(name)) {
  if (threaded) impl_ = std::make_unique<Impl>();
}

Stream::~Stream() {
  if (impl_) impl_->pool.join();
}

void Stream::run(const std::function<void()>& task, Event* done) {
  if (impl_) trace::name_thread("stream: " + name_);  // this stream's track on the timeline
  std::exception_ptr earlier;
  {
    std::lock_guard<std::mutex> lock(error_mutex_);
    earlier = error_;
  }
  if (earlier) {
    if (done) done->fail(earlier);
    return;
  }
  try {
    task();
    if (done) done->set();
  } catch (...) {
    auto error = std::current_exception();
    {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = error;
    }
    if (done) done->fail(error);
  }
}

void Stream::enqueue(std::function<void()> task, Event* done) {
  if (done) done->reset();
  if (!impl_) {
    run(task, done);
    return;
  }
  boost::asio::post(impl_->strand, [this, task = std::move(task), done] { run(task, done); });
}

void Stream::synchronize(std::chrono::steady_clock::time_point deadline) {
  if (!impl_) return;
  // Shared, so a marker that outlives a timed-out wait is still valid when the strand reaches it.
  auto marker = std::make_shared<Event>();
  boost::asio::post(impl_->strand, [marker] { marker->set(); });
  marker->wait(deadline, "stream " + name_ + " synchronize");
}

void Stream::reset_error() {
  std::lock_guard<std::mutex> lock(error_mutex_);
  error_ = nullptr;
}

}  // namespace moex
