// GEMMs of the GPU path: one dense row-major GEMM, a grouped GEMM over problems of different shapes,
// and the SwiGLU expert FFN of E experts with variable row counts built on them (forward, backward).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "runtime/cuda/device.h"

namespace moex::cuda {

/// Element type of a GEMM's A, B and C. Both accumulate in fp32 (CUBLAS_COMPUTE_32F; no TF32, so
/// kFp32 matches the CPU up to summation order). kBf16: __nv_bfloat16 inputs AND outputs.
enum class DType { kFp32, kBf16 };
/// How GroupedGemm runs its problems: one cublasGemmGroupedBatchedEx call (cuBLAS >= 12.5), a loop
/// of cublasGemmEx calls (one per problem), or fixed_order_gemm() per problem (no cuBLAS: slower, but
/// a row's result does not depend on the other rows of the call). All give results equal up to
/// rounding.
enum class GroupedGemmImpl { kGroupedBatched, kLoop, kFixedOrder };

const char* to_string(DType t);
const char* to_string(GroupedGemmImpl impl);
/// Bytes of one element of `t` (4 or 2).
std::size_t dtype_size(DType t);

/// One row-major GEMM, as blas::sgemm: C[m,n] = alpha * op(A) . op(B) + beta * C, op(A) [m,k],
/// op(B) [k,n]; `trans_a` means A is stored [k,m], `trans_b` means B is stored [n,k]; leading
/// dimensions in elements. Device pointers to elements of the DType the call is made with.
struct GemmProblem {
  bool trans_a = false;
  bool trans_b = false;
  std::int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  std::int64_t lda = 0;
  const void* b = nullptr;
  std::int64_t ldb = 0;
  void* c = nullptr;
  std::int64_t ldc = 0;
  float alpha = 1.0f;
  float beta = 0.0f;
};

/// A GemmProblem from its fields in declaration order (alpha = 1).
inline GemmProblem gemm_problem(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                                const void* a, std::int64_t lda, const void* b, std::int64_t ldb, void* c,
                                std::int64_t ldc, float beta = 0.0f) {
  GemmProblem p;
  p.trans_a = trans_a;
  p.trans_b = trans_b;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a = a;
  p.lda = lda;
  p.b = b;
  p.ldb = ldb;
  p.c = c;
  p.ldc = ldc;
  p.beta = beta;
  return p;
}
/// `base` advanced by `elems` elements of `es` bytes (untyped device pointers).
inline const void* elem_at(const void* base, std::int64_t elems, std::size_t es) {
  return static_cast<const char*>(base) + elems * static_cast<std::int64_t>(es);
}
inline void* elem_at(void* base, std::int64_t elems, std::size_t es) {
  return static_cast<char*>(base) + elems * static_cast<std::int64_t>(es);
}

/// Runs one GEMM with cublasGemmEx on `stream` (sets the handle's stream). m == 0 or n == 0 is a
/// no-op; k == 0 scales C by beta (beta must then be 0 or 1). Throws InvalidArgument for a negative
/// size, a leading dimension smaller than its row, or a size above INT_MAX; CudaError from cuBLAS.
void gemm(cublasHandle_t blas, DType dtype, const GemmProblem& p, cudaStream_t stream);

/// One GEMM (GemmProblem's rules) through moex's own tiled kernel instead of cuBLAS: every element of
/// C is alpha * (one fp32 fused multiply-add chain over l = 0, 1, ..., k-1, in that order) + beta * C.
/// The result of a row of C therefore depends only on that row of op(A) and on op(B): not on m, on
/// the other rows, on the tiling or on the device, so splitting the rows over several calls (pipeline
/// chunks) gives the same bits. With `k_rows` (a device array of k indexes, or null), the reduction
/// runs over the stored rows k_rows[0], k_rows[1], ... of the operands that are stored k-major (A
/// when trans_a, B when !trans_b) instead of rows 0..k-1: a weight gradient over gathered rows in a
/// chosen order. Same validation as gemm(), plus InvalidArgument for k_rows with an operand whose
/// k dimension is not its rows (neither trans_a nor !trans_b). Elements of `dtype`, fp32 accumulation.
void fixed_order_gemm(DType dtype, const GemmProblem& p, const std::int64_t* k_rows, cudaStream_t stream);

/// Runs a set of independent GEMMs of different shapes (outputs must not overlap). kGroupedBatched
/// merges problems of identical shape into one cuBLAS group and issues a single
/// cublasGemmGroupedBatchedEx; its device pointer table is uploaded with one cudaMemcpyAsync from
/// pageable host memory per run and lives in a buffer that only grows, so a steady state allocates
/// nothing. Consecutive runs of one GroupedGemm must be ordered (the same stream, or synchronised).
/// With kBf16, a problem whose a, b or c pointer is not 16-byte aligned runs through cublasGemmEx
/// instead (the grouped call reads the pointers on the device and requires that alignment).
class GroupedGemm {
 public:
  explicit GroupedGemm(GroupedGemmImpl impl = GroupedGemmImpl::kGroupedBatched) : impl_(impl) {}
  GroupedGemmImpl impl() const { return impl_; }
  /// Queues every problem on `stream` (same rules per problem as gemm()).
  void run(cublasHandle_t blas, DType dtype, std::span<const GemmProblem> problems, cudaStream_t stream);

 private:
  GroupedGemmImpl impl_;
  // Host staging reused across runs (capacity only grows).
  std::vector<std::size_t> order_;
  std::vector<cublasOperation_t> op_a_, op_b_;
  std::vector<int> m_, n_, k_, lda_, ldb_, ldc_, group_size_;
  std::vector<float> alpha_, beta_;
  std::vector<const void*> table_;  // [A pointers | B pointers | C pointers], cuBLAS's operand order
  DeviceBuffer<const void*> d_table_;
};

/// The expert FFN of `experts` experts of one layer on the device (the batched version of
/// kernels::swiglu_ffn_forward / swiglu_ffn_backward; weight layout as in runtime/kernels/expert_ffn.h):
///   x    [N, hidden]      the rows of expert 0, then expert 1, ... (N = sum of rows_per_expert)
///   w13  [E, 2*ffn, hidden]  per expert gate_proj rows then up_proj rows
///   w2   [E, hidden, ffn]    per expert down_proj
/// (expert e's blocks start at w13 + e*2*ffn*hidden and w2 + e*hidden*ffn; with a non-zero
/// `expert_stride` both start at e*expert_stride instead, e.g. the interleaved per-expert
/// [w13 | w2] blocks of MoELayer::experts(): w2 = w13 + 2*ffn*hidden, expert_stride = 3*ffn*hidden.
/// The gradients dw13 / dw2 use the same offsets.)
///   h13  [N, 2*ffn], sig [N, ffn], a [N, ffn]  saved by forward for backward
///   y    [N, hidden]
/// All tensors have the element type of the DType (float or __nv_bfloat16); accumulation is fp32.
/// With kBf16 every GEMM output (h13, y, dx, dw13, dw2, dh13) is rounded to bf16.
struct GroupedFfnShape {
  std::int64_t experts = 0;
  std::int64_t hidden = 0;
  std::int64_t ffn = 0;
  /// Elements from one expert's w13 (and w2) block to the next; 0 = dense ([E,2F,H] and [E,H,F]).
  std::int64_t expert_stride = 0;
  std::int64_t w13_stride() const { return expert_stride != 0 ? expert_stride : 2 * ffn * hidden; }
  std::int64_t w2_stride() const { return expert_stride != 0 ? expert_stride : hidden * ffn; }
};

class GroupedFfn {
 public:
  /// Throws InvalidArgument unless experts >= 1, hidden >= 1, ffn >= 1 and expert_stride is 0 or
  /// >= 2*ffn*hidden (one expert's w13 block).
  GroupedFfn(const GroupedFfnShape& shape, DType dtype, GroupedGemmImpl impl);

  const GroupedFfnShape& shape() const { return shape_; }
  DType dtype() const { return dtype_; }
  GroupedGemmImpl impl() const { return gemm_.impl(); }

  /// y = w2 . swiglu(w13 . x) per expert; writes h13, sig, a and y (overwrites). `rows_per_expert`
  /// is a HOST span of `experts` counts >= 0 (0-row experts are skipped). 2 GEMM launches (grouped)
  /// and one SwiGLU kernel.
  void forward(cublasHandle_t blas, std::span<const std::int64_t> rows_per_expert, const void* x, const void* w13,
               const void* w2, void* h13, void* sig, void* a, void* y, cudaStream_t stream);

  /// Backward from dy [N, hidden]: writes dx [N, hidden] (overwrites) and dw13 [E, 2F, H], dw2
  /// [E, H, F] (accumulates when `accumulate`, else overwrites; a 0-row expert's overwritten
  /// gradient is zero). `dh13` [N, 2*ffn] is caller scratch. Weight and data GEMMs share launches:
  /// {dA = dy . w2, dw2 (+)= dy^T a}, SwiGLU backward, {dx = dh13 . w13, dw13 (+)= dh13^T x}.
  void backward(cublasHandle_t blas, std::span<const std::int64_t> rows_per_expert, const void* x,
                const void* w13, const void* w2, const void* h13, const void* sig, const void* a, const void* dy,
                void* dw13, void* dw2, void* dx, void* dh13, bool accumulate, cudaStream_t stream);

  /// The data half of backward(): dh13 and dx only (the weight gradients are left alone). Each row's
  /// results depend only on that row (with kFixedOrder, bitwise).
  void backward_data(cublasHandle_t blas, std::span<const std::int64_t> rows_per_expert, const void* w13,
                     const void* w2, const void* h13, const void* sig, const void* dy, void* dx, void* dh13,
                     cudaStream_t stream);
  /// The weight half of backward() through fixed_order_gemm over gathered rows: expert e's
  /// gradients sum over the rows k_rows[o_e], ..., k_rows[o_e + r_e - 1] of x, a, dy and dh13 (in that
  /// order; o_e = sum of the counts before e, r_e = rows_per_expert[e]; `k_rows` is a device array of
  /// sum(rows_per_expert) row indexes into those arrays). dw13 / dw2 accumulate when `accumulate`,
  /// else are overwritten (zeros for a 0-row expert). The sum's order is the one k_rows gives, so
  /// the gradients do not depend on how the rows were split into forward / data-backward calls.
  void backward_weights(std::span<const std::int64_t> rows_per_expert, const std::int64_t* k_rows, const void* x,
                        const void* a, const void* dy, const void* dh13, void* dw13, void* dw2, bool accumulate,
                        cudaStream_t stream);

  /// FLOPs of forward (6 N H F) and backward (12 N H F) for N routed rows.
  static double forward_flops(std::int64_t rows, std::int64_t hidden, std::int64_t ffn);
  static double backward_flops(std::int64_t rows, std::int64_t hidden, std::int64_t ffn);

 private:
  /// Validates rows_per_expert and fills offsets_ (prefix sums); returns N.
  std::int64_t plan_rows(std::span<const std::int64_t> rows_per_expert, const char* what);
  void swiglu_fwd(std::int64_t rows, const void* h13, void* sig, void* a, cudaStream_t stream) const;
  void swiglu_bwd(std::int64_t rows, const void* h13, const void* sig, void* dh13, cudaStream_t stream) const;

  GroupedFfnShape shape_;
  DType dtype_;
  GroupedGemm gemm_;
  std::vector<std::int64_t> offsets_;
  std::vector<GemmProblem> problems_;
};

}  // namespace moex::cuda
