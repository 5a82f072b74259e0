// Shared scaffolding of the moex command-line tools: option parsing and the MPI main wrapper.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/mpi/mpi_communicator.h"
#include "runtime/metrics_server.h"
#include "runtime/moe_layer.h"

namespace moex::tools {

/// `--name value` and `--flag` options with defaults and help text. Unknown options, missing
/// values and malformed numbers are ConfigErrors naming the option.
class Options {
 public:
  Options(std::string program, std::string synopsis);
  Options& value(const std::string& name, const std::string& fallback, const std::string& help);
  Options& flag(const std::string& name, const std::string& help);
  /// Parses argv[first..]. Returns false when --help was given (usage already printed on rank 0).
  bool parse(int argc, char** argv, int first = 1);

  const std::string& str(const std::string& name) const;
  std::int64_t integer(const std::string& name) const;
  double number(const std::string& name) const;
  bool on(const std::string& name) const;
  /// The value of an option that takes "on" or "off"; ConfigError naming the option otherwise.
  bool on_off(const std::string& name) const;
  /// A number that must be finite and >= 0; ConfigError naming the option otherwise.
  double non_negative(const std::string& name) const;
  /// True when the option was given on the command line (not just defaulted).
  bool given(const std::string& name) const;
  std::string usage() const;

 private:
  struct Spec {
    std::string fallback, help;
    bool is_flag = false;
  };
  std::string program_, synopsis_;
  std::vector<std::string> order_;
  std::map<std::string, Spec> specs_;
  std::map<std::string, std::string> values_;
};

/// Runs `body` as an MPI program: picks the fast BLAS kernels, initialises MPI, creates the world
/// communicator (deadline from MOEX_TIMEOUT_S, else 300 s), sizes BLAS threads to the cores per
/// local rank, and turns any exception into a message "PROGRAM: error: ..." on stderr and a
/// non-zero exit that ends every rank (MPI_Abort) instead of leaving peers waiting.
int run_mpi_tool(const char* program, int argc, char** argv,
                 const std::function<int(comm::MpiCommunicator& world)>& body);

/// Registers the layer schedule options every tool shares: --chunks, --overlap, --exchange,
/// --deterministic and --capacity-factor.
Options& add_schedule_options(Options& opt);
/// Reads them back (ConfigError naming the option for a bad value).
LayerOptions schedule_options(const Options& opt);

/// `--trace FILE` (registered with the schedule options): with it, the timeline of every rank's
/// stages starts here (a collective) and finish() writes it as one Chrome trace / Perfetto JSON file.
class TraceOption {
 public:
  TraceOption(const Options& opt, comm::Communicator& world);
  /// Writes the trace once (a collective) and says so on rank 0; nothing without --trace.
  void finish();

 private:
  comm::Communicator& world_;
  std::string path_;
};

/// Where the MoE layers run (--device cpu|cuda), and on the GPU over what (--device-comm staged|nccl)
/// in which arithmetic (--precision fp32|bf16).
struct DeviceChoice {
  bool cuda = false;
  std::string comm = "staged";
  std::string precision = "fp32";
};
/// Registers --device, --device-comm and --precision (default `precision`) for `what` (e.g. "the pass").
Options& add_device_options(Options& opt, const std::string& what, const std::string& precision);
/// Reads them back: ConfigError for a bad value, or for --device cuda in a build without CUDA
/// (`built_with_cuda`: the tool's own MOEX_TOOLS_WITH_CUDA).
DeviceChoice device_options(const Options& opt, bool built_with_cuda);

/// Starts the Prometheus endpoint on rank 0 (a collective): null on the other ranks. When rank 0
/// cannot listen (address, port in use), every rank throws ConfigError with rank 0's reason.
std::unique_ptr<MetricsServer> start_metrics_server(comm::Communicator& world, const std::string& bind, int port);

/// Sets the world communicator's deadline from a `--timeout` seconds value (> 0).
void apply_timeout(comm::MpiCommunicator& world, double seconds);

}  // namespace moex::tools
