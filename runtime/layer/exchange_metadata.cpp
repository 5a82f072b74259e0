// MetadataExchange: counts and row metadata over the host communicator, then the receive side.
#include "runtime/layer/exchange_metadata.h"

#include <cstring>
#include <string>

#include "base/error.h"

namespace moex {
namespace {
std::string str(std::int64_t v) { return std::to_string(v); }
std::size_t z(std::int64_t v) { return static_cast<std::size_t>(v); }
void prefix(const std::vector<std::int64_t>& counts, std::vector<std::int64_t>& displs) {
  displs.resize(counts.size());
  std::int64_t at = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    displs[i] = at;
    at += counts[i];
  }
}
}  // namespace

void MetadataExchange::run(sched::ExchangePlan& plan, std::span<const float> weights, std::int64_t num_local,
                           comm::Communicator& host_comm, std::chrono::milliseconds timeout) {
  if (plan.world < 1) throw InvalidArgument("metadata exchange: the plan's send side is not built (build_send)");
  if (host_comm.size() != plan.world || host_comm.rank() != plan.rank)
    throw InvalidArgument("metadata exchange: a communicator of rank " + str(host_comm.rank()) + " of " +
                          str(host_comm.size()) + " for a plan of rank " + str(plan.rank) + " of " + str(plan.world));
  const auto deadline = comm::Clock::now() + timeout;
  const auto P = z(plan.world), C = z(plan.chunks), K2 = 2 * z(plan.topk);
  plan.pack_meta(weights, send_meta);

  // 1. Every rank must cut its tokens into the same number of chunks (each chunk is one exchange)
  //    and carry K picks per row (the metadata's width). Every rank sees the same table and throws alike.
  count_send_.assign({static_cast<std::int64_t>(plan.chunks), plan.topk});
  count_recv_.assign(2 * P, 0);
  host_comm.allgather(count_send_.data(), count_recv_.data(), 2, comm::DataType::kInt64, "metadata chunk counts")
      ->wait(deadline);
  for (std::size_t field = 0; field < 2; ++field) {
    std::string differ;
    for (std::size_t p = 1; p < P; ++p)
      if (count_recv_[2 * p + field] != count_recv_[field])
        differ += ", rank " + str(static_cast<std::int64_t>(p)) + " has " + str(count_recv_[2 * p + field]);
    if (!differ.empty())
      throw InvalidArgument(std::string("metadata exchange: the ranks disagree on ") +
                            (field == 0 ? "chunks" : "K (picks per token)") + ": rank 0 has " +
                            str(count_recv_[field]) + differ + "; every rank must plan the same value");
  }

  // 2. Rows per (peer, chunk): this rank's send counts to p are p's receive counts from this rank.
  count_send_.resize(P * C);
  count_recv_.assign(P * C, 0);
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t c = 0; c < C; ++c) count_send_[p * C + c] = plan.send_counts[c * P + p];
  const auto t_counts = comm::Clock::now();
  host_comm.alltoall(count_send_.data(), count_recv_.data(), static_cast<std::int64_t>(C), comm::DataType::kInt64,
                     "metadata row counts")
      ->wait(deadline);
  counts_ms = std::chrono::duration<double, std::milli>(comm::Clock::now() - t_counts).count();
  recv_counts_.resize(C * P);
  std::int64_t rows = 0;
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t c = 0; c < C; ++c) {
      const std::int64_t n = count_recv_[p * C + c];
      if (n < 0)
        throw InvalidArgument("metadata exchange: rank " + str(static_cast<std::int64_t>(p)) + " announced " + str(n) +
                              " rows for chunk " + str(static_cast<std::int64_t>(c)) + "; expected a count >= 0");
      recv_counts_[c * P + p] = n;
      rows += n;
    }

  // 3. The metadata of all chunks in one exchange: send rows are chunk-major, so each peer's rows are
  //    packed together first; arrivals (peer-major) are unpacked into receive row order (chunk, source).
  send_counts_.assign(P, 0);
  recv_counts_peer_.assign(P, 0);
  for (std::size_t c = 0; c < C; ++c)
    for (std::size_t p = 0; p < P; ++p) {
      send_counts_[p] += plan.send_counts[c * P + p] * static_cast<std::int64_t>(K2);
      recv_counts_peer_[p] += recv_counts_[c * P + p] * static_cast<std::int64_t>(K2);
    }
  prefix(send_counts_, send_displs_);
  prefix(recv_counts_peer_, recv_displs_);
  packed_send_.resize(send_meta.size());
  packed_recv_.resize(z(rows) * K2);
  std::size_t at = 0;
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t c = 0; c < C; ++c) {
      const std::size_t n = z(plan.send_counts[c * P + p]) * K2;
      if (n > 0) std::memcpy(packed_send_.data() + at, send_meta.data() + z(plan.send_offsets[c * P + p]) * K2, n * sizeof(float));
      at += n;
    }
  comm::AlltoallvArgs args;
  args.send = packed_send_.data();
  args.send_counts = send_counts_;
  args.send_displs = send_displs_;
  args.recv = packed_recv_.data();
  args.recv_counts = recv_counts_peer_;
  args.recv_displs = recv_displs_;
  args.type = comm::DataType::kFloat32;
  args.label = "metadata rows";
  host_comm.alltoallv(args)->wait(deadline);
  // Receive row order: chunk, then source.
  recv_meta.resize(z(rows) * K2);
  std::vector<std::int64_t>& next = count_send_;  // per source: where its next block starts in packed_recv_
  next.assign(recv_displs_.begin(), recv_displs_.end());
  at = 0;
  for (std::size_t c = 0; c < C; ++c)
    for (std::size_t p = 0; p < P; ++p) {
      const std::size_t n = z(recv_counts_[c * P + p]) * K2;
      if (n > 0) std::memcpy(recv_meta.data() + at, packed_recv_.data() + z(next[p]), n * sizeof(float));
      next[p] += static_cast<std::int64_t>(n);
      at += n;
    }
  plan.build_receive_from_meta(plan.world, plan.chunks, num_local, recv_counts_, recv_meta);
}

}  // namespace moex
