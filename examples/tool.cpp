// Option parsing and the MPI main wrapper of the moex tools.
#include "examples/tool.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <new>
#include <stdexcept>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <sstream>
#include <thread>
#include <vector>

#include "base/error.h"
#include "runtime/trace.h"
#include "runtime/blas.h"
#include "runtime/parallel.h"

namespace moex::tools {

Options::Options(std::string program, std::string synopsis)
    : program_(std::move(program)), synopsis_(std::move(synopsis)) {
  flag("help", "print this help");
}

Options& Options::value(const std::string& name, const std::string& fallback, const std::string& help) {
  order_.push_back(name);
  specs_[name] = {fallback, help, false};
  return *this;
}

Options& Options::flag(const std::string& name, const std::string& help) {
  order_.push_back(name);
  specs_[name] = {"", help, true};
  return *this;
}

bool Options::parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0)
      throw ConfigError("unexpected argument '" + arg + "'; options start with --\n" + usage());
    std::string name = arg.substr(2), val;
    const auto eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      val = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    const auto it = specs_.find(name);
    if (it == specs_.end()) throw ConfigError("unknown option --" + name + "\n" + usage());
    if (it->second.is_flag) {
      if (inline_value) throw ConfigError("option --" + name + " takes no value");
      values_.insert_or_assign(name, std::string(1, '1'));
    } else {
      if (!inline_value) {
        if (i + 1 >= argc) throw ConfigError("option --" + name + " needs a value (" + it->second.help + ")");
        val = argv[++i];
      }
      values_[name] = val;
    }
  }
  if (on("help")) {
    if (process_rank() <= 0) std::fputs(usage().c_str(), stdout);
    return false;
  }
  return true;
}

const std::string& Options::str(const std::string& name) const {
  const auto v = values_.find(name);
  if (v != values_.end()) return v->second;
  const auto s = specs_.find(name);
  if (s == specs_.end()) throw InternalError("option --" + name + " was never declared");
  return s->second.fallback;
}

std::int64_t Options::integer(const std::string& name) const {
  const std::string& s = str(name);
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno == ERANGE)
    throw ConfigError("option --" + name + " = '" + s + "': expected an integer");
  return v;
}

double Options::number(const std::string& name) const {
  const std::string& s = str(name);
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || !std::isfinite(v))
    throw ConfigError("option --" + name + " = '" + s + "': expected a finite number");
  return v;
}

bool Options::on(const std::string& name) const { return values_.count(name) != 0 && str(name) == "1"; }
bool Options::given(const std::string& name) const { return values_.count(name) != 0; }

bool Options::on_off(const std::string& name) const {
  const std::string& v = str(name);
  if (v == "on") return true;
  if (v == "off") return false;
  throw ConfigError("--" + name + " = '" + v + "': expected on or off");
}

double Options::non_negative(const std::string& name) const {
  const double v = number(name);
  if (!std::isfinite(v) || v < 0.0) throw ConfigError("--" + name + " = " + str(name) + ": must be a finite number >= 0");
  return v;
}

Options& add_schedule_options(Options& opt) {
  return opt.value("chunks", "auto",
                   "auto (measure two passes, then a cost model picks the schedule), or C: pipeline chunks per layer pass "
                   "(chunk i+1's exchange travels while chunk i computes)")
      .value("local-first", "off",
             "with --chunks C: on = this rank's own rows skip the exchange and compute first while the rest travel; "
             "split = in the forward half of them first, the other half while the results travel back")
      .value("overlap", "on", "on: exchanges on a communication thread beside compute; off: serialised")
      .value("exchange", "flat", "flat, or hierarchical (once per destination node, then forwarded inside it)")
      .value("deterministic", "off", "on: row-wise expert GEMMs, so results are bitwise the same for every --chunks")
      .value("capacity-factor", "0",
             "0 = dropless; > 0: per-rank expert capacity ceil(cf * tokens * K / E), lowest-weight picks over it "
             "dropped and counted")
      .value("trace", "", "write a timeline of every rank's stages (Chrome trace / Perfetto JSON) to this file");
}

TraceOption::TraceOption(const Options& opt, comm::Communicator& world) : world_(world), path_(opt.str("trace")) {
  if (!path_.empty()) trace::start(world_);
}

void TraceOption::finish() {
  if (path_.empty()) return;
  const long long spans = trace::write(world_, path_);
  if (world_.rank() == 0)
    std::printf("%s: trace of %lld spans (rank 0) written to %s (open in https://ui.perfetto.dev or chrome://tracing)\n",
                "moex", spans, path_.c_str());
  path_.clear();
}

std::unique_ptr<MetricsServer> start_metrics_server(comm::Communicator& world, const std::string& bind, int port) {
  std::unique_ptr<MetricsServer> server;
  std::string why;
  if (world.rank() == 0) {
    try {
      MetricsServerOptions o;
      o.bind = bind;
      o.port = port;
      server = std::make_unique<MetricsServer>(o);
    } catch (const ConfigError& e) {
      why = e.message();
    }
  }
  // Every rank learns whether rank 0 listens, and why not: nobody trains on while rank 0 stops.
  std::int64_t size = static_cast<std::int64_t>(why.size());
  world.broadcast(&size, 1, comm::DataType::kInt64, 0, "metrics endpoint status")->wait();
  if (size == 0) return server;
  why.resize(static_cast<std::size_t>(size));
  world.broadcast(why.data(), size, comm::DataType::kByte, 0, "metrics endpoint error")->wait();
  throw ConfigError(world.rank() == 0 ? why : "rank 0: " + why);
}

LayerOptions schedule_options(const Options& opt) {
  LayerOptions lo;
  if (opt.str("chunks") == "auto") {
    lo.chunks = 0;
  } else {
    const std::int64_t chunks = opt.integer("chunks");
    if (chunks < 1 || chunks > 1 << 20) throw ConfigError("--chunks = " + opt.str("chunks") + ": expected auto or 1..2^20");
    lo.chunks = static_cast<int>(chunks);
  }
  const std::string& own = opt.str("local-first");
  if (own != "on" && own != "off" && own != "split")
    throw ConfigError("--local-first = '" + own + "': expected on, off or split");
  lo.local_first = own != "off";
  lo.local_split = own == "split";
  lo.overlap = opt.on_off("overlap");
  lo.exchange = exchange_from_string(opt.str("exchange"));
  lo.deterministic = opt.on_off("deterministic");
  lo.capacity_factor = opt.non_negative("capacity-factor");
  return lo;
}

Options& add_device_options(Options& opt, const std::string& what, const std::string& precision) {
  return opt
      .value("device", "cpu",
             "cpu, or cuda: " + what + " runs on the GPU (GpuMoELayer, expert-parallel over --device-comm; rank r uses "
             "GPU r % devices)")
      .value("device-comm", "staged", "with --device cuda: staged (through host memory over MPI; ranks may share a "
                                      "GPU) or nccl (one GPU per rank)")
      .value("precision", precision, "with --device cuda: fp32, or bf16 (bf16 expert weights and activations, fp32 "
                                     "accumulation)");
}

DeviceChoice device_options(const Options& opt, bool built_with_cuda) {
  DeviceChoice d;
  const std::string device = opt.str("device");
  if (device != "cpu" && device != "cuda") throw ConfigError("--device = '" + device + "': expected cpu or cuda");
  d.cuda = device == "cuda";
  d.comm = opt.str("device-comm");
  if (d.comm != "staged" && d.comm != "nccl")
    throw ConfigError("--device-comm = '" + d.comm + "': expected staged or nccl");
  d.precision = opt.str("precision");
  if (d.precision != "fp32" && d.precision != "bf16")
    throw ConfigError("--precision = '" + d.precision + "': expected fp32 or bf16");
  if (d.cuda && !built_with_cuda)
    throw ConfigError("--device cuda: this program was built without CUDA (configure with MOEX_WITH_CUDA=ON)");
  return d;
}

std::string Options::usage() const {
  std::ostringstream os;
  os << "usage: " << synopsis_ << "\noptions:\n";
  for (const auto& name : order_) {
    const Spec& s = specs_.at(name);
    std::string left = "  --" + name + (s.is_flag ? "" : " V");
    os << left << std::string(left.size() < 26 ? 26 - left.size() : 1, ' ') << s.help;
    if (!s.is_flag && !s.fallback.empty()) os << " (default " << s.fallback << ")";
    os << "\n";
  }
  return os.str();
}

void apply_timeout(comm::MpiCommunicator& world, double seconds) {
  // The same bounds and rounding as MOEX_TIMEOUT_S (comm::timeout_from_seconds).
  const auto timeout = comm::timeout_from_seconds(seconds);
  if (!timeout) {
    char shown[64];
    std::snprintf(shown, sizeof shown, "%g", seconds);
    throw ConfigError(std::string("--timeout = ") + shown + ": expected a number of seconds in (0, 1e7]");
  }
  world.set_default_timeout(*timeout);
}

int run_mpi_tool(const char* program, int argc, char** argv,
                 const std::function<int(comm::MpiCommunicator& world)>& body) {
  blas::select_fast_kernels(argv);
  int code = 0;
  try {
    comm::MpiRuntime mpi(&argc, &argv);
    comm::MpiCommunicator world(MPI_COMM_WORLD);
    try {
      world.set_default_timeout(comm::timeout_from_env(std::chrono::seconds(300)));
      if (!std::getenv("OPENBLAS_NUM_THREADS")) {
        // Ranks on this node: Open MPI's mpirun says; under another launcher (srun) MPI's own
        // shared-memory split counts them (every rank of a job has the same launcher, so all ranks
        // take the same branch of this collective).
        int ranks_here = 1;
        if (const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) {
          ranks_here = std::max(1, std::atoi(local));
        } else {
          const std::vector<int> nodes = world.node_ids();
          ranks_here = std::max<int>(
              1, static_cast<int>(std::count(nodes.begin(), nodes.end(), nodes[static_cast<std::size_t>(world.rank())])));
        }
        const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
        blas::set_num_threads(std::max(1, cores / ranks_here));
        set_parallel_threads(std::max(1, cores / ranks_here));
      }
      code = body(world);
    } catch (const std::exception& e) {
      const bool memory = dynamic_cast<const std::bad_alloc*>(&e) != nullptr ||
                          dynamic_cast<const std::length_error*>(&e) != nullptr;
      if (memory)
        std::fprintf(stderr, "%s: error: [rank %d] out of memory (%s): the sizes asked for (the config's hidden_size, "
                             "moe_intermediate_size, n_routed_experts, num_hidden_layers; --tokens-per-rank) need more "
                             "memory than this rank can have\n", program, world.rank(), e.what());
      else if (const auto* fe = dynamic_cast<const std::filesystem::filesystem_error*>(&e))
        std::fprintf(stderr, "%s: error: [rank %d] %s: %s (a path given to %s)\n", program, world.rank(),
                     fe->path1().c_str(), fe->code().message().c_str(), program);
      else
        std::fprintf(stderr, "%s: error: %s\n", program, e.what());
      std::fflush(stderr);
      if (world.size() > 1) {
        // Ranks that hit the same bad input report it too before the abort ends them.
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        MPI_Abort(MPI_COMM_WORLD, 2);
      }
      return 2;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 2;
  }
  return code;
}

}  // namespace moex::tools
