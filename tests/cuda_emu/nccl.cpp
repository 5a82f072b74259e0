// NCCL, emulated over MPI for the CUDA emulator (see emu.h): the calls NcclCommunicator makes, with
// NCCL's semantics where the tests can see them.
//   - Non-blocking communicators: ncclCommInitRankConfig returns ncclInProgress and
//     ncclCommGetAsyncError polls the MPI_Comm_idup (and the rank map's MPI_Iallgather) behind it,
//     so a missing peer shows as a communicator that never leaves ncclInProgress.
//   - Groups: the calls between ncclGroupStart and ncclGroupEnd become one op on their stream.
//     When the op runs it posts every transfer as non-blocking MPI point-to-point messages; it is
//     done (cudaEventQuery turns ready) once they all completed. An op is posted as soon as its
//     stream has nothing older left to run, so that peers never wait on a rank that is not polling.
//   - Collectives (all-reduce, all-gather, broadcast) are point-to-point underneath; all-reduce sums
//     in rank order.
//   - ncclCommAbort cancels what is outstanding; the stream's op then completes.
// Only communicators over all ranks of MPI_COMM_WORLD are supported (any rank order).
#include <mpi.h>
#include <nccl.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cuda_emu/emu.h"

struct ncclComm {
  int nranks = 0;
  int rank = 0;
  MPI_Comm mpi = MPI_COMM_NULL;
  MPI_Request init_request = MPI_REQUEST_NULL;
  int init_stage = 0;           // 0: duplicating, 1: exchanging ranks, 2: ready
  std::vector<int> world_of;    // NCCL rank -> rank in `mpi`
  std::vector<int> gathered;    // NCCL rank of each rank of `mpi`
  bool aborted = false;
  std::string last_error;
  // Outstanding transfers of this communicator (cancelled by ncclCommAbort).
  std::vector<std::shared_ptr<std::vector<MPI_Request>>> live;
};

namespace moex_emu {
namespace {

constexpr int kTag = 0x6d78;  // one tag: MPI keeps each pair's messages in order, as NCCL needs

std::size_t nccl_size(ncclDataType_t t) {
  switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
  }
}

double load(const void* p, std::size_t i, ncclDataType_t t) {
  switch (t) {
    case ncclInt8: return static_cast<const std::int8_t*>(p)[i];
    case ncclUint8: return static_cast<const std::uint8_t*>(p)[i];
    case ncclInt32: return static_cast<const std::int32_t*>(p)[i];
    case ncclUint32: return static_cast<const std::uint32_t*>(p)[i];
    case ncclInt64: return static_cast<double>(static_cast<const std::int64_t*>(p)[i]);
    case ncclUint64: return static_cast<double>(static_cast<const std::uint64_t*>(p)[i]);
    case ncclFloat32: return static_cast<const float*>(p)[i];
    case ncclFloat64: return static_cast<const double*>(p)[i];
    case ncclBfloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return 0.0;
  }
}

/// Sums / maxima in the element type's own arithmetic for floats (fp32 adds, bf16 rounds after each
/// add as a bf16 reduction does); integers exactly.
void reduce_into(void* acc, const void* in, std::size_t n, ncclDataType_t t, ncclRedOp_t op) {
  auto combine = [op](auto a, auto b) { return op == ncclMax ? (a > b ? a : b) : a + b; };
  for (std::size_t i = 0; i < n; ++i) {
    switch (t) {
      case ncclFloat32: {
        auto* a = static_cast<float*>(acc);
        a[i] = combine(a[i], static_cast<const float*>(in)[i]);
        break;
      }
      case ncclFloat64: {
        auto* a = static_cast<double*>(acc);
        a[i] = combine(a[i], static_cast<const double*>(in)[i]);
        break;
      }
      case ncclBfloat16: {
        auto* a = static_cast<__nv_bfloat16*>(acc);
        const float b = __bfloat162float(static_cast<const __nv_bfloat16*>(in)[i]);
        a[i] = __float2bfloat16_rn(combine(__bfloat162float(a[i]), b));
        break;
      }
      case ncclInt32: {
        auto* a = static_cast<std::int32_t*>(acc);
        a[i] = combine(a[i], static_cast<const std::int32_t*>(in)[i]);
        break;
      }
      case ncclInt64: {
        auto* a = static_cast<std::int64_t*>(acc);
        a[i] = combine(a[i], static_cast<const std::int64_t*>(in)[i]);
        break;
      }
      default: {  // the others are not used by moex; reduce through double
        const double v = combine(load(acc, i, t), load(in, i, t));
        if (t == ncclUint8) static_cast<std::uint8_t*>(acc)[i] = static_cast<std::uint8_t>(v);
        if (t == ncclInt8) static_cast<std::int8_t*>(acc)[i] = static_cast<std::int8_t>(v);
        if (t == ncclUint32) static_cast<std::uint32_t*>(acc)[i] = static_cast<std::uint32_t>(v);
        if (t == ncclUint64) static_cast<std::uint64_t*>(acc)[i] = static_cast<std::uint64_t>(v);
        break;
      }
    }
  }
}

/// One call inside a group.
struct Call {
  enum Kind { kSend, kRecv, kAllReduce, kAllGather, kBroadcast } kind;
  const void* send;
  void* recv;
  std::size_t count;
  ncclDataType_t type;
  ncclRedOp_t op;
  int peer;  // send / recv peer, broadcast root
  ncclComm_t comm;
  cudaStream_t stream;
};

struct GroupState {
  int depth = 0;
  std::vector<Call> calls;
  ncclResult_t error = ncclSuccess;
};
thread_local GroupState g_group;

ncclResult_t reject(ncclComm_t comm, ncclResult_t rc, const std::string& message) {
  std::fprintf(stderr, "moex CUDA emulator (NCCL): %s\n", message.c_str());
  if (comm) comm->last_error = message;
  return rc;
}

bool ready(ncclComm_t comm) { return comm && !comm->aborted && comm->init_stage == 2; }

/// The op of one group on its stream: posts the transfers on the first poll, then tests them.
struct GroupOp {
  std::vector<Call> calls;
  std::shared_ptr<std::vector<MPI_Request>> requests;
  std::vector<std::vector<unsigned char>> scratch;  // per call: what collectives receive
  bool posted = false;

  void post() {
    requests = std::make_shared<std::vector<MPI_Request>>();
    scratch.resize(calls.size());
    for (std::size_t c = 0; c < calls.size(); ++c) {
      Call& k = calls[c];
      ncclComm_t m = k.comm;
      const std::size_t es = nccl_size(k.type), bytes = k.count * es;
      const int n = m->nranks;
      auto isend = [&](const void* p, std::size_t b, int to) {
        requests->emplace_back();
        MPI_Isend(p, static_cast<int>(b), MPI_BYTE, m->world_of[static_cast<std::size_t>(to)], kTag, m->mpi,
                  &requests->back());
      };
      auto irecv = [&](void* p, std::size_t b, int from) {
        requests->emplace_back();
        MPI_Irecv(p, static_cast<int>(b), MPI_BYTE, m->world_of[static_cast<std::size_t>(from)], kTag, m->mpi,
                  &requests->back());
      };
      switch (k.kind) {
        case Call::kSend: isend(k.send, bytes, k.peer); break;
        case Call::kRecv: irecv(k.recv, bytes, k.peer); break;
        case Call::kAllReduce:
        case Call::kAllGather: {
          // Everybody's block to everybody (collected in rank order in `scratch`).
          scratch[c].assign(bytes * static_cast<std::size_t>(n), 0);
          std::memcpy(scratch[c].data() + bytes * static_cast<std::size_t>(m->rank), k.send, bytes);
          for (int p = 0; p < n; ++p)
            if (p != m->rank) {
              isend(k.send, bytes, p);
              irecv(scratch[c].data() + bytes * static_cast<std::size_t>(p), bytes, p);
            }
          break;
        }
        case Call::kBroadcast:
          if (m->rank == k.peer) {
            for (int p = 0; p < n; ++p)
              if (p != m->rank) isend(k.send, bytes, p);
          } else {
            irecv(k.recv, bytes, k.peer);
          }
          break;
      }
    }
    for (const Call& k : calls) k.comm->live.push_back(requests);
  }

  void finish() {
    for (std::size_t c = 0; c < calls.size(); ++c) {
      Call& k = calls[c];
      const std::size_t es = nccl_size(k.type), bytes = k.count * es;
      if (k.kind == Call::kAllGather) {
        std::memcpy(k.recv, scratch[c].data(), scratch[c].size());
      } else if (k.kind == Call::kAllReduce) {
        std::vector<unsigned char> acc(scratch[c].begin(), scratch[c].begin() + static_cast<std::ptrdiff_t>(bytes));
        for (int p = 1; p < k.comm->nranks; ++p)
          reduce_into(acc.data(), scratch[c].data() + bytes * static_cast<std::size_t>(p), k.count, k.type, k.op);
        std::memcpy(k.recv, acc.data(), bytes);
      } else if (k.kind == Call::kBroadcast && k.comm->rank == k.peer && k.recv != k.send) {
        std::memcpy(k.recv, k.send, bytes);
      }
    }
  }

  bool poll() {
    for (const Call& k : calls)
      if (k.comm->aborted) return true;  // abandoned: the buffers keep whatever arrived
    if (!posted) {
      post();
      posted = true;
    }
    int flag = 0;
    MPI_Testall(static_cast<int>(requests->size()), requests->data(), &flag, MPI_STATUSES_IGNORE);
    if (!flag) return false;
    finish();
    return true;
  }
};

ncclResult_t add(Call call, const char* api) {
  if (!ready(call.comm))
    return reject(call.comm, ncclInvalidUsage, std::string(api) + ": communicator not initialised or aborted");
  if (nccl_size(call.type) == 0) return reject(call.comm, ncclInvalidArgument, std::string(api) + ": bad data type");
  if ((call.kind == Call::kSend || call.kind == Call::kRecv || call.kind == Call::kBroadcast) &&
      (call.peer < 0 || call.peer >= call.comm->nranks))
    return reject(call.comm, ncclInvalidArgument, std::string(api) + ": peer / root " + std::to_string(call.peer) +
                                                      " outside [0, " + std::to_string(call.comm->nranks) + ")");
  const std::size_t bytes = call.count * nccl_size(call.type);
  const std::size_t recv_bytes =
      call.kind == Call::kAllGather ? bytes * static_cast<std::size_t>(call.comm->nranks) : bytes;
  bool is_device = false;
  std::string why;
  const bool sends = call.kind != Call::kRecv && !(call.kind == Call::kBroadcast && call.comm->rank != call.peer);
  const bool receives = call.kind != Call::kSend;
  if (bytes > 0 && sends && !device_range_ok(call.send, bytes, &is_device, &why))
    return reject(call.comm, ncclInvalidArgument,
                  std::string(api) + ": send buffer: " + (is_device ? why : "not device memory"));
  if (bytes > 0 && receives && !device_range_ok(call.recv, recv_bytes, &is_device, &why))
    return reject(call.comm, ncclInvalidArgument,
                  std::string(api) + ": receive buffer: " + (is_device ? why : "not device memory"));
  g_group.calls.push_back(call);
  if (g_group.depth == 0) return ncclGroupEnd();  // a lone call is a group of one
  return ncclSuccess;
}

}  // namespace
}  // namespace moex_emu

using moex_emu::Call;

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t comm) { return comm ? comm->last_error.c_str() : ""; }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::memset(id, 0, sizeof *id);
  std::snprintf(id->internal, sizeof id->internal, "moex-emulated-nccl");
  return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* out, int nranks, ncclUniqueId /*id*/, int rank, ncclConfig_t* config) {
  std::lock_guard<std::recursive_mutex> lock(moex_emu::api_mutex());
  *out = nullptr;
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (nranks != world || rank < 0 || rank >= nranks)
    return moex_emu::reject(nullptr, ncclInvalidArgument,
                            "ncclCommInitRankConfig: rank " + std::to_string(rank) + " of " + std::to_string(nranks) +
                                ": the emulator needs a communicator over all " + std::to_string(world) + " MPI ranks");
  auto* comm = new ncclComm();
  comm->nranks = nranks;
  comm->rank = rank;
  MPI_Comm_idup(MPI_COMM_WORLD, &comm->mpi, &comm->init_request);
  *out = comm;
  if (config && config->blocking == 0) return ncclInProgress;
  ncclResult_t state = ncclInProgress;
  while (state == ncclInProgress) ncclCommGetAsyncError(comm, &state);
  return state;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  std::lock_guard<std::recursive_mutex> lock(moex_emu::api_mutex());
  if (!comm) return ncclInvalidArgument;
  if (comm->aborted) {
    *state = ncclInvalidUsage;
    return ncclSuccess;
  }
  if (comm->init_stage < 2) {
    int flag = 0;
    MPI_Test(&comm->init_request, &flag, MPI_STATUS_IGNORE);
    if (flag && comm->init_stage == 0) {
      comm->gathered.assign(static_cast<std::size_t>(comm->nranks), -1);
      MPI_Iallgather(&comm->rank, 1, MPI_INT, comm->gathered.data(), 1, MPI_INT, comm->mpi, &comm->init_request);
      comm->init_stage = 1;
    } else if (flag && comm->init_stage == 1) {
      comm->world_of.assign(static_cast<std::size_t>(comm->nranks), -1);
      for (int w = 0; w < comm->nranks; ++w) {
        const int r = comm->gathered[static_cast<std::size_t>(w)];
        if (r < 0 || r >= comm->nranks || comm->world_of[static_cast<std::size_t>(r)] != -1) {
          comm->last_error = "ncclCommInitRankConfig: the ranks do not form a permutation of 0..nranks-1";
          *state = ncclInvalidUsage;
          return ncclSuccess;
        }
        comm->world_of[static_cast<std::size_t>(r)] = w;
      }
      comm->init_stage = 2;
    }
  }
  *state = comm->init_stage == 2 ? ncclSuccess : ncclInProgress;
  return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) { return comm ? ncclSuccess : ncclInvalidArgument; }

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return ncclInvalidArgument;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm->mpi != MPI_COMM_NULL && comm->init_stage == 2) MPI_Comm_free(&comm->mpi);
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  std::lock_guard<std::recursive_mutex> lock(moex_emu::api_mutex());
  if (!comm) return ncclSuccess;
  comm->aborted = true;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    for (auto& reqs : comm->live)
      for (MPI_Request& r : *reqs)
        if (r != MPI_REQUEST_NULL) {
          MPI_Cancel(&r);
          MPI_Request_free(&r);
        }
  }
  comm->live.clear();
  // The handle stays allocated (ops already queued still look at `aborted`); NCCL frees it, the
  // emulator leaks it, which a test process can afford.
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  ++moex_emu::g_group.depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  std::lock_guard<std::recursive_mutex> lock(moex_emu::api_mutex());
  auto& g = moex_emu::g_group;
  if (g.depth > 0) --g.depth;
  if (g.depth > 0 || g.calls.empty()) return ncclSuccess;
  std::vector<Call> calls = std::move(g.calls);
  g.calls.clear();
  const cudaStream_t stream = calls.front().stream;
  for (const Call& c : calls)
    if (c.stream != stream)
      return moex_emu::reject(c.comm, ncclInvalidUsage, "ncclGroupEnd: the emulator needs one stream per group");
  auto op = std::make_shared<moex_emu::GroupOp>();
  op->calls = std::move(calls);
  moex_emu::enqueue_polled(stream, "NCCL group", [op]() { return op->poll(); });
  moex_emu::drain(stream);  // post it now if nothing older is pending, so peers are never left waiting
  return ncclSuccess;
}

ncclResult_t ncclSend(const void* buf, std::size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  return moex_emu::add(Call{Call::kSend, buf, nullptr, count, type, ncclSum, peer, comm, stream}, "ncclSend");
}

ncclResult_t ncclRecv(void* buf, std::size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  return moex_emu::add(Call{Call::kRecv, nullptr, buf, count, type, ncclSum, peer, comm, stream}, "ncclRecv");
}

ncclResult_t ncclAllReduce(const void* send, void* recv, std::size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
  if (op != ncclSum && op != ncclMax)
    return moex_emu::reject(comm, ncclInvalidArgument, "ncclAllReduce: the emulator supports ncclSum and ncclMax");
  return moex_emu::add(Call{Call::kAllReduce, send, recv, count, type, op, 0, comm, stream}, "ncclAllReduce");
}

ncclResult_t ncclAllGather(const void* send, void* recv, std::size_t count, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t stream) {
  return moex_emu::add(Call{Call::kAllGather, send, recv, count, type, ncclSum, 0, comm, stream}, "ncclAllGather");
}

ncclResult_t ncclBroadcast(const void* send, void* recv, std::size_t count, ncclDataType_t type, int root,
                           ncclComm_t comm, cudaStream_t stream) {
  return moex_emu::add(Call{Call::kBroadcast, send, recv, count, type, ncclSum, root, comm, stream}, "ncclBroadcast");
}
