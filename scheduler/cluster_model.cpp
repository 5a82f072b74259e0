// The cluster cost model: expected traffic of the routing rule over a node-aware placement, fed
// into the pipeline model's simulation of a pass.
#include "scheduler/cluster_model.h"

#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "scheduler/expert_placement.h"
#include "scheduler/topology.h"

namespace moex::sched {

std::string ClusterOption::describe() const {
  return std::string(hierarchical ? "hierarchical" : "flat") + ", " + schedule.describe() +
         (overlap ? "" : ", overlap off") + (replicas ? ", replicas" : "");
}

namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw InvalidArgument("cluster model: " + what);
}

void validate(const ClusterSpec& c, const LayerSpec& l) {
  check(c.nodes >= 1 && c.ranks_per_node >= 1, "nodes and ranks_per_node must be >= 1");
  check(l.hidden >= 1 && l.ffn >= 1 && l.tokens_per_rank >= 0, "hidden, ffn >= 1 and tokens_per_rank >= 0");
  check(l.experts >= c.world(), "experts (" + std::to_string(l.experts) + ") must be >= ranks (" +
                                    std::to_string(c.world()) + ")");
  check(l.groups >= 1 && l.experts % l.groups == 0, "n_group must divide the experts");
  check(l.topk_groups >= 1 && l.topk_groups <= l.groups, "topk_group must be in [1, n_group]");
  check(l.topk >= 1 && l.topk <= l.topk_groups * (l.experts / l.groups),
        "topk must be in [1, topk_group * experts per group]");
  check(l.load_imbalance >= 1.0, "load_imbalance must be >= 1");
  check(c.world() == 1 || c.intra_GBps > 0 || c.ranks_per_node == 1, "intra-node rate must be > 0");
  check(c.nodes == 1 || c.inter_GBps > 0, "inter-node rate must be > 0 with several nodes");
}

/// splitmix64: the Monte Carlo's own generator (deterministic, no dependency).
struct Mix {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  std::int64_t below(std::int64_t n) { return static_cast<std::int64_t>(next() % static_cast<std::uint64_t>(n)); }
};

double per_ms(double GBps) { return GBps * 1e6; }  // GB/s -> bytes per ms

}  // namespace

ClusterTraffic expected_traffic(const ClusterSpec& c, const LayerSpec& l, std::int64_t samples) {
  validate(c, l);
  const int P = c.world();
  std::vector<int> node_of(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) node_of[static_cast<std::size_t>(r)] = r / c.ranks_per_node;
  const Topology topo = Topology::from_node_ids(node_of);
  const ExpertPlacement place = ExpertPlacement::node_aware(l.experts, topo);
  const std::int64_t per_group = l.experts / l.groups;
  Mix rng{0x5eed};
  std::vector<std::int64_t> groups(static_cast<std::size_t>(l.groups)), pool;
  std::vector<int> hit_rank(static_cast<std::size_t>(P)), hit_node(static_cast<std::size_t>(c.nodes));
  double intra = 0, inter = 0, inter_h = 0, stage_b = 0, ranks = 0, nodes = 0;
  for (std::int64_t i = 0; i < samples; ++i) {
    const int o = static_cast<int>(i % P);  // the origin: every rank alike
    for (std::int64_t g = 0; g < l.groups; ++g) groups[static_cast<std::size_t>(g)] = g;
    pool.clear();
    for (std::int64_t j = 0; j < l.topk_groups; ++j) {
      std::swap(groups[static_cast<std::size_t>(j)], groups[static_cast<std::size_t>(j + rng.below(l.groups - j))]);
      for (std::int64_t e = 0; e < per_group; ++e) pool.push_back(groups[static_cast<std::size_t>(j)] * per_group + e);
    }
    std::fill(hit_rank.begin(), hit_rank.end(), 0);
    std::fill(hit_node.begin(), hit_node.end(), 0);
    const auto n = static_cast<std::int64_t>(pool.size());
    for (std::int64_t j = 0; j < l.topk; ++j) {
      std::swap(pool[static_cast<std::size_t>(j)], pool[static_cast<std::size_t>(j + rng.below(n - j))]);
      const int d = place.owner(pool[static_cast<std::size_t>(j)]);
      hit_rank[static_cast<std::size_t>(d)] = 1;
      hit_node[static_cast<std::size_t>(node_of[static_cast<std::size_t>(d)])] = 1;
    }
    const int on = node_of[static_cast<std::size_t>(o)], local = o % c.ranks_per_node;
    for (int d = 0; d < P; ++d) {
      if (!hit_rank[static_cast<std::size_t>(d)]) continue;
      ranks += 1;
      const int dn = node_of[static_cast<std::size_t>(d)];
      if (d != o) (dn == on ? intra : inter) += 1;
      // Hierarchical: the row reaches node dn at the rank with o's local index, which passes it on.
      if (d != dn * c.ranks_per_node + local) stage_b += 1;
    }
    for (int m = 0; m < c.nodes; ++m)
      if (hit_node[static_cast<std::size_t>(m)]) {
        nodes += 1;
        if (m != on) inter_h += 1;
      }
  }
  // Per-rank means: every sample is one token of one origin; a rank sends T tokens' rows.
  const double T = static_cast<double>(l.tokens_per_rank), S = static_cast<double>(samples);
  ClusterTraffic t;
  t.ranks_per_token = ranks / S;
  t.nodes_per_token = nodes / S;
  t.experts_per_node = static_cast<double>(l.topk) / std::max(t.nodes_per_token, 1e-300);
  // Stored per option kind: flat rows (intra, inter) and hierarchical rows (stage A across nodes,
  // stage B within); predict_step picks the pair it needs.
  t.rows_intra = T * intra / S;
  t.rows_inter = T * inter / S;
  t.rows_stage_b = T * stage_b / S;
  t.rows_inter_hier = T * inter_h / S;
  return t;
}

ClusterPrediction predict_step(const ClusterSpec& c, const LayerSpec& l, const ComputeSpec& compute,
                               const ClusterOption& option, const ClusterTraffic& traffic,
                               double replica_imbalance) {
  validate(c, l);
  check(compute.share > 0, "compute share must be > 0");
  const int P = c.world();
  const double imb = option.replicas ? std::min(l.load_imbalance, replica_imbalance) : l.load_imbalance;
  const double H = static_cast<double>(l.hidden), T = static_cast<double>(l.tokens_per_rank);
  ClusterPrediction out;
  out.option = option;
  out.traffic = traffic;

  MachineRates r = compute.rates;
  r.gemm_fixed_ms *= compute.share;
  r.gemm_row_ms *= compute.share;
  // The busiest rank's expert slots: ceil(E / P), each with T*K/E entries from every source.
  const std::int64_t slots = (l.experts + P - 1) / P;
  const double per_source = T * static_cast<double>(l.topk) / static_cast<double>(l.experts) * imb;
  PassWork w;
  w.self_entries.assign(static_cast<std::size_t>(slots), std::llround(per_source));
  w.remote_entries.assign(static_cast<std::size_t>(slots),
                          std::vector<std::int64_t>(static_cast<std::size_t>(P - 1), std::llround(per_source)));
  // One exchange's rows to other ranks and how long its bytes take (the busiest rank: imbalance).
  double rows_local = 0, rows_net = 0, ms_per_elem = 0, latency = 0;
  if (P > 1) {
    if (option.hierarchical && c.nodes > 1) {
      rows_local = traffic.rows_stage_b;
      rows_net = traffic.rows_inter_hier;
      ms_per_elem = (c.ranks_per_node > 1 ? rows_local / per_ms(c.intra_GBps) : 0.0) + rows_net / per_ms(c.inter_GBps);
      latency = c.inter_latency_us + (c.ranks_per_node > 1 ? c.intra_latency_us : 0.0);
    } else {
      rows_local = traffic.rows_intra;
      rows_net = traffic.rows_inter;
      ms_per_elem = std::max(c.ranks_per_node > 1 ? rows_local / per_ms(c.intra_GBps) : 0.0,
                             c.nodes > 1 ? rows_net / per_ms(c.inter_GBps) : 0.0);
      latency = c.nodes > 1 ? std::max(c.inter_latency_us, c.intra_latency_us) : c.intra_latency_us;
    }
    rows_local *= imb;
    rows_net *= imb;
    ms_per_elem *= imb * H;  // ms per byte of element size, for the whole exchange
    const double rows = rows_local + rows_net;
    r.link_bytes_per_ms = ms_per_elem > 0 ? rows * H / ms_per_elem : 0.0;
    r.exchange_latency_ms = latency / 1000.0;
    const double unit = rows * H;  // elements per exchange
    w.fwd_dispatch_bytes = unit * l.dispatch_elem_bytes;
    w.fwd_combine_bytes = w.bwd_dispatch_bytes = w.bwd_combine_bytes = unit * l.combine_elem_bytes;
    out.exchange_ms = 4 * r.exchange_latency_ms +
                      (r.link_bytes_per_ms > 0 ? (w.fwd_dispatch_bytes + 3 * w.fwd_combine_bytes) / r.link_bytes_per_ms : 0);
    out.bytes_intra = rows_local * H * (l.dispatch_elem_bytes + 3 * l.combine_elem_bytes);
    out.bytes_inter = rows_net * H * (l.dispatch_elem_bytes + 3 * l.combine_elem_bytes);
  } else {
    r.link_bytes_per_ms = 0;
    r.exchange_latency_ms = 0;
  }
  const double shared_rows = T * static_cast<double>(l.shared_ffn) / static_cast<double>(l.ffn);
  w.shared_fwd_ms = l.shared_ffn > 0 ? r.gemm_fixed_ms + r.gemm_row_ms * shared_rows : 0.0;
  w.shared_bwd_ms = 2 * w.shared_fwd_ms;
  w.other_ms = compute.other_ms_per_token * T * compute.share;
  out.pass = predict(w, r, option.schedule, option.overlap);
  // What no exchange overlaps: the all-reduce of the replicated gradients over the slowest link
  // (ClusterSpec::ring_allreduce), a latency per step.
  if (P > 1) {
    const double bytes = l.grad_elem_bytes * H *
                         (static_cast<double>(l.experts) + 3.0 * static_cast<double>(l.shared_ffn));
    const double rate = c.nodes > 1 ? c.inter_GBps : c.intra_GBps;
    const double lat = c.nodes > 1 ? c.inter_latency_us : c.intra_latency_us;
    const double steps = 2.0 * std::ceil(std::log2(static_cast<double>(P)));
    const double volume = c.ring_allreduce ? 2.0 * (P - 1) / P : steps;
    out.allreduce_ms = volume * bytes / per_ms(rate) + (c.ring_allreduce ? 2.0 * (P - 1) : steps) * lat / 1000.0;
  }
  PassWork no_link = w;
  MachineRates none = r;
  none.link_bytes_per_ms = 0;
  none.exchange_latency_ms = 0;
  out.compute_ms = predict(no_link, none, Schedule{}, false).total_ms();
  return out;
}

std::vector<ClusterPrediction> rank_options(const ClusterSpec& c, const LayerSpec& l, const ComputeSpec& compute,
                                            const ClusterTraffic& t, bool overlapped, bool serialised) {
  std::vector<ClusterPrediction> out;
  for (const bool ov : {true, false}) {
    if (!(ov ? overlapped : serialised)) continue;
    for (const bool hier : {false, true}) {
      if (hier && c.nodes < 2) continue;
      for (const Schedule& s : candidate_schedules(c.world(), !hier))
        for (const bool rep : {false, true}) {
          if (rep && l.load_imbalance <= 1.02) continue;
          out.push_back(predict_step(c, l, compute, {s, hier, ov, rep}, t));
        }
    }
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const ClusterPrediction& a, const ClusterPrediction& b) { return a.step_ms() < b.step_ms(); });
  return out;
}

}  // namespace moex::sched
