// MetadataExchange (the metadata exchange of both layers' passes) and PassPlan at every rank count:
// the receive side it builds equals the one each rank predicts from every source's own send plan
// (every rank can draw every source's picks), for several chunkings, dropped picks and empty ranks;
// and bad input fails on every rank without putting the communicator out of step.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/communicator.h"
#include "runtime/layer/exchange_metadata.h"
#include "runtime/layer/expert_layout.h"
#include "runtime/layer/pass_plan.h"
#include "runtime/random.h"
#include "scheduler/exchange_plan.h"
#include "scheduler/expert_placement.h"
#include "tests/mpi_test_env.h"

namespace moex {
namespace {

constexpr std::chrono::milliseconds kTimeout{30'000};
constexpr std::int64_t kK = 3, kExperts = 8;
std::size_t z(std::int64_t v) { return static_cast<std::size_t>(v); }

void expect_all_ranks_passed() {
  EXPECT_TRUE(testing::all_ranks(!::testing::Test::HasFailure())) << "the test failed on at least one rank";
}

/// Rank p's picks: its token count (rank 1 has none when there are 3 or more ranks), ids with a
/// dropped pick now and then (destination -1), and weights.
struct Source {
  std::int64_t tokens = 0;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  std::vector<int> rank;
  std::vector<std::int32_t> slot;
};
Source draw(int p, int world, std::uint64_t seed) {
  Source s;
  s.tokens = world >= 3 && p == 1 ? 0 : 5 + p * 3;
  Rng rng(Rng::mix(seed, static_cast<std::uint64_t>(p)));
  const auto placement = sched::ExpertPlacement::contiguous(kExperts, world);
  for (std::int64_t i = 0; i < s.tokens * kK; ++i) {
    const auto e = static_cast<std::int32_t>(rng.next() % kExperts);
    const bool dropped = rng.next() % 7 == 0;
    s.ids.push_back(e);
    s.weights.push_back(static_cast<float>(rng.uniform()));
    s.rank.push_back(dropped ? -1 : placement.owner(e));
    s.slot.push_back(dropped ? -1 : static_cast<std::int32_t>(placement.local_slot(e)));
  }
  return s;
}

TEST(MetadataExchange, ReceiveSideEqualsTheOnePredictedFromEverySource) {
  auto& world = testing::world();
  const int P = world.size(), me = world.rank();
  const auto placement = sched::ExpertPlacement::contiguous(kExperts, P);
  const std::int64_t S = placement.num_local(me);
  MetadataExchange meta;  // reused across passes, as the layer does
  sched::ExchangePlan plan;
  for (std::uint64_t seed : {1u, 2u})
    for (int chunks : {1, 2, 5}) {
      const Source mine = draw(me, P, seed);
      plan.build_send(mine.rank, mine.slot, mine.tokens, kK, P, me, chunks);
      meta.run(plan, mine.weights, S, world, kTimeout);
      // Predicted from every source's send side: receive rows by chunk, then source, then the
      // source's send order; entries by slot, then source, then chunk, then row, then pick.
      std::vector<sched::ExchangePlan> src(static_cast<std::size_t>(P));
      std::vector<std::vector<float>> src_meta(static_cast<std::size_t>(P));
      for (int p = 0; p < P; ++p) {
        const Source s = draw(p, P, seed);
        src[z(p)].build_send(s.rank, s.slot, s.tokens, kK, P, p, chunks);
        src[z(p)].pack_meta(s.weights, src_meta[z(p)]);
      }
      std::vector<std::int64_t> recv_counts(z(P * chunks)), first_row(z(P * chunks));
      std::int64_t rows_so_far = 0;
      for (int c = 0; c < chunks; ++c)
        for (int p = 0; p < P; ++p) {
          first_row[z(c * P + p)] = rows_so_far;
          rows_so_far += recv_counts[z(c * P + p)] = src[z(p)].send_counts[src[z(p)].cp(c, me)];
        }
      std::vector<std::int64_t> slot_offsets{0}, entry_row, row_entry(z(rows_so_far * kK), -1);
      std::vector<std::int32_t> entry_pick;
      std::vector<float> entry_weight;
      for (std::int64_t slot = 0; slot < S; ++slot) {
        for (int p = 0; p < P; ++p)
          for (int c = 0; c < chunks; ++c) {
            const sched::ExchangePlan& sp = src[z(p)];
            for (std::int64_t i = 0; i < recv_counts[z(c * P + p)]; ++i)
              for (std::int64_t j = 0; j < kK; ++j) {
                const float* m = src_meta[z(p)].data() + (sp.send_displ(c, me) + i) * 2 * kK;
                if (m[j] != static_cast<float>(slot)) continue;
                const std::int64_t row = first_row[z(c * P + p)] + i;
                row_entry[z(row * kK + j)] = static_cast<std::int64_t>(entry_row.size());
                entry_row.push_back(row);
                entry_pick.push_back(static_cast<std::int32_t>(j));
                entry_weight.push_back(m[kK + j]);
              }
          }
        slot_offsets.push_back(static_cast<std::int64_t>(entry_row.size()));
      }
      const std::string tag = "seed " + std::to_string(seed) + ", chunks " + std::to_string(chunks);
      EXPECT_EQ(plan.recv_counts, recv_counts) << tag;
      EXPECT_EQ(plan.slot_offsets, slot_offsets) << tag;
      EXPECT_EQ(plan.entry_row, entry_row) << tag;
      EXPECT_EQ(plan.entry_pick, entry_pick) << tag;
      EXPECT_EQ(plan.entry_weight, entry_weight) << tag;
      EXPECT_EQ(plan.row_entry, row_entry) << tag;
      // The received metadata is every source's, in receive row order (chunk, source).
      std::vector<float> rows;
      for (int c = 0; c < chunks; ++c)
        for (int p = 0; p < P; ++p) {
          const auto first = src_meta[z(p)].begin() + src[z(p)].send_displ(c, me) * 2 * kK;
          rows.insert(rows.end(), first, first + src[z(p)].send_counts[src[z(p)].cp(c, me)] * 2 * kK);
        }
      EXPECT_EQ(meta.recv_meta, rows) << tag;
    }
  expect_all_ranks_passed();
}

/// ExpertLayout: each rank's slots, the widest rank and the multi-replica experts derived from a
/// placement or a replica layout; anything for another expert count or world size refused by name.
TEST(ExpertLayout, DerivesSlotsAndRefusesMismatches) {
  auto throws = [](const std::string& needle, auto&& make) {
    try {
      make();
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("layer x"), std::string::npos) << e.what();
    }
  };
  const auto placed = sched::ExpertPlacement::from_lists(5, {{0, 3}, {1}, {2, 4}});
  const layer::ExpertLayout a(placed, std::nullopt, std::nullopt, 5, 3, "layer x");
  EXPECT_EQ(std::vector<std::int64_t>(a.slots(2).begin(), a.slots(2).end()), (std::vector<std::int64_t>{2, 4}));
  EXPECT_EQ(a.max_slots(), 2);
  EXPECT_EQ(a.multi_experts(), 0);
  EXPECT_EQ(a.topology(), sched::Topology::single_node(3));
  EXPECT_THROW(layer::ExpertLayout(a).set_replicas(sched::ReplicaLayout::from_slots(5, {{0, 1}, {2, 3}, {4, 0}})),
               InvalidArgument);
  const auto reps = sched::ReplicaLayout::from_slots(3, {{0, 1}, {2, 0}});
  layer::ExpertLayout b(std::nullopt, reps, sched::Topology::uniform(2, 1), 3, 2, "layer x");
  EXPECT_EQ(b.multi_index(0), 0);  // expert 0 has two replicas; 1 and 2 one each
  EXPECT_EQ(b.multi_index(1), -1);
  EXPECT_EQ(b.multi_experts(), 1);
  b.set_replicas(sched::ReplicaLayout::from_slots(3, {{0, 1}, {2, 1}}));
  EXPECT_EQ(b.multi_index(0), -1);
  EXPECT_EQ(b.multi_index(1), 0);
  EXPECT_FALSE(b.same_slots(layer::ExpertLayout(std::nullopt, reps, std::nullopt, 3, 2, "layer x")));
  throws("placement is for 3 ranks", [&] { layer::ExpertLayout(placed, std::nullopt, std::nullopt, 5, 2, "layer x"); });
  throws("placement covers 5 experts", [&] { layer::ExpertLayout(placed, std::nullopt, std::nullopt, 6, 3, "layer x"); });
  throws("topology is for 4 ranks",
         [&] { layer::ExpertLayout(placed, std::nullopt, sched::Topology::single_node(4), 5, 3, "layer x"); });
  throws("replica layout is for 2 ranks", [&] { layer::ExpertLayout(std::nullopt, reps, std::nullopt, 3, 3, "layer x"); });
  throws("exactly one", [&] { layer::ExpertLayout(placed, reps, std::nullopt, 5, 3, "layer x"); });
}

/// PassPlan (the host side of both layers' passes): the hierarchical plan's receive side is the flat
/// one's (so both exchanges compute the same entries in the same order), its arrival maps are
/// inverse permutations within each chunk, and the flat plan's per-node groups sum every returned
/// row exactly once, per node in rank order, nodes in node order.
TEST(PassPlan, HierarchicalReceivesAsFlatAndGroupsCoverEveryRow) {
  auto& world = testing::world();
  const int P = world.size(), me = world.rank();
  const auto placement = sched::ExpertPlacement::contiguous(kExperts, P);
  const auto topo = sched::Topology::uniform(P, P >= 2 ? 2 : 1);  // 2-rank nodes where possible
  const Source src = draw(me, P, 11);
  for (const int chunks : {1, 3}) {
    SCOPED_TRACE("chunks " + std::to_string(chunks));
    layer::PassPlan flat, hier;
    const layer::ExpertLayout where(placement, std::nullopt, topo, kExperts, P, "test");
    layer::PassLayout lay{&where, kK, false, /*capacity_factor=*/1.0, "test"};  // some picks dropped
    flat.route(lay, me, P, src.ids, src.weights, src.tokens, chunks);
    flat.exchange_metadata(world, kTimeout);
    flat.finish();
    lay.hierarchical = true;
    hier.route(lay, me, P, src.ids, src.weights, src.tokens, chunks);
    hier.exchange_metadata(world, kTimeout);
    hier.finish();
    EXPECT_EQ(hier.kept, flat.kept);
    EXPECT_EQ(hier.main.recv_counts, flat.main.recv_counts);
    EXPECT_EQ(hier.main.slot_offsets, flat.main.slot_offsets);
    EXPECT_EQ(hier.main.entry_row, flat.main.entry_row);
    EXPECT_EQ(hier.main.entry_weight, flat.main.entry_weight);
    EXPECT_EQ(hier.main.row_entry, flat.main.row_entry);
    // Stage B brings exactly main's rows, chunk by chunk: arrival_row / row_arrival are inverse
    // permutations of each chunk's range.
    const sched::ExchangePlan& m = hier.main;
    ASSERT_EQ(hier.b.recv_rows(), m.recv_rows());
    ASSERT_EQ(hier.arrival_row.size(), z(m.recv_rows()));
    for (int c = 0; c < chunks; ++c) {
      ASSERT_EQ(hier.b.chunk_recv_count(c), m.chunk_recv_count(c));
      for (std::int64_t i = hier.b.chunk_recv_first(c); i < hier.b.chunk_recv_first(c) + m.chunk_recv_count(c); ++i) {
        const std::int64_t r = hier.arrival_row[z(i)];
        EXPECT_GE(r, m.chunk_recv_first(c));
        EXPECT_LT(r, m.chunk_recv_first(c) + m.chunk_recv_count(c));
        EXPECT_EQ(hier.row_arrival[z(r)], i);
      }
    }
    // Stage B's tokens are stage A's receive rows.
    EXPECT_EQ(hier.b.tokens, hier.a.recv_rows());
    EXPECT_FALSE(hier.per_node);
    // Flat groups: with 2-rank nodes, every send row in exactly one group, a group's rows on one
    // node in rank order, a token's groups in node order.
    EXPECT_EQ(flat.per_node, P >= 2);
    if (!flat.per_node) continue;
    const sched::ExchangePlan& f = flat.main;
    std::vector<int> node_of_row(z(f.send_rows()), -1), seen(z(f.send_rows()), 0);
    for (int c = 0; c < chunks; ++c)
      for (int q = 0; q < P; ++q)
        for (std::int64_t r = f.send_displ(c, q); r < f.send_offsets[f.cp(c, q) + 1]; ++r) node_of_row[z(r)] = topo.node_of(q);
    ASSERT_EQ(flat.token_groups.size(), z(src.tokens) + 1);
    for (std::int64_t t = 0; t < src.tokens; ++t) {
      int last_node = -1;
      for (std::int64_t gi = flat.token_groups[z(t)]; gi < flat.token_groups[z(t) + 1]; ++gi) {
        const std::int64_t g = flat.group_ids[z(gi)];
        const int node = node_of_row[z(flat.group_rows[z(flat.group_offsets[z(g)])])];
        EXPECT_GT(node, last_node) << "token " << t;
        last_node = node;
        for (std::int64_t i = flat.group_offsets[z(g)]; i < flat.group_offsets[z(g) + 1]; ++i) {
          const std::int64_t r = flat.group_rows[z(i)];
          EXPECT_EQ(f.send_token[z(r)], t);
          EXPECT_EQ(node_of_row[z(r)], node);
          if (i > flat.group_offsets[z(g)]) {
            EXPECT_GT(r, flat.group_rows[z(i) - 1]);  // rank order
          }
          ++seen[z(r)];
        }
      }
    }
    for (std::size_t r = 0; r < seen.size(); ++r) EXPECT_EQ(seen[r], 1) << "send row " << r;
  }
  expect_all_ranks_passed();
}

TEST(MetadataExchangeBadInput, CommunicatorMustMatchThePlan) {
  auto& world = testing::world();
  sched::ExchangePlan plan;
  MetadataExchange meta;
  EXPECT_THROW(meta.run(plan, {}, 1, world, kTimeout), InvalidArgument);  // no send side yet
  // Planned for one more rank than the communicator has: rejected before any communication.
  plan.build_send(std::vector<int>{0}, std::vector<std::int32_t>{0}, 1, 1, world.size() + 1, 0, 1);
  EXPECT_THROW(meta.run(plan, std::vector<float>{1.0f}, 1, world, kTimeout), InvalidArgument);
  expect_all_ranks_passed();
}

TEST(MetadataExchangeBadInput, DifferentChunkCountsThrowOnEveryRank) {
  auto& world = testing::world();
  if (world.size() < 2) GTEST_SKIP() << "needs at least 2 ranks";
  const int P = world.size(), me = world.rank();
  const auto placement = sched::ExpertPlacement::contiguous(kExperts, P);
  const Source mine = draw(me, P, 3);
  sched::ExchangePlan plan;
  MetadataExchange meta;
  plan.build_send(mine.rank, mine.slot, mine.tokens, kK, P, me, me == 1 ? 3 : 2);
  try {
    meta.run(plan, mine.weights, placement.num_local(me), world, kTimeout);
    ADD_FAILURE() << "differing chunk counts were accepted";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("chunks"), std::string::npos) << m;
    EXPECT_NE(m.find("rank 1 has 3"), std::string::npos) << m;
  }
  // The communicator is still in step: a correct exchange works afterwards.
  plan.build_send(mine.rank, mine.slot, mine.tokens, kK, P, me, 2);
  EXPECT_NO_THROW(meta.run(plan, mine.weights, placement.num_local(me), world, kTimeout));
  expect_all_ranks_passed();
}

TEST(MetadataExchangeBadInput, ASlotThisRankDoesNotHoldIsRejected) {
  auto& world = testing::world();
  const int P = world.size(), me = world.rank();
  // Every rank sends one pick to rank 0 naming slot 5; rank 0 holds 1 slot here.
  sched::ExchangePlan plan;
  MetadataExchange meta;
  plan.build_send(std::vector<int>{0}, std::vector<std::int32_t>{5}, 1, 1, P, me, 1);
  if (me == 0) {
    try {
      meta.run(plan, std::vector<float>{0.5f}, 1, world, kTimeout);
      ADD_FAILURE() << "a foreign slot was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("[0, 1)"), std::string::npos) << e.what();
    }
  } else {
    EXPECT_NO_THROW(meta.run(plan, std::vector<float>{0.5f}, 0, world, kTimeout));
  }
  expect_all_ranks_passed();
}

}  // namespace
}  // namespace moex
