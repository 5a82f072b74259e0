// EpPlan: the send side from this rank's routing, the metadata exchange, and the receive side.
#include "runtime/ep_plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>

#include "base/error.h"

namespace moex {
namespace {
std::string str(std::int64_t v) { return std::to_string(v); }
std::string str(int v) { return std::to_string(v); }
/// A float as the shortest readable text ("2", "0.5", "nan"), for messages.
std::string str(float v) {
  std::ostringstream os;
  os << v;
  return os.str();
}
std::size_t z(std::int64_t v) { return static_cast<std::size_t>(v); }

/// Exclusive prefix sums of `counts` into `offsets` ([n + 1]).
void prefix_sums(const std::vector<std::int64_t>& counts, std::vector<std::int64_t>& offsets) {
  offsets.resize(counts.size() + 1);
  offsets[0] = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) offsets[i + 1] = offsets[i] + counts[i];
}
}  // namespace

// ---------------------------------------------------------------------------------------------------
// Block sizes of one chunk's exchange

std::span<const std::int64_t> EpPlan::send_block_counts(int c, std::int64_t width,
                                                        std::vector<std::int64_t>& out) const {
  out.resize(z(world));
  for (int p = 0; p < world; ++p) out[z(p)] = send_counts[cp(c, p)] * width;
  return out;
}

std::span<const std::int64_t> EpPlan::send_block_displs(int c, std::int64_t width,
                                                        std::vector<std::int64_t>& out) const {
  out.resize(z(world));
  for (int p = 0; p < world; ++p) out[z(p)] = (send_displ(c, p) - chunk_send_first(c)) * width;
  return out;
}

std::span<const std::int64_t> EpPlan::recv_block_counts(int c, std::int64_t width,
                                                        std::vector<std::int64_t>& out) const {
  out.resize(z(world));
  for (int p = 0; p < world; ++p) out[z(p)] = recv_counts[cp(c, p)] * width;
  return out;
}

std::span<const std::int64_t> EpPlan::recv_block_displs(int c, std::int64_t width,
                                                        std::vector<std::int64_t>& out) const {
  out.resize(z(world));
  for (int p = 0; p < world; ++p) out[z(p)] = (recv_displ(c, p) - chunk_recv_first(c)) * width;
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Step 1: the send side

void EpPlan::plan_send(std::span<const std::int32_t> topk_ids, std::span<const float> topk_weights,
                       std::int64_t tokens_in, std::int64_t k, const sched::ExpertPlacement& placement, int rank_in,
                       int chunks_in, std::span<const std::uint8_t> kept) {
  const int P = placement.world_size();
  if (rank_in < 0 || rank_in >= P)
    throw InvalidArgument("ep plan: rank = " + str(rank_in) + " is outside [0, " + str(P) +
                          ") (the placement's ranks)");
  if (tokens_in < 0) throw InvalidArgument("ep plan: tokens = " + str(tokens_in) + " must be >= 0");
  if (k < 1) throw InvalidArgument("ep plan: K = " + str(k) + " picks per token must be >= 1");
  const std::int64_t picks = tokens_in * k;
  if (static_cast<std::int64_t>(topk_ids.size()) != picks)
    throw InvalidArgument("ep plan: topk_ids has " + str(static_cast<std::int64_t>(topk_ids.size())) +
                          " ids, expected tokens * K = " + str(tokens_in) + " * " + str(k) + " = " + str(picks));
  if (!kept.empty() && static_cast<std::int64_t>(kept.size()) != picks)
    throw InvalidArgument("ep plan: kept has " + str(static_cast<std::int64_t>(kept.size())) +
                          " flags, expected none or tokens * K = " + str(picks));
  const std::int64_t E = placement.num_experts();
  pick_rank_.resize(z(picks));
  pick_slot_.resize(z(picks));
  for (std::int64_t i = 0; i < picks; ++i) {
    const std::int32_t e = topk_ids[z(i)];
    if (e < 0 || e >= E)
      throw InvalidArgument("ep plan: expert id " + str(e) + " of token " + str(i / k) + " (top-K position " +
                            str(i % k) + ") is outside [0, " + str(E) + ") (the placement's routed experts)");
    const bool drop = !kept.empty() && kept[z(i)] == 0;
    pick_rank_[z(i)] = drop ? -1 : placement.owner(e);
    pick_slot_[z(i)] = drop ? -1 : static_cast<std::int32_t>(placement.local_slot(e));
  }
  plan_send_picks(topk_weights, tokens_in, k, P, placement.num_local(rank_in), rank_in, chunks_in, pick_rank_,
                  pick_slot_);
}

void EpPlan::plan_send_picks(std::span<const float> topk_weights, std::int64_t tokens_in, std::int64_t k, int world_in,
                             std::int64_t num_local_in, int rank_in, int chunks_in, std::span<const int> pick_rank,
                             std::span<const std::int32_t> pick_slot, std::span<const std::int64_t> chunk_starts) {
  const int P = world_in;
  if (P < 1) throw InvalidArgument("ep plan: world = " + str(P) + " must be >= 1");
  if (tokens_in < 0) throw InvalidArgument("ep plan: tokens = " + str(tokens_in) + " must be >= 0");
  if (k < 1) throw InvalidArgument("ep plan: K = " + str(k) + " picks per token must be >= 1");
  if (chunks_in < 1) throw InvalidArgument("ep plan: chunks = " + str(chunks_in) + " must be >= 1");
  if (rank_in < 0 || rank_in >= P)
    throw InvalidArgument("ep plan: rank = " + str(rank_in) + " is outside [0, " + str(P) + ")");
  if (num_local_in < 0) throw InvalidArgument("ep plan: num_local = " + str(num_local_in) + " must be >= 0");
  const std::int64_t picks = tokens_in * k;
  if (static_cast<std::int64_t>(topk_weights.size()) != picks)
    throw InvalidArgument("ep plan: topk_weights has " + str(static_cast<std::int64_t>(topk_weights.size())) +
                          " weights, expected tokens * K = " + str(tokens_in) + " * " + str(k) + " = " + str(picks));
  if (static_cast<std::int64_t>(pick_rank.size()) != picks || static_cast<std::int64_t>(pick_slot.size()) != picks)
    throw InvalidArgument("ep plan: " + str(static_cast<std::int64_t>(pick_rank.size())) + " pick ranks and " +
                          str(static_cast<std::int64_t>(pick_slot.size())) + " pick slots, expected tokens * K = " +
                          str(picks) + " of each");
  for (std::int64_t i = 0; i < picks; ++i) {
    const int d = pick_rank[z(i)];
    if (d < -1 || d >= P || (d >= 0 && pick_slot[z(i)] < 0))
      throw InvalidArgument("ep plan: pick " + str(i) + " (token " + str(i / k) + ") goes to rank " + str(d) +
                            ", slot " + str(pick_slot[z(i)]) + "; expected a rank in [0, " + str(P) +
                            ") and a slot >= 0, or rank -1 (dropped)");
  }
  if (!chunk_starts.empty()) {
    bool ok = static_cast<std::int64_t>(chunk_starts.size()) == chunks_in + 1 && chunk_starts.front() == 0 &&
              chunk_starts.back() == tokens_in;
    for (std::size_t c = 1; ok && c < chunk_starts.size(); ++c) ok = chunk_starts[c] >= chunk_starts[c - 1];
    if (!ok)
      throw InvalidArgument("ep plan: chunk_starts has " + str(static_cast<std::int64_t>(chunk_starts.size())) +
                            " entries; expected chunks + 1 = " + str(chunks_in + 1) +
                            " ascending token indexes from 0 to tokens = " + str(tokens_in));
  }
  auto dropped = [&](std::size_t i) { return pick_rank[i] < 0; };
  chunk_tokens.resize(z(chunks_in) + 1);
  for (int c = 0; c <= chunks_in; ++c)
    chunk_tokens[z(c)] = chunk_starts.empty() ? sched::chunk_begin(tokens_in, chunks_in, c) : chunk_starts[z(c)];

  world = P;
  rank = rank_in;
  chunks = chunks_in;
  tokens = tokens_in;
  topk = k;
  num_local = num_local_in;
  const auto W = z(P), K = z(k), K2 = 2 * z(k);

  // Scratch per destination rank: the last token that made a row to it, that row, the picks the row
  // holds so far, and the next free row of the current chunk's block for it.
  cursor_.assign(4 * W, -1);
  std::int64_t* last = cursor_.data();
  std::int64_t* row_of = last + W;
  std::int64_t* fill = row_of + W;
  std::int64_t* next = fill + W;

  // Pass 1: one row per (token, destination rank); count them per (chunk, destination) and per token.
  send_counts.assign(z(chunks) * W, 0);
  token_offsets.assign(z(tokens) + 1, 0);
  for (int c = 0; c < chunks; ++c) {
    const std::int64_t t0 = chunk_tokens[z(c)], t1 = chunk_tokens[z(c) + 1];
    for (std::int64_t t = t0; t < t1; ++t)
      for (std::int64_t j = 0; j < k; ++j) {
        if (dropped(z(t * k + j))) continue;
        const auto d = z(pick_rank[z(t * k + j)]);
        if (last[d] == t) continue;
        last[d] = t;
        ++send_counts[cp(c, static_cast<int>(d))];
        ++token_offsets[z(t) + 1];
      }
  }
  prefix_sums(send_counts, send_offsets);
  for (std::size_t t = 0; t < z(tokens); ++t) token_offsets[t + 1] += token_offsets[t];
  const std::int64_t S = send_rows();
  send_token.resize(z(S));
  send_meta.resize(z(S) * K2);
  token_rows.resize(z(S));
  pick_back.resize(z(picks));

  // Pass 2: rows of chunk c to rank p fill the block at send_displ(c, p) in token order; each row's
  // picks keep top-K order.
  std::fill_n(last, W, -1);
  for (int c = 0; c < chunks; ++c) {
    for (int p = 0; p < P; ++p) next[p] = send_displ(c, p);
    const std::int64_t t0 = chunk_tokens[z(c)], t1 = chunk_tokens[z(c) + 1];
    for (std::int64_t t = t0; t < t1; ++t) {
      std::int64_t at = token_offsets[z(t)];
      for (std::int64_t j = 0; j < k; ++j) {
        const std::size_t i = z(t * k + j);
        if (dropped(i)) {
          pick_back[i] = -1;
          continue;
        }
        const auto d = z(pick_rank[i]);
        if (last[d] != t) {
          last[d] = t;
          row_of[d] = next[d]++;
          fill[d] = 0;
          send_token[z(row_of[d])] = t;
          float* meta = send_meta.data() + z(row_of[d]) * K2;
          std::fill_n(meta, K, -1.0f);
          std::fill_n(meta + K, K, 0.0f);
          token_rows[z(at++)] = row_of[d];
        }
        const std::int64_t r = row_of[d], f = fill[d]++;
        send_meta[z(r) * K2 + z(f)] = static_cast<float>(pick_slot[i]);
        send_meta[z(r) * K2 + K + z(f)] = topk_weights[i];
        pick_back[i] = r * k + f;
      }
      // All of a token's rows are in its chunk, whose blocks are in destination order: ascending
      // row index is destination order.
      std::sort(token_rows.begin() + token_offsets[z(t)], token_rows.begin() + at);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Step 2: the metadata exchange

void EpPlan::exchange_metadata(comm::Communicator& host_comm, std::chrono::milliseconds timeout) {
  if (world < 1) throw InvalidArgument("ep plan: exchange_metadata() called before plan_send()");
  if (host_comm.size() != world || host_comm.rank() != rank)
    throw InvalidArgument("ep plan: exchange_metadata() got a communicator of rank " + str(host_comm.rank()) + " of " +
                          str(host_comm.size()) + " but plan_send() planned rank " + str(rank) + " of " + str(world));
  const auto deadline = comm::Clock::now() + timeout;
  const auto P = z(world), C = z(chunks), K2 = 2 * z(topk);

  // 1. Every rank must cut its tokens into the same number of chunks (each chunk is one exchange),
  //    and carry K picks per row (the metadata's width). Every rank sees the same table and throws alike.
  count_send_.assign({static_cast<std::int64_t>(chunks), topk});
  count_recv_.assign(2 * P, 0);
  host_comm.allgather(count_send_.data(), count_recv_.data(), 2, comm::DataType::kInt64, "ep plan chunk counts")
      ->wait(deadline);
  for (int field = 0; field < 2; ++field) {
    const char* what = field == 0 ? "chunks" : "K (picks per token)";
    std::string differ;
    for (std::size_t p = 1; p < P; ++p)
      if (count_recv_[2 * p + z(field)] != count_recv_[z(field)])
        differ += ", rank " + str(static_cast<std::int64_t>(p)) + " has " + str(count_recv_[2 * p + z(field)]);
    if (!differ.empty())
      throw InvalidArgument("ep plan: the ranks disagree on " + std::string(what) + ": rank 0 has " +
                            str(count_recv_[z(field)]) + differ + "; every rank must plan the same value");
  }

  // 2. Rows per (peer, chunk): this rank's send_counts to p are p's recv_counts from this rank.
  count_send_.resize(P * C);
  count_recv_.assign(P * C, 0);
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t c = 0; c < C; ++c) count_send_[p * C + c] = send_counts[c * P + p];
  host_comm.alltoall(count_send_.data(), count_recv_.data(), static_cast<std::int64_t>(C), comm::DataType::kInt64,
                     "ep plan row counts")
      ->wait(deadline);
  recv_counts.resize(C * P);
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t c = 0; c < C; ++c) {
      const std::int64_t n = count_recv_[p * C + c];
      if (n < 0)
        throw InvalidArgument("ep plan: rank " + str(static_cast<std::int64_t>(p)) + " announced " + str(n) +
                              " rows for chunk " + str(static_cast<std::int64_t>(c)) + "; expected a count >= 0");
      recv_counts[c * P + p] = n;
    }
  prefix_sums(recv_counts, recv_offsets);

  // 3. The metadata of all chunks in one exchange. Send rows are chunk-major, so each peer's rows are
  //    packed together first; arrivals (peer-major) are unpacked into the recv row order (chunk,
  //    source, row). entry_weight and row_weight serve as the packing buffers: build_receive()
  //    rewrites both right after.
  meta_send_counts_.assign(P, 0);
  meta_recv_counts_.assign(P, 0);
  for (std::size_t c = 0; c < C; ++c)
    for (std::size_t p = 0; p < P; ++p) {
      meta_send_counts_[p] += send_counts[c * P + p] * static_cast<std::int64_t>(K2);
      meta_recv_counts_[p] += recv_counts[c * P + p] * static_cast<std::int64_t>(K2);
    }
  prefix_sums(meta_send_counts_, meta_send_displs_);
  prefix_sums(meta_recv_counts_, meta_recv_displs_);
  std::vector<float>& packed_send = entry_weight;
  std::vector<float>& packed_recv = row_weight;
  packed_send.resize(z(meta_send_displs_[P]));
  packed_recv.resize(z(meta_recv_displs_[P]));
  std::size_t at = 0;
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t c = 0; c < C; ++c) {
      const std::size_t n = z(send_counts[c * P + p]) * K2;
      if (n > 0)
        std::memcpy(packed_send.data() + at, send_meta.data() + z(send_offsets[c * P + p]) * K2, n * sizeof(float));
      at += n;
    }
  comm::AlltoallvArgs args;
  args.send = packed_send.data();
  args.send_counts = std::span<const std::int64_t>(meta_send_counts_.data(), P);
  args.send_displs = std::span<const std::int64_t>(meta_send_displs_.data(), P);
  args.recv = packed_recv.data();
  args.recv_counts = std::span<const std::int64_t>(meta_recv_counts_.data(), P);
  args.recv_displs = std::span<const std::int64_t>(meta_recv_displs_.data(), P);
  args.type = comm::DataType::kFloat32;
  args.label = "ep plan metadata";
  host_comm.alltoallv(args)->wait(deadline);
  recv_meta.resize(z(recv_rows()) * K2);
  at = 0;
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t c = 0; c < C; ++c) {
      const std::size_t n = z(recv_counts[c * P + p]) * K2;
      if (n > 0)
        std::memcpy(recv_meta.data() + z(recv_offsets[c * P + p]) * K2, packed_recv.data() + at, n * sizeof(float));
      at += n;
    }
  build_receive();
}

// ---------------------------------------------------------------------------------------------------
// The receive side

void EpPlan::build_receive() {
  if (world < 1 || chunks < 1 || topk < 1)
    throw InvalidArgument("ep plan: build_receive() needs world, chunks and topk >= 1 (set by plan_send()), got " +
                          str(world) + ", " + str(chunks) + " and " + str(topk));
  const auto P = z(world), C = z(chunks), K = z(topk), K2 = 2 * z(topk), S = z(num_local);
  if (recv_counts.size() != C * P)
    throw InvalidArgument("ep plan: recv_counts has " + str(static_cast<std::int64_t>(recv_counts.size())) +
                          " counts, expected chunks * world = " + str(chunks) + " * " + str(world));
  for (std::size_t i = 0; i < C * P; ++i)
    if (recv_counts[i] < 0)
      throw InvalidArgument("ep plan: recv_counts[" + str(static_cast<std::int64_t>(i)) + "] = " + str(recv_counts[i]) +
                            " (chunk " + str(static_cast<std::int64_t>(i / P)) + ", from rank " +
                            str(static_cast<std::int64_t>(i % P)) + ") must be >= 0");
  prefix_sums(recv_counts, recv_offsets);
  const std::int64_t R = recv_rows();
  if (recv_meta.size() != z(R) * K2)
    throw InvalidArgument("ep plan: recv_meta has " + str(static_cast<std::int64_t>(recv_meta.size())) +
                          " floats, expected recv rows * 2K = " + str(R) + " * " + str(2 * topk));

  // Pass 1: check every slot, count entries per (chunk, slot) and per recv row.
  slot_count.assign(C * S, 0);
  row_offsets.resize(z(R) + 1);
  row_offsets[0] = 0;
  for (std::size_t c = 0; c < C; ++c)
    for (std::size_t p = 0; p < P; ++p)
      for (std::int64_t r = recv_offsets[c * P + p]; r < recv_offsets[c * P + p + 1]; ++r) {
        std::int64_t n = 0;
        for (std::size_t j = 0; j < K; ++j) {
          const float v = recv_meta[z(r) * K2 + j];
          if (v == -1.0f) continue;  // no pick at this position
          if (!(v >= 0.0f && v < static_cast<float>(num_local) && v == std::floor(v)))
            throw InvalidArgument("ep plan: recv row " + str(r) + " (chunk " + str(static_cast<std::int64_t>(c)) +
                                  ", from rank " + str(static_cast<std::int64_t>(p)) + ") names local expert slot " +
                                  str(v) + " at top-K position " + str(static_cast<std::int64_t>(j)) +
                                  "; expected -1 (no pick) or an integer in [0, " + str(num_local) +
                                  ") (the slots of rank " + str(rank) + ")");
          ++slot_count[c * S + static_cast<std::size_t>(v)];
          ++n;
        }
        row_offsets[z(r) + 1] = row_offsets[z(r)] + n;
      }
  prefix_sums(slot_count, entry_offsets);
  const std::int64_t N = entries();
  MOEX_CHECK_EQ(N, row_offsets[z(R)]);
  entry_row.resize(z(N));
  entry_weight.resize(z(N));
  row_entries.resize(z(N));
  row_weight.resize(z(N));
  row_dw_entry.assign(z(R) * K, -1);

  // Pass 2: recv rows in order, each row's picks in top-K order, go to the next entry of their slot's
  // block, so a block is ordered by recv row, then top-K position.
  cursor_.resize(S);
  for (std::size_t c = 0; c < C; ++c) {
    for (std::size_t s = 0; s < S; ++s) cursor_[s] = entry_offsets[c * S + s];
    for (std::int64_t r = recv_offsets[c * P]; r < recv_offsets[c * P + P]; ++r) {
      std::int64_t at = row_offsets[z(r)];
      for (std::size_t j = 0; j < K; ++j) {
        const float v = recv_meta[z(r) * K2 + j];
        if (v == -1.0f) continue;
        const std::int64_t e = cursor_[static_cast<std::size_t>(v)]++;
        entry_row[z(e)] = r;
        entry_weight[z(e)] = recv_meta[z(r) * K2 + K + j];
        row_entries[z(at)] = e;
        row_weight[z(at)] = entry_weight[z(e)];
        ++at;
        row_dw_entry[z(r) * K + j] = e;
      }
    }
  }
}

}  // namespace moex
