// Run-time CPU feature checks for the hand-vectorised CPU kernels.
#pragma once

namespace moex::kernels {

/// Whether this CPU has AVX2 and FMA (checked once with cpuid; false off x86-64 or without GCC/Clang
/// builtins). The AVX2 kernels (swiglu_rows, rowwise_gemm) run only when it is true.
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace moex::kernels
