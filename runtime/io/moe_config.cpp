// MoeConfig: parsing a Hugging Face DeepSeek config.json and validating it.
#include "runtime/io/moe_config.h"

#include <cerrno>
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "runtime/io/checkpoint_files.h"
#include "runtime/io/json_guard.h"

namespace moex {
namespace {
using nlohmann::json;

[[noreturn]] void reject(const std::string& field, const std::string& value, const std::string& rule) {
  throw ConfigError("config: " + field + " = " + value + " is invalid: " + rule);
}

std::string show(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

/// The value of `field` when present and not null.
const json* field_of(const json& j, const char* field) {
  const auto it = j.find(field);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

void read_int(const json& j, const char* field, std::int64_t& out) {
  const json* v = field_of(j, field);
  if (!v) return;
  if (!v->is_number_integer()) {
    if (v->is_number_float() && std::floor(v->get<double>()) == v->get<double>() && std::abs(v->get<double>()) < 9e15) {
      out = static_cast<std::int64_t>(v->get<double>());
      return;
    }
    reject(field, v->dump(), "expected an integer");
  }
  out = v->get<std::int64_t>();
}

void read_number(const json& j, const char* field, double& out) {
  const json* v = field_of(j, field);
  if (!v) return;
  if (!v->is_number()) reject(field, v->dump(), "expected a number");
  out = v->get<double>();
}

void read_bool(const json& j, const char* field, bool& out) {
  const json* v = field_of(j, field);
  if (!v) return;
  if (!v->is_boolean()) reject(field, v->dump(), "expected true or false");
  out = v->get<bool>();
}

void require(const json& j, const char* field, const std::string& model_type) {
  if (!field_of(j, field))
    throw ConfigError("config: field '" + std::string(field) + "' is required for model_type " + model_type +
                      " (its Hugging Face default is null)");
}
}  // namespace

const char* to_string(ScoringFunc f) { return f == ScoringFunc::kSoftmax ? "softmax" : "sigmoid"; }

const char* to_string(TopkMethod m) {
  switch (m) {
    case TopkMethod::kGreedy: return "greedy";
    case TopkMethod::kGroupLimitedGreedy: return "group_limited_greedy";
    case TopkMethod::kNoauxTc: return "noaux_tc";
  }
  return "?";
}

MoeConfig MoeConfig::defaults_for(const std::string& model_type) {
  MoeConfig c;  // member initialisers hold the DeepseekV3Config defaults
  c.model_type = model_type;
  if (model_type == "deepseek_v3") {
    c.num_hidden_layers = 61;
  } else if (model_type == "deepseek_v2" || model_type == "deepseek") {
    c.hidden_size = model_type == "deepseek_v2" ? 5120 : 4096;
    c.moe_intermediate_size = 1407;
    c.n_shared_experts = 0;
    c.n_group = 1;
    c.topk_group = 1;
    c.topk_method = TopkMethod::kGreedy;
    c.scoring_func = ScoringFunc::kSoftmax;
    c.norm_topk_prob = false;
    c.routed_scaling_factor = 1.0;
    c.num_hidden_layers = model_type == "deepseek_v2" ? 30 : 32;
  } else {
    throw ConfigError("config: model_type = \"" + model_type +
                      "\" is not supported: expected deepseek_v3, deepseek_v2 or deepseek");
  }
  return c;
}

namespace {
/// Edit distance (insertions, deletions, substitutions), for spotting misspelt keys.
std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}
}  // namespace

std::vector<std::string> MoeConfig::near_misses(const nlohmann::json& j) {
  static const char* const kKnown[] = {"model_type", "hidden_size", "moe_intermediate_size", "n_routed_experts",
                                       "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                                       "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
                                       "num_hidden_layers", "rms_norm_eps", "quantization_config"};
  std::vector<std::string> out;
  if (!j.is_object()) return out;
  for (const auto& [key, value] : j.items()) {
    if (std::find(std::begin(kKnown), std::end(kKnown), key) != std::end(kKnown) || key.size() < 5) continue;
    for (const char* k : kKnown)
      if (edit_distance(key, k) <= 2) {
        out.push_back("'" + key + "' is not a key moex reads; did you mean '" + k + "'? (" + k +
                      " takes its default)");
        break;
      }
  }
  return out;
}

MoeConfig MoeConfig::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw ConfigError("config: expected a JSON object, got " + std::string(j.type_name()));
  std::string model_type = "deepseek_v3";
  if (const json* v = field_of(j, "model_type")) {
    if (!v->is_string()) reject("model_type", v->dump(), "expected a string");
    model_type = v->get<std::string>();
  }
  MoeConfig c = defaults_for(model_type);
  if (model_type != "deepseek_v3") {
    // These are null in the Hugging Face classes of V2 and the first DeepSeekMoE: a config must say.
    require(j, "n_routed_experts", model_type);
    require(j, "num_experts_per_tok", model_type);
    if (model_type == "deepseek_v2") require(j, "n_shared_experts", model_type);
  }
  read_int(j, "hidden_size", c.hidden_size);
  read_int(j, "moe_intermediate_size", c.moe_intermediate_size);
  read_int(j, "n_routed_experts", c.n_routed_experts);
  read_int(j, "n_shared_experts", c.n_shared_experts);
  read_int(j, "num_experts_per_tok", c.num_experts_per_tok);
  read_int(j, "n_group", c.n_group);
  read_int(j, "topk_group", c.topk_group);
  read_int(j, "num_hidden_layers", c.num_hidden_layers);
  read_bool(j, "norm_topk_prob", c.norm_topk_prob);
  read_number(j, "routed_scaling_factor", c.routed_scaling_factor);
  read_number(j, "rms_norm_eps", c.rms_norm_eps);
  if (const json* q = field_of(j, "quantization_config")) {
    if (!q->is_object()) reject("quantization_config", q->dump(), "expected an object");
    if (q->contains("weight_block_size")) {
      const json& b = q->at("weight_block_size");
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
          b[0].get<std::int64_t>() < 1 || b[1].get<std::int64_t>() < 1)
        reject("quantization_config.weight_block_size", b.dump(), "expected [rows, cols], two integers >= 1");
      c.fp8_block_rows = b[0].get<std::int64_t>();
      c.fp8_block_cols = b[1].get<std::int64_t>();
    }
  }
  if (const json* v = field_of(j, "scoring_func")) {
    const std::string s = v->is_string() ? v->get<std::string>() : v->dump();
    if (s == "softmax") c.scoring_func = ScoringFunc::kSoftmax;
    else if (s == "sigmoid") c.scoring_func = ScoringFunc::kSigmoid;
    else reject("scoring_func", v->dump(), "expected \"softmax\" or \"sigmoid\"");
  }
  if (const json* v = field_of(j, "topk_method")) {
    const std::string s = v->is_string() ? v->get<std::string>() : v->dump();
    // "gready" is the spelling of the DeepseekV2Config default in Hugging Face.
    if (s == "greedy" || s == "gready") c.topk_method = TopkMethod::kGreedy;
    else if (s == "group_limited_greedy") c.topk_method = TopkMethod::kGroupLimitedGreedy;
    else if (s == "noaux_tc") c.topk_method = TopkMethod::kNoauxTc;
    else reject("topk_method", v->dump(), "expected \"greedy\", \"group_limited_greedy\" or \"noaux_tc\"");
  }
  c.validate();
  return c;
}

MoeConfig MoeConfig::from_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw ConfigError("config file " + path + " is a folder; expected a config.json file (" +
                      (std::filesystem::path(path) / "config.json").string() + "?)");
  check_regular_file(path, "config file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot open config file " + path + ": " + std::strerror(errno));
  if (std::filesystem::file_size(path, ec) > (16u << 20))
    throw ConfigError("config file " + path + " is larger than 16 MiB; a config.json is a few KiB");
  std::stringstream text;
  text << in.rdbuf();
  json j;
  try {
    j = parse_json_guarded(text.str(), "config file " + path);
  } catch (const IoError& e) {
    throw ConfigError(e.message());
  }
  MoeConfig c;
  try {
    c = from_json(j);
  } catch (const ConfigError& e) {
    throw ConfigError(e.message() + " (in " + path + ")");
  }
  for (const std::string& w : near_misses(j)) std::fprintf(stderr, "moex: warning: %s: %s\n", path.c_str(), w.c_str());
  return c;
}

nlohmann::json MoeConfig::to_json() const {
  return json{{"model_type", model_type},
              {"hidden_size", hidden_size},
              {"moe_intermediate_size", moe_intermediate_size},
              {"n_routed_experts", n_routed_experts},
              {"n_shared_experts", n_shared_experts},
              {"num_experts_per_tok", num_experts_per_tok},
              {"n_group", n_group},
              {"topk_group", topk_group},
              {"topk_method", to_string(topk_method)},
              {"scoring_func", to_string(scoring_func)},
              {"norm_topk_prob", norm_topk_prob},
              {"routed_scaling_factor", routed_scaling_factor},
              {"num_hidden_layers", num_hidden_layers},
              {"rms_norm_eps", rms_norm_eps}};
}

void MoeConfig::validate() const {
  constexpr std::int64_t kMaxWidth = 1 << 20, kMaxExperts = 1 << 16;
  auto range = [](const char* f, std::int64_t v, std::int64_t lo, std::int64_t hi, const std::string& rule) {
    if (v < lo || v > hi) reject(f, std::to_string(v), rule);
  };
  range("hidden_size", hidden_size, 1, kMaxWidth, "must be in [1, 2^20]");
  range("moe_intermediate_size", moe_intermediate_size, 1, kMaxWidth, "must be in [1, 2^20]");
  range("n_routed_experts", n_routed_experts, 1, kMaxExperts, "must be in [1, 65536]");
  range("n_shared_experts", n_shared_experts, 0, 1024, "must be in [0, 1024]");
  range("num_experts_per_tok", num_experts_per_tok, 1, n_routed_experts,
        "must be in [1, n_routed_experts (" + std::to_string(n_routed_experts) + ")]");
  range("n_group", n_group, 1, n_routed_experts, "must be in [1, n_routed_experts (" + std::to_string(n_routed_experts) + ")]");
  if (n_routed_experts % n_group != 0)
    reject("n_group", std::to_string(n_group),
           "must divide n_routed_experts (" + std::to_string(n_routed_experts) + ") into equal groups");
  range("topk_group", topk_group, 1, n_group, "must be in [1, n_group (" + std::to_string(n_group) + ")]");
  if (topk_method != TopkMethod::kGreedy && num_experts_per_tok > topk_group * experts_per_group())
    reject("num_experts_per_tok", std::to_string(num_experts_per_tok),
           "must be <= topk_group (" + std::to_string(topk_group) + ") x experts per group (" +
               std::to_string(experts_per_group()) + "): the kept groups hold too few experts");
  if (topk_method == TopkMethod::kNoauxTc && n_group > 1 && experts_per_group() < 2)
    reject("n_group", std::to_string(n_group),
           "noaux_tc scores a group by its top-2 experts, so each group needs >= 2 experts (n_routed_experts / n_group = " +
               std::to_string(experts_per_group()) + ")");
  if (!std::isfinite(routed_scaling_factor) || routed_scaling_factor <= 0.0)
    reject("routed_scaling_factor", show(routed_scaling_factor), "must be a finite number > 0");
  range("num_hidden_layers", num_hidden_layers, 1, 4096, "must be in [1, 4096]");
  if (!std::isfinite(rms_norm_eps) || rms_norm_eps <= 0.0) reject("rms_norm_eps", show(rms_norm_eps), "must be a finite number > 0");
}

}  // namespace moex
