// Training across ranks: the loss falls, a run is reproducible, the model's gradients match
// finite differences, and load balancing (selection-bias updates, auxiliary losses) works.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <string>

#include "base/error.h"
#include "runtime/io/checkpoint_files.h"
#include "runtime/random.h"
#include "runtime/model/trainer.h"
#include "tests/mpi_test_env.h"

namespace moex {
namespace {

MoeConfig tiny(const char* scoring) {
  MoeConfig c = MoeConfig::defaults_for("deepseek_v3");
  c.hidden_size = 16;
  c.moe_intermediate_size = 8;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.num_hidden_layers = 2;
  if (std::string(scoring) == "softmax") {
    c.scoring_func = ScoringFunc::kSoftmax;
    c.topk_method = TopkMethod::kGroupLimitedGreedy;
    c.norm_topk_prob = false;
    c.routed_scaling_factor = 1.0;
  }
  c.validate();
  return c;
}

class TrainTest : public ::testing::TestWithParam<const char*> {};

TEST_P(TrainTest, LossFalls) {
  TrainOptions o;
  o.tokens_per_rank = 32;
  o.adam.lr = 3e-3f;
  Trainer trainer(tiny(GetParam()), testing::world(), o);
  double first = 0.0, last = 0.0;
  for (int s = 0; s < 80; ++s) {
    const StepRecord r = trainer.step();
    ASSERT_TRUE(std::isfinite(r.loss));
    if (s == 0) first = r.loss;
    last = r.loss;
  }
  // The student starts as an unrelated random model; 80 AdamW steps remove over a third of the gap
  // for both gates (measured over seeds 1-6 at one rank: 0.47-0.62x for sigmoid, 0.34-0.59x for
  // softmax), far from a stalled run (~1x).
  EXPECT_LT(last, 0.75 * first) << "first " << first << " last " << last;
}

TEST_P(TrainTest, SameSeedSameLosses) {
  TrainOptions o;
  o.tokens_per_rank = 16;
  Trainer a(tiny(GetParam()), testing::world(), o);
  Trainer b(tiny(GetParam()), testing::world(), o);
  for (int s = 0; s < 5; ++s) EXPECT_EQ(a.step().loss, b.step().loss) << "step " << s;
  o.seed = 2;
  Trainer c(tiny(GetParam()), testing::world(), o);
  Trainer d(tiny(GetParam()), testing::world(), TrainOptions{});
  EXPECT_NE(c.step().loss, d.step().loss);
}

INSTANTIATE_TEST_SUITE_P(Gates, TrainTest, ::testing::Values("sigmoid", "softmax"));

/// True on every rank iff `v` holds the same bytes on every rank (a collective).
template <class T>
bool identical_on_all_ranks(const std::vector<T>& v) {
  auto& world = testing::world();
  const std::size_t bytes = v.size() * sizeof(T);
  // Same size everywhere first, so the gather below is well formed.
  std::int64_t size[2] = {static_cast<std::int64_t>(bytes), -static_cast<std::int64_t>(bytes)};
  world.allreduce_max(size, 2, comm::DataType::kInt64, "size")->wait();
  if (size[0] != -size[1]) return testing::all_ranks(false);
  std::vector<unsigned char> all(bytes * static_cast<std::size_t>(world.size()));
  world.allgather(v.data(), all.data(), static_cast<std::int64_t>(bytes), comm::DataType::kByte, "bits")->wait();
  bool ok = true;
  for (int r = 0; r < world.size(); ++r)
    ok = ok && (bytes == 0 || std::memcmp(all.data() + static_cast<std::size_t>(r) * bytes, v.data(), bytes) == 0);
  return testing::all_ranks(ok);
}

/// Mean of max/mean expert load over the last `tail` of `steps` steps.
double tail_load(Trainer& t, int steps, int tail) {
  double sum = 0.0;
  for (int s = 0; s < steps; ++s) {
    const StepRecord r = t.step();
    if (s >= steps - tail) sum += r.max_mean_load;
  }
  return sum / tail;
}

class BalanceTest : public ::testing::TestWithParam<const char*> {};

TEST_P(BalanceTest, SelectionBiasIsReplicatedAndBalancesLoad) {
  TrainOptions o;
  o.tokens_per_rank = 64;
  o.adam.lr = 3e-3f;
  o.seed = 3;
  const int steps = 30, tail = 10;
  Trainer plain(tiny(GetParam()), testing::world(), o);
  const double plain_load = tail_load(plain, steps, tail);
  // gamma: scores here differ by ~1e-2 between neighbouring experts; 0.001 acts too slowly for 30
  // steps to show clearly and 0.03 overshoots (the load oscillates). Measured over seeds 1-5 at np 1,
  // 2 and 4, gamma = 0.003 lowered the tail load every time (ratio 0.77-0.98); with seed 3 the ratio
  // is 0.77-0.90, so the 5% margin below holds with room.
  o.bias_update_speed = 0.003f;
  Trainer biased(tiny(GetParam()), testing::world(), o);
  const double biased_load = tail_load(biased, steps, tail);
  for (auto& layer : biased.student().layers()) {
    const auto& b = layer->selection_bias();
    // Created for layers without one (softmax / greedy) and moved off zero.
    ASSERT_EQ(b.size(), static_cast<std::size_t>(layer->config().n_routed_experts)) << layer->name();
    EXPECT_TRUE(std::any_of(b.begin(), b.end(), [](float v) { return v != 0.0f; })) << layer->name();
    // Every element is a sum of +-gamma and 0 steps: |b_e| <= steps * gamma.
    for (float v : b) EXPECT_LE(std::abs(v), steps * o.bias_update_speed * 1.0001f);
    EXPECT_TRUE(identical_on_all_ranks(b)) << layer->name() << ": selection bias differs across ranks";
  }
  // The plain run's bias never moves (zeros for noaux_tc, none for greedy).
  for (auto& layer : plain.student().layers())
    for (float v : layer->selection_bias()) EXPECT_EQ(v, 0.0f);
  EXPECT_LT(biased_load, 0.95 * plain_load) << "max/mean load over the last " << tail << " steps";
  if (testing::world().rank() == 0)
    std::printf("[ info ] %s: max/mean load (last %d of %d steps): gamma 0 %.4f, gamma %g %.4f\n", GetParam(), tail,
                steps, plain_load, static_cast<double>(o.bias_update_speed), biased_load);
}

TEST_P(BalanceTest, AuxLossIsReportedReplicatedAndTrainingConverges) {
  TrainOptions o;
  o.tokens_per_rank = 32;
  o.adam.lr = 3e-3f;
  o.aux.seq_len = 8;
  o.aux.seq_alpha = 1e-3f;
  o.aux.expert_alpha = 1e-3f;
  Trainer trainer(tiny(GetParam()), testing::world(), o);
  TrainOptions off = o;
  off.aux = AuxLossOptions{};
  Trainer plain(tiny(GetParam()), testing::world(), off);
  const float per_rank = o.aux.seq_alpha / static_cast<float>(testing::world().size());
  for (auto& layer : trainer.student().layers()) EXPECT_EQ(layer->aux_loss().seq_alpha, per_rank);
  double first = 0.0, last = 0.0;
  bool differs = false;
  for (int s = 0; s < 80; ++s) {
    const StepRecord r = trainer.step();
    const StepRecord p = plain.step();
    ASSERT_TRUE(std::isfinite(r.loss));
    ASSERT_TRUE(std::isfinite(r.aux_loss));
    ASSERT_GT(r.aux_loss, 0.0) << "step " << r.step;
    EXPECT_EQ(p.aux_loss, 0.0);
    differs = differs || r.loss != p.loss;
    if (s == 0) first = r.loss;
    last = r.loss;
    if (s % 20 == 0 || s == 79) {
      EXPECT_TRUE(identical_on_all_ranks(std::vector<double>{r.loss, r.aux_loss})) << "step " << r.step;
      // The report is the sum over layers and ranks of what the layers computed (each with alpha/world).
      double mine = 0.0;
      for (auto& layer : trainer.student().layers()) mine += layer->aux_loss_value().total();
      testing::world().allreduce_sum(&mine, 1, comm::DataType::kFloat64, "aux check")->wait();
      EXPECT_NEAR(r.aux_loss, mine, 1e-12 * std::abs(mine)) << "step " << r.step;
    }
  }
  // The aux gradient reaches the gate (the run departs from the plain one) and training still
  // converges like LossFalls.
  EXPECT_TRUE(differs);
  EXPECT_LT(last, 0.75 * first) << "first " << first << " last " << last;
}

INSTANTIATE_TEST_SUITE_P(Gates, BalanceTest, ::testing::Values("sigmoid", "softmax"));

TEST(Balance, OffIsBitIdenticalToTheDefault) {
  for (const char* gate : {"sigmoid", "softmax"}) {
    TrainOptions d;
    d.tokens_per_rank = 16;
    TrainOptions z = d;
    z.bias_update_speed = 0.0f;
    z.aux.seq_len = 4;  // no effect while both coefficients are 0
    z.aux.seq_alpha = 0.0f;
    z.aux.expert_alpha = 0.0f;
    Trainer a(tiny(gate), testing::world(), d);
    Trainer b(tiny(gate), testing::world(), z);
    for (int s = 0; s < 6; ++s) {
      const StepRecord ra = a.step(), rb = b.step();
      EXPECT_EQ(ra.loss, rb.loss) << gate << " step " << s;
      EXPECT_EQ(ra.max_mean_load, rb.max_mean_load) << gate << " step " << s;
      EXPECT_EQ(rb.aux_loss, 0.0);
    }
    for (std::size_t l = 0; l < a.student().layers().size(); ++l) {
      EXPECT_EQ(a.student().layers()[l]->selection_bias(), b.student().layers()[l]->selection_bias());
      EXPECT_EQ(a.student().layers()[l]->replicated().value, b.student().layers()[l]->replicated().value);
      EXPECT_FALSE(b.student().layers()[l]->aux_loss().enabled());
    }
  }
}

TEST(Balance, BadOptionsAreConfigErrors) {
  const auto rejects = [](TrainOptions o, const std::string& field, const std::string& value) {
    try {
      Trainer t(tiny("sigmoid"), testing::world(), o);
      ADD_FAILURE() << field << " = " << value << " was accepted";
    } catch (const ConfigError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(field), std::string::npos) << m;
      EXPECT_NE(m.find(value), std::string::npos) << m;
      EXPECT_NE(m.find(">= 0"), std::string::npos) << m;
    }
  };
  TrainOptions o;
  o.bias_update_speed = -0.001f;
  rejects(o, "bias_update_speed", "-0.001");
  o = TrainOptions{};
  o.bias_update_speed = std::numeric_limits<float>::quiet_NaN();
  rejects(o, "bias_update_speed", "nan");
  o = TrainOptions{};
  o.aux.seq_alpha = -1.0f;
  rejects(o, "aux.seq_alpha", "-1");
  o = TrainOptions{};
  o.aux.expert_alpha = -0.5f;
  rejects(o, "aux.expert_alpha", "-0.5");
  o = TrainOptions{};
  o.aux.seq_len = -3;
  rejects(o, "aux.seq_len", "-3");
  o = TrainOptions{};
  o.aux.seq_alpha = std::numeric_limits<float>::infinity();
  rejects(o, "aux.seq_alpha", "inf");
}

TEST(Balance, LogLineAndJson) {
  StepRecord r;
  r.step = 3;
  r.loss = 1.5;
  r.ms = 2.0;
  r.tokens_per_s = 1000.0;
  r.max_mean_load = 1.25;
  r.aux_loss = 0.125;
  const auto columns = [](const std::string& s) { return std::count(s.begin(), s.end(), '|') + 1; };
  EXPECT_EQ(columns(format_step(r)), 6);
  EXPECT_EQ(columns(step_header()), 6);
  EXPECT_EQ(format_step(r).size(), step_header().size());
  EXPECT_EQ(columns(format_step(r, true)), 7);
  EXPECT_EQ(columns(step_header(true)), 7);
  EXPECT_EQ(format_step(r, true).rfind(format_step(r), 0), 0u) << "the first six columns stay as they were";
  EXPECT_EQ(format_step(r, true).size(), step_header(true).size());
  EXPECT_NE(format_step(r, true).find("1.250000e-01"), std::string::npos);
  EXPECT_NE(step_json(r).find("\"aux_loss\":0.125"), std::string::npos) << step_json(r);
  r.aux_loss = 0.0;
  EXPECT_NE(step_json(r).find("\"aux_loss\":0"), std::string::npos) << step_json(r);
}

/// Hot-expert replicas during training: with a skewed router, a run that plans replicas, migrates
/// weights and AdamW moments and spreads tokens over replicas computes the same losses as a run
/// without (fp32 reduction order aside), keeps every replica of an expert bit-identical across
/// ranks, and flattens the per-rank compute load.
TEST(Replicas, TrainingWithReplicasComputesTheSameLossesAndFlattensLoad) {
  auto& world = testing::world();
  TrainOptions o;
  o.tokens_per_rank = 48;
  o.skew = 1.2;
  o.adam.lr = 3e-3f;
  TrainOptions orep = o;
  orep.replicas.enabled = true;
  orep.replicas.interval = 3;
  orep.replicas.lag = 1;
  orep.replicas.spare_slots = 1;
  orep.replicas.ema = 0.5;
  const MoeConfig cfg = tiny("sigmoid");
  Trainer plain(cfg, world, o);
  Trainer rep(cfg, world, orep);
  const int steps = 16, tail = 6;
  std::int64_t migrated = 0;
  double plain_rank = 0.0, rep_rank = 0.0;
  for (int s = 0; s < steps; ++s) {
    const StepRecord a = plain.step(), b = rep.step();
    EXPECT_NEAR(b.loss, a.loss, 1e-4 * a.loss) << "step " << s;
    EXPECT_EQ(b.max_mean_load, a.max_mean_load) << "step " << s << ": routing must not change";
    migrated += b.migrated_slots;
    if (s >= steps - tail) {
      plain_rank += a.max_mean_rank_load / tail;
      rep_rank += b.max_mean_rank_load / tail;
    }
  }
  if (world.size() > 1) {  // on one rank every move is local and the rank load is 1 anyway
    EXPECT_GT(migrated, 0) << "the planner's layouts moved no expert between ranks";
    EXPECT_LT(rep_rank, plain_rank) << "replicas did not flatten the per-rank load";
  }
  std::printf("[rank %d] max/mean rank load over the last %d steps: %.3f without replicas, %.3f with; %lld slots migrated\n",
              world.rank(), tail, plain_rank, rep_rank, static_cast<long long>(migrated));
  // Every replica of an expert holds the same bits, on every rank.
  for (auto& layer : rep.student().layers()) {
    const auto stride = static_cast<std::size_t>(layer->expert_stride());
    const auto& values = layer->experts().value;
    std::vector<float> all(values.size() * static_cast<std::size_t>(world.size()));
    world.allgather(values.data(), all.data(), static_cast<std::int64_t>(values.size()), comm::DataType::kFloat32,
                    "replica values")->wait();
    const auto& slots = layer->replica_layout()->slot_expert();
    std::vector<const float*> first(static_cast<std::size_t>(cfg.n_routed_experts), nullptr);
    bool same = true;
    for (int r = 0; r < world.size(); ++r)
      for (std::size_t sl = 0; sl < slots[static_cast<std::size_t>(r)].size(); ++sl) {
        const float* block = all.data() + static_cast<std::size_t>(r) * values.size() + sl * stride;
        auto& f = first[static_cast<std::size_t>(slots[static_cast<std::size_t>(r)][sl])];
        if (f == nullptr) f = block;
        else same = same && std::memcmp(f, block, stride * sizeof(float)) == 0;
      }
    EXPECT_TRUE(same) << layer->name() << ": replicas of an expert differ";
  }
}

TEST(Capacity, DropsAreCountedAndTrainingStillLearns) {
  TrainOptions o;
  o.tokens_per_rank = 32;
  Trainer dropless(tiny("sigmoid"), testing::world(), o);
  EXPECT_EQ(dropless.step().picks_dropped, 0);
  o.layer.capacity_factor = 0.5;  // half of the mean load per expert: at least half the picks go
  Trainer capped(tiny("sigmoid"), testing::world(), o);
  double first = 0.0, last = 0.0;
  for (int s = 0; s < 30; ++s) {
    const StepRecord r = capped.step();
    const std::int64_t picks = 32 * testing::world().size() * 2 * 2;  // tokens x ranks x K x layers
    EXPECT_GE(r.picks_dropped, picks / 2) << "step " << s;
    EXPECT_LT(r.picks_dropped, picks) << "step " << s;
    if (s == 0) first = r.loss;
    last = r.loss;
  }
  EXPECT_LT(last, first);
}

TEST(Replicas, BadOptionsAreConfigErrors) {
  TrainOptions o;
  o.replicas.enabled = true;
  o.replicas.interval = 0;
  EXPECT_THROW(Trainer(tiny("sigmoid"), testing::world(), o), ConfigError);
  o.replicas.interval = 5;
  o.replicas.ema = 1.5;
  EXPECT_THROW(Trainer(tiny("sigmoid"), testing::world(), o), ConfigError);
  o = TrainOptions{};
  o.skew = -1.0;
  EXPECT_THROW(Trainer(tiny("sigmoid"), testing::world(), o), ConfigError);
}

/// Loss sum(y . R) of the model on fixed data, accumulated in double across ranks.
double probe_loss(MoeModel& m, const std::vector<float>& x, const std::vector<float>& r, std::int64_t tokens) {
  std::vector<float> y(x.size());
  m.forward(x.data(), tokens, y.data());
  double s = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) s += static_cast<double>(y[i]) * r[i];
  testing::world().allreduce_sum(&s, 1, comm::DataType::kFloat64, "probe")->wait();
  return s;
}

TEST(ModelGradient, NormAndReplicatedGradsMatchFiniteDifferences) {
  const MoeConfig c = tiny("sigmoid");
  auto& world = testing::world();
  const auto placement = sched::ExpertPlacement::contiguous(c.n_routed_experts, world.size());
  MoeModel m(c, world, placement);
  m.init_random(7);
  const std::int64_t T = 6, H = c.hidden_size;
  std::vector<float> x(static_cast<std::size_t>(T * H)), r(x.size());
  Rng rng(Rng::mix(11, static_cast<std::uint64_t>(world.rank())));
  rng.fill_normal(x.data(), T * H, 1.0);
  rng.fill_normal(r.data(), T * H, 1.0);
  std::vector<float> y(x.size());
  m.zero_grad();
  m.forward(x.data(), T, y.data());
  m.backward(r.data());
  // fp32 forward, central differences with h = 1e-2 on O(1) parameters: truncation and rounding
  // errors stay near 1e-3 relative, far below a wrong-formula error. Indices are probed where the
  // routing does not change under the perturbation (checked by comparing top-K ids).
  const float h = 1e-2f;
  std::vector<std::pair<ParamBlock*, std::size_t>> probes;
  for (std::size_t i = 0; i < 2 * static_cast<std::size_t>(H); i += 5) probes.push_back({&m.norms(), i});
  for (std::size_t i = 0; i < 40; i += 7) probes.push_back({&m.layers()[1]->replicated(), i});
  const auto shared = static_cast<std::size_t>(m.layers()[0]->shared_w13_offset());
  for (std::size_t i = shared; i < shared + 30; i += 6) probes.push_back({&m.layers()[0]->replicated(), i});
  int checked = 0;
  for (auto [block, i] : probes) {
    const float analytic = block->grad[i];
    const float saved = block->value[i];
    const auto ids0 = m.layers()[0]->topk_ids();
    block->value[i] = saved + h;
    const double up = probe_loss(m, x, r, T);
    const bool same_up = m.layers()[0]->topk_ids() == ids0;
    block->value[i] = saved - h;
    const double down = probe_loss(m, x, r, T);
    const bool same_down = m.layers()[0]->topk_ids() == ids0;
    block->value[i] = saved;
    if (!testing::all_ranks(same_up && same_down)) continue;
    const double numeric = (up - down) / (2.0 * h);
    EXPECT_NEAR(analytic, numeric, 2e-2 * std::max(1.0, std::abs(numeric))) << "param index " << i;
    ++checked;
  }
  EXPECT_GE(checked, static_cast<int>(probes.size()) / 2);
}

// ---------------------------------------------------------------------------------------------------
// Layer executors: the MoE layers' passes run elsewhere (the GPU path's hook), the rest on the host.

/// A LayerExecutor that runs each layer on a second, private host MoELayer (its "device copy"):
/// parameters are copied over only when the trainer says they changed, and gradients are added back,
/// exactly the protocol of the GPU executor. Same arithmetic, so training must be bitwise unchanged.
class MirrorExecutor final : public LayerExecutor {
 public:
  int forwards = 0, backwards = 0, uploads = 0;
  bool ignore_changes = false;  // for the negative check: keep using the first parameters

  void check(const MoELayer& layer) override {
    if (layer.replica_layout()) throw ConfigError("MirrorExecutor: one replica per expert only");
  }
  void forward(MoELayer& layer, const float* x, std::int64_t tokens, float* y) override {
    Copy& c = copy_of(layer);
    if (c.dirty) {
      c.layer->replicated().value = layer.replicated().value;
      c.layer->experts().value = layer.experts().value;
      c.layer->selection_bias() = layer.selection_bias();
      c.dirty = false;
      ++uploads;
    }
    c.layer->forward(x, tokens, y);
    layer.set_route_stats(c.layer->route_stats());
    ++forwards;
  }
  void backward(MoELayer& layer, const float* dy, float* dx) override {
    Copy& c = copy_of(layer);
    c.layer->zero_grad();
    c.layer->backward(dy, dx);
    add(layer.replicated().grad, c.layer->replicated().grad);
    add(layer.experts().grad, c.layer->experts().grad);
    ++backwards;
  }
  void parameters_changed(MoELayer& layer) override {
    Copy& c = copy_of(layer);
    if (!ignore_changes || !c.layer) c.dirty = true;
  }

 private:
  struct Copy {
    std::unique_ptr<MoELayer> layer;
    bool dirty = true;
  };
  Copy& copy_of(MoELayer& layer) {
    Copy& c = copies_[&layer];
    if (!c.layer)
      c.layer = std::make_unique<MoELayer>(layer.config(), layer.communicator(), layer.placement(), layer.name() + " copy",
                                           layer.topology(), layer.options());
    return c;
  }
  static void add(std::vector<float>& into, const std::vector<float>& from) {
    ASSERT_EQ(into.size(), from.size());
    for (std::size_t i = 0; i < into.size(); ++i) into[i] += from[i];
  }
  std::map<const MoELayer*, Copy> copies_;
};

TEST(Executor, TrainingThroughAnExecutorIsBitwiseTheSame) {
  TrainOptions o;
  o.tokens_per_rank = 24;
  o.bias_update_speed = 0.001f;  // the selection bias changes every step too
  const MoeConfig config = tiny("sigmoid");
  Trainer plain(config, testing::world(), o);
  Trainer routed(config, testing::world(), o);
  MirrorExecutor exec;
  routed.set_executor(&exec);
  constexpr int kSteps = 6;
  for (int s = 0; s < kSteps; ++s) {
    const StepRecord a = plain.step(), b = routed.step();
    EXPECT_EQ(a.loss, b.loss) << "step " << s;
    EXPECT_EQ(a.max_mean_load, b.max_mean_load) << "step " << s << ": the executor's route stats";
    EXPECT_EQ(a.max_mean_rank_load, b.max_mean_rank_load) << "step " << s;
  }
  const auto L = static_cast<int>(config.num_hidden_layers);
  EXPECT_EQ(exec.forwards, kSteps * 2 * L) << "teacher and student forwards, every layer";
  EXPECT_EQ(exec.backwards, kSteps * L) << "student backwards";
  EXPECT_EQ(exec.uploads, L + kSteps * L) << "teacher once, student at the start and after every step";
  for (std::size_t l = 0; l < plain.student().layers().size(); ++l) {
    EXPECT_EQ(plain.student().layers()[l]->experts().value, routed.student().layers()[l]->experts().value) << "layer " << l;
    EXPECT_EQ(plain.student().layers()[l]->replicated().value, routed.student().layers()[l]->replicated().value)
        << "layer " << l;
  }
}

TEST(Executor, StaleParametersAreCaught) {
  // The same run with an executor that ignores parameters_changed(): the student no longer learns
  // from its updates, so the losses part from the plain run (what the bitwise test above guards).
  TrainOptions o;
  o.tokens_per_rank = 24;
  const MoeConfig config = tiny("sigmoid");
  Trainer plain(config, testing::world(), o);
  Trainer routed(config, testing::world(), o);
  MirrorExecutor exec;
  exec.ignore_changes = true;
  routed.set_executor(&exec);
  bool differ = false;
  for (int s = 0; s < 4; ++s) differ = plain.step().loss != routed.step().loss || differ;
  EXPECT_TRUE(differ);
}

// An executor that cannot run replica layouts refuses them in check(), so set_executor() throws.
TEST(Executor, ReplicasAreRejectedByAnExecutorWithout) {
  TrainOptions o;
  o.replicas.enabled = true;
  Trainer t(tiny("sigmoid"), testing::world(), o);
  MirrorExecutor exec;
  EXPECT_THROW(t.set_executor(&exec), ConfigError);
}

// A folder every rank names alike (rank 0's pid), empty at the start; when the test ends every rank
// has finished with it and rank 0 removes it.
struct SharedFolder {
  std::string path;
  explicit SharedFolder(const std::string& what) {
    std::int64_t pid = testing::world().rank() == 0 ? static_cast<std::int64_t>(::getpid()) : 0;
    testing::world().allreduce_max(&pid, 1, comm::DataType::kInt64, "pid")->wait();
    path = "/tmp/moex_test_" + what + "_" + std::to_string(pid);
    if (testing::world().rank() == 0) std::filesystem::remove_all(path);
    testing::world().barrier("folder")->wait();
  }
  ~SharedFolder() {
    testing::world().barrier("done")->wait();
    if (testing::world().rank() == 0) std::filesystem::remove_all(path);
  }
};

// Stopping after step 3 and loading the checkpoint into a fresh trainer gives the uninterrupted
// run's losses bit for bit (explicit schedule; replicas, bias updates and aux losses on).
TEST(Checkpoint, ResumeIsBitwiseTheUninterruptedRun) {
  TrainOptions o;
  o.tokens_per_rank = 16;
  o.layer.chunks = 2;
  o.bias_update_speed = 1e-3f;
  o.aux.seq_alpha = 1e-3f;
  o.replicas.enabled = true;
  o.replicas.interval = 2;
  o.replicas.lag = 1;
  o.skew = 1.0;
  const MoeConfig config = tiny("sigmoid");
  const SharedFolder folder("resume");
  const std::string& dir = folder.path;
  Trainer full(config, testing::world(), o);
  std::vector<double> want;
  for (int s = 0; s < 7; ++s) want.push_back(full.step().loss);
  Trainer part(config, testing::world(), o);
  for (int s = 0; s < 3; ++s) part.step();
  const std::string at = part.save_checkpoint(dir);
  EXPECT_EQ(at, dir + "/step-00000003");
  Trainer resumed(config, testing::world(), o);
  resumed.load_checkpoint(dir);  // through `latest`
  EXPECT_EQ(resumed.steps_done(), 3);
  for (int s = 3; s < 7; ++s) {
    const StepRecord r = resumed.step();
    EXPECT_EQ(r.step, s + 1);
    EXPECT_EQ(r.loss, want[static_cast<std::size_t>(s)]) << "step " << s + 1;
  }
}

// A save that died before its rename leaves a temporary folder: the previous checkpoint and
// `latest` are untouched, the next save replaces the leftover, and --keep prunes old ones.
TEST(Checkpoint, ACrashedSaveLeavesThePreviousCheckpoint) {
  TrainOptions o;
  o.tokens_per_rank = 8;
  const MoeConfig config = tiny("sigmoid");
  const SharedFolder folder("atomic");
  const std::string& dir = folder.path;
  Trainer t(config, testing::world(), o);
  t.step();
  t.save_checkpoint(dir);
  if (testing::world().rank() == 0) {  // what a crash in the middle of the next save leaves
    std::filesystem::create_directories(dir + "/.step-00000002.tmp");
    std::ofstream(dir + "/.step-00000002.tmp/model-00001-of-00002.safetensors") << "partial";
  }
  testing::world().barrier("crash")->wait();
  EXPECT_EQ(resolve_checkpoint(dir), dir + "/step-00000001");
  Trainer u(config, testing::world(), o);
  u.load_checkpoint(dir);
  EXPECT_EQ(u.steps_done(), 1);
  t.step();
  t.save_checkpoint(dir, /*keep=*/1);
  EXPECT_EQ(resolve_checkpoint(dir), dir + "/step-00000002");
  EXPECT_EQ(list_checkpoints(dir), std::vector<std::string>{dir + "/step-00000002"});
  EXPECT_FALSE(std::filesystem::exists(dir + "/.step-00000002.tmp"));
}

// Damage and mismatch are refused on every rank, naming the file or the field.
TEST(Checkpoint, DamagedFilesAndOtherModelsAreRefusedOnEveryRank) {
  TrainOptions o;
  o.tokens_per_rank = 8;
  const MoeConfig config = tiny("sigmoid");
  const SharedFolder folder("damaged");
  const std::string& dir = folder.path;
  Trainer t(config, testing::world(), o);
  t.step();
  const std::string at = t.save_checkpoint(dir);
  MoeConfig other = config;
  other.moe_intermediate_size = 4;
  Trainer wrong_model(other, testing::world(), o);
  try {
    wrong_model.load_checkpoint(at);
    ADD_FAILURE() << "another model loaded";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("moe_intermediate_size"), std::string::npos) << e.what();
  }
  TrainOptions seeded = o;
  seeded.seed = 7;
  Trainer wrong_seed(config, testing::world(), seeded);
  EXPECT_THROW(wrong_seed.load_checkpoint(at), ConfigError);
  if (testing::world().rank() == 0) {
    std::fstream f(at + "/trainer_state.json", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(3);
    f.put('#');
  }
  testing::world().barrier("damage")->wait();
  Trainer u(config, testing::world(), o);
  try {
    u.load_checkpoint(at);
    ADD_FAILURE() << "a damaged checkpoint loaded";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("trainer_state.json: checksum"), std::string::npos) << e.what();
  }
  EXPECT_THROW(u.load_checkpoint(dir + "/nothing"), IoError);
}

}  // namespace
}  // namespace moex
