#!/usr/bin/env python3
"""The DeepSeekMoE statistics paper's study (arXiv 2505.10860) on moex: does shared-expert isolation and
normalised sigmoid gating make the teacher-student expert estimation converge faster, and does the
router saturate early?

Four variants of one model shape (hidden 64, 16 routed experts of width 32, top-4, no group limit,
routed scaling 1), teacher and student alike:
  softmax            deepseek_v2 gating: softmax scores, top-K, weights not renormalised
  softmax+shared     ... with 2 shared experts
  sigmoid            deepseek_v3 gating: sigmoid scores, top-K, weights normalised to sum 1
  sigmoid+shared     ... with 2 shared experts
each trained with moex-train across --ranks ranks for several seeds. moex-train draws fresh tokens every
step, so the loss of step s is the estimation error after s x (global batch) samples, measured on
samples the student has not seen. The router evaluation (--eval-tokens) gives router saturation and
change rate against training progress.

  scripts/router_study.py --train build/bin/moex-train --out docs/router_study [--ranks 2] [--seeds 1,2,3]

Writes OUT/results.json (every run's losses and router series), OUT/summary.md (the tables) and, with
matplotlib, OUT/estimation_error.png and OUT/router.png.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

VARIANTS = {
    "softmax": {"model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "greedy",
                "norm_topk_prob": False, "n_shared_experts": 0},
    "softmax+shared": {"model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "greedy",
                       "norm_topk_prob": False, "n_shared_experts": 2},
    "sigmoid": {"model_type": "deepseek_v3", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                "norm_topk_prob": True, "n_shared_experts": 0},
    "sigmoid+shared": {"model_type": "deepseek_v3", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                       "norm_topk_prob": True, "n_shared_experts": 2},
}
BASE = {"hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "num_hidden_layers": 2, "rms_norm_eps": 1e-6}


def run(args, name, seed, workdir):
    cfg = dict(BASE, **VARIANTS[name])
    cpath = os.path.join(workdir, f"{name}.json")
    json.dump(cfg, open(cpath, "w"), indent=1)
    log = os.path.join(workdir, f"{name}-{seed}.jsonl")
    cmd = [args.mpirun, "-np", str(args.ranks), args.train, "--config", cpath, "--seed", str(seed), "--steps",
           str(args.steps), "--tokens-per-rank", str(args.tokens_per_rank), "--eval-tokens", str(args.eval_tokens),
           "--eval-every", str(args.eval_every), "--log-every", "100000", "--log-json", log, "--chunks", "1"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}")
    rows = [json.loads(line) for line in open(log) if line.strip()]
    steps = [r for r in rows if "step" in r]
    sats = [r for r in rows if "eval_step" in r]
    return {
        "loss": [r["loss"] for r in steps],
        "change_rate": {r["step"]: statistics.mean(l["router_change_rate"] for l in r["layers"])
                        for r in steps if r.get("evaluated") and "router_change_rate" in r["layers"][0]},
        "saturation": {s["eval_step"]: statistics.mean(s["router_saturation"]) for s in sats},
        "jain_last": statistics.mean(l["jain_index"] for l in steps[-1]["layers"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="build/bin/moex-train")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--out", default="docs/router_study")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--tokens-per-rank", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=20)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    batch = args.tokens_per_rank * args.ranks
    marks = [s for s in (10, 25, 50, 100, 200, 400, 800, 1600) if s <= args.steps]
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in VARIANTS:
            results[name] = {seed: run(args, name, seed, work) for seed in seeds}
            print(f"{name}: final loss / first " +
                  ", ".join(f"{r['loss'][-1] / r['loss'][0]:.3f}" for r in results[name].values()), flush=True)
    json.dump({"args": vars(args), "base_config": BASE, "variants": VARIANTS,
               "runs": {n: {str(s): r for s, r in v.items()} for n, v in results.items()}},
              open(os.path.join(args.out, "results.json"), "w"), indent=1)

    # Tables: estimation error (loss / the step-1 loss, mean over seeds, min-max) against samples.
    def rel(name, step):
        vals = [r["loss"][step - 1] / r["loss"][0] for r in results[name].values()]
        return statistics.mean(vals), min(vals), max(vals)

    lines = [f"Estimation error (loss ÷ the untrained student's, mean of seeds {args.seeds}; min–max) against "
             f"samples seen ({args.ranks} ranks × {args.tokens_per_rank} tokens a step):", "",
             "| samples | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for s in marks:
        cells = []
        for name in VARIANTS:
            m, lo, hi = rel(name, s)
            cells.append(f"{m:.4f} ({lo:.4f}–{hi:.4f})")
        lines.append(f"| {s * batch} | " + " | ".join(cells) + " |")
    ev = sorted(next(iter(results["sigmoid"].values()))["saturation"])
    lines += ["", f"Router saturation (% of the final evaluation's top-4 selections of {args.eval_tokens} fixed "
                  "tokens already chosen; mean of layers and seeds):", "",
              "| step | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for s in ev:
        lines.append(f"| {s} | " + " | ".join(
            f"{statistics.mean(r['saturation'][s] for r in results[n].values()):.1f}" for n in VARIANTS) + " |")
    lines += ["", "Router change rate (% of the selections that changed since the previous evaluation):", "",
              "| step | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for s in ev[1:]:
        lines.append(f"| {s} | " + " | ".join(
            f"{statistics.mean(r['change_rate'][s] for r in results[n].values()):.2f}" for n in VARIANTS) + " |")
    lines += ["", "Jain index of the expert load at the last step: " + ", ".join(
        f"{n} {statistics.mean(r['jain_last'] for r in results[n].values()):.3f}" for n in VARIANTS)]
    open(os.path.join(args.out, "summary.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (apt-get install python3-matplotlib): no plots")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in VARIANTS:
        xs = [(i + 1) * batch for i in range(args.steps)]
        ys = [statistics.mean(r["loss"][i] / r["loss"][0] for r in results[name].values()) for i in range(args.steps)]
        ax.plot(xs, ys, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("estimation error (loss / untrained loss)")
    ax.set_title(f"Teacher-student expert estimation on moex ({args.ranks} ranks, {len(seeds)} seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "estimation_error.png"), dpi=110)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in VARIANTS:
        a1.plot(ev, [statistics.mean(r["saturation"][s] for r in results[name].values()) for s in ev], label=name)
        a2.plot(ev[1:], [statistics.mean(r["change_rate"][s] for r in results[name].values()) for s in ev[1:]],
                label=name)
    a1.set_xlabel("step")
    a1.set_ylabel("router saturation %")
    a2.set_xlabel("step")
    a2.set_ylabel("router change rate %")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "router.png"), dpi=110)
    print(f"plots in {args.out}")


if __name__ == "__main__":
    main()
