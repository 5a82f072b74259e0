// moex-bench-gpu: benchmarks of the CUDA kernels on one GPU.
//   (a) grouped expert GEMMs of one MoE layer (default: DeepSeek-V2-Lite, hidden 2048, ffn 1408,
//       64 experts, top-6, 8192 tokens, rows per expert from a uniform random routing with a fixed
//       seed), for both GroupedGemmImpl, as TFLOP/s and as a ratio to ONE dense cuBLAS GEMM of the
//       same FLOPs (the same shape with every row in one matrix); plus the whole FFN forward /
//       backward against the same FFN run as one dense expert (also with kFixedOrder, the kernel of
//       the deterministic mode);
//   (b) permute (gather into expert order) and combine (weighted, deterministic CSR sum back into
//       token order) as bytes/s and as a ratio to cudaMemcpyAsync device-to-device of the same bytes;
//   (c) `layer`: one whole GpuMoELayer (softmax greedy gate, `--shared` shared experts, --dtype),
//       forward + backward (zero_grad, forward, backward) in ms, tokens/s and TFLOP/s, then one
//       profiled pass per iteration for the median time of every stage.
// `--case all|gemm|permute|layer` picks one (default all).
// Timing: CUDA events around each iteration, `--warmup` untimed iterations first, the median of
// `--iters`. Without a device it prints "SKIPPED: no CUDA device (...)" and exits 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "examples/tool.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_layer.h"
#include "runtime/cuda/grouped_gemm.h"
#include "runtime/cuda/kernels.h"
#include "runtime/random.h"

namespace {

using namespace moex::cuda;  // NOLINT: a tool of this library
using std::int64_t;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

/// An owned CUDA event pair timing one stretch of a stream.
class EventPair {
 public:
  EventPair() {
    MOEX_CUDA_CHECK(cudaEventCreate(&start_));
    MOEX_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
  ~EventPair() {
    static_cast<void>(cudaEventDestroy(start_));
    static_cast<void>(cudaEventDestroy(stop_));
  }
  /// Milliseconds `fn` (which queues work on `s`) takes on the device.
  double time(cudaStream_t s, const std::function<void()>& fn) {
    MOEX_CUDA_CHECK(cudaEventRecord(start_, s));
    fn();
    MOEX_CUDA_CHECK(cudaEventRecord(stop_, s));
    MOEX_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0.0f;
    MOEX_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

struct Timing {
  int warmup = 5;
  int iters = 20;
};

/// Median milliseconds of `fn` over t.iters timed runs after t.warmup untimed ones.
double time_ms(cudaStream_t s, const Timing& t, const std::function<void()>& fn) {
  for (int i = 0; i < t.warmup; ++i) fn();
  MOEX_CUDA_CHECK(cudaStreamSynchronize(s));
  EventPair ev;
  std::vector<double> ms;
  for (int i = 0; i < t.iters; ++i) ms.push_back(ev.time(s, fn));
  return median(ms);
}

/// Rows per expert of `tokens` tokens, each routed to `topk` distinct experts drawn uniformly, and
/// the token of every routed row in expert order (rows of expert 0 first, tokens ascending).
struct Routing {
  std::vector<int64_t> rows_per_expert;
  std::vector<int64_t> row_token;
};

Routing uniform_routing(int64_t tokens, int64_t experts, int64_t topk, std::uint64_t seed) {
  moex::Rng rng(seed);
  std::vector<std::vector<int64_t>> by_expert(static_cast<std::size_t>(experts));
  std::vector<int64_t> perm(static_cast<std::size_t>(experts));
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(perm.begin(), perm.end(), int64_t{0});
    for (int64_t j = 0; j < topk; ++j) {  // partial Fisher-Yates: topk distinct experts
      const int64_t k = j + static_cast<int64_t>(rng.next() % static_cast<std::uint64_t>(experts - j));
      std::swap(perm[static_cast<std::size_t>(j)], perm[static_cast<std::size_t>(k)]);
      by_expert[static_cast<std::size_t>(perm[static_cast<std::size_t>(j)])].push_back(t);
    }
  }
  Routing r;
  for (const auto& rows : by_expert) {
    r.rows_per_expert.push_back(static_cast<int64_t>(rows.size()));
    r.row_token.insert(r.row_token.end(), rows.begin(), rows.end());
  }
  return r;
}

/// Untyped device memory of `count` elements of `dtype`, filled with uniform values in [-scale, scale).
struct Tensor {
  DeviceBuffer<unsigned char> mem;
  void* data() { return mem.data(); }
};
Tensor random_tensor(DType dtype, int64_t count, std::uint64_t seed, float scale, cudaStream_t s) {
  Tensor t{DeviceBuffer<unsigned char>(static_cast<std::size_t>(count) * dtype_size(dtype), s)};
  if (dtype == DType::kFp32)
    fill_uniform(static_cast<float*>(t.data()), count, seed, scale, s);
  else
    fill_uniform(static_cast<bf16*>(t.data()), count, seed, scale, s);
  return t;
}


double gemm_flops(const std::vector<GemmProblem>& ps) {
  double f = 0.0;
  for (const auto& p : ps) f += 2.0 * static_cast<double>(p.m) * static_cast<double>(p.n) * static_cast<double>(p.k);
  return f;
}

/// The layer's tensors for the GEMM benchmarks.
struct FfnTensors {
  Tensor x, w13, w2, h13, sig, a, y, dy, dx, dh13, dw13, dw2;
};

/// The six GEMMs of the expert FFN (forward: w13, w2; backward: dA, dx, dw2, dw13), per expert, and
/// each one's dense twin: the same shape with all N rows in one matrix (same FLOPs).
struct GemmCase {
  const char* name;
  std::vector<GemmProblem> grouped;
  GemmProblem dense;
};

std::vector<GemmCase> gemm_cases(const std::vector<int64_t>& rows, int64_t H, int64_t F, DType dtype, FfnTensors& t) {
  const std::size_t es = dtype_size(dtype);
  const int64_t E = static_cast<int64_t>(rows.size());
  const int64_t N = std::accumulate(rows.begin(), rows.end(), int64_t{0});
  std::vector<GemmCase> cs = {{"w13_fwd", {}, {}}, {"w2_fwd", {}, {}}, {"dA_bwd", {}, {}},
                              {"dx_bwd", {}, {}},  {"dw2_bwd", {}, {}}, {"dw13_bwd", {}, {}}};
  // One lambda per GEMM: (rows r, row offset o, expert e) -> problem; the dense twin is (N, 0, 0).
  const std::function<GemmProblem(int64_t, int64_t, int64_t)> make[6] = {
      [&](int64_t r, int64_t o, int64_t e) {
        return gemm_problem(false, true, r, 2 * F, H, elem_at(t.x.data(), o * H, es), H,
                            elem_at(t.w13.data(), e * 2 * F * H, es), H, elem_at(t.h13.data(), o * 2 * F, es), 2 * F);
      },
      [&](int64_t r, int64_t o, int64_t e) {
        return gemm_problem(false, true, r, H, F, elem_at(t.a.data(), o * F, es), F,
                            elem_at(t.w2.data(), e * H * F, es), F, elem_at(t.y.data(), o * H, es), H);
      },
      [&](int64_t r, int64_t o, int64_t e) {
        return gemm_problem(false, false, r, F, H, elem_at(t.dy.data(), o * H, es), H,
                            elem_at(t.w2.data(), e * H * F, es), F, elem_at(t.dh13.data(), o * 2 * F + F, es), 2 * F);
      },
      [&](int64_t r, int64_t o, int64_t e) {
        return gemm_problem(false, false, r, H, 2 * F, elem_at(t.dh13.data(), o * 2 * F, es), 2 * F,
                            elem_at(t.w13.data(), e * 2 * F * H, es), H, elem_at(t.dx.data(), o * H, es), H);
      },
      [&](int64_t r, int64_t o, int64_t e) {
        return gemm_problem(true, false, H, F, r, elem_at(t.dy.data(), o * H, es), H, elem_at(t.a.data(), o * F, es), F,
                            elem_at(t.dw2.data(), e * H * F, es), F);
      },
      [&](int64_t r, int64_t o, int64_t e) {
        return gemm_problem(true, false, 2 * F, H, r, elem_at(t.dh13.data(), o * 2 * F, es), 2 * F,
                            elem_at(t.x.data(), o * H, es), H, elem_at(t.dw13.data(), e * 2 * F * H, es), H);
      }};
  for (std::size_t c = 0; c < cs.size(); ++c) {
    int64_t o = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r = rows[static_cast<std::size_t>(e)];
      if (r > 0) cs[c].grouped.push_back(make[c](r, o, e));
      o += r;
    }
    cs[c].dense = make[c](N, 0, 0);
  }
  return cs;
}

void print_json(bool on, const nlohmann::json& j) {
  if (on) std::printf("%s\n", j.dump().c_str());
}

/// (c) One GpuMoELayer of the shape in `cfg` on `tokens` tokens: the median of zero_grad + forward +
/// backward, of forward alone, and of every stage (from profiled passes, timed apart).
void bench_layer(const moex::MoeConfig& cfg, int64_t T, DType dtype, const Timing& timing, std::uint64_t seed,
                 cudaStream_t s, bool json, const nlohmann::json& shape) {
  const int64_t H = cfg.hidden_size, F = cfg.moe_intermediate_size, E = cfg.n_routed_experts,
                K = cfg.num_experts_per_tok, Fs = cfg.shared_intermediate_size();
  GpuLayerOptions opt;
  opt.precision = dtype == DType::kBf16 ? LayerPrecision::kBf16 : LayerPrecision::kFp32;
  GpuMoELayer layer(cfg, opt);
  // Parameters of standard deviation 1/sqrt(fan_in) (uniform: scale sqrt(3)/sqrt(fan_in)); x and dy
  // of standard deviation 1, as examples/torch_moe_bench.py draws them.
  const auto inv_sqrt = [](int64_t n) { return static_cast<float>(std::sqrt(3.0 / static_cast<double>(n))); };
  fill_uniform(layer.gate_weight(), E * H, seed + 30, inv_sqrt(H), s);
  for (int64_t e = 0; e < E; ++e) {
    const std::size_t es = dtype_size(dtype);
    void* w13 = elem_at(layer.expert_params(), e * 3 * F * H, es);
    void* w2 = elem_at(w13, 2 * F * H, es);
    if (dtype == DType::kBf16) {
      fill_uniform(static_cast<bf16*>(w13), 2 * F * H, seed + 31 + static_cast<std::uint64_t>(e), inv_sqrt(H), s);
      fill_uniform(static_cast<bf16*>(w2), H * F, seed + 1031 + static_cast<std::uint64_t>(e), inv_sqrt(F), s);
    } else {
      fill_uniform(static_cast<float*>(w13), 2 * F * H, seed + 31 + static_cast<std::uint64_t>(e), inv_sqrt(H), s);
      fill_uniform(static_cast<float*>(w2), H * F, seed + 1031 + static_cast<std::uint64_t>(e), inv_sqrt(F), s);
    }
  }
  if (Fs > 0) {
    const std::size_t es = dtype_size(dtype);
    void* w13 = layer.shared_params();
    void* w2 = elem_at(w13, 2 * Fs * H, es);
    if (dtype == DType::kBf16) {
      fill_uniform(static_cast<bf16*>(w13), 2 * Fs * H, seed + 40, inv_sqrt(H), s);
      fill_uniform(static_cast<bf16*>(w2), H * Fs, seed + 41, inv_sqrt(Fs), s);
    } else {
      fill_uniform(static_cast<float*>(w13), 2 * Fs * H, seed + 40, inv_sqrt(H), s);
      fill_uniform(static_cast<float*>(w2), H * Fs, seed + 41, inv_sqrt(Fs), s);
    }
  }
  DeviceBuffer<float> x(static_cast<std::size_t>(T * H), s), y(static_cast<std::size_t>(T * H), s),
      dy(static_cast<std::size_t>(T * H), s), dx(static_cast<std::size_t>(T * H), s);
  fill_uniform(x.data(), T * H, seed + 50, std::sqrt(3.0f), s);
  fill_uniform(dy.data(), T * H, seed + 51, std::sqrt(3.0f), s);
  layer.reserve(T, s);
  MOEX_CUDA_CHECK(cudaStreamSynchronize(s));

  const auto step = [&] {
    layer.zero_grad(s);
    layer.forward(x.data(), T, y.data(), s);
    layer.backward(dy.data(), dx.data(), s);
  };
  const double ms = time_ms(s, timing, step);
  const double ms_fwd = time_ms(s, timing, [&] { layer.forward(x.data(), T, y.data(), s); });
  const std::vector<int64_t>& counts = layer.expert_counts();
  const auto [lo, hi] = std::minmax_element(counts.begin(), counts.end());
  const int64_t N = T * K;
  // FLOPs: the routed and shared FFNs (GroupedFfn::forward_flops + backward_flops: 18 rows H F) and
  // the gate's GEMMs (2 T H E forward, 4 T H E backward); the elementwise kernels are not counted.
  const double ffn_flops = GroupedFfn::forward_flops(N, H, F) + GroupedFfn::backward_flops(N, H, F) +
                           GroupedFfn::forward_flops(T, H, Fs) + GroupedFfn::backward_flops(T, H, Fs);
  const double flops = ffn_flops + 6.0 * static_cast<double>(T) * static_cast<double>(H) * static_cast<double>(E);
  const double tokens_per_s = static_cast<double>(T) / (ms * 1e-3);
  const double tflops = flops / (ms * 1e9);

  // Stage times from separate profiled passes (their events cost a little).
  layer.set_profile(true);
  std::vector<std::vector<double>> st(12);
  for (int i = 0; i < timing.warmup + timing.iters; ++i) {
    step();
    if (i < timing.warmup) continue;
    const GpuLayerTimes t = layer.last_times();
    const double v[12] = {t.fwd_total, t.fwd_gate, t.fwd_permute, t.fwd_experts, t.fwd_combine, t.fwd_shared,
                          t.bwd_total, t.bwd_permute, t.bwd_experts, t.bwd_combine, t.bwd_gate, t.bwd_shared};
    for (std::size_t j = 0; j < 12; ++j) st[j].push_back(v[j]);
  }
  const char* names[12] = {"fwd_total", "fwd_gate", "fwd_permute", "fwd_experts", "fwd_combine", "fwd_shared",
                           "bwd_total", "bwd_permute", "bwd_experts", "bwd_combine", "bwd_gate", "bwd_shared"};
  nlohmann::json stages = nlohmann::json::object();
  for (std::size_t j = 0; j < 12; ++j) stages[names[j]] = median(st[j]);

  std::printf("\nlayer (%s, %lld shared experts of %lld, %lld..%lld rows per expert): forward+backward %.3f ms "
              "(%.0f tokens/s, %.1f TFLOP/s), forward %.3f ms\n",
              to_string(dtype), static_cast<long long>(cfg.n_shared_experts), static_cast<long long>(F),
              static_cast<long long>(*lo), static_cast<long long>(*hi), ms, tokens_per_s, tflops, ms_fwd);
  std::printf("  stages (ms, profiled passes; shared runs beside gate/permute/experts):\n");
  for (std::size_t j = 0; j < 12; ++j) std::printf("    %-12s %8.3f\n", names[j], median(st[j]));
  nlohmann::json j = shape;
  j.update({{"bench", "gpu"}, {"case", "layer"}, {"dtype", to_string(dtype)}, {"shared_experts", cfg.n_shared_experts},
            {"scoring", moex::to_string(cfg.scoring_func)}, {"topk_method", moex::to_string(cfg.topk_method)},
            {"ms_fwd_bwd", ms}, {"ms_fwd", ms_fwd}, {"tokens_per_s", tokens_per_s}, {"flops", flops},
            {"tflops", tflops}, {"rows_min", *lo}, {"rows_max", *hi}, {"stages_ms", stages}});
  print_json(json, j);
}

int run(int argc, char** argv) {
  moex::tools::Options opt("moex-bench-gpu", "moex-bench-gpu [--case all|gemm|permute|layer] [--hidden H --ffn F "
                                             "--experts E --topk K --tokens T --shared S] [--iters N] [--json]");
  opt.value("hidden", "2048", "hidden_size")
      .value("ffn", "1408", "moe_intermediate_size")
      .value("experts", "64", "n_routed_experts")
      .value("topk", "6", "num_experts_per_tok")
      .value("tokens", "8192", "tokens routed in one layer pass")
      .value("iters", "20", "timed iterations (the median is reported)")
      .value("warmup", "5", "untimed iterations first")
      .value("seed", "1", "seed of the routing and the data")
      .value("dtype", "bf16", "element type of the GEMM benchmarks: bf16 or fp32")
      .value("device", "0", "CUDA device ordinal")
      .value("case", "all", "what to run: all, gemm, permute or layer")
      .value("shared", "2", "layer case: n_shared_experts (DeepSeek-V2-Lite: 2)")
      .flag("json", "also print one JSON line per case");
  if (!opt.parse(argc, argv, 1)) return 0;
  std::string why;
  const int devices = cuda_device_count(&why);
  if (devices == 0) {
    std::printf("SKIPPED: no CUDA device (%s)\n", why.c_str());
    return 0;
  }
  const int64_t H = opt.integer("hidden"), F = opt.integer("ffn"), E = opt.integer("experts"),
                K = opt.integer("topk"), T = opt.integer("tokens");
  const Timing timing{static_cast<int>(opt.integer("warmup")), static_cast<int>(opt.integer("iters"))};
  if (H < 1 || F < 1 || E < 1 || K < 1 || K > E || T < 1 || timing.iters < 1 || timing.warmup < 0)
    throw moex::ConfigError("need --hidden, --ffn, --experts, --tokens >= 1, 1 <= --topk <= --experts, --iters >= 1 "
                            "and --warmup >= 0");
  const std::string dtype_name = opt.str("dtype");
  if (dtype_name != "bf16" && dtype_name != "fp32")
    throw moex::ConfigError("--dtype = '" + dtype_name + "': expected bf16 or fp32");
  const DType dtype = dtype_name == "bf16" ? DType::kBf16 : DType::kFp32;
  const std::string which = opt.str("case");
  if (which != "all" && which != "gemm" && which != "permute" && which != "layer")
    throw moex::ConfigError("--case = '" + which + "': expected all, gemm, permute or layer");
  const int64_t n_shared = opt.integer("shared");
  if (n_shared < 0) throw moex::ConfigError("--shared = " + std::to_string(n_shared) + ": expected >= 0");
  const int device = static_cast<int>(opt.integer("device"));
  if (device < 0 || device >= devices)
    throw moex::ConfigError("--device = " + std::to_string(device) + ": expected 0.." + std::to_string(devices - 1));
  MOEX_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp prop{};
  MOEX_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  const bool json = opt.on("json");
  const auto seed = static_cast<std::uint64_t>(opt.integer("seed"));

  Stream stream;
  CublasHandle blas;
  const cudaStream_t s = stream.get();
  const Routing routing = uniform_routing(T, E, K, seed);
  const int64_t N = static_cast<int64_t>(routing.row_token.size());
  const auto [min_rows, max_rows] = std::minmax_element(routing.rows_per_expert.begin(), routing.rows_per_expert.end());
  std::printf("moex-bench-gpu on %s: hidden %lld, ffn %lld, %lld experts, top-%lld, %lld tokens -> %lld rows "
              "(%lld..%lld per expert), %s GEMMs, median of %d\n",
              prop.name, static_cast<long long>(H), static_cast<long long>(F), static_cast<long long>(E),
              static_cast<long long>(K), static_cast<long long>(T), static_cast<long long>(N),
              static_cast<long long>(*min_rows), static_cast<long long>(*max_rows), to_string(dtype), timing.iters);
  const nlohmann::json shape{{"device", prop.name}, {"hidden", H}, {"ffn", F}, {"experts", E}, {"topk", K},
                             {"tokens", T}, {"rows", N}, {"iters", timing.iters}};

  // (a) Grouped GEMMs.
  if (which == "all" || which == "gemm") {
    FfnTensors t;
    const float ws = 1.0f / static_cast<float>(H);
    t.x = random_tensor(dtype, N * H, seed + 1, 1.0f, s);
    t.w13 = random_tensor(dtype, E * 2 * F * H, seed + 2, ws, s);
    t.w2 = random_tensor(dtype, E * H * F, seed + 3, ws, s);
    t.dy = random_tensor(dtype, N * H, seed + 4, 1.0f, s);
    t.h13 = random_tensor(dtype, N * 2 * F, seed + 5, 1.0f, s);
    t.sig = random_tensor(dtype, N * F, seed + 6, 1.0f, s);
    t.a = random_tensor(dtype, N * F, seed + 7, 1.0f, s);
    t.dh13 = random_tensor(dtype, N * 2 * F, seed + 8, 1.0f, s);
    t.y = random_tensor(dtype, N * H, seed + 9, 1.0f, s);
    t.dx = random_tensor(dtype, N * H, seed + 10, 1.0f, s);
    t.dw13 = random_tensor(dtype, E * 2 * F * H, seed + 11, 1.0f, s);
    t.dw2 = random_tensor(dtype, E * H * F, seed + 12, 1.0f, s);
    stream.synchronize();

    std::printf("\n%-10s %-8s %10s %10s | %10s %10s | %8s\n", "gemm", "impl", "ms", "TFLOP/s", "dense ms", "TFLOP/s",
                "ratio");
    for (const GemmCase& c : gemm_cases(routing.rows_per_expert, H, F, dtype, t)) {
      const double flops = gemm_flops(c.grouped);
      const double dense_ms = time_ms(s, timing, [&] { gemm(blas, dtype, c.dense, s); });
      const double dense_tflops = flops / (dense_ms * 1e9);
      for (GroupedGemmImpl impl : {GroupedGemmImpl::kGroupedBatched, GroupedGemmImpl::kLoop}) {
        GroupedGemm g(impl);
        const double ms = time_ms(s, timing, [&] { g.run(blas, dtype, c.grouped, s); });
        const double tflops = flops / (ms * 1e9);
        std::printf("%-10s %-8s %10.3f %10.1f | %10.3f %10.1f | %8.3f\n", c.name, to_string(impl), ms, tflops, dense_ms,
                    dense_tflops, tflops / dense_tflops);
        nlohmann::json j = shape;
        j.update({{"bench", "gpu"}, {"case", "grouped_gemm"}, {"gemm", c.name}, {"impl", to_string(impl)},
                  {"dtype", to_string(dtype)}, {"flops", flops}, {"ms", ms}, {"tflops", tflops},
                  {"dense_ms", dense_ms}, {"dense_tflops", dense_tflops}, {"ratio", tflops / dense_tflops}});
        print_json(json, j);
      }
    }

    // The whole FFN (GEMMs + SwiGLU), against the same FFN as one dense expert holding all N rows.
    const std::vector<int64_t> all_rows = {N};
    GroupedFfn dense_ffn({1, H, F}, dtype, GroupedGemmImpl::kLoop);
    const double dense_fwd = time_ms(s, timing, [&] {
      dense_ffn.forward(blas, all_rows, t.x.data(), t.w13.data(), t.w2.data(), t.h13.data(), t.sig.data(), t.a.data(),
                        t.y.data(), s);
    });
    const double dense_bwd = time_ms(s, timing, [&] {
      dense_ffn.backward(blas, all_rows, t.x.data(), t.w13.data(), t.w2.data(), t.h13.data(), t.sig.data(), t.a.data(),
                         t.dy.data(), t.dw13.data(), t.dw2.data(), t.dx.data(), t.dh13.data(), false, s);
    });
    // kFixedOrder: the deterministic mode's own kernel (no cuBLAS), for its cost.
    for (GroupedGemmImpl impl :
         {GroupedGemmImpl::kGroupedBatched, GroupedGemmImpl::kLoop, GroupedGemmImpl::kFixedOrder}) {
      GroupedFfn ffn({E, H, F}, dtype, impl);
      const double fwd = time_ms(s, timing, [&] {
        ffn.forward(blas, routing.rows_per_expert, t.x.data(), t.w13.data(), t.w2.data(), t.h13.data(), t.sig.data(),
                    t.a.data(), t.y.data(), s);
      });
      const double bwd = time_ms(s, timing, [&] {
        ffn.backward(blas, routing.rows_per_expert, t.x.data(), t.w13.data(), t.w2.data(), t.h13.data(), t.sig.data(),
                     t.a.data(), t.dy.data(), t.dw13.data(), t.dw2.data(), t.dx.data(), t.dh13.data(), false, s);
      });
      const struct {
        const char* name;
        double ms, dense_ms, flops;
      } rows[] = {{"ffn_fwd", fwd, dense_fwd, GroupedFfn::forward_flops(N, H, F)},
                  {"ffn_bwd", bwd, dense_bwd, GroupedFfn::backward_flops(N, H, F)}};
      for (const auto& r : rows) {
        const double tflops = r.flops / (r.ms * 1e9), dense_tflops = r.flops / (r.dense_ms * 1e9);
        std::printf("%-10s %-8s %10.3f %10.1f | %10.3f %10.1f | %8.3f\n", r.name, to_string(impl), r.ms, tflops,
                    r.dense_ms, dense_tflops, tflops / dense_tflops);
        nlohmann::json j = shape;
        j.update({{"bench", "gpu"}, {"case", "grouped_ffn"}, {"gemm", r.name}, {"impl", to_string(impl)},
                  {"dtype", to_string(dtype)}, {"flops", r.flops}, {"ms", r.ms}, {"tflops", tflops},
                  {"dense_ms", r.dense_ms}, {"dense_tflops", dense_tflops}, {"ratio", tflops / dense_tflops}});
        print_json(json, j);
      }
    }
  }

  // (c) The whole layer: DeepSeek-V2-Lite's routing (softmax, greedy top-K, no normalisation).
  if (which == "all" || which == "layer") {
    moex::MoeConfig cfg = moex::MoeConfig::defaults_for("deepseek_v2");
    cfg.hidden_size = H;
    cfg.moe_intermediate_size = F;
    cfg.n_routed_experts = E;
    cfg.num_experts_per_tok = K;
    cfg.n_shared_experts = n_shared;
    cfg.n_group = 1;
    cfg.topk_group = 1;
    cfg.topk_method = moex::TopkMethod::kGreedy;
    cfg.scoring_func = moex::ScoringFunc::kSoftmax;
    cfg.norm_topk_prob = false;
    cfg.routed_scaling_factor = 1.0;
    cfg.validate();
    bench_layer(cfg, T, dtype, timing, seed, s, json, shape);
  }
  if (which != "all" && which != "permute") return 0;

  // (b) Permute and combine. Bytes = row payload read + written (index and weights not counted); the
  // memcpy baseline copies half as many bytes, so it too reads + writes that many.
  std::printf("\n%-16s %-6s %12s %10s %10s | %10s %10s | %8s\n", "case", "dtype", "bytes", "ms", "GB/s", "memcpy ms",
              "GB/s", "ratio");
  const moex::cuda::CombinePlan plan = [&] {
    moex::Rng rng(seed + 100);
    std::vector<float> w(static_cast<std::size_t>(N));
    for (float& v : w) v = static_cast<float>(rng.uniform());
    return build_combine_plan(N, T, routing.row_token.data(), w.data());
  }();
  auto d_index = to_device(routing.row_token, s);
  auto d_off = to_device(plan.offsets, s);
  auto d_src_row = to_device(plan.src_row, s);
  auto d_weight = to_device(plan.weight, s);
  for (DType dt : {DType::kBf16, DType::kFp32}) {
    const std::size_t es = dtype_size(dt);
    Tensor x = random_tensor(dt, T * H, seed + 20, 1.0f, s);
    Tensor rows = random_tensor(dt, N * H, seed + 21, 1.0f, s);
    Tensor out = random_tensor(dt, T * H, seed + 22, 1.0f, s);
    const double row_bytes = static_cast<double>(H) * static_cast<double>(es);
    const double permute_bytes = 2.0 * static_cast<double>(N) * row_bytes;
    const double combine_bytes = static_cast<double>(N + T) * row_bytes;
    DeviceBuffer<unsigned char> copy_src(static_cast<std::size_t>(permute_bytes / 2), s),
        copy_dst(static_cast<std::size_t>(permute_bytes / 2), s);
    stream.synchronize();
    const auto permute = [&] {
      if (dt == DType::kBf16)
        gather_rows(N, H, d_index.data(), static_cast<const bf16*>(x.data()), H, static_cast<bf16*>(rows.data()), H, s);
      else
        gather_rows(N, H, d_index.data(), static_cast<const float*>(x.data()), H, static_cast<float*>(rows.data()), H,
                    s);
    };
    const auto combine = [&] {
      if (dt == DType::kBf16)
        combine_rows(T, H, d_off.data(), d_src_row.data(), d_weight.data(), static_cast<const bf16*>(rows.data()), H,
                     static_cast<bf16*>(out.data()), H, false, s);
      else
        combine_rows(T, H, d_off.data(), d_src_row.data(), d_weight.data(), static_cast<const float*>(rows.data()), H,
                     static_cast<float*>(out.data()), H, false, s);
    };
    const struct {
      const char* name;
      double bytes;
      std::function<void()> fn;
    } cases[] = {{"permute", permute_bytes, permute},
                 {"combine", combine_bytes, combine},
                 {"permute+combine", permute_bytes + combine_bytes, [&] {
                    permute();
                    combine();
                  }}};
    for (const auto& c : cases) {
      const double ms = time_ms(s, timing, c.fn);
      const auto copy = static_cast<std::size_t>(c.bytes / 2);
      // The copy is split in chunks no larger than the buffers (permute+combine moves more than either).
      const double copy_ms = time_ms(s, timing, [&] {
        for (std::size_t done = 0; done < copy;) {
          const std::size_t n = std::min(copy - done, copy_src.size());
          MOEX_CUDA_CHECK(cudaMemcpyAsync(copy_dst.data(), copy_src.data(), n, cudaMemcpyDeviceToDevice, s));
          done += n;
        }
      });
      const double gbps = c.bytes / (ms * 1e6), copy_gbps = c.bytes / (copy_ms * 1e6);
      std::printf("%-16s %-6s %12.0f %10.3f %10.1f | %10.3f %10.1f | %8.3f\n", c.name, to_string(dt), c.bytes, ms, gbps,
                  copy_ms, copy_gbps, gbps / copy_gbps);
      nlohmann::json j = shape;
      j.update({{"bench", "gpu"}, {"case", c.name}, {"dtype", to_string(dt)}, {"bytes", c.bytes}, {"ms", ms},
                {"gbps", gbps}, {"memcpy_ms", copy_ms}, {"memcpy_gbps", copy_gbps}, {"ratio", gbps / copy_gbps}});
      print_json(json, j);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moex-bench-gpu: error: %s\n", e.what());
    return 1;
  }
}
