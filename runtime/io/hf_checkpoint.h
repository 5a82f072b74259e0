// A Hugging Face checkpoint: one safetensors file, or shards named by model.safetensors.index.json;
// FP8 (F8_E4M3) weights dequantised with their block scales as DeepSeek-V3's own code does.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "runtime/io/safetensors.h"

namespace moex {

class HfCheckpoint {
 public:
  /// `path` is a .safetensors file, a model.safetensors.index.json, or a folder holding an index
  /// (preferred) or exactly one .safetensors file. The index must be a JSON object whose
  /// "weight_map" maps each tensor to a shard file in the same folder (no paths); every shard is
  /// opened and validated (SafetensorsFile::open) and must hold the tensors the index gives it.
  /// IoError naming the file and the rule otherwise.
  static HfCheckpoint open(const std::string& path, const SafetensorsLimits& limits = {});

  /// What was opened (the file or the index).
  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  /// Every tensor name, sorted.
  std::vector<std::string> names() const;
  /// The shard holding `name`; IoError "tensor NAME missing from PATH" when absent.
  const SafetensorsFile& file_of(const std::string& name) const;
  /// A weight as float32: F32, BF16, F16 and F64 converted; an F8_E4M3 weight [M, N] is multiplied by
  /// its companion `<name without ".weight">.weight_scale_inv` (F32 [ceil(M / block_rows),
  /// ceil(N / block_cols)]), element (i, j) by scale (i / block_rows, j / block_cols), as DeepSeek's
  /// weight_dequant. IoError for a missing or misshapen scale, a shape other than `expected_shape`
  /// (when given), or a non-finite value.
  std::vector<float> read_weight(const std::string& name, const std::vector<std::int64_t>& expected_shape = {},
                                 std::int64_t block_rows = 128, std::int64_t block_cols = 128) const;
  /// The prefixes "model.layers.N.mlp." under which a MoE gate ("gate.weight") is held, in N order.
  std::vector<std::string> moe_prefixes() const;

 private:
  std::string path_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t> where_;  // tensor -> index into files_
};

}  // namespace moex
