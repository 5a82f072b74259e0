// ExchangePlan: the send rows from each pick's destination, their metadata, and the canonical
// receive layout built from the metadata.
#include "scheduler/exchange_plan.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

#include "base/error.h"

namespace moex::sched {
namespace {
std::string str(std::int64_t v) { return std::to_string(v); }
std::string str(int v) { return std::to_string(v); }
std::string str(float v) {
  std::ostringstream os;
  os << v;
  return os.str();
}
std::size_t z(std::int64_t v) { return static_cast<std::size_t>(v); }

void prefix_sums(const std::vector<std::int64_t>& counts, std::vector<std::int64_t>& offsets) {
  offsets.resize(counts.size() + 1);
  offsets[0] = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) offsets[i + 1] = offsets[i] + counts[i];
}
}  // namespace

std::int32_t decode_code(float v, std::int64_t limit, const char* what) {
  if (v == -1.0f) return -1;
  if (!(v >= 0.0f && v < static_cast<float>(limit) && v == std::floor(v)))
    throw InvalidArgument(std::string(what) + ": routing code " + str(v) + "; expected -1 (no pick) or an integer in [0, " +
                          str(limit) + ")");
  return static_cast<std::int32_t>(v);
}

// ---------------------------------------------------------------------------------------------------
// Where picks go

void route_picks(std::span<const std::int32_t> ids, std::span<const std::uint8_t> kept, std::int64_t k,
                 const ExpertPlacement* placement, const ReplicaLayout* layout, const Topology& topology, int rank,
                 std::vector<int>& pick_rank, std::vector<std::int32_t>& pick_slot) {
  if ((placement == nullptr) == (layout == nullptr))
    throw InvalidArgument("route_picks: exactly one of a placement and a replica layout is expected");
  if (!kept.empty() && kept.size() != ids.size())
    throw InvalidArgument("route_picks: " + str(static_cast<std::int64_t>(kept.size())) + " kept flags for " +
                          str(static_cast<std::int64_t>(ids.size())) + " picks; expected none or one per pick");
  const std::int64_t E = placement ? placement->num_experts() : layout->num_experts();
  pick_rank.resize(ids.size());
  pick_slot.resize(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const std::int32_t e = ids[i];
    if (e < 0 || e >= E)
      throw InvalidArgument("route_picks: expert id " + str(e) + " of token " + str(static_cast<std::int64_t>(i) / k) +
                            " (top-K position " + str(static_cast<std::int64_t>(i) % k) + ") is outside [0, " + str(E) + ")");
    if (!kept.empty() && kept[i] == 0) {
      pick_rank[i] = -1;
      pick_slot[i] = -1;
    } else if (placement) {
      pick_rank[i] = placement->owner(e);
      pick_slot[i] = static_cast<std::int32_t>(placement->local_slot(e));
    } else {
      const auto& rep = layout->replicas(e)[z(layout->choose(e, rank, static_cast<std::int64_t>(i) / k, topology))];
      pick_rank[i] = rep.rank;
      pick_slot[i] = static_cast<std::int32_t>(rep.slot);
    }
  }
}

void forward_picks(std::span<const int> pick_rank, std::span<const std::int32_t> pick_slot, const Topology& topology,
                   int rank, std::int64_t max_slots, std::vector<int>& fwd_rank, std::vector<std::int32_t>& fwd_code) {
  std::int64_t widest = 0;
  for (int m = 0; m < topology.num_nodes(); ++m) widest = std::max<std::int64_t>(widest, topology.node_size(m));
  if (widest * max_slots > kMaxRoutingCode)
    throw InvalidArgument("hierarchical exchange: " + str(widest) + " ranks per node x " + str(max_slots) +
                          " expert slots do not fit the routing codes (exact below 2^24)");
  fwd_rank.resize(pick_rank.size());
  fwd_code.resize(pick_rank.size());
  for (std::size_t i = 0; i < pick_rank.size(); ++i) {
    const int d = pick_rank[i];
    fwd_rank[i] = d < 0 ? -1 : topology.peer_on(topology.node_of(d), rank);
    fwd_code[i] = d < 0 ? -1 : static_cast<std::int32_t>(topology.local_index(d) * max_slots + pick_slot[i]);
  }
}

void forwarded_picks(const float* meta, std::int64_t rows, std::int64_t stride, std::int64_t k,
                     std::span<const int> node_ranks, std::int64_t max_slots, std::vector<int>& pick_rank,
                     std::vector<std::int32_t>& pick_slot, std::vector<float>* weights) {
  const std::int64_t limit = static_cast<std::int64_t>(node_ranks.size()) * max_slots;
  pick_rank.resize(z(rows * k));
  pick_slot.resize(z(rows * k));
  if (weights) weights->resize(z(rows * k));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < k; ++j) {
      const float* m = meta + r * stride;
      const std::int32_t code = decode_code(m[j], limit, "hierarchical exchange: forwarder received row");
      const std::size_t u = z(r * k + j);
      pick_rank[u] = code < 0 ? -1 : node_ranks[z(code / max_slots)];
      pick_slot[u] = code < 0 ? -1 : static_cast<std::int32_t>(code % max_slots);
      if (weights) (*weights)[u] = code < 0 ? 0.0f : m[k + j];
    }
}

// ---------------------------------------------------------------------------------------------------
// Block sizes of one chunk's exchange

void ExchangePlan::chunk_blocks(int c, bool send_side, std::int64_t width, std::vector<std::int64_t>& counts,
                                std::vector<std::int64_t>& displs) const {
  const std::vector<std::int64_t>& n = send_side ? send_counts : recv_counts;
  const std::vector<std::int64_t>& o = send_side ? send_offsets : recv_offsets;
  counts.resize(z(world));
  displs.resize(z(world));
  for (int p = 0; p < world; ++p) {
    counts[z(p)] = n[cp(c, p)] * width;
    displs[z(p)] = (o[cp(c, p)] - o[cp(c, 0)]) * width;
  }
}

std::int64_t ExchangePlan::remote_rows(bool send_side) const {
  const std::vector<std::int64_t>& n = send_side ? send_counts : recv_counts;
  std::int64_t rows = 0;
  for (int c = 0; c < chunks; ++c)
    for (int p = 0; p < world; ++p)
      if (p != rank) rows += n[cp(c, p)];
  return rows;
}

// ---------------------------------------------------------------------------------------------------
// Step 1: the send side

void ExchangePlan::build_send(std::span<const int> pick_dest, std::span<const std::int32_t> pick_code,
                              std::int64_t tokens_in, std::int64_t k, int world_in, int rank_in, int chunks_in,
                              std::span<const std::int64_t> chunk_starts) {
  const int P = world_in;
  if (P < 1) throw InvalidArgument("exchange plan: world = " + str(P) + " must be >= 1");
  if (rank_in < 0 || rank_in >= P)
    throw InvalidArgument("exchange plan: rank = " + str(rank_in) + " is outside [0, " + str(P) + ")");
  if (tokens_in < 0) throw InvalidArgument("exchange plan: tokens = " + str(tokens_in) + " must be >= 0");
  if (k < 1) throw InvalidArgument("exchange plan: K = " + str(k) + " picks per token must be >= 1");
  if (chunks_in < 1) throw InvalidArgument("exchange plan: chunks = " + str(chunks_in) + " must be >= 1");
  const std::int64_t n_picks = tokens_in * k;
  if (static_cast<std::int64_t>(pick_dest.size()) != n_picks || static_cast<std::int64_t>(pick_code.size()) != n_picks)
    throw InvalidArgument("exchange plan: " + str(static_cast<std::int64_t>(pick_dest.size())) + " pick destinations and " +
                          str(static_cast<std::int64_t>(pick_code.size())) + " codes, expected tokens * K = " +
                          str(n_picks) + " of each");
  for (std::int64_t i = 0; i < n_picks; ++i) {
    const int d = pick_dest[z(i)];
    const std::int32_t code = pick_code[z(i)];
    if (d < -1 || d >= P || (d >= 0 && (code < 0 || code >= kMaxRoutingCode)))
      throw InvalidArgument("exchange plan: pick " + str(i % k) + " of token " + str(i / k) + " goes to rank " + str(d) +
                            " with code " + str(code) + "; expected a rank in [0, " + str(P) +
                            ") and a code in [0, 2^24), or rank -1 (dropped)");
  }
  if (!chunk_starts.empty()) {
    bool ok = static_cast<std::int64_t>(chunk_starts.size()) == chunks_in + 1 && chunk_starts.front() == 0 &&
              chunk_starts.back() == tokens_in;
    for (std::size_t c = 1; ok && c < chunk_starts.size(); ++c) ok = chunk_starts[c] >= chunk_starts[c - 1];
    if (!ok)
      throw InvalidArgument("exchange plan: chunk_starts has " + str(static_cast<std::int64_t>(chunk_starts.size())) +
                            " entries; expected chunks + 1 = " + str(chunks_in + 1) +
                            " ascending token indexes from 0 to tokens = " + str(tokens_in));
  }
  world = P;
  rank = rank_in;
  chunks = chunks_in;
  tokens = tokens_in;
  topk = k;
  chunk_tokens.resize(z(chunks) + 1);
  for (int c = 0; c <= chunks; ++c)
    chunk_tokens[z(c)] = chunk_starts.empty() ? chunk_begin(tokens, chunks, c) : chunk_starts[z(c)];
  const auto W = z(P), K = z(k);

  // Scratch per destination: the last token that made a row to it, that row, the picks it holds so
  // far, and the next free row of the current chunk's block for it.
  cursor_.assign(4 * W, -1);
  std::int64_t* last = cursor_.data();
  std::int64_t* row_of = last + W;
  std::int64_t* fill = row_of + W;
  std::int64_t* next = fill + W;

  // Pass 1: one row per (token, destination); count them per (chunk, destination) and per token.
  send_counts.assign(z(chunks) * W, 0);
  token_offsets.assign(z(tokens) + 1, 0);
  for (int c = 0; c < chunks; ++c)
    for (std::int64_t t = chunk_tokens[z(c)]; t < chunk_tokens[z(c) + 1]; ++t)
      for (std::int64_t j = 0; j < k; ++j) {
        const int d = pick_dest[z(t * k + j)];
        if (d < 0 || last[d] == t) continue;
        last[d] = t;
        ++send_counts[cp(c, d)];
        ++token_offsets[z(t) + 1];
      }
  prefix_sums(send_counts, send_offsets);
  for (std::size_t t = 0; t < z(tokens); ++t) token_offsets[t + 1] += token_offsets[t];
  const std::int64_t S = send_rows();
  send_token.resize(z(S));
  send_code.assign(z(S) * K, -1);
  send_k.assign(z(S) * K, -1);
  token_rows.resize(z(S));
  pick_back.resize(z(n_picks));

  // Pass 2: rows of chunk c to rank p fill the block at send_displ(c, p) in token order; each row's
  // picks keep top-K order.
  std::fill_n(last, W, -1);
  for (int c = 0; c < chunks; ++c) {
    for (int p = 0; p < P; ++p) next[p] = send_displ(c, p);
    for (std::int64_t t = chunk_tokens[z(c)]; t < chunk_tokens[z(c) + 1]; ++t) {
      std::int64_t at = token_offsets[z(t)];
      for (std::int64_t j = 0; j < k; ++j) {
        const std::size_t i = z(t * k + j);
        const int d = pick_dest[i];
        if (d < 0) {
          pick_back[i] = -1;
          continue;
        }
        if (last[d] != t) {
          last[d] = t;
          row_of[d] = next[d]++;
          fill[d] = 0;
          send_token[z(row_of[d])] = t;
          token_rows[z(at++)] = row_of[d];
        }
        const std::int64_t r = row_of[d], f = fill[d]++;
        send_code[z(r * k + f)] = pick_code[i];
        send_k[z(r * k + f)] = static_cast<std::int32_t>(j);
        pick_back[i] = r * k + f;
      }
      // A token's rows are all in its chunk, whose blocks are in destination order.
      std::sort(token_rows.begin() + token_offsets[z(t)], token_rows.begin() + at);
    }
  }
}

void ExchangePlan::pack_meta(std::span<const float> topk_weights, std::vector<float>& out) const {
  if (static_cast<std::int64_t>(topk_weights.size()) != tokens * topk)
    throw InvalidArgument("exchange plan: " + str(static_cast<std::int64_t>(topk_weights.size())) +
                          " routing weights, expected tokens * K = " + str(tokens * topk));
  const std::int64_t S = send_rows(), K = topk;
  out.resize(z(S * 2 * K));
  for (std::int64_t r = 0; r < S; ++r) {
    const std::int64_t t = send_token[z(r)];
    float* m = out.data() + r * 2 * K;
    for (std::int64_t f = 0; f < K; ++f) {
      const std::int32_t j = send_k[z(r * K + f)];
      m[f] = encode_code(send_code[z(r * K + f)]);
      m[K + f] = j >= 0 ? topk_weights[z(t * K + j)] : 0.0f;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Step 2: the receive side

void ExchangePlan::build_receive(int world_in, int chunks_in, std::int64_t num_local_in,
                                 std::span<const std::int64_t> rows_pc, std::span<const std::int64_t> picks_pcs) {
  if (world_in < 1 || chunks_in < 1 || num_local_in < 0 || topk < 1)
    throw InvalidArgument("exchange plan: build_receive needs world, chunks, K >= 1 and slots >= 0, got " +
                          str(world_in) + ", " + str(chunks_in) + ", " + str(topk) + " and " + str(num_local_in));
  const auto P = z(world_in), C = z(chunks_in), S = z(num_local_in);
  if (rows_pc.size() != P * C || picks_pcs.size() != P * C * S)
    throw InvalidArgument("exchange plan: " + str(static_cast<std::int64_t>(rows_pc.size())) + " row counts and " +
                          str(static_cast<std::int64_t>(picks_pcs.size())) + " pick counts, expected world * chunks = " +
                          str(static_cast<std::int64_t>(P * C)) + " and that times slots = " +
                          str(static_cast<std::int64_t>(P * C * S)));
  world = world_in;
  chunks = chunks_in;
  num_local = num_local_in;
  recv_counts.resize(C * P);
  for (std::size_t p = 0; p < P; ++p)
    for (std::size_t c = 0; c < C; ++c) {
      const std::int64_t n = rows_pc[p * C + c];
      if (n < 0)
        throw InvalidArgument("exchange plan: rank " + str(static_cast<std::int64_t>(p)) + " announced " + str(n) +
                              " rows for chunk " + str(static_cast<std::int64_t>(c)) + "; expected a count >= 0");
      recv_counts[c * P + p] = n;
    }
  prefix_sums(recv_counts, recv_offsets);
  picks.assign(S * P * C, 0);
  entry_base.assign(S * P * C, 0);
  slot_offsets.assign(S + 1, 0);
  std::int64_t total = 0;
  for (std::size_t s = 0; s < S; ++s) {
    slot_offsets[s] = total;
    for (std::size_t p = 0; p < P; ++p)
      for (std::size_t c = 0; c < C; ++c) {
        const std::int64_t n = picks_pcs[(p * C + c) * S + s];
        if (n < 0)
          throw InvalidArgument("exchange plan: rank " + str(static_cast<std::int64_t>(p)) + " announced " + str(n) +
                                " picks for slot " + str(static_cast<std::int64_t>(s)) + "; expected a count >= 0");
        const std::size_t i = (s * P + p) * C + c;
        picks[i] = n;
        entry_base[i] = total;
        total += n;
      }
  }
  slot_offsets[S] = total;
  entry_row.resize(z(total));
  entry_pick.resize(z(total));
  entry_weight.resize(z(total));
  row_entry.assign(z(recv_rows() * topk), -1);
}

void ExchangePlan::build_receive_from_meta(int world_in, int chunks_in, std::int64_t num_local_in,
                                           std::span<const std::int64_t> recv_counts_cp, std::span<const float> meta) {
  if (world_in < 1 || chunks_in < 1 || num_local_in < 0 ||
      recv_counts_cp.size() != z(world_in) * z(chunks_in))
    throw InvalidArgument("exchange plan: " + str(static_cast<std::int64_t>(recv_counts_cp.size())) +
                          " receive counts, expected chunks * world = " + str(chunks_in) + " * " + str(world_in));
  const auto P = z(world_in), C = z(chunks_in), S = z(num_local_in), K2 = 2 * z(topk);
  std::int64_t rows = 0;
  for (std::int64_t n : recv_counts_cp) {
    if (n < 0) throw InvalidArgument("exchange plan: a receive count of " + str(n) + " rows; expected >= 0");
    rows += n;
  }
  if (meta.size() != z(rows) * K2)
    throw InvalidArgument("exchange plan: " + str(static_cast<std::int64_t>(meta.size())) +
                          " metadata floats, expected recv rows * 2K = " + str(rows) + " * " + str(2 * topk));
  // Counts per (source, chunk) and slot, from the codes.
  rows_pc_.assign(P * C, 0);
  picks_pcs_.assign(P * C * S, 0);
  std::size_t r = 0;
  for (std::size_t c = 0; c < C; ++c)
    for (std::size_t p = 0; p < P; ++p) {
      rows_pc_[p * C + c] = recv_counts_cp[c * P + p];
      for (std::int64_t i = 0; i < recv_counts_cp[c * P + p]; ++i, ++r)
        for (std::size_t j = 0; j < K2 / 2; ++j) {
          const std::int32_t s = decode_code(meta[r * K2 + j], static_cast<std::int64_t>(S), "exchange plan: received row");
          if (s >= 0) ++picks_pcs_[(p * C + c) * S + z(s)];
        }
    }
  build_receive(world_in, chunks_in, num_local_in, rows_pc_, picks_pcs_);
  // Block (s, p, c)'s entries at its canonical place, in row, then top-K order.
  cursor_.assign(entry_base.begin(), entry_base.end());
  const auto K = static_cast<std::int64_t>(K2 / 2);
  for (int c = 0; c < chunks; ++c)
    for (int p = 0; p < world; ++p)
      for (std::int64_t row = recv_displ(c, p); row < recv_offsets[cp(c, p) + 1]; ++row)
        for (std::int64_t j = 0; j < K; ++j) {
          const float* m = meta.data() + z(row) * K2;
          if (m[j] == -1.0f) continue;  // the codes were decoded (checked) above
          const std::int64_t e = cursor_[spc(static_cast<std::int64_t>(m[j]), p, c)]++;
          entry_row[z(e)] = row;
          entry_pick[z(e)] = static_cast<std::int32_t>(j);
          entry_weight[z(e)] = m[K + j];
          row_entry[z(row * K + j)] = e;
        }
}

void ExchangePlan::compute_order(ComputeOrder& out, int self, std::int64_t split) const {
  const std::int64_t S = num_local, N = entries();
  if (self != -1 && self != rank)
    throw InvalidArgument("ExchangePlan::compute_order: self = " + std::to_string(self) + ", expected -1 or this " +
                          "plan's rank " + std::to_string(rank));
  if (self >= 0 && (split < 0 || split > S))
    throw InvalidArgument("ExchangePlan::compute_order: split = " + std::to_string(split) +
                          ", expected a slot in [0, " + std::to_string(S) + "]");
  out.groups = self < 0 ? chunks : chunks + 2;
  out.split = self < 0 ? S : split;
  out.order.resize(z(N));
  out.position.resize(z(N));
  out.group_slot.assign(z(out.groups) * z(S), 0);
  std::int64_t n = 0;
  // Appends block (slot s, source p, chunk c) to group g: groups and their slots come in order.
  const auto add = [&](int g, std::int64_t s, int p, int c) {
    const std::int64_t b = entry_base[spc(s, p, c)], m = picks[spc(s, p, c)];
    for (std::int64_t e = b; e < b + m; ++e, ++n) {
      out.order[z(n)] = e;
      out.position[z(e)] = n;
    }
    out.group_slot[z(g) * z(S) + z(s)] += m;
  };
  const auto own = [&](int g, std::int64_t s0, std::int64_t s1) {
    for (std::int64_t s = s0; s < s1; ++s)
      for (int c = 0; c < chunks; ++c) add(g, s, self, c);
  };
  if (self >= 0) own(0, 0, split);
  for (int c = 0; c < chunks; ++c)
    for (std::int64_t s = 0; s < S; ++s)
      for (int p = 0; p < world; ++p)
        if (p != self) add(self < 0 ? c : 1 + c, s, p, c);
  if (self >= 0) own(chunks + 1, split, S);
  prefix_sums(out.group_slot, out.group_offsets);
  const std::int64_t R = recv_rows(), K = topk;
  out.entry_row.resize(z(N));
  out.entry_weight.resize(z(N));
  for (std::int64_t m = 0; m < N; ++m) {
    out.entry_row[z(m)] = entry_row[z(out.order[z(m)])];
    out.entry_weight[z(m)] = entry_weight[z(out.order[z(m)])];
  }
  out.row_offsets.resize(z(R) + 1);
  out.row_entries.resize(z(N));
  out.row_weight.resize(z(N));
  out.row_dw_entry.resize(z(R * K));
  out.row_offsets[0] = 0;
  std::int64_t at = 0;
  for (std::int64_t r = 0; r < R; ++r) {
    for (std::int64_t j = 0; j < K; ++j) {
      const std::int64_t e = row_entry[z(r * K + j)];
      out.row_dw_entry[z(r * K + j)] = e < 0 ? -1 : out.position[z(e)];
      if (e < 0) continue;
      out.row_entries[z(at)] = out.position[z(e)];
      out.row_weight[z(at)] = entry_weight[z(e)];
      ++at;
    }
    out.row_offsets[z(r) + 1] = at;
  }
}

}  // namespace moex::sched
