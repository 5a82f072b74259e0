// CUDA kernels of the GPU path: gate, permute / combine, SwiGLU and dtype conversion.
//
// Plain C++ header: raw device pointers, sizes and a cudaStream_t at the boundary. Every pointer
// named here is a DEVICE pointer unless said otherwise. Matrices are row-major with the strides
// given (in elements). The semantics are exactly those of the CPU kernels in runtime/kernels/ (same
// names), so the CPU kernels are the reference in the tests. All calls are asynchronous on `stream`;
// shape errors are thrown as InvalidArgument before anything is queued, CUDA / cuBLAS failures as
// CudaError (a fault inside a kernel surfaces at a later synchronisation).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "runtime/kernels/balance.h"
#include "runtime/kernels/gate.h"

namespace moex::cuda {

using bf16 = __nv_bfloat16;

// ---------------------------------------------------------------------------------------------------
// Gate (fp32)

/// Device version of kernels::gate_forward, same semantics: logits = x [T,H] . wg [E,H]^T by cuBLAS
/// (fp32), then one warp per token applies softmax / sigmoid, the selection bias (`bias` [E], may be
/// null), the group limit (group_limited_greedy: group score = max; noaux_tc: sum of the top-2), the
/// top-K (ties to the lower expert id), the normalisation (+1e-20) when norm_topk_prob and
/// routed_scaling_factor. Writes `scores` [T,E] (kept for backward), `topk_ids` [T,K] and
/// `topk_weights` [T,K]. Throws InvalidArgument when p breaks a rule (experts >= 1, 1 <= topk <=
/// experts, n_group >= 1 dividing experts and 1 <= topk_group <= n_group for a grouped method) or
/// when the per-token scratch (about 9 bytes per expert) does not fit in shared memory.
void gate_forward(cublasHandle_t blas, const kernels::GateParams& p, const float* x, const float* wg,
                  const float* bias, float* scores, std::int32_t* topk_ids, float* topk_weights,
                  cudaStream_t stream);

/// Device version of kernels::gate_backward: from d_weights [T,K] writes `dlogits` [T,E] (scratch
/// the caller provides), then accumulates dx [T,H] += dlogits . wg and dwg [E,H] += dlogits^T . x
/// by cuBLAS. `scores` and `topk_ids` are the forward's outputs. `d_scores_extra` [T,E] (may be
/// null) is a further gradient wrt `scores` added to every expert before the sigmoid / softmax
/// Jacobian, exactly as on the CPU.
void gate_backward(cublasHandle_t blas, const kernels::GateParams& p, const float* x, const float* wg,
                   const float* scores, const std::int32_t* topk_ids, const float* d_weights, float* dx,
                   float* dwg, float* dlogits, const float* d_scores_extra, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Auxiliary balance losses (runtime/kernels/balance.h: fp32 scores, sums in double)

/// Device scratch, in bytes, that balance_loss_forward and balance_loss_backward need for `p`:
/// 8 * (T + 2 E + n_seq (2 E + 1) + 2 E (n_seq ceil(L / 256) + ceil(T / 256))), n_seq the number of
/// sequences and L their length.
std::size_t balance_loss_scratch_bytes(const kernels::BalanceLossParams& p);

/// Device version of kernels::balance_loss_forward, with the CPU's formulas and sums in double (over
/// tokens in blocks of 256, added in order; so the values agree with the CPU's to double rounding and
/// do not depend on the launch): from `scores` [T,E] and `topk_ids` [T,K] (ids in [0, E):
/// the gate's outputs; not checked on the device) writes value[0] = the sequence-wise loss and
/// value[1] = the expert-level loss (device doubles), and leaves the per-sequence counts and score
/// sums in `scratch` (balance_loss_scratch_bytes(p), 8-byte aligned) for balance_loss_backward.
/// InvalidArgument for the CPU's shape errors, or null pointers where T > 0.
void balance_loss_forward(const kernels::BalanceLossParams& p, const float* scores, const std::int32_t* topk_ids,
                          void* scratch, double* value, cudaStream_t stream);
/// Device version of kernels::balance_loss_backward: d_scores [T,E] += d_loss * d(L_seq + L_exp) /
/// d(scores), from the statistics that a balance_loss_forward with the same p, scores and topk_ids
/// left in `scratch`. Pass d_scores to gate_backward as d_scores_extra.
void balance_loss_backward(const kernels::BalanceLossParams& p, const float* scores, const void* scratch,
                           float d_loss, float* d_scores, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Permute and combine (fp32 or bf16 rows; bf16 is accumulated in fp32). Indexes are not checked on
// the device: every index must lie inside the matrix it selects from.

/// dst[n, :width] = src[index[n] * src_stride, :width] for n < count (kernels::gather_rows).
/// `index` [count] is a device array. Uses 16-byte loads when width, strides and pointers allow.
void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* src,
                 std::int64_t src_stride, float* dst, std::int64_t dst_stride, cudaStream_t stream);
void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const bf16* src,
                 std::int64_t src_stride, bf16* dst, std::int64_t dst_stride, cudaStream_t stream);

/// dst[n, :width] = scale[n] * src[index[n] * src_stride, :width] (`scale` [count] may be null for
/// 1). The backward of the combine wrt the expert outputs: d_expert_out[n] = w[n] * dy[token(n)].
void gather_rows_scaled(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* scale,
                        const float* src, std::int64_t src_stride, float* dst, std::int64_t dst_stride,
                        cudaStream_t stream);
void gather_rows_scaled(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* scale,
                        const bf16* src, std::int64_t src_stride, bf16* dst, std::int64_t dst_stride,
                        cudaStream_t stream);

/// The rows of a deterministic combine, by destination (CSR), built on the host: destination t
/// takes the sources i in [offsets[t], offsets[t+1]), each row src_row[i] with weight weight[i], in
/// that order. `weight` is empty when every weight is 1.
struct CombinePlan {
  std::int64_t tokens = 0;
  std::vector<std::int64_t> offsets;  ///< [tokens + 1]
  std::vector<std::int64_t> src_row;  ///< [count]
  std::vector<float> weight;          ///< [count] or empty
};

/// The plan equal to kernels::scatter_add_rows(count, width, index, scale, ...): source row n adds
/// into destination index[n] with weight scale[n] (scale may be null for 1); within a destination
/// the sources keep the order n = 0, 1, ... (a stable counting sort). Host arrays; throws
/// InvalidArgument for an index outside [0, tokens).
CombinePlan build_combine_plan(std::int64_t count, std::int64_t tokens, const std::int64_t* index,
                               const float* scale);

/// Deterministic combine, no atomics: for each destination t < tokens (one block per token),
///   dst[t] = (accumulate ? dst[t] : 0) + sum_i weight[i] * src[src_row[i]]   over i in CSR order,
/// with an fp32 accumulator. `offsets` [tokens+1], `src_row` [offsets[tokens]] and `weight` (may be
/// null for 1) are device arrays (upload a CombinePlan). With accumulate = true this equals
/// kernels::scatter_add_rows up to rounding (fused multiply-adds); it also serves as the backward of
/// gather_rows (d_src[t] += sum of d_dst[n] over index[n] == t).
void combine_rows(std::int64_t tokens, std::int64_t width, const std::int64_t* offsets, const std::int64_t* src_row,
                  const float* weight, const float* src, std::int64_t src_stride, float* dst, std::int64_t dst_stride,
                  bool accumulate, cudaStream_t stream);
void combine_rows(std::int64_t tokens, std::int64_t width, const std::int64_t* offsets, const std::int64_t* src_row,
                  const float* weight, const bf16* src, std::int64_t src_stride, bf16* dst, std::int64_t dst_stride,
                  bool accumulate, cudaStream_t stream);

/// out[n] = sum_j a[index[n] * a_stride + j] * b[n * b_stride + j] for n < count, j < width, in fp32
/// with a fixed reduction order (deterministic). `index` may be null for the identity. The backward
/// of the combine wrt the routing weights: d_weight[n] = dot(dy[token(n)], expert_out[n]).
void row_dot(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* a, std::int64_t a_stride,
             const float* b, std::int64_t b_stride, float* out, cudaStream_t stream);
void row_dot(std::int64_t count, std::int64_t width, const std::int64_t* index, const bf16* a, std::int64_t a_stride,
             const bf16* b, std::int64_t b_stride, float* out, cudaStream_t stream);

/// The picks of `ids` ([picks] expert ids in [0, experts), picks = tokens * topk) sorted by expert,
/// stably (within an expert, in pick order), without atomics: counts[e] = the picks of expert e,
/// and pick i = t * topk + k of expert e at row r = counts[0] + ... + counts[e-1] + (its rank
/// among e's picks) gives entry_token[r] = t, entry_weight[r] = topk_weights[i], pick_entry[i] = r.
/// Device arrays ([experts] counts, [picks] others). InvalidArgument on picks not a multiple of
/// topk >= 1, or experts outside [1, 65536]. Ids are not checked on the device.
void route_by_expert(const std::int32_t* ids, const float* topk_weights, std::int64_t picks, std::int64_t topk,
                     std::int64_t experts, std::int64_t* counts, std::int64_t* entry_token, float* entry_weight,
                     std::int64_t* pick_entry, cudaStream_t stream);
/// out[i] = i * step for i < n (device array).
void fill_step(std::int64_t n, std::int64_t step, std::int64_t* out, cudaStream_t stream);

/// dst[i] = index[i] >= 0 ? src[index[i]] : 0 for i < n (fp32 scalars; `index` [n] a device array).
/// Moves routing weights and their gradients between per-pick, per-entry and per-row orders.
void gather_values(std::int64_t n, const std::int64_t* index, const float* src, float* dst, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// SwiGLU activation over rows (fp32 math with the formulas of runtime/kernels/math.h)

/// For r < rows, j < ffn, with g = h13[r, j] and u = h13[r, ffn + j] (h13 is [rows, 2*ffn]):
/// sig[r, j] = sigmoid(g) and a[r, j] = silu(g) * u (sig and a are [rows, ffn]).
void swiglu_forward(std::int64_t rows, std::int64_t ffn, const float* h13, float* sig, float* a, cudaStream_t stream);
void swiglu_forward(std::int64_t rows, std::int64_t ffn, const bf16* h13, bf16* sig, bf16* a, cudaStream_t stream);

/// From da [rows, ffn] (row stride `da_stride`): dh13[r, j] = dg and dh13[r, ffn + j] = du of
/// math::swiglu_backward_saved with the saved sig. `da` may alias the up half of dh13
/// (da = dh13 + ffn, da_stride = 2*ffn): each element is read before it is overwritten.
void swiglu_backward(std::int64_t rows, std::int64_t ffn, const float* h13, const float* sig, const float* da,
                     std::int64_t da_stride, float* dh13, cudaStream_t stream);
void swiglu_backward(std::int64_t rows, std::int64_t ffn, const bf16* h13, const bf16* sig, const bf16* da,
                     std::int64_t da_stride, bf16* dh13, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Conversion and fill

/// dst[i] = src[i] rounded to bf16 (round to nearest even) for i < n.
void convert(const float* src, bf16* dst, std::int64_t n, cudaStream_t stream);
/// dst[i] = src[i] widened to fp32 (exact) for i < n.
void convert(const bf16* src, float* dst, std::int64_t n, cudaStream_t stream);
/// dst[i] = src[i] for i < n (the fp32 case of the conversions above: a copy).
void convert(const float* src, float* dst, std::int64_t n, cudaStream_t stream);
/// dst[i] += src[i] (widened to fp32) for i < n.
void add_to(const float* src, float* dst, std::int64_t n, cudaStream_t stream);
void add_to(const bf16* src, float* dst, std::int64_t n, cudaStream_t stream);

/// dst[i] = uniform in [-scale, scale), a hash of (seed, i): the same values on every device and
/// launch shape (test and benchmark data without a host round trip).
void fill_uniform(float* dst, std::int64_t n, std::uint64_t seed, float scale, cudaStream_t stream);
void fill_uniform(bf16* dst, std::int64_t n, std::uint64_t seed, float scale, cudaStream_t stream);

}  // namespace moex::cuda
