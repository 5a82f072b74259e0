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

/// OpenBLAS's x86-64 kernel families by generation (case-insensitive): 0 SSE (Prescott, Core2,
/// Nehalem, ...), 1 AVX (Sandybridge, Bulldozer, ...), 2 AVX2 (Haswell, Zen), 3 AVX-512 (SkylakeX),
/// 4 AVX-512 with BF16 (Cooperlake, SapphireRapids); -1 for a name not listed (another architecture).
int core_generation(const std::string& name);
/// `best` when both are listed families and `best` is a later generation than `current`, else "".
std::string faster_core(const std::string& current, const std::string& best);

/// OpenBLAS picks its kernels once, when the library loads: the family OPENBLAS_CORETYPE names, else
/// its own pick from the CPU model, which falls back to its oldest kernels (Prescott, SSE3: a fifth of
/// the speed) on a model newer than the library. When the family in use is older than the CPU's
/// instruction sets allow (cpuid: AVX2 + FMA -> Haswell, AVX-512 F/BW/DQ/VL -> SkylakeX, plus BF16 ->
/// Cooperlake), this re-executes the program once with the best family, so sgemm runs at full speed.
/// Call it first in main, before MPI_Init. Does nothing when MOEX_KEEP_BLAS_CORETYPE=1.
void select_fast_kernels(char** argv);

}  // namespace moex::blas
