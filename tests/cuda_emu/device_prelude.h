// Force-included (-include) into the GPU path's .cu files when the CUDA emulator builds them as
// plain C++ (see emu.h): the CUDA qualifiers become no-ops or statics, the built-in variables read
// the running fiber's, and the warp intrinsics are the emulator's barriers and shuffles.
#pragma once

#define MOEX_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "cuda_emu/emu.h"

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#define __global__
#define __device__
#define __host__
// Static __shared__ variables are block-wide: blocks run one after another, so a function-local
// static is one per block (and, like shared memory, holds garbage from the last block at entry).
#define __shared__ static

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#undef warpSize
#define threadIdx (::moex_emu::thread_idx())
#define blockIdx (::moex_emu::block_idx())
#define blockDim (::moex_emu::block_dim())
#define gridDim (::moex_emu::grid_dim())
#define warpSize 32

inline void __syncthreads() { ::moex_emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::moex_emu::sync_warp(mask); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::moex_emu::shuffle_as(mask, v, ::moex_emu::ShuffleKind::kIndex, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::moex_emu::shuffle_as(mask, v, ::moex_emu::ShuffleKind::kUp, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::moex_emu::shuffle_as(mask, v, ::moex_emu::ShuffleKind::kDown, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::moex_emu::shuffle_as(mask, v, ::moex_emu::ShuffleKind::kXor, lane_mask, width);
}
