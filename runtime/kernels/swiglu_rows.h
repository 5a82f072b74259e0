// Row kernels of the SwiGLU activation: sig = sigmoid(g), a = g * sig * u over one row.
#pragma once

#include <cstdint>

namespace moex::kernels {

/// For j < n: sig[j] = sigmoid(g[j]) and a[j] = g[j] * sig[j] * u[j].
/// Uses an AVX2/FMA exp (relative error below 2e-7, i.e. within about 2 ulp of expf) when the CPU
/// has AVX2 and FMA, else the scalar math::sigmoid. The lane a value lands in depends only on its
/// index j, so the result of one element never depends on n or on other rows (chunking a batch
/// differently gives bitwise the same values).
void swiglu_forward_row(const float* g, const float* u, float* sig, float* a, std::int64_t n);

/// Whether swiglu_forward_row takes the vector path on this CPU.
bool swiglu_row_vectorised();

}  // namespace moex::kernels
