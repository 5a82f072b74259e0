// Permute and combine kernels: moving token rows between the token order, the per-rank send layout
// and the per-expert blocks.
#pragma once

#include <cstdint>

namespace moex::kernels {

/// Floats per routed row of MoELayer's exchange: the hidden vector, K pick codes (int32 bit
/// patterns: a local expert slot, or a global expert id on the way to a forwarder; -1 = none), K
/// routing weights, and the origin rank (int32 bit pattern).
inline std::int64_t routed_row_stride(std::int64_t hidden, std::int64_t topk) { return hidden + 2 * topk + 1; }

/// Packs routed rows: row i = [x[token_offset + row_token[i]] | row_code[i*K..] | the weights
/// topk_weights[(token_offset + row_token[i])*K + row_k[i*K+j]] (0 where row_k is -1) | origin].
/// Codes and the origin rank are written as float values (exact below 2^24, the limit
/// sched::ExchangePlan checks; -1 stays -1), so every backend reads them alike.
void pack_routed_rows(std::int64_t rows, std::int64_t hidden, std::int64_t topk, std::int64_t token_offset,
                      const std::int64_t* row_token, const std::int32_t* row_code, const std::int32_t* row_k,
                      const float* x, const float* topk_weights, std::int32_t origin, float* out);

/// dst[n, :width] = src[index[n] * src_stride, :width] for n < count (a row gather).
void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* src,
                 std::int64_t src_stride, float* dst, std::int64_t dst_stride);

/// dst[index[n] * dst_stride, :width] += scale[n] * src[n, :width] (scale may be null for 1).
/// Rows are applied in order n = 0, 1, ..., so the result is deterministic.
void scatter_add_rows(std::int64_t count, std::int64_t width, const std::int64_t* index,
                      const float* scale, const float* src, std::int64_t src_stride, float* dst,
                      std::int64_t dst_stride);

}  // namespace moex::kernels
