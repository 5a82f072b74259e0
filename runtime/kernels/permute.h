// Permute and combine kernels: moving token rows between the token order, the per-rank send layout
// and the per-expert blocks.
#pragma once

#include <cstdint>

namespace moex::kernels {

/// dst[n, :width] = src[index[n] * src_stride, :width] for n < count (a row gather).
void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* src,
                 std::int64_t src_stride, float* dst, std::int64_t dst_stride);

/// dst[i] = index[i] >= 0 ? src[index[i]] : 0 for i < n: routing weights and their gradients
/// between per-pick, per-entry and per-row orders (the CPU twin of cuda::gather_values).
void gather_values(std::int64_t n, const std::int64_t* index, const float* src, float* dst);

/// The backward of a weighted combine, per entry n < count with g = src[index[n] * src_stride]:
/// dst[n * stride, :width] = scale[n] * g (the expert output's gradient) and
/// dot[n] = g . other[n * stride, :width] summed in double (the routing weight's gradient). The
/// CPU twin of cuda::gather_rows_scaled plus cuda::row_dot.
void gather_rows_scaled_dot(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* scale,
                            const float* src, std::int64_t src_stride, const float* other, float* dst,
                            std::int64_t stride, float* dot);

/// dst[index[n] * dst_stride, :width] += scale[n] * src[n, :width] (scale may be null for 1).
/// Rows are applied in order n = 0, 1, ..., so the result is deterministic.
void scatter_add_rows(std::int64_t count, std::int64_t width, const std::int64_t* index,
                      const float* scale, const float* src, std::int64_t src_stride, float* dst,
                      std::int64_t dst_stride);

/// CSR combine: for each destination r < rows, dst[r] = (accumulate ? dst[r] : 0) + sum of
/// weight[i] * src[src_row[i]] over i in [offsets[r], offsets[r+1]) in that order (`weight` may be
/// null for 1). `offsets` holds absolute positions into src_row / weight (pass offsets + first for a
/// range of destinations). The CPU twin of cuda::combine_rows.
void combine_rows(std::int64_t rows, std::int64_t width, const std::int64_t* offsets, const std::int64_t* src_row,
                  const float* weight, const float* src, std::int64_t src_stride, float* dst, std::int64_t dst_stride,
                  bool accumulate);

}  // namespace moex::kernels
