// sched::ExchangePlan (pure, no MPI): a hand-checked send side, the canonical receive layout of
// simulated ranks for several chunk counts (built from their metadata), and bad input.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "base/error.h"
#include "scheduler/capacity.h"
#include "scheduler/exchange_plan.h"

namespace moex {
namespace {

using I64 = std::vector<std::int64_t>;
using I32 = std::vector<std::int32_t>;
std::size_t z(std::int64_t v) { return static_cast<std::size_t>(v); }

// World 2, contiguous placement of 4 experts: rank 0 holds experts 0, 1 (slots 0, 1), rank 1 holds
// 2, 3. Rank 0 has 3 tokens, K = 2, in 2 chunks (token 0 | tokens 1, 2):
//   token 0 -> experts 3, 0   token 1 -> experts 2, 3   token 2 -> experts 1, 0
const I32 kIds{3, 0, 2, 3, 1, 0};
const std::vector<float> kWeights{0.6f, 0.4f, 0.7f, 0.3f, 0.8f, 0.2f};

TEST(ExchangePlanExample, SendSide) {
  const auto placement = sched::ExpertPlacement::contiguous(4, 2);
  const auto topo = sched::Topology::single_node(2);
  std::vector<int> rank;
  I32 slot;
  sched::route_picks(kIds, {}, 2, &placement, nullptr, topo, 0, rank, slot);
  EXPECT_EQ(rank, (std::vector<int>{1, 0, 1, 1, 0, 0}));
  EXPECT_EQ(slot, (I32{1, 0, 0, 1, 1, 0}));
  sched::ExchangePlan plan;
  plan.build_send(rank, slot, 3, 2, 2, 0, 2);
  // chunk 0: (t0 -> rank 0), (t0 -> rank 1); chunk 1: (t2 -> rank 0), (t1 -> rank 1)
  EXPECT_EQ(plan.send_counts, (I64{1, 1, 1, 1}));
  EXPECT_EQ(plan.send_token, (I64{0, 0, 2, 1}));
  EXPECT_EQ(plan.send_code, (I32{0, -1, 1, -1, 1, 0, 0, 1}));
  EXPECT_EQ(plan.send_k, (I32{1, -1, 0, -1, 0, 1, 0, 1}));
  EXPECT_EQ(plan.token_offsets, (I64{0, 2, 3, 4}));
  EXPECT_EQ(plan.token_rows, (I64{0, 1, 3, 2}));
  EXPECT_EQ(plan.pick_back, (I64{2, 0, 6, 7, 4, 5}));
  std::vector<float> meta;
  plan.pack_meta(kWeights, meta);
  // Row 2 (token 2 to rank 0): codes 1, 0 then weights of top-K positions 0, 1.
  EXPECT_EQ(std::vector<float>(meta.begin() + 8, meta.begin() + 12), (std::vector<float>{1.0f, 0.0f, 0.8f, 0.2f}));
  I64 counts, displs;
  plan.chunk_blocks(1, true, 3, counts, displs);
  EXPECT_EQ(counts, (I64{3, 3}));
  EXPECT_EQ(displs, (I64{0, 3}));
}

TEST(ExchangePlanExample, DroppedPicksMakeNoRow) {
  const auto placement = sched::ExpertPlacement::contiguous(4, 2);
  const auto topo = sched::Topology::single_node(2);
  std::vector<int> rank;
  I32 slot;
  const std::vector<std::uint8_t> kept{1, 0, 1, 1, 0, 0};
  sched::route_picks(kIds, kept, 2, &placement, nullptr, topo, 0, rank, slot);
  sched::ExchangePlan plan;
  plan.build_send(rank, slot, 3, 2, 2, 0, 1);
  EXPECT_EQ(plan.send_counts, (I64{0, 2}));  // token 2 dropped both picks; token 0 kept only rank 1's
  EXPECT_EQ(plan.pick_back[1], -1);
  EXPECT_EQ(plan.pick_back[4], -1);
}

// ---------------------------------------------------------------------------------------------------
// Simulated ranks: every rank's send side, and rank q's receive side built from them

struct Sim {
  int P = 3;
  std::int64_t E = 6, K = 2;
  std::vector<std::int64_t> tokens{5, 0, 9};
  std::vector<I32> ids;
  std::vector<std::vector<float>> weights;
  explicit Sim(unsigned seed) {
    std::mt19937 rng(seed);
    for (int p = 0; p < P; ++p) {
      I32 id;
      std::vector<float> w;
      for (std::int64_t t = 0; t < tokens[z(p)]; ++t) {
        const auto a = static_cast<std::int32_t>(rng() % E);
        auto b = static_cast<std::int32_t>(rng() % (E - 1));
        if (b >= a) ++b;
        id.insert(id.end(), {a, b});
        w.insert(w.end(), {0.25f + 0.01f * static_cast<float>(t), 0.5f + 0.01f * static_cast<float>(t)});
      }
      ids.push_back(id);
      weights.push_back(w);
    }
  }
  /// Every rank's send plan with `chunks` chunks, and rank q's receive side from their metadata.
  void plans(int chunks, int q, std::vector<sched::ExchangePlan>& send, sched::ExchangePlan& recv) const {
    const auto placement = sched::ExpertPlacement::contiguous(E, P);
    const auto topo = sched::Topology::single_node(P);
    send.assign(z(P), {});
    const std::int64_t S = placement.num_local(q);
    I64 counts_cp(z(P * chunks));
    std::vector<std::vector<float>> meta(z(P));
    std::vector<float> all_meta;
    for (int p = 0; p < P; ++p) {
      std::vector<int> rank;
      I32 slot;
      sched::route_picks(ids[z(p)], {}, K, &placement, nullptr, topo, p, rank, slot);
      send[z(p)].build_send(rank, slot, tokens[z(p)], K, P, p, chunks);
      send[z(p)].pack_meta(weights[z(p)], meta[z(p)]);
      for (int c = 0; c < chunks; ++c) counts_cp[z(c * P + p)] = send[z(p)].send_counts[send[z(p)].cp(c, q)];
    }
    // What q receives: chunk by chunk, source by source, each source's rows to q in send order.
    for (int c = 0; c < chunks; ++c)
      for (int p = 0; p < P; ++p) {
        const float* m = meta[z(p)].data() + send[z(p)].send_displ(c, q) * 2 * K;
        all_meta.insert(all_meta.end(), m, m + send[z(p)].send_counts[send[z(p)].cp(c, q)] * 2 * K);
      }
    recv.topk = K;
    recv.rank = q;  // (set by build_send in a layer, whose plan has both sides)
    recv.build_receive_from_meta(P, chunks, S, counts_cp, all_meta);
  }
};

/// Each entry of `recv` as (slot, source, token, top-K position, weight), in canonical order.
using Entry = std::tuple<std::int64_t, int, std::int64_t, std::int32_t, float>;
std::vector<Entry> entries_of(const sched::ExchangePlan& recv, const std::vector<sched::ExchangePlan>& send, int q) {
  std::vector<Entry> out;
  for (std::int64_t s = 0; s < recv.num_local; ++s)
    for (std::int64_t e = recv.slot_offsets[z(s)]; e < recv.slot_offsets[z(s) + 1]; ++e) {
      const std::int64_t r = recv.entry_row[z(e)];
      int c = 0, p = 0;  // the block (c, p) holding recv row r
      for (c = 0; c < recv.chunks; ++c)
        for (p = 0; p < recv.world; ++p)
          if (r >= recv.recv_displ(c, p) && r < recv.recv_displ(c, p) + recv.recv_counts[recv.cp(c, p)]) goto found;
      ADD_FAILURE() << "entry " << e << " names recv row " << r << " outside every block";
      return out;
    found:
      const sched::ExchangePlan& from = send[z(p)];
      const std::int64_t srow = from.send_displ(c, q) + (r - recv.recv_displ(c, p));
      const std::int32_t f = recv.entry_pick[z(e)];
      EXPECT_EQ(from.send_code[z(srow * from.topk + f)], s) << "entry " << e;
      out.emplace_back(s, p, from.send_token[z(srow)], from.send_k[z(srow * from.topk + f)], recv.entry_weight[z(e)]);
    }
  return out;
}

TEST(ExchangePlanExample, ZeroTokensAndAReusedPlan) {
  sched::ExchangePlan plan;
  plan.build_send(std::vector<int>{0, 1, 1, 0}, I32{1, 0, 1, 0}, 2, 2, 2, 0, 2);
  ASSERT_EQ(plan.send_rows(), 4);
  // Rebuilt with no tokens: nothing of the previous build is left.
  plan.build_send({}, {}, 0, 2, 3, 1, 2);
  EXPECT_EQ(plan.send_rows(), 0);
  EXPECT_EQ(plan.send_counts, (I64{0, 0, 0, 0, 0, 0}));
  EXPECT_TRUE(plan.send_token.empty());
  EXPECT_TRUE(plan.send_code.empty());
  EXPECT_EQ(plan.token_offsets, (I64{0}));
  std::vector<float> meta;
  plan.pack_meta({}, meta);
  EXPECT_TRUE(meta.empty());
  // Rebuilt with one token: one row, in chunk 1 (chunk 0 of 2 is empty).
  plan.build_send(std::vector<int>{2}, I32{3}, 1, 1, 3, 1, 2);
  EXPECT_EQ(plan.send_counts, (I64{0, 0, 0, 0, 0, 1}));
  EXPECT_EQ(plan.send_token, (I64{0}));
  EXPECT_EQ(plan.send_code, (I32{3}));
  EXPECT_EQ(plan.pick_back, (I64{0}));
}

TEST(ExchangePlanForwarding, StageBPicksFromTheForwardedCodes) {
  // A node of ranks {4, 6}, 3 slots each: code 4 = local index 1, slot 1 -> rank 6 slot 1.
  const std::vector<int> node{4, 6};
  // Two rows of stride 5 (K = 2 codes, 2 weights, one more float): [4, -1 | 0.5, 0 | x], [0, 5 | ...].
  const std::vector<float> meta{4.0f, -1.0f, 0.5f, 0.0f, 9.0f, 0.0f, 5.0f, 0.25f, 0.75f, 9.0f};
  std::vector<int> rank;
  I32 slot;
  std::vector<float> w;
  sched::forwarded_picks(meta.data(), 2, 5, 2, node, 3, rank, slot, &w);
  EXPECT_EQ(rank, (std::vector<int>{6, -1, 4, 6}));
  EXPECT_EQ(slot, (I32{1, -1, 0, 2}));
  EXPECT_EQ(w, (std::vector<float>{0.5f, 0.0f, 0.25f, 0.75f}));
  for (float bad : {6.0f, 1.5f, -2.0f}) {
    const std::vector<float> m{bad, -1.0f, 0.5f, 0.0f};
    EXPECT_THROW(sched::forwarded_picks(m.data(), 1, 4, 2, node, 3, rank, slot), InvalidArgument) << bad;
  }
}

/// ExchangePlan::compute_order(self, split) against the plan it views.
void check_compute_order(const sched::ExchangePlan& recv, std::int64_t K, int self, std::int64_t split) {
  const std::string tag = "rank " + std::to_string(recv.rank) + " chunks " + std::to_string(recv.chunks) + " self " +
                          std::to_string(self) + " split " + std::to_string(split);
  sched::ExchangePlan::ComputeOrder cm;
  recv.compute_order(cm, self, split);
  const int C = recv.chunks;
  const std::int64_t S = recv.num_local;
  ASSERT_EQ(cm.groups, self < 0 ? C : C + 2) << tag;
  std::int64_t n = 0;
  for (std::int64_t e : cm.order) EXPECT_EQ(cm.position[z(e)], n++) << tag;
  ASSERT_EQ(n, recv.entries()) << tag;
  // The (chunk, source) block a recv row belongs to.
  const auto block_of = [&](std::int64_t r) {
    for (int c = 0; c < C; ++c)
      for (int p = 0; p < recv.world; ++p)
        if (r >= recv.recv_displ(c, p) && r < recv.recv_displ(c, p) + recv.recv_counts[recv.cp(c, p)])
          return std::make_pair(c, p);
    return std::make_pair(-1, -1);
  };
  // Group g's slot s: contiguous positions, entries of slot s from the group's chunk and sources, in
  // canonical order; every entry in exactly one group.
  std::int64_t covered = 0;
  for (int g = 0; g < cm.groups; ++g)
    for (std::int64_t s = 0; s < S; ++s) {
      const std::int64_t f = cm.first(g, s, S), m = cm.group_slot[z(g * S + s)];
      EXPECT_EQ(f, covered) << tag << " group " << g << " slot " << s;
      covered += m;
      const bool own = self >= 0 && (g == 0 || g == C + 1);
      if (own && (g == 0 ? s >= split : s < split)) {
        EXPECT_EQ(m, 0) << tag << " own group " << g << " slot " << s;
      }
      for (std::int64_t i = f; i < f + m; ++i) {
        const std::int64_t e = cm.order[z(i)];
        if (i > f) {
          EXPECT_LT(cm.order[z(i - 1)], e) << tag << ": out of canonical order within a slot block";
        }
        EXPECT_TRUE(e >= recv.slot_offsets[z(s)] && e < recv.slot_offsets[z(s) + 1]) << tag;
        EXPECT_EQ(cm.entry_row[z(i)], recv.entry_row[z(e)]) << tag;
        EXPECT_EQ(cm.entry_weight[z(i)], recv.entry_weight[z(e)]) << tag;
        const auto [c, p] = block_of(recv.entry_row[z(e)]);
        if (own) {
          EXPECT_EQ(p, self) << tag << " an own group's entry from another source";
        } else {
          EXPECT_EQ(c, self < 0 ? g : g - 1) << tag << " an entry of another chunk";
          EXPECT_NE(p, self) << tag << " a remote group's entry from this rank";
        }
      }
    }
  EXPECT_EQ(covered, recv.entries()) << tag;
  // Each recv row's positions (top-K order) are the entries of that row.
  ASSERT_EQ(static_cast<std::int64_t>(cm.row_offsets.size()), recv.recv_rows() + 1) << tag;
  EXPECT_EQ(cm.row_offsets.back(), recv.entries()) << tag;
  for (std::int64_t r = 0; r < recv.recv_rows(); ++r) {
    std::int64_t at = cm.row_offsets[z(r)];
    for (std::int64_t j = 0; j < K; ++j) {
      const std::int64_t m = cm.row_dw_entry[z(r * K + j)];
      EXPECT_EQ(m < 0, recv.row_entry[z(r * K + j)] < 0) << tag;
      if (m < 0) continue;
      EXPECT_EQ(cm.entry_row[z(m)], r) << tag;
      EXPECT_EQ(recv.entry_pick[z(cm.order[z(m)])], j) << tag;
      EXPECT_EQ(cm.row_entries[z(at)], m) << tag;
      EXPECT_EQ(cm.row_weight[z(at)], cm.entry_weight[z(m)]) << tag;
      ++at;
    }
    EXPECT_EQ(at, cm.row_offsets[z(r) + 1]) << tag;
  }
}

TEST(ExchangePlanReceive, CanonicalEntriesDoNotDependOnTheChunking) {
  const Sim sim(7);
  for (int q = 0; q < sim.P; ++q) {
    std::vector<Entry> first;
    for (int chunks : {1, 2, 3, 5, 12}) {
      std::vector<sched::ExchangePlan> send;
      sched::ExchangePlan recv;
      sim.plans(chunks, q, send, recv);
      const std::vector<Entry> got = entries_of(recv, send, q);
      // Every pick of every source that goes to q appears once, with its weight.
      std::int64_t expected = 0;
      for (int p = 0; p < sim.P; ++p)
        for (std::int64_t i = 0; i < sim.tokens[z(p)] * sim.K; ++i)
          if (sim.ids[z(p)][z(i)] / 2 == q) ++expected;
      EXPECT_EQ(static_cast<std::int64_t>(got.size()), expected) << "rank " << q << ", chunks " << chunks;
      for (const Entry& e : got)
        EXPECT_EQ(std::get<4>(e), sim.weights[z(std::get<1>(e))][z(std::get<2>(e) * sim.K + std::get<3>(e))]);
      if (chunks == 1) first = got;
      EXPECT_EQ(got, first) << "rank " << q << ": canonical order changed with " << chunks << " chunks";
      // The canonical order: by slot, then source, then token (chunks come in token order, and a
      // source sends a token at most one row), then top-K position.
      for (std::size_t i = 1; i < got.size(); ++i) {
        const auto key = [&](std::size_t n) {
          return std::make_tuple(std::get<0>(got[n]), std::get<1>(got[n]), std::get<2>(got[n]), std::get<3>(got[n]));
        };
        EXPECT_LT(key(i - 1), key(i)) << "entries " << i - 1 << " and " << i << " out of canonical order";
      }
      // Each recv row's picks name the entries that name it back.
      for (std::int64_t e = 0; e < recv.entries(); ++e)
        EXPECT_EQ(recv.row_entry[z(recv.entry_row[z(e)] * sim.K + recv.entry_pick[z(e)])], e);
      // Every compute order (whole chunks; local-first's own rows first, with or without a split)
      // is a permutation, its inverse, and groups of contiguous slot blocks.
      const std::int64_t S = recv.num_local;
      for (const auto& [self, split] : std::vector<std::pair<int, std::int64_t>>{{-1, 0}, {q, S}, {q, 1}, {q, 0}})
        check_compute_order(recv, sim.K, self, split);
      sched::ExchangePlan::ComputeOrder bad;
      EXPECT_THROW(recv.compute_order(bad, (q + 1) % sim.P, 0), InvalidArgument) << "another rank's own rows";
      EXPECT_THROW(recv.compute_order(bad, q, S + 1), InvalidArgument) << "a split past the last slot";
    }
  }
}

TEST(ExchangePlanBadInput, RejectsWhatCannotBeRouted) {
  sched::ExchangePlan plan;
  const std::vector<int> dest{0, 2};
  const I32 code{0, 0};
  EXPECT_THROW(plan.build_send(dest, code, 1, 2, 2, 0, 1), InvalidArgument);  // rank 2 of 2
  EXPECT_THROW(plan.build_send(std::vector<int>{0, 1}, I32{0, 1 << 24}, 1, 2, 2, 0, 1), InvalidArgument);
  EXPECT_THROW(plan.build_send(std::vector<int>{0}, I32{0}, 1, 2, 2, 0, 1), InvalidArgument);  // sizes
  EXPECT_THROW(plan.build_send(std::vector<int>{0, 1}, I32{0, 0}, 1, 2, 2, 0, 0), InvalidArgument);  // chunks 0
  const I64 bad_starts{0, 2, 1};
  EXPECT_THROW(plan.build_send(std::vector<int>{0, 1}, I32{0, 0}, 1, 2, 2, 0, 2, bad_starts), InvalidArgument);
  const auto placement = sched::ExpertPlacement::contiguous(4, 2);
  std::vector<int> rank;
  I32 slot;
  EXPECT_THROW(sched::route_picks(I32{4, 0}, {}, 2, &placement, nullptr, sched::Topology::single_node(2), 0, rank, slot),
               InvalidArgument);
}

TEST(ExchangePlanBadInput, ReceiveChecksTheCodes) {
  sched::ExchangePlan recv;
  recv.topk = 2;
  const std::vector<float> foreign{5.0f, -1.0f, 0.5f, 0.0f};  // slot 5 of 2
  try {
    recv.build_receive_from_meta(1, 1, 2, I64{1}, foreign);
    ADD_FAILURE() << "a foreign slot was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("routing code 5"), std::string::npos) << e.what();
  }
  const std::vector<float> half{0.5f, -1.0f, 0.5f, 0.0f};  // not an integer code
  EXPECT_THROW(recv.build_receive_from_meta(1, 1, 2, I64{1}, half), InvalidArgument);
  EXPECT_THROW(recv.build_receive_from_meta(1, 1, 2, I64{2}, foreign), InvalidArgument);   // 2 rows, 1 row's floats
  EXPECT_THROW(recv.build_receive_from_meta(1, 1, 2, I64{-1}, {}), InvalidArgument);      // a negative count
  EXPECT_THROW(recv.build_receive(1, 1, 2, I64{-1}, I64{0, 0}), InvalidArgument);
  // A valid one after the refusals: one row with picks for slots 1 and 0.
  recv.build_receive_from_meta(1, 1, 2, I64{1}, std::vector<float>{1.0f, 0.0f, 0.25f, 0.75f});
  EXPECT_EQ(recv.slot_offsets, (I64{0, 1, 2}));
  EXPECT_EQ(recv.entry_pick, (I32{1, 0}));
  EXPECT_EQ(recv.entry_weight, (std::vector<float>{0.75f, 0.25f}));
  EXPECT_EQ(recv.row_entry, (I64{1, 0}));
}

}  // namespace
}  // namespace moex

// The capacity rule keeps, per expert, the ceil(cf * picks / E) heaviest picks; a factor so large that
// the product overflows an integer (1e300, found by scripts/mutate.py under UBSan) is dropless.
TEST(Capacity, KeepsTheHeaviestAndAHugeFactorIsDropless) {
  const std::vector<std::int32_t> ids = {0, 0, 0, 1, 0, 1};
  const std::vector<float> w = {0.1f, 0.9f, 0.5f, 0.2f, 0.7f, 0.3f};
  std::vector<std::uint8_t> kept;
  std::vector<std::int64_t> order;
  EXPECT_EQ(moex::sched::expert_capacity(1.0, 6, 2), 3);
  EXPECT_EQ(moex::sched::apply_capacity(ids, w, 2, 1.0, kept, order), 1);  // expert 0 has 4 picks, keeps 3
  EXPECT_EQ(kept, (std::vector<std::uint8_t>{0, 1, 1, 1, 1, 1}));
  for (const double cf : {1e300, 1e19, 7.0}) {
    EXPECT_EQ(moex::sched::expert_capacity(cf, 6, 2), 6) << cf;
    EXPECT_EQ(moex::sched::apply_capacity(ids, w, 2, cf, kept, order), 0) << cf;
  }
  EXPECT_THROW(moex::sched::expert_capacity(std::numeric_limits<double>::infinity(), 6, 2), moex::InvalidArgument);
}
