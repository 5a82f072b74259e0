// Contiguous expert sharding.
#include "scheduler/expert_placement.h"

#include <string>

#include "base/error.h"

namespace moex::sched {

ExpertPlacement ExpertPlacement::contiguous(std::int64_t num_experts, int world_size) {
  if (num_experts < 1) throw InvalidArgument("placement: num_experts = " + std::to_string(num_experts) + " must be >= 1");
  if (world_size < 1) throw InvalidArgument("placement: world_size = " + std::to_string(world_size) + " must be >= 1");
  ExpertPlacement p;
  p.owner_.resize(static_cast<std::size_t>(num_experts));
  p.slot_.resize(static_cast<std::size_t>(num_experts));
  p.experts_of_.resize(static_cast<std::size_t>(world_size));
  const std::int64_t base = num_experts / world_size;
  const std::int64_t extra = num_experts % world_size;
  std::int64_t e = 0;
  for (int r = 0; r < world_size; ++r) {
    const std::int64_t count = base + (r < extra ? 1 : 0);
    for (std::int64_t i = 0; i < count; ++i, ++e) {
      p.owner_[static_cast<std::size_t>(e)] = r;
      p.slot_[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(i);
      p.experts_of_[static_cast<std::size_t>(r)].push_back(e);
    }
  }
  return p;
}

}  // namespace moex::sched
