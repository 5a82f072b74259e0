// GpuMoELayer (runtime/cuda/gpu_layer.h) against the CPU MoELayer on one rank: top-K ids, routing
// weights, expert row counts, y, dx and every parameter gradient, for a DeepSeek-V3-like config
// (sigmoid, noaux_tc groups, selection bias, 2 shared experts) and a DeepSeek-V2-Lite-like one
// (softmax, greedy, 2 shared experts), 0, 1, 37 and 256 tokens, fp32 and bf16.
//
// Runs under the MPI test main with one rank (the CPU layer needs a communicator: MPI_COMM_SELF).
// Every device test skips with "no CUDA device: <reason>" where cuda_device_count() is 0.
//
// Tolerances: max |got - want| / max |want| over each tensor, <= 1e-5 in fp32 (summation order is
// the only difference) and <= 2e-2 in bf16. In bf16 the weights, x and dy are made bf16-
// representable, so the differences come from the layer's own bf16 roundings (h13, sig, a, expert
// outputs, dy * w, dA, dh13, dx rows, the gradients themselves): a float64 emulation of exactly those
// roundings on these shapes gives 3e-3..8e-3 for y, dx and the gate gradient and up to 1.1e-2 for a
// single expert's w2 gradient, so 1e-2 would be flaky; a wrong term is O(1). The gate
// is fp32 in both modes: ids must be equal and routing weights within 1e-5. Tokens are drawn away
// from routing ties (float64 reference margin >= 1e-4), so both layers pick the same experts.
#include <gtest/gtest.h>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/mpi/mpi_communicator.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/moe_layer.h"
#include "runtime/moe_model.h"
#include "runtime/random.h"
#include "scheduler/expert_placement.h"
#include "tests/reference_moe.h"

namespace moex::cuda {
namespace {

using std::int64_t;
using Vec = std::vector<float>;

constexpr double kFp32Tol = 1e-5;
constexpr double kBf16Tol = 2e-2;  // see the file comment
constexpr double kTieMargin = 1e-4;

// ---------------------------------------------------------------------------------------------------
// Configurations

struct LayerCase {
  const char* name;
  MoeConfig config;
  double bias_sd;  // selection bias N(0, bias_sd); 0 = none
};

MoeConfig v3_like() {
  MoeConfig c;
  c.model_type = "deepseek_v3";
  c.hidden_size = 64;
  c.moe_intermediate_size = 32;
  c.n_routed_experts = 16;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.topk_method = TopkMethod::kNoauxTc;
  c.scoring_func = ScoringFunc::kSigmoid;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  c.num_hidden_layers = 1;
  c.validate();
  return c;
}

/// hidden 48 and ffn 20: bf16 rows of 20 elements take the kernels' unvectorised paths.
MoeConfig v2_lite_like() {
  MoeConfig c;
  c.model_type = "deepseek_v2";
  c.hidden_size = 48;
  c.moe_intermediate_size = 20;
  c.n_routed_experts = 32;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 6;
  c.n_group = 1;
  c.topk_group = 1;
  c.topk_method = TopkMethod::kGreedy;
  c.scoring_func = ScoringFunc::kSoftmax;
  c.norm_topk_prob = false;
  c.routed_scaling_factor = 1.0;
  c.num_hidden_layers = 1;
  c.validate();
  return c;
}

LayerCase case_of(const std::string& name) {
  if (name == "v3_like") return {"v3_like", v3_like(), 0.1};
  return {"v2_lite_like", v2_lite_like(), 0.0};
}

// ---------------------------------------------------------------------------------------------------
// Helpers

float bf16_round(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (finite values)
  u &= 0xffff0000u;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
void round_to_bf16(float* v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) v[i] = bf16_round(v[i]);
}

/// max |got - want| / max |want| <= tol over n values (an all-zero `want` needs max |got| <= tol).
::testing::AssertionResult within(const float* got, const float* want, std::size_t n, double tol,
                                  const std::string& what) {
  double max_diff = 0.0, max_ref = 0.0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(d <= max_diff)) {  // also catches NaN
      max_diff = std::isnan(d) ? std::numeric_limits<double>::infinity() : d;
      at = i;
    }
    max_ref = std::max(max_ref, std::abs(static_cast<double>(want[i])));
  }
  const double rel = max_ref > 0.0 ? max_diff / max_ref : max_diff;
  if (rel <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": max |gpu - cpu| = " << max_diff << " at [" << at << "] of " << n
                                       << " (gpu " << got[at] << ", cpu " << want[at] << "), max |cpu| = " << max_ref
                                       << ", relative " << rel << " > tolerance " << tol;
}
::testing::AssertionResult within(const Vec& got, const Vec& want, double tol, const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": gpu has " << got.size() << " values, cpu " << want.size();
  return within(got.data(), want.data(), got.size(), tol, what);
}

template <typename T>
::testing::AssertionResult same_values(const std::vector<T>& got, const std::vector<T>& want, int64_t per_row,
                                       const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": gpu has " << got.size() << " values, cpu " << want.size();
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i] && bad++ == 0) first = i;
  if (bad == 0) return ::testing::AssertionSuccess();
  const auto row = static_cast<int64_t>(first) / per_row, col = static_cast<int64_t>(first) % per_row;
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << got.size() << " differ; first at [" << row
                                       << ", " << col << "]: gpu " << got[first] << ", cpu " << want[first];
}

/// x [T, H] ~ N(0, 1) redrawn per token until the float64 reference gate decides every pick (and
/// group) with a margin >= kTieMargin; dy [T, H] ~ N(0, 1). With `bf16` both are bf16-representable.
struct Batch {
  Vec x, dy;
};
Batch draw_batch(MoELayer& cpu, int64_t tokens, std::uint64_t seed, bool bf16) {
  const MoeConfig& c = cpu.config();
  const int64_t H = c.hidden_size, E = c.n_routed_experts;
  const ref::GateSpec spec = ref::GateSpec::of(c);
  const ref::Vec gate(cpu.gate_weight(), cpu.gate_weight() + E * H);
  const ref::Vec bias(cpu.selection_bias().begin(), cpu.selection_bias().end());
  Rng rng(seed);
  Batch b;
  b.x.resize(static_cast<std::size_t>(tokens * H));
  for (int64_t t = 0; t < tokens; ++t) {
    float* row = b.x.data() + t * H;
    for (int attempt = 0;; ++attempt) {
      if (attempt > 1000) throw InternalError("draw_batch: cannot draw a token away from routing ties");
      rng.fill_normal(row, H, 1.0);
      if (bf16) round_to_bf16(row, static_cast<std::size_t>(H));
      const ref::GateOutput g = ref::gate_forward(spec, ref::Vec(row, row + H), 1, H, gate, bias);
      if (g.margin[0] >= kTieMargin) break;
    }
  }
  b.dy.resize(static_cast<std::size_t>(tokens * H));
  rng.fill_normal(b.dy.data(), tokens * H, 1.0);
  if (bf16) round_to_bf16(b.dy.data(), b.dy.size());
  return b;
}

/// The device test fixture: skips without a device; a stream, and the single-rank communicator of
/// the CPU layers.
class CudaLayerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (cuda_device_count(&why) == 0) GTEST_SKIP() << "no CUDA device: " << why;
    stream_.emplace();
    self_ = std::make_unique<comm::MpiCommunicator>(MPI_COMM_SELF);
  }
  cudaStream_t stream() const { return stream_->get(); }

  /// A single-rank CPU layer with init_layer_random parameters (plus a random selection bias when
  /// the case has one); with `bf16` the shared and expert weights are made bf16-representable.
  std::unique_ptr<MoELayer> cpu_layer(const LayerCase& c, bool bf16, std::uint64_t seed) {
    const MoeConfig& cfg = c.config;
    auto layer = std::make_unique<MoELayer>(cfg, *self_, sched::ExpertPlacement::contiguous(cfg.n_routed_experts, 1),
                                            std::string("cpu_") + c.name);
    init_layer_random(*layer, seed, 0);
    if (c.bias_sd > 0.0) {
      std::vector<float>& bias = layer->selection_bias();
      bias.resize(static_cast<std::size_t>(cfg.n_routed_experts));
      Rng rng(seed + 77);
      rng.fill_normal(bias.data(), cfg.n_routed_experts, c.bias_sd);
    }
    if (bf16) {
      const int64_t gate_n = cfg.n_routed_experts * cfg.hidden_size;
      Vec& rep = layer->replicated().value;
      round_to_bf16(rep.data() + gate_n, rep.size() - static_cast<std::size_t>(gate_n));
      Vec& ex = layer->experts().value;
      round_to_bf16(ex.data(), ex.size());
    }
    return layer;
  }

  /// One step on both layers (zero_grad, forward, backward when `zero`; else forward and backward
  /// only, so gradients accumulate) and the comparison of everything they produce.
  void step_and_compare(const std::string& tag, MoELayer& cpu, GpuMoELayer& gpu, const Batch& b, int64_t tokens,
                        double tol, bool zero = true) {
    const MoeConfig& cfg = cpu.config();
    const int64_t H = cfg.hidden_size, E = cfg.n_routed_experts, K = cfg.num_experts_per_tok, F = cfg.moe_intermediate_size,
                  Fs = cfg.shared_intermediate_size();
    const auto TH = static_cast<std::size_t>(tokens * H);
    cudaStream_t s = stream();

    if (zero) cpu.zero_grad();
    Vec y_cpu(TH), dx_cpu(TH);
    cpu.forward(b.x.data(), tokens, y_cpu.data());
    cpu.backward(b.dy.data(), dx_cpu.data());

    DeviceBuffer<float> d_x = to_device(b.x, s), d_dy = to_device(b.dy, s);
    DeviceBuffer<float> d_y(TH, s), d_dx(TH, s);
    if (zero) gpu.zero_grad(s);
    gpu.forward(d_x.data(), tokens, d_y.data(), s);
    gpu.backward(d_dy.data(), d_dx.data(), s);
    const Vec y_gpu = to_host(d_y, s), dx_gpu = to_host(d_dx, s);
    MOEX_CUDA_CHECK(cudaStreamSynchronize(s));  // surfaces a fault inside a kernel here

    EXPECT_TRUE(same_values(gpu.topk_ids_host(s), cpu.topk_ids(), K, tag + " topk_ids [token, pick]"));
    EXPECT_TRUE(within(gpu.topk_weights_host(s), cpu.topk_weights(), kFp32Tol, tag + " topk_weights (fp32 gate)"));
    EXPECT_TRUE(same_values(gpu.expert_counts(), cpu.route_stats().expert_tokens, E, tag + " rows per expert"));
    EXPECT_TRUE(within(y_gpu, y_cpu, tol, tag + " y"));
    EXPECT_TRUE(within(dx_gpu, dx_cpu, tol, tag + " dx"));

    const Vec rep_gpu = gpu.replicated_grads_host(s), ex_gpu = gpu.expert_grads_host(s);
    const Vec& rep_cpu = cpu.replicated().grad;
    const Vec& ex_cpu = cpu.experts().grad;
    ASSERT_EQ(rep_gpu.size(), rep_cpu.size()) << tag << ": replicated gradient sizes (gpu vs cpu)";
    ASSERT_EQ(ex_gpu.size(), ex_cpu.size()) << tag << ": expert gradient sizes (gpu vs cpu)";
    // The gate gradient is fp32 in both modes but depends on the expert outputs (bf16 in bf16 mode).
    std::size_t o = 0;
    auto part = [&](const Vec& got, const Vec& want, std::size_t n, const std::string& what) {
      EXPECT_TRUE(within(got.data() + o, want.data() + o, n, tol, tag + " grad " + what));
      o += n;
    };
    part(rep_gpu, rep_cpu, static_cast<std::size_t>(E * H), "gate.weight [E, H]");
    part(rep_gpu, rep_cpu, static_cast<std::size_t>(2 * Fs * H), "shared w13 [2Fs, H]");
    part(rep_gpu, rep_cpu, static_cast<std::size_t>(H * Fs), "shared w2 [H, Fs]");
    o = 0;
    for (int64_t e = 0; e < E; ++e) {
      part(ex_gpu, ex_cpu, static_cast<std::size_t>(2 * F * H), "expert " + std::to_string(e) + " w13 [2F, H]");
      part(ex_gpu, ex_cpu, static_cast<std::size_t>(H * F), "expert " + std::to_string(e) + " w2 [H, F]");
    }
  }

 private:
  std::optional<Stream> stream_;
  std::unique_ptr<comm::MpiCommunicator> self_;
};

// ---------------------------------------------------------------------------------------------------
// Host-only

TEST(CudaLayerHost, PrecisionNames) {
  EXPECT_EQ(precision_from_string("fp32"), LayerPrecision::kFp32);
  EXPECT_EQ(precision_from_string("bf16"), LayerPrecision::kBf16);
  EXPECT_STREQ(to_string(LayerPrecision::kBf16), "bf16");
  EXPECT_THROW(precision_from_string("fp16"), ConfigError);
}

// ---------------------------------------------------------------------------------------------------
// GPU vs CPU

struct Param {
  const char* config;
  LayerPrecision precision;
};
void PrintTo(const Param& p, std::ostream* os) { *os << p.config << "_" << to_string(p.precision); }

class CudaLayerVsCpu : public CudaLayerTest, public ::testing::WithParamInterface<Param> {};

TEST_P(CudaLayerVsCpu, MatchesCpuLayer) {
  const LayerCase c = case_of(GetParam().config);
  const LayerPrecision prec = GetParam().precision;
  const bool bf16 = prec == LayerPrecision::kBf16;
  const double tol = bf16 ? kBf16Tol : kFp32Tol;
  auto cpu = cpu_layer(c, bf16, 11);
  GpuLayerOptions opt;
  opt.precision = prec;
  GpuMoELayer gpu(c.config, opt);
  gpu.load_from(*cpu);

  // One layer pair through growing and shrinking batches: the workspace must stop growing at 256.
  const int64_t steps[] = {0, 1, 37, 256, 37, 256};
  int64_t allocations_at_256 = -1;
  for (std::size_t i = 0; i < std::size(steps); ++i) {
    const int64_t T = steps[i];
    const std::string tag = std::string("[") + c.name + " " + to_string(prec) + " T=" + std::to_string(T) + " step " +
                            std::to_string(i) + "]";
    const Batch b = draw_batch(*cpu, T, 1000 + i, bf16);
    step_and_compare(tag, *cpu, gpu, b, T, tol);
    if (T == 256 && allocations_at_256 < 0) allocations_at_256 = gpu.workspace_allocations();
  }
  EXPECT_EQ(gpu.workspace_allocations(), allocations_at_256)
      << "the workspace was reallocated after it had grown to 256 tokens (steps of 37 and 256 tokens must reuse it)";
}

INSTANTIATE_TEST_SUITE_P(Configs, CudaLayerVsCpu,
                         ::testing::Values(Param{"v3_like", LayerPrecision::kFp32},
                                           Param{"v3_like", LayerPrecision::kBf16},
                                           Param{"v2_lite_like", LayerPrecision::kFp32},
                                           Param{"v2_lite_like", LayerPrecision::kBf16}),
                         [](const ::testing::TestParamInfo<Param>& i) {
                           return std::string(i.param.config) + "_" + to_string(i.param.precision);
                         });

/// The loop implementation of the grouped GEMM, and everything on one stream (no shared overlap).
TEST_F(CudaLayerTest, LoopGemmWithoutOverlapMatchesCpu) {
  const LayerCase c = case_of("v3_like");
  auto cpu = cpu_layer(c, false, 12);
  GpuLayerOptions opt;
  opt.gemm = GroupedGemmImpl::kLoop;
  opt.overlap_shared = false;
  opt.profile = true;
  GpuMoELayer gpu(c.config, opt);
  gpu.load_from(*cpu);
  step_and_compare("[v3_like fp32 loop, no overlap, T=37]", *cpu, gpu, draw_batch(*cpu, 37, 5, false), 37, kFp32Tol);
  const GpuLayerTimes t = gpu.last_times();
  EXPECT_GT(t.fwd_total, 0.0) << "profiling was on: the forward's stage times must be recorded";
  EXPECT_GT(t.bwd_total, 0.0) << "profiling was on: the backward's stage times must be recorded";
}

/// Without zero_grad between steps both layers accumulate gradients (CPU: fp32 sums; GPU fp32 too).
TEST_F(CudaLayerTest, GradientsAccumulateOverSteps) {
  const LayerCase c = case_of("v2_lite_like");
  auto cpu = cpu_layer(c, false, 13);
  GpuMoELayer gpu(c.config, {});
  gpu.load_from(*cpu);
  step_and_compare("[v2_lite_like fp32 accumulate, step 1 T=37]", *cpu, gpu, draw_batch(*cpu, 37, 6, false), 37,
                   kFp32Tol);
  step_and_compare("[v2_lite_like fp32 accumulate, step 2 T=20]", *cpu, gpu, draw_batch(*cpu, 20, 7, false), 20,
                   kFp32Tol, /*zero=*/false);
}

/// No shared experts: the combine writes y and dx without adding to a shared output.
TEST_F(CudaLayerTest, NoSharedExpertsMatchesCpu) {
  LayerCase c = case_of("v2_lite_like");
  c.config.n_shared_experts = 0;
  c.config.validate();
  for (LayerPrecision prec : {LayerPrecision::kFp32, LayerPrecision::kBf16}) {
    const bool bf16 = prec == LayerPrecision::kBf16;
    auto cpu = cpu_layer(c, bf16, 14);
    GpuLayerOptions opt;
    opt.precision = prec;
    GpuMoELayer gpu(c.config, opt);
    gpu.load_from(*cpu);
    step_and_compare(std::string("[v2_lite_like no shared ") + to_string(prec) + " T=37]", *cpu, gpu,
                     draw_batch(*cpu, 37, 8, bf16), 37, bf16 ? kBf16Tol : kFp32Tol);
  }
}

TEST_F(CudaLayerTest, RejectsMismatchesAndMisuse) {
  const LayerCase c = case_of("v3_like");
  GpuMoELayer gpu(c.config, {});
  EXPECT_THROW(gpu.backward(nullptr, nullptr, stream()), InvalidArgument) << "backward before any forward";
  EXPECT_THROW(gpu.forward(nullptr, -1, nullptr, stream()), InvalidArgument) << "negative token count";
  EXPECT_THROW(gpu.forward(nullptr, 4, nullptr, stream()), InvalidArgument) << "null x / y with tokens > 0";
  EXPECT_THROW(gpu.set_selection_bias(std::vector<float>(3, 0.0f)), InvalidArgument) << "bias of the wrong size";
  LayerCase other = case_of("v2_lite_like");
  auto cpu = cpu_layer(other, false, 15);
  try {
    gpu.load_from(*cpu);
    ADD_FAILURE() << "load_from accepted a CPU layer of another config";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("hidden_size"), std::string::npos)
        << "the error should name the first mismatching field (hidden_size); got: " << e.what();
  }
}

}  // namespace
}  // namespace moex::cuda
