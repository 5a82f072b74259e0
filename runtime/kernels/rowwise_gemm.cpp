// Row-independent GEMM: register-blocked AVX2/FMA tiles chosen at run time, scalar fmaf elsewhere.
#include "runtime/kernels/rowwise_gemm.h"

#include <algorithm>
#include <cmath>

#include "runtime/kernels/cpu_features.h"
#include "runtime/parallel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOEX_HAVE_X86_DISPATCH 1
#endif

namespace moex::kernels {
namespace {

constexpr std::int64_t kRows = 6;     // rows per register tile (12 accumulators)
constexpr std::int64_t kCols = 16;    // columns per register tile (two 8-float vectors)
constexpr std::int64_t kDepth = 256;  // k per pass over C (keeps the B panel in L1)
constexpr std::int64_t kBlockRows = 96;  // rows per L2 block of A (96 x 256 floats = 96 KiB)

// Elements [j0, j1) of rows [i0, i1): c = fma(a[i, kk], b[kk, j], c) for kk in [k0, k1); c starts
// from C when k0 > 0 (from 0 otherwise). The chain per element is the same as in the vector tile.
void scalar_block(std::int64_t i0, std::int64_t i1, std::int64_t j0, std::int64_t j1, std::int64_t k0, std::int64_t k1,
                  const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc) {
  for (std::int64_t i = i0; i < i1; ++i)
    for (std::int64_t j = j0; j < j1; ++j) {
      float acc = k0 == 0 ? 0.0f : c[i * ldc + j];
      for (std::int64_t kk = k0; kk < k1; ++kk) acc = std::fma(a[i * lda + kk], b[kk * ldb + j], acc);
      c[i * ldc + j] = acc;
    }
}

#ifdef MOEX_HAVE_X86_DISPATCH
// A kRows x kCols tile of C over k in [k0, k1); `b` is a packed panel: row kk at b + kk * kCols.
__attribute__((target("avx2,fma"))) void tile_avx2(std::int64_t k0, std::int64_t k1, const float* a, std::int64_t lda,
                                                   const float* b, float* c, std::int64_t ldc) {
  __m256 acc[kRows][2];  // fully unrolled loops keep all of them in registers
#pragma GCC unroll 8
  for (std::int64_t r = 0; r < kRows; ++r)
    for (int h = 0; h < 2; ++h)
      acc[r][h] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8 * h);
  for (std::int64_t kk = k0; kk < k1; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * kCols), b1 = _mm256_loadu_ps(b + kk * kCols + 8);
#pragma GCC unroll 8
    for (std::int64_t r = 0; r < kRows; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + kk);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (std::int64_t r = 0; r < kRows; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(c + r * ldc + 8 * h, acc[r][h]);
}

// One row, kCols columns: the same per-element chain as tile_avx2.
__attribute__((target("avx2,fma"))) void row_avx2(std::int64_t k0, std::int64_t k1, const float* a, const float* b,
                                                  float* c) {
  __m256 acc0 = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(c);
  __m256 acc1 = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(c + 8);
  for (std::int64_t kk = k0; kk < k1; ++kk) {
    const __m256 av = _mm256_broadcast_ss(a + kk);
    acc0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + kk * kCols), acc0);
    acc1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + kk * kCols + 8), acc1);
  }
  _mm256_storeu_ps(c, acc0);
  _mm256_storeu_ps(c + 8, acc1);
}

#endif

// Rows [i0, i1) of C, all columns. `packed` holds B's first n_vec columns as kCols-wide panels,
// panel p = packed + p * k * kCols (row kk of the panel at + kk * kCols): contiguous, so the panel
// stays in L1 (B's own rows, a large power-of-two-ish stride apart, would fight over few cache sets).
void rows_block(std::int64_t i0, std::int64_t i1, std::int64_t n, std::int64_t n_vec, std::int64_t k, const float* a,
                std::int64_t lda, const float* b, std::int64_t ldb, const float* packed, float* c, std::int64_t ldc) {
  (void)packed;
  if (k == 0) {  // empty product: zeros
    for (std::int64_t i = i0; i < i1; ++i) std::fill_n(c + i * ldc, n, 0.0f);
    return;
  }
  for (std::int64_t k0 = 0; k0 < k; k0 += kDepth) {
    const std::int64_t k1 = std::min(k, k0 + kDepth);
#ifdef MOEX_HAVE_X86_DISPATCH
    // Blocks of kBlockRows rows keep their slice of A in L2 while the B panels stream past.
    for (std::int64_t ib = i0; ib < i1; ib += kBlockRows) {
      const std::int64_t ie = std::min(i1, ib + kBlockRows);
      for (std::int64_t j = 0; j < n_vec; j += kCols) {
        std::int64_t i = ib;
        const float* panel = packed + (j / kCols) * k * kCols;
        for (; i + kRows <= ie; i += kRows) tile_avx2(k0, k1, a + i * lda, lda, panel, c + i * ldc + j, ldc);
        for (; i < ie; ++i) row_avx2(k0, k1, a + i * lda, panel, c + i * ldc + j);
      }
    }
#endif
    if (n_vec < n) scalar_block(i0, i1, n_vec, n, k0, k1, a, lda, b, ldb, c, ldc);
  }
}

}  // namespace

void rowwise_gemm_nn(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda,
                     const float* b, std::int64_t ldb, float* c, std::int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const std::int64_t n_vec = cpu_has_avx2_fma() ? n / kCols * kCols : 0;
  thread_local std::vector<float> packed;  // reused across calls
  if (packed.size() < static_cast<std::size_t>(n_vec * k)) packed.resize(static_cast<std::size_t>(n_vec * k));
  for (std::int64_t j = 0; j < n_vec; j += kCols)
    for (std::int64_t kk = 0; kk < k; ++kk)
      std::copy_n(b + kk * ldb + j, kCols, packed.data() + (j / kCols) * k * kCols + kk * kCols);
  // Rows are independent, so any split over threads gives the same bits.
  const float* pk = packed.data();
  parallel_for(m, 16, [&](std::int64_t i0, std::int64_t i1) { rows_block(i0, i1, n, n_vec, k, a, lda, b, ldb, pk, c, ldc); });
}

void rowwise_gemm_nt(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda,
                     const float* b, std::int64_t ldb, float* c, std::int64_t ldc, std::vector<float>& scratch) {
  if (m <= 0 || n <= 0) return;
  if (scratch.size() < static_cast<std::size_t>(n * k)) scratch.resize(static_cast<std::size_t>(n * k));
  float* bt = scratch.data();  // [k, n]
  constexpr std::int64_t kT = 32;  // transpose in 32 x 32 tiles: both sides stay in cache
  for (std::int64_t j0 = 0; j0 < n; j0 += kT)
    for (std::int64_t k0 = 0; k0 < k; k0 += kT)
      for (std::int64_t j = j0; j < std::min(n, j0 + kT); ++j)
        for (std::int64_t kk = k0; kk < std::min(k, k0 + kT); ++kk) bt[kk * n + j] = b[j * ldb + kk];
  rowwise_gemm_nn(m, n, k, a, lda, bt, n, c, ldc);
}

}  // namespace moex::kernels
