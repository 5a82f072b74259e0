// Thin CBLAS wrapper: row-major sgemm, thread control, and choosing OpenBLAS's fastest kernels.
#pragma once

#include <cstdint>
#include <string>

namespace moex::blas {

/// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major; op(A) is [M,K], op(B) is [K,N].
/// `trans_a` means A is stored [K,M]; `trans_b` means B is stored [N,K]. Zero-sized calls are no-ops
/// (beyond scaling C by beta when K == 0).
void sgemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
           const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c,
           std::int64_t ldc);

/// Threads the BLAS uses for one call (no-op where the BLAS has no such control).
void set_num_threads(int threads);
/// The BLAS's kernel family, e.g. "Zen", "Haswell", "SkylakeX" (OpenBLAS), or "unknown".
std::string kernel_name();

/// OpenBLAS picks its kernels once, when the library loads, and obeys OPENBLAS_CORETYPE if set. When
/// that variable forces kernels older than this CPU supports (e.g. Haswell on an AVX-512 CPU), this
/// re-executes the program with the best kernel family the CPU supports, so sgemm runs at full speed.
/// Call it first in main, before MPI_Init. Does nothing when MOEX_KEEP_BLAS_CORETYPE=1, when the
/// variable is unset (OpenBLAS then detects the CPU itself), or when it already names the best family.
void select_fast_kernels(char** argv);

}  // namespace moex::blas
