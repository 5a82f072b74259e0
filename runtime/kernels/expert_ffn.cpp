// CPU SwiGLU expert FFN.
#include "runtime/kernels/expert_ffn.h"

#include <algorithm>
#include <vector>

#include "runtime/blas.h"
#include "runtime/kernels/math.h"
#include "runtime/kernels/rowwise_gemm.h"
#include "runtime/kernels/swiglu_rows.h"
#include "runtime/parallel.h"

namespace moex::kernels {

namespace {
// C[m, n] = A[m, k] . B^T, B stored [n, k].
void gemm_nt(GemmKind g, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, const float* b, float* c) {
  if (g == GemmKind::kBlas) {
    blas::sgemm(false, true, m, n, k, 1.0f, a, k, b, k, 0.0f, c, n);
    return;
  }
  thread_local std::vector<float> scratch;  // transposed weights, reused across calls
  rowwise_gemm_nt(m, n, k, a, k, b, k, c, n, scratch);
}
// C[m, n] (row stride ldc) = A[m, k] . B[k, n].
void gemm_nn(GemmKind g, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, const float* b, float* c,
             std::int64_t ldc) {
  if (g == GemmKind::kBlas) blas::sgemm(false, false, m, n, k, 1.0f, a, k, b, n, 0.0f, c, ldc);
  else rowwise_gemm_nn(m, n, k, a, k, b, n, c, ldc);
}
}  // namespace

void swiglu_ffn_forward(const FfnShape& s, const float* x, const float* w13, const float* w2,
                        float* h13, float* sig, float* a, float* y, GemmKind gemm) {
  const std::int64_t H = s.hidden, F = s.ffn;
  if (s.rows == 0) return;
  gemm_nt(gemm, s.rows, 2 * F, H, x, w13, h13);
  parallel_for(s.rows, 16, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* g = h13 + r * 2 * F;
      swiglu_forward_row(g, g + F, sig + r * F, a + r * F, F);
    }
  });
  gemm_nt(gemm, s.rows, H, F, a, w2, y);
}

void swiglu_ffn_backward_data(const FfnShape& s, const float* w13, const float* w2, const float* h13,
                              const float* sig, const float* dy, float* dh13, float* dx, GemmKind gemm) {
  const std::int64_t H = s.hidden, F = s.ffn;
  if (s.rows == 0) return;
  // dA = dy . w2 lands in the up half of dh13, then both halves are rewritten element by element.
  gemm_nn(gemm, s.rows, F, H, dy, w2, dh13 + F, 2 * F);
  parallel_for(s.rows, 16, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* g = h13 + r * 2 * F;
      const float* sr = sig + r * F;
      float* d = dh13 + r * 2 * F;
      for (std::int64_t j = 0; j < F; ++j) {
        float dg, du;
        math::swiglu_backward_saved(g[j], g[F + j], sr[j], d[F + j], &dg, &du);
        d[j] = dg;
        d[F + j] = du;
      }
    }
  });
  gemm_nn(gemm, s.rows, H, 2 * F, dh13, w13, dx, H);
}

void swiglu_ffn_backward_weights(const FfnShape& s, const float* x, const float* a, const float* dy,
                                 const float* dh13, float* dw13, float* dw2, bool accumulate) {
  const std::int64_t H = s.hidden, F = s.ffn;
  if (s.rows == 0) {
    if (!accumulate) {  // no rows: the overwritten gradient is zero
      std::fill_n(dw13, 2 * F * H, 0.0f);
      std::fill_n(dw2, H * F, 0.0f);
    }
    return;
  }
  const float beta = accumulate ? 1.0f : 0.0f;
  blas::sgemm(true, false, H, F, s.rows, 1.0f, dy, H, a, F, beta, dw2, F);
  blas::sgemm(true, false, 2 * F, H, s.rows, 1.0f, dh13, 2 * F, x, H, beta, dw13, H);
}

void swiglu_ffn_backward(const FfnShape& s, const float* x, const float* w13, const float* w2,
                         const float* h13, const float* sig, const float* a, const float* dy, float* dw13, float* dw2,
                         float* dx, float* dh13, bool accumulate) {
  swiglu_ffn_backward_data(s, w13, w2, h13, sig, dy, dh13, dx);
  swiglu_ffn_backward_weights(s, x, a, dy, dh13, dw13, dw2, accumulate);
}

}  // namespace moex::kernels
