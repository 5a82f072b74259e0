// The expert-parallel pass's schedule, for every backend.
#include "runtime/layer/pass.h"

namespace moex::layer {

namespace {
void run(PassSteps& s, OwnRows own, bool grad) {
  const PassPlan& plan = s.pass_plan();
  const int C = plan.main.chunks;
  // Local-split splits the forward's own rows only: in backward, the weight gradients already run
  // while the last returns travel, so all own rows go first, hiding the first dispatch.
  const std::int64_t S = plan.main.num_local, split = own.split && !grad ? plan.own_split : S;
  // Local-first: the own rows skip the exchange, so the exchanges leave their blocks out.
  for (int c = 0; c < C; ++c) s.send(c, grad, own.first);
  s.shared(grad);
  if (own.first) {
    keep_own(plan, s);
    s.experts({.part = Part::kSelf, .first_slot = 0, .end_slot = split}, grad);
    if (split == S) own_back(plan, s, grad);
  }
  for (int c = 0; c < C; ++c) {
    s.arrived(c, grad);
    s.experts({.chunk = c, .part = own.first ? Part::kRemote : Part::kAll}, grad);
    s.start_return(c, grad, own.first);
  }
  // Local-split: the later slots' own rows while the last returns travel.
  if (own.first && split < S) {
    s.experts({.part = Part::kSelf, .first_slot = split, .end_slot = S}, grad);
    own_back(plan, s, grad);
  }
  if (grad) s.weight_grads();
  for (int c = 0; c < C; ++c) s.returning(c, grad);
  for (int c = 0; c < C; ++c) {
    s.returned(c, grad);
    sum_returns(s.pass_plan(), s, c, s.accumulate(), grad);
  }
}
}  // namespace

void run_forward(PassSteps& s, OwnRows own) { run(s, own, false); }
void run_backward(PassSteps& s, OwnRows own) { run(s, own, true); }

}  // namespace moex::layer
