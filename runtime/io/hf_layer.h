// Loading one MoE layer of a Hugging Face DeepSeek checkpoint (safetensors, HF tensor names) into a
// MoELayer: every rank reads what it holds.
#pragma once

#include <string>

#include "runtime/moe_layer.h"
#include "runtime/io/safetensors.h"

namespace moex {

/// Reads the layer's weights under `prefix` (e.g. "model.layers.3.mlp.") from `file` into `layer`:
/// `gate.weight` [E, H], `gate.e_score_correction_bias` [E] when present (the selection bias),
/// `shared_experts.{gate,up,down}_proj.weight` when the config has shared experts, and for every
/// physical slot of this rank (each replica of an expert loads it) `experts.{e}.{gate,up,down}_proj
/// .weight` ([F, H], [F, H], [H, F]); F32, BF16, F16 or F64, upcast to f32. Not a collective.
/// IoError naming the file, tensor and rule for a missing tensor, a wrong shape or dtype, or shared
/// expert tensors a config without shared experts does not expect.
void load_hf_layer(MoELayer& layer, const SafetensorsFile& file, const std::string& prefix);

}  // namespace moex
