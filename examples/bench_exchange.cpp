// moex-bench exchange: the token exchange of an expert-parallel pass alone, in the style of
// nccl-tests — one row per size with the rows and bytes moved, the time, algbw and busbw of the
// dispatch and of the return, and a check of every row that arrived (#wrong). The exchange is the
// layer's own: layer::PassPlan (route, metadata, receive layout) and layer::dispatch / arrive /
// give_back / relay / sum_returns over layer::exchange_chunk, flat or hierarchical; only the experts
// are left out (every receiving rank sends each row back as it came).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "examples/bench_exchange.h"
#include "examples/bench_tools.h"
#include "runtime/kernels/permute.h"
#include "runtime/layer/pass_plan.h"
#include "runtime/layer/row_exchange.h"
#include "runtime/random.h"
#include "scheduler/expert_placement.h"
#include "scheduler/topology.h"

namespace moex::tools {
namespace {

using Clock = BenchClock;

std::int64_t total_over_ranks(comm::Communicator& c, std::int64_t v) {
  c.allreduce_sum(&v, 1, comm::DataType::kInt64, "bench exchange")->wait();
  return v;
}

/// Rank r's top-K picks: K distinct experts per token, uniform (the same on every rank that asks).
void make_routing(std::uint64_t seed, int r, std::int64_t T, std::int64_t E, std::int64_t K,
                  std::vector<std::int32_t>& ids) {
  ids.resize(static_cast<std::size_t>(T * K));
  Rng rng(Rng::mix(seed, 0xe8c4, static_cast<std::uint64_t>(r), static_cast<std::uint64_t>(T)));
  std::vector<std::int32_t> deck(static_cast<std::size_t>(E));
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t e = 0; e < E; ++e) deck[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(e);
    for (std::int64_t j = 0; j < K; ++j) {  // partial Fisher-Yates
      const auto pick = j + static_cast<std::int64_t>(rng.uniform() * static_cast<double>(E - j));
      std::swap(deck[static_cast<std::size_t>(j)], deck[static_cast<std::size_t>(std::min(pick, E - 1))]);
      ids[static_cast<std::size_t>(t * K + j)] = deck[static_cast<std::size_t>(j)];
    }
  }
}

/// Row t of rank r's tokens: its token index and rank, then small integers (exact in fp32, and
/// their sums over up to `world` returns too).
float row_value(int r, std::int64_t t, std::int64_t h) {
  if (h == 0) return static_cast<float>(t);
  if (h == 1) return static_cast<float>(r);
  return static_cast<float>((r * 131 + t * 7 + h) % 1021 - 510);
}

/// BenchRows on host buffers: the layer's moves without its experts.
class HostRows final : public BenchRows {
 public:
  HostRows(comm::Communicator& c, std::int64_t hidden, std::int64_t topk) : comm_(c), H_(hidden), K_(topk) {}
  void prepare(const layer::PassPlan& plan, std::int64_t tokens) override {
    const std::vector<std::int64_t> need = buffer_elems(plan, tokens, H_, K_);
    for (std::size_t b = 0; b < need.size(); ++b)
      if (static_cast<std::int64_t>(bufs_[b].size()) < need[b]) bufs_[b].resize(static_cast<std::size_t>(need[b]));
  }
  void load(const layer::PassPlan& plan, const std::vector<float>& x) override {
    const auto& o = plan.origin();
    kernels::gather_rows(o.send_rows(), H_, o.send_token.data(), x.data(), H_, buf(layer::Buf::kOriginSend).data(), H_);
  }
  void clear_recv(std::int64_t rows) override { std::fill_n(buf(layer::Buf::kRecv).begin(), rows * H_, -1.0f); }
  void echo(std::int64_t rows) override {
    std::copy_n(buf(layer::Buf::kRecv).begin(), rows * H_, buf(layer::Buf::kRet).begin());
  }
  void finish() override {}
  void read(layer::Buf b, std::int64_t elems, std::vector<float>& out) override {
    out.assign(buf(b).begin(), buf(b).begin() + elems);
  }
  std::string describe() const override { return "host buffers over MPI"; }
  void gather(std::int64_t n, const std::vector<std::int64_t>& index, std::int64_t at, layer::Buf src, layer::Buf dst,
              std::int64_t dst_row, bool) override {
    kernels::gather_rows(n, H_, index.data() + at, buf(src).data(), H_, buf(dst).data() + dst_row * H_, H_);
  }
  void sum(std::int64_t n, const std::vector<std::int64_t>& offsets, std::int64_t at,
           const std::vector<std::int64_t>& members, layer::Buf src, layer::Buf dst, std::int64_t dst_row,
           bool accumulate) override {
    kernels::combine_rows(n, H_, offsets.data() + at, members.data(), nullptr, buf(src).data(), H_,
                          buf(dst).data() + dst_row * H_, H_, accumulate);
  }
  void exchange(const sched::ExchangePlan& plan, int c, bool out, layer::Buf from, layer::Buf to, bool, bool skip_self,
                const std::string& label) override {
    comm::WorkPtr w = layer::exchange_chunk(comm_, plan, c, out, H_, comm::DataType::kFloat32, buf(from).data(),
                                            buf(to).data(), skip_self, label, blocks_);
    for (std::size_t p = 0; p < blocks_.send_counts.size(); ++p)
      if (static_cast<int>(p) != comm_.rank()) remote_bytes += 4.0 * static_cast<double>(blocks_.send_counts[p]);
    w->wait();
  }
  void ready() override {}

 private:
  std::vector<float>& buf(layer::Buf b) { return bufs_[static_cast<std::size_t>(b)]; }
  comm::Communicator& comm_;
  std::int64_t H_, K_;
  std::vector<float> bufs_[static_cast<int>(layer::Buf::kPicks) + 1];
  layer::HostBlocks blocks_;
};

struct Row {
  std::int64_t tokens = 0;
  double rows = 0, bytes = 0;         // mean over ranks: dispatch send rows (and their bytes), self included
  double plan_ms = 0, time_ms = 0, ret_ms = 0, ref_ms = 0;  // medians of the slowest rank
  double remote_bytes = 0, ret_remote_bytes = 0;  // the busiest rank's bytes to other ranks
  double ref_remote_bytes = 0;
  std::int64_t wrong = 0;
};

}  // namespace

std::vector<std::int64_t> buffer_elems(const layer::PassPlan& plan, std::int64_t tokens, std::int64_t H,
                                       std::int64_t K) {
  using layer::Buf;
  std::vector<std::int64_t> n(static_cast<std::size_t>(Buf::kPicks) + 1, 0);
  const auto set = [&](Buf b, std::int64_t elems) { n[static_cast<std::size_t>(b)] = elems; };
  const auto& o = plan.origin();
  set(Buf::kOriginSend, o.send_rows() * H);
  set(Buf::kOriginBack, o.send_rows() * H);
  set(Buf::kRecv, plan.main.recv_rows() * H);
  set(Buf::kRet, plan.main.recv_rows() * H);
  if (plan.hierarchical()) {
    set(Buf::kARecv, plan.a.recv_rows() * H);
    set(Buf::kARet, plan.a.recv_rows() * H);
    set(Buf::kBSend, plan.b.send_rows() * H);
    set(Buf::kBBack, plan.b.send_rows() * H);
    set(Buf::kBRecv, plan.b.recv_rows() * H);
    set(Buf::kBRet, plan.b.recv_rows() * H);
  }
  set(Buf::kPartial, plan.groups() * H);
  set(Buf::kOut, tokens * H);
  set(Buf::kPicks, tokens * K);
  return n;
}

void BenchRows::gather_values(std::int64_t, const std::vector<std::int64_t>&, std::int64_t, layer::Buf, layer::Buf,
                              std::int64_t) {
  throw InternalError("moex-bench exchange: routing-weight gradients are not exchanged here");
}

void BenchRows::copy(std::int64_t, layer::Buf, std::int64_t, layer::Buf, std::int64_t, bool) {
  throw InternalError("moex-bench exchange: every block is exchanged here (no local-first copies)");
}

std::unique_ptr<BenchRows> make_host_rows(comm::Communicator& comm, std::int64_t hidden, std::int64_t topk) {
  return std::make_unique<HostRows>(comm, hidden, topk);
}

int bench_exchange(comm::MpiCommunicator& world, int argc, char** argv) {
  Options opt("moex-bench exchange",
              "mpirun -np N moex-bench exchange [--hidden H --experts E --topk K --min-tokens A --max-tokens B "
              "--exchange flat|hierarchical|both --iters N --json]");
  opt.value("hidden", "1024", "row width (hidden_size, fp32 elements)")
      .value("experts", "16", "routed experts (placed node by node, as the layer places them)")
      .value("topk", "4", "picks per token (distinct experts, uniform)")
      .value("min-tokens", "16", "smallest tokens per rank")
      .value("max-tokens", "4096", "largest tokens per rank")
      .value("step-factor", "2", "tokens per rank grow by this factor from row to row")
      .value("exchange", "both", "flat, hierarchical or both (one table each)")
      .value("iters", "20", "timed iterations per size")
      .value("warmup", "3", "untimed iterations per size first")
      .value("seed", "1", "seed of the routing")
      .value("check", "on", "on: check every received row and every token's returned sum (#wrong)")
      .flag("json", "also print one JSON line per row");
  add_device_options(opt, "where the rows live (cuda: prints SKIPPED where there is no GPU)", "fp32");
  if (!opt.parse(argc, argv, 2)) return 0;
#ifdef MOEX_TOOLS_WITH_CUDA
  const DeviceChoice device = device_options(opt, true);
#else
  const DeviceChoice device = device_options(opt, false);
#endif
  if (device.precision != "fp32")
    throw ConfigError("--precision = " + device.precision + ": moex-bench exchange moves fp32 rows (expected fp32)");
  const std::int64_t H = opt.integer("hidden"), E = opt.integer("experts"), K = opt.integer("topk");
  const std::int64_t t_min = opt.integer("min-tokens"), t_max = opt.integer("max-tokens");
  const std::int64_t factor = opt.integer("step-factor"), iters = opt.integer("iters"), warmup = opt.integer("warmup");
  if (H < 2) throw ConfigError("--hidden = " + std::to_string(H) + ": must be >= 2 (a row carries its token and rank)");
  if (E < 1 || K < 1 || K > E)
    throw ConfigError("--experts and --topk must satisfy 1 <= topk <= experts (got experts " + std::to_string(E) +
                      ", topk " + std::to_string(K) + ")");
  if (t_min < 1 || t_max < t_min || t_max >= (std::int64_t{1} << 24))
    throw ConfigError("--min-tokens and --max-tokens must satisfy 1 <= min <= max < 2^24");
  if (factor < 2) throw ConfigError("--step-factor = " + std::to_string(factor) + ": must be >= 2");
  if (iters < 1 || warmup < 0) throw ConfigError("--iters must be >= 1 and --warmup >= 0");
  const std::string which = opt.str("exchange");
  std::vector<bool> kinds;
  if (which == "flat" || which == "both") kinds.push_back(false);
  if (which == "hierarchical" || which == "both") kinds.push_back(true);
  if (kinds.empty()) throw ConfigError("--exchange = " + which + ": expected flat, hierarchical or both");
  const bool check = opt.on_off("check");
  const auto seed = static_cast<std::uint64_t>(opt.integer("seed"));
  const int P = world.size(), me = world.rank();

  const auto topology = sched::Topology::from_node_ids(world.node_ids());
  const auto placement = sched::ExpertPlacement::node_aware(E, topology);
  const layer::ExpertLayout where(placement, std::nullopt, topology, E, P, "bench exchange");
  if (me == 0)
    std::printf("# moex-bench exchange | ranks %d | nodes: %s | hidden %lld (fp32, %lld bytes/row) | experts %lld "
                "topk %lld | iters %lld (median of the slowest rank)\n"
                "# bytes: dispatch send buffer per rank (mean); algbw = bytes / time; busbw = the busiest rank's "
                "bytes to other ranks / time; ref: MPI alltoall of equal blocks, same bytes\n",
                P, topology.describe().c_str(), static_cast<long long>(H), static_cast<long long>(4 * H),
                static_cast<long long>(E), static_cast<long long>(K), static_cast<long long>(iters));

  std::unique_ptr<BenchRows> rows_ptr;
  if (device.cuda) {
#ifdef MOEX_TOOLS_WITH_CUDA
    std::string why;
    rows_ptr = make_device_rows(world, device.comm, H, K, &why);
    if (!rows_ptr) {
      if (me == 0) std::printf("SKIPPED: no CUDA device: %s\n", why.c_str());
      return 0;
    }
#endif
  } else {
    rows_ptr = make_host_rows(world, H, K);
  }
  BenchRows& moves = *rows_ptr;
  if (me == 0) std::printf("# rows: %s\n", moves.describe().c_str());
  layer::PassPlan pass;
  std::vector<std::int32_t> ids, peer_ids;
  std::vector<float> weights, x, ref_send, ref_recv;
  std::int64_t total_wrong = 0;
  for (const bool hier : kinds) {
    const layer::PassLayout lay{&where, K, hier, 0.0, "bench exchange"};
    if (me == 0)
      std::printf("#\n# exchange %s\n# %9s %11s %12s | %10s %9s %9s | %10s %9s %9s | %9s %9s %6s | %8s\n",
                  hier ? "hierarchical" : "flat", "tokens", "rows", "bytes", "time_us", "algbw", "busbw", "ret_us",
                  "algbw", "busbw", "ref_us", "ref_bw", "bw/ref", "#wrong");
    for (std::int64_t T = t_min; T <= t_max; T = T * factor) {
      make_routing(seed, me, T, E, K, ids);
      weights.assign(static_cast<std::size_t>(T * K), 1.0f / static_cast<float>(K));
      x.resize(static_cast<std::size_t>(T * H));
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t h = 0; h < H; ++h) x[static_cast<std::size_t>(t * H + h)] = row_value(me, t, h);
      Row row;
      row.tokens = T;
      std::vector<double> plan_ms, time_ms, ret_ms, ref_ms;
      double remote = 0.0, ret_remote = 0.0;
      for (std::int64_t it = 0; it < warmup + iters; ++it) {
        world.barrier("bench exchange plan")->wait();
        auto t0 = Clock::now();
        pass.route(lay, me, P, ids, weights, T, 1);
        pass.exchange_metadata(world, world.default_timeout());
        pass.finish();
        const double pm = ms_since(t0);
        moves.prepare(pass, T);
        const auto& o = pass.origin();
        moves.load(pass, x);
        moves.clear_recv(pass.main.recv_rows());
        moves.finish();
        world.barrier("bench exchange dispatch")->wait();
        moves.remote_bytes = 0.0;
        t0 = Clock::now();
        layer::dispatch(pass, moves, 0, false, "bench dispatch");
        layer::arrive(pass, moves, 0);
        moves.finish();
        const double dm = ms_since(t0);
        remote = moves.remote_bytes;
        // Every received row goes back as it came (what an identity expert would return).
        moves.echo(pass.main.recv_rows());
        moves.finish();
        world.barrier("bench exchange return")->wait();
        moves.remote_bytes = 0.0;
        t0 = Clock::now();
        layer::give_back(pass, moves, 0, false, false, "bench return");
        layer::relay(pass, moves, 0, false, "bench relay");
        moves.ready();
        moves.finish();
        const double rm = ms_since(t0);
        ret_remote = moves.remote_bytes;
        layer::sum_returns(pass, moves, 0, false, false);
        moves.finish();
        // The reference: one MPI alltoall of equal blocks with this size's mean bytes per rank.
        const double mean_rows = sum_over_ranks(world, static_cast<double>(o.send_rows())) / P;
        const auto block = std::max<std::int64_t>(1, static_cast<std::int64_t>(mean_rows * static_cast<double>(H)) / P);
        if (static_cast<std::int64_t>(ref_send.size()) < block * P) {
          ref_send.assign(static_cast<std::size_t>(block * P), 1.0f);
          ref_recv.assign(ref_send.size(), 0.0f);
        }
        world.barrier("bench exchange reference")->wait();
        t0 = Clock::now();
        world.alltoall(ref_send.data(), ref_recv.data(), block, comm::DataType::kFloat32, "bench reference")->wait();
        const double fm = ms_since(t0);
        row.ref_remote_bytes = 4.0 * static_cast<double>(block) * (P - 1);
        row.rows = mean_rows;
        if (it < warmup) continue;
        plan_ms.push_back(max_over_ranks(world, pm));
        time_ms.push_back(max_over_ranks(world, dm));
        ret_ms.push_back(max_over_ranks(world, rm));
        ref_ms.push_back(max_over_ranks(world, fm));
      }
      row.bytes = row.rows * 4.0 * static_cast<double>(H);
      row.plan_ms = median(plan_ms);
      row.time_ms = median(time_ms);
      row.ret_ms = median(ret_ms);
      row.ref_ms = median(ref_ms);
      row.remote_bytes = max_over_ranks(world, remote);
      row.ret_remote_bytes = max_over_ranks(world, ret_remote);
      if (check) {
        // Dispatch: from every source p, exactly the rows of p's tokens with a pick on this rank, in
        // token order, as p holds them. Return: each token's sum is (its destination ranks) x its row.
        std::int64_t wrong = 0;
        const auto& m = pass.main;
        std::vector<float> recv_host, out_host;
        moves.read(layer::Buf::kRecv, m.recv_rows() * H, recv_host);
        moves.read(layer::Buf::kOut, T * H, out_host);
        const float* recv = recv_host.data();
        for (int p = 0; p < P; ++p) {
          make_routing(seed, p, T, E, K, peer_ids);
          std::vector<std::int64_t> expect;
          for (std::int64_t t = 0; t < T; ++t)
            for (std::int64_t j = 0; j < K; ++j)
              if (placement.owner(peer_ids[static_cast<std::size_t>(t * K + j)]) == me) {
                expect.push_back(t);
                break;
              }
          const std::int64_t got = m.recv_counts[m.cp(0, p)], first = m.recv_displ(0, p);
          wrong += std::abs(got - static_cast<std::int64_t>(expect.size()));
          for (std::int64_t i = 0; i < std::min<std::int64_t>(got, static_cast<std::int64_t>(expect.size())); ++i) {
            const float* r = recv + (first + i) * H;
            bool ok = true;
            for (std::int64_t h = 0; h < H && ok; ++h) ok = r[h] == row_value(p, expect[static_cast<std::size_t>(i)], h);
            wrong += ok ? 0 : 1;
          }
        }
        const float* out = out_host.data();
        for (std::int64_t t = 0; t < T; ++t) {
          std::vector<int> dest;
          for (std::int64_t j = 0; j < K; ++j) dest.push_back(placement.owner(ids[static_cast<std::size_t>(t * K + j)]));
          std::sort(dest.begin(), dest.end());
          const auto n = static_cast<float>(std::unique(dest.begin(), dest.end()) - dest.begin());
          bool ok = true;
          for (std::int64_t h = 0; h < H && ok; ++h) ok = out[t * H + h] == n * row_value(me, t, h);
          wrong += ok ? 0 : 1;
        }
        row.wrong = total_over_ranks(world, wrong);
        total_wrong += row.wrong;
      }
      if (me != 0) continue;
      const auto gbs = [](double bytes, double ms) { return ms > 0 ? bytes / (ms * 1e6) : 0.0; };
      const double busbw = gbs(row.remote_bytes, row.time_ms), ref_bw = gbs(row.ref_remote_bytes, row.ref_ms);
      std::printf("  %9lld %11.0f %12.0f | %10.1f %9.3f %9.3f | %10.1f %9.3f %9.3f | %9.1f %9.3f %6.2f | %8s\n",
                  static_cast<long long>(T), row.rows, row.bytes, 1e3 * row.time_ms, gbs(row.bytes, row.time_ms),
                  busbw, 1e3 * row.ret_ms, gbs(row.bytes, row.ret_ms), gbs(row.ret_remote_bytes, row.ret_ms),
                  1e3 * row.ref_ms, ref_bw, ref_bw > 0 ? busbw / ref_bw : 0.0,
                  check ? std::to_string(row.wrong).c_str() : "-");
      if (opt.on("json")) {
        nlohmann::json j{{"bench", "exchange"}, {"exchange", hier ? "hierarchical" : "flat"}, {"ranks", P},
                         {"nodes", topology.num_nodes()}, {"hidden", H}, {"experts", E}, {"topk", K},
                         {"tokens_per_rank", T}, {"rows", row.rows}, {"bytes", row.bytes},
                         {"plan_us", 1e3 * row.plan_ms}, {"time_us", 1e3 * row.time_ms},
                         {"algbw_GBps", gbs(row.bytes, row.time_ms)}, {"busbw_GBps", busbw},
                         {"ret_time_us", 1e3 * row.ret_ms}, {"ret_algbw_GBps", gbs(row.bytes, row.ret_ms)},
                         {"ret_busbw_GBps", gbs(row.ret_remote_bytes, row.ret_ms)},
                         {"remote_bytes", row.remote_bytes}, {"ref_time_us", 1e3 * row.ref_ms},
                         {"ref_busbw_GBps", ref_bw}, {"busbw_over_ref", ref_bw > 0 ? busbw / ref_bw : 0.0},
                         {"iters", iters}};
        if (check) j["wrong"] = row.wrong;
        std::printf("%s\n", j.dump().c_str());
      }
      std::fflush(stdout);
    }
  }
  if (me == 0 && check) std::printf("# %s: %lld wrong rows\n", total_wrong ? "FAILED" : "checked", static_cast<long long>(total_wrong));
  return total_wrong == 0 ? 0 : 1;
}

}  // namespace moex::tools
