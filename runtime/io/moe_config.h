// MoeConfig: the MoE fields of a Hugging Face DeepSeek config.json, validated.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moex {

enum class ScoringFunc { kSoftmax, kSigmoid };
enum class TopkMethod { kGreedy, kGroupLimitedGreedy, kNoauxTc };

/// The fields of one DeepSeek MoE layer (names as in Hugging Face `config.json`) plus the few
/// model-level fields moex-train uses. Construct through `from_json` / `from_file`, or fill the
/// fields and call `validate()`.
struct MoeConfig {
  std::string model_type = "deepseek_v3";
  std::int64_t hidden_size = 7168;
  std::int64_t moe_intermediate_size = 2048;
  std::int64_t n_routed_experts = 256;
  std::int64_t n_shared_experts = 1;
  std::int64_t num_experts_per_tok = 8;
  std::int64_t n_group = 8;
  std::int64_t topk_group = 4;
  TopkMethod topk_method = TopkMethod::kNoauxTc;
  ScoringFunc scoring_func = ScoringFunc::kSigmoid;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 2.5;
  // Model-level fields (moex-train).
  std::int64_t num_hidden_layers = 2;
  double rms_norm_eps = 1e-6;
  /// FP8 checkpoints (DeepSeek-V3): `quantization_config.weight_block_size`, the [rows, cols] of
  /// each `weight_scale_inv` block. Only read (to_json() does not write it: moex writes F32).
  std::int64_t fp8_block_rows = 128, fp8_block_cols = 128;

  /// Defaults of the Hugging Face class named by `model_type` ("deepseek_v3", "deepseek_v2",
  /// "deepseek"); throws ConfigError for another model_type.
  static MoeConfig defaults_for(const std::string& model_type);
  /// Reads the fields from a parsed config.json: absent or null fields take the defaults of the
  /// config's `model_type` (deepseek_v3 when absent). Unknown fields are ignored. Validates.
  static MoeConfig from_json(const nlohmann::json& j);
  /// Reads and parses a config.json file (IoError if unreadable, ConfigError if invalid); warns on
  /// stderr about each key that is a near miss of one it reads (near_misses()).
  static MoeConfig from_file(const std::string& path);
  /// Keys of `j` moex does not read that are within two edits of one it does (`num_experts_per_to`),
  /// each as a sentence naming both: such a key is ignored, and its intended field takes its default.
  static std::vector<std::string> near_misses(const nlohmann::json& j);
  /// The fields as config.json would hold them.
  nlohmann::json to_json() const;

  /// Checks every field and their relations; throws ConfigError naming field, value and rule.
  void validate() const;
  /// validate(), then *this (for member initialisers).
  const MoeConfig& validated() const {
    validate();
    return *this;
  }

  /// Experts per group (n_routed_experts / n_group).
  std::int64_t experts_per_group() const { return n_routed_experts / n_group; }
  /// Width of the shared-expert MLP (n_shared_experts * moe_intermediate_size; 0 when none).
  std::int64_t shared_intermediate_size() const { return n_shared_experts * moe_intermediate_size; }
};

const char* to_string(ScoringFunc f);
const char* to_string(TopkMethod m);

}  // namespace moex
