// CUDA kernels of the GPU path: gate, permute / combine, SwiGLU and dtype conversion (see kernels.h).
#include "runtime/cuda/kernels.h"

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "base/error.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/launch.h"
#include "runtime/cuda/grouped_gemm.h"
#include "runtime/kernels/math.h"

namespace moex::cuda {
namespace {

using std::int64_t;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
/// Grid-stride kernels never launch more blocks than this (they loop over the rest).
constexpr int64_t kMaxBlocks = 65536;
/// Dynamic shared memory a block may use without opting in.
constexpr std::size_t kSmemLimit = 48 * 1024;

// ---------------------------------------------------------------------------------------------------
// Element access: fp32 math on fp32 or bf16 storage, 16-byte packs.

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }

/// V elements loaded / stored as one access (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

/// Elements per 16-byte pack.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

/// The block's dynamic shared memory (16-byte aligned). The tests' CUDA emulator has no
/// `extern __shared__`; it hands out its own per-block buffer.
__device__ __forceinline__ unsigned char* dynamic_shared() {
#if defined(MOEX_CUDA_EMULATION)
  return ::moex_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
#endif
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

/// Whether 16-byte packs can be used: every width / stride a multiple of the pack and every base
/// pointer 16-byte aligned.
template <typename T>
bool can_vectorise(std::initializer_list<int64_t> extents, std::initializer_list<const void*> ptrs) {
  for (int64_t e : extents)
    if (e % kVec<T> != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(std::clamp<int64_t>(b, 1, kMaxBlocks));
}

/// Threads for one row of `nvec` packs: a multiple of 32 in [32, 256].
unsigned row_threads(int64_t nvec) {
  const int64_t t = ((nvec + kWarp - 1) / kWarp) * kWarp;
  return static_cast<unsigned>(std::clamp<int64_t>(t, kWarp, 256));
}

__device__ __forceinline__ float warp_sum(float v) {
  // Butterfly: every lane ends with the same, bitwise identical sum.
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

void check_rows(const char* what, int64_t count, int64_t width, std::initializer_list<int64_t> strides) {
  if (count < 0 || width < 0)
    throw InvalidArgument(std::string(what) + ": count = " + std::to_string(count) + ", width = " +
                          std::to_string(width) + ": both must be >= 0");
  for (int64_t s : strides)
    if (s < width)
      throw InvalidArgument(std::string(what) + ": a row stride of " + std::to_string(s) +
                            " is smaller than the width " + std::to_string(width));
}

// ---------------------------------------------------------------------------------------------------
// Gate

struct GateDev {
  int64_t tokens;
  int experts, topk, n_group, topk_group, per_group;
  bool softmax, grouped, noaux, norm;
  float scale;
};

/// Whether candidate (ov, oi) beats (bv, bi): a larger value, or an equal value with a lower index;
/// index -1 is "none" and loses to anything.
__device__ __forceinline__ bool beats(float ov, int oi, float bv, int bi) {
  if (oi < 0) return false;
  if (bi < 0) return true;
  return ov > bv || (ov == bv && oi < bi);
}

/// The CPU's argmax_untaken over v[0..n) for a whole warp (every lane returns the same index): the
/// largest untaken value, ties to the lowest index; with only -inf left, the lowest untaken index.
__device__ int warp_argmax_untaken(const float* v, const unsigned char* taken, int n, int lane) {
  float bv = 0.0f;
  int bi = -1;
  for (int i = lane; i < n; i += kWarp) {  // increasing i with a strict '>': lowest index per lane
    if (taken[i]) continue;
    if (bi < 0 || v[i] > bv) {
      bv = v[i];
      bi = i;
    }
  }
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, bv, off);
    const int oi = __shfl_xor_sync(kFullMask, bi, off);
    if (beats(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  return bi;
}

/// Per-warp scratch of the selection kernel, in bytes (floats, then ints, then flags; 16-aligned).
std::size_t gate_select_smem(const GateDev& g) {
  const std::size_t bytes = sizeof(float) * (2 * static_cast<std::size_t>(g.experts) + static_cast<std::size_t>(g.n_group)) +
                            sizeof(int) * static_cast<std::size_t>(g.topk) +
                            static_cast<std::size_t>(std::max(g.experts, g.n_group));
  return (bytes + 15) / 16 * 16;
}

/// One warp per token: `scores` holds the logits on entry and the scores on exit.
__global__ void gate_select_kernel(GateDev p, const float* __restrict__ bias, float* scores,
                                   std::int32_t* __restrict__ topk_ids, float* __restrict__ topk_weights,
                                   unsigned warp_smem) {
  unsigned char* smem = dynamic_shared();
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= p.tokens) return;  // the whole warp leaves together
  const int E = p.experts, K = p.topk, G = p.n_group;
  float* s = reinterpret_cast<float*>(smem + static_cast<std::size_t>(warp) * warp_smem);
  float* c = s + E;
  float* gs = c + E;
  int* picks = reinterpret_cast<int*>(gs + G);
  unsigned char* taken = reinterpret_cast<unsigned char*>(picks + K);
  float* row = scores + t * E;

  for (int e = lane; e < E; e += kWarp) s[e] = row[e];
  if (p.softmax) {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, s[e]);
    mx = warp_max(mx);
    float part = 0.0f;
    for (int e = lane; e < E; e += kWarp) {
      const float v = expf(s[e] - mx);
      s[e] = v;
      part += v;
    }
    const float inv = 1.0f / warp_sum(part);
    for (int e = lane; e < E; e += kWarp) s[e] *= inv;
  } else {
    for (int e = lane; e < E; e += kWarp) s[e] = math::sigmoid(s[e]);
  }
  for (int e = lane; e < E; e += kWarp) c[e] = s[e] + (bias ? bias[e] : 0.0f);
  __syncwarp();

  if (p.grouped) {
    const int per = p.per_group;
    for (int g = lane; g < G; g += kWarp) {  // same scan as the CPU: top-2 with strict '>'
      const float* cg = c + g * per;
      float first = -INFINITY, second = -INFINITY;
      for (int i = 0; i < per; ++i) {
        if (cg[i] > first) {
          second = first;
          first = cg[i];
        } else if (cg[i] > second) {
          second = cg[i];
        }
      }
      gs[g] = p.noaux ? first + second : first;
      taken[g] = 0;
    }
    __syncwarp();
    for (int i = 0; i < p.topk_group; ++i) {
      const int g = warp_argmax_untaken(gs, taken, G, lane);
      __syncwarp();
      if (lane == 0) taken[g] = 1;
      __syncwarp();
    }
    // `taken` marks the kept groups; experts of the others become ineligible.
    for (int e = lane; e < E; e += kWarp)
      if (!taken[e / per]) c[e] = -INFINITY;
    __syncwarp();
  }
  for (int e = lane; e < E; e += kWarp) taken[e] = 0;
  __syncwarp();
  for (int j = 0; j < K; ++j) {
    const int e = warp_argmax_untaken(c, taken, E, lane);
    __syncwarp();
    if (lane == 0) {
      taken[e] = 1;
      picks[j] = e;
    }
    __syncwarp();
  }
  if (lane == 0) {  // serial, in pick order, as on the CPU
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) sum += s[picks[j]];
    const float scale = p.norm ? p.scale / (sum + 1e-20f) : p.scale;
    for (int j = 0; j < K; ++j) {
      topk_ids[t * K + j] = picks[j];
      topk_weights[t * K + j] = s[picks[j]] * scale;
    }
  }
  for (int e = lane; e < E; e += kWarp) row[e] = s[e];
}

/// One warp per token: dlogits from d_weights (and d_scores_extra), as kernels::gate_backward.
__global__ void gate_dlogits_kernel(GateDev p, const float* __restrict__ scores, const std::int32_t* __restrict__ topk_ids,
                                    const float* __restrict__ d_weights, const float* __restrict__ d_extra,
                                    float* __restrict__ dlogits) {
  unsigned char* smem = dynamic_shared();
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= p.tokens) return;
  const int E = p.experts, K = p.topk;
  float* dl = reinterpret_cast<float*>(smem) + static_cast<std::size_t>(warp) * static_cast<std::size_t>(E);
  const float* s = scores + t * E;
  const std::int32_t* ids = topk_ids + t * K;
  const float* dw = d_weights + t * K;

  for (int e = lane; e < E; e += kWarp) dl[e] = d_extra ? d_extra[t * E + e] : 0.0f;
  __syncwarp();
  if (lane == 0) {  // d(score of pick j) through w_j = c * s_j / (sum_i s_i + eps), serial as on the CPU
    float sum = 0.0f, dot = 0.0f;
    for (int j = 0; j < K; ++j) {
      sum += s[ids[j]];
      dot += dw[j] * s[ids[j]];
    }
    const float c = p.scale;
    for (int j = 0; j < K; ++j) {
      const float ds = p.norm ? c * (dw[j] / (sum + 1e-20f) - dot / ((sum + 1e-20f) * (sum + 1e-20f))) : c * dw[j];
      dl[ids[j]] += ds;
    }
  }
  __syncwarp();
  if (!p.softmax) {
    if (d_extra) {
      for (int e = lane; e < E; e += kWarp) dl[e] *= s[e] * (1.0f - s[e]);
    } else if (lane == 0) {
      for (int j = 0; j < K; ++j) {
        const float sj = s[ids[j]];
        dl[ids[j]] *= sj * (1.0f - sj);
      }
    }
    __syncwarp();
  } else {
    // Softmax Jacobian: dlogit_i = s_i * (dscore_i - sum_j dscore_j s_j).
    float inner = 0.0f;
    if (d_extra) {
      for (int e = lane; e < E; e += kWarp) inner += dl[e] * s[e];
      inner = warp_sum(inner);
    } else {
      if (lane == 0)
        for (int j = 0; j < K; ++j) inner += dl[ids[j]] * s[ids[j]];
      inner = __shfl_sync(kFullMask, inner, 0);
    }
    __syncwarp();
    for (int e = lane; e < E; e += kWarp) dl[e] = s[e] * (dl[e] - inner);
    __syncwarp();
  }
  for (int e = lane; e < E; e += kWarp) dlogits[t * E + e] = dl[e];
}

GateDev validate_gate(const kernels::GateParams& p, const char* what) {
  auto bad = [&](const std::string& field, std::int64_t v, const std::string& rule) {
    return InvalidArgument(std::string(what) + ": GateParams." + field + " = " + std::to_string(v) + ": " + rule);
  };
  if (p.tokens < 0) throw bad("tokens", p.tokens, "must be >= 0");
  if (p.hidden < 1) throw bad("hidden", p.hidden, "must be >= 1");
  if (p.experts < 1 || p.experts > INT_MAX) throw bad("experts", p.experts, "must be in [1, INT_MAX]");
  if (p.topk < 1 || p.topk > p.experts)
    throw bad("topk", p.topk, "must be in [1, experts = " + std::to_string(p.experts) + "]");
  if (p.n_group < 1) throw bad("n_group", p.n_group, "must be >= 1");
  GateDev g{};
  g.tokens = p.tokens;
  g.experts = static_cast<int>(p.experts);
  g.topk = static_cast<int>(p.topk);
  g.grouped = p.method != TopkMethod::kGreedy && p.n_group > 1;
  g.n_group = g.grouped ? static_cast<int>(p.n_group) : 1;
  g.topk_group = 1;
  g.per_group = g.experts;
  if (g.grouped) {
    if (p.experts % p.n_group != 0)
      throw bad("n_group", p.n_group, "must divide experts = " + std::to_string(p.experts));
    if (p.topk_group < 1 || p.topk_group > p.n_group)
      throw bad("topk_group", p.topk_group, "must be in [1, n_group = " + std::to_string(p.n_group) + "]");
    g.topk_group = static_cast<int>(p.topk_group);
    g.per_group = static_cast<int>(p.experts / p.n_group);
  }
  g.softmax = p.scoring == ScoringFunc::kSoftmax;
  g.noaux = p.method == TopkMethod::kNoauxTc;
  g.norm = p.norm_topk_prob;
  g.scale = p.routed_scaling_factor;
  return g;
}

/// Warps per block (tokens per block) whose scratch fits: 4, else 1; throws when one does not fit.
int gate_warps(std::size_t per_warp, const char* what, std::int64_t experts) {
  if (4 * per_warp <= kSmemLimit) return 4;
  if (per_warp <= kSmemLimit) return 1;
  throw InvalidArgument(std::string(what) + ": experts = " + std::to_string(experts) + " needs " +
                        std::to_string(per_warp) + " bytes of shared memory per token; at most " +
                        std::to_string(kSmemLimit) + " are supported");
}

// ---------------------------------------------------------------------------------------------------
// Permute and combine

template <typename T, int V, bool kScaled>
__global__ void gather_kernel(int64_t count, int64_t width, const int64_t* __restrict__ index,
                              const float* __restrict__ scale, const T* __restrict__ src, int64_t src_stride,
                              T* __restrict__ dst, int64_t dst_stride) {
  const int64_t nvec = width / V;
  for (int64_t n = blockIdx.x; n < count; n += gridDim.x) {
    const T* s = src + index[n] * src_stride;
    T* d = dst + n * dst_stride;
    const float c = kScaled && scale ? scale[n] : 1.0f;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      Pack<T, V> v = load_pack<T, V>(s + j * V);
      if constexpr (kScaled) {
#pragma unroll
        for (int q = 0; q < V; ++q) v.v[q] = from_f32<T>(c * to_f32(v.v[q]));
      }
      store_pack<T, V>(d + j * V, v);
    }
  }
}

template <typename T, bool kScaled>
void launch_gather(const char* what, int64_t count, int64_t width, const int64_t* index, const float* scale,
                   const T* src, int64_t src_stride, T* dst, int64_t dst_stride, cudaStream_t stream) {
  check_rows(what, count, width, {src_stride, dst_stride});
  if (count == 0 || width == 0) return;
  if (!index) throw InvalidArgument(std::string(what) + ": index is null (expected a device array of count entries)");
  const unsigned blocks = blocks_for(count, 1);
  if (can_vectorise<T>({width, src_stride, dst_stride}, {src, dst})) {
    constexpr int V = kVec<T>;
    MOEX_LAUNCH(blocks, row_threads(width / V), 0, stream, gather_kernel<T, V, kScaled>)(count, width, index, scale,
        src, src_stride, dst, dst_stride);
  } else {
    MOEX_LAUNCH(blocks, row_threads(width), 0, stream, gather_kernel<T, 1, kScaled>)(count, width, index, scale, src,
                                                                             src_stride, dst, dst_stride);
  }
  MOEX_CUDA_CHECK_LAUNCH("gather_kernel");
}

/// dst[i] = index[i] >= 0 ? src[index[i]] : 0 (grid-stride).
__global__ void gather_values_kernel(int64_t n, const int64_t* __restrict__ index, const float* __restrict__ src,
                                     float* __restrict__ dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = index[i];
    dst[i] = j >= 0 ? src[j] : 0.0f;
  }
}

template <typename T, int V>
__global__ void combine_kernel(int64_t tokens, int64_t width, const int64_t* __restrict__ offsets,
                               const int64_t* __restrict__ src_row, const float* __restrict__ weight,
                               const T* __restrict__ src, int64_t src_stride, T* __restrict__ dst, int64_t dst_stride,
                               bool accumulate) {
  const int64_t nvec = width / V;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t i0 = offsets[t], i1 = offsets[t + 1];
    T* d = dst + t * dst_stride;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      float acc[V];
      if (accumulate) {
        const Pack<T, V> o = load_pack<T, V>(d + j * V);
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] = to_f32(o.v[q]);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] = 0.0f;
      }
      for (int64_t i = i0; i < i1; ++i) {  // fixed order: deterministic
        const float w = weight ? weight[i] : 1.0f;
        const Pack<T, V> v = load_pack<T, V>(src + src_row[i] * src_stride + j * V);
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] = fmaf(w, to_f32(v.v[q]), acc[q]);
      }
      Pack<T, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) out.v[q] = from_f32<T>(acc[q]);
      store_pack<T, V>(d + j * V, out);
    }
  }
}

template <typename T>
void launch_combine(int64_t tokens, int64_t width, const int64_t* offsets, const int64_t* src_row, const float* weight,
                    const T* src, int64_t src_stride, T* dst, int64_t dst_stride, bool accumulate,
                    cudaStream_t stream) {
  check_rows("combine_rows", tokens, width, {src_stride, dst_stride});
  if (tokens == 0 || width == 0) return;
  if (!offsets) throw InvalidArgument("combine_rows: offsets is null (expected a device array of tokens + 1 entries)");
  const unsigned blocks = blocks_for(tokens, 1);
  if (can_vectorise<T>({width, src_stride, dst_stride}, {src, dst})) {
    constexpr int V = kVec<T>;
    MOEX_LAUNCH(blocks, row_threads(width / V), 0, stream, combine_kernel<T, V>)(tokens, width, offsets, src_row,
        weight, src, src_stride, dst, dst_stride, accumulate);
  } else {
    MOEX_LAUNCH(blocks, row_threads(width), 0, stream, combine_kernel<T, 1>)(tokens, width, offsets, src_row, weight,
        src, src_stride, dst, dst_stride, accumulate);
  }
  MOEX_CUDA_CHECK_LAUNCH("combine_kernel");
}

constexpr int kDotWarps = 8;

template <typename T, int V>
__global__ void row_dot_kernel(int64_t count, int64_t width, const int64_t* __restrict__ index,
                               const T* __restrict__ a, int64_t a_stride, const T* __restrict__ b, int64_t b_stride,
                               float* __restrict__ out) {
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t nvec = width / V;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kDotWarps + warp; n < count;
       n += static_cast<int64_t>(gridDim.x) * kDotWarps) {
    const T* ar = a + (index ? index[n] : n) * a_stride;
    const T* br = b + n * b_stride;
    float acc = 0.0f;
    for (int64_t j = lane; j < nvec; j += kWarp) {
      const Pack<T, V> pa = load_pack<T, V>(ar + j * V);
      const Pack<T, V> pb = load_pack<T, V>(br + j * V);
#pragma unroll
      for (int q = 0; q < V; ++q) acc = fmaf(to_f32(pa.v[q]), to_f32(pb.v[q]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[n] = acc;
  }
}

template <typename T>
void launch_row_dot(int64_t count, int64_t width, const int64_t* index, const T* a, int64_t a_stride, const T* b,
                    int64_t b_stride, float* out, cudaStream_t stream) {
  check_rows("row_dot", count, width, {a_stride, b_stride});
  if (count == 0) return;
  const unsigned blocks = blocks_for(count, kDotWarps);
  if (can_vectorise<T>({width, a_stride, b_stride}, {a, b})) {
    MOEX_LAUNCH(blocks, kDotWarps * kWarp, 0, stream, row_dot_kernel<T, kVec<T>>)(count, width, index, a, a_stride, b,
                                                                          b_stride, out);
  } else {
    MOEX_LAUNCH(blocks, kDotWarps * kWarp, 0, stream, row_dot_kernel<T, 1>)(count, width, index, a, a_stride, b,
        b_stride, out);
  }
  MOEX_CUDA_CHECK_LAUNCH("row_dot_kernel");
}

// ---------------------------------------------------------------------------------------------------
// SwiGLU

constexpr int kEltThreads = 256;

template <typename T, int V>
__global__ void swiglu_fwd_kernel(int64_t rows, int64_t ffn, const T* __restrict__ h13, T* __restrict__ sig,
                                  T* __restrict__ act) {
  const int64_t per_row = ffn / V, total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, j = (i - r * per_row) * V;
    const T* g = h13 + r * 2 * ffn + j;
    const Pack<T, V> pg = load_pack<T, V>(g), pu = load_pack<T, V>(g + ffn);
    Pack<T, V> ps, pa;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const float gv = to_f32(pg.v[q]), uv = to_f32(pu.v[q]);
      ps.v[q] = from_f32<T>(math::sigmoid(gv));
      pa.v[q] = from_f32<T>(math::swiglu(gv, uv));
    }
    store_pack<T, V>(sig + r * ffn + j, ps);
    store_pack<T, V>(act + r * ffn + j, pa);
  }
}

template <typename T, int V>
__global__ void swiglu_bwd_kernel(int64_t rows, int64_t ffn, const T* __restrict__ h13, const T* __restrict__ sig,
                                  const T* da, int64_t da_stride, T* dh13) {
  // `da` may alias the up half of dh13: no __restrict__, and each pack is read before it is written.
  const int64_t per_row = ffn / V, total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, j = (i - r * per_row) * V;
    const T* g = h13 + r * 2 * ffn + j;
    const Pack<T, V> pg = load_pack<T, V>(g), pu = load_pack<T, V>(g + ffn);
    const Pack<T, V> ps = load_pack<T, V>(sig + r * ffn + j);
    const Pack<T, V> pd = load_pack<T, V>(da + r * da_stride + j);
    Pack<T, V> dg, du;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      float fg, fu;
      math::swiglu_backward_saved(to_f32(pg.v[q]), to_f32(pu.v[q]), to_f32(ps.v[q]), to_f32(pd.v[q]), &fg, &fu);
      dg.v[q] = from_f32<T>(fg);
      du.v[q] = from_f32<T>(fu);
    }
    store_pack<T, V>(dh13 + r * 2 * ffn + j, dg);
    store_pack<T, V>(dh13 + r * 2 * ffn + ffn + j, du);
  }
}

template <typename T>
void launch_swiglu_fwd(int64_t rows, int64_t ffn, const T* h13, T* sig, T* a, cudaStream_t stream) {
  if (rows < 0 || ffn < 0)
    throw InvalidArgument("swiglu_forward: rows = " + std::to_string(rows) + ", ffn = " + std::to_string(ffn) +
                          ": both must be >= 0");
  if (rows == 0 || ffn == 0) return;
  if (can_vectorise<T>({ffn}, {h13, sig, a})) {
    constexpr int V = kVec<T>;
    MOEX_LAUNCH(blocks_for(rows * (ffn / V), kEltThreads), kEltThreads, 0, stream, swiglu_fwd_kernel<T, V>)(rows, ffn,
        h13, sig, a);
  } else {
    MOEX_LAUNCH(blocks_for(rows * ffn, kEltThreads), kEltThreads, 0, stream, swiglu_fwd_kernel<T, 1>)(rows, ffn, h13,
        sig, a);
  }
  MOEX_CUDA_CHECK_LAUNCH("swiglu_fwd_kernel");
}

template <typename T>
void launch_swiglu_bwd(int64_t rows, int64_t ffn, const T* h13, const T* sig, const T* da, int64_t da_stride,
                       T* dh13, cudaStream_t stream) {
  if (rows < 0 || ffn < 0)
    throw InvalidArgument("swiglu_backward: rows = " + std::to_string(rows) + ", ffn = " + std::to_string(ffn) +
                          ": both must be >= 0");
  if (rows == 0 || ffn == 0) return;
  if (da_stride < ffn)
    throw InvalidArgument("swiglu_backward: da_stride = " + std::to_string(da_stride) + " is smaller than ffn = " +
                          std::to_string(ffn));
  if (can_vectorise<T>({ffn, da_stride}, {h13, sig, da, dh13})) {
    constexpr int V = kVec<T>;
    MOEX_LAUNCH(blocks_for(rows * (ffn / V), kEltThreads), kEltThreads, 0, stream, swiglu_bwd_kernel<T, V>)(
        rows, ffn, h13, sig, da, da_stride, dh13);
  } else {
    MOEX_LAUNCH(blocks_for(rows * ffn, kEltThreads), kEltThreads, 0, stream, swiglu_bwd_kernel<T, 1>)(rows, ffn, h13,
        sig, da, da_stride, dh13);
  }
  MOEX_CUDA_CHECK_LAUNCH("swiglu_bwd_kernel");
}

// ---------------------------------------------------------------------------------------------------
// Conversion and fill

template <typename S, typename D>
__global__ void convert_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_f32<D>(to_f32(src[i]));
}

/// dst[i] += src[i] in fp32.
template <typename S>
__global__ void add_f32_kernel(const S* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] += to_f32(src[i]);
}

template <typename S>
void launch_add_f32(const S* src, float* dst, int64_t n, cudaStream_t stream) {
  if (n < 0) throw InvalidArgument("add_to: n = " + std::to_string(n) + ": must be >= 0");
  if (n == 0) return;
  MOEX_LAUNCH(blocks_for(n, kEltThreads), kEltThreads, 0, stream, add_f32_kernel<S>)(src, dst, n);
  MOEX_CUDA_CHECK_LAUNCH("add_f32_kernel");
}

template <typename S, typename D>
void launch_convert(const S* src, D* dst, int64_t n, cudaStream_t stream) {
  if (n < 0) throw InvalidArgument("convert: n = " + std::to_string(n) + ": must be >= 0");
  if (n == 0) return;
  MOEX_LAUNCH(blocks_for(n, kEltThreads), kEltThreads, 0, stream, convert_kernel<S, D>)(src, dst, n);
  MOEX_CUDA_CHECK_LAUNCH("convert_kernel");
}

__device__ __forceinline__ std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename T>
__global__ void fill_uniform_kernel(T* __restrict__ dst, int64_t n, std::uint64_t seed, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const std::uint64_t h = mix64(seed + 0x9e3779b97f4a7c15ull * (static_cast<std::uint64_t>(i) + 1));
    const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
    dst[i] = from_f32<T>((2.0f * u - 1.0f) * scale);
  }
}

template <typename T>
void launch_fill(T* dst, int64_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  if (n < 0) throw InvalidArgument("fill_uniform: n = " + std::to_string(n) + ": must be >= 0");
  if (n == 0) return;
  MOEX_LAUNCH(blocks_for(n, kEltThreads), kEltThreads, 0, stream, fill_uniform_kernel<T>)(dst, n, seed, scale);
  MOEX_CUDA_CHECK_LAUNCH("fill_uniform_kernel");
}

// ---------------------------------------------------------------------------------------------------
// Auxiliary balance losses: the CPU's formulas (runtime/kernels/balance.cpp), every sum in double in
// a fixed order: per-token sums in expert order, per-expert sums over tokens in blocks of
// kBalancePart tokens (each block in token order, then the blocks in order), so the values agree
// with the CPU's to double rounding and do not depend on the launch.

constexpr double kBalanceEps = 1e-20;  // as balance.cpp (DeepSeek-V3's scores / (sum + 1e-20))
constexpr int64_t kBalancePart = 256;  // tokens per partial sum

/// Where the statistics live in the scratch (doubles).
struct BalanceLayout {
  int64_t tokens, experts, topk, seq_len, n_seq;
  int64_t seq_parts, all_parts;  // token blocks per sequence, and over all tokens
  double *inv, *cnt_seq, *psum_seq, *cnt_all, *psum_all, *term;
  double *cnt_part, *psum_part;  // [n_seq * E * seq_parts] for the sequences, then [E * all_parts]
  __host__ __device__ int64_t part_items() const { return (n_seq * seq_parts + all_parts) * experts; }
};

BalanceLayout balance_layout(const kernels::BalanceLossParams& p, void* scratch) {
  BalanceLayout b{};
  b.tokens = p.tokens;
  b.experts = p.experts;
  b.topk = p.topk;
  b.seq_len = p.seq_len == 0 ? p.tokens : std::min(p.seq_len, p.tokens);
  b.n_seq = b.seq_len > 0 ? (p.tokens + b.seq_len - 1) / b.seq_len : 0;
  b.seq_parts = (b.seq_len + kBalancePart - 1) / kBalancePart;
  b.all_parts = (p.tokens + kBalancePart - 1) / kBalancePart;
  auto* d = static_cast<double*>(scratch);
  b.inv = d;
  b.cnt_seq = b.inv + p.tokens;
  b.psum_seq = b.cnt_seq + b.n_seq * p.experts;
  b.cnt_all = b.psum_seq + b.n_seq * p.experts;
  b.psum_all = b.cnt_all + p.experts;
  b.term = b.psum_all + p.experts;
  b.cnt_part = b.term + b.n_seq;
  b.psum_part = b.cnt_part + b.part_items();
  return b;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/// inv[t] = 1 / (sum_e scores[t,e] + eps), the sum in double in expert order.
__global__ void balance_inv_kernel(BalanceLayout b, const float* __restrict__ scores) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < b.tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* s = scores + t * b.experts;
    double z = 0.0;
    for (int64_t e = 0; e < b.experts; ++e) z += s[e];
    b.inv[t] = 1.0 / (z + kBalanceEps);
  }
}

/// Partial sums, one item per (sequence, token block, expert), then per (token block, expert) over all
/// tokens: of the block's tokens that picked e (each once), the count and the sum of their scores of e
/// (normalised per token for the sequences, raw over all tokens). Consecutive threads read
/// consecutive experts of a row.
__global__ void balance_parts_kernel(BalanceLayout b, const float* __restrict__ scores,
                                     const std::int32_t* __restrict__ topk_ids) {
  const int64_t E = b.experts, K = b.topk, seq_items = b.n_seq * b.seq_parts * E;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < b.part_items();
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool all = i >= seq_items;
    const int64_t j = all ? i - seq_items : i, e = j % E, block = j / E;  // block: (seq, part) or part
    int64_t t0, t1;
    if (all) {
      t0 = block * kBalancePart;
      t1 = min64(t0 + kBalancePart, b.tokens);
    } else {
      const int64_t seq = block / b.seq_parts, part = block % b.seq_parts;
      const int64_t s0 = seq * b.seq_len, s1 = min64(s0 + b.seq_len, b.tokens);
      t0 = min64(s0 + part * kBalancePart, s1);
      t1 = min64(t0 + kBalancePart, s1);
    }
    double cnt = 0.0, psum = 0.0;
    for (int64_t t = t0; t < t1; ++t) {
      bool picked = false;
      for (int64_t k = 0; k < K; ++k) picked = picked || topk_ids[t * K + k] == e;
      if (picked) cnt += 1.0;
      const float s = scores[t * E + e];
      psum += all ? static_cast<double>(s) : s * b.inv[t];
    }
    b.cnt_part[i] = cnt;
    b.psum_part[i] = psum;
  }
}

/// One item per (sequence, expert), then per expert over all tokens: its partial sums added in block
/// order.
__global__ void balance_stats_kernel(BalanceLayout b) {
  const int64_t E = b.experts, items = (b.n_seq + 1) * E, seq_items = b.n_seq * b.seq_parts * E;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t seq = i / E, e = i % E;
    const bool all = seq == b.n_seq;
    const int64_t parts = all ? b.all_parts : b.seq_parts;
    const int64_t first = all ? seq_items + e : seq * b.seq_parts * E + e;  // part p at first + p * E
    double cnt = 0.0, psum = 0.0;
    for (int64_t q = 0; q < parts; ++q) {
      cnt += b.cnt_part[first + q * E];
      psum += b.psum_part[first + q * E];
    }
    (all ? b.cnt_all : b.cnt_seq)[all ? e : i] = cnt;
    (all ? b.psum_all : b.psum_seq)[all ? e : i] = psum;
  }
}

constexpr int kBalanceValueThreads = 256;

/// One block: each sequence's term E / (K Ts^2) sum_i c_i P_i in parallel, then one thread adds
/// them, and the expert-level sum, in the CPU's order. value = {seq, expert}.
__global__ void balance_value_kernel(BalanceLayout b, float seq_alpha, float expert_alpha, double* value) {
  const int64_t E = b.experts;
  for (int64_t seq = threadIdx.x; seq < b.n_seq; seq += blockDim.x) {
    const int64_t Ts = min64(b.seq_len, b.tokens - seq * b.seq_len);
    double a = 0.0;
    for (int64_t e = 0; e < E; ++e) a += b.cnt_seq[seq * E + e] * b.psum_seq[seq * E + e];
    b.term[seq] = static_cast<double>(E) / (static_cast<double>(b.topk) * Ts * Ts) * a;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  double acc = 0.0;
  for (int64_t e = 0; e < E; ++e) acc += b.cnt_all[e] * b.psum_all[e];
  value[1] = static_cast<double>(expert_alpha) * static_cast<double>(E) /
             (static_cast<double>(b.topk) * b.tokens * b.tokens) * acc;
  double seq_total = 0.0;
  for (int64_t seq = 0; seq < b.n_seq; ++seq) seq_total += b.term[seq];
  value[0] = static_cast<double>(seq_alpha) * seq_total / static_cast<double>(b.n_seq);
}

/// One thread per token: d_scores[t,e] += g_exp_e + (g_seq_e - sum_i g_seq_i s'_{i,t}) / z_t.
__global__ void balance_grad_kernel(BalanceLayout b, const float* __restrict__ scores, float d_loss, float seq_alpha,
                                    float expert_alpha, float* __restrict__ d_scores) {
  const int64_t E = b.experts, T = b.tokens;
  const double c_exp = static_cast<double>(d_loss) * static_cast<double>(expert_alpha) * static_cast<double>(E) /
                       (static_cast<double>(b.topk) * T * T);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t seq = t / b.seq_len, Ts = min64(b.seq_len, T - seq * b.seq_len);
    const double c_seq = static_cast<double>(d_loss) * static_cast<double>(seq_alpha) * static_cast<double>(E) /
                         (static_cast<double>(b.topk) * Ts * Ts * static_cast<double>(b.n_seq));
    const double* cnt = b.cnt_seq + seq * E;
    const float* s = scores + t * E;
    float* ds = d_scores + t * E;
    double dot = 0.0;
    for (int64_t e = 0; e < E; ++e) dot += c_seq * cnt[e] * s[e];
    const double inv = b.inv[t];  // the forward's 1 / (sum_e scores[t,e] + eps)
    const double mean = dot * inv;
    for (int64_t e = 0; e < E; ++e) {
      const double d = c_exp * b.cnt_all[e] + (c_seq * cnt[e] - mean) * inv;
      ds[e] = static_cast<float>(static_cast<double>(ds[e]) + d);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Routing: a stable counting sort of the picks by expert, on the device.

constexpr int kCountThreads = 256;

/// Block e counts the picks of expert e: counts[e] = #{i < picks : ids[i] == e}. No atomics: the
/// result is exact and deterministic.
__global__ void route_count_kernel(const std::int32_t* __restrict__ ids, int64_t picks, int64_t* __restrict__ counts) {
  __shared__ int64_t part[kCountThreads / kWarp];
  const int e = static_cast<int>(blockIdx.x);
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) % kWarp;
  int64_t n = 0;
  for (int64_t i = threadIdx.x; i < picks; i += blockDim.x) n += ids[i] == e ? 1 : 0;
  for (int off = kWarp / 2; off > 0; off >>= 1) n += __shfl_xor_sync(kFullMask, n, off);
  if (lane == 0) part[warp] = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kCountThreads / kWarp; ++w) total += part[w];
    counts[e] = total;
  }
}

constexpr int kPlaceThreads = 512;
constexpr int kPlaceItems = 4;  // consecutive picks per thread and tile
constexpr int kPlaceWarps = kPlaceThreads / kWarp;
constexpr int64_t kPlaceTile = static_cast<int64_t>(kPlaceThreads) * kPlaceItems;

/// Block e places the picks of expert e, in pick order, at rows offset_e, offset_e + 1, ... where
/// offset_e = counts[0] + ... + counts[e-1]: for pick i = t*K + k routed there at row r,
///   entry_token[r] = t, entry_weight[r] = topk_weights[i], pick_entry[i] = r.
/// Tiles of kPlaceTile picks; a block-wide exclusive scan of the per-thread match counts gives each
/// match its rank.
__global__ void route_place_kernel(const std::int32_t* __restrict__ ids, const float* __restrict__ topk_weights,
                                   int64_t picks, int64_t topk, const int64_t* __restrict__ counts,
                                   int64_t* __restrict__ entry_token, float* __restrict__ entry_weight,
                                   int64_t* __restrict__ pick_entry) {
  __shared__ int warp_incl[kPlaceWarps];
  __shared__ int64_t base_shared;
  const int e = static_cast<int>(blockIdx.x);
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) % kWarp;
  if (threadIdx.x == 0) {
    int64_t o = 0;
    for (int j = 0; j < e; ++j) o += counts[j];
    base_shared = o;
  }
  __syncthreads();
  int64_t base = base_shared;
  for (int64_t tile = 0; tile < picks; tile += kPlaceTile) {
    const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kPlaceItems;
    bool hit[kPlaceItems];
    int mine = 0;
#pragma unroll
    for (int q = 0; q < kPlaceItems; ++q) {
      const int64_t i = first + q;
      hit[q] = i < picks && ids[i] == e;
      mine += hit[q] ? 1 : 0;
    }
    // Inclusive scan of `mine` within the warp, then over the warps.
    int incl = mine;
    for (int off = 1; off < kWarp; off <<= 1) {
      const int v = __shfl_up_sync(kFullMask, incl, off);
      if (lane >= off) incl += v;
    }
    if (lane == kWarp - 1) warp_incl[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int w = lane < kPlaceWarps ? warp_incl[lane] : 0;
      for (int off = 1; off < kWarp; off <<= 1) {
        const int v = __shfl_up_sync(kFullMask, w, off);
        if (lane >= off) w += v;
      }
      if (lane < kPlaceWarps) warp_incl[lane] = w;
    }
    __syncthreads();
    int64_t r = base + (warp > 0 ? warp_incl[warp - 1] : 0) + (incl - mine);
#pragma unroll
    for (int q = 0; q < kPlaceItems; ++q) {
      if (!hit[q]) continue;
      const int64_t i = first + q;
      entry_token[r] = i / topk;
      entry_weight[r] = topk_weights[i];
      pick_entry[i] = r;
      ++r;
    }
    base += warp_incl[kPlaceWarps - 1];
    __syncthreads();  // warp_incl is rewritten by the next tile
  }
}

/// offsets[t] = t * step for t < n (the CSR of a combine where every token has `step` sources).
__global__ void iota_step_kernel(int64_t n, int64_t step, int64_t* __restrict__ offsets) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    offsets[i] = i * step;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Public entry points

void gate_forward(cublasHandle_t blas, const kernels::GateParams& p, const float* x, const float* wg,
                  const float* bias, float* scores, std::int32_t* topk_ids, float* topk_weights,
                  cudaStream_t stream) {
  const GateDev g = validate_gate(p, "gate_forward");
  if (p.tokens == 0) return;
  const std::size_t per_warp = gate_select_smem(g);
  const int warps = gate_warps(per_warp, "gate_forward", p.experts);
  // scores [T,E] = x [T,H] . wg [E,H]^T (the logits; the select kernel turns them into scores)
  const GemmProblem logits = gemm_problem(false, true, p.tokens, p.experts, p.hidden, x, p.hidden, wg, p.hidden, scores,
                                          p.experts);
  gemm(blas, DType::kFp32, logits, stream);
  const unsigned blocks = static_cast<unsigned>((p.tokens + warps - 1) / warps);
  const auto threads = static_cast<unsigned>(warps * kWarp);
  const std::size_t smem = per_warp * static_cast<std::size_t>(warps);
  MOEX_LAUNCH(blocks, threads, smem, stream, gate_select_kernel)(g, bias, scores, topk_ids, topk_weights,
                                                                static_cast<unsigned>(per_warp));
  MOEX_CUDA_CHECK_LAUNCH("gate_select_kernel");
}

void gate_backward(cublasHandle_t blas, const kernels::GateParams& p, const float* x, const float* wg,
                   const float* scores, const std::int32_t* topk_ids, const float* d_weights, float* dx,
                   float* dwg, float* dlogits, const float* d_scores_extra, cudaStream_t stream) {
  const GateDev g = validate_gate(p, "gate_backward");
  if (p.tokens == 0) return;
  const std::size_t per_warp = sizeof(float) * static_cast<std::size_t>(p.experts);
  const int warps = gate_warps(per_warp, "gate_backward", p.experts);
  const unsigned blocks = static_cast<unsigned>((p.tokens + warps - 1) / warps);
  const auto threads = static_cast<unsigned>(warps * kWarp);
  const std::size_t smem = per_warp * static_cast<std::size_t>(warps);
  MOEX_LAUNCH(blocks, threads, smem, stream, gate_dlogits_kernel)(g, scores, topk_ids, d_weights, d_scores_extra,
                                                                 dlogits);
  MOEX_CUDA_CHECK_LAUNCH("gate_dlogits_kernel");
  // dwg [E,H] += dlogits^T [E,T] . x [T,H]
  const GemmProblem dw = gemm_problem(true, false, p.experts, p.hidden, p.tokens, dlogits, p.experts, x, p.hidden, dwg,
                                      p.hidden, 1.0f);
  gemm(blas, DType::kFp32, dw, stream);
  // dx [T,H] += dlogits [T,E] . wg [E,H]
  const GemmProblem dxp = gemm_problem(false, false, p.tokens, p.hidden, p.experts, dlogits, p.experts, wg, p.hidden,
                                       dx, p.hidden, 1.0f);
  gemm(blas, DType::kFp32, dxp, stream);
}

void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* src,
                 std::int64_t src_stride, float* dst, std::int64_t dst_stride, cudaStream_t stream) {
  launch_gather<float, false>("gather_rows", count, width, index, nullptr, src, src_stride, dst, dst_stride, stream);
}
void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const bf16* src,
                 std::int64_t src_stride, bf16* dst, std::int64_t dst_stride, cudaStream_t stream) {
  launch_gather<bf16, false>("gather_rows", count, width, index, nullptr, src, src_stride, dst, dst_stride, stream);
}
void gather_rows_scaled(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* scale,
                        const float* src, std::int64_t src_stride, float* dst, std::int64_t dst_stride,
                        cudaStream_t stream) {
  launch_gather<float, true>("gather_rows_scaled", count, width, index, scale, src, src_stride, dst, dst_stride,
                             stream);
}
void gather_rows_scaled(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* scale,
                        const bf16* src, std::int64_t src_stride, bf16* dst, std::int64_t dst_stride,
                        cudaStream_t stream) {
  launch_gather<bf16, true>("gather_rows_scaled", count, width, index, scale, src, src_stride, dst, dst_stride,
                            stream);
}

CombinePlan build_combine_plan(std::int64_t count, std::int64_t tokens, const std::int64_t* index,
                               const float* scale) {
  if (count < 0 || tokens < 0)
    throw InvalidArgument("build_combine_plan: count = " + std::to_string(count) + ", tokens = " +
                          std::to_string(tokens) + ": both must be >= 0");
  CombinePlan plan;
  plan.tokens = tokens;
  plan.offsets.assign(static_cast<std::size_t>(tokens) + 1, 0);
  for (std::int64_t n = 0; n < count; ++n) {
    const std::int64_t t = index[n];
    if (t < 0 || t >= tokens)
      throw InvalidArgument("build_combine_plan: index[" + std::to_string(n) + "] = " + std::to_string(t) +
                            ": expected a destination row in [0, " + std::to_string(tokens) + ")");
    ++plan.offsets[static_cast<std::size_t>(t) + 1];
  }
  for (std::size_t t = 0; t < static_cast<std::size_t>(tokens); ++t) plan.offsets[t + 1] += plan.offsets[t];
  plan.src_row.assign(static_cast<std::size_t>(count), 0);
  if (scale) plan.weight.assign(static_cast<std::size_t>(count), 0.0f);
  std::vector<std::int64_t> next(plan.offsets.begin(), plan.offsets.end() - 1);
  for (std::int64_t n = 0; n < count; ++n) {  // stable: sources keep their order within a destination
    const std::size_t i = static_cast<std::size_t>(next[static_cast<std::size_t>(index[n])]++);
    plan.src_row[i] = n;
    if (scale) plan.weight[i] = scale[n];
  }
  return plan;
}

void gather_values(std::int64_t n, const std::int64_t* index, const float* src, float* dst, cudaStream_t stream) {
  if (n < 0) throw InvalidArgument("gather_values: n = " + std::to_string(n) + ": must be >= 0");
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(std::clamp<int64_t>((n + 255) / 256, 1, 65536));
  MOEX_LAUNCH(blocks, 256, 0, stream, gather_values_kernel)(n, index, src, dst);
  MOEX_CUDA_CHECK_LAUNCH("gather_values_kernel");
}

void route_by_expert(const std::int32_t* ids, const float* topk_weights, std::int64_t picks, std::int64_t topk,
                     std::int64_t experts, std::int64_t* counts, std::int64_t* entry_token, float* entry_weight,
                     std::int64_t* pick_entry, cudaStream_t stream) {
  if (picks < 0 || topk < 1 || experts < 1 || experts > kMaxBlocks || picks % topk != 0)
    throw InvalidArgument("route_by_expert: picks = " + std::to_string(picks) + ", topk = " + std::to_string(topk) +
                          ", experts = " + std::to_string(experts) + ": expected picks >= 0 a multiple of topk >= 1 "
                          "and 1 <= experts <= " + std::to_string(kMaxBlocks));
  const auto blocks = static_cast<unsigned>(experts);
  MOEX_LAUNCH(blocks, kCountThreads, 0, stream, route_count_kernel)(ids, picks, counts);
  MOEX_CUDA_CHECK_LAUNCH("route_count_kernel");
  MOEX_LAUNCH(blocks, kPlaceThreads, 0, stream, route_place_kernel)(ids, topk_weights, picks, topk, counts, entry_token,
                                                                    entry_weight, pick_entry);
  MOEX_CUDA_CHECK_LAUNCH("route_place_kernel");
}

void fill_step(std::int64_t n, std::int64_t step, std::int64_t* out, cudaStream_t stream) {
  if (n < 0) throw InvalidArgument("fill_step: n = " + std::to_string(n) + ": must be >= 0");
  if (n == 0) return;
  MOEX_LAUNCH(blocks_for(n, kEltThreads), kEltThreads, 0, stream, iota_step_kernel)(n, step, out);
  MOEX_CUDA_CHECK_LAUNCH("iota_step_kernel");
}

void combine_rows(std::int64_t tokens, std::int64_t width, const std::int64_t* offsets, const std::int64_t* src_row,
                  const float* weight, const float* src, std::int64_t src_stride, float* dst, std::int64_t dst_stride,
                  bool accumulate, cudaStream_t stream) {
  launch_combine<float>(tokens, width, offsets, src_row, weight, src, src_stride, dst, dst_stride, accumulate, stream);
}
void combine_rows(std::int64_t tokens, std::int64_t width, const std::int64_t* offsets, const std::int64_t* src_row,
                  const float* weight, const bf16* src, std::int64_t src_stride, bf16* dst, std::int64_t dst_stride,
                  bool accumulate, cudaStream_t stream) {
  launch_combine<bf16>(tokens, width, offsets, src_row, weight, src, src_stride, dst, dst_stride, accumulate, stream);
}

void row_dot(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* a, std::int64_t a_stride,
             const float* b, std::int64_t b_stride, float* out, cudaStream_t stream) {
  launch_row_dot<float>(count, width, index, a, a_stride, b, b_stride, out, stream);
}
void row_dot(std::int64_t count, std::int64_t width, const std::int64_t* index, const bf16* a, std::int64_t a_stride,
             const bf16* b, std::int64_t b_stride, float* out, cudaStream_t stream) {
  launch_row_dot<bf16>(count, width, index, a, a_stride, b, b_stride, out, stream);
}

void swiglu_forward(std::int64_t rows, std::int64_t ffn, const float* h13, float* sig, float* a, cudaStream_t stream) {
  launch_swiglu_fwd<float>(rows, ffn, h13, sig, a, stream);
}
void swiglu_forward(std::int64_t rows, std::int64_t ffn, const bf16* h13, bf16* sig, bf16* a, cudaStream_t stream) {
  launch_swiglu_fwd<bf16>(rows, ffn, h13, sig, a, stream);
}
void swiglu_backward(std::int64_t rows, std::int64_t ffn, const float* h13, const float* sig, const float* da,
                     std::int64_t da_stride, float* dh13, cudaStream_t stream) {
  launch_swiglu_bwd<float>(rows, ffn, h13, sig, da, da_stride, dh13, stream);
}
void swiglu_backward(std::int64_t rows, std::int64_t ffn, const bf16* h13, const bf16* sig, const bf16* da,
                     std::int64_t da_stride, bf16* dh13, cudaStream_t stream) {
  launch_swiglu_bwd<bf16>(rows, ffn, h13, sig, da, da_stride, dh13, stream);
}

void convert(const float* src, bf16* dst, std::int64_t n, cudaStream_t stream) {
  launch_convert<float, bf16>(src, dst, n, stream);
}
void convert(const bf16* src, float* dst, std::int64_t n, cudaStream_t stream) {
  launch_convert<bf16, float>(src, dst, n, stream);
}
void convert(const float* src, float* dst, std::int64_t n, cudaStream_t stream) {
  launch_convert<float, float>(src, dst, n, stream);
}

void add_to(const float* src, float* dst, std::int64_t n, cudaStream_t stream) { launch_add_f32(src, dst, n, stream); }
void add_to(const bf16* src, float* dst, std::int64_t n, cudaStream_t stream) { launch_add_f32(src, dst, n, stream); }

void fill_uniform(float* dst, std::int64_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  launch_fill<float>(dst, n, seed, scale, stream);
}
void fill_uniform(bf16* dst, std::int64_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  launch_fill<bf16>(dst, n, seed, scale, stream);
}

std::size_t balance_loss_scratch_bytes(const kernels::BalanceLossParams& p) {
  kernels::check_balance_params(p, "balance_loss_scratch_bytes");
  if (p.tokens == 0) return 0;
  const BalanceLayout b = balance_layout(p, nullptr);
  return sizeof(double) *
         static_cast<std::size_t>(p.tokens + 2 * p.experts + b.n_seq * (2 * p.experts + 1) + 2 * b.part_items());
}

void balance_loss_forward(const kernels::BalanceLossParams& p, const float* scores, const std::int32_t* topk_ids,
                          void* scratch, double* value, cudaStream_t stream) {
  kernels::check_balance_params(p, "balance_loss_forward");
  if (!value) throw InvalidArgument("balance_loss_forward: value is null (expected a device array of 2 doubles)");
  if (p.tokens == 0) {
    MOEX_CUDA_CHECK(cudaMemsetAsync(value, 0, 2 * sizeof(double), stream));
    return;
  }
  if (!scores || !topk_ids || !scratch)
    throw InvalidArgument("balance_loss_forward: scores, topk_ids or scratch is null with tokens = " +
                          std::to_string(p.tokens));
  const BalanceLayout b = balance_layout(p, scratch);
  MOEX_LAUNCH(blocks_for(p.tokens, kEltThreads), kEltThreads, 0, stream, balance_inv_kernel)(b, scores);
  MOEX_CUDA_CHECK_LAUNCH("balance_inv_kernel");
  MOEX_LAUNCH(blocks_for(b.part_items(), kEltThreads), kEltThreads, 0, stream, balance_parts_kernel)(b, scores,
                                                                                                   topk_ids);
  MOEX_CUDA_CHECK_LAUNCH("balance_parts_kernel");
  MOEX_LAUNCH(blocks_for((b.n_seq + 1) * p.experts, kEltThreads), kEltThreads, 0, stream, balance_stats_kernel)(b);
  MOEX_CUDA_CHECK_LAUNCH("balance_stats_kernel");
  MOEX_LAUNCH(1, kBalanceValueThreads, 0, stream, balance_value_kernel)(b, p.seq_alpha, p.expert_alpha, value);
  MOEX_CUDA_CHECK_LAUNCH("balance_value_kernel");
}

void balance_loss_backward(const kernels::BalanceLossParams& p, const float* scores, const void* scratch,
                           float d_loss, float* d_scores, cudaStream_t stream) {
  kernels::check_balance_params(p, "balance_loss_backward");
  if (p.tokens == 0) return;
  if (!scores || !scratch || !d_scores)
    throw InvalidArgument("balance_loss_backward: scores, scratch or d_scores is null with tokens = " +
                          std::to_string(p.tokens));
  const BalanceLayout b = balance_layout(p, const_cast<void*>(scratch));
  MOEX_LAUNCH(blocks_for(p.tokens, kEltThreads), kEltThreads, 0, stream, balance_grad_kernel)(
      b, scores, d_loss, p.seq_alpha, p.expert_alpha, d_scores);
  MOEX_CUDA_CHECK_LAUNCH("balance_grad_kernel");
}

}  // namespace moex::cuda
