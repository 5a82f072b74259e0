// Loading one MoE layer of a Hugging Face DeepSeek checkpoint (safetensors, HF tensor names; one file
// or shards; F32, BF16, F16 or FP8 with block scales) into a MoELayer: every rank reads what it holds.
#pragma once

#include <string>

#include "runtime/io/hf_checkpoint.h"
#include "runtime/moe_layer.h"

namespace moex {

/// Reads the layer's weights under `prefix` (e.g. "model.layers.3.mlp.") from `ckpt` into `layer`:
/// `gate.weight` [E, H], `gate.e_score_correction_bias` [E] when present (the selection bias),
/// `shared_experts.{gate,up,down}_proj.weight` when the config has shared experts, and for every
/// physical slot of this rank (each replica of an expert loads it) `experts.{e}.{gate,up,down}_proj
/// .weight` ([F, H], [F, H], [H, F]); upcast to f32, FP8 dequantised with the config's
/// fp8_block_rows x fp8_block_cols scales (HfCheckpoint::read_weight). Not a collective. IoError
/// naming the file, tensor and rule for a missing tensor, a wrong shape or dtype, shared expert
/// tensors a config without shared experts does not expect, or a prefix under which the checkpoint
/// holds no gate (the error lists the MoE prefixes it does hold).
void load_hf_layer(MoELayer& layer, const HfCheckpoint& ckpt, const std::string& prefix);

}  // namespace moex
