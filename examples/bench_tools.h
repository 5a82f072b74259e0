// moex-bench's benchmarks beyond `layer` (bench.cpp): each one's entry point, called with the
// subcommand at argv[1].
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

#include "comm/mpi/mpi_communicator.h"
#include "examples/tool.h"
#include "runtime/io/moe_config.h"

namespace moex::tools {

// What every benchmark times with.
using BenchClock = std::chrono::steady_clock;
inline double ms_since(BenchClock::time_point t) {
  return std::chrono::duration<double, std::milli>(BenchClock::now() - t).count();
}
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}
/// The max (sum) over ranks of a per-rank value: a collective.
inline double max_over_ranks(comm::Communicator& comm, double v) {
  comm.allreduce_max(&v, 1, comm::DataType::kFloat64, "bench max")->wait();
  return v;
}
inline double sum_over_ranks(comm::Communicator& comm, double v) {
  comm.allreduce_sum(&v, 1, comm::DataType::kFloat64, "bench sum")->wait();
  return v;
}

/// The layer shape flags of the benchmarks: --hidden, --ffn, --experts, --shared, --topk, --groups,
/// --topk-group and --scoring (DeepSeek-V3 defaults for the scoring's routing: sigmoid with
/// noaux_tc, normalised, scale 2.5; softmax with group_limited_greedy).
Options& add_shape_options(Options& opt);
/// The config they describe (ConfigError naming the field on a bad value).
MoeConfig shape_config(const Options& opt);

/// `moex-bench exchange`: the token exchange alone over a range of sizes (bench_exchange.cpp).
int bench_exchange(comm::MpiCommunicator& world, int argc, char** argv);
/// `moex-bench model`: the cluster cost model's predictions for every schedule (bench_model.cpp).
int bench_model(comm::MpiCommunicator& world, int argc, char** argv);

}  // namespace moex::tools
