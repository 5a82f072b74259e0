// The expert-parallel pass, written once for both layers: the order in which one forward or backward
// pass sends its rows, runs the shared experts, computes the routed experts stage by stage, returns
// the rows and sums them per token (the schedule that makes the exchange overlap the computation).
// A backend supplies the steps whose code differs: the CPU layer (host memory, CBLAS, its
// communication stream) and the CUDA layer (device memory, cuBLAS grouped GEMM, its device
// communicator).
#pragma once

#include "runtime/layer/pass_plan.h"
#include "runtime/layer/row_exchange.h"

namespace moex::layer {

/// Which received blocks (source rank, chunk) of the main plan a compute stage covers.
enum class Part {
  kAll,     ///< every source's rows of one chunk
  kRemote,  ///< the other ranks' rows of one chunk (local-first: this rank's came before)
  kSelf,    ///< this rank's own rows of every chunk for some slots (local-first: one GEMM per expert)
};
struct Stage {
  int chunk = 0;  ///< unused for Part::kSelf
  Part part = Part::kAll;
  /// Part::kSelf: the local slots [first_slot, end_slot) (local-first: all; local-split: those
  /// before PassPlan::own_split, then the rest). A backend starts the own rows' sums at first_slot 0
  /// and completes them (backward: their routing-weight gradients) at end_slot = num_local.
  std::int64_t first_slot = 0, end_slot = 0;
};

/// The steps of a pass a backend supplies, beside the row moves of RowMoves. `grad` is false in
/// forward (the rows are x; the experts' outputs, weighted, go back) and true in backward (the rows
/// are dL/dy; the experts' input gradients and the K routing-weight gradients of each row go back).
class PassSteps : public RowMoves {
 public:
  /// The pass's plan: routed, its metadata exchanged and finished (PassPlan::finish) before the pass.
  virtual const PassPlan& pass_plan() const = 0;
  /// Chunk c's rows gathered into Buf::kOriginSend and their dispatch() started (`skip_self`:
  /// local-first, this rank's own block stays).
  virtual void send(int c, bool grad, bool skip_self) = 0;
  /// The shared experts, into Buf::kOut (forward), or their backward with their gradients (a backend
  /// may have queued them earlier, beside the gate: then this does nothing).
  virtual void shared(bool grad) = 0;
  /// Chunk c's rows readable in Buf::kRecv (arrive() done).
  virtual void arrived(int c, bool grad) = 0;
  /// The routed experts over a stage's rows: each received row's weighted sum of its experts'
  /// outputs into Buf::kRet (forward); the experts' input gradients summed per row into Buf::kRet and
  /// each entry's routing-weight gradient into kRet's dw twin (backward; weight gradients too, or in
  /// weight_grads()).
  virtual void experts(Stage stage, bool grad) = 0;
  /// Chunk c's Buf::kRet on its way back: give_back() started (a CPU backend relays too).
  virtual void start_return(int c, bool grad, bool skip_self) = 0;
  /// Backward, after every stage: the expert weight gradients a backend computes over each expert's
  /// whole block (the same GEMMs for every chunking).
  virtual void weight_grads() {}
  /// After every chunk's start_return: chunk c's relay() started, where the backend has not done it.
  virtual void returning(int c, bool grad) = 0;
  /// Chunk c's returned rows readable in Buf::kOriginBack.
  virtual void returned(int c, bool grad) = 0;
  /// Whether Buf::kOut already holds the shared experts' part (the sums add to it) or not (they
  /// overwrite it).
  virtual bool accumulate() const = 0;
};

/// How a pass treats the rows a rank routes to itself (sched::Schedule's local_first, local_split).
struct OwnRows {
  bool first = false;  ///< they skip the exchange and compute before the other ranks' rows
  /// (with first) forward: only the slots before PassPlan::own_split first, the rest after the
  /// last chunk's return is started; backward as `first` (its weight gradients fill that time)
  bool split = false;
};

/// The forward pass over s.pass_plan(): every chunk sent, the shared experts while they travel,
/// local-first's own rows (when asked), then per chunk the experts once it arrived and its rows
/// back while the next computes, local-split's later own rows while the last travel; last, each
/// token's returned rows summed into Buf::kOut.
void run_forward(PassSteps& s, OwnRows own);
/// The backward pass, along the forward's routes: dL/dy rows sent, the shared experts' backward,
/// the experts' data gradients per stage, their weight gradients, the sums into Buf::kOut (dx) and
/// Buf::kPicks (the routing-weight gradients).
void run_backward(PassSteps& s, OwnRows own);

}  // namespace moex::layer
