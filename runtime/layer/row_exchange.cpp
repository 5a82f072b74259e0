// The moves of a pass's rows over a PassPlan, for every backend.
#include "runtime/layer/row_exchange.h"

#include "base/error.h"

namespace moex::layer {
namespace {
std::size_t z(int c) { return static_cast<std::size_t>(c); }
}  // namespace

void dispatch(const PassPlan& plan, RowMoves& m, int c, bool skip_self, const std::string& label) {
  if (!plan.hierarchical()) {
    m.exchange(plan.main, c, true, Buf::kOriginSend, Buf::kRecv, false, skip_self, label);
    return;
  }
  // Stage A: one row per (token, node) to this rank's peer on that node (its forwarder), which
  // sends each on, once per rank of its node holding its picks (stage B).
  const sched::ExchangePlan &A = plan.a, &B = plan.b;
  m.exchange(A, c, true, Buf::kOriginSend, Buf::kARecv, false, false, label + " stage A");
  m.ready();
  const std::int64_t f = B.chunk_send_first(c);
  m.gather(B.chunk_send_count(c), B.send_token, f, Buf::kARecv, Buf::kBSend, f, false);
  m.exchange(B, c, true, Buf::kBSend, Buf::kBRecv, false, false, label + " stage B");
}

void arrive(const PassPlan& plan, RowMoves& m, int c) {
  m.ready();
  if (!plan.hierarchical()) return;
  // Arrivals (by forwarder, then origin, then token) to their rows (chunk, origin, token).
  const std::int64_t r = plan.main.chunk_recv_first(c);
  m.gather(plan.main.chunk_recv_count(c), plan.row_arrival, r, Buf::kBRecv, Buf::kRecv, r, false);
}

void give_back(const PassPlan& plan, RowMoves& m, int c, bool dw, bool skip_self, const std::string& label) {
  if (!plan.hierarchical()) {
    m.exchange(plan.main, c, false, Buf::kRet, Buf::kOriginBack, false, skip_self, label);
    if (dw) m.exchange(plan.main, c, false, Buf::kRet, Buf::kOriginBack, true, skip_self, label + " (weights)");
    return;
  }
  // Stage B back: the rows in arrival order to the forwarder each came from.
  const sched::ExchangePlan& B = plan.b;
  const std::int64_t f = B.chunk_recv_first(c), n = plan.main.chunk_recv_count(c);
  m.gather(n, plan.arrival_row, f, Buf::kRet, Buf::kBRet, f, false);
  if (dw) m.gather(n, plan.arrival_row, f, Buf::kRet, Buf::kBRet, f, true);
  m.exchange(B, c, false, Buf::kBRet, Buf::kBBack, false, false, label + " stage B");
  if (dw) m.exchange(B, c, false, Buf::kBRet, Buf::kBBack, true, false, label + " stage B (weights)");
}

void relay(const PassPlan& plan, RowMoves& m, int c, bool dw, const std::string& label) {
  if (!plan.hierarchical()) return;
  m.ready();
  // Each stage-A row's returns summed in rank order (0 + r_a + r_b ...), as the flat path's
  // per-node partial sums are; the routing-weight gradients to their stage-A pick positions.
  const sched::ExchangePlan &A = plan.a, &B = plan.b;
  const std::int64_t t0 = B.chunk_tokens[z(c)], t1 = B.chunk_tokens[z(c) + 1];
  m.sum(t1 - t0, B.token_offsets, t0, B.token_rows, Buf::kBBack, Buf::kARet, t0, false);
  if (dw) m.gather_values((t1 - t0) * B.topk, B.pick_back, t0 * B.topk, Buf::kBBack, Buf::kARet, t0 * B.topk);
  // Stage A back: to the origins, into the rows they sent.
  m.exchange(A, c, false, Buf::kARet, Buf::kOriginBack, false, false, label + " stage A");
  if (dw) m.exchange(A, c, false, Buf::kARet, Buf::kOriginBack, true, false, label + " stage A (weights)");
}

void keep_own(const PassPlan& plan, RowMoves& m) {
  const sched::ExchangePlan& L = plan.main;
  for (int c = 0; c < L.chunks; ++c)
    m.copy(L.recv_counts[L.cp(c, L.rank)], Buf::kOriginSend, L.send_displ(c, L.rank), Buf::kRecv,
           L.recv_displ(c, L.rank), false);
}

void own_back(const PassPlan& plan, RowMoves& m, bool dw) {
  const sched::ExchangePlan& L = plan.main;
  for (int c = 0; c < L.chunks; ++c)
    for (const bool twin : {false, true})
      if (!twin || dw)
        m.copy(L.recv_counts[L.cp(c, L.rank)], Buf::kRet, L.recv_displ(c, L.rank), Buf::kOriginBack,
               L.send_displ(c, L.rank), twin);
}

void sum_returns(const PassPlan& plan, RowMoves& m, int c, bool accumulate, bool dw) {
  m.ready();
  const sched::ExchangePlan& O = plan.origin();
  const std::int64_t t0 = O.chunk_tokens[z(c)], t1 = O.chunk_tokens[z(c) + 1];
  if (plan.per_node) {
    const std::int64_t g0 = plan.token_groups[static_cast<std::size_t>(t0)];
    const std::int64_t g1 = plan.token_groups[static_cast<std::size_t>(t1)];
    m.sum(g1 - g0, plan.group_offsets, g0, plan.group_rows, Buf::kOriginBack, Buf::kPartial, g0, false);
    m.sum(t1 - t0, plan.token_groups, t0, plan.group_ids, Buf::kPartial, Buf::kOut, t0, accumulate);
  } else {
    m.sum(t1 - t0, O.token_offsets, t0, O.token_rows, Buf::kOriginBack, Buf::kOut, t0, accumulate);
  }
  if (dw) m.gather_values((t1 - t0) * O.topk, O.pick_back, t0 * O.topk, Buf::kOriginBack, Buf::kPicks, t0 * O.topk);
}

std::int64_t buffer_rows(const PassPlan& plan, Buf b) {
  const bool hier = plan.hierarchical();
  switch (b) {
    case Buf::kOriginSend:
    case Buf::kOriginBack: return plan.origin().send_rows();
    case Buf::kRecv:
    case Buf::kRet: return plan.main.recv_rows();
    case Buf::kARecv:
    case Buf::kARet: return hier ? plan.a.recv_rows() : 0;
    case Buf::kBSend:
    case Buf::kBBack: return hier ? plan.b.send_rows() : 0;
    case Buf::kBRecv:
    case Buf::kBRet: return hier ? plan.b.recv_rows() : 0;
    case Buf::kPartial: return plan.per_node ? plan.groups() : 0;
    case Buf::kOut:
    case Buf::kPicks: break;
  }
  throw InternalError("layer::buffer_rows: kOut and kPicks belong to the pass's caller");
}

bool has_dw_twin(Buf b) {
  return b == Buf::kOriginBack || b == Buf::kRet || b == Buf::kARet || b == Buf::kBBack || b == Buf::kBRet;
}

comm::WorkPtr exchange_chunk(comm::Communicator& comm, const sched::ExchangePlan& plan, int c, bool out,
                             std::int64_t width, comm::DataType type, const void* from, void* to, bool skip_self,
                             std::string label, HostBlocks& b) {
  // Out, this rank's send blocks go to the peers' receive blocks; back, its receive blocks.
  plan.chunk_blocks(c, out, width, b.send_counts, b.send_displs);
  plan.chunk_blocks(c, !out, width, b.recv_counts, b.recv_displs);
  // Local-first: the block to itself is copied by the caller; the others keep their places.
  if (skip_self) b.send_counts[static_cast<std::size_t>(comm.rank())] = b.recv_counts[static_cast<std::size_t>(comm.rank())] = 0;
  const auto row = static_cast<std::int64_t>(comm::element_size(type)) * width;
  const std::int64_t f = out ? plan.chunk_send_first(c) : plan.chunk_recv_first(c);
  const std::int64_t t = out ? plan.chunk_recv_first(c) : plan.chunk_send_first(c);
  comm::AlltoallvArgs args;
  args.send = static_cast<const unsigned char*>(from) + f * row;
  args.send_counts = b.send_counts;
  args.send_displs = b.send_displs;
  args.recv = static_cast<unsigned char*>(to) + t * row;
  args.recv_counts = b.recv_counts;
  args.recv_displs = b.recv_displs;
  args.type = type;
  args.label = std::move(label);
  return comm.alltoallv(args);
}

}  // namespace moex::layer
