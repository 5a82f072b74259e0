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
#include "runtime/model/moe_model.h"
#include "runtime/random.h"
#include "scheduler/expert_placement.h"
#include "tests/cuda_layer_cases.h"
#include "tests/reference_moe.h"

namespace moex::cuda {
namespace {

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
    return make_cpu_layer(c, bf16, seed, *self_, sched::ExpertPlacement::contiguous(c.config.n_routed_experts, 1));
  }

  void step_and_compare(const std::string& tag, MoELayer& cpu, GpuMoELayer& gpu, const Batch& b, int64_t tokens,
                        double tol, bool zero = true) {
    cuda::step_and_compare(tag, cpu, gpu, b, tokens, tol, stream(), zero);
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
  EXPECT_GT(t.fwd_experts, 0.0) << "the forward's expert stage";
  EXPECT_GT(t.bwd_experts, 0.0) << "the backward's expert stage";
  // Consecutive stages: together no longer than the pass.
  EXPECT_LE(t.fwd_gate + t.fwd_permute + t.fwd_experts + t.fwd_combine, t.fwd_total + 1e-3);
  EXPECT_LE(t.bwd_permute + t.bwd_experts + t.bwd_combine + t.bwd_gate, t.bwd_total + 1e-3);
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

/// The auxiliary balance losses (load_from copies the CPU layer's options): their values, and their
/// gradient in the gate's, over several sequences (the last one short) and over one.
TEST_F(CudaLayerTest, AuxiliaryLossesMatchCpu) {
  for (const char* name : {"v3_like", "v2_lite_like"}) {
    const LayerCase c = case_of(name);
    auto cpu = cpu_layer(c, false, 16);
    AuxLossOptions aux;
    aux.seq_alpha = 0.5f;  // far above DeepSeek-V3's 1e-4, so the term is visible in the gate's gradient
    aux.seq_len = 10;
    aux.expert_alpha = 0.1f;
    cpu->set_aux_loss(aux);
    GpuMoELayer gpu(c.config, {});
    gpu.load_from(*cpu);
    EXPECT_EQ(gpu.aux_loss().seq_len, 10);
    step_and_compare(std::string("[") + name + " fp32 aux losses, T=37]", *cpu, gpu, draw_batch(*cpu, 37, 9, false),
                     37, kFp32Tol);
    aux.seq_len = 0;
    cpu->set_aux_loss(aux);
    gpu.set_aux_loss(aux);
    step_and_compare(std::string("[") + name + " fp32 aux losses, one sequence, T=20]", *cpu, gpu,
                     draw_batch(*cpu, 20, 10, false), 20, kFp32Tol);
  }
  GpuMoELayer gpu(case_of("v3_like").config, {});
  AuxLossOptions bad;
  bad.seq_len = -1;
  EXPECT_THROW(gpu.set_aux_loss(bad), InvalidArgument);
}

TEST_F(CudaLayerTest, RejectsMismatchesAndMisuse) {
  const LayerCase c = case_of("v3_like");
  GpuMoELayer gpu(c.config, {});
  EXPECT_THROW(gpu.backward(nullptr, nullptr, stream()), InvalidArgument) << "backward before any forward";
  EXPECT_THROW(gpu.forward(nullptr, -1, nullptr, stream()), InvalidArgument) << "negative token count";
  EXPECT_THROW(gpu.forward(nullptr, 4, nullptr, stream()), InvalidArgument) << "null x / y with tokens > 0";
  EXPECT_THROW(gpu.set_selection_bias(std::vector<float>(3, 0.0f)), InvalidArgument) << "bias of the wrong size";
  GpuLayerOptions capacity;
  capacity.capacity_factor = 1.25;
  EXPECT_THROW(GpuMoELayer(c.config, capacity), InvalidArgument) << "capacity factor on the single-GPU layer";
  GpuLayerOptions hier;
  hier.exchange = ExchangeKind::kHierarchical;
  EXPECT_THROW(GpuMoELayer(c.config, hier), InvalidArgument) << "hierarchical exchange on the single-GPU layer";
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
