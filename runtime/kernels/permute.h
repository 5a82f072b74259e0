// Permute and combine kernels: moving token rows between the token order, the per-rank send layout
// and the per-expert blocks.
#pragma once

#include <cstdint>

namespace moex::kernels {

/// dst[n, :width] = src[index[n] * src_stride, :width] for n < count (a row gather).
void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* src,
                 std::int64_t src_stride, float* dst, std::int64_t dst_stride);

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
