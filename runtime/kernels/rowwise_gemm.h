// A row-independent matrix product: every output row gets the same bits whichever rows it is
// computed with, so results do not depend on how a batch is cut into chunks.
#pragma once

#include <cstdint>
#include <vector>

namespace moex::kernels {

/// C[m, n] = A[m, k] . B[k, n] (all row-major, leading dimensions lda, ldb, ldc; C is overwritten).
/// Each element is one fused multiply-add chain over k = 0, 1, ..., k-1 starting from 0, the same
/// for every blocking, thread count and CPU path (AVX2/FMA vectors or scalar fmaf), so row i of C
/// depends only on row i of A and on B: computing rows [r0, r1) alone gives bitwise the rows of the
/// full product. That is what BLAS sgemm does not promise (OpenBLAS's result for a row changes with
/// the number of rows in the call). Slower than a tuned sgemm; used by the deterministic schedule.
void rowwise_gemm_nn(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda,
                     const float* b, std::int64_t ldb, float* c, std::int64_t ldc);

/// C[m, n] = A[m, k] . B^T where B is stored [n, k] (the layout of the expert weights). B is
/// transposed into `scratch` (grown as needed, reused across calls) and rowwise_gemm_nn runs.
void rowwise_gemm_nt(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda,
                     const float* b, std::int64_t ldb, float* c, std::int64_t ldc, std::vector<float>& scratch);

}  // namespace moex::kernels
