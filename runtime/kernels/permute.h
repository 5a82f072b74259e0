// Permute and combine kernels: moving token rows between the token order, the per-rank send layout
// and the per-expert blocks.
#pragma once

#include <cstdint>

namespace moex::kernels {

/// Floats per dispatch row: the token's hidden vector, then K local expert slots (int32 bit
/// patterns, -1 = none), then K routing weights.
inline std::int64_t dispatch_row_stride(std::int64_t hidden, std::int64_t topk) { return hidden + 2 * topk; }

/// Packs the send rows of a dispatch: row i = x[row_token[i]], its slots row_slot[i*K..] and the
/// weights topk_weights[row_token[i]*K + row_k[i*K+j]].
void pack_dispatch(std::int64_t rows, std::int64_t hidden, std::int64_t topk,
                   const std::int64_t* row_token, const std::int32_t* row_slot,
                   const std::int32_t* row_k, const float* x, const float* topk_weights, float* out);

/// Floats per routed row of MoELayer's exchange: the hidden vector, K pick codes (int32 bit
/// patterns: a local expert slot, or a global expert id on the way to a forwarder; -1 = none), K
/// routing weights, and the origin rank (int32 bit pattern).
inline std::int64_t routed_row_stride(std::int64_t hidden, std::int64_t topk) { return hidden + 2 * topk + 1; }

/// Packs routed rows: row i = [x[token_offset + row_token[i]] | row_code[i*K..] | the weights
/// topk_weights[(token_offset + row_token[i])*K + row_k[i*K+j]] (0 where row_k is -1) | origin].
void pack_routed_rows(std::int64_t rows, std::int64_t hidden, std::int64_t topk, std::int64_t token_offset,
                      const std::int64_t* row_token, const std::int32_t* row_code, const std::int32_t* row_k,
                      const float* x, const float* topk_weights, std::int32_t origin, float* out);

/// Splits received dispatch rows' metadata into slots [rows*K] and weights [rows*K].
void unpack_dispatch_meta(std::int64_t rows, std::int64_t hidden, std::int64_t topk,
                          const float* in, std::int32_t* slots, float* weights);

/// dst[n, :width] = src[index[n] * src_stride, :width] for n < count (a row gather).
void gather_rows(std::int64_t count, std::int64_t width, const std::int64_t* index, const float* src,
                 std::int64_t src_stride, float* dst, std::int64_t dst_stride);

/// dst[index[n] * dst_stride, :width] += scale[n] * src[n, :width] (scale may be null for 1).
/// Rows are applied in order n = 0, 1, ..., so the result is deterministic.
void scatter_add_rows(std::int64_t count, std::int64_t width, const std::int64_t* index,
                      const float* scale, const float* src, std::int64_t src_stride, float* dst,
                      std::int64_t dst_stride);

}  // namespace moex::kernels
