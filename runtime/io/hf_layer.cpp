// load_hf_layer: Hugging Face DeepSeek tensor names -> a MoELayer's parameter blocks.
#include "runtime/io/hf_layer.h"

#include <cstdint>
#include <cstring>
#include <vector>

#include "base/error.h"

namespace moex {
namespace {
void copy_into(float* dst, const std::vector<float>& src) { std::memcpy(dst, src.data(), src.size() * sizeof(float)); }
}  // namespace

void load_hf_layer(MoELayer& layer, const HfCheckpoint& ckpt, const std::string& prefix) {
  using Shape = std::vector<std::int64_t>;
  const MoeConfig& c = layer.config();
  const std::int64_t H = c.hidden_size, F = c.moe_intermediate_size, Fs = c.shared_intermediate_size();
  if (!ckpt.contains(prefix + "gate.weight")) {
    std::string held;
    const auto prefixes = ckpt.moe_prefixes();
    for (std::size_t i = 0; i < prefixes.size() && i < 8; ++i) held += (i ? ", " : "") + prefixes[i];
    if (prefixes.size() > 8) held += ", ... (" + std::to_string(prefixes.size()) + " in all)";
    throw IoError(ckpt.path() + " holds no MoE layer under prefix '" + prefix + "' (no " + prefix +
                  "gate.weight); " + (held.empty() ? std::string("it holds no model.layers.N.mlp.gate.weight at all")
                                                   : "its MoE layers are under " + held));
  }
  auto read = [&](const std::string& name, const Shape& shape) {
    return ckpt.read_weight(prefix + name, shape, c.fp8_block_rows, c.fp8_block_cols);
  };
  copy_into(layer.gate_weight(), read("gate.weight", {c.n_routed_experts, H}));
  if (ckpt.contains(prefix + "gate.e_score_correction_bias"))
    layer.selection_bias() = read("gate.e_score_correction_bias", {c.n_routed_experts});
  else if (c.topk_method == TopkMethod::kNoauxTc)
    throw IoError(ckpt.path() + ": topk_method noaux_tc selects with " + prefix +
                  "gate.e_score_correction_bias, which the checkpoint does not hold (DeepSeek-V3's always do)");
  if (Fs > 0) {
    copy_into(layer.shared_w13(), read("shared_experts.gate_proj.weight", {Fs, H}));
    copy_into(layer.shared_w13() + Fs * H, read("shared_experts.up_proj.weight", {Fs, H}));
    copy_into(layer.shared_w2(), read("shared_experts.down_proj.weight", {H, Fs}));
  } else if (ckpt.contains(prefix + "shared_experts.gate_proj.weight")) {
    throw IoError(ckpt.path() + " holds " + prefix + "shared_experts.* but the config has n_shared_experts = 0");
  }
  const auto mine = layer.slot_experts(layer.rank());
  for (std::size_t slot = 0; slot < mine.size(); ++slot) {
    const std::string e = "experts." + std::to_string(mine[slot]) + ".";
    const auto s = static_cast<std::int64_t>(slot);
    copy_into(layer.expert_w13(s), read(e + "gate_proj.weight", {F, H}));
    copy_into(layer.expert_w13(s) + F * H, read(e + "up_proj.weight", {F, H}));
    copy_into(layer.expert_w2(s), read(e + "down_proj.weight", {H, F}));
  }
}

}  // namespace moex
