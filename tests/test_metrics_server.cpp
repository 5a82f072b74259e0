// MetricsServer and MetricsText: the Prometheus endpoint's HTTP answers, its bounds, publishing while
// scraped, and shutting down with clients still connected. (End to end under moex-train, with a real
// Prometheus parser and hostile clients: tests/reference/check_metrics.py.)
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"
#include "runtime/metrics_server.h"

namespace {

using moex::MetricsServer;
using moex::MetricsServerOptions;
using moex::MetricsText;

/// A connected client socket with a 5 s receive deadline (-1 on failure).
int connect_to(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<unsigned short>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

/// Sends `request` and reads the answer until the server closes.
std::string ask(int port, const std::string& request) {
  const int fd = connect_to(port);
  if (fd < 0) return "connect failed";
  if (!request.empty()) ::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) out.append(buf, static_cast<std::size_t>(n));
  ::close(fd);
  return out;
}

std::string body_of(const std::string& reply) {
  const auto at = reply.find("\r\n\r\n");
  return at == std::string::npos ? std::string() : reply.substr(at + 4);
}

TEST(MetricsText, FormatsFamiliesSamplesAndEscapes) {
  MetricsText m;
  m.family("moex_x", "gauge", "a help\nwith a newline and a \\")
      .sample(3)
      .sample(0.5, {{"layer", "0"}})
      .sample(std::numeric_limits<double>::quiet_NaN(), {{"a", "q\"b\\c\nd"}, {"b", ""}})
      .sample(std::numeric_limits<double>::infinity());
  m.family("moex_y_total", "counter", "c").sample(-1e300);
  EXPECT_EQ(m.str(),
            "# HELP moex_x a help\\nwith a newline and a \\\\\n# TYPE moex_x gauge\n"
            "moex_x 3\nmoex_x{layer=\"0\"} 0.5\nmoex_x{a=\"q\\\"b\\\\c\\nd\",b=\"\"} NaN\nmoex_x +Inf\n"
            "# HELP moex_y_total c\n# TYPE moex_y_total counter\nmoex_y_total -1.0000000000000001e+300\n");
}

TEST(MetricsServer, ServesThePublishedTextAndRejectsTheRest) {
  MetricsServer server(MetricsServerOptions{});
  ASSERT_GT(server.port(), 0);
  server.publish("moex_step 7\n");
  const std::string ok = ask(server.port(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(ok.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << ok;
  EXPECT_NE(ok.find("Content-Type: text/plain; version=0.0.4"), std::string::npos);
  EXPECT_EQ(body_of(ok).rfind("moex_step 7\n# HELP moex_metrics_requests_total", 0), 0u) << ok;
  EXPECT_NE(ok.find("Content-Length: " + std::to_string(body_of(ok).size()) + "\r\n"), std::string::npos);
  EXPECT_EQ(ask(server.port(), "GET /metrics?x=1 HTTP/1.0\r\n\r\n").rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_EQ(ask(server.port(), "PUT /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 405", 0), 0u);
  EXPECT_EQ(ask(server.port(), "GET / HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(ask(server.port(), "GET /metrics\r\n\r\n").rfind("HTTP/1.1 400", 0), 0u);
  EXPECT_EQ(ask(server.port(), "GET /metrics HTTP/2\r\n\r\n").rfind("HTTP/1.1 400", 0), 0u);
  const auto c = server.counts();
  EXPECT_EQ(c.served, 2);
  EXPECT_EQ(c.bad_request, 4);
}

TEST(MetricsServer, BoundsHeadSizeTimeAndConnections) {
  MetricsServerOptions o;
  o.max_request_bytes = 256;
  o.max_connections = 2;
  o.request_deadline = std::chrono::milliseconds(300);
  MetricsServer server(o);
  // A head over the bound: 431 (the answer may be overtaken by the reset of the unread rest).
  const std::string big = ask(server.port(), "GET /metrics HTTP/1.1\r\nX: " + std::string(400, 'a') + "\r\n\r\n");
  EXPECT_TRUE(big.empty() || big.rfind("HTTP/1.1 431", 0) == 0) << big;
  EXPECT_EQ(server.counts().too_large, 1);
  // Silent clients: 408 at the deadline; past the connection limit: 503 at once.
  const auto t0 = std::chrono::steady_clock::now();
  const int a = connect_to(server.port()), b = connect_to(server.port());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(ask(server.port(), "GET /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 503", 0), 0u);
  for (int fd : {a, b}) {
    char buf[256];
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    EXPECT_EQ(std::string(buf, n > 0 ? static_cast<std::size_t>(n) : 0).rfind("HTTP/1.1 408", 0), 0u);
    ::close(fd);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(s, 0.25);
  EXPECT_LT(s, 3.0);
  EXPECT_EQ(server.counts().timed_out, 2);
  EXPECT_EQ(server.counts().refused, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(ask(server.port(), "GET /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 200", 0), 0u);
}

TEST(MetricsServer, PublishingWhileScrapedGivesWholeBodies) {
  MetricsServer server(MetricsServerOptions{});
  server.publish("moex_step -1\n");
  std::atomic<bool> stop{false};
  std::thread publisher([&] {
    for (int i = 0; !stop; ++i) server.publish("moex_step " + std::to_string(i) + "\n" + std::string(i % 5000, '#') + "\n");
  });
  for (int i = 0; i < 200; ++i) {
    const std::string r = ask(server.port(), "GET /metrics HTTP/1.1\r\n\r\n");
    const std::string body = body_of(r);
    const bool whole = r.find("Content-Length: " + std::to_string(body.size()) + "\r\n") != std::string::npos &&
                       body.rfind("moex_step ", 0) == 0;
    EXPECT_TRUE(whole) << "scrape " << i << ": " << r.substr(0, 200);
    if (!whole) break;
  }
  stop = true;
  publisher.join();
}

TEST(MetricsServer, StopsAtOnceWithClientsConnected) {
  std::vector<int> fds;
  auto t0 = std::chrono::steady_clock::now();
  {
    MetricsServer server(MetricsServerOptions{});
    for (int i = 0; i < 5; ++i) fds.push_back(connect_to(server.port()));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    t0 = std::chrono::steady_clock::now();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  for (int fd : fds) ::close(fd);
}

TEST(MetricsServer, SaysWhyItCannotListen) {
  MetricsServer first(MetricsServerOptions{});
  MetricsServerOptions same;
  same.port = first.port();
  try {
    MetricsServer second(same);
    FAIL() << "a second server on port " << same.port << " started";
  } catch (const moex::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("in use"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(same.port)), std::string::npos) << e.what();
  }
  MetricsServerOptions bad;
  bad.bind = "localhost:80";
  EXPECT_THROW(MetricsServer{bad}, moex::ConfigError);
  bad.bind = "127.0.0.1";
  bad.port = 65536;
  EXPECT_THROW(MetricsServer{bad}, moex::ConfigError);
}

}  // namespace
