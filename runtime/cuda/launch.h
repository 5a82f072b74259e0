// MOEX_LAUNCH(grid, block, smem, stream, kernel)(args...): a kernel launch. With nvcc it is the
// triple-chevron launch; when the tests' CUDA emulator (tests/cuda_emu) builds the .cu files as
// plain C++, it queues the kernel on the emulated stream instead. The kernel comes last because a
// template kernel's name may contain commas.
#pragma once

#if defined(MOEX_CUDA_EMULATION)
#define MOEX_LAUNCH(grid, block, smem, stream, ...) \
  ::moex_emu::launcher(&__VA_ARGS__, #__VA_ARGS__, grid, block, smem, stream)
#else
#define MOEX_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
