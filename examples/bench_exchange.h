// moex-bench exchange's row buffers: the layer's moves (layer::RowMoves) on host memory over MPI,
// or on a GPU over a device communicator (bench_exchange_gpu.cpp, only with CUDA).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/mpi/mpi_communicator.h"
#include "runtime/layer/pass_plan.h"
#include "runtime/layer/row_exchange.h"

namespace moex::tools {

/// The buffers of one rank's exchange and the moves between them, fp32 rows `hidden` wide.
class BenchRows : public layer::RowMoves {
 public:
  /// Sizes every buffer for `plan` (grows only) and makes its index arrays readable by the moves.
  virtual void prepare(const layer::PassPlan& plan, std::int64_t tokens) = 0;
  /// kOriginSend = the plan's send rows of `x` ([tokens * hidden] on the host).
  virtual void load(const layer::PassPlan& plan, const std::vector<float>& x) = 0;
  /// kRecv's first `rows` rows set to -1 (so that stale rows cannot pass the check).
  virtual void clear_recv(std::int64_t rows) = 0;
  /// kRet = kRecv for the first `rows` rows (what an identity expert would return).
  virtual void echo(std::int64_t rows) = 0;
  /// Returns once every move issued so far has finished.
  virtual void finish() = 0;
  /// The first `elems` floats of buffer `b`, on the host.
  virtual void read(layer::Buf b, std::int64_t elems, std::vector<float>& out) = 0;
  /// e.g. "host buffers over MPI"
  virtual std::string describe() const = 0;
  /// The benchmark moves no routing-weight gradients (InternalError).
  void gather_values(std::int64_t, const std::vector<std::int64_t>&, std::int64_t, layer::Buf, layer::Buf,
                     std::int64_t) final;
  /// Nor runs local-first's own-row copies (InternalError).
  void copy(std::int64_t, layer::Buf, std::int64_t, layer::Buf, std::int64_t, bool) final;
  double remote_bytes = 0.0;  ///< bytes this rank sent to other ranks since the caller zeroed it
};

/// The elements every row buffer needs for `plan` and `tokens` (rows `hidden` wide; kPicks `topk`),
/// indexed by layer::Buf: what both backends size their buffers to.
std::vector<std::int64_t> buffer_elems(const layer::PassPlan& plan, std::int64_t tokens, std::int64_t hidden,
                                       std::int64_t topk);

/// Host buffers; the exchanges are layer::exchange_chunk over `comm`.
std::unique_ptr<BenchRows> make_host_rows(comm::Communicator& comm, std::int64_t hidden, std::int64_t topk);

#ifdef MOEX_TOOLS_WITH_CUDA
/// Device buffers on GPU rank % devices; the exchanges over a `kind` ("staged" or "nccl") device
/// communicator made from `world` (a collective). Null, with the reason in `why`, where there is no
/// CUDA device.
std::unique_ptr<BenchRows> make_device_rows(comm::MpiCommunicator& world, const std::string& kind, std::int64_t hidden,
                                            std::int64_t topk, std::string* why);
#endif

}  // namespace moex::tools
