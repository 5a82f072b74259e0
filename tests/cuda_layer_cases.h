// Shared by the GPU layer tests (test_cuda_layer.cpp, test_cuda_ep_layer.cpp): the layer configs,
// bf16 rounding, the comparison helpers, a batch generator away from routing ties, and one step of
// a CPU and a GPU layer compared output by output (tolerances: see test_cuda_layer.cpp's comment).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/error.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/moe_layer.h"
#include "runtime/model/moe_model.h"
#include "runtime/random.h"
#include "scheduler/expert_placement.h"
#include "scheduler/replica_planner.h"
#include "scheduler/topology.h"
#include "tests/reference_moe.h"
#include "tests/tolerance.h"

namespace moex::cuda {
namespace {

using moex::testing::within;
using std::int64_t;
using Vec = std::vector<float>;

constexpr double kFp32Tol = 1e-5;
constexpr double kBf16Tol = 2e-2;  // see the file comment of test_cuda_layer.cpp
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


/// init_layer_random parameters for `layer` (identical on every rank; plus a random selection bias
/// when the case has one); with `bf16` the shared and expert weights are made bf16-representable.
void init_cpu_layer(MoELayer& layer, const LayerCase& c, bool bf16, std::uint64_t seed) {
  const MoeConfig& cfg = c.config;
  init_layer_random(layer, seed, 0);
  if (c.bias_sd > 0.0) {
    std::vector<float>& bias = layer.selection_bias();
    bias.resize(static_cast<std::size_t>(cfg.n_routed_experts));
    Rng rng(seed + 77);
    rng.fill_normal(bias.data(), cfg.n_routed_experts, c.bias_sd);
  }
  if (bf16) {
    const int64_t gate_n = cfg.n_routed_experts * cfg.hidden_size;
    Vec& rep = layer.replicated().value;
    round_to_bf16(rep.data() + gate_n, rep.size() - static_cast<std::size_t>(gate_n));
    Vec& ex = layer.experts().value;
    round_to_bf16(ex.data(), ex.size());
  }
}

/// A CPU layer over `comm` with `placement` (on `topology`: default one node) and init_cpu_layer's
/// parameters.
std::unique_ptr<MoELayer> make_cpu_layer(const LayerCase& c, bool bf16, std::uint64_t seed, comm::Communicator& comm,
                                         sched::ExpertPlacement placement, LayerOptions options = {},
                                         std::optional<sched::Topology> topology = std::nullopt) {
  auto layer = std::make_unique<MoELayer>(c.config, comm, std::move(placement), std::string("cpu_") + c.name,
                                          std::move(topology), options);
  init_cpu_layer(*layer, c, bf16, seed);
  return layer;
}

/// A replica-mode CPU layer over `comm` in `layout` (on `topology`) with init_cpu_layer's parameters
/// (every replica of an expert holds its weights).
std::unique_ptr<MoELayer> make_cpu_layer(const LayerCase& c, bool bf16, std::uint64_t seed, comm::Communicator& comm,
                                         sched::ReplicaLayout layout, const sched::Topology& topology,
                                         LayerOptions options = {}) {
  auto layer = std::make_unique<MoELayer>(c.config, comm, std::move(layout), std::string("cpu_") + c.name, topology,
                                          options);
  init_cpu_layer(*layer, c, bf16, seed);
  return layer;
}

/// The rows each local expert slot of `cpu` processed in its last forward.
std::vector<int64_t> cpu_rows_per_slot(const MoELayer& cpu) {
  const sched::ExchangePlan& plan = cpu.exchange_plan();
  std::vector<int64_t> rows;
  for (std::int64_t s = 0; s < plan.num_local; ++s) rows.push_back(plan.slot_entries(s));
  return rows;
}

/// One step on both layers (zero_grad, forward, backward when `zero`; else forward and backward
/// only, so gradients accumulate) on `stream`, and the comparison of everything they produce: top-K
/// ids and weights, rows per local expert slot, y, dx, the auxiliary losses, and this rank's
/// gradients (replicated ones before any all-reduce).
void step_and_compare(const std::string& tag, MoELayer& cpu, GpuMoELayer& gpu, const Batch& b, int64_t tokens,
                      double tol, cudaStream_t s, bool zero = true) {
  const MoeConfig& cfg = cpu.config();
  const int64_t H = cfg.hidden_size, E = cfg.n_routed_experts, K = cfg.num_experts_per_tok,
                F = cfg.moe_intermediate_size, Fs = cfg.shared_intermediate_size();
  const auto TH = static_cast<std::size_t>(tokens * H);

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
  EXPECT_TRUE(same_values(gpu.expert_counts(), cpu_rows_per_slot(cpu), 1, tag + " rows per local expert slot"));
  EXPECT_TRUE(within(y_gpu, y_cpu, tol, tag + " y"));
  EXPECT_TRUE(within(dx_gpu, dx_cpu, tol, tag + " dx"));
  // The auxiliary balance losses (zeros when off): the same double sums from the same fp32 scores.
  const kernels::BalanceLossValue aux_gpu = gpu.aux_loss_value(s), aux_cpu = cpu.aux_loss_value();
  EXPECT_NEAR(aux_gpu.seq, aux_cpu.seq, 1e-5 * std::abs(aux_cpu.seq)) << tag << " sequence-wise balance loss";
  EXPECT_NEAR(aux_gpu.expert, aux_cpu.expert, 1e-5 * std::abs(aux_cpu.expert)) << tag << " expert-level balance loss";
  if (cpu.aux_loss().enabled() && tokens > 0) {
    EXPECT_GT(aux_cpu.total(), 0.0) << tag;
  }

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
  const auto slots = static_cast<int64_t>(ex_cpu.size()) / (3 * F * H);
  for (int64_t e = 0; e < slots; ++e) {
    part(ex_gpu, ex_cpu, static_cast<std::size_t>(2 * F * H), "slot " + std::to_string(e) + " w13 [2F, H]");
    part(ex_gpu, ex_cpu, static_cast<std::size_t>(H * F), "slot " + std::to_string(e) + " w2 [H, F]");
  }
}

}  // namespace
}  // namespace moex::cuda
