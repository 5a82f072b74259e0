// AdamW update.
#include "runtime/model/adamw.h"

#include <cmath>

#include "base/error.h"

namespace moex {

void AdamW::add(ParamBlock* block) {
  states_.push_back({block, std::vector<float>(block->value.size(), 0.0f),
                     std::vector<float>(block->value.size(), 0.0f)});
}

std::array<std::vector<float>*, 2> AdamW::moments(const ParamBlock* block) {
  for (auto& s : states_)
    if (s.block == block) return {&s.m, &s.v};
  throw InvalidArgument("AdamW::moments(): the block is not registered with this optimiser");
}

void AdamW::set_steps(std::int64_t steps) {
  if (steps < 0) throw InvalidArgument("AdamW::set_steps: " + std::to_string(steps) + " steps: must be >= 0");
  step_ = steps;
}

void AdamW::step() {
  ++step_;
  const auto& o = options_;
  const float bc1 = 1.0f - std::pow(o.beta1, static_cast<float>(step_));
  const float bc2 = 1.0f - std::pow(o.beta2, static_cast<float>(step_));
  for (auto& s : states_) {
    float* p = s.block->value.data();
    const float* g = s.block->grad.data();
    float* m = s.m.data();
    float* v = s.v.data();
    const std::size_t n = s.block->value.size();
    for (std::size_t i = 0; i < n; ++i) {
      m[i] = o.beta1 * m[i] + (1.0f - o.beta1) * g[i];
      v[i] = o.beta2 * v[i] + (1.0f - o.beta2) * g[i] * g[i];
      const float update = (m[i] / bc1) / (std::sqrt(v[i] / bc2) + o.eps);
      p[i] -= o.lr * (update + o.weight_decay * p[i]);
    }
  }
}

}  // namespace moex
