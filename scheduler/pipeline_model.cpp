// The pipeline cost model: a two-resource simulation of one pass per candidate schedule.
#include "scheduler/pipeline_model.h"

#include <algorithm>

#include "base/error.h"

namespace moex::sched {

Schedule fixed_schedule(int chunks, bool local_first, bool local_split, bool flat_exchange, int world) {
  const bool own = flat_exchange && world > 1;
  return {chunks, (local_first || local_split) && own, local_split && own};
}

std::string Schedule::describe() const {
  return "chunks " + std::to_string(chunks) + (local_split ? ", local-split" : local_first ? ", local-first" : "");
}

std::int64_t own_split_slot(std::span<const std::int64_t> self_entries) {
  std::int64_t total = 0;
  for (auto n : self_entries) total += n;
  // The first s whose own entries before it are closest to half of all.
  std::int64_t best = 0, best_gap = total, before = 0;
  for (std::size_t s = 0; s < self_entries.size(); ++s) {
    before += self_entries[s];
    const std::int64_t gap = 2 * before > total ? 2 * before - total : total - 2 * before;
    if (gap < best_gap) {
      best_gap = gap;
      best = static_cast<std::int64_t>(s) + 1;
    }
  }
  return best;
}

void own_entries(const ExchangePlan& plan, std::vector<std::int64_t>& out) {
  out.assign(static_cast<std::size_t>(plan.num_local), 0);
  for (std::int64_t s = 0; s < plan.num_local; ++s)
    for (int c = 0; c < plan.chunks; ++c) out[static_cast<std::size_t>(s)] += plan.picks[plan.spc(s, plan.rank, c)];
}

PassWork pass_work(const ExchangePlan& plan, std::int64_t hidden, std::int64_t topk) {
  const int P = plan.world, me = plan.rank;
  const auto S = static_cast<std::size_t>(plan.num_local);
  PassWork w;
  own_entries(plan, w.self_entries);
  w.remote_entries.assign(S, std::vector<std::int64_t>(static_cast<std::size_t>(std::max(P - 1, 0)), 0));
  for (int c = 0; c < plan.chunks; ++c)
    for (int p = 0; p < P; ++p) {
      if (p == me) continue;  // own_entries
      for (std::size_t s = 0; s < S; ++s)
        w.remote_entries[s][static_cast<std::size_t>(p < me ? p : p - 1)] +=
            plan.picks[plan.spc(static_cast<std::int64_t>(s), p, c)];
    }
  const double row = static_cast<double>(std::max(plan.remote_rows(false), plan.remote_rows(true))) * 4.0;
  w.fwd_dispatch_bytes = w.fwd_combine_bytes = w.bwd_dispatch_bytes = row * static_cast<double>(hidden);
  w.bwd_combine_bytes = row * static_cast<double>(hidden + topk);
  return w;
}

double gemm_ms(const MachineRates& r, std::int64_t rows) {
  return rows > 0 ? r.gemm_fixed_ms + r.gemm_row_ms * static_cast<double>(rows) : 0.0;
}

namespace {

/// Compute of chunk c's routed rows (every source's, or only the other ranks' when local-first):
/// one GEMM run per (expert, source) with rows, n / C rows each (the layout keeps a source's chunks
/// apart, so chunked runs do not merge across sources; unchunked they do).
double chunk_compute(const PassWork& w, const MachineRates& r, Schedule s, int c) {
  double ms = 0.0;
  const std::int64_t C = s.chunks;
  auto part = [&](std::int64_t n) { return n * (c + 1) / C - n * c / C; };
  for (std::size_t e = 0; e < w.self_entries.size(); ++e) {
    const auto& remote = w.remote_entries[e];
    if (C == 1 && !s.local_first) {  // one block of every source
      std::int64_t n = w.self_entries[e];
      for (auto m : remote) n += m;
      ms += gemm_ms(r, n);
      continue;
    }
    if (!s.local_first) ms += gemm_ms(r, part(w.self_entries[e]));
    for (auto m : remote) ms += gemm_ms(r, part(m));
  }
  return ms;
}

/// The own rows' compute of the slots [s0, s1).
double self_compute(const PassWork& w, const MachineRates& r, std::size_t s0, std::size_t s1) {
  double ms = 0.0;
  for (std::size_t s = s0; s < s1; ++s) ms += gemm_ms(r, w.self_entries[s]);
  return ms;
}

double weight_compute(const PassWork& w, const MachineRates& r) {
  double ms = 0.0;
  for (std::size_t e = 0; e < w.self_entries.size(); ++e) {
    std::int64_t n = w.self_entries[e];
    for (auto m : w.remote_entries[e]) n += m;
    ms += gemm_ms(r, n);
  }
  return ms;
}

/// One direction of the pass: dispatch (bytes `d`) -> experts per chunk -> combine (bytes `b`),
/// `shared` ms of shared experts first and `tail` ms of compute after the chunks.
double simulate(const PassWork& w, const MachineRates& r, Schedule s, bool overlap, double d, double b,
                double shared, double tail, bool grad) {
  const int C = s.chunks;
  const double rate = r.link_bytes_per_ms;
  const double lat = r.exchange_latency_ms;
  const double dc = lat + (rate > 0 ? d / C / rate : 0.0), bc = lat + (rate > 0 ? b / C / rate : 0.0);
  // Local-first: the own rows before the chunks; local-split (forward): those of the later slots
  // after them.
  const std::size_t S = w.self_entries.size();
  const std::size_t split = s.local_split && !grad ? static_cast<std::size_t>(own_split_slot(w.self_entries)) : S;
  const double own = s.local_first ? self_compute(w, r, 0, split) : 0.0;
  const double own_last = s.local_first ? self_compute(w, r, split, S) : 0.0;
  if (!overlap) {
    double t = shared + own + own_last + tail;
    for (int c = 0; c < C; ++c) t += dc + chunk_compute(w, r, s, c) + bc;
    return t;
  }
  double comm = 0.0;
  std::vector<double> arrived(static_cast<std::size_t>(C));
  for (int c = 0; c < C; ++c) arrived[static_cast<std::size_t>(c)] = comm += dc;
  double t = shared + own;
  for (int c = 0; c < C; ++c) {
    t = std::max(t, arrived[static_cast<std::size_t>(c)]) + chunk_compute(w, r, s, c);
    comm = std::max(comm, t) + bc;
  }
  t += own_last + tail;
  return std::max(t, comm);
}

}  // namespace

Prediction predict(const PassWork& w, const MachineRates& r, Schedule s, bool overlap) {
  if (s.chunks < 1) throw InvalidArgument("pipeline model: chunks = " + std::to_string(s.chunks) + " must be >= 1");
  if (s.local_split && !s.local_first)
    throw InvalidArgument("pipeline model: local_split is a kind of local_first (" + s.describe() + ")");
  if (w.remote_entries.size() != w.self_entries.size())
    throw InvalidArgument("pipeline model: remote_entries has " + std::to_string(w.remote_entries.size()) +
                          " experts, self_entries " + std::to_string(w.self_entries.size()));
  Prediction p;
  p.forward_ms = simulate(w, r, s, overlap, w.fwd_dispatch_bytes, w.fwd_combine_bytes, w.shared_fwd_ms, 0.0, false) +
                 w.other_ms / 2;
  p.backward_ms = simulate(w, r, s, overlap, w.bwd_dispatch_bytes, w.bwd_combine_bytes, w.shared_bwd_ms,
                           weight_compute(w, r), true) +
                  w.other_ms / 2;
  return p;
}

std::vector<Schedule> candidate_schedules(int world, bool flat_exchange) {
  std::vector<Schedule> out;
  for (int c : {1, 2, 3, 4, 6, 8}) {
    out.push_back({c, false});
    if (world > 1 && flat_exchange) {
      out.push_back({c, true});
      out.push_back({c, true, true});
    }
  }
  return out;
}

std::size_t choose_schedule(const std::vector<Schedule>& candidates, const std::vector<double>& predicted_ms,
                            double min_gain, double min_gain_ms) {
  if (candidates.empty() || candidates.size() != predicted_ms.size() || !(candidates[0] == Schedule{}))
    throw InvalidArgument("choose_schedule: " + std::to_string(candidates.size()) + " candidates (the first must be "
                          "chunks 1) and " + std::to_string(predicted_ms.size()) + " predictions");
  std::size_t best = 0;
  for (std::size_t i = 1; i < candidates.size(); ++i)
    if (predicted_ms[i] < predicted_ms[best]) best = i;
  const bool worth = predicted_ms[best] < (1.0 - min_gain) * predicted_ms[0] &&
                     predicted_ms[best] < predicted_ms[0] - min_gain_ms;
  return worth ? best : 0;
}

}  // namespace moex::sched
