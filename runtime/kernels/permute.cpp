// CPU permute and combine kernels.
#include "runtime/kernels/permute.h"

#include <cstring>

#include "runtime/parallel.h"

namespace moex::kernels {

void pack_routed_rows(std::int64_t rows, std::int64_t hidden, std::int64_t topk, std::int64_t token_offset,
                      const std::int64_t* row_token, const std::int32_t* row_code, const std::int32_t* row_k,
                      const float* x, const float* topk_weights, std::int32_t origin, float* out) {
  const std::int64_t stride = routed_row_stride(hidden, topk);
  parallel_for(rows, 64, [&](std::int64_t i0, std::int64_t i1) {
    for (std::int64_t i = i0; i < i1; ++i) {
      const std::int64_t t = token_offset + row_token[i];
      float* o = out + i * stride;
      std::memcpy(o, x + t * hidden, sizeof(float) * static_cast<std::size_t>(hidden));
      for (std::int64_t j = 0; j < topk; ++j) {
        const std::int32_t k = row_k[i * topk + j];
        o[hidden + j] = static_cast<float>(row_code[i * topk + j]);
        o[hidden + topk + j] = k >= 0 ? topk_weights[t * topk + k] : 0.0f;
      }
      o[hidden + 2 * topk] = static_cast<float>(origin);
    }
  });
}

void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* src,
                 std::int64_t src_stride, float* dst, std::int64_t dst_stride) {
  parallel_for(count, 64, [&](std::int64_t n0, std::int64_t n1) {
    for (std::int64_t n = n0; n < n1; ++n)
      std::memcpy(dst + n * dst_stride, src + index[n] * src_stride, sizeof(float) * static_cast<std::size_t>(width));
  });
}

void scatter_add_rows(std::int64_t count, std::int64_t width, const std::int64_t* index,
                      const float* scale, const float* src, std::int64_t src_stride, float* dst,
                      std::int64_t dst_stride) {
  // Split by columns, not rows: several entries may add into the same destination row.
  parallel_for(width, 64, [&](std::int64_t j0, std::int64_t j1) {
    for (std::int64_t n = 0; n < count; ++n) {
      const float c = scale ? scale[n] : 1.0f;
      const float* s = src + n * src_stride;
      float* d = dst + index[n] * dst_stride;
      for (std::int64_t j = j0; j < j1; ++j) d[j] += c * s[j];
    }
  });
}

}  // namespace moex::kernels
