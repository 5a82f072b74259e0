// The kernel side of the CUDA emulator (see emu.h): each thread of a block runs as a fiber, blocks
// run one after another, and barriers / shuffles switch between the fibers. On x86-64 the switch is
// a few instructions (below); elsewhere it is ucontext's (which costs two system calls a switch).
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <array>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu/emu.h"

#if defined(__x86_64__)
// moex_emu_switch(save, to): saves the callee-saved registers on the current stack, stores the
// stack pointer in *save, loads `to` and pops the registers saved there (System V ABI: rbx, rbp,
// r12-r15 are the callee-saved ones; MXCSR / x87 control words are left alone, kernels do not
// change them).
extern "C" void moex_emu_switch(void** save, void* to);
asm(R"(
  .text
  .globl moex_emu_switch
  .type moex_emu_switch, @function
moex_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size moex_emu_switch, .-moex_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

namespace moex_emu {

ThreadState* g_thread = nullptr;
BlockState g_block;

namespace {

constexpr int kWarp = 32;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr std::size_t kMaxDynamicSmem = 48 * 1024;  // what a launch gets without opting in
constexpr std::size_t kStackBytes = 256 * 1024;

enum class FiberState { kReady, kBlockWait, kWarpWait, kDone };

/// A saved execution context: a stack pointer (x86-64) or a ucontext.
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

/// Saves the running context in `from` and resumes `to`.
void switch_context(Context& from, Context& to) {
#if defined(__x86_64__)
  moex_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

struct Fiber {
  ThreadState ts;
  Context ctx;
  FiberState state = FiberState::kReady;
  unsigned wait_mask = 0;
};

/// One block being run: its fibers, the scheduler's context and the per-warp shuffle slots.
struct BlockRun {
  std::vector<Fiber> fibers;
  Context scheduler;
  const std::function<void()>* body = nullptr;
  std::vector<std::array<std::uint64_t, kWarp>> slots;
  Fiber* current = nullptr;
  bool reverse = false;  // run the ready threads from the last to the first
  std::string error;  // first violation; stops the block
};

BlockRun* g_run = nullptr;

/// Fiber stacks, reused by every launch (allocated lazily; pages are touched only when used).
std::vector<std::unique_ptr<char[]>>& stacks() {
  static auto* s = new std::vector<std::unique_ptr<char[]>>();
  return *s;
}
char* stack_for(std::size_t i) {
  auto& s = stacks();
  while (s.size() <= i) s.emplace_back(new char[kStackBytes]);
  return s[i].get();
}

/// A violation found inside a fiber: unwinds the fiber's kernel code to fiber_entry.
struct KernelViolation : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void fiber_entry() {
  BlockRun* run = g_run;
  Fiber* self = run->current;
  try {
    (*run->body)();
  } catch (const std::exception& e) {
    if (run->error.empty()) run->error = e.what();
  } catch (...) {
    if (run->error.empty()) run->error = "a kernel thread threw a non-standard exception";
  }
  self->state = FiberState::kDone;
  switch_context(self->ctx, run->scheduler);  // never resumed
  std::abort();
}

void yield(FiberState state, unsigned mask) {
  Fiber* self = g_run->current;
  self->state = state;
  self->wait_mask = mask;
  switch_context(self->ctx, g_run->scheduler);
}

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

/// Releases every barrier whose participants have all arrived. Sets run.error on a violation.
bool release_barriers(BlockRun& run) {
  const int n = static_cast<int>(run.fibers.size());
  bool any = false;
  for (int w0 = 0; w0 < n; w0 += kWarp) {
    const int lanes = std::min(kWarp, n - w0);
    for (int l = 0; l < lanes; ++l) {
      const Fiber& f = run.fibers[static_cast<std::size_t>(w0 + l)];
      if (f.state != FiberState::kWarpWait) continue;
      const unsigned mask = f.wait_mask;
      bool all = true;
      for (int m = 0; m < kWarp; ++m) {
        if (!(mask >> m & 1u)) continue;
        auto where = [&] {
          return "warp " + std::to_string(w0 / kWarp) + ", mask " + hex(mask) + ": lane " + std::to_string(m);
        };
        if (m >= lanes) {
          run.error = where() + " does not exist (the block has " + std::to_string(n) + " threads)";
          return false;
        }
        const Fiber& o = run.fibers[static_cast<std::size_t>(w0 + m)];
        if (o.state == FiberState::kDone) {
          run.error = where() + " has exited before a __syncwarp / __shfl_*_sync naming it";
          return false;
        }
        if (o.state == FiberState::kWarpWait && o.wait_mask != mask) {
          run.error = where() + " waits with a different mask " + hex(o.wait_mask);
          return false;
        }
        if (o.state != FiberState::kWarpWait) all = false;
      }
      if (all) {
        for (int m = 0; m < lanes; ++m)
          if (mask >> m & 1u) run.fibers[static_cast<std::size_t>(w0 + m)].state = FiberState::kReady;
        any = true;
      }
      break;  // one group per warp per pass; others are looked at next pass
    }
  }
  int live = 0, waiting = 0;
  for (const Fiber& f : run.fibers) {
    if (f.state == FiberState::kDone) continue;
    ++live;
    if (f.state == FiberState::kBlockWait) ++waiting;
  }
  if (live > 0 && waiting == live) {
    for (Fiber& f : run.fibers)
      if (f.state == FiberState::kBlockWait) f.state = FiberState::kReady;
    any = true;
  }
  return any;
}

/// Sets fiber `i` up to run the kernel from its start (kept out of run_block: getcontext there
/// would make the compiler assume locals clobbered).
[[gnu::noinline]] void init_fiber(BlockRun& run, std::size_t i) {
  const dim3 b = g_block.block_dim;
  Fiber& f = run.fibers[i];
  const auto li = static_cast<unsigned>(i);
  f.ts.linear = static_cast<int>(i);
  f.ts.thread_idx = uint3{li % b.x, li / b.x % b.y, li / (b.x * b.y)};
  f.state = FiberState::kReady;
  char* const stack = stack_for(i);
#if defined(__x86_64__)
  // The first switch pops six zero registers and "returns" into fiber_entry with the stack aligned
  // as after a call (rsp = 8 mod 16); fiber_entry never returns.
  auto top = reinterpret_cast<std::uintptr_t>(stack + kStackBytes) & ~std::uintptr_t{15};
  auto* slot = reinterpret_cast<void**>(top - 16);
  slot[0] = reinterpret_cast<void*>(&fiber_entry);
  slot[1] = nullptr;
  for (int r = 1; r <= 6; ++r) slot[-r] = nullptr;
  f.ctx.sp = slot - 6;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = stack;
  f.ctx.uc.uc_stack.ss_size = kStackBytes;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_entry, 0);
#endif
}

void run_block(BlockRun& run) {
  for (std::size_t i = 0; i < run.fibers.size(); ++i) init_fiber(run, i);
  for (;;) {
    bool ran = false, live = false;
    for (std::size_t i = 0; i < run.fibers.size(); ++i) {
      Fiber& f = run.fibers[run.reverse ? run.fibers.size() - 1 - i : i];
      if (f.state != FiberState::kReady) {
        live = live || f.state != FiberState::kDone;
        continue;
      }
      run.current = &f;
      g_thread = &f.ts;
      switch_context(run.scheduler, f.ctx);
      ran = true;
      if (!run.error.empty()) return;
      live = live || f.state != FiberState::kDone;
    }
    if (!live) return;
    const bool released = release_barriers(run);
    if (!run.error.empty()) return;
    if (!ran && !released) {
      int at_block = 0, at_warp = 0, done = 0;
      for (const Fiber& f : run.fibers) {
        at_block += f.state == FiberState::kBlockWait;
        at_warp += f.state == FiberState::kWarpWait;
        done += f.state == FiberState::kDone;
      }
      run.error = "deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads, " +
                  std::to_string(at_warp) + " at a warp barrier, " + std::to_string(done) + " have exited";
      return;
    }
  }
}

std::string dims(dim3 d) {
  std::string s(1, '(');  // appended piece by piece: GCC 12 warns (-Wrestrict) on "(" + to_string(...)
  s += std::to_string(d.x);
  s += ',';
  s += std::to_string(d.y);
  s += ',';
  s += std::to_string(d.z);
  s += ')';
  return s;
}

/// Runs every block of one launch, one after another (in reverse order on odd launches).
void execute(const std::string& name, dim3 grid, dim3 block, std::size_t smem, const std::function<void()>& body) {
  BlockRun run;
  const std::size_t n = std::size_t{block.x} * block.y * block.z;
  run.fibers.resize(n);
  run.slots.resize((n + kWarp - 1) / kWarp);
  run.body = &body;
  std::vector<std::max_align_t> shared((std::max<std::size_t>(smem, 1) + sizeof(std::max_align_t) - 1) /
                                       sizeof(std::max_align_t));
  g_block.grid_dim = grid;
  g_block.block_dim = block;
  g_block.dynamic_smem = reinterpret_cast<unsigned char*>(shared.data());
  // Odd launches run their blocks, and the threads of each block, in reverse order: a read of
  // another thread's (or block's) write without a barrier in between (or within one launch) then
  // sees stale data in one of the two orders.
  static std::uint64_t launches = 0;
  run.reverse = (launches++ & 1u) != 0;
  BlockRun* const saved = g_run;
  g_run = &run;
  const std::uint64_t blocks = std::uint64_t{grid.x} * grid.y * grid.z;
  for (std::uint64_t i = 0; i < blocks && run.error.empty(); ++i) {
    const std::uint64_t b = run.reverse ? blocks - 1 - i : i;
    const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / grid.x / grid.y)};
    g_block.block_idx = idx;
    std::memset(shared.data(), 0xff, smem);  // shared memory starts as garbage
    run_block(run);
    if (!run.error.empty())
      run.error = "kernel " + name + ", block " + dims(idx) + " of grid " + dims(grid) + " x block " + dims(block) +
                  ": " + run.error;
  }
  g_run = saved;
  g_thread = nullptr;
  if (!run.error.empty()) fault(run.error);
}

}  // namespace

void sync_block() { yield(FiberState::kBlockWait, 0); }

void sync_warp(unsigned mask) {
  const int lane = g_thread->linear % kWarp;
  if (!(mask >> lane & 1u))
    throw KernelViolation("__syncwarp / __shfl_*_sync with mask " + hex(mask) + " called by lane " +
                          std::to_string(lane) + ", which the mask does not name");
  yield(FiberState::kWarpWait, mask);
}

std::uint64_t shuffle(unsigned mask, std::uint64_t value, ShuffleKind kind, int arg, int width) {
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0)
    throw KernelViolation("__shfl_*_sync: width " + std::to_string(width) + " is not a power of two <= 32");
  const int lane = g_thread->linear % kWarp;
  const int warp = g_thread->linear / kWarp;
  auto& slots = g_run->slots[static_cast<std::size_t>(warp)];
  slots[static_cast<std::size_t>(lane)] = value;
  sync_warp(mask);
  const int base = lane / width * width, pos = lane - base;
  int src = lane;
  bool own = false;
  switch (kind) {
    case ShuffleKind::kIndex: src = base + ((arg % width) + width) % width; break;
    case ShuffleKind::kXor: src = base + ((pos ^ arg) & (width - 1)); break;
    case ShuffleKind::kUp: own = pos < arg; src = lane - arg; break;
    case ShuffleKind::kDown: own = pos + arg >= width; src = lane + arg; break;
  }
  if (own) src = lane;
  if (!(mask >> src & 1u))
    throw KernelViolation("__shfl_*_sync on lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
                          ", which the mask " + hex(mask) + " does not name");
  const std::uint64_t out = slots[static_cast<std::size_t>(src)];
  sync_warp(mask);  // nobody overwrites a slot before every lane has read
  return out;
}

void launch(const char* name, dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
            std::function<void()> body) {
  std::lock_guard<std::recursive_mutex> lock(api_mutex());
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  std::string bad;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > kMaxBlockThreads)
    bad = "block " + dims(block) + " (each of x, y <= 1024, z <= 64, at most 1024 threads, none 0)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    bad = "grid " + dims(grid) + " (x < 2^31, y and z <= 65535, none 0)";
  else if (smem > kMaxDynamicSmem)
    bad = std::to_string(smem) + " bytes of dynamic shared memory (at most 49152 without opting in)";
  if (!bad.empty()) {
    std::fprintf(stderr, "moex CUDA emulator: launch of %s: invalid configuration: %s\n", name, bad.c_str());
    set_last_error(cudaErrorInvalidConfiguration);
    return;
  }
  std::string label = name;
  enqueue(stream, "kernel " + label,
          [label, grid, block, smem, body = std::move(body)]() { execute(label, grid, block, smem, body); });
}

}  // namespace moex_emu
