#!/usr/bin/env python3
"""Charts of a scripts/sweep.py JSON-lines file, as PNG files.

  /usr/bin/python3 scripts/plot_sweep.py docs/scaling/sweep.jsonl --out-dir docs/scaling

writes, where the sweep has the data (a chart without data is skipped, with a note):

  scaling_tokens_per_s.png  tokens/s against ranks, weak and strong, one line per node layout
  stage_breakdown.png       stacked per-stage times (ms_gate .. ms_shared) against ranks
  exchange_busbw.png        exchange bus bandwidth against message size (dispatch and return)
  load.png                  max/mean expert and rank load against the training step
  schedule.png              step time for every schedule (chunks x overlap x exchange)
  skew.png                  max/mean rank load and step time against skew, replicas off and on

Points are medians over a sweep's repeats; error bars span their min and max. Needs matplotlib
(Debian: python3-matplotlib); uses the Agg backend.
"""

import argparse
import collections
import json
import math
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ["ms_gate", "ms_permute", "ms_dispatch", "ms_experts", "ms_combine", "ms_shared"]
STAGE_COLORS = ["#4c72b0", "#8172b3", "#dd8452", "#55a868", "#c44e52", "#937860"]


def load(path):
    rows, bad = [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                bad += 1
    if bad:
        print("note: %d unreadable line(s) in %s skipped" % (bad, path))
    failed = [r for r in rows if r.get("failed")]
    if failed:
        print("note: %d failed run(s) in the file are left out of the charts" % len(failed))
    return [r for r in rows if not r.get("failed")]


def machine(rows):
    cpus = collections.Counter(r.get("cpu") for r in rows if r.get("cpu"))
    cores = collections.Counter(r.get("cores") for r in rows if r.get("cores"))
    cpu = cpus.most_common(1)[0][0] if cpus else "unknown CPU"
    c = cores.most_common(1)[0][0] if cores else None
    return "%s, %s cores" % (cpu, c) if c else cpu


def stats(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def errbar(points):
    """points: list of (x, (median, lo, hi)) -> x, y, yerr for errorbar()."""
    xs = [p[0] for p in points]
    ys = [p[1][0] for p in points]
    yerr = [[p[1][0] - p[1][1] for p in points], [p[1][2] - p[1][0] for p in points]]
    return xs, ys, yerr


def save(fig, out_dir, name, written):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    print("wrote " + path)


def skip(name, why):
    print("skip %s: %s" % (name, why))


def layout_name(nodes, rpn, rate):
    if nodes == 1:
        return "1 node (shared memory)"
    return "%s nodes x %d rank%s%s" % ("N" if rpn == 1 else nodes, rpn, "s" if rpn > 1 else "",
                                       ", link %s" % rate if rate else "")


# ------------------------------------------------------------------------------------------
def chart_scaling(rows, title_machine, out_dir, written):
    name = "scaling_tokens_per_s.png"
    kinds = [k for k in ("weak", "strong") if any(r.get("sweep") == k for r in rows)]
    if not kinds:
        return skip(name, "no weak or strong scaling lines")
    cores = max((r.get("cores") or 0) for r in rows) or None
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in rows if r.get("sweep") == kind and r.get("bench") == "layer"]
        one = [r for r in rs if r["nodes"] == 1 and r["ranks_per_node"] == 1]
        lines = collections.OrderedDict()
        for r in sorted(rs, key=lambda r: (r["nodes"] > 1, r["ranks_per_node"], r["nodes"])):
            if r["nodes"] == 1:
                key = layout_name(1, 0, None)
            elif r["ranks_per_node"] == 1:
                key = layout_name(2, 1, r.get("rate"))
            else:
                key = "%d nodes x R ranks%s" % (r["nodes"], ", link %s" % r["rate"] if r.get("rate") else "")
            lines.setdefault(key, []).append(r)
        for i, (key, lr) in enumerate(lines.items()):
            if key != layout_name(1, 0, None):
                lr = one + lr  # every layout starts from the same 1-rank point
            by = collections.defaultdict(list)
            for r in lr:
                by[r["ranks"]].append(r.get("tokens_per_s"))
            pts = [(x, stats(v)) for x, v in sorted(by.items()) if stats(v)]
            xs, ys, yerr = errbar(pts)
            ax.errorbar(xs, ys, yerr=yerr, marker="os^D"[i % 4], capsize=3, label=key)
            for x, y in zip(xs, ys):
                ax.annotate("%.0f" % y, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        base = stats([r.get("tokens_per_s") for r in one])
        allx = sorted(set(r["ranks"] for r in rs))
        if base and allx:
            ideal = [base[0] * (min(x, cores) if cores else x) for x in allx]
            ax.plot(allx, ideal, ":", color="grey",
                    label="linear from 1 rank, flat past %s cores" % cores if cores else "linear")
        if cores and allx and max(allx) > cores:
            ax.axvspan(cores + 0.5, max(allx) + 0.5, color="0.92", zorder=0)
            ax.text(cores + 0.6, ax.get_ylim()[1] * 0.97, "more ranks than cores:\ntotal work, not scaling",
                    fontsize=7, va="top")
        tpr = sorted(set(r.get("tokens_per_rank") for r in rs))
        gt = sorted(set(r.get("global_tokens") for r in rs))
        sub = ("%s tokens per rank" % "/".join(map(str, tpr)) if kind == "weak"
               else "%s global tokens" % "/".join(map(str, gt)))
        ax.set_title("%s scaling: %s" % (kind.capitalize(), sub), fontsize=10)
        ax.set_xlabel("ranks (MPI processes)")
        ax.set_ylabel("tokens/s (forward + backward, median)")
        ax.set_xticks(allx)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    shape = shape_of(rows, ("weak", "strong"))
    fig.suptitle("moex-bench layer %s\n%s" % (shape, title_machine), fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, name, written)


def shape_of(rows, sweeps):
    for r in rows:
        if r.get("sweep") in sweeps and r.get("bench") == "layer":
            return "H%s F%s E%s+%s shared top-%s" % (r.get("hidden"), r.get("ffn"), r.get("experts"),
                                                     r.get("shared"), r.get("topk"))
    return ""


def chart_stages(rows, title_machine, out_dir, written):
    name = "stage_breakdown.png"
    kinds = [k for k in ("weak", "strong") if any(r.get("sweep") == k for r in rows)]
    if not kinds:
        return skip(name, "no weak or strong scaling lines")
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in rows if r.get("sweep") == kind and r.get("bench") == "layer"]
        groups = collections.OrderedDict()
        for r in sorted(rs, key=lambda r: (r["nodes"] > 1, r["ranks"], r["nodes"])):
            groups.setdefault((r["nodes"], r["ranks_per_node"]), []).append(r)
        labels, bottoms = [], []
        x = list(range(len(groups)))
        bottom = [0.0] * len(groups)
        meds = {}
        for (key, g) in groups.items():
            meds[key] = {k: stats([r.get(k) for r in g]) for k in STAGES + ["ms_step", "ms_comm"]}
            n, rpn = key
            over = any(r.get("oversubscribed") for r in g)
            labels.append("%d rank%s%s\n%s" % (n * rpn, "s" if n * rpn > 1 else "",
                                               " *" if over else "",
                                               "1 node" if n == 1 else "%d nodes x %d" % (n, rpn)))
        for stage, color in zip(STAGES, STAGE_COLORS):
            h = [(meds[k][stage] or (0,))[0] for k in groups]
            ax.bar(x, h, bottom=bottom, color=color, label=stage[3:], width=0.6)
            bottom = [b + v for b, v in zip(bottom, h)]
        # What the stages do not cover (waits; the all-reduce of replicated gradients).
        steps = [(meds[k]["ms_step"] or (0,))[0] for k in groups]
        other = [max(0.0, s - b) for s, b in zip(steps, bottom)]
        ax.bar(x, other, bottom=bottom, color="0.85", hatch="//", edgecolor="0.6",
               label="rest of the step (not in a stage: replicated-grad all-reduce, waits)", width=0.6)
        ax.scatter(x, steps, marker="_", s=600, color="black", zorder=5, label="ms_step (median)")
        for xi, s in zip(x, steps):
            ax.annotate("%.0f" % s, (xi, s), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("ms per iteration (median; each stage: max over ranks)")
        ax.set_xlabel("ranks and node layout")
        ax.set_title("%s scaling: stage times" % kind.capitalize(), fontsize=10)
        ax.set_ylim(0, max(max(steps), max(bottom)) * 1.1)
        ax.grid(axis="y", alpha=0.3)
    handles, labs = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=8, fontsize=8, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("moex-bench layer %s: stages of forward + backward. Each stage is its own max over "
                 "ranks and, with overlap on,\nexchange stages run beside compute, so the stack can "
                 "exceed the step. * = more ranks than cores (total work, not scaling)\n%s" %
                 (shape_of(rows, ("weak", "strong")), title_machine), fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, name, written)


def chart_exchange(rows, title_machine, out_dir, written):
    name = "exchange_busbw.png"
    rs = [r for r in rows if r.get("bench") == "exchange" and r.get("bytes")]
    if not rs:
        return skip(name, "no moex-bench exchange lines")
    wrong = sum(int(r.get("wrong") or 0) for r in rs)
    dirs = [("busbw_GBps", "dispatch")]
    if any(r.get("ret_busbw_GBps") is not None for r in rs):
        dirs.append(("ret_busbw_GBps", "return (combine)"))
    fig, axes = plt.subplots(1, len(dirs), figsize=(6.4 * len(dirs), 4.6), squeeze=False, sharey=True)
    series = collections.OrderedDict()
    for r in sorted(rs, key=lambda r: (r["nodes"], r["ranks_per_node"], r.get("exchange", ""))):
        key = (r["nodes"], r["ranks_per_node"], r.get("exchange", "?"), r.get("rate"))
        series.setdefault(key, []).append(r)
    layouts = sorted(set(k[:2] for k in series))
    colors = {l: c for l, c in zip(layouts, ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"])}
    for ax, (key_bw, what) in zip(axes[0], dirs):
        for (n, rpn, ex, rate), g in series.items():
            by = collections.defaultdict(list)
            for r in g:
                by[r["bytes"]].append(r.get(key_bw))
            pts = [(x, stats(v)) for x, v in sorted(by.items()) if stats(v)]
            if not pts:
                continue
            xs, ys, yerr = errbar(pts)
            lab = "%d node%s x %d rank%s, %s%s" % (n, "s" if n > 1 else "", rpn, "s" if rpn > 1 else "",
                                                   ex, ", link %s" % rate if rate and n > 1 else "")
            ax.errorbar(xs, ys, yerr=yerr, color=colors[(n, rpn)],
                        linestyle="-" if ex == "flat" else "--", marker="o" if ex == "flat" else "s",
                        markersize=4, capsize=2, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes per rank, log scale)")
        ax.set_ylabel("bus bandwidth (GB/s, median, log scale)")
        ax.set_title("exchange %s" % what, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("moex-bench exchange: bus bandwidth against size%s\n%s" %
                 ("" if not wrong else " (%d WRONG results!)" % wrong, title_machine), fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, name, written)


def chart_load(rows, title_machine, out_dir, written):
    name = "load.png"
    rs = [r for r in rows if r.get("sweep") == "load" and r.get("step") is not None]
    if not rs:
        return skip(name, "no load (moex-train) lines")
    fig, axes = plt.subplots(1, 2, figsize=(12.4, 4.6))
    variants = list(collections.OrderedDict.fromkeys(r.get("variant", r.get("label")) for r in rs))
    for ax, key, what in ((axes[0], "max_mean_load", "max/mean expert load (busiest expert)"),
                          (axes[1], "max_mean_rank_load", "max/mean rank load (busiest rank)")):
        for i, v in enumerate(variants):
            g = sorted((r for r in rs if r.get("variant", r.get("label")) == v), key=lambda r: r["step"])
            ax.plot([r["step"] for r in g], [r.get(key) for r in g], label=v, linewidth=1.4,
                    linestyle=["-", "--", "-.", ":"][i % 4])
            mig = [r["step"] for r in g if r.get("migrated_slots")]
            if mig:
                ax.scatter(mig, [next(r.get(key) for r in g if r["step"] == s) for s in mig], marker="v",
                           s=25, zorder=5, color=ax.lines[-1].get_color())
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("training step")
        ax.set_ylabel("%s (ratio)" % what)
        ax.set_title(what + ("\n(replicas move experts, not picks: their curves lie on the ones "
                             "without)" if key == "max_mean_load" else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="triangles: replica migration", title_fontsize=7)
    r0 = rs[0]
    fig.suptitle("moex-train, built-in model, %d ranks, router skew %s: load against step\n%s" %
                 (r0.get("ranks", 0), r0.get("skew_asked"), title_machine), fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, name, written)


def chart_schedule(rows, title_machine, out_dir, written):
    name = "schedule.png"
    rs = [r for r in rows if r.get("sweep") == "schedule" and r.get("bench") == "layer"]
    if not rs:
        return skip(name, "no schedule lines")
    chunks = list(collections.OrderedDict.fromkeys(
        str(r.get("chunks_asked")) for r in sorted(rs, key=lambda r: (str(r.get("chunks_asked")) == "auto",
                                                                      str(r.get("chunks_asked"))))))
    combos = list(collections.OrderedDict.fromkeys(
        (r.get("exchange_asked"), r.get("overlap_asked")) for r in
        sorted(rs, key=lambda r: (r.get("exchange_asked") != "flat", r.get("overlap_asked") != "on"))))
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    w = 0.8 / max(1, len(combos))
    colors = ["#4c72b0", "#a1c4e8", "#dd8452", "#f5c39c", "#55a868", "#b6dfb8"]
    for j, (ex, ov) in enumerate(combos):
        pts, comm, chosen = [], [], []
        for i, c in enumerate(chunks):
            g = [r for r in rs if str(r.get("chunks_asked")) == c and r.get("exchange_asked") == ex
                 and r.get("overlap_asked") == ov]
            s = stats([r.get("ms_step") for r in g])
            if s:
                pts.append((i + (j - (len(combos) - 1) / 2) * w, s))
                comm.append(stats([r.get("ms_comm") for r in g])[0])
                chosen.append(sorted(set(r.get("chunks") for r in g)) if c == "auto" else None)
        if not pts:
            continue
        xs, ys, yerr = errbar(pts)
        ax.bar(xs, ys, width=w, yerr=yerr, capsize=2, color=colors[j % len(colors)],
               edgecolor="0.3", label="%s exchange, overlap %s" % (ex, ov))
        ax.scatter(xs, comm, marker="D", s=22, facecolor="white", edgecolor="#c44e52", zorder=5,
                   label="ms_comm (median; communication stream busy)" if j == 0 else None)
        for x, y, hi, ch in zip(xs, ys, [p[1][2] for p in pts], chosen):
            ax.annotate("%.0f" % y + ("\n(chose %s)" % ",".join(map(str, ch)) if ch else ""), (x, hi),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=6)
    ax.set_xticks(range(len(chunks)))
    ax.set_xticklabels(["chunks %s" % c for c in chunks])
    ax.set_xlabel("pipeline chunks per layer pass (auto: the cost model's choice)")
    ax.set_ylabel("ms per forward + backward step (median)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    r0 = rs[0]
    fig.suptitle("moex-bench layer H%s F%s E%s+%s shared top-%s, %s tokens/rank, %d nodes x %d ranks, "
                 "link %s: step time by schedule\n%s" %
                 (r0.get("hidden"), r0.get("ffn"), r0.get("experts"), r0.get("shared"), r0.get("topk"),
                  r0.get("tokens_per_rank"), r0["nodes"], r0["ranks_per_node"], r0.get("rate") or "uncapped",
                  title_machine), fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, name, written)


def chart_skew(rows, title_machine, out_dir, written):
    name = "skew.png"
    rs = [r for r in rows if r.get("sweep") == "skew" and r.get("bench") == "layer"]
    if not rs:
        return skip(name, "no skew lines")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for rep, m in (("off", "o"), ("on", "s")):
        g = [r for r in rs if r.get("replicas_asked") == rep]
        if not g:
            continue
        for ax, key in ((axes[0], "max_mean_load"), (axes[1], "ms_step")):
            by = collections.defaultdict(list)
            for r in g:
                by[r.get("skew_asked")].append(r.get(key))
            pts = [(x, stats(v)) for x, v in sorted(by.items()) if stats(v)]
            xs, ys, yerr = errbar(pts)
            ax.errorbar(xs, ys, yerr=yerr, marker=m, capsize=3, label="replicas %s" % rep)
    axes[0].axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axes[0].set_ylabel("max/mean rank load (ratio, median)")
    axes[1].set_ylabel("ms per forward + backward step (median)")
    axes[1].set_ylim(0, axes[1].get_ylim()[1] * 1.15)
    for ax in axes:
        ax.set_xlabel("router skew z (Zipf exponent)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    r0 = rs[0]
    fig.suptitle("moex-bench layer, %d ranks on 1 node, %s tokens/rank: skewed load with and without "
                 "replicas\n%s" % (r0.get("ranks", 0), r0.get("tokens_per_rank"), title_machine), fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, name, written)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl", nargs="?", default="docs/scaling/sweep.jsonl")
    p.add_argument("--out-dir", default="docs/scaling")
    a = p.parse_args()
    rows = load(a.jsonl)
    if not rows:
        print("no result lines in %s" % a.jsonl)
        return 1
    os.makedirs(a.out_dir, exist_ok=True)
    m = machine(rows)
    written = []
    for chart in (chart_scaling, chart_stages, chart_exchange, chart_load, chart_schedule, chart_skew):
        chart(rows, m, a.out_dir, written)
    print("%d chart(s) in %s" % (len(written), a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
