// The CUDA kernels (runtime/cuda) against the CPU kernels (runtime/kernels): gate forward / backward,
// permute and combine, SwiGLU, dtype conversion and the grouped expert FFN.
//
// Every device test skips with "no CUDA device: <reason>" where cuda_device_count() is 0. The
// CudaHost tests need no device (argument checks, error macros, the combine plan) and always run.
//
// Tolerances: max |got - want| / max |want| over a tensor, <= 1e-5 for fp32 (summation order and a
// couple of ulps of expf are the only differences) and <= 1e-2 for bf16 storage (fp32 math, every
// stored value rounded to 8 bits of mantissa). bf16 inputs are made exactly representable, so the
// fp32 CPU reference sees the same inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "base/error.h"
#include "runtime/blas.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/grouped_gemm.h"
#include "runtime/cuda/kernels.h"
#include "runtime/kernels/expert_ffn.h"
#include "runtime/kernels/gate.h"
#include "runtime/kernels/math.h"
#include "runtime/kernels/permute.h"
#include "runtime/kernels/swiglu_rows.h"
#include "runtime/parallel.h"
#include "runtime/random.h"
#include "tests/tolerance.h"

namespace moex::cuda {
namespace {

using std::int64_t;
using Vec = std::vector<float>;

constexpr double kFp32Tol = 1e-5;
constexpr double kBf16Tol = 1e-2;

// ---------------------------------------------------------------------------------------------------
// Helpers

/// Fixture of the device tests: skips without a device, else gives a stream and a cuBLAS handle.
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (cuda_device_count(&why) == 0) GTEST_SKIP() << "no CUDA device: " << why;
    stream_.emplace();
    blas_.emplace();
  }
  cudaStream_t stream() const { return stream_->get(); }
  cublasHandle_t blas() const { return blas_->get(); }

 private:
  std::optional<Stream> stream_;
  std::optional<CublasHandle> blas_;
};

float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
/// bf16 bits of a finite float, round to nearest even (the reference for the device conversion).
std::uint16_t bf16_bits(float f) {
  std::uint32_t u = float_to_bits(f);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}
float bf16_round(float f) { return bits_to_float(static_cast<std::uint32_t>(bf16_bits(f)) << 16); }
void round_to_bf16(Vec& v) {
  for (float& x : v) x = bf16_round(x);
}

static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes");
std::vector<bf16> to_bf16(const Vec& v) {
  std::vector<bf16> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    __nv_bfloat16_raw raw;
    raw.x = bf16_bits(v[i]);
    out[i] = bf16(raw);
  }
  return out;
}
std::uint16_t raw_bits(bf16 b) { return static_cast<__nv_bfloat16_raw>(b).x; }
Vec from_bf16(const std::vector<bf16>& v) {
  Vec out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = bits_to_float(static_cast<std::uint32_t>(raw_bits(v[i])) << 16);
  return out;
}

/// Uniform in [-scale, scale) from the raw generator (fast: no log / cos).
Vec uniform(Rng& rng, int64_t n, double scale) {
  Vec v(static_cast<std::size_t>(n));
  for (float& x : v) x = static_cast<float>((2.0 * rng.uniform() - 1.0) * scale);
  return v;
}
Vec normal(Rng& rng, int64_t n, double stddev) {
  Vec v(static_cast<std::size_t>(n));
  rng.fill_normal(v.data(), n, stddev);
  return v;
}

using moex::testing::within;

template <typename T>
std::vector<T> download(const DeviceBuffer<T>& d, cudaStream_t s) {
  return to_host(d, s);
}
Vec download_f32(const DeviceBuffer<bf16>& d, cudaStream_t s) { return from_bf16(to_host(d, s)); }

// ---------------------------------------------------------------------------------------------------
// Host-only: argument checks and error reporting (run without a device)

TEST(CudaHost, DeviceCountNeverThrowsAndExplainsZero) {
  std::string why = "unchanged";
  int n = -1;
  EXPECT_NO_THROW(n = cuda_device_count(&why));
  EXPECT_GE(n, 0);
  if (n == 0) {
    EXPECT_FALSE(why.empty());
    std::cout << "cuda_device_count() = 0: " << why << "\n";
  } else {
    EXPECT_TRUE(why.empty()) << why;
  }
  EXPECT_NO_THROW(cuda_device_count(nullptr));
}

TEST(CudaHost, CheckMacrosThrowCudaErrorNamingCallFileAndReason) {
  try {
    MOEX_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "MOEX_CUDA_CHECK did not throw";
  } catch (const CudaError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cudaErrorInvalidValue"), std::string::npos) << m;
    EXPECT_NE(m.find("test_cuda_kernels.cpp:"), std::string::npos) << m;
    EXPECT_NE(m.find(cudaGetErrorString(cudaErrorInvalidValue)), std::string::npos) << m;
  }
  try {
    MOEX_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE);
    FAIL() << "MOEX_CUBLAS_CHECK did not throw";
  } catch (const CudaError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("CUBLAS_STATUS_INVALID_VALUE"), std::string::npos) << m;
    EXPECT_NE(m.find("test_cuda_kernels.cpp:"), std::string::npos) << m;
  }
  EXPECT_NO_THROW(MOEX_CUDA_CHECK(cudaSuccess));
  EXPECT_NO_THROW(MOEX_CUBLAS_CHECK(CUBLAS_STATUS_SUCCESS));
}

TEST(CudaHost, GateRejectsBadParamsBeforeTouchingTheDevice) {
  kernels::GateParams p;
  p.tokens = 4;
  p.hidden = 8;
  p.experts = 8;
  p.topk = 9;  // > experts
  EXPECT_THROW(gate_forward(nullptr, p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr), InvalidArgument);
  p.topk = 2;
  p.method = TopkMethod::kNoauxTc;
  p.n_group = 3;  // does not divide 8
  p.topk_group = 1;
  EXPECT_THROW(gate_forward(nullptr, p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr), InvalidArgument);
  p.n_group = 4;
  p.topk_group = 5;  // > n_group
  EXPECT_THROW(gate_backward(nullptr, p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                             nullptr),
               InvalidArgument);
  try {
    gate_forward(nullptr, p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("topk_group = 5"), std::string::npos) << e.what();
  }
  p.topk_group = 2;
  p.tokens = 0;  // valid and empty: nothing is queued, so no device is needed
  EXPECT_NO_THROW(gate_forward(nullptr, p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));
}

TEST(CudaHost, GroupedFfnRejectsBadShapesAndRowCounts) {
  EXPECT_THROW(GroupedFfn({0, 8, 8}, DType::kFp32, GroupedGemmImpl::kLoop), InvalidArgument);
  GroupedFfn ffn({3, 8, 8}, DType::kBf16, GroupedGemmImpl::kGroupedBatched);
  const std::vector<int64_t> two = {1, 2};
  EXPECT_THROW(ffn.forward(nullptr, two, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr),
               InvalidArgument);
  const std::vector<int64_t> negative = {1, -2, 0};
  EXPECT_THROW(ffn.forward(nullptr, negative, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr),
               InvalidArgument);
  GemmProblem bad;
  bad.m = 4;
  bad.n = 4;
  bad.k = 4;
  bad.lda = 2;  // < k
  bad.ldb = 4;
  bad.ldc = 4;
  float dummy = 0.0f;
  bad.a = bad.b = &dummy;
  bad.c = &dummy;
  EXPECT_THROW(gemm(nullptr, DType::kFp32, bad, nullptr), InvalidArgument);
  EXPECT_THROW(fixed_order_gemm(DType::kFp32, bad, nullptr, nullptr), InvalidArgument);
  // k_rows needs an operand stored k-major: neither is when A is [m, k] and B is stored [n, k].
  GemmProblem nt = gemm_problem(false, true, 4, 4, 4, &dummy, 4, &dummy, 4, &dummy, 4);
  const int64_t rows[4] = {0, 1, 2, 3};
  try {
    fixed_order_gemm(DType::kFp32, nt, rows, nullptr);
    ADD_FAILURE() << "fixed_order_gemm accepted k_rows without a k-major operand";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("k_rows"), std::string::npos) << e.what();
  }
  const std::vector<int64_t> counts = {1, 2, 0};
  EXPECT_THROW(ffn.backward_weights(counts, nullptr, &dummy, &dummy, &dummy, &dummy, &dummy, &dummy, false, nullptr),
               InvalidArgument);  // rows but no k_rows
}

TEST(CudaHost, CombinePlanIsAStableCsrOfTheScatter) {
  const std::vector<int64_t> index = {2, 0, 2, 3, 0, 2};
  const Vec scale = {0.5f, 1.5f, 2.0f, -1.0f, 3.0f, 4.0f};
  const CombinePlan plan = build_combine_plan(6, 5, index.data(), scale.data());
  EXPECT_EQ(plan.offsets, (std::vector<int64_t>{0, 2, 2, 5, 6, 6}));
  EXPECT_EQ(plan.src_row, (std::vector<int64_t>{1, 4, 0, 2, 5, 3}));
  EXPECT_EQ(plan.weight, (Vec{1.5f, 3.0f, 0.5f, 2.0f, 4.0f, -1.0f}));
  const CombinePlan ones = build_combine_plan(6, 5, index.data(), nullptr);
  EXPECT_TRUE(ones.weight.empty());
  const std::vector<int64_t> bad = {0, 5};
  EXPECT_THROW(build_combine_plan(2, 5, bad.data(), nullptr), InvalidArgument);
}

// ---------------------------------------------------------------------------------------------------
// Conversion

TEST_F(CudaTest, ConvertRoundsToNearestEvenAndWidensExactly) {
  Rng rng(1);
  Vec v = normal(rng, 10000, 3.0);
  // Exact halfway cases (ties to even) and small / large magnitudes.
  for (std::uint32_t hi : {0x3f80u, 0x3f81u, 0xbf80u, 0x4000u, 0x0080u, 0x7f00u})
    for (std::uint32_t lo : {0x8000u, 0x7fffu, 0x8001u, 0x0000u, 0xffffu}) v.push_back(bits_to_float((hi << 16) | lo));
  v.push_back(0.0f);
  v.push_back(-0.0f);
  const int64_t n = static_cast<int64_t>(v.size());
  auto d = to_device(v, stream());
  DeviceBuffer<bf16> b(v.size(), stream());
  DeviceBuffer<float> back(v.size(), stream());
  convert(d.data(), b.data(), n, stream());
  convert(b.data(), back.data(), n, stream());
  const auto bits = to_host(b, stream());
  const Vec wide = download(back, stream());
  for (std::size_t i = 0; i < v.size(); ++i) {
    const std::uint16_t got = raw_bits(bits[i]);
    ASSERT_EQ(got, bf16_bits(v[i])) << "value " << v[i] << " (index " << i << ")";
    ASSERT_EQ(float_to_bits(wide[i]), static_cast<std::uint32_t>(got) << 16) << "index " << i;
  }
}

// ---------------------------------------------------------------------------------------------------
// Gate

struct GateCase {
  const char* name;
  ScoringFunc scoring;
  TopkMethod method;
  int64_t experts, topk, n_group, topk_group;
  bool norm;
  float scaling;
  bool bias;
  int64_t tokens, hidden;
};

const GateCase kGateCases[] = {
    {"softmax_greedy", ScoringFunc::kSoftmax, TopkMethod::kGreedy, 64, 6, 1, 1, false, 1.0f, false, 257, 96},
    {"softmax_greedy_norm", ScoringFunc::kSoftmax, TopkMethod::kGreedy, 64, 6, 1, 1, true, 1.0f, false, 300, 96},
    {"v2_group_limited", ScoringFunc::kSoftmax, TopkMethod::kGroupLimitedGreedy, 160, 6, 8, 3, false, 16.0f, false, 200,
     96},
    {"v3_noaux_tc", ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 256, 8, 8, 4, true, 2.5f, true, 200, 96},
    {"noaux_tc_odd_sizes", ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 36, 5, 6, 2, true, 1.5f, true, 77, 40},
    {"sigmoid_group_limited_bias", ScoringFunc::kSigmoid, TopkMethod::kGroupLimitedGreedy, 64, 4, 4, 2, true, 1.0f,
     true, 150, 64},
    {"sigmoid_greedy_small", ScoringFunc::kSigmoid, TopkMethod::kGreedy, 8, 2, 1, 1, false, 1.0f, false, 33, 16},
    {"softmax_many_experts", ScoringFunc::kSoftmax, TopkMethod::kGreedy, 1000, 8, 1, 1, true, 1.0f, false, 40, 32},
};

kernels::GateParams params_of(const GateCase& c) {
  kernels::GateParams p;
  p.tokens = c.tokens;
  p.hidden = c.hidden;
  p.experts = c.experts;
  p.topk = c.topk;
  p.n_group = c.n_group;
  p.topk_group = c.topk_group;
  p.scoring = c.scoring;
  p.method = c.method;
  p.norm_topk_prob = c.norm;
  p.routed_scaling_factor = c.scaling;
  return p;
}

/// Values k / denom for integers |k| <= kmax: with x in 1/16 steps and wg in 1/256 steps every
/// logit is a multiple of 2^-12 below 2^6 in magnitude, so cuBLAS and OpenBLAS compute it exactly
/// whatever their summation order, and routing differences can only come from the scores.
Vec grid_values(Rng& rng, int64_t n, int kmax, float denom) {
  Vec v(static_cast<std::size_t>(n));
  for (float& x : v) x = static_cast<float>(static_cast<int>(rng.next() % static_cast<std::uint64_t>(2 * kmax + 1)) - kmax) / denom;
  return v;
}

/// Whether token t's selection is within `tol` of a tie (a group at the topk_group boundary, or two
/// experts among the first K+1 eligible), judged from the CPU's scores: there the GPU may pick the
/// other side of the tie, both answers being right to float precision.
bool near_tie(const kernels::GateParams& p, const float* s, const float* bias, double tol) {
  const int64_t E = p.experts;
  Vec c(static_cast<std::size_t>(E));
  for (int64_t e = 0; e < E; ++e) c[static_cast<std::size_t>(e)] = s[e] + (bias ? bias[e] : 0.0f);
  std::vector<bool> eligible(static_cast<std::size_t>(E), true);
  if (p.method != TopkMethod::kGreedy && p.n_group > 1) {
    const int64_t per = E / p.n_group;
    Vec gs;
    for (int64_t g = 0; g < p.n_group; ++g) {
      Vec grp(c.begin() + g * per, c.begin() + (g + 1) * per);
      std::sort(grp.begin(), grp.end(), std::greater<>());
      gs.push_back(p.method == TopkMethod::kNoauxTc ? grp[0] + (per > 1 ? grp[1] : -INFINITY) : grp[0]);
    }
    Vec sorted = gs;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    if (p.topk_group < p.n_group) {
      const float cut = sorted[static_cast<std::size_t>(p.topk_group - 1)];
      if (cut - sorted[static_cast<std::size_t>(p.topk_group)] < tol) return true;
      for (int64_t e = 0; e < E; ++e) eligible[static_cast<std::size_t>(e)] = gs[static_cast<std::size_t>(e / per)] >= cut;
    }
  }
  Vec v;
  for (int64_t e = 0; e < E; ++e)
    if (eligible[static_cast<std::size_t>(e)]) v.push_back(c[static_cast<std::size_t>(e)]);
  std::sort(v.begin(), v.end(), std::greater<>());
  for (int64_t j = 0; j < p.topk && j + 1 < static_cast<int64_t>(v.size()); ++j)
    if (v[static_cast<std::size_t>(j)] - v[static_cast<std::size_t>(j + 1)] < tol) return true;
  return false;
}

TEST_F(CudaTest, GateForwardMatchesCpu) {
  for (const GateCase& gc : kGateCases) {
    SCOPED_TRACE(gc.name);
    const kernels::GateParams p = params_of(gc);
    const int64_t T = p.tokens, H = p.hidden, E = p.experts, K = p.topk;
    Rng rng(Rng::mix(7, static_cast<std::uint64_t>(E), static_cast<std::uint64_t>(T)));
    const Vec x = grid_values(rng, T * H, 16, 16.0f);
    const Vec wg = grid_values(rng, E * H, gc.hidden >= 64 ? 115 : 200, 256.0f);
    const Vec bias = gc.bias ? grid_values(rng, E, 50, 1024.0f) : Vec();
    Vec scores(static_cast<std::size_t>(T * E)), weights(static_cast<std::size_t>(T * K));
    std::vector<std::int32_t> ids(static_cast<std::size_t>(T * K));
    kernels::gate_forward(p, x.data(), wg.data(), gc.bias ? bias.data() : nullptr, scores.data(), ids.data(),
                          weights.data());

    auto dx = to_device(x, stream());
    auto dwg = to_device(wg, stream());
    DeviceBuffer<float> dbias = gc.bias ? to_device(bias, stream()) : DeviceBuffer<float>();
    DeviceBuffer<float> dscores(scores.size(), stream()), dweights(weights.size(), stream());
    DeviceBuffer<std::int32_t> dids(ids.size(), stream());
    gate_forward(blas(), p, dx.data(), dwg.data(), dbias.data(), dscores.data(), dids.data(), dweights.data(),
                 stream());
    const Vec gscores = download(dscores, stream());
    const Vec gweights = download(dweights, stream());
    const auto gids = download(dids, stream());

    EXPECT_TRUE(within(gscores, scores, kFp32Tol, "scores"));
    int64_t ties = 0, mismatched = 0;
    Vec got_w, want_w;
    for (int64_t t = 0; t < T; ++t) {
      if (near_tie(p, scores.data() + t * E, gc.bias ? bias.data() : nullptr, 2e-6)) {
        ++ties;
        continue;
      }
      for (int64_t j = 0; j < K; ++j) {
        const std::size_t i = static_cast<std::size_t>(t * K + j);
        if (gids[i] != ids[i] && ++mismatched <= 5)
          ADD_FAILURE() << "token " << t << " pick " << j << ": expert " << gids[i] << ", CPU picked " << ids[i];
        got_w.push_back(gweights[i]);
        want_w.push_back(weights[i]);
      }
    }
    EXPECT_EQ(mismatched, 0);
    EXPECT_LE(ties * 10, T) << "too many near-ties to judge the routing (" << ties << " of " << T << " tokens)";
    EXPECT_TRUE(within(got_w, want_w, kFp32Tol, "topk_weights"));
  }
}

TEST_F(CudaTest, GateBackwardMatchesCpu) {
  for (const GateCase& gc : kGateCases) {
    for (bool extra : {false, true}) {
      SCOPED_TRACE(std::string(gc.name) + (extra ? " with d_scores_extra" : ""));
      const kernels::GateParams p = params_of(gc);
      const int64_t T = p.tokens, H = p.hidden, E = p.experts, K = p.topk;
      Rng rng(Rng::mix(8, static_cast<std::uint64_t>(E), static_cast<std::uint64_t>(T), extra ? 1 : 0));
      const Vec x = normal(rng, T * H, 1.0), wg = normal(rng, E * H, 0.2);
      const Vec bias = gc.bias ? normal(rng, E, 0.05) : Vec();
      Vec scores(static_cast<std::size_t>(T * E)), weights(static_cast<std::size_t>(T * K));
      std::vector<std::int32_t> ids(static_cast<std::size_t>(T * K));
      kernels::gate_forward(p, x.data(), wg.data(), gc.bias ? bias.data() : nullptr, scores.data(), ids.data(),
                            weights.data());
      const Vec dw = normal(rng, T * K, 1.0);
      const Vec dextra = extra ? normal(rng, T * E, 0.3) : Vec();
      Vec dx = normal(rng, T * H, 1.0), dwg = normal(rng, E * H, 1.0), dlogits(static_cast<std::size_t>(T * E));

      auto d_x = to_device(x, stream());
      auto d_wg = to_device(wg, stream());
      auto d_scores = to_device(scores, stream());
      auto d_ids = to_device(ids, stream());
      auto d_dw = to_device(dw, stream());
      auto d_extra = extra ? to_device(dextra, stream()) : DeviceBuffer<float>();
      auto d_dx = to_device(dx, stream());
      auto d_dwg = to_device(dwg, stream());
      DeviceBuffer<float> d_dlogits(dlogits.size(), stream());
      gate_backward(blas(), p, d_x.data(), d_wg.data(), d_scores.data(), d_ids.data(), d_dw.data(), d_dx.data(),
                    d_dwg.data(), d_dlogits.data(), d_extra.data(), stream());
      kernels::gate_backward(p, x.data(), wg.data(), scores.data(), ids.data(), dw.data(), dx.data(), dwg.data(),
                             dlogits.data(), extra ? dextra.data() : nullptr);
      EXPECT_TRUE(within(download(d_dlogits, stream()), dlogits, kFp32Tol, "dlogits"));
      EXPECT_TRUE(within(download(d_dx, stream()), dx, kFp32Tol, "dx"));
      EXPECT_TRUE(within(download(d_dwg, stream()), dwg, kFp32Tol, "dwg"));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Auxiliary balance losses

TEST(CudaHost, BalanceLossRejectsBadParamsBeforeTouchingTheDevice) {
  kernels::BalanceLossParams p;
  p.tokens = 4;
  p.experts = 8;
  p.topk = 9;
  EXPECT_THROW(balance_loss_scratch_bytes(p), InvalidArgument);
  EXPECT_THROW(balance_loss_forward(p, nullptr, nullptr, nullptr, nullptr, nullptr), InvalidArgument);
  p.topk = 2;
  p.seq_len = -1;
  EXPECT_THROW(balance_loss_backward(p, nullptr, nullptr, 1.0f, nullptr, nullptr), InvalidArgument);
  p.seq_len = 3;
  // T = 4, E = 8, two sequences of one token block each, one block over all tokens:
  // 8 * (4 + 16 + 2 * 17 + 2 * 8 * (2 + 1)) bytes.
  EXPECT_EQ(balance_loss_scratch_bytes(p), std::size_t{8 * (4 + 16 + 2 * 17 + 2 * 8 * 3)});
  p.tokens = 0;
  EXPECT_EQ(balance_loss_scratch_bytes(p), std::size_t{0});
}

// Both losses and their score gradient against the CPU (the same sums in double, so the values agree
// to double rounding and the gradients to 1e-6 relative), over one sequence, several (the last one
// short), one token per sequence, sums over several token blocks, and no tokens.
TEST_F(CudaTest, BalanceLossMatchesCpu) {
  struct Case {
    int64_t tokens, experts, topk, seq_len;
  };
  // (600 tokens: several 256-token blocks per sum, the last one short.)
  for (const Case c : {Case{37, 16, 4, 0}, Case{64, 64, 6, 10}, Case{9, 8, 2, 1}, Case{50, 5, 5, 50},
                       Case{0, 8, 2, 0}, Case{600, 16, 4, 0}, Case{600, 8, 2, 300}}) {
    SCOPED_TRACE("tokens " + std::to_string(c.tokens) + " experts " + std::to_string(c.experts) + " topk " +
                 std::to_string(c.topk) + " seq_len " + std::to_string(c.seq_len));
    kernels::BalanceLossParams p;
    p.tokens = c.tokens;
    p.experts = c.experts;
    p.topk = c.topk;
    p.seq_len = c.seq_len;
    p.seq_alpha = 0.37f;
    p.expert_alpha = 0.011f;
    const int64_t T = c.tokens, E = c.experts, K = c.topk;
    Rng rng(Rng::mix(21, static_cast<std::uint64_t>(T), static_cast<std::uint64_t>(E), static_cast<std::uint64_t>(K)));
    Vec scores = uniform(rng, T * E, 1.0);
    for (float& v : scores) v = 0.5f * (v + 1.0f);  // sigmoid-like scores in [0, 1)
    std::vector<std::int32_t> ids(static_cast<std::size_t>(T * K));
    for (int64_t t = 0; t < T; ++t) {  // K distinct experts per token
      std::vector<std::int32_t> all(static_cast<std::size_t>(E));
      std::iota(all.begin(), all.end(), 0);
      for (int64_t j = 0; j < K; ++j) {
        const auto pick = j + static_cast<int64_t>(rng.next() % static_cast<std::uint64_t>(E - j));
        std::swap(all[static_cast<std::size_t>(j)], all[static_cast<std::size_t>(pick)]);
        ids[static_cast<std::size_t>(t * K + j)] = all[static_cast<std::size_t>(j)];
      }
    }
    const Vec d0 = normal(rng, T * E, 0.1);
    const kernels::BalanceLossValue want = kernels::balance_loss_forward(p, scores.data(), ids.data());
    Vec d_want = d0;
    kernels::balance_loss_backward(p, scores.data(), ids.data(), 1.7f, d_want.data());

    auto d_scores = to_device(scores, stream());
    auto d_ids = to_device(ids, stream());
    auto d_grad = to_device(d0, stream());
    DeviceBuffer<double> scratch(balance_loss_scratch_bytes(p) / sizeof(double) + 1, stream());
    DeviceBuffer<double> value(2, stream());
    balance_loss_forward(p, d_scores.data(), d_ids.data(), scratch.data(), value.data(), stream());
    balance_loss_backward(p, d_scores.data(), scratch.data(), 1.7f, d_grad.data(), stream());
    const std::vector<double> got = to_host(value, stream());
    EXPECT_NEAR(got[0], want.seq, 1e-12 * std::max(1.0, std::abs(want.seq)));
    EXPECT_NEAR(got[1], want.expert, 1e-12 * std::max(1.0, std::abs(want.expert)));
    if (T > 0) {
      EXPECT_GT(want.seq, 0.0);
      EXPECT_GT(want.expert, 0.0);
    }
    EXPECT_TRUE(within(download(d_grad, stream()), d_want, 1e-6, "d_scores"));
  }
}

// ---------------------------------------------------------------------------------------------------
// Permute and combine

struct RowCase {
  int64_t width, src_stride, dst_stride;  // width 128 with strides % 8 == 0: 16-byte path; 37: scalar path
};
const RowCase kRowCases[] = {{128, 136, 128}, {37, 41, 40}, {2048, 2048, 2048}};

std::vector<int64_t> random_index(Rng& rng, int64_t count, int64_t range) {
  std::vector<int64_t> v(static_cast<std::size_t>(count));
  for (auto& i : v) i = static_cast<int64_t>(rng.next() % static_cast<std::uint64_t>(range));
  return v;
}

TEST_F(CudaTest, GatherRowsMatchesCpuExactly) {
  for (const RowCase& rc : kRowCases) {
    SCOPED_TRACE("width " + std::to_string(rc.width));
    Rng rng(21);
    const int64_t rows = 100, count = 300;
    Vec src = normal(rng, rows * rc.src_stride, 1.0);
    round_to_bf16(src);
    const auto index = random_index(rng, count, rows);
    const Vec scale = normal(rng, count, 1.0);
    const Vec init = normal(rng, count * rc.dst_stride, 1.0);  // the padding must stay untouched
    Vec want = init;
    kernels::gather_rows(count, rc.width, index.data(), src.data(), rc.src_stride, want.data(), rc.dst_stride);
    Vec want_scaled = init, want_scaled_bf16 = from_bf16(to_bf16(init));
    for (int64_t n = 0; n < count; ++n)
      for (int64_t j = 0; j < rc.width; ++j) {
        const float v = scale[static_cast<std::size_t>(n)] * src[static_cast<std::size_t>(index[static_cast<std::size_t>(n)] * rc.src_stride + j)];
        want_scaled[static_cast<std::size_t>(n * rc.dst_stride + j)] = v;
        want_scaled_bf16[static_cast<std::size_t>(n * rc.dst_stride + j)] = bf16_round(v);
      }
    auto d_index = to_device(index, stream());
    auto d_scale = to_device(scale, stream());
    {  // fp32
      auto d_src = to_device(src, stream());
      auto d_dst = to_device(init, stream());
      gather_rows(count, rc.width, d_index.data(), d_src.data(), rc.src_stride, d_dst.data(), rc.dst_stride, stream());
      EXPECT_EQ(download(d_dst, stream()), want);
      auto d_dst2 = to_device(init, stream());
      gather_rows_scaled(count, rc.width, d_index.data(), d_scale.data(), d_src.data(), rc.src_stride, d_dst2.data(),
                         rc.dst_stride, stream());
      EXPECT_EQ(download(d_dst2, stream()), want_scaled);
    }
    {  // bf16 (src values are bf16-exact, so the gather is exact too)
      auto d_src = to_device(to_bf16(src), stream());
      auto d_dst = to_device(to_bf16(init), stream());
      gather_rows(count, rc.width, d_index.data(), d_src.data(), rc.src_stride, d_dst.data(), rc.dst_stride, stream());
      EXPECT_EQ(download_f32(d_dst, stream()), from_bf16(to_bf16(want)));
      auto d_dst2 = to_device(to_bf16(init), stream());
      gather_rows_scaled(count, rc.width, d_index.data(), d_scale.data(), d_src.data(), rc.src_stride, d_dst2.data(),
                         rc.dst_stride, stream());
      EXPECT_EQ(download_f32(d_dst2, stream()), want_scaled_bf16);
    }
  }
}

TEST_F(CudaTest, RouteByExpertIsAStableCountingSort) {
  // More picks than one tile of the placing kernel, experts without picks, and no picks at all.
  for (const int64_t tokens : {0, 3, 2500}) {
    SCOPED_TRACE("tokens " + std::to_string(tokens));
    const int64_t K = 4, E = 37, N = tokens * K;
    Rng rng(5 + static_cast<std::uint64_t>(tokens));
    std::vector<std::int32_t> ids(static_cast<std::size_t>(N));
    for (auto& id : ids) id = static_cast<std::int32_t>(rng.next() % 30);  // experts 30..36 get none
    const Vec weights = normal(rng, N, 1.0);
    // The reference: picks in pick order within each expert, experts in id order.
    std::vector<int64_t> want_counts(static_cast<std::size_t>(E), 0), want_token, want_pick_entry(ids.size());
    Vec want_weight;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = 0; i < N; ++i)
        if (ids[static_cast<std::size_t>(i)] == e) {
          ++want_counts[static_cast<std::size_t>(e)];
          want_pick_entry[static_cast<std::size_t>(i)] = static_cast<int64_t>(want_token.size());
          want_token.push_back(i / K);
          want_weight.push_back(weights[static_cast<std::size_t>(i)]);
        }
    auto d_ids = to_device(ids, stream());
    auto d_w = to_device(weights, stream());
    DeviceBuffer<int64_t> counts(static_cast<std::size_t>(E), stream()), token(std::max<int64_t>(N, 1), stream()),
        pick_entry(std::max<int64_t>(N, 1), stream());
    DeviceBuffer<float> weight(std::max<int64_t>(N, 1), stream());
    route_by_expert(d_ids.data(), d_w.data(), N, K, E, counts.data(), token.data(), weight.data(), pick_entry.data(),
                    stream());
    EXPECT_EQ(to_host(counts, stream()), want_counts);
    if (N == 0) continue;
    EXPECT_EQ(to_host(token, stream()), want_token);
    EXPECT_EQ(to_host(weight, stream()), want_weight);
    EXPECT_EQ(to_host(pick_entry, stream()), want_pick_entry);
  }
  EXPECT_THROW(route_by_expert(nullptr, nullptr, 7, 2, 4, nullptr, nullptr, nullptr, nullptr, stream()),
               InvalidArgument);  // 7 picks are not tokens * 2
  EXPECT_THROW(route_by_expert(nullptr, nullptr, 0, 1, 0, nullptr, nullptr, nullptr, nullptr, stream()),
               InvalidArgument);  // no experts
}

TEST_F(CudaTest, CombineRowsMatchesCpuScatterAddAndIsDeterministic) {
  for (const RowCase& rc : kRowCases) {
    for (bool weighted : {true, false}) {
      for (bool accumulate : {true, false}) {
        SCOPED_TRACE("width " + std::to_string(rc.width) + (weighted ? " weighted" : " unweighted") +
                     (accumulate ? " accumulate" : " overwrite"));
        Rng rng(31);
        const int64_t tokens = 97, count = 6 * 90;  // some tokens receive nothing
        Vec src = normal(rng, count * rc.src_stride, 1.0);
        round_to_bf16(src);
        const auto index = random_index(rng, count, tokens);
        const Vec scale = normal(rng, count, 1.0);
        Vec init = normal(rng, tokens * rc.dst_stride, 1.0);
        round_to_bf16(init);
        // CPU reference: the dst rows start as init (accumulate) or zero (overwrite); padding is kept.
        Vec want = init;
        if (!accumulate)
          for (int64_t t = 0; t < tokens; ++t)
            std::fill_n(want.begin() + t * rc.dst_stride, rc.width, 0.0f);
        kernels::scatter_add_rows(count, rc.width, index.data(), weighted ? scale.data() : nullptr, src.data(),
                                  rc.src_stride, want.data(), rc.dst_stride);
        const CombinePlan plan = build_combine_plan(count, tokens, index.data(), weighted ? scale.data() : nullptr);
        auto d_off = to_device(plan.offsets, stream());
        auto d_rows = to_device(plan.src_row, stream());
        auto d_w = weighted ? to_device(plan.weight, stream()) : DeviceBuffer<float>();
        {
          auto d_src = to_device(src, stream());
          auto d_dst = to_device(init, stream());
          combine_rows(tokens, rc.width, d_off.data(), d_rows.data(), d_w.data(), d_src.data(), rc.src_stride,
                       d_dst.data(), rc.dst_stride, accumulate, stream());
          const Vec got = download(d_dst, stream());
          EXPECT_TRUE(within(got, want, kFp32Tol, "combine fp32"));
          auto d_dst2 = to_device(init, stream());
          combine_rows(tokens, rc.width, d_off.data(), d_rows.data(), d_w.data(), d_src.data(), rc.src_stride,
                       d_dst2.data(), rc.dst_stride, accumulate, stream());
          EXPECT_EQ(download(d_dst2, stream()), got) << "two runs differ: the combine must be deterministic";
        }
        {
          auto d_src = to_device(to_bf16(src), stream());
          auto d_dst = to_device(to_bf16(init), stream());
          combine_rows(tokens, rc.width, d_off.data(), d_rows.data(), d_w.data(), d_src.data(), rc.src_stride,
                       d_dst.data(), rc.dst_stride, accumulate, stream());
          EXPECT_TRUE(within(download_f32(d_dst, stream()), want, kBf16Tol, "combine bf16"));
        }
      }
    }
  }
}

TEST_F(CudaTest, RowDotMatchesFloat64) {
  for (const RowCase& rc : kRowCases) {
    for (bool indexed : {true, false}) {
      SCOPED_TRACE("width " + std::to_string(rc.width) + (indexed ? " indexed" : " identity"));
      Rng rng(41);
      const int64_t rows = 100, count = indexed ? 300 : rows;
      Vec a = normal(rng, rows * rc.src_stride, 1.0), b = normal(rng, count * rc.dst_stride, 1.0);
      round_to_bf16(a);
      round_to_bf16(b);
      const auto index = random_index(rng, count, rows);
      Vec want(static_cast<std::size_t>(count));
      for (int64_t n = 0; n < count; ++n) {
        const int64_t ra = indexed ? index[static_cast<std::size_t>(n)] : n;
        double s = 0.0;
        for (int64_t j = 0; j < rc.width; ++j)
          s += static_cast<double>(a[static_cast<std::size_t>(ra * rc.src_stride + j)]) *
               b[static_cast<std::size_t>(n * rc.dst_stride + j)];
        want[static_cast<std::size_t>(n)] = static_cast<float>(s);
      }
      auto d_index = to_device(index, stream());
      const int64_t* ip = indexed ? d_index.data() : nullptr;
      DeviceBuffer<float> out(static_cast<std::size_t>(count), stream());
      auto da = to_device(a, stream());
      auto db = to_device(b, stream());
      row_dot(count, rc.width, ip, da.data(), rc.src_stride, db.data(), rc.dst_stride, out.data(), stream());
      EXPECT_TRUE(within(download(out, stream()), want, kFp32Tol, "row_dot fp32"));
      auto ha = to_device(to_bf16(a), stream());
      auto hb = to_device(to_bf16(b), stream());
      row_dot(count, rc.width, ip, ha.data(), rc.src_stride, hb.data(), rc.dst_stride, out.data(), stream());
      EXPECT_TRUE(within(download(out, stream()), want, kFp32Tol, "row_dot bf16 (exact inputs, fp32 sums)"));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// SwiGLU

TEST_F(CudaTest, SwigluForwardAndBackwardMatchCpu) {
  for (int64_t F : {48, 36, 13}) {  // 48: 16-byte packs for both types; 36: fp32 only; 13: scalar
    SCOPED_TRACE("ffn " + std::to_string(F));
    Rng rng(51);
    const int64_t rows = 50;
    Vec h13 = normal(rng, rows * 2 * F, 3.0), da = normal(rng, rows * F, 1.0);
    round_to_bf16(h13);
    round_to_bf16(da);
    Vec sig(static_cast<std::size_t>(rows * F)), a(sig.size()), dh13(h13.size());
    for (int64_t r = 0; r < rows; ++r) {
      const float* g = h13.data() + r * 2 * F;
      kernels::swiglu_forward_row(g, g + F, sig.data() + r * F, a.data() + r * F, F);
      for (int64_t j = 0; j < F; ++j) {
        float dg, du;
        math::swiglu_backward_saved(g[j], g[F + j], sig[static_cast<std::size_t>(r * F + j)],
                                    da[static_cast<std::size_t>(r * F + j)], &dg, &du);
        dh13[static_cast<std::size_t>(r * 2 * F + j)] = dg;
        dh13[static_cast<std::size_t>(r * 2 * F + F + j)] = du;
      }
    }
    // da laid out in the up half of dh13 (stride 2F), as GroupedFfn runs it in place.
    Vec da_in_place(h13.size(), 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(da.begin() + r * F, F, da_in_place.begin() + r * 2 * F + F);
    {
      auto d_h13 = to_device(h13, stream());
      DeviceBuffer<float> d_sig(sig.size(), stream()), d_a(a.size(), stream()), d_dh13(dh13.size(), stream());
      swiglu_forward(rows, F, d_h13.data(), d_sig.data(), d_a.data(), stream());
      EXPECT_TRUE(within(download(d_sig, stream()), sig, kFp32Tol, "sig fp32"));
      EXPECT_TRUE(within(download(d_a, stream()), a, kFp32Tol, "a fp32"));
      auto d_da = to_device(da, stream());
      swiglu_backward(rows, F, d_h13.data(), d_sig.data(), d_da.data(), F, d_dh13.data(), stream());
      EXPECT_TRUE(within(download(d_dh13, stream()), dh13, kFp32Tol, "dh13 fp32"));
      auto d_inplace = to_device(da_in_place, stream());
      swiglu_backward(rows, F, d_h13.data(), d_sig.data(), d_inplace.data() + F, 2 * F, d_inplace.data(), stream());
      EXPECT_TRUE(within(download(d_inplace, stream()), dh13, kFp32Tol, "dh13 fp32 in place"));
    }
    {
      auto d_h13 = to_device(to_bf16(h13), stream());
      DeviceBuffer<bf16> d_sig(sig.size(), stream()), d_a(a.size(), stream()), d_dh13(dh13.size(), stream());
      swiglu_forward(rows, F, d_h13.data(), d_sig.data(), d_a.data(), stream());
      EXPECT_TRUE(within(download_f32(d_sig, stream()), sig, kBf16Tol, "sig bf16"));
      EXPECT_TRUE(within(download_f32(d_a, stream()), a, kBf16Tol, "a bf16"));
      auto d_inplace = to_device(to_bf16(da_in_place), stream());
      swiglu_backward(rows, F, d_h13.data(), d_sig.data(), d_inplace.data() + F, 2 * F, d_inplace.data(), stream());
      EXPECT_TRUE(within(download_f32(d_inplace, stream()), dh13, kBf16Tol, "dh13 bf16 in place"));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Fixed-order GEMM

/// A host vector on the device in element type T (float or bf16), and back.
template <typename T>
DeviceBuffer<T> upload(const Vec& v, cudaStream_t s) {
  if constexpr (std::is_same_v<T, float>)
    return to_device(v, s);
  else
    return to_device(to_bf16(v), s);
}
template <typename T>
Vec fetch(const DeviceBuffer<T>& d, cudaStream_t s) {
  if constexpr (std::is_same_v<T, float>)
    return to_host(d, s);
  else
    return from_bf16(to_host(d, s));
}


/// One op(A) op(B) problem on the host: A stored [m, k] or (trans_a) [kstore, m], B stored [k, n] or
/// (trans_b) [n, k]; `k_rows` (empty: 0..k-1) picks the stored rows of the k-major operands.
struct FixedCase {
  bool ta, tb;
  int64_t m, n, k, kstore;
  std::vector<int64_t> k_rows;
  float alpha, beta;
};

/// C from fixed_order_gemm in element type T for `fc` on inputs a, b, c0 (stored layouts above).
template <typename T>
Vec run_fixed(const FixedCase& fc, const Vec& a, const Vec& b, const Vec& c0, int64_t row0, int64_t rows,
              cudaStream_t s) {
  const DType dt = std::is_same_v<T, float> ? DType::kFp32 : DType::kBf16;
  const int64_t lda = fc.ta ? fc.m : fc.k, ldb = fc.tb ? fc.k : fc.n;
  DeviceBuffer<T> da = upload<T>(a, s), db = upload<T>(b, s), dc = upload<T>(c0, s);
  DeviceBuffer<int64_t> dk;
  if (!fc.k_rows.empty()) dk = to_device(fc.k_rows, s);
  // Rows [row0, row0 + rows) of C only: A's rows (or columns when trans_a) offset by row0.
  const std::size_t es = sizeof(T);
  const void* a0 = elem_at(da.data(), fc.ta ? row0 : row0 * lda, es);
  GemmProblem p = gemm_problem(fc.ta, fc.tb, rows, fc.n, fc.k, a0, lda, db.data(), ldb,
                               elem_at(dc.data(), row0 * fc.n, es), fc.n, fc.beta);
  p.alpha = fc.alpha;
  fixed_order_gemm(dt, p, fc.k_rows.empty() ? nullptr : dk.data(), s);
  return fetch(dc, s);
}

/// The host reference: per element alpha * (fmaf chain over l in order) + beta * c, and in double.
void fixed_reference(const FixedCase& fc, const Vec& a, const Vec& b, const Vec& c0, Vec& chain, Vec& exact) {
  const int64_t lda = fc.ta ? fc.m : fc.k, ldb = fc.tb ? fc.k : fc.n;
  chain.assign(static_cast<std::size_t>(fc.m * fc.n), 0.0f);
  exact = chain;
  for (int64_t i = 0; i < fc.m; ++i)
    for (int64_t j = 0; j < fc.n; ++j) {
      float acc = 0.0f;
      double d = 0.0;
      for (int64_t l = 0; l < fc.k; ++l) {
        const int64_t kr = fc.k_rows.empty() ? l : fc.k_rows[static_cast<std::size_t>(l)];
        const float av = fc.ta ? a[static_cast<std::size_t>(kr * lda + i)] : a[static_cast<std::size_t>(i * lda + l)];
        const float bv = fc.tb ? b[static_cast<std::size_t>(j * ldb + l)] : b[static_cast<std::size_t>(kr * ldb + j)];
        acc = std::fma(av, bv, acc);
        d += static_cast<double>(av) * bv;
      }
      const auto o = static_cast<std::size_t>(i * fc.n + j);
      chain[o] = fc.alpha * acc;
      exact[o] = static_cast<float>(fc.alpha * d + fc.beta * static_cast<double>(c0[o]));
    }
}

TEST_F(CudaTest, FixedOrderGemmIsOneFmaChainPerElementWhateverTheRows) {
  Rng rng(808);
  // Sizes off the 64 x 64 tile and the 16-step k; all four transposes; gathered k rows (a weight
  // gradient over rows picked in a chosen order: repeats and gaps allowed).
  std::vector<FixedCase> cases = {{false, false, 70, 45, 37, 37, {}, 1.0f, 0.0f},
                                  {false, true, 130, 67, 16, 16, {}, 1.0f, 0.0f},
                                  {true, false, 65, 80, 33, 33, {}, 1.0f, 0.0f},
                                  {true, true, 3, 129, 50, 50, {}, 1.0f, 0.0f},
                                  {true, false, 40, 72, 21, 30, {}, 1.0f, 0.0f},
                                  {false, false, 17, 20, 9, 12, {}, 0.5f, 1.0f}};
  for (int64_t l = 0; l < 21; ++l) cases[4].k_rows.push_back((29 - l * 7 % 30 + 30) % 30);
  for (int64_t l = 0; l < 9; ++l) cases[5].k_rows.push_back(11 - l);
  for (std::size_t ci = 0; ci < cases.size(); ++ci) {
    const FixedCase& fc = cases[ci];
    SCOPED_TRACE("case " + std::to_string(ci));
    const int64_t a_rows = fc.ta ? fc.kstore : fc.m, a_cols = fc.ta ? fc.m : fc.k;
    const int64_t b_rows = fc.tb ? fc.n : fc.kstore, b_cols = fc.tb ? fc.k : fc.n;
    Vec a = uniform(rng, a_rows * a_cols, 1.0), b = uniform(rng, b_rows * b_cols, 1.0),
        c0 = uniform(rng, fc.m * fc.n, 1.0);
    for (Vec* v : {&a, &b, &c0}) round_to_bf16(*v);
    Vec chain, exact;
    fixed_reference(fc, a, b, c0, chain, exact);
    const Vec whole = run_fixed<float>(fc, a, b, c0, 0, fc.m, stream());
    EXPECT_TRUE(within(whole, exact, kFp32Tol, "fp32 vs float64"));
    if (fc.beta == 0.0f) {  // the exact fmaf chain of the CPU (std::fma)
      EXPECT_EQ(std::memcmp(whole.data(), chain.data(), whole.size() * sizeof(float)), 0)
          << "fp32 C differs from the host's fmaf chain in k order";
    }
    // The rows split over two calls: the same bits (a row depends only on itself).
    const int64_t cut = fc.m / 2 + 1;
    Vec split = run_fixed<float>(fc, a, b, c0, 0, cut, stream());
    const Vec rest = run_fixed<float>(fc, a, b, c0, cut, fc.m - cut, stream());
    std::copy(rest.begin() + cut * fc.n, rest.end(), split.begin() + cut * fc.n);
    EXPECT_EQ(std::memcmp(whole.data(), split.data(), whole.size() * sizeof(float)), 0)
        << "rows computed in two calls differ from one call";
    EXPECT_TRUE(within(run_fixed<bf16>(fc, a, b, c0, 0, fc.m, stream()), exact, kBf16Tol, "bf16 vs float64"));
  }
}

// ---------------------------------------------------------------------------------------------------
// Grouped expert FFN

/// Inputs (bf16-exact) and the CPU reference of one grouped FFN problem.
struct FfnProblem {
  GroupedFfnShape shape;
  std::vector<int64_t> rows;
  int64_t total = 0;
  Vec x, w13, w2, dy, dw13_init, dw2_init;
  // CPU results, per accumulate mode for the weight gradients.
  Vec h13, sig, a, y, dx, dw13_acc, dw2_acc, dw13_new, dw2_new;
};

FfnProblem make_ffn_problem(const GroupedFfnShape& shape, std::vector<int64_t> rows, std::uint64_t seed,
                            bool with_accumulate) {
  FfnProblem P;
  P.shape = shape;
  P.rows = std::move(rows);
  P.total = std::accumulate(P.rows.begin(), P.rows.end(), int64_t{0});
  const int64_t E = shape.experts, H = shape.hidden, F = shape.ffn, N = P.total;
  Rng rng(seed);
  const double ws = 1.0 / std::sqrt(static_cast<double>(H));
  P.x = uniform(rng, N * H, 1.0);
  P.w13 = uniform(rng, E * 2 * F * H, 2.0 * ws);
  P.w2 = uniform(rng, E * H * F, 2.0 / std::sqrt(static_cast<double>(F)));
  P.dy = uniform(rng, N * H, 1.0);
  for (Vec* v : {&P.x, &P.w13, &P.w2, &P.dy}) round_to_bf16(*v);
  if (with_accumulate) {
    P.dw13_init = uniform(rng, E * 2 * F * H, 1.0);
    P.dw2_init = uniform(rng, E * H * F, 1.0);
    round_to_bf16(P.dw13_init);
    round_to_bf16(P.dw2_init);
  }
  P.h13.assign(static_cast<std::size_t>(N * 2 * F), 0.0f);
  P.sig.assign(static_cast<std::size_t>(N * F), 0.0f);
  P.a.assign(P.sig.size(), 0.0f);
  P.y.assign(static_cast<std::size_t>(N * H), 0.0f);
  P.dx.assign(P.y.size(), 0.0f);
  P.dw13_new.assign(P.w13.size(), 0.0f);
  P.dw2_new.assign(P.w2.size(), 0.0f);
  if (with_accumulate) {
    P.dw13_acc = P.dw13_init;
    P.dw2_acc = P.dw2_init;
  }
  Vec dh13(P.h13.size()), scratch_dx(P.dx.size());
  int64_t o = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r = P.rows[static_cast<std::size_t>(e)];
    const kernels::FfnShape s{r, H, F};
    const float* w13 = P.w13.data() + e * 2 * F * H;
    const float* w2 = P.w2.data() + e * H * F;
    kernels::swiglu_ffn_forward(s, P.x.data() + o * H, w13, w2, P.h13.data() + o * 2 * F, P.sig.data() + o * F,
                                P.a.data() + o * F, P.y.data() + o * H);
    kernels::swiglu_ffn_backward(s, P.x.data() + o * H, w13, w2, P.h13.data() + o * 2 * F, P.sig.data() + o * F,
                                 P.a.data() + o * F, P.dy.data() + o * H, P.dw13_new.data() + e * 2 * F * H,
                                 P.dw2_new.data() + e * H * F, P.dx.data() + o * H, dh13.data() + o * 2 * F, false);
    if (with_accumulate)
      kernels::swiglu_ffn_backward(s, P.x.data() + o * H, w13, w2, P.h13.data() + o * 2 * F, P.sig.data() + o * F,
                                   P.a.data() + o * F, P.dy.data() + o * H, P.dw13_acc.data() + e * 2 * F * H,
                                   P.dw2_acc.data() + e * H * F, scratch_dx.data() + o * H, dh13.data() + o * 2 * F,
                                   true);
    o += r;
  }
  return P;
}

/// Device copies of a problem's tensors in element type T (float or bf16).
template <typename T>
struct FfnDevice {
  DeviceBuffer<T> x, w13, w2, dy, h13, sig, a, y, dx, dh13, dw13, dw2;
};

/// A problem's inputs on the device, its outputs allocated; the weight gradients start as the
/// problem's initial values (`accumulate`) or as garbage (an overwrite must not read them, and a
/// 0-row expert's gradient must become 0).
template <typename T>
FfnDevice<T> ffn_device(const FfnProblem& P, bool accumulate, cudaStream_t s) {
  FfnDevice<T> d;
  d.x = upload<T>(P.x, s);
  d.w13 = upload<T>(P.w13, s);
  d.w2 = upload<T>(P.w2, s);
  d.dy = upload<T>(P.dy, s);
  d.h13 = DeviceBuffer<T>(P.h13.size(), s);
  d.sig = DeviceBuffer<T>(P.sig.size(), s);
  d.a = DeviceBuffer<T>(P.a.size(), s);
  d.y = DeviceBuffer<T>(P.y.size(), s);
  d.dx = DeviceBuffer<T>(P.dx.size(), s);
  d.dh13 = DeviceBuffer<T>(P.h13.size(), s);
  if (accumulate) {
    d.dw13 = upload<T>(P.dw13_init, s);
    d.dw2 = upload<T>(P.dw2_init, s);
  } else {
    d.dw13 = DeviceBuffer<T>(P.w13.size(), s);
    d.dw2 = DeviceBuffer<T>(P.w2.size(), s);
    MOEX_CUDA_CHECK(cudaMemsetAsync(d.dw13.data(), 0x7f, d.dw13.bytes(), s));
    MOEX_CUDA_CHECK(cudaMemsetAsync(d.dw2.data(), 0x7f, d.dw2.bytes(), s));
  }
  return d;
}


template <typename T>
void check_grouped_ffn(const FfnProblem& P, DType dtype, GroupedGemmImpl impl, bool accumulate, double tol,
                       cublasHandle_t blas, cudaStream_t s) {
  SCOPED_TRACE(std::string(to_string(dtype)) + " " + to_string(impl) + (accumulate ? " accumulate" : " overwrite"));
  FfnDevice<T> d = ffn_device<T>(P, accumulate, s);
  GroupedFfn ffn(P.shape, dtype, impl);
  ffn.forward(blas, P.rows, d.x.data(), d.w13.data(), d.w2.data(), d.h13.data(), d.sig.data(), d.a.data(), d.y.data(),
              s);
  ffn.backward(blas, P.rows, d.x.data(), d.w13.data(), d.w2.data(), d.h13.data(), d.sig.data(), d.a.data(),
               d.dy.data(), d.dw13.data(), d.dw2.data(), d.dx.data(), d.dh13.data(), accumulate, s);
  EXPECT_TRUE(within(fetch(d.h13, s), P.h13, tol, "h13"));
  EXPECT_TRUE(within(fetch(d.a, s), P.a, tol, "a"));
  EXPECT_TRUE(within(fetch(d.y, s), P.y, tol, "y"));
  EXPECT_TRUE(within(fetch(d.dx, s), P.dx, tol, "dx"));
  EXPECT_TRUE(within(fetch(d.dw13, s), accumulate ? P.dw13_acc : P.dw13_new, tol, "dw13"));
  EXPECT_TRUE(within(fetch(d.dw2, s), accumulate ? P.dw2_acc : P.dw2_new, tol, "dw2"));
}

void check_all_modes(const FfnProblem& P, bool with_accumulate, cublasHandle_t blas, cudaStream_t s) {
  for (GroupedGemmImpl impl :
       {GroupedGemmImpl::kGroupedBatched, GroupedGemmImpl::kLoop, GroupedGemmImpl::kFixedOrder}) {
    for (bool acc : {false, true}) {
      if (acc && !with_accumulate) continue;
      check_grouped_ffn<float>(P, DType::kFp32, impl, acc, kFp32Tol, blas, s);
      check_grouped_ffn<bf16>(P, DType::kBf16, impl, acc, kBf16Tol, blas, s);
    }
  }
}

/// backward_data, then backward_weights over each expert's rows in reverse order (k_rows), against
/// the CPU's backward: the split backward of the deterministic expert-parallel layer.
template <typename T>
void check_split_backward(const FfnProblem& P, DType dtype, bool accumulate, double tol, cublasHandle_t blas,
                          cudaStream_t s) {
  SCOPED_TRACE(std::string("split backward ") + to_string(dtype) + (accumulate ? " accumulate" : " overwrite"));
  FfnDevice<T> d = ffn_device<T>(P, accumulate, s);
  std::vector<int64_t> k_rows;
  int64_t o = 0;
  for (int64_t r : P.rows) {
    for (int64_t i = r - 1; i >= 0; --i) k_rows.push_back(o + i);
    o += r;
  }
  DeviceBuffer<int64_t> d_rows = to_device(k_rows, s);
  GroupedFfn ffn(P.shape, dtype, GroupedGemmImpl::kFixedOrder);
  ffn.forward(blas, P.rows, d.x.data(), d.w13.data(), d.w2.data(), d.h13.data(), d.sig.data(), d.a.data(), d.y.data(),
              s);
  ffn.backward_data(blas, P.rows, d.w13.data(), d.w2.data(), d.h13.data(), d.sig.data(), d.dy.data(), d.dx.data(),
                    d.dh13.data(), s);
  ffn.backward_weights(P.rows, d_rows.data(), d.x.data(), d.a.data(), d.dy.data(), d.dh13.data(), d.dw13.data(),
                       d.dw2.data(), accumulate, s);
  EXPECT_TRUE(within(fetch(d.dx, s), P.dx, tol, "dx"));
  EXPECT_TRUE(within(fetch(d.dw13, s), accumulate ? P.dw13_acc : P.dw13_new, tol, "dw13"));
  EXPECT_TRUE(within(fetch(d.dw2, s), accumulate ? P.dw2_acc : P.dw2_new, tol, "dw2"));
}

TEST_F(CudaTest, GroupedFfnSplitBackwardMatchesCpu) {
  const FfnProblem P = make_ffn_problem({4, 48, 40}, {7, 0, 20, 1}, 65, true);
  for (bool acc : {false, true}) {
    check_split_backward<float>(P, DType::kFp32, acc, kFp32Tol, blas(), stream());
    check_split_backward<bf16>(P, DType::kBf16, acc, kBf16Tol, blas(), stream());
  }
}

TEST_F(CudaTest, GroupedFfnSmallShapesWithEmptyExpertsMatchCpu) {
  // Zero-row experts, equal row counts (one cuBLAS group of several problems), a single row.
  check_all_modes(make_ffn_problem({6, 64, 48}, {3, 0, 17, 3, 1, 0}, 61, true), true, blas(), stream());
  // ffn 36: the bf16 SwiGLU takes its scalar path; hidden 40.
  check_all_modes(make_ffn_problem({3, 40, 36}, {5, 9, 0}, 62, true), true, blas(), stream());
  // Every expert empty: nothing but the overwritten weight gradients (zeros) is written.
  check_all_modes(make_ffn_problem({2, 32, 16}, {0, 0}, 63, true), true, blas(), stream());
}

/// Rows per expert of `tokens` tokens each routed to `topk` distinct experts drawn uniformly.
std::vector<int64_t> uniform_routing(int64_t tokens, int64_t experts, int64_t topk, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<int64_t> rows(static_cast<std::size_t>(experts), 0);
  std::vector<int64_t> perm(static_cast<std::size_t>(experts));
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(perm.begin(), perm.end(), int64_t{0});
    for (int64_t j = 0; j < topk; ++j) {  // partial Fisher-Yates
      const int64_t k = j + static_cast<int64_t>(rng.next() % static_cast<std::uint64_t>(experts - j));
      std::swap(perm[static_cast<std::size_t>(j)], perm[static_cast<std::size_t>(k)]);
      ++rows[static_cast<std::size_t>(perm[static_cast<std::size_t>(j)])];
    }
  }
  return rows;
}

TEST_F(CudaTest, GroupedFfnDeepSeekV2LiteShapeMatchesCpu) {
#ifdef MOEX_TEST_ON_CUDA_EMULATOR
  GTEST_SKIP() << "too large for the CUDA emulator (~3e11 FLOPs); it runs on a GPU";
#endif
  // hidden 2048, moe_intermediate_size 1408, 64 routed experts, top-6, 1024 tokens (6144 rows).
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  blas::set_num_threads(cores);  // the CPU reference is ~3e11 FLOPs
  set_parallel_threads(cores);
  const auto rows = uniform_routing(1024, 64, 6, 2024);
  const FfnProblem P = make_ffn_problem({64, 2048, 1408}, rows, 64, false);
  blas::set_num_threads(1);
  set_parallel_threads(1);
  check_all_modes(P, false, blas(), stream());
}

}  // namespace
}  // namespace moex::cuda
