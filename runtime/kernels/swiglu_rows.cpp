// SwiGLU row kernel: an AVX2/FMA path chosen at run time, and the scalar path it falls back to.
#include "runtime/kernels/swiglu_rows.h"

#include "runtime/kernels/cpu_features.h"
#include "runtime/kernels/math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOEX_HAVE_X86_DISPATCH 1
#endif

namespace moex::kernels {
namespace {

void swiglu_scalar(const float* g, const float* u, float* sig, float* a, std::int64_t j0, std::int64_t n) {
  for (std::int64_t j = j0; j < n; ++j) {
    sig[j] = math::sigmoid(g[j]);
    a[j] = g[j] * sig[j] * u[j];
  }
}

#ifdef MOEX_HAVE_X86_DISPATCH
// exp(x) for x <= 0 (the sigmoid only needs exp(-|g|)): x is clamped to [-87.3, 0], split as
// x = n ln2 + r with |r| <= ln2/2, exp(r) by the degree-6 minimax polynomial of Cephes' expf, and
// 2^n built in the exponent bits.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
}

__attribute__((target("avx2,fma"))) void swiglu_avx2(const float* g, const float* u, float* sig, float* a,
                                                     std::int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 gv = _mm256_loadu_ps(g + j);
    // Same split as math::sigmoid: e = exp(-|g|); sigmoid = 1/(1+e) for g >= 0, else e/(1+e).
    const __m256 e = exp_nonpositive(_mm256_or_ps(gv, sign));
    const __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ));
    const __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
    _mm256_storeu_ps(sig + j, s);
    _mm256_storeu_ps(a + j, _mm256_mul_ps(_mm256_mul_ps(gv, s), _mm256_loadu_ps(u + j)));
  }
  swiglu_scalar(g, u, sig, a, j, n);
}

#endif

}  // namespace

bool swiglu_row_vectorised() { return cpu_has_avx2_fma(); }

void swiglu_forward_row(const float* g, const float* u, float* sig, float* a, std::int64_t n) {
#ifdef MOEX_HAVE_X86_DISPATCH
  if (swiglu_row_vectorised()) {
    swiglu_avx2(g, u, sig, a, n);
    return;
  }
#endif
  swiglu_scalar(g, u, sig, a, 0, n);
}

}  // namespace moex::kernels
