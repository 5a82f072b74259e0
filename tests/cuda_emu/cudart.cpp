// The CUDA runtime API of the emulator (see emu.h): devices, memory, lazily run streams, events.
// The functions are defined against the toolkit's own declarations (cuda_runtime_api.h), so a
// signature that drifted from the real one does not compile.
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu/emu.h"

namespace moex_emu {
namespace {

constexpr int kWarp = 32;

struct StreamRec {
  bool blocking = true;  // synchronises with the legacy default stream
  bool legacy = false;
  bool destroyed = false;
  bool running = false;
  std::deque<std::pair<std::string, std::function<bool()>>> pending;  // true: done
  std::uint64_t enqueued = 0;  // ops ever queued
  std::uint64_t done = 0;      // ops run (the first `done` of them)
};

struct EventRec {
  bool timing = true;
  StreamRec* stream = nullptr;  // null until recorded
  std::uint64_t pos = 0;        // the event completes when its stream has run `pos` ops
  std::shared_ptr<double> when;
};

enum class Mem { kPageable, kPinned, kDevice };
struct Alloc {
  std::size_t bytes;
  Mem kind;
};

struct State {
  std::recursive_mutex mutex;
  StreamRec legacy;
  std::set<StreamRec*> streams;  // live, created by cudaStreamCreate*
  std::vector<std::unique_ptr<StreamRec>> all_streams;  // kept: a recorded event may outlive its stream
  std::set<EventRec*> events;
  std::map<std::uintptr_t, Alloc> allocs;
  cudaError_t last_error = cudaSuccess;
  cudaError_t sticky = cudaSuccess;
  int device = 0;
};

// Never destroyed: device buffers in static objects may be freed during static destruction.
State& st() {
  static State* s = [] {
    auto* state = new State();
    state->legacy.legacy = true;
    return state;
  }();
  return *s;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int device_count() {
  const char* env = std::getenv("MOEX_EMU_DEVICES");
  const int n = env ? std::atoi(env) : 1;
  return n < 0 ? 0 : n;
}

StreamRec* find_stream(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return &st().legacy;
  auto* rec = reinterpret_cast<StreamRec*>(s);
  return st().streams.count(rec) ? rec : nullptr;
}

EventRec* find_event(cudaEvent_t e) {
  auto* rec = reinterpret_cast<EventRec*>(e);
  return st().events.count(rec) ? rec : nullptr;
}

/// Runs `s` until it has run `upto` ops. An op that is not done yet (an NCCL transfer waiting for
/// its peers) is polled again: until it is done when `blocking`, else force returns false.
bool force(StreamRec* s, std::uint64_t upto, bool blocking = true) {
  State& g = st();
  while (s->done < upto) {
    if (s->running) {
      fault("stream dependency cycle: a stream waits for an op queued after the one it is running");
      return true;
    }
    auto& op = s->pending.front();
    s->running = true;
    bool done = true;
    for (;;) {
      if (g.sticky == cudaSuccess) {
        try {
          done = op.second();
        } catch (const std::exception& e) {
          fault(op.first + ": " + e.what());
          done = true;
        }
      }
      if (done || g.sticky != cudaSuccess || !blocking) break;
      std::this_thread::yield();
    }
    s->running = false;
    if (!done && g.sticky == cudaSuccess) return false;
    s->pending.pop_front();
    ++s->done;
  }
  return true;
}

void force_all() {
  State& g = st();
  force(&g.legacy, g.legacy.enqueued);
  for (StreamRec* s : g.streams) force(s, s->enqueued);
}

void push(StreamRec* s, std::string what, std::function<bool()> op) {
  s->pending.emplace_back(std::move(what), std::move(op));
  ++s->enqueued;
}

/// The allocation holding `p`, or null.
const std::pair<const std::uintptr_t, Alloc>* find_alloc(const void* p) {
  auto& allocs = st().allocs;
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = allocs.upper_bound(a);
  if (it == allocs.begin()) return nullptr;
  --it;
  if (a >= it->first + std::max<std::size_t>(it->second.bytes, 1)) return nullptr;
  return &*it;
}

/// What `p` points at; `*why` explains a range that runs past its allocation's end.
Mem classify(const void* p, std::size_t bytes, std::string* why) {
  const auto* a = find_alloc(p);
  if (!a) return Mem::kPageable;
  const std::size_t off = reinterpret_cast<std::uintptr_t>(p) - a->first;
  if (off + bytes > a->second.bytes && why)
    *why = std::to_string(bytes) + " bytes at offset " + std::to_string(off) + " of a " +
           std::to_string(a->second.bytes) + "-byte " + (a->second.kind == Mem::kDevice ? "device" : "pinned") +
           " allocation run past its end";
  return a->second.kind;
}

cudaError_t fail(cudaError_t err, const std::string& message) {
  std::fprintf(stderr, "moex CUDA emulator: %s\n", message.c_str());
  st().last_error = err;
  return err;
}

void* allocate(std::size_t bytes, Mem kind) {
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256;
  void* p = std::aligned_alloc(256, rounded);
  if (!p) return nullptr;
  std::memset(p, 0xff, rounded);  // uninitialised device memory reads as NaN
  st().allocs[reinterpret_cast<std::uintptr_t>(p)] = Alloc{bytes, kind};
  return p;
}

void release(void* p) {
  auto& allocs = st().allocs;
  auto it = allocs.find(reinterpret_cast<std::uintptr_t>(p));
  if (it == allocs.end()) return;
  std::memset(p, 0xff, it->second.bytes);  // use after free reads NaN (until reused)
  allocs.erase(it);
  std::free(p);
}

bool is_alloc_base(const void* p, Mem kind) {
  auto& allocs = st().allocs;
  auto it = allocs.find(reinterpret_cast<std::uintptr_t>(p));
  return it != allocs.end() && it->second.kind == kind;
}

const char* mem_name(Mem m) {
  switch (m) {
    case Mem::kDevice: return "device";
    case Mem::kPinned: return "pinned host";
    default: return "pageable host";
  }
}

/// Runs what `stream` has queued: all of it when `blocking` (a synchronisation), else as far as it
/// goes without waiting (a query: cudaErrorNotReady when something is left).
cudaError_t settle_stream(cudaStream_t stream, bool blocking, const char* api) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  StreamRec* s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle, std::string(api) + ": unknown or destroyed stream");
  if (!force(s, s->enqueued, blocking)) return cudaErrorNotReady;
  return st().sticky;
}

/// The same up to a recorded event (an event never recorded is complete).
cudaError_t settle_event(cudaEvent_t event, bool blocking, const char* api) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  EventRec* e = find_event(event);
  if (!e) return fail(cudaErrorInvalidResourceHandle, std::string(api) + ": unknown event");
  if (e->stream && !force(e->stream, e->pos, blocking)) return cudaErrorNotReady;
  return st().sticky;
}

cudaError_t copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream, bool sync,
                 const char* api) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  StreamRec* s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle, std::string(api) + ": unknown or destroyed stream");
  if (bytes == 0) return cudaSuccess;
  if (!dst || !src) return fail(cudaErrorInvalidValue, std::string(api) + ": null pointer");
  std::string why;
  const Mem d = classify(dst, bytes, &why);
  const Mem r = classify(src, bytes, &why);
  if (!why.empty()) return fail(cudaErrorInvalidValue, std::string(api) + ": " + why);
  const bool dd = d == Mem::kDevice, sd = r == Mem::kDevice;
  bool ok = true;
  switch (kind) {
    case cudaMemcpyHostToDevice: ok = dd && !sd; break;
    case cudaMemcpyDeviceToHost: ok = !dd && sd; break;
    case cudaMemcpyDeviceToDevice: ok = dd && sd; break;
    case cudaMemcpyHostToHost: ok = !dd && !sd; break;
    default: break;
  }
  if (!ok)
    return fail(cudaErrorInvalidValue, std::string(api) + ": copy kind " + std::to_string(static_cast<int>(kind)) +
                                           " from " + mem_name(r) + " to " + mem_name(d) + " memory");
  std::function<void()> op;
  if (r == Mem::kPageable) {  // staged at the call: the caller may reuse `src` at once
    auto staged = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                               static_cast<const unsigned char*>(src) + bytes);
    op = [dst, staged]() { std::memcpy(dst, staged->data(), staged->size()); };
  } else {
    op = [dst, src, bytes]() { std::memcpy(dst, src, bytes); };
  }
  enqueue(stream, std::string(api) + " of " + std::to_string(bytes) + " bytes", std::move(op));
  // Synchronous copies, and copies into pageable memory, return once the copy is done.
  if (sync || d == Mem::kPageable) force(s, s->enqueued);
  return st().sticky;
}

cudaError_t set(void* dst, int value, std::size_t bytes, cudaStream_t stream, bool sync, const char* api) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  StreamRec* s = find_stream(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle, std::string(api) + ": unknown or destroyed stream");
  if (bytes == 0) return cudaSuccess;
  std::string why;
  if (classify(dst, bytes, &why) != Mem::kDevice || !why.empty())
    return fail(cudaErrorInvalidValue, std::string(api) + ": " + (why.empty() ? "not device memory" : why));
  enqueue(stream, api, [dst, value, bytes]() { std::memset(dst, value, bytes); });
  if (sync) force(s, s->enqueued);
  return st().sticky;
}

}  // namespace

std::recursive_mutex& api_mutex() { return st().mutex; }

void enqueue(cudaStream_t stream, std::string what, std::function<void()> op) {
  enqueue_polled(stream, std::move(what), [op = std::move(op)]() {
    op();
    return true;
  });
}

bool drain(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  StreamRec* s = find_stream(stream);
  return s && force(s, s->enqueued, false);
}

void enqueue_polled(cudaStream_t stream, std::string what, std::function<bool()> op) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  State& g = st();
  StreamRec* s = find_stream(stream);
  if (!s) {
    fault(what + ": queued on an unknown or destroyed stream");
    return;
  }
  // The legacy default stream waits for the blocking streams' earlier work, and they for its.
  if (s->legacy) {
    for (StreamRec* o : g.streams)
      if (o->blocking && o->enqueued > o->done) {
        const std::uint64_t pos = o->enqueued;
        push(s, "implicit wait", [o, pos]() { return force(o, pos, false); });
      }
  } else if (s->blocking && g.legacy.enqueued > g.legacy.done) {
    const std::uint64_t pos = g.legacy.enqueued;
    StreamRec* l = &g.legacy;
    push(s, "implicit wait", [l, pos]() { return force(l, pos, false); });
  }
  push(s, std::move(what), std::move(op));
}

void fault(const std::string& message) {
  State& g = st();
  if (g.sticky != cudaSuccess) return;
  g.sticky = cudaErrorLaunchFailure;
  std::fprintf(stderr, "moex CUDA emulator: device fault: %s\n", message.c_str());
}

void set_last_error(cudaError_t error) { st().last_error = error; }

bool device_range_ok(const void* p, std::size_t bytes, bool* is_device, std::string* why) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  std::string w;
  const Mem m = classify(p, bytes, &w);
  *is_device = m == Mem::kDevice;
  if (why) *why = w;
  return m == Mem::kDevice && w.empty();
}

}  // namespace moex_emu

using moex_emu::st;

// ---------------------------------------------------------------------------------------------------
// Devices and errors.

cudaError_t cudaGetDeviceCount(int* count) {
  *count = moex_emu::device_count();
  return *count > 0 ? cudaSuccess : cudaErrorNoDevice;
}

cudaError_t cudaSetDevice(int device) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  if (device < 0 || device >= moex_emu::device_count()) return cudaErrorInvalidDevice;
  st().device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = st().device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device < 0 || device >= moex_emu::device_count()) return cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof *prop);
  std::snprintf(prop->name, sizeof prop->name, "moex CUDA emulator");
  prop->major = 9;
  prop->minor = 0;
  prop->totalGlobalMem = std::size_t{80} << 30;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = 227 * 1024;
  prop->warpSize = moex_emu::kWarp;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
  prop->multiProcessorCount = 132;
  prop->pciBusID = device;
  prop->unifiedAddressing = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetPCIBusId(char* pciBusId, int len, int device) {
  if (device < 0 || device >= moex_emu::device_count()) return cudaErrorInvalidDevice;
  std::snprintf(pciBusId, static_cast<std::size_t>(len), "0000:%02x:00.0", device);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  moex_emu::force_all();
  return st().sticky;
}

cudaError_t cudaGetLastError() {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  if (st().sticky != cudaSuccess) return st().sticky;
  return std::exchange(st().last_error, cudaSuccess);
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  return st().sticky != cudaSuccess ? st().sticky : st().last_error;
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchFailure: return "unspecified launch failure (moex CUDA emulator: see the fault on stderr)";
    default: return "unknown error";
  }
}

// ---------------------------------------------------------------------------------------------------
// Streams and events.

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  auto rec = std::make_unique<moex_emu::StreamRec>();
  rec->blocking = (flags & cudaStreamNonBlocking) == 0;
  st().streams.insert(rec.get());
  *stream = reinterpret_cast<cudaStream_t>(rec.get());
  st().all_streams.push_back(std::move(rec));
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  moex_emu::StreamRec* s = moex_emu::find_stream(stream);
  if (!s || s->legacy) return moex_emu::fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: unknown stream");
  moex_emu::force(s, s->enqueued);  // queued work still completes
  s->destroyed = true;
  st().streams.erase(s);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  return moex_emu::settle_stream(stream, true, "cudaStreamSynchronize");
}

cudaError_t cudaStreamQuery(cudaStream_t stream) { return moex_emu::settle_stream(stream, false, "cudaStreamQuery"); }

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  moex_emu::EventRec* e = moex_emu::find_event(event);
  if (!e || !moex_emu::find_stream(stream))
    return moex_emu::fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent: unknown stream or event");
  if (flags != 0) return moex_emu::fail(cudaErrorInvalidValue, "cudaStreamWaitEvent: flags must be 0");
  if (!e->stream) return cudaSuccess;  // never recorded: nothing to wait for
  moex_emu::StreamRec* other = e->stream;
  const std::uint64_t pos = e->pos;
  moex_emu::enqueue_polled(stream, "cudaStreamWaitEvent",
                           [other, pos]() { return moex_emu::force(other, pos, false); });
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  auto* e = new moex_emu::EventRec();
  e->timing = (flags & cudaEventDisableTiming) == 0;
  st().events.insert(e);
  *event = reinterpret_cast<cudaEvent_t>(e);
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  moex_emu::EventRec* e = moex_emu::find_event(event);
  if (!e) return moex_emu::fail(cudaErrorInvalidResourceHandle, "cudaEventDestroy: unknown event");
  st().events.erase(e);
  delete e;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  moex_emu::EventRec* e = moex_emu::find_event(event);
  moex_emu::StreamRec* s = moex_emu::find_stream(stream);
  if (!e || !s) return moex_emu::fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: unknown stream or event");
  auto when = std::make_shared<double>(-1.0);
  moex_emu::enqueue(stream, "cudaEventRecord", [when]() { *when = moex_emu::now_ms(); });
  e->stream = s;
  e->pos = s->enqueued;
  e->when = when;
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  return moex_emu::settle_event(event, true, "cudaEventSynchronize");
}

cudaError_t cudaEventQuery(cudaEvent_t event) { return moex_emu::settle_event(event, false, "cudaEventQuery"); }

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  moex_emu::EventRec* a = moex_emu::find_event(start);
  moex_emu::EventRec* b = moex_emu::find_event(end);
  if (!a || !b || !a->timing || !b->timing || !a->stream || !b->stream)
    return moex_emu::fail(cudaErrorInvalidResourceHandle,
                          "cudaEventElapsedTime: events must exist, have timing and have been recorded");
  if (*a->when < 0 || *b->when < 0) return cudaErrorNotReady;
  *ms = static_cast<float>(*b->when - *a->when);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------
// Memory.

cudaError_t cudaMalloc(void** ptr, std::size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  *ptr = moex_emu::allocate(bytes, moex_emu::Mem::kDevice);
  return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaMallocAsync(void** ptr, std::size_t bytes, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  if (!moex_emu::find_stream(stream))
    return moex_emu::fail(cudaErrorInvalidResourceHandle, "cudaMallocAsync: unknown or destroyed stream");
  return cudaMalloc(ptr, bytes);
}

cudaError_t cudaFree(void* ptr) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  if (!ptr) return cudaSuccess;
  if (!moex_emu::is_alloc_base(ptr, moex_emu::Mem::kDevice))
    return moex_emu::fail(cudaErrorInvalidValue, "cudaFree: not the start of a device allocation");
  moex_emu::force_all();  // cudaFree synchronises the device
  moex_emu::release(ptr);
  return cudaSuccess;
}

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  if (!ptr) return cudaSuccess;
  if (!moex_emu::is_alloc_base(ptr, moex_emu::Mem::kDevice))
    return moex_emu::fail(cudaErrorInvalidValue, "cudaFreeAsync: not the start of a device allocation");
  if (!moex_emu::find_stream(stream))
    return moex_emu::fail(cudaErrorInvalidResourceHandle, "cudaFreeAsync: unknown or destroyed stream");
  moex_emu::enqueue(stream, "cudaFreeAsync", [ptr]() { moex_emu::release(ptr); });
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** ptr, std::size_t bytes, unsigned int /*flags*/) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  *ptr = moex_emu::allocate(bytes, moex_emu::Mem::kPinned);
  return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaMallocHost(void** ptr, std::size_t bytes) { return cudaHostAlloc(ptr, bytes, cudaHostAllocDefault); }

cudaError_t cudaFreeHost(void* ptr) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  if (!ptr) return cudaSuccess;
  if (!moex_emu::is_alloc_base(ptr, moex_emu::Mem::kPinned))
    return moex_emu::fail(cudaErrorInvalidValue, "cudaFreeHost: not the start of a pinned allocation");
  moex_emu::force_all();
  moex_emu::release(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  return moex_emu::copy(dst, src, bytes, kind, stream, false, "cudaMemcpyAsync");
}

cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  return moex_emu::copy(dst, src, bytes, kind, nullptr, true, "cudaMemcpy");
}

cudaError_t cudaMemsetAsync(void* dst, int value, std::size_t bytes, cudaStream_t stream) {
  return moex_emu::set(dst, value, bytes, stream, false, "cudaMemsetAsync");
}

cudaError_t cudaMemset(void* dst, int value, std::size_t bytes) {
  return moex_emu::set(dst, value, bytes, nullptr, true, "cudaMemset");
}

cudaError_t cudaMemset2DAsync(void* dst, std::size_t pitch, int value, std::size_t width, std::size_t height,
                              cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(st().mutex);
  if (width == 0 || height == 0) return cudaSuccess;
  if (width > pitch)
    return moex_emu::fail(cudaErrorInvalidValue, "cudaMemset2DAsync: width " + std::to_string(width) +
                                                     " bytes > pitch " + std::to_string(pitch));
  std::string why;
  const std::size_t span = (height - 1) * pitch + width;
  if (moex_emu::classify(dst, span, &why) != moex_emu::Mem::kDevice || !why.empty())
    return moex_emu::fail(cudaErrorInvalidValue, "cudaMemset2DAsync: " + (why.empty() ? "not device memory" : why));
  if (!moex_emu::find_stream(stream))
    return moex_emu::fail(cudaErrorInvalidResourceHandle, "cudaMemset2DAsync: unknown or destroyed stream");
  moex_emu::enqueue(stream, "cudaMemset2DAsync", [=]() {
    for (std::size_t r = 0; r < height; ++r) std::memset(static_cast<char*>(dst) + r * pitch, value, width);
  });
  return cudaSuccess;
}
