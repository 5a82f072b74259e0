// moex-bench: benchmarks of the MoE layer (forward + backward) against plain sgemm of the same shapes.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "examples/tool.h"
#include "runtime/blas.h"
#include "runtime/moe_layer.h"
#include "runtime/moe_model.h"
#include "runtime/random.h"

namespace {
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

/// Max over ranks of a per-rank value.
double max_over_ranks(moex::comm::Communicator& comm, double v) {
  comm.allreduce_max(&v, 1, moex::comm::DataType::kFloat64, "bench max")->wait();
  return v;
}

/// The GEMMs one SwiGLU FFN runs forward and backward on `rows` rows, on scratch buffers. Returns FLOPs.
double ffn_gemms(std::int64_t rows, std::int64_t H, std::int64_t F, std::vector<float>& buf) {
  if (rows == 0) return 0.0;
  namespace b = moex::blas;
  const std::size_t need = static_cast<std::size_t>(rows * (3 * H + 6 * F) + 6 * F * H);
  if (buf.size() < need) buf.assign(need, 0.01f);
  float* x = buf.data();
  float* y = x + rows * H;
  float* dx = y + rows * H;
  float* h13 = dx + rows * H;
  float* a = h13 + rows * 2 * F;
  float* dh13 = a + rows * F;
  float* w13 = dh13 + rows * 2 * F;
  float* w2 = w13 + 2 * F * H;
  float* dw13 = w2 + H * F;
  float* dw2 = dw13 + 2 * F * H;
  b::sgemm(false, true, rows, 2 * F, H, 1.0f, x, H, w13, H, 0.0f, h13, 2 * F);
  b::sgemm(false, true, rows, H, F, 1.0f, a, F, w2, F, 0.0f, y, H);
  b::sgemm(false, false, rows, F, H, 1.0f, y, H, w2, F, 0.0f, dh13 + F, 2 * F);
  b::sgemm(true, false, H, F, rows, 1.0f, y, H, a, F, 1.0f, dw2, F);
  b::sgemm(true, false, 2 * F, H, rows, 1.0f, dh13, 2 * F, x, H, 1.0f, dw13, H);
  b::sgemm(false, false, rows, H, 2 * F, 1.0f, dh13, 2 * F, w13, H, 0.0f, dx, H);
  return 18.0 * static_cast<double>(rows) * static_cast<double>(H) * static_cast<double>(F);
}

int bench_layer(moex::comm::MpiCommunicator& world, int argc, char** argv) {
  moex::tools::Options opt("moex-bench layer",
                           "mpirun -np N moex-bench layer --hidden H --ffn F --experts E --shared S --topk K "
                           "--tokens-per-rank T --iters N [--json]");
  opt.value("hidden", "1024", "hidden_size")
      .value("ffn", "704", "moe_intermediate_size")
      .value("experts", "16", "n_routed_experts")
      .value("shared", "0", "n_shared_experts")
      .value("topk", "4", "num_experts_per_tok")
      .value("groups", "1", "n_group")
      .value("topk-group", "1", "topk_group")
      .value("scoring", "sigmoid", "scoring_func: sigmoid or softmax")
      .value("tokens-per-rank", "2048", "tokens per rank per iteration")
      .value("iters", "10", "timed iterations")
      .value("warmup", "2", "untimed iterations first")
      .value("seed", "1", "seed of weights and inputs")
      .flag("json", "also print one JSON line per result");
  if (!opt.parse(argc, argv, 2)) return 0;
  nlohmann::json cj{{"model_type", "deepseek_v3"},
                    {"hidden_size", opt.integer("hidden")},
                    {"moe_intermediate_size", opt.integer("ffn")},
                    {"n_routed_experts", opt.integer("experts")},
                    {"n_shared_experts", opt.integer("shared")},
                    {"num_experts_per_tok", opt.integer("topk")},
                    {"n_group", opt.integer("groups")},
                    {"topk_group", opt.integer("topk-group")},
                    {"scoring_func", opt.str("scoring")},
                    {"topk_method", opt.str("scoring") == "sigmoid" ? "noaux_tc" : "group_limited_greedy"},
                    {"norm_topk_prob", opt.str("scoring") == "sigmoid"},
                    {"routed_scaling_factor", opt.str("scoring") == "sigmoid" ? 2.5 : 1.0},
                    {"num_hidden_layers", 1}};
  const moex::MoeConfig config = moex::MoeConfig::from_json(cj);
  const std::int64_t T = opt.integer("tokens-per-rank"), iters = opt.integer("iters"), warmup = opt.integer("warmup");
  if (T < 0 || iters < 1 || warmup < 0)
    throw moex::ConfigError("--tokens-per-rank must be >= 0, --iters >= 1, --warmup >= 0");
  const std::int64_t H = config.hidden_size, F = config.moe_intermediate_size, Fs = config.shared_intermediate_size();
  const auto seed = static_cast<std::uint64_t>(opt.integer("seed"));

  moex::MoELayer layer(config, world, moex::sched::ExpertPlacement::contiguous(config.n_routed_experts, world.size()),
                       "bench layer");
  moex::init_layer_random(layer, seed, 0);
  std::vector<float> x(static_cast<std::size_t>(T * H)), dy(x.size()), y(x.size()), dx(x.size());
  moex::Rng rng(moex::Rng::mix(seed, 0xbe7c4, static_cast<std::uint64_t>(world.rank())));
  rng.fill_normal(x.data(), T * H, 1.0);
  rng.fill_normal(dy.data(), T * H, 1.0);

  // Layer and reference GEMMs alternate, iteration by iteration, so drift in a shared machine's
  // speed hits both alike. The reference runs this rank's expert blocks of the previous layer
  // iteration (same shapes, same FLOPs) and the shared expert, on scratch buffers.
  std::vector<double> layer_ms, gemm_ms;
  std::vector<float> scratch;
  double local_flops = 0.0;
  for (std::int64_t i = 0; i < warmup + iters; ++i) {
    world.barrier("bench iteration")->wait();
    auto t0 = Clock::now();
    layer.zero_grad();
    layer.forward(x.data(), T, y.data());
    layer.backward(dy.data(), dx.data());
    layer.allreduce_replicated_grads()->wait();
    const double ms = max_over_ranks(world, ms_since(t0));
    const auto& blocks = layer.expert_layout();
    world.barrier("bench gemm")->wait();
    t0 = Clock::now();
    double f = ffn_gemms(T, H, Fs, scratch);
    for (std::int64_t s = 0; s < layer.num_local_experts(); ++s) f += ffn_gemms(blocks.count(s), H, F, scratch);
    const double ref = max_over_ranks(world, ms_since(t0));
    local_flops = f;
    if (i >= warmup) {
      layer_ms.push_back(ms);
      gemm_ms.push_back(ref);
    }
  }
  double global_flops = local_flops;
  world.allreduce_sum(&global_flops, 1, moex::comm::DataType::kFloat64, "bench flops")->wait();
  const double ms = median(layer_ms), ref_ms = median(gemm_ms);
  const double tokens_per_s = static_cast<double>(T) * world.size() / (ms / 1000.0);
  const double gflops = global_flops / (ms * 1e6);
  const double sgemm_gflops = global_flops / (ref_ms * 1e6);

  if (world.rank() == 0) {
    std::printf("# moex-bench layer | ranks %d | hidden %lld ffn %lld experts %lld shared %lld topk %lld | "
                "tokens/rank %lld | BLAS %s | iters %lld (median)\n",
                world.size(), static_cast<long long>(H), static_cast<long long>(F),
                static_cast<long long>(config.n_routed_experts), static_cast<long long>(config.n_shared_experts),
                static_cast<long long>(config.num_experts_per_tok), static_cast<long long>(T),
                moex::blas::kernel_name().c_str(), static_cast<long long>(iters));
    std::printf("# %12s %12s %12s %14s %14s %10s\n", "ms_step", "ms_min", "tokens/s", "expert_GF/s", "sgemm_GF/s",
                "ratio");
    std::printf("  %12.2f %12.2f %12.0f %14.1f %14.1f %10.3f\n", ms,
                *std::min_element(layer_ms.begin(), layer_ms.end()), tokens_per_s, gflops, sgemm_gflops,
                gflops / sgemm_gflops);
    if (opt.on("json")) {
      nlohmann::json j{{"bench", "layer"}, {"ranks", world.size()}, {"hidden", H}, {"ffn", F},
                       {"experts", config.n_routed_experts}, {"shared", config.n_shared_experts},
                       {"topk", config.num_experts_per_tok}, {"tokens_per_rank", T}, {"iters", iters},
                       {"ms_step", ms}, {"tokens_per_s", tokens_per_s}, {"expert_gflops", gflops},
                       {"sgemm_ms", ref_ms}, {"sgemm_gflops", sgemm_gflops}, {"ratio", gflops / sgemm_gflops},
                       {"blas", moex::blas::kernel_name()}};
      std::printf("%s\n", j.dump().c_str());
    }
  }
  return 0;
}

int run(moex::comm::MpiCommunicator& world, int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  if (what == "layer") return bench_layer(world, argc, argv);
  throw moex::ConfigError("moex-bench: unknown benchmark '" + what + "'; expected: layer (try moex-bench layer --help)");
}

}  // namespace

int main(int argc, char** argv) {
  return moex::tools::run_mpi_tool("moex-bench", argc, argv,
                                   [&](moex::comm::MpiCommunicator& world) { return run(world, argc, argv); });
}
