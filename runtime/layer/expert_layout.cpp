// ExpertLayout: where a layer's routed experts live, for both layers.
#include "runtime/layer/expert_layout.h"

#include <algorithm>
#include <utility>

#include "base/error.h"

namespace moex::layer {

ExpertLayout::ExpertLayout(std::optional<sched::ExpertPlacement> placement,
                           std::optional<sched::ReplicaLayout> replicas, std::optional<sched::Topology> topology,
                           std::int64_t experts, int world, const std::string& name)
    : placement_(std::move(placement)),
      replicas_(std::move(replicas)),
      topology_(topology ? std::move(*topology) : sched::Topology::single_node(world)),
      experts_(experts) {
  if (placement_.has_value() == replicas_.has_value())
    throw InvalidArgument(name + ": needs an expert placement or a replica layout (exactly one)");
  auto check_world = [&](const char* what, int w) {
    if (w != world)
      throw InvalidArgument(name + ": " + what + " is for " + std::to_string(w) + " ranks but the communicator has " +
                            std::to_string(world));
  };
  if (replicas_) {
    replicas_->validate(experts);
    check_world("replica layout", replicas_->world_size());
  } else {
    if (placement_->num_experts() != experts)
      throw InvalidArgument(name + ": placement covers " + std::to_string(placement_->num_experts()) +
                            " experts but n_routed_experts = " + std::to_string(experts));
    check_world("placement", placement_->world_size());
  }
  check_world("topology", topology_.world_size());
  derive();
}

void ExpertLayout::set_replicas(const sched::ReplicaLayout& to) {
  if (!replicas_) throw InvalidArgument("ExpertLayout: a new replica layout for a layer in placement mode");
  replicas_ = to;
  derive();
}

std::vector<std::pair<std::int64_t, std::int64_t>> ExpertLayout::multi_slots(int r) const {
  std::vector<std::pair<std::int64_t, std::int64_t>> out;
  for (std::size_t s = 0; s < slots(r).size(); ++s)
    if (multi_index(slots(r)[s]) >= 0) out.emplace_back(static_cast<std::int64_t>(s), multi_index(slots(r)[s]));
  return out;
}

void ExpertLayout::derive() {
  const int P = topology_.world_size();
  if (replicas_) {
    slot_expert_ = replicas_->slot_expert();
  } else {
    slot_expert_.assign(static_cast<std::size_t>(P), {});
    for (int r = 0; r < P; ++r) {
      const auto mine = placement_->experts_of(r);
      slot_expert_[static_cast<std::size_t>(r)].assign(mine.begin(), mine.end());
    }
  }
  max_slots_ = 1;
  for (const auto& v : slot_expert_)
    max_slots_ = std::max<std::int64_t>(max_slots_, static_cast<std::int64_t>(v.size()));
  multi_index_.assign(static_cast<std::size_t>(experts_), -1);
  multi_experts_ = 0;
  for (std::int64_t e = 0; replicas_ && e < experts_; ++e)
    if (replicas_->num_replicas(e) > 1) multi_index_[static_cast<std::size_t>(e)] = multi_experts_++;
}

}  // namespace moex::layer
