// moex-train: trains a DeepSeekMoE student on a teacher's outputs across MPI ranks.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "examples/tool.h"
#include "runtime/blas.h"
#include "runtime/io/safetensors.h"
#include "runtime/metrics_server.h"
#include "runtime/model/train_metrics.h"
#include "runtime/model/trainer.h"
#ifdef MOEX_TOOLS_WITH_CUDA
#include "comm/device_communicator.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/gpu_executor.h"
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

namespace {

/// SIGTERM / SIGINT (what Slurm sends on preemption) ask for a clean stop: the step finishes, every
/// rank learns of it, a checkpoint is saved (with --save) and the run exits 0.
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

/// The built-in model when no --config is given: a small DeepSeek-V3-style layer (sigmoid gate,
/// noaux_tc group-limited routing, 2 shared + 16 routed experts, top-4).
moex::MoeConfig tiny_v3() {
  moex::MoeConfig c = moex::MoeConfig::defaults_for("deepseek_v3");
  c.hidden_size = 64;
  c.moe_intermediate_size = 32;
  c.n_routed_experts = 16;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.num_hidden_layers = 2;
  c.validate();
  return c;
}

/// The end of the run's router telemetry (rank 0): a table per layer of the last step, the router
/// saturation of every evaluation (also as JSON lines {"eval_step", "router_saturation"} in --log-json),
/// and with --eval-routes the evaluations' decisions in a safetensors file.
void report_router(const moex::Trainer& trainer, const moex::StepRecord& last, const moex::TrainOptions& to,
                   std::ofstream& json, const std::string& routes_path) {
  std::printf("moex-train: router telemetry, step %lld (all ranks' tokens)\n", static_cast<long long>(last.step));
  std::printf(" layer | jain index | load max/mean | (max-mean)/mean | picks dropped | bytes intra-node | "
              "bytes inter-node | change rate %%\n");
  for (std::size_t l = 0; l < last.layers.size(); ++l) {
    const moex::LayerTelemetry& t = last.layers[l];
    char rate[32] = "-";
    if (t.router_change_rate >= 0.0) std::snprintf(rate, sizeof rate, "%.2f", t.router_change_rate);
    std::printf("%6zu | %10.4f | %13.3f | %15.3f | %13lld | %16lld | %16lld | %13s\n", l, t.jain_index,
                t.load_max_mean, t.load_max_minus_mean_over_mean, static_cast<long long>(t.picks_dropped),
                static_cast<long long>(t.bytes_intra_node), static_cast<long long>(t.bytes_inter_node), rate);
  }
  const auto sat = trainer.router_saturation();
  if (!sat.empty()) {
    std::printf("moex-train: router saturation (%% of the step-%lld top-%lld selections of %lld evaluation tokens)\n",
                static_cast<long long>(sat.back().step),
                static_cast<long long>(trainer.eval_routes().back().ids.at(0).size() / static_cast<std::size_t>(to.eval_tokens)),
                static_cast<long long>(to.eval_tokens));
    std::printf("  step | %s\n", [&] {
      std::string h;
      for (std::size_t l = 0; l < sat[0].saturation.size(); ++l) h += (l ? " | " : "") + std::string("layer ") + std::to_string(l);
      return h;
    }().c_str());
    for (const auto& s : sat) {
      std::printf("%6lld", static_cast<long long>(s.step));
      for (double v : s.saturation) std::printf(" | %7.2f", v);
      std::printf("\n");
      if (json.is_open()) {
        nlohmann::json j{{"eval_step", s.step}, {"router_saturation", s.saturation}};
        json << j.dump() << "\n";
      }
    }
    json << std::flush;
  }
  if (!routes_path.empty()) {
    const auto& evals = trainer.eval_routes();
    std::vector<moex::NamedTensor> tensors;
    const std::int64_t N = to.eval_tokens;
    const std::int64_t H = static_cast<std::int64_t>(trainer.eval_inputs().size()) / std::max<std::int64_t>(N, 1);
    tensors.push_back({"eval_inputs", {N, H}, trainer.eval_inputs()});
    std::vector<float> steps;
    for (std::size_t i = 0; i < evals.size(); ++i) {
      steps.push_back(static_cast<float>(evals[i].step));
      for (std::size_t l = 0; l < evals[i].ids.size(); ++l) {
        const auto& ids = evals[i].ids[l];
        const auto K = static_cast<std::int64_t>(ids.size()) / std::max<std::int64_t>(N, 1);
        char name[64];
        std::snprintf(name, sizeof name, "eval%04zu.layer%zu.topk_ids", i, l);
        tensors.push_back({name, {N, K}, std::vector<float>(ids.begin(), ids.end())});  // exact below 2^24
      }
    }
    tensors.push_back({"eval_steps", {static_cast<std::int64_t>(steps.size())}, steps});
    moex::write_safetensors(routes_path, tensors);
    std::printf("moex-train: %zu router evaluations written to %s\n", evals.size(), routes_path.c_str());
  }
}

int train(moex::comm::MpiCommunicator& world, int argc, char** argv) {
  moex::tools::Options opt("moex-train",
                           "mpirun -np N moex-train [--config C.json] [--steps S] [--seed X] ...");
  opt.value("config", "", "Hugging Face DeepSeek config.json (default: built-in tiny V3-style model)")
      .value("steps", "200", "training steps, counted from the start of the run (a resumed run trains up to it)")
      .value("seed", "1", "seed of teacher, student and data")
      .value("tokens-per-rank", "256", "tokens each rank trains on per step")
      .value("layers", "", "override num_hidden_layers")
      .value("lr", "0.003", "AdamW learning rate")
      .value("weight-decay", "0", "AdamW decoupled weight decay")
      .value("bias-update-speed", "0",
             "aux-loss-free balancing: selection bias step gamma per step (0 = off; DeepSeek-V3 uses 0.001)")
      .value("aux-seq-alpha", "0", "sequence-wise balance loss coefficient (0 = off; DeepSeek-V3 uses 0.0001)")
      .value("aux-expert-alpha", "0", "expert-level balance loss coefficient (0 = off)")
      .value("seq-len", "0", "tokens per sequence for the sequence-wise loss (0 = a rank's whole shard)")
      .value("replicas", "off", "on: hot-expert replicas, planned from the load while training and migrated to")
      .value("spare-slots", "1", "with --replicas on: expert slots per rank = ceil(experts / ranks) + this")
      .value("rebalance-interval", "20", "with --replicas on: steps between replica plans")
      .value("rebalance-lag", "2", "with --replicas on: steps the planner runs beside training before its plan applies")
      .value("skew", "0", "Zipf exponent of a fixed skew of the student's router (experiments; 0 = none)")
      .value("save", "", "checkpoint folder (every rank must see it): DIR/step-N, DIR/latest; a final save at the end")
      .value("save-every", "0", "with --save: also a checkpoint every N steps (0 = only the final one)")
      .value("keep", "0", "with --save: keep only the newest K checkpoints (0 = all)")
      .value("resume", "", "continue from a checkpoint: its folder, or a --save folder (its latest)")
      .value("init-from", "", "start the student from a Hugging Face DeepSeek checkpoint (file, sharded folder or "
                              "index; FP8 dequantised): its MoE layers in order")
      .value("log-json", "", "write one JSON object per step to this file (rank 0)")
      .value("eval-tokens", "0", "router evaluation: this many fixed tokens through the student at the evaluation "
                                 "steps, for router change rate and saturation (0 = off)")
      .value("eval-every", "10", "with --eval-tokens: evaluate after step 1, every N-th step and the last")
      .value("eval-routes", "", "with --eval-tokens: write every evaluation's top-K expert ids and the "
                                "evaluation inputs to this safetensors file (rank 0)")
      .value("log-every", "1", "print every N-th step")
      .value("metrics-port", "", "serve Prometheus metrics at http://ADDR:PORT/metrics from rank 0 (0 = a free port, "
                                 "printed; default: nothing listens)")
      .value("metrics-bind", "127.0.0.1", "with --metrics-port: the address to listen on (e.g. 0.0.0.0 for every "
                                          "interface)")
      .value("timeout", "", "seconds any wait may take before the job aborts (default MOEX_TIMEOUT_S or 300)");
  moex::tools::add_schedule_options(opt);
  moex::tools::add_device_options(opt, "every MoE layer (norms, loss and AdamW stay on the host)", "fp32");
  if (!opt.parse(argc, argv)) return 0;
  const moex::tools::DeviceChoice device = moex::tools::device_options(opt, kWithCuda);
  if (opt.given("timeout")) moex::tools::apply_timeout(world, opt.number("timeout"));
  moex::MoeConfig config = opt.str("config").empty() ? tiny_v3() : moex::MoeConfig::from_file(opt.str("config"));
  if (opt.given("layers")) {
    config.num_hidden_layers = opt.integer("layers");
    config.validate();
  }
  moex::TrainOptions to;
  to.steps = opt.integer("steps");
  to.seed = static_cast<std::uint64_t>(opt.integer("seed"));
  to.tokens_per_rank = opt.integer("tokens-per-rank");
  to.adam.lr = static_cast<float>(opt.number("lr"));
  to.adam.weight_decay = static_cast<float>(opt.number("weight-decay"));
  // AdamW's step is lr * (m / sqrt(v) + wd * p), about lr per step: past 10 every weight is noise.
  if (!(opt.number("lr") > 0.0 && opt.number("lr") <= 10.0))
    throw moex::ConfigError("--lr = " + opt.str("lr") + ": expected a learning rate in (0, 10]");
  if (!(opt.number("weight-decay") >= 0.0 && opt.number("weight-decay") <= 10.0))
    throw moex::ConfigError("--weight-decay = " + opt.str("weight-decay") + ": expected a value in [0, 10]");
  to.bias_update_speed = static_cast<float>(opt.non_negative("bias-update-speed"));
  to.layer = moex::tools::schedule_options(opt);
  to.aux.seq_alpha = static_cast<float>(opt.non_negative("aux-seq-alpha"));
  to.aux.expert_alpha = static_cast<float>(opt.non_negative("aux-expert-alpha"));
  to.aux.seq_len = opt.integer("seq-len");
  to.replicas.enabled = opt.on_off("replicas");
  to.replicas.spare_slots = opt.integer("spare-slots");
  to.replicas.interval = opt.integer("rebalance-interval");
  to.replicas.lag = opt.integer("rebalance-lag");
  // Checked whether or not --replicas is on: a value out of range is a mistake either way.
  if (to.replicas.spare_slots < 1 || to.replicas.spare_slots > config.n_routed_experts || to.replicas.interval < 1 ||
      to.replicas.lag < 1)
    throw moex::ConfigError("--spare-slots = " + opt.str("spare-slots") + ", --rebalance-interval = " +
                            opt.str("rebalance-interval") + ", --rebalance-lag = " + opt.str("rebalance-lag") +
                            ": expected spare slots in [1, n_routed_experts = " +
                            std::to_string(config.n_routed_experts) + "] and an interval and a lag >= 1");
  to.skew = static_cast<float>(opt.non_negative("skew"));
  to.eval_tokens = opt.integer("eval-tokens");
  to.eval_every = opt.integer("eval-every");
  if (to.eval_tokens < 0 || to.eval_every < 1)
    throw moex::ConfigError("--eval-tokens = " + opt.str("eval-tokens") + ", --eval-every = " + opt.str("eval-every") +
                            ": expected --eval-tokens >= 0 (0 = off) and --eval-every >= 1");
  if (!opt.str("eval-routes").empty() && to.eval_tokens == 0)
    throw moex::ConfigError("--eval-routes needs --eval-tokens N");
  if (to.aux.seq_len < 0)
    throw moex::ConfigError("--seq-len = " + std::to_string(to.aux.seq_len) + ": must be >= 0 (0 = whole shard)");
  const std::int64_t every = opt.integer("log-every");
  if (every < 1) throw moex::ConfigError("--log-every = " + std::to_string(every) + ": must be >= 1");
  const bool with_aux = to.aux.enabled();
  const std::string save_dir = opt.str("save");
  const std::int64_t save_every = opt.integer("save-every"), keep = opt.integer("keep");
  if (save_every < 0 || keep < 0)
    throw moex::ConfigError("--save-every = " + std::to_string(save_every) + ", --keep = " + std::to_string(keep) +
                            ": each must be >= 0");
  if (save_dir.empty() && (save_every > 0 || keep > 0))
    throw moex::ConfigError("--save-every and --keep need --save DIR");
  {  // found now, not after hours of training at the first save
    std::error_code ec;
    const auto st = std::filesystem::status(save_dir, ec);
    if (!save_dir.empty() && std::filesystem::exists(st) && !std::filesystem::is_directory(st))
      throw moex::ConfigError("--save " + save_dir + " is not a folder; expected a folder for the checkpoints");
  }

  const bool serve_metrics = opt.given("metrics-port");
  if (!serve_metrics && opt.given("metrics-bind")) throw moex::ConfigError("--metrics-bind needs --metrics-port P");
  if (serve_metrics && !(opt.integer("metrics-port") >= 0 && opt.integer("metrics-port") <= 65535))
    throw moex::ConfigError("--metrics-port = " + opt.str("metrics-port") + ": expected a TCP port, 0 (any free one) to 65535");

  moex::Trainer trainer(config, world, to);
  const bool lead = world.rank() == 0;
  if (!opt.str("init-from").empty() && !opt.str("resume").empty())
    throw moex::ConfigError("--init-from and --resume: give one of them (a resumed run has its own weights)");
  if (!opt.str("init-from").empty()) {
    trainer.init_from(opt.str("init-from"));
    if (lead) std::printf("moex-train: student initialised from %s\n", opt.str("init-from").c_str());
  }
  if (!opt.str("resume").empty()) {
    const auto t0 = std::chrono::steady_clock::now();
    trainer.load_checkpoint(opt.str("resume"));
    const double load_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (trainer.steps_done() > to.steps)
      throw moex::ConfigError("--resume: the checkpoint is at step " + std::to_string(trainer.steps_done()) +
                              ", past --steps " + std::to_string(to.steps) + " (--steps counts from the run's start)");
    if (lead)
      std::printf("moex-train: resumed %s at step %lld (loaded in %.1f ms)\n", opt.str("resume").c_str(),
                  static_cast<long long>(trainer.steps_done()), load_ms);
  }
#ifdef MOEX_TOOLS_WITH_CUDA
  // --device cuda: the MoE layers' passes run on the GPU through a layer executor.
  std::unique_ptr<moex::comm::Communicator> device_comm;
  std::unique_ptr<moex::cuda::GpuLayerExecutor> executor;
  if (device.cuda) {
    std::string why;
    const int devices = moex::cuda::cuda_device_count(&why);
    if (devices == 0) throw moex::ConfigError("--device cuda: no CUDA device: " + why);
    MOEX_CUDA_CHECK(cudaSetDevice(world.rank() % devices));
    device_comm = moex::comm::make_device_communicator(device.comm, MPI_COMM_WORLD, world.default_timeout());
    moex::cuda::GpuLayerOptions go;
    go.precision = moex::cuda::precision_from_string(device.precision);
    executor = std::make_unique<moex::cuda::GpuLayerExecutor>(world, *device_comm, go);
    trainer.set_executor(executor.get());
    if (lead)
      std::printf("moex-train: MoE layers on the GPU (%d device(s), %s, %s exchange)\n", devices,
                  device.precision.c_str(), device.comm.c_str());
  }
#endif
  std::ofstream json;
  if (lead && !opt.str("log-json").empty()) {
    // A FIFO is fine (a reader streams the log) but must have its reader now: opening it blocks
    // until one comes, so a FIFO nobody reads is an error instead of a hang.
    struct stat st {};
    if (::stat(opt.str("log-json").c_str(), &st) == 0 && S_ISFIFO(st.st_mode)) {
      const int fd = ::open(opt.str("log-json").c_str(), O_WRONLY | O_NONBLOCK);
      if (fd < 0) throw moex::IoError("--log-json " + opt.str("log-json") + " is a FIFO that no process reads");
      ::close(fd);
    }
    json.open(opt.str("log-json"));
    if (!json) throw moex::IoError("cannot write --log-json file " + opt.str("log-json"));
  }
  if (lead) {
    std::printf("moex-train: %d ranks | hidden %lld | %lld routed experts (top-%lld, %s, %s) + %lld shared | "
                "%lld layers | %lld tokens/rank | BLAS %s\n",
                world.size(), static_cast<long long>(config.hidden_size),
                static_cast<long long>(config.n_routed_experts), static_cast<long long>(config.num_experts_per_tok),
                moex::to_string(config.scoring_func), moex::to_string(config.topk_method),
                static_cast<long long>(config.n_shared_experts), static_cast<long long>(config.num_hidden_layers),
                static_cast<long long>(to.tokens_per_rank), moex::blas::kernel_name().c_str());
    if (to.bias_update_speed > 0.0f || with_aux)
      std::printf("moex-train: balancing: bias update speed %g | aux seq alpha %g (seq len %lld) | aux expert "
                  "alpha %g\n",
                  static_cast<double>(to.bias_update_speed), static_cast<double>(to.aux.seq_alpha),
                  static_cast<long long>(to.aux.seq_len), static_cast<double>(to.aux.expert_alpha));
    if (to.replicas.enabled || to.skew > 0.0)
      std::printf("moex-train: replicas %s (spare slots %lld, plan every %lld steps, applied %lld steps later) | "
                  "router skew %g\n",
                  to.replicas.enabled ? "on" : "off", static_cast<long long>(to.replicas.spare_slots),
                  static_cast<long long>(to.replicas.interval), static_cast<long long>(to.replicas.lag), to.skew);
    std::printf("%s\n", moex::step_header(with_aux).c_str());
  }
  double first_loss = 0.0, last_loss = 0.0;
  std::int64_t dropped = 0;
  bool schedule_told = false;
  const std::int64_t first_step = trainer.steps_done();
  std::int64_t saved_at = -1;
  auto save = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string at = trainer.save_checkpoint(save_dir, keep);
    saved_at = trainer.steps_done();
    if (lead)
      std::printf("moex-train: step %lld: saved %s in %.1f ms\n", static_cast<long long>(saved_at), at.c_str(),
                  std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  };
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  moex::tools::TraceOption trace(opt, world);
  std::unique_ptr<moex::MetricsServer> metrics_server;
  std::unique_ptr<moex::TrainMetrics> metrics;
  if (serve_metrics) {
    metrics_server = moex::tools::start_metrics_server(world, opt.str("metrics-bind"),
                                                       static_cast<int>(opt.integer("metrics-port")));
    metrics = std::make_unique<moex::TrainMetrics>(world, to.tokens_per_rank, to.steps);
    if (lead) {
      const std::string& a = metrics_server->address();
      std::printf("moex-train: metrics at http://%s:%d/metrics\n",
                  (a.find(':') != std::string::npos ? "[" + a + "]" : a).c_str(), metrics_server->port());
      std::fflush(stdout);
    }
  }
  moex::StepRecord last_record;
  std::int64_t stop = 0;  // after each step: the largest signal number any rank received
  for (std::int64_t s = first_step; s < to.steps && stop == 0; ++s) {
    const moex::StepRecord r = trainer.step();
    stop = g_stop_signal;
    world.allreduce_max(&stop, 1, moex::comm::DataType::kInt64, "stop request")->wait();
    if (stop != 0 && lead)
      std::printf("moex-train: signal %lld: stopping after step %lld%s\n", static_cast<long long>(stop),
                  static_cast<long long>(r.step), save_dir.empty() ? " (no --save: nothing is kept)" : "");
    if (save_every > 0 && r.step % save_every == 0) save();
    if (metrics) {
      std::string text = metrics->collect(r, trainer.student());
      if (lead) metrics_server->publish(std::move(text));
    }
    // --chunks auto: say once what the first layer chose (every layer chooses alike, from its own
    // measured passes; the losses depend on the choice only through fp32 rounding).
    const auto& layers = trainer.student().layers();
    if (lead && !schedule_told && !layers.empty() && layers[0]->schedule_choice().decided) {
      const moex::ScheduleChoice& c = layers[0]->schedule_choice();
      std::printf("moex-train: step %lld: --chunks auto chose %s for %s (predicted %.1f ms per layer pass)\n",
                  static_cast<long long>(r.step), c.schedule.describe().c_str(), layers[0]->name().c_str(),
                  c.predicted_ms[c.chosen]);
      schedule_told = true;
    }
    dropped += r.picks_dropped;
    if (s == first_step) first_loss = r.loss;
    last_loss = r.loss;
    last_record = r;
    if (!lead) continue;
    if (r.step % every == 0 || r.step == 1 || r.step == to.steps) {
      std::printf("%s\n", moex::format_step(r, with_aux).c_str());
      std::fflush(stdout);
    }
    // One flushed line per step: a watcher (or a rank that dies later) sees every finished step.
    if (json.is_open()) json << moex::step_json(r) << "\n" << std::flush;
    if (r.migrated_slots > 0)
      std::printf("moex-train: step %lld: new replica layout, %lld expert slots migrated between ranks\n",
                  static_cast<long long>(r.step), static_cast<long long>(r.migrated_slots));
  }
  if (!save_dir.empty() && saved_at != trainer.steps_done()) save();
  if (lead && last_record.step > 0) report_router(trainer, last_record, to, json, opt.str("eval-routes"));
  trace.finish();
  if (lead && to.steps > first_step)
    std::printf("moex-train: loss %.6e -> %.6e (%.1f%% of the first step)\n", first_loss, last_loss,
                100.0 * last_loss / first_loss);
  if (lead && to.layer.capacity_factor > 0.0) {
    const double picks = static_cast<double>(trainer.steps_done() - first_step) * static_cast<double>(to.tokens_per_rank) * world.size() *
                         static_cast<double>(config.num_experts_per_tok * config.num_hidden_layers);
    std::printf("moex-train: capacity factor %g: %lld of %.0f picks dropped (%.2f%%)\n", to.layer.capacity_factor,
                static_cast<long long>(dropped), picks, picks > 0 ? 100.0 * static_cast<double>(dropped) / picks : 0.0);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return moex::tools::run_mpi_tool("moex-train", argc, argv,
                                   [&](moex::comm::MpiCommunicator& world) { return train(world, argc, argv); });
}
