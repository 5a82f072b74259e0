// CPU permute and combine kernels.
#include "runtime/kernels/permute.h"

#include <cstring>

#include "runtime/parallel.h"

namespace moex::kernels {

void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* src,
                 std::int64_t src_stride, float* dst, std::int64_t dst_stride) {
  parallel_for(count, 64, [&](std::int64_t n0, std::int64_t n1) {
    for (std::int64_t n = n0; n < n1; ++n)
      std::memcpy(dst + n * dst_stride, src + index[n] * src_stride, sizeof(float) * static_cast<std::size_t>(width));
  });
}

void gather_values(std::int64_t n, const std::int64_t* index, const float* src, float* dst) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = index[i] >= 0 ? src[index[i]] : 0.0f;
}

void gather_rows_scaled_dot(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* scale,
                            const float* src, std::int64_t src_stride, const float* other, float* dst,
                            std::int64_t stride, float* dot) {
  parallel_for(count, 64, [&](std::int64_t n0, std::int64_t n1) {
    for (std::int64_t n = n0; n < n1; ++n) {
      const float* g = src + index[n] * src_stride;
      const float* o = other + n * stride;
      float* d = dst + n * stride;
      double sum = 0.0;
      for (std::int64_t j = 0; j < width; ++j) {
        d[j] = scale[n] * g[j];
        sum += static_cast<double>(g[j]) * o[j];
      }
      dot[n] = static_cast<float>(sum);
    }
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

void combine_rows(std::int64_t rows, std::int64_t width, const std::int64_t* offsets, const std::int64_t* src_row,
                  const float* weight, const float* src, std::int64_t src_stride, float* dst, std::int64_t dst_stride,
                  bool accumulate) {
  // Each destination is one thread's: its sum runs in CSR order whatever the partition.
  parallel_for(rows, 16, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      float* d = dst + r * dst_stride;
      if (!accumulate) std::memset(d, 0, sizeof(float) * static_cast<std::size_t>(width));
      for (std::int64_t i = offsets[r]; i < offsets[r + 1]; ++i) {
        const float w = weight ? weight[i] : 1.0f;
        const float* s = src + src_row[i] * src_stride;
        for (std::int64_t j = 0; j < width; ++j) d[j] += w * s[j];
      }
    }
  });
}

}  // namespace moex::kernels
