// Per-element formulas shared by the CPU and CUDA kernels (single source of the math).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MOEX_HD __host__ __device__ __forceinline__
#else
#define MOEX_HD inline
#endif

namespace moex::math {

/// Logistic sigmoid, written to stay finite for large |x|.
MOEX_HD float sigmoid(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  const float e = expf(x);
  return e / (1.0f + e);
}
/// SiLU (swish): x * sigmoid(x).
MOEX_HD float silu(float x) { return x * sigmoid(x); }
/// d silu / dx = s * (1 + x * (1 - s)) with s = sigmoid(x).
MOEX_HD float silu_grad(float x) {
  const float s = sigmoid(x);
  return s * (1.0f + x * (1.0f - s));
}
/// SwiGLU forward of one element: silu(g) * u.
MOEX_HD float swiglu(float g, float u) { return silu(g) * u; }
/// SwiGLU backward of one element given s = sigmoid(g) saved by the forward pass (no exp needed).
MOEX_HD void swiglu_backward_saved(float g, float u, float s, float da, float* dg, float* du) {
  *du = da * g * s;
  *dg = da * u * s * (1.0f + g * (1.0f - s));
}
/// SwiGLU backward of one element: from dA = dL/d(silu(g)*u), the gradients of g and u.
MOEX_HD void swiglu_backward(float g, float u, float da, float* dg, float* du) {
  const float s = sigmoid(g);
  *du = da * g * s;
  *dg = da * u * s * (1.0f + g * (1.0f - s));
}

}  // namespace moex::math
