// MetadataExchange (the GPU layer's metadata exchange over a host communicator) at every rank count:
// the receive side it builds equals the one each rank predicts from every source's own send plan
// (every rank can draw every source's picks), for several chunkings, dropped picks and empty ranks;
// and bad input fails on every rank without putting the communicator out of step.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/communicator.h"
#include "runtime/layer/exchange_metadata.h"
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
      // Predicted: every source's rows to this rank, announced and placed block by block.
      std::vector<sched::ExchangePlan> src(static_cast<std::size_t>(P));
      std::vector<std::vector<float>> src_meta(static_cast<std::size_t>(P));
      std::vector<std::int64_t> rows_pc(z(P * chunks)), picks(z(P * chunks * S));
      for (int p = 0; p < P; ++p) {
        const Source s = draw(p, P, seed);
        src[z(p)].build_send(s.rank, s.slot, s.tokens, kK, P, p, chunks);
        src[z(p)].pack_meta(s.weights, src_meta[z(p)]);
        for (int c = 0; c < chunks; ++c) {
          rows_pc[z(p * chunks + c)] = src[z(p)].send_counts[src[z(p)].cp(c, me)];
          src[z(p)].picks_for(c, me, S, picks.data() + (p * chunks + c) * S);
        }
      }
      sched::ExchangePlan want;
      want.topk = kK;
      want.build_receive(P, chunks, S, rows_pc, picks);
      for (int c = 0; c < chunks; ++c)
        for (int p = 0; p < P; ++p)
          want.place_block(p, c, src_meta[z(p)].data() + src[z(p)].send_displ(c, me) * 2 * kK, 2 * kK);
      const std::string tag = "seed " + std::to_string(seed) + ", chunks " + std::to_string(chunks);
      EXPECT_EQ(plan.recv_counts, want.recv_counts) << tag;
      EXPECT_EQ(plan.slot_offsets, want.slot_offsets) << tag;
      EXPECT_EQ(plan.entry_row, want.entry_row) << tag;
      EXPECT_EQ(plan.entry_pick, want.entry_pick) << tag;
      EXPECT_EQ(plan.entry_weight, want.entry_weight) << tag;
      EXPECT_EQ(plan.row_entry, want.row_entry) << tag;
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
