// moex-layer: runs one MoE layer of a real checkpoint across MPI ranks, forward and optionally backward.
#include <cstdio>
#include <cstring>
#include <memory>

#include "base/error.h"
#include "examples/tool.h"
#include "runtime/moe_layer.h"
#include "scheduler/replica_planner.h"
#include "runtime/io/hf_layer.h"
#include "runtime/io/safetensors.h"
#ifdef MOEX_TOOLS_WITH_CUDA
#include "comm/device_communicator.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_layer.h"
#endif

namespace {
using moex::IoError;
using Shape = std::vector<std::int64_t>;

/// Rows [begin, end) of `total` that rank `r` of `world` handles.
std::pair<std::int64_t, std::int64_t> token_range(std::int64_t total, int r, int world) {
  return {total * r / world, total * (r + 1) / world};
}

std::vector<float> slice_rows(const std::vector<float>& all, std::int64_t begin, std::int64_t end, std::int64_t width) {
  return std::vector<float>(all.begin() + begin * width, all.begin() + end * width);
}

/// Gathers every rank's rows to rank 0 (returns the full [total, width] there, empty elsewhere).
std::vector<float> gather_rows(moex::comm::Communicator& comm, const std::vector<float>& mine,
                               std::int64_t total, std::int64_t width) {
  std::vector<std::int64_t> counts(static_cast<std::size_t>(comm.size()));
  for (int r = 0; r < comm.size(); ++r) {
    const auto [b, e] = token_range(total, r, comm.size());
    counts[static_cast<std::size_t>(r)] = (e - b) * width;
  }
  std::vector<float> all(comm.rank() == 0 ? static_cast<std::size_t>(total * width) : 0);
  comm.gatherv(mine.data(), static_cast<std::int64_t>(mine.size()), all.data(), counts,
               moex::comm::DataType::kFloat32, 0, "gather rows")->wait();
  return all;
}

/// Exit status of a run that cannot start because there is no GPU (ctest's SKIP_RETURN_CODE).
constexpr int kNoDevice = 77;
#ifdef MOEX_TOOLS_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

#ifdef MOEX_TOOLS_WITH_CUDA
/// The pass on the GPU: a GpuMoELayer (expert-parallel over `device_comm`, "staged" or "nccl") with
/// `cpu`'s parameters runs forward (and backward), writes y (and dx), and leaves every gradient in
/// `cpu`'s buffers (replicated ones summed over the ranks, and in replica mode each expert's over its
/// replicas, by allreduce_replicated_grads), so the output is written as for the CPU.
void run_on_gpu(moex::comm::MpiCommunicator& world, moex::MoELayer& cpu, const std::string& device_comm,
                const std::string& precision, const std::vector<float>& x, std::int64_t tokens,
                const std::vector<float>* dy, std::vector<float>& y, std::vector<float>& dx) {
  namespace cuda = moex::cuda;
  const int devices = cuda::cuda_device_count();
  MOEX_CUDA_CHECK(cudaSetDevice(world.rank() % devices));
  const auto dev = moex::comm::make_device_communicator(device_comm, MPI_COMM_WORLD, world.default_timeout());
  cuda::GpuLayerOptions go;
  go.precision = cuda::precision_from_string(precision);
  // The stream before the layer, so that it outlives it (GpuMoELayer frees its grouped GEMMs'
  // pointer tables on the caller's stream when it is destroyed).
  cuda::Stream stream;
  const cudaStream_t s = stream.get();
  const std::unique_ptr<cuda::GpuMoELayer> made = cuda::make_gpu_layer_like(cpu, world, *dev, go);
  cuda::GpuMoELayer& gpu = *made;
  gpu.load_from(cpu);
  const auto TH = static_cast<std::size_t>(tokens * cpu.config().hidden_size);
  cuda::DeviceBuffer<float> d_x = cuda::to_device(x, s), d_y(TH, s), d_dx(TH, s);
  gpu.forward(d_x.data(), tokens, d_y.data(), s);
  y = cuda::to_host(d_y, s);
  if (dy) {
    cuda::DeviceBuffer<float> d_dy = cuda::to_device(*dy, s);
    gpu.zero_grad(s);
    gpu.backward(d_dy.data(), d_dx.data(), s);
    gpu.allreduce_replicated_grads(s);
    dx = cuda::to_host(d_dx, s);
    cpu.replicated().grad = gpu.replicated_grads_host(s);
    cpu.experts().grad = gpu.expert_grads_host(s);
  }
  stream.synchronize();
}
#endif

int run(moex::comm::MpiCommunicator& world, int argc, char** argv) {
  moex::tools::Options opt("moex-layer",
                           "mpirun -np N moex-layer --config C.json --weights W.safetensors --input I.safetensors "
                           "--output O.safetensors [--prefix model.layers.0.mlp.] [--backward]");
  opt.value("config", "", "Hugging Face DeepSeek config.json")
      .value("weights", "", "the layer's weights (HF names): a .safetensors file, a sharded checkpoint's folder or "
                             "its model.safetensors.index.json (F32, BF16, F16, or FP8 with weight_scale_inv)")
      .value("input", "", "safetensors file with `input` [T, hidden] (and `R` = dL/doutput for --backward)")
      .value("output", "", "safetensors file rank 0 writes")
      .value("prefix", "", "name prefix of the layer's weights, e.g. model.layers.3.mlp.")
      .value("layer", "", "the checkpoint's layer N: the same as --prefix model.layers.N.mlp.")
      .flag("backward", "also compute input.grad and every weight's .grad from R")
      .value("replicas", "off",
             "on: one spare expert slot per rank; a first forward measures the load, the layer migrates to "
             "the planned replica layout, then the pass that is written out runs")
      .value("timeout", "", "seconds any wait may take before the job aborts (default MOEX_TIMEOUT_S or 300)");
  moex::tools::add_device_options(opt, "the pass (exit 77, 'SKIPPED: no CUDA device', where there is none)", "fp32");
  moex::tools::add_schedule_options(opt);
  if (!opt.parse(argc, argv)) return 0;
  for (const char* required : {"config", "weights", "input", "output"})
    if (opt.str(required).empty()) throw moex::ConfigError(std::string("--") + required + " is required\n" + opt.usage());
  if (opt.given("timeout")) moex::tools::apply_timeout(world, opt.number("timeout"));
  if (opt.given("layer") && opt.given("prefix")) throw moex::ConfigError("--layer and --prefix: give one of them");
  if (opt.given("layer") && opt.integer("layer") < 0)
    throw moex::ConfigError("--layer = " + std::to_string(opt.integer("layer")) + ": must be >= 0");
  const std::string prefix =
      opt.given("layer") ? "model.layers." + std::to_string(opt.integer("layer")) + ".mlp." : opt.str("prefix");
  const bool backward = opt.on("backward");

  const moex::MoeConfig config = moex::MoeConfig::from_file(opt.str("config"));
  const std::int64_t H = config.hidden_size, E = config.n_routed_experts;
  const moex::LayerOptions lo = moex::tools::schedule_options(opt);
  const bool replicas = opt.on_off("replicas");
  const moex::tools::DeviceChoice device = moex::tools::device_options(opt, kWithCuda);
  if (device.cuda) {
#ifdef MOEX_TOOLS_WITH_CUDA
    std::string why;
    if (moex::cuda::cuda_device_count(&why) == 0) {
      if (world.rank() == 0) std::fprintf(stderr, "SKIPPED: no CUDA device: %s\n", why.c_str());
      return kNoDevice;
    }
#endif
  }
  moex::tools::TraceOption trace(opt, world);
  const auto topology = moex::sched::Topology::from_node_ids(world.node_ids());
  const std::int64_t slots = (E + world.size() - 1) / world.size() + 1;
  const std::string name = prefix.empty() ? "layer" : prefix;
  std::unique_ptr<moex::MoELayer> layer_ptr =
      replicas ? std::make_unique<moex::MoELayer>(config, world, moex::sched::identity_layout(E, topology, slots), name,
                                                  topology, lo)
               : std::make_unique<moex::MoELayer>(config, world, moex::sched::ExpertPlacement::node_aware(E, topology),
                                                  name, topology, lo);
  moex::MoELayer& layer = *layer_ptr;
  const auto weights = moex::HfCheckpoint::open(opt.str("weights"));
  moex::load_hf_layer(layer, weights, prefix);

  const auto input_file = moex::SafetensorsFile::open(opt.str("input"));
  const auto& in = input_file.entry("input");
  if (in.shape.size() != 2 || in.shape[1] != H)
    throw IoError(input_file.path() + ": tensor 'input' must have shape [T, " + std::to_string(H) +
                  "] (hidden_size from the config), got rank " + std::to_string(in.shape.size()) + " tensor with " +
                  (in.shape.empty() ? std::string("no dims") : "last dim " + std::to_string(in.shape.back())));
  const std::int64_t T = in.shape[0];
  const auto [begin, end] = token_range(T, world.rank(), world.size());
  const std::int64_t mine = end - begin;
  const std::vector<float> x = slice_rows(input_file.read_f32("input"), begin, end, H);
  std::vector<float> dy;
  if (backward) dy = slice_rows(input_file.read_f32("R", {T, H}), begin, end, H);

  std::vector<float> y(static_cast<std::size_t>(mine * H)), dx(y.size());
  if (replicas) {  // measure the load, plan replicas for it, migrate (the same plan on every rank)
    layer.forward(x.data(), mine, y.data());
    std::vector<std::int64_t> load(layer.route_stats().expert_tokens);
    world.allreduce_sum(load.data(), E, moex::comm::DataType::kInt64, "expert load")->wait();
    layer.set_replica_layout(moex::sched::plan_replicas(std::vector<double>(load.begin(), load.end()), topology,
                                                        config.n_group, slots));
  }
  if (device.cuda) {
#ifdef MOEX_TOOLS_WITH_CUDA
    run_on_gpu(world, layer, device.comm, device.precision, x, mine, backward ? &dy : nullptr, y, dx);
#endif
  } else {
    layer.forward(x.data(), mine, y.data());
  }
  if (backward && !device.cuda) {
    layer.zero_grad();
    layer.backward(dy.data(), dx.data());
    layer.allreduce_replicated_grads()->wait();
    layer.reduce_replica_grads();
  }

  std::vector<moex::NamedTensor> out;
  out.push_back({"output", {T, H}, gather_rows(world, y, T, H)});
  if (backward) {
    out.push_back({"input.grad", {T, H}, gather_rows(world, dx, T, H)});
    // Expert gradients live on their owners; rank 0 collects them all.
    const std::int64_t stride = layer.expert_stride();
    std::vector<std::int64_t> counts(static_cast<std::size_t>(world.size()));
    std::int64_t total_slots = 0;
    for (int r = 0; r < world.size(); ++r) {
      const auto n = static_cast<std::int64_t>(layer.slot_experts(r).size());
      counts[static_cast<std::size_t>(r)] = n * stride;
      total_slots += n;
    }
    std::vector<float> all(world.rank() == 0 ? static_cast<std::size_t>(total_slots * stride) : 0);
    world.gatherv(layer.experts().grad.data(), static_cast<std::int64_t>(layer.experts().grad.size()), all.data(),
                  counts, moex::comm::DataType::kFloat32, 0, "gather expert grads")->wait();
    if (world.rank() == 0) {
      const std::int64_t F = config.moe_intermediate_size, Fs = config.shared_intermediate_size(), E = config.n_routed_experts;
      const float* g = layer.replicated().grad.data();
      out.push_back({prefix + "gate.weight.grad", {E, H}, std::vector<float>(g, g + E * H)});
      if (!layer.selection_bias().empty())
        out.push_back({prefix + "gate.e_score_correction_bias.grad", {E}, std::vector<float>(static_cast<std::size_t>(E), 0.0f)});
      if (Fs > 0) {
        const float* s13 = layer.grad_of(layer.shared_w13());
        const float* s2 = layer.grad_of(layer.shared_w2());
        out.push_back({prefix + "shared_experts.gate_proj.weight.grad", {Fs, H}, std::vector<float>(s13, s13 + Fs * H)});
        out.push_back({prefix + "shared_experts.up_proj.weight.grad", {Fs, H}, std::vector<float>(s13 + Fs * H, s13 + 2 * Fs * H)});
        out.push_back({prefix + "shared_experts.down_proj.weight.grad", {H, Fs}, std::vector<float>(s2, s2 + H * Fs)});
      }
      std::int64_t at = 0;  // slot blocks arrive in rank order, each in slot order
      std::vector<bool> written(static_cast<std::size_t>(E), false);  // replicas hold the same gradient
      for (int r = 0; r < world.size(); ++r) {
        for (const std::int64_t e : layer.slot_experts(r)) {
          const float* b = all.data() + at;
          at += stride;
          if (written[static_cast<std::size_t>(e)]) continue;
          written[static_cast<std::size_t>(e)] = true;
          const std::string n = prefix + "experts." + std::to_string(e) + ".";
          out.push_back({n + "gate_proj.weight.grad", {F, H}, std::vector<float>(b, b + F * H)});
          out.push_back({n + "up_proj.weight.grad", {F, H}, std::vector<float>(b + F * H, b + 2 * F * H)});
          out.push_back({n + "down_proj.weight.grad", {H, F}, std::vector<float>(b + 2 * F * H, b + 3 * F * H)});
        }
      }
    }
  }
  if (world.rank() == 0)
    moex::write_safetensors(opt.str("output"), out, {{"producer", "moex-layer"}, {"ranks", std::to_string(world.size())}});
  trace.finish();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return moex::tools::run_mpi_tool("moex-layer", argc, argv,
                                   [&](moex::comm::MpiCommunicator& world) { return run(world, argc, argv); });
}
