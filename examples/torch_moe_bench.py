#!/usr/bin/env python3
"""The MoE layer of examples/bench_gpu.cpp's `layer` case in PyTorch, as a baseline.

DeepSeek-V2-Lite's layer shape (hidden 2048, ffn 1408, 64 routed experts, top-6, 2 shared experts
run as one FFN of width 2*1408), softmax greedy gate in fp32 (no top-k normalisation, scaling 1),
SwiGLU experts in bf16 (fp32 accumulation inside the GEMMs). Two variants:

  hf_loop  Hugging Face style: a Python loop over the experts, each with its own gate_proj /
           up_proj / down_proj weights; torch.where picks its tokens, index_select gathers them,
           index_add_ adds the weighted outputs back (as transformers' Mixtral / DeepSeek code).
  grouped  tokens sorted by expert, then torch._grouped_mm over the stacked expert weights when
           this torch has it and it runs here (impl "_grouped_mm"), else padded blocks per expert
           through torch.bmm (impl "bmm_padded"); the K outputs of a token are combined with one
           batched matmul by the routing weights.

Forward + backward (dx and every weight gradient; gradients set to None before each iteration)
timed with torch.cuda.Event, median over --iters after --warmup. One JSON line per variant:
  {"variant": ..., "impl": ..., "ms_fwd_bwd": ..., "tokens": ..., "tokens_per_s": ..., ...}
--check instead compares the two variants (output, dx, every gradient) in fp32 on a small shape
(and in bf16 too when the grouped variant uses torch._grouped_mm); exit 1 on a mismatch.
Without torch or without a CUDA device it prints "SKIPPED: <reason>" and exits 0.
"""

import argparse
import json
import statistics
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408, help="moe_intermediate_size")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--shared", type=int, default=2, help="n_shared_experts (one FFN of width shared*ffn)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--variants", default="hf_loop,grouped", help="comma-separated: hf_loop, grouped")
    p.add_argument("--check", action="store_true", help="compare the variants on a small shape instead of timing")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --check; fp32 only)")
    a = p.parse_args(argv)
    for name in ("hidden", "ffn", "experts", "topk", "tokens", "iters"):
        if getattr(a, name) < 1:
            p.error(f"--{name} = {getattr(a, name)}: must be >= 1")
    if a.topk > a.experts:
        p.error(f"--topk = {a.topk}: must be <= --experts = {a.experts}")
    if a.shared < 0 or a.warmup < 0:
        p.error("--shared and --warmup must be >= 0")
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in a.variants:
        if v not in ("hf_loop", "grouped"):
            p.error(f"--variants: unknown variant '{v}' (expected hf_loop, grouped)")
    if a.device not in ("cuda", "cpu"):
        p.error(f"--device = '{a.device}': expected cuda or cpu")
    if a.device == "cpu" and not a.check:
        p.error("--device cpu is for --check only (timings are of the GPU)")
    return a


# ---------------------------------------------------------------------------------------------------
# Parameters

def make_params(torch, hidden, ffn, experts, shared_ffn, dtype, device, seed):
    """Weights of standard deviation 1/sqrt(fan_in) (as moex-bench-gpu), in the grouped layout:
    gate [E, H] fp32; w13 [E, 2F, H] (gate_proj rows over up_proj rows); w2 [E, H, F]; shared
    w13 [2Fs, H] and w2 [H, Fs]."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def normal(*shape, fan_in):
        return (torch.randn(*shape, generator=g) / fan_in ** 0.5).to(device=device, dtype=dtype)

    p = {
        "gate": (torch.randn(experts, hidden, generator=g) / hidden ** 0.5).to(device=device, dtype=torch.float32),
        "w13": normal(experts, 2 * ffn, hidden, fan_in=hidden),
        "w2": normal(experts, hidden, ffn, fan_in=ffn),
    }
    if shared_ffn > 0:
        p["shared_w13"] = normal(2 * shared_ffn, hidden, fan_in=hidden)
        p["shared_w2"] = normal(hidden, shared_ffn, fan_in=shared_ffn)
    return p


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------
# The layer, two ways

def gate(torch, x, gate_w, topk):
    """Softmax greedy top-K in fp32: (topk_weight [T, K] fp32, topk_ids [T, K])."""
    logits = torch.nn.functional.linear(x.float(), gate_w)
    scores = logits.softmax(dim=-1)
    return torch.topk(scores, topk, dim=-1, sorted=True)


def swiglu_ffn(torch, x, w13, w2):
    """down(silu(gate(x)) * up(x)) with w13 = [gate_proj; up_proj] [2F, H], w2 [H, F]."""
    f = w13.shape[0] // 2
    h = torch.nn.functional.linear(x, w13)
    return torch.nn.functional.linear(torch.nn.functional.silu(h[:, :f]) * h[:, f:], w2)


class HfLoop:
    """Hugging Face style: per-expert modules' weights, a Python loop with torch.where (a host sync
    per expert), index_select and index_add_."""

    name = "hf_loop"
    impl = "python_loop"

    def __init__(self, torch, p, ffn):
        self.torch = torch
        self.gate_w = leaf(p["gate"])
        e = p["w13"].shape[0]
        self.gate_proj = [leaf(p["w13"][i, :ffn]) for i in range(e)]
        self.up_proj = [leaf(p["w13"][i, ffn:]) for i in range(e)]
        self.down_proj = [leaf(p["w2"][i]) for i in range(e)]
        self.shared = [leaf(p["shared_w13"]), leaf(p["shared_w2"])] if "shared_w13" in p else []

    def params(self):
        return [self.gate_w] + self.gate_proj + self.up_proj + self.down_proj + self.shared

    def grads(self):
        """Gradients in the grouped layout (for --check)."""
        t = self.torch
        g = {"gate": self.gate_w.grad,
             "w13": t.stack([t.cat([a.grad, b.grad]) for a, b in zip(self.gate_proj, self.up_proj)]),
             "w2": t.stack([d.grad for d in self.down_proj])}
        if self.shared:
            g["shared_w13"], g["shared_w2"] = self.shared[0].grad, self.shared[1].grad
        return g

    def forward(self, x, topk):
        t = self.torch
        fn = t.nn.functional
        weights, ids = gate(t, x, self.gate_w, topk)
        out = t.zeros_like(x)
        mask = fn.one_hot(ids, num_classes=len(self.gate_proj)).permute(2, 1, 0)  # [E, K, T]
        for e in range(len(self.gate_proj)):
            pick, tok = t.where(mask[e])
            if tok.numel() == 0:
                continue
            cur = x.index_select(0, tok)
            y = fn.linear(fn.silu(fn.linear(cur, self.gate_proj[e])) * fn.linear(cur, self.up_proj[e]),
                          self.down_proj[e])
            y = y * weights[tok, pick, None]
            out.index_add_(0, tok, y.to(x.dtype))
        if self.shared:
            out = out + swiglu_ffn(t, x, self.shared[0], self.shared[1])
        return out


def grouped_mm_works(torch, device, dtype):
    """Whether torch._grouped_mm exists and runs forward and backward here for `dtype`, including
    an empty group (what the grouped variant needs)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(48, 64, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(3, 32, 64, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([16, 16, 48], device=device, dtype=torch.int32)
        y = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
        want = torch.cat([a[:16] @ b[0].T, a[16:48] @ b[2].T])
        if y.shape != (48, 32) or not torch.allclose(y.float(), want.float(), rtol=2e-2, atol=2e-2):
            return False
        y.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return a.grad is not None and b.grad is not None
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


class Grouped:
    """Tokens sorted by expert; torch._grouped_mm (or padded torch.bmm) over stacked weights."""

    name = "grouped"

    def __init__(self, torch, p, use_grouped_mm):
        self.torch = torch
        self.gate_w = leaf(p["gate"])
        self.w13 = leaf(p["w13"])
        self.w2 = leaf(p["w2"])
        self.shared = [leaf(p["shared_w13"]), leaf(p["shared_w2"])] if "shared_w13" in p else []
        self.use_grouped_mm = use_grouped_mm
        self.impl = "_grouped_mm" if use_grouped_mm else "bmm_padded"

    def params(self):
        return [self.gate_w, self.w13, self.w2] + self.shared

    def grads(self):
        g = {"gate": self.gate_w.grad, "w13": self.w13.grad, "w2": self.w2.grad}
        if self.shared:
            g["shared_w13"], g["shared_w2"] = self.shared[0].grad, self.shared[1].grad
        return g

    def experts(self, xs, sorted_ids, counts):
        """Expert FFN of the rows xs [N, H], sorted by expert (counts [E] rows each)."""
        t = self.torch
        fn = t.nn.functional
        e, f = self.w2.shape[0], self.w2.shape[2]
        if self.use_grouped_mm:
            offs = t.cumsum(counts, 0).to(t.int32)
            h = t._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs)
            a = fn.silu(h[:, :f]) * h[:, f:]
            return t._grouped_mm(a, self.w2.transpose(-2, -1), offs=offs)
        n, hidden = xs.shape
        cap = int(counts.max())  # host sync
        start = t.cumsum(counts, 0) - counts
        pos = t.arange(n, device=xs.device) - start[sorted_ids]
        xp = xs.new_zeros(e, cap, hidden).index_put((sorted_ids, pos), xs)
        h = t.bmm(xp, self.w13.transpose(1, 2))
        a = fn.silu(h[..., :f]) * h[..., f:]
        yp = t.bmm(a, self.w2.transpose(1, 2))
        return yp[sorted_ids, pos]

    def forward(self, x, topk):
        t = self.torch
        tokens, hidden = x.shape
        weights, ids = gate(t, x, self.gate_w, topk)
        flat = ids.reshape(-1)
        sorted_ids, order = t.sort(flat, stable=True)
        counts = t.bincount(flat, minlength=self.w2.shape[0])
        xs = x.index_select(0, order // topk)
        ye = self.experts(xs, sorted_ids, counts)
        inv = t.empty_like(order)
        inv[order] = t.arange(order.numel(), device=order.device)
        ye_tok = ye.index_select(0, inv).view(tokens, topk, hidden)
        out = t.bmm(weights.to(x.dtype).unsqueeze(1), ye_tok).squeeze(1)
        if self.shared:
            out = out + swiglu_ffn(t, x, self.shared[0], self.shared[1])
        return out


def build(torch, variant, p, ffn, use_grouped_mm):
    return HfLoop(torch, p, ffn) if variant == "hf_loop" else Grouped(torch, p, use_grouped_mm)


# ---------------------------------------------------------------------------------------------------
# Check and benchmark

def run_once(torch, layer, x, dy, topk):
    for q in layer.params():
        q.grad = None
    xx = x.detach().clone().requires_grad_(True)
    y = layer.forward(xx, topk)
    y.backward(dy)
    return y.detach(), xx.grad


def check(torch, a):
    """Both variants on one small shape: output, dx and gradients must agree."""
    device = a.device
    hidden, ffn, experts, topk, tokens = 64, 32, 8, 3, 96
    shared_ffn = a.shared * ffn
    runs = [("fp32", torch.float32, 1e-4)]
    if grouped_mm_works(torch, device, torch.bfloat16):
        runs.append(("bf16", torch.bfloat16, 3e-2))
    failures = 0
    for label, dtype, tol in runs:
        use_gmm = grouped_mm_works(torch, device, dtype)
        p = make_params(torch, hidden, ffn, experts, shared_ffn, dtype, device, a.seed)
        g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
        x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
        dy = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
        ref = build(torch, "hf_loop", p, ffn, use_gmm)
        got = build(torch, "grouped", p, ffn, use_gmm)
        y_ref, dx_ref = run_once(torch, ref, x, dy, topk)
        y_got, dx_got = run_once(torch, got, x, dy, topk)
        pairs = [("y", y_got, y_ref), ("dx", dx_got, dx_ref)]
        gr, gg = ref.grads(), got.grads()
        pairs += [(f"grad {k}", gg[k], gr[k]) for k in gr]
        for what, u, v in pairs:
            diff = (u.float() - v.float()).abs().max().item()
            scale = v.float().abs().max().item()
            rel = diff / scale if scale > 0 else diff
            ok = rel <= tol
            failures += 0 if ok else 1
            print(f"check {label} grouped({got.impl}) vs hf_loop: {what:16s} max|diff| {diff:.3e} "
                  f"max|ref| {scale:.3e} relative {rel:.3e} {'ok' if ok else f'FAILED (> {tol})'}")
    print("CHECK PASSED" if failures == 0 else f"CHECK FAILED: {failures} tensor(s) differ")
    return 0 if failures == 0 else 1


def bench(torch, a):
    dtype = torch.bfloat16
    device = "cuda"
    use_gmm = grouped_mm_works(torch, device, dtype)
    p = make_params(torch, a.hidden, a.ffn, a.experts, a.shared * a.ffn, dtype, device, a.seed)
    g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    x = torch.randn(a.tokens, a.hidden, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(a.tokens, a.hidden, generator=g).to(device=device, dtype=dtype)
    for variant in a.variants:
        layer = build(torch, variant, p, a.ffn, use_gmm)
        for _ in range(a.warmup):
            run_once(torch, layer, x, dy, a.topk)
        torch.cuda.synchronize()
        ms = []
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(a.iters):
            start.record()
            run_once(torch, layer, x, dy, a.topk)
            stop.record()
            stop.synchronize()
            ms.append(start.elapsed_time(stop))
        med = statistics.median(ms)
        print(json.dumps({"bench": "torch", "case": "layer", "variant": variant, "impl": layer.impl,
                          "ms_fwd_bwd": med, "tokens": a.tokens, "tokens_per_s": a.tokens / (med * 1e-3),
                          "hidden": a.hidden, "ffn": a.ffn, "experts": a.experts, "topk": a.topk,
                          "shared_experts": a.shared, "dtype": "bf16", "iters": a.iters,
                          "device": torch.cuda.get_device_name(), "torch": torch.__version__}))
        sys.stdout.flush()
        del layer
        torch.cuda.empty_cache()
    return 0


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import torch
    except ImportError as e:
        print(f"SKIPPED: PyTorch is not installed ({e})")
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"SKIPPED: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 --check compares exact fp32 GEMMs
    return check(torch, a) if a.check else bench(torch, a)


if __name__ == "__main__":
    sys.exit(main())
