#include "runtime/metrics_server.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <thread>
#include <utility>

#include <boost/asio.hpp>

#include "base/error.h"

namespace moex {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

struct MetricsServer::Impl {
  // Declared before the io_context: connections still queued in it when it is destroyed touch these.
  MetricsServerOptions options;
  std::atomic<std::int64_t> served{0}, bad_request{0}, too_large{0}, timed_out{0}, refused{0};
  int open = 0;  // connections alive (io thread only)
  mutable std::mutex mutex;
  std::shared_ptr<const std::string> body = std::make_shared<const std::string>();
  asio::io_context ioc;
  tcp::acceptor acceptor{ioc};
  asio::steady_timer retry{ioc};
  int port = 0;
  std::thread thread;

  void accept();
  std::string metrics_reply() const;
};

namespace {

/// One client: read the request head within the deadline, answer once, close.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(MetricsServer::Impl& server, tcp::socket socket)
      : server_(server), socket_(std::move(socket)), timer_(server.ioc), head_(server.options.max_request_bytes) {
    ++server_.open;
  }
  ~Connection() { --server_.open; }

  void start() {
    auto self = shared_from_this();
    timer_.expires_after(server_.options.request_deadline);
    timer_.async_wait([self](const error_code& ec) { self->on_deadline(ec); });
    asio::async_read_until(socket_, head_, "\r\n\r\n",
                           [self](const error_code& ec, std::size_t n) { self->on_head(ec, n); });
  }

  /// Answers without reading (too many connections).
  void refuse() {
    ++server_.refused;
    respond(503, "Service Unavailable", "too many connections to the metrics endpoint\n");
  }

 private:
  void on_deadline(const error_code& ec) {
    if (ec) return;  // cancelled: answered in time, or re-armed
    if (!answered_) {
      ++server_.timed_out;
      respond(408, "Request Timeout", "the request did not arrive within the deadline\n");
    } else {
      close();  // the client does not read its answer
    }
  }

  void on_head(const error_code& ec, std::size_t n) {
    if (answered_) return;
    if (ec == asio::error::not_found) {  // the buffer's bound was reached before the blank line
      ++server_.too_large;
      respond(431, "Request Header Fields Too Large",
              "request head over " + std::to_string(server_.options.max_request_bytes) + " bytes\n");
      return;
    }
    if (ec) {  // closed or reset before a whole head arrived: nothing to answer
      answered_ = true;
      timer_.cancel();
      close();
      return;
    }
    const std::string head(asio::buffers_begin(head_.data()), asio::buffers_begin(head_.data()) + static_cast<long>(n));
    const std::string line = head.substr(0, head.find("\r\n"));
    for (unsigned char c : line)
      if (c < 0x20 || c > 0x7e) return bad(400, "Bad Request", "request line with a control or non-ASCII byte\n");
    const auto a = line.find(' '), b = a == std::string::npos ? a : line.find(' ', a + 1);
    if (a == std::string::npos || b == std::string::npos || line.find(' ', b + 1) != std::string::npos || a == 0 ||
        b == a + 1 || b + 1 == line.size())
      return bad(400, "Bad Request", "expected a request line 'GET /metrics HTTP/1.1'\n");
    const std::string method = line.substr(0, a), target = line.substr(a + 1, b - a - 1), version = line.substr(b + 1);
    if (version != "HTTP/1.1" && version != "HTTP/1.0")
      return bad(400, "Bad Request", "HTTP version '" + version + "': expected HTTP/1.1 or HTTP/1.0\n");
    if (method != "GET") return bad(405, "Method Not Allowed", "only GET is served (read-only endpoint)\n");
    if (target.substr(0, target.find('?')) != "/metrics") return bad(404, "Not Found", "only /metrics is served\n");
    ++server_.served;
    respond(200, "OK", server_.metrics_reply(), "text/plain; version=0.0.4; charset=utf-8");
  }

  void bad(int status, const char* reason, const std::string& body) {
    ++server_.bad_request;
    respond(status, reason, body);
  }

  void respond(int status, const char* reason, const std::string& body,
               const char* type = "text/plain; charset=utf-8") {
    answered_ = true;
    reply_ = "HTTP/1.1 " + std::to_string(status) + " " + reason + "\r\nContent-Type: " + type +
             "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n" +
             (status == 405 ? "Allow: GET\r\n" : "") + "\r\n" + body;
    auto self = shared_from_this();
    // The answer, too, has a deadline: a client that never reads it is cut off.
    timer_.expires_after(server_.options.request_deadline * 5);
    timer_.async_wait([self](const error_code& ec) { self->on_deadline(ec); });
    asio::async_write(socket_, asio::buffer(reply_), [self](const error_code&, std::size_t) {
      self->timer_.cancel();
      self->close();
    });
  }

  void close() {
    error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

  MetricsServer::Impl& server_;
  tcp::socket socket_;
  asio::steady_timer timer_;
  asio::streambuf head_;
  std::string reply_;
  bool answered_ = false;
};

std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[40];
  if (v == std::floor(v) && std::fabs(v) < 9.007199254740992e15)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else
    std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

void MetricsServer::Impl::accept() {
  acceptor.async_accept([this](const error_code& ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (ec) {  // e.g. out of file descriptors: try again a little later instead of spinning
      retry.expires_after(std::chrono::milliseconds(100));
      retry.async_wait([this](const error_code& e) {
        if (!e) accept();
      });
      return;
    }
    const bool full = open >= options.max_connections;
    auto c = std::make_shared<Connection>(*this, std::move(socket));
    if (full)
      c->refuse();
    else
      c->start();
    accept();
  });
}

std::string MetricsServer::Impl::metrics_reply() const {
  std::shared_ptr<const std::string> b;
  {
    std::lock_guard<std::mutex> lock(mutex);
    b = body;
  }
  MetricsText own;
  own.family("moex_metrics_requests_total", "counter", "Requests to this endpoint by answer")
      .sample(static_cast<double>(served.load()), {{"code", "200"}})
      .sample(static_cast<double>(bad_request.load()), {{"code", "4xx"}})
      .sample(static_cast<double>(timed_out.load()), {{"code", "408"}})
      .sample(static_cast<double>(too_large.load()), {{"code", "431"}})
      .sample(static_cast<double>(refused.load()), {{"code", "503"}});
  return *b + own.str();
}

MetricsServer::MetricsServer(MetricsServerOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.options = std::move(options);
  const std::string where = s.options.bind + " port " + std::to_string(s.options.port);
  if (s.options.port < 0 || s.options.port > 65535)
    throw ConfigError("metrics endpoint: port " + std::to_string(s.options.port) + ": expected 0 (any) to 65535");
  if (s.options.max_connections < 1 || s.options.max_request_bytes < 64 ||
      s.options.request_deadline <= std::chrono::milliseconds(0))
    throw ConfigError("metrics endpoint: expected max_connections >= 1, max_request_bytes >= 64, a deadline > 0");
  error_code ec;
  const auto address = asio::ip::make_address(s.options.bind, ec);
  if (ec)
    throw ConfigError("metrics endpoint: '" + s.options.bind + "' is not an IPv4 or IPv6 address (" + ec.message() +
                      "); expected e.g. 127.0.0.1, 0.0.0.0 or ::1");
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(s.options.port));
  auto fail = [&](const char* step) {
    throw ConfigError("metrics endpoint: cannot " + std::string(step) + " " + where + ": " + ec.message());
  };
  if (s.acceptor.open(endpoint.protocol(), ec)) fail("open a socket for");
  if (s.acceptor.set_option(tcp::acceptor::reuse_address(true), ec)) fail("set SO_REUSEADDR on");
  if (s.acceptor.bind(endpoint, ec)) fail("bind to");
  if (s.acceptor.listen(asio::socket_base::max_listen_connections, ec)) fail("listen on");
  s.port = s.acceptor.local_endpoint(ec).port();
  if (ec) fail("read the port of");
  s.accept();
  s.thread = std::thread([&s] {
    try {
      s.ioc.run();
    } catch (const std::exception& e) {  // a handler threw: stop serving, never take training down
      std::fprintf(stderr, "%smoex: metrics endpoint stopped: %s\n", rank_prefix().c_str(), e.what());
    }
  });
}

MetricsServer::~MetricsServer() {
  impl_->ioc.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

int MetricsServer::port() const { return impl_->port; }
const std::string& MetricsServer::address() const { return impl_->options.bind; }

void MetricsServer::publish(std::string text) {
  auto b = std::make_shared<const std::string>(std::move(text));
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->body.swap(b);
}

MetricsServerCounts MetricsServer::counts() const {
  const Impl& s = *impl_;
  return {s.served.load(), s.bad_request.load(), s.too_large.load(), s.timed_out.load(), s.refused.load()};
}

MetricsText& MetricsText::family(const std::string& name, const char* type, const std::string& help) {
  name_ = name;
  std::string h;
  for (char c : help) h += c == '\\' ? std::string("\\\\") : c == '\n' ? std::string("\\n") : std::string(1, c);
  text_ += "# HELP " + name + " " + h + "\n# TYPE " + name + " " + type + "\n";
  return *this;
}

MetricsText& MetricsText::sample(double value, std::initializer_list<std::pair<const char*, std::string>> labels) {
  text_ += name_;
  if (labels.size() > 0) {
    text_ += '{';
    bool first = true;
    for (const auto& [key, v] : labels) {
      if (!first) text_ += ',';
      first = false;
      text_ += key;
      text_ += "=\"";
      for (char c : v) text_ += c == '\\' ? std::string("\\\\") : c == '"' ? std::string("\\\"") : c == '\n' ? std::string("\\n") : std::string(1, c);
      text_ += '"';
    }
    text_ += '}';
  }
  text_ += ' ' + format_value(value) + '\n';
  return *this;
}

}  // namespace moex
