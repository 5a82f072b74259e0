// EpPlan: a hand-checked example of both sides, bad input, and a host replay of the GPU layer's data
// movement driven only by the plan's index arrays, against the CPU MoELayer at every rank count.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "base/error.h"
#include "comm/communicator.h"
#include "runtime/ep_plan.h"
#include "runtime/kernels/expert_ffn.h"
#include "runtime/kernels/gate.h"
#include "runtime/moe_layer.h"
#include "runtime/model/moe_model.h"
#include "runtime/random.h"
#include "scheduler/capacity.h"
#include "scheduler/expert_placement.h"
#include "tests/mpi_test_env.h"
#include "tests/tolerance.h"

namespace moex {
namespace {

using I64 = std::vector<std::int64_t>;
using F32 = std::vector<float>;
constexpr std::chrono::milliseconds kTimeout{30'000};

std::size_t z(std::int64_t v) { return static_cast<std::size_t>(v); }
I64 vec(std::span<const std::int64_t> s) { return I64(s.begin(), s.end()); }

/// A failure on any rank fails the test on every rank (a collective: once per test, on every rank).
void expect_all_ranks_passed() {
  EXPECT_TRUE(testing::all_ranks(!::testing::Test::HasFailure())) << "the test failed on at least one rank";
}

// ---------------------------------------------------------------------------------------------------
// a. A hand-checked example (single process: the receive side is simulated)
//
// World 2, contiguous placement of 4 experts: rank 0 holds experts 0, 1 (slots 0, 1), rank 1 holds
// 2, 3 (slots 0, 1). This rank is 0 with 3 tokens, K = 2, in 2 chunks (token 0 | tokens 1, 2):
//   token 0 -> experts 3, 0   token 1 -> experts 2, 3   token 2 -> experts 1, 0

const std::vector<std::int32_t> kIds{3, 0, 2, 3, 1, 0};
const F32 kWeights{0.6f, 0.4f, 0.7f, 0.3f, 0.8f, 0.2f};

TEST(EpPlanExample, SendSide) {
  const auto placement = sched::ExpertPlacement::contiguous(4, 2);
  EpPlan plan;
  plan.plan_send(kIds, kWeights, 3, 2, placement, 0, 2);
  EXPECT_EQ(plan.world, 2);
  EXPECT_EQ(plan.num_local, 2);
  // chunk 0: (t0 -> rank 0), (t0 -> rank 1); chunk 1: (t2 -> rank 0), (t1 -> rank 1)
  EXPECT_EQ(plan.send_counts, (I64{1, 1, 1, 1}));
  EXPECT_EQ(plan.send_offsets, (I64{0, 1, 2, 3, 4}));
  EXPECT_EQ(plan.send_token, (I64{0, 0, 2, 1}));
  EXPECT_EQ(plan.send_meta, (F32{0, -1, 0.4f, 0,         // t0 at rank 0: expert 0 = slot 0
                                 1, -1, 0.6f, 0,         // t0 at rank 1: expert 3 = slot 1
                                 1, 0, 0.8f, 0.2f,       // t2 at rank 0: experts 1, 0 in top-K order
                                 0, 1, 0.7f, 0.3f}));    // t1 at rank 1: experts 2, 3
  EXPECT_EQ(plan.token_offsets, (I64{0, 2, 3, 4}));
  EXPECT_EQ(plan.token_rows, (I64{0, 1, 3, 2}));  // token 0's rows in destination order
  // pick (t, k) -> (row, position in the row): (0,0)->(1,0) (0,1)->(0,0) (1,*)->(3,*) (2,*)->(2,*)
  EXPECT_EQ(plan.pick_back, (I64{2, 0, 6, 7, 4, 5}));
  std::vector<std::int64_t> out;
  EXPECT_EQ(vec(plan.send_block_counts(1, 3, out)), (I64{3, 3}));
  EXPECT_EQ(vec(plan.send_block_displs(1, 3, out)), (I64{0, 3}));
  EXPECT_EQ(plan.chunk_send_first(1), 2);
  EXPECT_EQ(plan.chunk_send_count(1), 2);

  // More chunks than tokens: chunks 0 and 2 are empty (tokens 0 | 1 | 2 in chunks 1, 3, 4).
  plan.plan_send(kIds, kWeights, 3, 2, placement, 0, 5);
  EXPECT_EQ(plan.send_counts, (I64{0, 0, 1, 1, 0, 0, 0, 1, 1, 0}));
  EXPECT_EQ(plan.send_token, (I64{0, 0, 1, 2}));
  EXPECT_EQ(plan.token_rows, (I64{0, 1, 2, 3}));
  EXPECT_EQ(plan.pick_back, (I64{2, 0, 4, 5, 6, 7}));
  EXPECT_EQ(plan.chunk_send_count(0), 0);
  EXPECT_EQ(plan.chunk_send_count(2), 0);

  // Rank 1's view of the same routing: the slots are the destination's, whatever the sender.
  plan.plan_send(kIds, kWeights, 3, 2, placement, 1, 1);
  EXPECT_EQ(plan.send_counts, (I64{2, 2}));
  EXPECT_EQ(plan.send_token, (I64{0, 2, 0, 1}));
  EXPECT_EQ(plan.token_rows, (I64{0, 2, 3, 1}));
}

TEST(EpPlanExample, ExplicitChunkStarts) {
  // The example's picks as (rank, slot), cut into chunks at tokens 0 | 2 | 3 (a forwarder's plan,
  // whose chunks are the row ranges that arrived): chunk 0 holds tokens 0 and 1, chunk 1 token 2.
  const std::vector<int> ranks{1, 0, 1, 1, 0, 0};
  const std::vector<std::int32_t> slots{1, 0, 0, 1, 1, 0};
  EpPlan plan;
  plan.plan_send_picks(kWeights, 3, 2, 2, 2, 0, 2, ranks, slots, I64{0, 2, 3});
  EXPECT_EQ(plan.chunk_tokens, (I64{0, 2, 3}));
  // chunk 0: t0 -> rank 0; t0, t1 -> rank 1. chunk 1: t2 -> rank 0.
  EXPECT_EQ(plan.send_counts, (I64{1, 2, 1, 0}));
  EXPECT_EQ(plan.send_token, (I64{0, 0, 1, 2}));
  // Without chunk_starts the tokens are cut by sched::chunk_begin (token 0 | tokens 1, 2).
  plan.plan_send_picks(kWeights, 3, 2, 2, 2, 0, 2, ranks, slots);
  EXPECT_EQ(plan.chunk_tokens, (I64{0, 1, 3}));
  EXPECT_EQ(plan.send_counts, (I64{1, 1, 1, 1}));
  for (const I64& bad : {I64{0, 3}, I64{0, 3, 2}, I64{1, 2, 3}, I64{0, 1, 2}}) {
    try {
      plan.plan_send_picks(kWeights, 3, 2, 2, 2, 0, 2, ranks, slots, bad);
      ADD_FAILURE() << "chunk_starts of " << bad.size() << " entries ending at " << bad.back() << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("chunk_starts"), std::string::npos) << e.what();
    }
  }
}

/// The example's plan with a simulated receive side of rank 0 (2 chunks, K = 2, 2 local slots):
///   chunk 0: from rank 0 one row, from rank 1 two rows; chunk 1: from rank 0 one row.
EpPlan example_receive() {
  EpPlan plan;
  plan.plan_send(kIds, kWeights, 3, 2, sched::ExpertPlacement::contiguous(4, 2), 0, 2);
  plan.recv_counts = {1, 2, 1, 0};
  plan.recv_meta = {0, -1, 0.4f, 0,      // r0 (c0, from 0): slot 0
                    1, 0, 0.5f, 0.25f,   // r1 (c0, from 1): slots 1, 0
                    1, -1, 0.9f, 0,      // r2 (c0, from 1): slot 1
                    1, 0, 0.8f, 0.2f};   // r3 (c1, from 0): slots 1, 0
  return plan;
}

TEST(EpPlanExample, ReceiveSide) {
  EpPlan plan = example_receive();
  plan.build_receive();
  EXPECT_EQ(plan.recv_offsets, (I64{0, 1, 3, 4, 4}));
  EXPECT_EQ(plan.recv_rows(), 4);
  // entries by chunk, slot, row, position: c0 s0: (r0,0) (r1,1); c0 s1: (r1,0) (r2,0); c1 s0: (r3,1); c1 s1: (r3,0)
  EXPECT_EQ(plan.slot_count, (I64{2, 2, 1, 1}));
  EXPECT_EQ(plan.entry_offsets, (I64{0, 2, 4, 5, 6}));
  EXPECT_EQ(plan.entry_row, (I64{0, 1, 1, 2, 3, 3}));
  EXPECT_EQ(plan.entry_weight, (F32{0.4f, 0.25f, 0.5f, 0.9f, 0.2f, 0.8f}));
  EXPECT_EQ(plan.row_offsets, (I64{0, 1, 3, 4, 6}));
  EXPECT_EQ(plan.row_entries, (I64{0, 2, 1, 3, 5, 4}));  // each row's entries in top-K order
  EXPECT_EQ(plan.row_weight, (F32{0.4f, 0.5f, 0.25f, 0.9f, 0.8f, 0.2f}));
  EXPECT_EQ(plan.row_dw_entry, (I64{0, -1, 2, 1, 3, -1, 5, 4}));
  EXPECT_EQ(plan.entries(), 6);
  EXPECT_EQ(plan.entry_displ(1, 1), 5);
  EXPECT_EQ(plan.slot_counts(0, 1), 2);
  EXPECT_EQ(plan.chunk_entry_first(1), 4);
  EXPECT_EQ(plan.chunk_entry_count(1), 2);
  EXPECT_EQ(plan.chunk_recv_first(1), 3);
  EXPECT_EQ(plan.chunk_recv_count(1), 1);
  std::vector<std::int64_t> out;
  EXPECT_EQ(vec(plan.recv_block_counts(0, 3, out)), (I64{3, 6}));
  EXPECT_EQ(vec(plan.recv_block_displs(0, 3, out)), (I64{0, 3}));
  EXPECT_EQ(vec(plan.recv_block_counts(1, 3, out)), (I64{3, 0}));
  EXPECT_EQ(vec(plan.recv_block_displs(1, 3, out)), (I64{0, 3}));

  // A warm plan rebuilt from the same data gives the same arrays without reallocating.
  const auto* rows = plan.entry_row.data();
  const auto* dw = plan.row_dw_entry.data();
  plan.build_receive();
  EXPECT_EQ(plan.entry_row, (I64{0, 1, 1, 2, 3, 3}));
  EXPECT_EQ(plan.entry_row.data(), rows);
  EXPECT_EQ(plan.row_dw_entry.data(), dw);
}

// ---------------------------------------------------------------------------------------------------
// c. Bad input

TEST(EpPlanBadInput, PlanSendRejectsBadArguments) {
  const auto placement = sched::ExpertPlacement::contiguous(4, 2);
  EpPlan plan;
  std::vector<std::int32_t> ids = kIds;
  ids[3] = 4;  // token 1, position 1
  try {
    plan.plan_send(ids, kWeights, 3, 2, placement, 0, 1);
    ADD_FAILURE() << "expert id 4 of 4 experts was accepted";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("expert id 4"), std::string::npos) << m;
    EXPECT_NE(m.find("token 1"), std::string::npos) << m;
    EXPECT_NE(m.find("[0, 4)"), std::string::npos) << m;
  }
  ids[3] = -1;
  EXPECT_THROW(plan.plan_send(ids, kWeights, 3, 2, placement, 0, 1), InvalidArgument);
  EXPECT_THROW(plan.plan_send(kIds, kWeights, 3, 2, placement, 0, 0), InvalidArgument);   // chunks 0
  EXPECT_THROW(plan.plan_send(kIds, kWeights, 3, 2, placement, 2, 1), InvalidArgument);   // rank 2 of 2
  EXPECT_THROW(plan.plan_send(kIds, kWeights, 3, 0, placement, 0, 1), InvalidArgument);   // K 0
  EXPECT_THROW(plan.plan_send(kIds, kWeights, 4, 2, placement, 0, 1), InvalidArgument);   // 8 ids needed
  EXPECT_THROW(plan.plan_send(kIds, std::span<const float>(kWeights).first(5), 3, 2, placement, 0, 1),
               InvalidArgument);
}

TEST(EpPlanBadInput, BuildReceiveRejectsForeignSlots) {
  for (float bad : {2.0f, 0.5f, -2.0f, std::numeric_limits<float>::quiet_NaN()}) {
    EpPlan plan = example_receive();
    plan.recv_meta[5] = bad;  // r1, position 1
    try {
      plan.build_receive();
      ADD_FAILURE() << "slot " << bad << " was accepted";
    } catch (const InvalidArgument& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("recv row 1"), std::string::npos) << m;
      EXPECT_NE(m.find("[0, 2)"), std::string::npos) << m;
    }
  }
  EpPlan plan = example_receive();
  plan.recv_meta.pop_back();
  EXPECT_THROW(plan.build_receive(), InvalidArgument);
}

TEST(EpPlanBadInput, CommunicatorMustMatchThePlan) {
  auto& world = testing::world();
  EpPlan plan;
  // Planned for one more rank than the communicator has: rejected before any communication.
  plan.plan_send(kIds, kWeights, 3, 2, sched::ExpertPlacement::contiguous(4, world.size() + 1), 0, 1);
  EXPECT_THROW(plan.exchange_metadata(world, kTimeout), InvalidArgument);
  expect_all_ranks_passed();
}

TEST(EpPlanBadInput, DifferentChunkCountsThrowOnEveryRank) {
  auto& world = testing::world();
  if (world.size() < 2) GTEST_SKIP() << "needs at least 2 ranks";
  const auto placement = sched::ExpertPlacement::contiguous(4, world.size());
  EpPlan plan;
  const int chunks = world.rank() == 1 ? 3 : 2;
  plan.plan_send(kIds, kWeights, 3, 2, placement, world.rank(), chunks);
  try {
    plan.exchange_metadata(world, kTimeout);
    ADD_FAILURE() << "differing chunk counts were accepted";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("chunks"), std::string::npos) << m;
    EXPECT_NE(m.find("rank 1 has 3"), std::string::npos) << m;
  }
  // The communicator is still in step: a correct exchange works afterwards.
  plan.plan_send(kIds, kWeights, 3, 2, placement, world.rank(), 2);
  EXPECT_NO_THROW(plan.exchange_metadata(world, kTimeout));
  expect_all_ranks_passed();
}

// ---------------------------------------------------------------------------------------------------
// b. Host replay of the GPU layer's data movement against MoELayer

struct ReplayCase {
  const char* name;
  ScoringFunc scoring;
  TopkMethod method;
  std::int64_t experts, topk, n_group, topk_group, shared;
  bool norm;
  double scale;
  bool bias;  ///< a nonzero selection bias (e_score_correction_bias)
  double capacity = 0.0;  ///< LayerOptions::capacity_factor (0 = dropless)
};

/// Names the case in GoogleTest's messages.
void PrintTo(const ReplayCase& c, std::ostream* os) { *os << c.name; }

MoeConfig config_of(const ReplayCase& c) {
  MoeConfig cfg;
  cfg.hidden_size = 12;
  cfg.moe_intermediate_size = 6;
  cfg.n_routed_experts = c.experts;
  cfg.n_shared_experts = c.shared;
  cfg.num_experts_per_tok = c.topk;
  cfg.n_group = c.n_group;
  cfg.topk_group = c.topk_group;
  cfg.topk_method = c.method;
  cfg.scoring_func = c.scoring;
  cfg.norm_topk_prob = c.norm;
  cfg.routed_scaling_factor = c.scale;
  cfg.num_hidden_layers = 1;
  cfg.validate();
  return cfg;
}

/// Tokens of each rank: uneven, and rank 1 has none.
constexpr std::int64_t kTokens[] = {7, 0, 11, 4};

using testing::rel_err;

struct ReplayResult {
  F32 y, dx;
  F32 replicated_grad;  ///< layout of MoELayer::replicated()
  F32 expert_grad;      ///< layout of MoELayer::experts()
  std::vector<std::int32_t> ids;
  F32 weights;
  std::vector<std::uint8_t> kept;
};

/// One chunk's all-to-all of `width`-float rows: dispatch (send rows -> recv rows) or its reverse.
void exchange_chunk(comm::Communicator& comm, const EpPlan& plan, int c, std::int64_t width, bool dispatch,
                    const float* src, float* dst) {
  I64 sc, sd, rc, rd;
  comm::AlltoallvArgs args;
  if (dispatch) {
    args.send = src + plan.chunk_send_first(c) * width;
    args.send_counts = plan.send_block_counts(c, width, sc);
    args.send_displs = plan.send_block_displs(c, width, sd);
    args.recv = dst + plan.chunk_recv_first(c) * width;
    args.recv_counts = plan.recv_block_counts(c, width, rc);
    args.recv_displs = plan.recv_block_displs(c, width, rd);
  } else {
    args.send = src + plan.chunk_recv_first(c) * width;
    args.send_counts = plan.recv_block_counts(c, width, sc);
    args.send_displs = plan.recv_block_displs(c, width, sd);
    args.recv = dst + plan.chunk_send_first(c) * width;
    args.recv_counts = plan.send_block_counts(c, width, rc);
    args.recv_displs = plan.send_block_displs(c, width, rd);
  }
  args.type = comm::DataType::kFloat32;
  args.label = dispatch ? "replay dispatch" : "replay combine";
  comm.alltoallv(args)->wait();
}

/// Forward and backward of `layer`'s parameters on x / dy [T, H], moving rows only as EpPlan's
/// index arrays say (the GPU layer's recipe in runtime/ep_plan.h), with the CPU kernels.
ReplayResult replay(MoELayer& layer, comm::Communicator& comm, const F32& x, const F32& dy, std::int64_t T,
                    int chunks) {
  const MoeConfig& cfg = layer.config();
  const std::int64_t H = cfg.hidden_size, F = cfg.moe_intermediate_size, Fs = cfg.shared_intermediate_size();
  const std::int64_t E = cfg.n_routed_experts, K = cfg.num_experts_per_tok, S = layer.num_local_experts();
  ReplayResult res;
  res.replicated_grad.assign(layer.replicated().value.size(), 0.0f);
  res.expert_grad.assign(layer.experts().value.size(), 0.0f);
  res.y.assign(z(T * H), 0.0f);
  res.dx.assign(z(T * H), 0.0f);

  // Gate (as MoELayer::forward: the whole batch, with the selection bias).
  const auto gp = kernels::GateParams::from_config(cfg, T);
  F32 scores(z(T * E));
  res.ids.assign(z(T * K), -1);
  res.weights.assign(z(T * K), 0.0f);
  kernels::gate_forward(gp, x.data(), layer.gate_weight(),
                        layer.selection_bias().empty() ? nullptr : layer.selection_bias().data(), scores.data(),
                        res.ids.data(), res.weights.data());

  // Capacity-factor mode: the picks over capacity go nowhere (as MoELayer drops them).
  std::vector<std::int64_t> order;
  sched::apply_capacity(res.ids, res.weights, E, layer.options().capacity_factor, res.kept, order);

  EpPlan plan;
  plan.plan_send(res.ids, res.weights, T, K, layer.placement(), comm.rank(), chunks, res.kept);
  plan.exchange_metadata(comm, kTimeout);
  // A warm plan rebuilt from the same routing moves no storage.
  const auto* meta = plan.recv_meta.data();
  const auto* rows = plan.entry_row.data();
  plan.plan_send(res.ids, res.weights, T, K, layer.placement(), comm.rank(), chunks, res.kept);
  plan.exchange_metadata(comm, kTimeout);
  EXPECT_EQ(plan.recv_meta.data(), meta);
  EXPECT_EQ(plan.entry_row.data(), rows);
  EXPECT_EQ(plan.num_local, S);

  const std::int64_t SR = plan.send_rows(), RR = plan.recv_rows(), N = plan.entries();
  F32 send(z(SR * H)), recv(z(RR * H)), out(z(RR * H)), back(z(SR * H));
  F32 xe(z(N * H)), h13(z(N * 2 * F)), sig(z(N * F)), a(z(N * F)), ye(z(N * H));

  // Shared experts.
  F32 sh13(z(T * 2 * Fs)), ssig(z(T * Fs)), sa(z(T * Fs)), sdh13(z(T * 2 * Fs));
  if (Fs > 0)
    kernels::swiglu_ffn_forward({T, H, Fs}, x.data(), layer.shared_w13(), layer.shared_w2(), sh13.data(), ssig.data(),
                                sa.data(), res.y.data());

  // Forward, chunk by chunk.
  for (int c = 0; c < chunks; ++c) {
    for (std::int64_t i = plan.chunk_send_first(c); i < plan.chunk_send_first(c) + plan.chunk_send_count(c); ++i)
      std::copy_n(x.data() + plan.send_token[z(i)] * H, H, send.data() + i * H);
    exchange_chunk(comm, plan, c, H, true, send.data(), recv.data());
    for (std::int64_t n = plan.chunk_entry_first(c); n < plan.chunk_entry_first(c) + plan.chunk_entry_count(c); ++n)
      std::copy_n(recv.data() + plan.entry_row[z(n)] * H, H, xe.data() + n * H);
    for (std::int64_t s = 0; s < S; ++s) {
      const std::int64_t b = plan.entry_displ(c, s), n = plan.slot_counts(c, s);
      if (n == 0) continue;
      kernels::swiglu_ffn_forward({n, H, F}, xe.data() + b * H, layer.expert_w13(s), layer.expert_w2(s),
                                  h13.data() + b * 2 * F, sig.data() + b * F, a.data() + b * F, ye.data() + b * H);
    }
    for (std::int64_t r = plan.chunk_recv_first(c); r < plan.chunk_recv_first(c) + plan.chunk_recv_count(c); ++r) {
      float* o = out.data() + r * H;
      std::fill_n(o, H, 0.0f);
      for (std::int64_t n = plan.row_offsets[z(r)]; n < plan.row_offsets[z(r) + 1]; ++n) {
        const float w = plan.row_weight[z(n)];
        const float* src = ye.data() + plan.row_entries[z(n)] * H;
        for (std::int64_t h = 0; h < H; ++h) o[h] += w * src[h];
      }
    }
    exchange_chunk(comm, plan, c, H, false, out.data(), back.data());
    for (std::int64_t t = sched::chunk_begin(T, chunks, c); t < sched::chunk_begin(T, chunks, c + 1); ++t)
      for (std::int64_t i = plan.token_offsets[z(t)]; i < plan.token_offsets[z(t) + 1]; ++i) {
        const float* src = back.data() + plan.token_rows[z(i)] * H;
        for (std::int64_t h = 0; h < H; ++h) res.y[z(t * H + h)] += src[h];
      }
  }

  // Backward: shared experts first (they write dx), then the routed experts chunk by chunk.
  if (Fs > 0)
    kernels::swiglu_ffn_backward({T, H, Fs}, x.data(), layer.shared_w13(), layer.shared_w2(), sh13.data(), ssig.data(),
                                 sa.data(), dy.data(), res.replicated_grad.data() + layer.shared_w13_offset(),
                                 res.replicated_grad.data() + layer.shared_w2_offset(), res.dx.data(), sdh13.data());
  F32 drecv(z(RR * H)), dw_entry(z(N)), dye(z(N * H)), dxe(z(N * H)), dh13(z(N * 2 * F));
  F32 dx_out(z(RR * H)), dw_out(z(RR * K)), dx_back(z(SR * H)), dw_back(z(SR * K)), d_weights(z(T * K), 0.0f);
  const std::int64_t stride = layer.expert_stride();
  for (int c = 0; c < chunks; ++c) {
    for (std::int64_t i = plan.chunk_send_first(c); i < plan.chunk_send_first(c) + plan.chunk_send_count(c); ++i)
      std::copy_n(dy.data() + plan.send_token[z(i)] * H, H, send.data() + i * H);
    exchange_chunk(comm, plan, c, H, true, send.data(), drecv.data());
    for (std::int64_t n = plan.chunk_entry_first(c); n < plan.chunk_entry_first(c) + plan.chunk_entry_count(c); ++n) {
      const float* g = drecv.data() + plan.entry_row[z(n)] * H;
      const float* yo = ye.data() + n * H;
      const float w = plan.entry_weight[z(n)];
      double dot = 0.0;
      for (std::int64_t h = 0; h < H; ++h) {
        dot += static_cast<double>(g[h]) * yo[h];
        dye[z(n * H + h)] = w * g[h];
      }
      dw_entry[z(n)] = static_cast<float>(dot);
    }
    for (std::int64_t s = 0; s < S; ++s) {
      const std::int64_t b = plan.entry_displ(c, s), n = plan.slot_counts(c, s);
      if (n == 0) continue;
      float* g13 = res.expert_grad.data() + s * stride;
      kernels::swiglu_ffn_backward({n, H, F}, xe.data() + b * H, layer.expert_w13(s), layer.expert_w2(s),
                                   h13.data() + b * 2 * F, sig.data() + b * F, a.data() + b * F, dye.data() + b * H,
                                   g13, g13 + 2 * F * H, dxe.data() + b * H, dh13.data() + b * 2 * F);
    }
    for (std::int64_t r = plan.chunk_recv_first(c); r < plan.chunk_recv_first(c) + plan.chunk_recv_count(c); ++r) {
      float* o = dx_out.data() + r * H;
      std::fill_n(o, H, 0.0f);
      for (std::int64_t n = plan.row_offsets[z(r)]; n < plan.row_offsets[z(r) + 1]; ++n) {
        const float* src = dxe.data() + plan.row_entries[z(n)] * H;
        for (std::int64_t h = 0; h < H; ++h) o[h] += src[h];
      }
      for (std::int64_t j = 0; j < K; ++j) {
        const std::int64_t e = plan.row_dw_entry[z(r * K + j)];
        dw_out[z(r * K + j)] = e < 0 ? 0.0f : dw_entry[z(e)];
      }
    }
    exchange_chunk(comm, plan, c, H, false, dx_out.data(), dx_back.data());
    exchange_chunk(comm, plan, c, K, false, dw_out.data(), dw_back.data());
    for (std::int64_t t = sched::chunk_begin(T, chunks, c); t < sched::chunk_begin(T, chunks, c + 1); ++t) {
      for (std::int64_t i = plan.token_offsets[z(t)]; i < plan.token_offsets[z(t) + 1]; ++i) {
        const float* src = dx_back.data() + plan.token_rows[z(i)] * H;
        for (std::int64_t h = 0; h < H; ++h) res.dx[z(t * H + h)] += src[h];
      }
      for (std::int64_t k = 0; k < K; ++k) {
        const std::int64_t b = plan.pick_back[z(t * K + k)];
        d_weights[z(t * K + k)] = b < 0 ? 0.0f : dw_back[z(b)];  // a dropped pick: no gradient
      }
    }
  }
  F32 dlogits(z(T * E));
  kernels::gate_backward(gp, x.data(), layer.gate_weight(), scores.data(), res.ids.data(), d_weights.data(),
                         res.dx.data(), res.replicated_grad.data(), dlogits.data(), nullptr);
  return res;
}

class EpPlanReplay : public ::testing::TestWithParam<std::tuple<ReplayCase, int>> {};

TEST_P(EpPlanReplay, MatchesMoELayer) {
  const auto& [c, chunks] = GetParam();
  auto& world = testing::world();
  const MoeConfig cfg = config_of(c);
  const std::int64_t H = cfg.hidden_size, K = cfg.num_experts_per_tok;
  // The same parameters on every rank: each expert's weights come from its own seed (every rank
  // draws all of them alike and keeps its slots), the gate, shared experts and bias are replicated.
  LayerOptions options;
  options.capacity_factor = c.capacity;
  MoELayer layer(cfg, world, sched::ExpertPlacement::contiguous(cfg.n_routed_experts, world.size()), "ref",
                 std::nullopt, options);
  init_layer_random(layer, 11, 0);
  if (c.bias) {
    layer.selection_bias().assign(z(cfg.n_routed_experts), 0.0f);
    for (std::int64_t e = 0; e < cfg.n_routed_experts; ++e)
      layer.selection_bias()[z(e)] = 0.05f * static_cast<float>(e % 3);
  }
  const std::int64_t T = kTokens[world.rank() % 4];
  F32 x(z(T * H)), dy(z(T * H));
  Rng(Rng::mix(23, static_cast<std::uint64_t>(world.rank()), 1)).fill_normal(x.data(), T * H, 1.0);
  Rng(Rng::mix(23, static_cast<std::uint64_t>(world.rank()), 2)).fill_normal(dy.data(), T * H, 1.0);

  // Reference: MoELayer (one chunk, so every chunk count of the replay meets the same numbers).
  F32 y(x.size()), dx(x.size());
  layer.zero_grad();
  layer.forward(x.data(), T, y.data());
  layer.backward(dy.data(), dx.data());

  const ReplayResult r = replay(layer, world, x, dy, T, chunks);
  EXPECT_EQ(r.ids, layer.topk_ids());
  EXPECT_EQ(r.weights, layer.topk_weights());
  EXPECT_EQ(r.kept, std::vector<std::uint8_t>(layer.topk_kept().begin(), layer.topk_kept().begin() + T * K));
  if (c.capacity > 0.0 && T > 0) {
    EXPECT_GT(layer.route_stats().picks_dropped, 0) << "rank " << world.rank() << ": the case should drop picks";
  }
  ASSERT_EQ(r.ids.size(), z(T * K));
  const double tol = 1e-5;
  auto check = [&](const char* what, const F32& got, const F32& want, std::size_t first, std::size_t n) {
    ASSERT_LE(first + n, want.size());
    ASSERT_LE(first + n, got.size());
    const double err = rel_err(got.data() + first, want.data() + first, n);
    EXPECT_LE(err, tol) << "rank " << world.rank() << ": " << what << " (offset " << first << ")";
  };
  check("output y", r.y, y, 0, y.size());
  check("input grad dx", r.dx, dx, 0, dx.size());
  const F32& rg = layer.replicated().grad;
  const auto Hz = z(H), Fs = z(cfg.shared_intermediate_size());
  check("gate weight grad", r.replicated_grad, rg, 0, z(cfg.n_routed_experts) * Hz);
  if (Fs > 0) {
    check("shared w13 grad", r.replicated_grad, rg, z(layer.shared_w13_offset()), 2 * Fs * Hz);
    check("shared w2 grad", r.replicated_grad, rg, z(layer.shared_w2_offset()), Hz * Fs);
  }
  const F32& eg = layer.experts().grad;
  const auto stride = z(layer.expert_stride()), F = z(cfg.moe_intermediate_size);
  for (std::int64_t s = 0; s < layer.num_local_experts(); ++s) {
    check("expert w13 grad", r.expert_grad, eg, z(s) * stride, 2 * F * Hz);
    check("expert w2 grad", r.expert_grad, eg, z(s) * stride + 2 * F * Hz, Hz * F);
  }
  expect_all_ranks_passed();
}

const ReplayCase kCases[] = {
    // DeepSeek-V3: sigmoid scores, noaux_tc group limit, normalised top-K, scaled, biased selection.
    {"v3_no_shared", ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 8, 4, 4, 2, 0, true, 2.5, true},
    {"v3_shared", ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 12, 3, 4, 2, 1, true, 2.5, true},
    // DeepSeek-V2-Lite style softmax, greedy, unnormalised.
    {"softmax_shared", ScoringFunc::kSoftmax, TopkMethod::kGreedy, 6, 2, 1, 1, 2, false, 1.0, false},
    // Fewer experts than ranks at 4 ranks: a rank holds no expert slot.
    {"softmax_few_experts", ScoringFunc::kSoftmax, TopkMethod::kGreedy, 3, 2, 1, 1, 1, false, 1.0, false},
    // Capacity-factor mode: dropped picks make no row, no entry and no routing-weight gradient.
    {"v3_capacity", ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 8, 4, 4, 2, 1, true, 2.5, true, 0.75},
};

INSTANTIATE_TEST_SUITE_P(Cases, EpPlanReplay,
                         ::testing::Combine(::testing::ValuesIn(kCases), ::testing::Values(1, 2, 3)),
                         [](const ::testing::TestParamInfo<EpPlanReplay::ParamType>& info) {
                           return std::string(std::get<0>(info.param).name) + "_chunks" +
                                  std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace moex
