#!/usr/bin/env python3
"""moex-train's router telemetry, recomputed independently.

One training run with --eval-tokens, --log-json, --eval-routes and a final --save. Then:
  1. Every step's per-layer load statistics from its own `expert_load`: Jain's index
     (sum l)^2 / (E sum l^2), max/mean, (max - mean)/mean; the loads sum to tokens x ranks x top-K;
     the step's `max_mean_load` is the worst layer's.
  2. From the evaluations' top-K ids (--eval-routes): the router change rate of every evaluation
     against the one before, and the saturation of every evaluation against the last, equal to
     what the log says (1e-9).
  3. The routing decisions themselves: the final checkpoint's student (Hugging Face names) run in
     float64 numpy over the evaluation inputs (RMSNorm, the reference gate of deepseek_moe_ref.py,
     the residual) picks the same top-K sets as moex's last evaluation, for at least --min-agree of
     the tokens of every layer (fp32 against float64 may swap near-tied experts).
  4. The same run at another rank count with the same global batch has the same evaluation inputs.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_moe_ref as ref  # noqa: E402
from check_checkpoint import tensors  # noqa: E402
from safetensors_io import read_safetensors  # noqa: E402


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def common(a, b):
    """(token, expert) selections two [N, K] id arrays share."""
    return sum(len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist()))


def run_train(args, ranks, out_dir, tpr, extra=()):
    os.makedirs(out_dir, exist_ok=True)
    j, routes = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "routes.safetensors")
    cmd = [args.mpirun, "-np", str(ranks), args.train, "--steps", str(args.steps), "--tokens-per-rank", str(tpr),
           "--eval-tokens", str(args.eval_tokens), "--eval-every", str(args.eval_every), "--log-json", j,
           "--eval-routes", routes, "--log-every", "1000", "--chunks", "1", "--timeout", "60"] + list(extra)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if p.returncode != 0:
        fail(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}")
    lines = [json.loads(line) for line in open(j) if line.strip()]
    return p.stdout, [r for r in lines if "step" in r], [r for r in lines if "eval_step" in r], read_safetensors(routes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--eval-tokens", type=int, default=96)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--tokens-per-rank", type=int, default=128)
    ap.add_argument("--min-agree", type=float, default=0.98)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    P, S, N = args.ranks, args.steps, args.eval_tokens
    save = os.path.join(args.workdir, "ckpt")
    out, steps, sats, routes = run_train(args, P, os.path.join(args.workdir, f"np{P}"), args.tokens_per_rank,
                                         ["--save", save])
    if "router telemetry" not in out or "router saturation" not in out:
        fail(f"the run's summary has no router telemetry table:\n{out[-2000:]}")

    # 1. Load statistics from each step's own loads.
    cfg = json.load(open(os.path.join(save, open(os.path.join(save, "latest")).read().strip(), "config.json")))
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    for r in steps:
        worst = 0.0
        for li, lt in enumerate(r["layers"]):
            load = np.array(lt["expert_load"], dtype=np.float64)
            if load.size != E or load.sum() != args.tokens_per_rank * P * K:
                fail(f"step {r['step']} layer {li}: expert_load {load.tolist()} does not hold tokens x ranks x K picks")
            mean = load.mean()
            want = {"jain_index": load.sum() ** 2 / (E * (load ** 2).sum()), "load_max_mean": load.max() / mean,
                    "load_max_minus_mean_over_mean": (load.max() - mean) / mean}
            for k, v in want.items():
                if abs(lt[k] - v) > 1e-12 * max(1.0, abs(v)):
                    fail(f"step {r['step']} layer {li}: {k} = {lt[k]!r}, recomputed {v!r}")
            if not (lt["bytes_intra_node"] >= 0 and lt["bytes_inter_node"] >= 0):
                fail(f"step {r['step']} layer {li}: negative bytes")
            if P > 1 and lt["bytes_intra_node"] + lt["bytes_inter_node"] == 0:
                fail(f"step {r['step']} layer {li}: no exchange bytes at {P} ranks")
            worst = max(worst, want["load_max_mean"])
        if abs(r["max_mean_load"] - worst) > 1e-12 * worst:
            fail(f"step {r['step']}: max_mean_load {r['max_mean_load']} is not the worst layer's {worst}")
    print(f"ok load statistics of {len(steps)} steps x {len(steps[0]['layers'])} layers recomputed from expert_load")

    # 2. Change rate and saturation from the decisions.
    eval_steps = [int(s) for s in routes["eval_steps"]]
    want_steps = sorted({1, S} | set(range(args.eval_every, S + 1, args.eval_every)))
    if eval_steps != want_steps:
        fail(f"evaluations at steps {eval_steps}, expected {want_steps}")
    L = len(steps[0]["layers"])
    ids = [[routes[f"eval{i:04d}.layer{li}.topk_ids"].astype(np.int64) for li in range(L)] for i in range(len(eval_steps))]
    by_step = {r["step"]: r for r in steps}
    for i, s in enumerate(eval_steps):
        r = by_step[s]
        if not r.get("evaluated"):
            fail(f"step {s} is not marked evaluated")
        for li in range(L):
            got = r["layers"][li].get("router_change_rate")
            if i == 0:
                if got is not None:
                    fail(f"the first evaluation has a change rate {got}")
                continue
            want = 100.0 - 100.0 * common(ids[i][li], ids[i - 1][li]) / (N * K)
            if got is None or abs(got - want) > 1e-9:
                fail(f"step {s} layer {li}: router_change_rate {got}, recomputed {want}")
    if [s["eval_step"] for s in sats] != eval_steps:
        fail(f"saturation lines for {[s['eval_step'] for s in sats]}, expected {eval_steps}")
    for i, s in enumerate(sats):
        for li in range(L):
            want = 100.0 * common(ids[i][li], ids[-1][li]) / (N * K)
            if abs(s["router_saturation"][li] - want) > 1e-9:
                fail(f"eval step {s['eval_step']} layer {li}: saturation {s['router_saturation'][li]}, recomputed {want}")
    print(f"ok change rate and saturation of {len(eval_steps)} evaluations recomputed from the routes: saturation "
          f"{[round(s['router_saturation'][0], 1) for s in sats]} (layer 0)")

    # 3. The decisions against the final checkpoint in float64.
    final = os.path.join(save, open(os.path.join(save, "latest")).read().strip())
    w = {k: v.astype(np.float64) for k, v in tensors(final, "model").items()}
    rc = ref.resolve_config(cfg)
    h = routes["eval_inputs"].astype(np.float64)
    for li in range(L):
        pre = f"model.layers.{li}."
        g = w[pre + "post_attention_layernorm.weight"]
        normed = h / np.sqrt((h * h).mean(axis=1, keepdims=True) + cfg.get("rms_norm_eps", 1e-6)) * g
        lw = ref.strip_prefix(w, pre + "mlp.")
        idx = ref.gate_forward(rc, lw, normed)["idx"]
        same = np.mean([set(a) == set(b) for a, b in zip(idx.tolist(), ids[-1][li].tolist())])
        if same < args.min_agree:
            fail(f"layer {li}: moex's last evaluation and the float64 reference pick the same top-{K} set for only "
                 f"{same:.3f} of the tokens (need {args.min_agree})")
        print(f"ok layer {li}: the float64 reference picks moex's top-{K} set for {same * 100:.1f}% of {N} tokens")
        y, _ = ref.forward(rc, lw, normed)
        h = h + y

    # 4. The evaluation set does not depend on the rank count.
    other = 1 if P != 1 else 2
    _, _, _, routes1 = run_train(args, other, os.path.join(args.workdir, f"np{other}"),
                                 args.tokens_per_rank * P // other)
    if routes1["eval_inputs"].tobytes() != routes["eval_inputs"].tobytes():
        fail(f"the evaluation inputs differ between {P} and {other} ranks")
    print(f"ok the evaluation inputs are bitwise the same at {other} rank(s)")
    print("all router telemetry checks passed")


if __name__ == "__main__":
    main()
