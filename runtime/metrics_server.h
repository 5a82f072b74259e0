// A read-only Prometheus endpoint: GET /metrics over HTTP/1.1 on Boost.Asio, serving the newest text
// the caller published. Bounded in every direction (request bytes, connections, time per request) so
// that no client, careless or hostile, can slow down or stop the training that publishes.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace moex {

struct MetricsServerOptions {
  std::string bind = "127.0.0.1";  ///< address to listen on (loopback unless the user names another)
  int port = 0;                    ///< TCP port, 0 = one the system picks (see MetricsServer::port())
  std::size_t max_request_bytes = 8192;  ///< request line + headers; longer: 431 and close
  int max_connections = 16;              ///< open at once; more: 503 and close
  std::chrono::milliseconds request_deadline{2000};  ///< whole request must arrive within this; else 408
};

/// What the server has done (for its own metrics and for tests).
struct MetricsServerCounts {
  std::int64_t served = 0;       ///< 200 answers to GET /metrics
  std::int64_t bad_request = 0;  ///< 400 (malformed request line or version), 404, 405
  std::int64_t too_large = 0;    ///< 431: request head over max_request_bytes
  std::int64_t timed_out = 0;    ///< 408: the request did not arrive within the deadline
  std::int64_t refused = 0;      ///< 503: max_connections were open
};

/// Listens from construction (throws ConfigError naming the address and port when it cannot: bad
/// address, port in use, no permission) until destruction, on one thread of its own. The caller's
/// only contact is publish(), which swaps a pointer under a mutex: a scrape never waits for training
/// and training never waits for a scrape. Every answer closes its connection (Connection: close).
class MetricsServer {
 public:
  explicit MetricsServer(MetricsServerOptions options);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  /// The port listened on (the chosen one when options.port was 0).
  int port() const;
  /// The address listened on, as given.
  const std::string& address() const;
  /// Replaces the body that GET /metrics returns (Prometheus text format 0.0.4). The server appends
  /// its own moex_metrics_requests_total counters to it.
  void publish(std::string text);
  MetricsServerCounts counts() const;

  struct Impl;  // the io thread's state (metrics_server.cpp)

 private:
  std::unique_ptr<Impl> impl_;
};

/// Builds Prometheus text format 0.0.4: each family's # HELP and # TYPE once, then its samples.
class MetricsText {
 public:
  /// Starts a family; `type` is "gauge" or "counter" (counter names end in _total).
  MetricsText& family(const std::string& name, const char* type, const std::string& help);
  /// A sample of the current family; `labels` as {{"layer", "0"}, ...} (values are escaped).
  MetricsText& sample(double value, std::initializer_list<std::pair<const char*, std::string>> labels = {});
  const std::string& str() const { return text_; }

 private:
  std::string text_, name_;
};

}  // namespace moex
