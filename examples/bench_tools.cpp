// Helpers shared by moex-bench's benchmarks.
#include <nlohmann/json.hpp>

#include "examples/bench_tools.h"

namespace moex::tools {

Options& add_shape_options(Options& opt) {
  return opt.value("hidden", "1024", "hidden_size")
      .value("ffn", "704", "moe_intermediate_size")
      .value("experts", "16", "n_routed_experts")
      .value("shared", "0", "n_shared_experts")
      .value("topk", "4", "num_experts_per_tok")
      .value("groups", "1", "n_group")
      .value("topk-group", "1", "topk_group (with n_group = nodes: node-limited routing)")
      .value("scoring", "sigmoid", "scoring_func: sigmoid or softmax");
}

MoeConfig shape_config(const Options& opt) {
  const bool sigmoid = opt.str("scoring") == "sigmoid";
  const nlohmann::json cj{{"model_type", "deepseek_v3"},
                          {"hidden_size", opt.integer("hidden")},
                          {"moe_intermediate_size", opt.integer("ffn")},
                          {"n_routed_experts", opt.integer("experts")},
                          {"n_shared_experts", opt.integer("shared")},
                          {"num_experts_per_tok", opt.integer("topk")},
                          {"n_group", opt.integer("groups")},
                          {"topk_group", opt.integer("topk-group")},
                          {"scoring_func", opt.str("scoring")},
                          {"topk_method", sigmoid ? "noaux_tc" : "group_limited_greedy"},
                          {"norm_topk_prob", sigmoid},
                          {"routed_scaling_factor", sigmoid ? 2.5 : 1.0},
                          {"num_hidden_layers", 1}};
  return MoeConfig::from_json(cj);
}

}  // namespace moex::tools
