// The expert-parallel pass's schedule, for every backend.
#include "runtime/layer/pass.h"

#include "base/error.h"

namespace moex::layer {

void PassSteps::keep_own(bool) { throw InternalError("layer::PassSteps: this backend has no local-first stage"); }
void PassSteps::own_back(bool) { throw InternalError("layer::PassSteps: this backend has no local-first stage"); }

namespace {
void run(PassSteps& s, bool local_first, bool grad) {
  const int C = s.pass_plan().main.chunks;
  // Local-first: the own rows skip the exchange, so the exchanges leave their blocks out.
  for (int c = 0; c < C; ++c) s.send(c, grad, local_first);
  s.shared(grad);
  if (local_first) {
    s.keep_own(grad);
    s.experts({0, Part::kSelf}, grad);
    s.own_back(grad);
  }
  for (int c = 0; c < C; ++c) {
    s.arrived(c, grad);
    s.experts({c, local_first ? Part::kRemote : Part::kAll}, grad);
    s.start_return(c, grad, local_first);
  }
  if (grad) s.weight_grads();
  for (int c = 0; c < C; ++c) s.returning(c, grad);
  for (int c = 0; c < C; ++c) {
    s.returned(c, grad);
    sum_returns(s.pass_plan(), s, c, s.accumulate(), grad);
  }
}
}  // namespace

void run_forward(PassSteps& s, bool local_first) { run(s, local_first, false); }
void run_backward(PassSteps& s, bool local_first) { run(s, local_first, true); }

}  // namespace moex::layer
