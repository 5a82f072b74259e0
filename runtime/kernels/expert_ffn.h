// SwiGLU expert FFN over a block of rows: forward and backward (GEMMs through BLAS).
#pragma once

#include <cstdint>

namespace moex::kernels {

/// Shape of one expert block: `rows` tokens of width `hidden` through an FFN of width `ffn`.
/// Weights: w13 [2*ffn, hidden] = gate_proj rows then up_proj rows; w2 [hidden, ffn] = down_proj.
struct FfnShape {
  std::int64_t rows = 0;
  std::int64_t hidden = 0;
  std::int64_t ffn = 0;
};

/// How the row-wise GEMMs of an FFN run: BLAS sgemm (fastest), or rowwise_gemm (each row's result
/// independent of the other rows in the call: results do not change with how rows are chunked).
enum class GemmKind { kBlas, kRowwise };

/// y = down(silu(gate x) * up x). Saves h13 [rows, 2*ffn], sig = sigmoid(gate x) [rows, ffn] and
/// a [rows, ffn] for backward; writes y [rows, hidden] (overwrites).
void swiglu_ffn_forward(const FfnShape& s, const float* x, const float* w13, const float* w2,
                        float* h13, float* sig, float* a, float* y, GemmKind gemm = GemmKind::kBlas);

/// From dy [rows, hidden]: accumulates dw13 += and dw2 += (or overwrites them when `accumulate` is
/// false), writes dx [rows, hidden] (overwrites). `dh13` is scratch of [rows, 2*ffn] floats.
void swiglu_ffn_backward(const FfnShape& s, const float* x, const float* w13, const float* w2,
                         const float* h13, const float* sig, const float* a, const float* dy, float* dw13, float* dw2,
                         float* dx, float* dh13, bool accumulate = true);

/// The data half of swiglu_ffn_backward: dh13 [rows, 2*ffn] (gradient of the gate/up GEMM output)
/// and dx [rows, hidden] (overwritten). Row-local: each row's results depend only on that row.
void swiglu_ffn_backward_data(const FfnShape& s, const float* w13, const float* w2, const float* h13,
                              const float* sig, const float* dy, float* dh13, float* dx,
                              GemmKind gemm = GemmKind::kBlas);
/// The weight half: dw2 (+)= dy^T a and dw13 (+)= dh13^T x over the block's rows (overwrites when
/// `accumulate` is false; with 0 rows an overwrite writes zeros).
void swiglu_ffn_backward_weights(const FfnShape& s, const float* x, const float* a, const float* dy,
                                 const float* dh13, float* dw13, float* dw2, bool accumulate);

}  // namespace moex::kernels
