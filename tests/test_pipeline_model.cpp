// The pipeline cost model (scheduler/pipeline_model.h): hand-worked timelines, the candidates and
// the choice between them. Pure arithmetic: no MPI, no timing.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "base/error.h"
#include "scheduler/auto_schedule.h"
#include "scheduler/pipeline_model.h"

namespace moex::sched {
namespace {

/// One local expert with 100 own entries and 100 from one other rank; 1 ms per row, no fixed
/// cost; every whole exchange takes 100 ms at the link rate; no shared experts or other work.
PassWork two_rank_work() {
  PassWork w;
  w.self_entries = {100};
  w.remote_entries = {{100}};
  w.fwd_dispatch_bytes = w.fwd_combine_bytes = w.bwd_dispatch_bytes = w.bwd_combine_bytes = 1000.0;
  return w;
}
MachineRates rates(double fixed_ms, double link) {
  MachineRates r;
  r.gemm_fixed_ms = fixed_ms;
  r.gemm_row_ms = 1.0;
  r.link_bytes_per_ms = link;
  return r;
}

TEST(PipelineModel, HandWorkedTimelines) {
  const PassWork w = two_rank_work();
  const MachineRates r = rates(0.0, 10.0);  // 1000 bytes at 10 bytes/ms = 100 ms per exchange
  // Unsplit: dispatch 100, experts 200, combine 100 = 400; backward the same plus the weight
  // gradients (200) after the combine went out: 100 + 200 + max(100, 200) = 500.
  Prediction p = predict(w, r, {1, false}, true);
  EXPECT_DOUBLE_EQ(p.forward_ms, 400.0);
  EXPECT_DOUBLE_EQ(p.backward_ms, 500.0);
  // Local-first: own rows (100) while the dispatch travels (100), the others' rows (100), their
  // combine (100): 300; backward 100 + 100 + weights 200 (the combine travels meanwhile) = 400.
  p = predict(w, r, {1, true}, true);
  EXPECT_DOUBLE_EQ(p.forward_ms, 300.0);
  EXPECT_DOUBLE_EQ(p.backward_ms, 400.0);
  // Local-first, 2 chunks: dispatches at 50 and 100; own rows 0-100, chunk 0 100-150, its combine
  // 150-200, chunk 1 150-200, its combine 200-250: 250. Backward: 250 ... then weights 200-400.
  p = predict(w, r, {2, true}, true);
  EXPECT_DOUBLE_EQ(p.forward_ms, 250.0);
  EXPECT_DOUBLE_EQ(p.backward_ms, 400.0);
  // Serialised: every exchange and every GEMM in a row, for any chunking.
  p = predict(w, r, {2, true}, false);
  EXPECT_DOUBLE_EQ(p.forward_ms, 400.0);
  EXPECT_DOUBLE_EQ(p.backward_ms, 600.0);
}

// Local-split: the own rows of the first slot hide the first dispatch, those of the second the
// last combine.
TEST(PipelineModel, LocalSplitHidesTheLastCombine) {
  PassWork w;
  w.self_entries = {100, 100};
  w.remote_entries = {{100}, {100}};
  w.fwd_dispatch_bytes = w.fwd_combine_bytes = w.bwd_dispatch_bytes = w.bwd_combine_bytes = 1000.0;
  const MachineRates r = rates(0.0, 10.0);
  // Local-first, 2 chunks: own rows 0-200, chunk 0 (50 rows of each slot) 200-300, its combine
  // 300-350, chunk 1 300-400, its combine 400-450.
  EXPECT_DOUBLE_EQ(predict(w, r, {2, true}, true).forward_ms, 450.0);
  // Local-split: slot 0's own rows 0-100, chunk 0 (arrived at 50) 100-200, its combine 200-250,
  // chunk 1 200-300, its combine 300-350 while slot 1's own rows compute 300-400.
  EXPECT_DOUBLE_EQ(predict(w, r, {2, true, true}, true).forward_ms, 400.0);
  // Backward: all own rows first (local-first's 400), then the weights over 400 rows: 800 either way.
  EXPECT_DOUBLE_EQ(predict(w, r, {2, true, true}, true).backward_ms, 800.0);
  EXPECT_DOUBLE_EQ(predict(w, r, {2, true}, true).backward_ms, 800.0);
  // Serialised, the split changes nothing: 100 + 400 + 100.
  EXPECT_DOUBLE_EQ(predict(w, r, {2, true, true}, false).forward_ms, 600.0);
  EXPECT_THROW(predict(w, r, {2, false, true}, true), InvalidArgument);
  EXPECT_EQ((Schedule{2, true, true}).describe(), "chunks 2, local-split");
}

TEST(PipelineModel, OwnSplitSlotHalvesTheOwnRows) {
  EXPECT_EQ(own_split_slot(std::vector<std::int64_t>{}), 0);
  EXPECT_EQ(own_split_slot(std::vector<std::int64_t>{0, 0}), 0);
  EXPECT_EQ(own_split_slot(std::vector<std::int64_t>{10, 10, 10, 10}), 2);
  EXPECT_EQ(own_split_slot(std::vector<std::int64_t>{30, 1, 1}), 1);
  EXPECT_EQ(own_split_slot(std::vector<std::int64_t>{1, 1, 30}), 2);  // 2 first, 30 last
  EXPECT_EQ(own_split_slot(std::vector<std::int64_t>{7}), 0);         // |0 - 7| = |14 - 7|: the first
}

TEST(PipelineModel, FixedCostsPerGemmCallMakeSplittingExpensive) {
  PassWork w = two_rank_work();
  const MachineRates r = rates(50.0, 0.0);  // no link: exchanges are free
  // Unsplit: one call over 200 rows = 250 per direction, +250 for the weights.
  EXPECT_DOUBLE_EQ(predict(w, r, {1, false}, true).total_ms(), 250.0 + 500.0);
  // 2 chunks: 4 calls of 50 rows = 400 per direction (weights still whole: 250).
  EXPECT_DOUBLE_EQ(predict(w, r, {2, false}, true).total_ms(), 400.0 + 650.0);
  const auto cands = candidate_schedules(2, true);
  std::vector<double> ms;
  for (const Schedule& s : cands) ms.push_back(predict(w, r, s, true).total_ms());
  EXPECT_EQ(cands[choose_schedule(cands, ms)], (Schedule{1, false}));
}

TEST(PipelineModel, ChoosesToHideASlowLink) {
  const PassWork w = two_rank_work();
  const auto cands = candidate_schedules(2, true);
  std::vector<double> ms;
  for (const Schedule& s : cands) ms.push_back(predict(w, rates(0.5, 10.0), s, true).total_ms());
  const Schedule best = cands[choose_schedule(cands, ms)];
  EXPECT_TRUE(best.local_first);
  EXPECT_GT(best.chunks, 1);
}

TEST(PipelineModel, EveryChunkPaysTheExchangeLatency) {
  PassWork w = two_rank_work();
  w.fwd_dispatch_bytes = w.fwd_combine_bytes = w.bwd_dispatch_bytes = w.bwd_combine_bytes = 10.0;
  MachineRates r = rates(0.0, 10.0);  // 1 ms of bytes per exchange ...
  r.exchange_latency_ms = 30.0;       // ... and 30 ms each, however few bytes
  // Serialised: 31 + 200 + 31 unsplit; 2 x (30.5 + 100 + 30.5) in 2 chunks, so serialised runs stay unsplit.
  EXPECT_DOUBLE_EQ(predict(w, r, {1, false}, false).forward_ms, 262.0);
  EXPECT_DOUBLE_EQ(predict(w, r, {2, false}, false).forward_ms, 322.0);
  const auto cands = candidate_schedules(2, true);
  std::vector<double> ms;
  for (const Schedule& s : cands) ms.push_back(predict(w, r, s, false).total_ms());
  EXPECT_EQ(cands[choose_schedule(cands, ms)], (Schedule{1, false}));
  // Overlapped, the own rows hide the first dispatch's latency: local-first pays it only at the tail.
  EXPECT_LT(predict(w, r, {1, true}, true).forward_ms, predict(w, r, {1, false}, true).forward_ms);
}

TEST(PipelineModel, PassWorkFromThePlan) {
  // Rank 0 of 2, one chunk, one slot: it sends 3 rows to itself and 5 to rank 1, receives 3 from
  // itself and 4 from rank 1, whose rows carry 6 picks of its slot (its own rows 3).
  ExchangePlan plan;
  plan.world = 2;
  plan.rank = 0;
  plan.chunks = 1;
  plan.num_local = 1;
  plan.send_counts = {3, 5};
  plan.send_offsets = {0, 3, 8};
  plan.recv_counts = {3, 4};
  plan.recv_offsets = {0, 3, 7};
  plan.picks = {3, 6};
  const PassWork w = pass_work(plan, 10, 2);
  EXPECT_EQ(w.self_entries, (std::vector<std::int64_t>{3}));
  EXPECT_EQ(w.remote_entries, (std::vector<std::vector<std::int64_t>>{{6}}));
  // The larger of the 5 rows out and the 4 in, 10 fp32 wide (and K = 2 more on the way back).
  EXPECT_DOUBLE_EQ(w.fwd_dispatch_bytes, 5 * 10 * 4.0);
  EXPECT_DOUBLE_EQ(w.bwd_dispatch_bytes, 5 * 10 * 4.0);
  EXPECT_DOUBLE_EQ(w.fwd_combine_bytes, 5 * 10 * 4.0);
  EXPECT_DOUBLE_EQ(w.bwd_combine_bytes, 5 * 12 * 4.0);
}

TEST(PipelineModel, CandidatesAndChoice) {
  EXPECT_EQ(candidate_schedules(1, true).size(), 6u);  // one rank: nothing travels, no local-first
  EXPECT_EQ(candidate_schedules(4, false).size(), 6u);  // hierarchical: chunks only
  const auto c = candidate_schedules(4, true);
  ASSERT_EQ(c.size(), 18u);  // each chunking unsplit, local-first and local-split
  EXPECT_EQ(c[0], (Schedule{1, false}));
  EXPECT_EQ(c[1], (Schedule{1, true}));
  EXPECT_EQ(c[2], (Schedule{1, true, true}));
  // A gain under min_gain keeps the unsplit schedule; a larger one takes the fastest.
  std::vector<double> ms(c.size(), 99.0);
  ms[0] = 100;
  ms[1] = 98;
  EXPECT_EQ(choose_schedule(c, ms), 0u);
  ms[3] = 90;
  EXPECT_EQ(choose_schedule(c, ms), 3u);
  // ... and one under min_gain_ms too (a 5 ms pass saving 10 % keeps the unsplit schedule).
  std::fill(ms.begin(), ms.end(), 5.0);
  ms[3] = 4.5;
  EXPECT_EQ(choose_schedule(c, ms), 0u);
  EXPECT_THROW(choose_schedule(c, std::vector<double>{1.0}), InvalidArgument);
  EXPECT_THROW(predict(two_rank_work(), rates(0, 1), {0, false}, true), InvalidArgument);
  PassWork bad = two_rank_work();
  bad.remote_entries.clear();
  EXPECT_THROW(predict(bad, rates(0, 1), {1, false}, true), InvalidArgument);
  EXPECT_EQ((Schedule{2, true}).describe(), "chunks 2, local-first");
}

// --chunks auto over passes: a fixed schedule is kept as asked (local-first only where it applies);
// auto measures kMeasuredPasses passes (the first's dispatches discarded), then fits the GEMM, derives
// the link rate beyond each exchange's latency, predicts every candidate and chooses once.
TEST(AutoSchedule, MeasuresThenChoosesOnce) {
  AutoSchedule fixed;
  fixed.reset(3, true, false, /*flat_exchange=*/true, 2, true);
  EXPECT_FALSE(fixed.measuring());
  EXPECT_EQ(fixed.choice().schedule, (Schedule{3, true}));
  fixed.reset(3, true, true, /*flat_exchange=*/false, 2, true);  // hierarchical: no local-first
  EXPECT_EQ(fixed.choice().schedule, (Schedule{3, false}));
  fixed.reset(2, false, true, true, 2, true);  // local-split is a local-first schedule
  EXPECT_EQ(fixed.choice().schedule, (Schedule{2, true, true}));
  fixed.reset(2, true, false, true, 1, true);  // one rank: nothing to keep local
  EXPECT_EQ(fixed.choice().schedule, (Schedule{2, false}));

  AutoSchedule a;
  a.reset(0, false, false, true, 2, true);
  EXPECT_TRUE(a.choice().automatic);
  EXPECT_TRUE(a.measuring());
  EXPECT_FALSE(a.deciding());
  EXPECT_EQ(a.choice().schedule, (Schedule{1, false}));  // measured passes run unsplit
  const PassWork w = two_rank_work();                      // largest expert block: 200 entries
  a.dispatched(5000.0, 999.0);  // the first pass: discarded
  a.measured(w, 1.0, 1);
  EXPECT_FALSE(a.deciding());
  a.dispatched(500.0, 51.0);  // forward and backward dispatch of the measured pass: 1000 bytes in
  a.dispatched(500.0, 51.0);  // 102 ms, 1 ms of which per exchange is latency
  a.measured(w, 1.0, 1);
  ASSERT_TRUE(a.deciding());
  const auto [small, big] = a.calibration_rows();
  EXPECT_EQ(big, 200);
  EXPECT_EQ(small, 25);
  // 2 ms per call + 1 ms per row.
  std::vector<double>& predicted = a.calibrated(small, 2.0 + 25.0, big, 2.0 + 200.0);
  const MachineRates& r = a.choice().rates;
  EXPECT_DOUBLE_EQ(r.gemm_row_ms, 1.0);
  EXPECT_DOUBLE_EQ(r.gemm_fixed_ms, 2.0);
  EXPECT_DOUBLE_EQ(r.exchange_latency_ms, 1.0);
  EXPECT_DOUBLE_EQ(r.link_bytes_per_ms, 10.0);
  ASSERT_EQ(predicted.size(), candidate_schedules(2, true).size());
  for (std::size_t i = 0; i < predicted.size(); ++i)
    EXPECT_DOUBLE_EQ(predicted[i], predict(w, r, a.choice().candidates[i], true).total_ms());
  // The max-reduce over the ranks may raise any prediction: the choice reads the reduced values.
  for (double& p : predicted) p = 1000.0;
  predicted[3] = 10.0;
  a.choose();
  EXPECT_TRUE(a.choice().decided);
  EXPECT_FALSE(a.measuring());
  EXPECT_EQ(a.choice().chosen, 3u);
  EXPECT_EQ(a.choice().schedule, a.choice().candidates[3]);

  AutoSchedule none;  // a rank without experts: no GEMM to time
  none.reset(0, false, false, true, 2, true);
  none.measured(PassWork{}, 0.0, 1);
  none.measured(PassWork{}, 0.0, 1);
  EXPECT_EQ(none.calibration_rows(), (std::pair<std::int64_t, std::int64_t>{0, 0}));
  none.calibrated(0, 0.0, 0, 0.0);
  EXPECT_DOUBLE_EQ(none.choice().rates.gemm_fixed_ms, 0.0);
  EXPECT_DOUBLE_EQ(none.choice().rates.link_bytes_per_ms, 0.0);
}

TEST(TrialSchedule, TriesEveryCandidateThenChoosesOnce) {
  TrialSchedule fixed;
  fixed.reset(2, false, true, true, 2);  // the same rule as AutoSchedule's fixed schedules
  EXPECT_FALSE(fixed.trying());
  EXPECT_EQ(fixed.choice().schedule, (Schedule{2, true, true}));
  fixed.timed(5.0);
  EXPECT_EQ(fixed.choice().schedule, (Schedule{2, true, true}));
  fixed.reset(3, true, false, /*flat_exchange=*/false, 4);
  EXPECT_EQ(fixed.choice().schedule, (Schedule{3, false}));

  TrialSchedule t;
  t.reset(0, false, false, true, 2);
  ASSERT_TRUE(t.trying());
  const std::vector<Schedule> candidates = candidate_schedules(2, true);
  ASSERT_EQ(t.choice().candidates, candidates);
  // Each candidate runs kTrialPasses passes; only the last one's time counts.
  for (std::size_t i = 0; i < candidates.size(); ++i)
    for (int pass = 0; pass < TrialSchedule::kTrialPasses; ++pass) {
      EXPECT_FALSE(t.deciding()) << "candidate " << i;
      EXPECT_EQ(t.choice().schedule, candidates[i]) << "candidate " << i << " pass " << pass;
      t.timed(pass + 1 < TrialSchedule::kTrialPasses ? 1e6 : 100.0 - static_cast<double>(i == 4) * 50.0);
    }
  ASSERT_TRUE(t.deciding());
  std::vector<double>& times = t.times();
  ASSERT_EQ(times.size(), candidates.size());
  EXPECT_DOUBLE_EQ(times[0], 100.0);
  EXPECT_DOUBLE_EQ(times[4], 50.0);
  t.timed(1.0);  // a pass after the last candidate and before the choice changes nothing
  EXPECT_DOUBLE_EQ(times[4], 50.0);
  // The max-reduce over the ranks may raise any time: the choice reads the reduced values.
  times[4] = 99.5;  // under 3 % faster than one chunk: keep one chunk
  times[5] = 90.0;
  t.choose(0.0);
  EXPECT_FALSE(t.trying());
  EXPECT_EQ(t.choice().chosen, 5u);
  EXPECT_EQ(t.choice().schedule, candidates[5]);
  t.timed(1.0);  // decided: stays
  EXPECT_EQ(t.choice().schedule, candidates[5]);

  // A rebuilt layer takes over the decision; a fixed one, or one over other candidates, does not.
  TrialSchedule rebuilt;
  rebuilt.reset(0, false, false, true, 2);
  rebuilt.adopt(t.choice());
  EXPECT_FALSE(rebuilt.trying());
  EXPECT_FALSE(rebuilt.deciding());
  EXPECT_EQ(rebuilt.choice().schedule, candidates[5]);
  rebuilt.timed(1.0);
  EXPECT_EQ(rebuilt.choice().schedule, candidates[5]);
  TrialSchedule other;
  other.reset(0, false, false, /*flat_exchange=*/false, 2);  // hierarchical: no local-first candidates
  other.adopt(t.choice());
  EXPECT_TRUE(other.trying());
  fixed.adopt(t.choice());
  EXPECT_EQ(fixed.choice().schedule, (Schedule{3, false}));

  TrialSchedule small;  // a gain under min_gain_ms keeps one chunk
  small.reset(0, false, false, true, 1);
  for (std::size_t i = 0; i < small.choice().candidates.size() * TrialSchedule::kTrialPasses; ++i)
    small.timed(i == 2 * TrialSchedule::kTrialPasses - 1 ? 0.5 : 1.0);
  ASSERT_TRUE(small.deciding());
  small.choose(1.0);
  EXPECT_EQ(small.choice().chosen, 0u);
}

}  // namespace
}  // namespace moex::sched
