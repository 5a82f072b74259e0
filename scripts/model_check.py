#!/usr/bin/env python3
"""Checks `moex-bench model` against namespace-node runs it was not calibrated on.

1. Calibrates the links with `moex-bench exchange` (flat): one node x 2 ranks (shared memory) and
   2 namespace nodes x 1 rank at --calib-rate; a least-squares fit time = latency + bytes / rate
   over the larger sizes gives each link's rate and latency, and the network's efficiency (fitted
   rate over the tc cap).
2. For every point of the grid (layouts, link caps other than the calibration's, flat and
   hierarchical, chunkings, with and without a shared expert) runs `moex-bench layer` under
   scripts/cluster.sh and `moex-bench model` with the same shape, the calibrated links scaled to the
   point's cap, and --compute-share = ranks / cores (every namespace node shares this machine's
   cores); the model measures its compute rates itself, as --chunks auto does.
3. Prints measured and predicted steps and the error, and writes JSON lines (--out).

Run as root (namespaces):  /usr/bin/python3 scripts/model_check.py --out docs/scaling/model_check.jsonl
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "build", "bin", "moex-bench")
CLUSTER = os.path.join(REPO, "scripts", "cluster.sh")

# (nodes, ranks per node, tc rate, exchange, chunks, shared experts, tokens per rank, more flags)
GRID = [
    (2, 1, "1gbit", "flat", 1, 0, 512, []),
    (2, 1, "200mbit", "flat", 1, 0, 512, []),
    (2, 1, "200mbit", "flat", 2, 0, 512, []),
    (2, 1, "200mbit", "flat", 4, 0, 512, []),
    (2, 1, "200mbit", "flat", 1, 1, 512, []),
    (2, 1, "50mbit", "flat", 1, 0, 256, []),
    (2, 1, "50mbit", "flat", 2, 0, 256, []),
    (3, 1, "200mbit", "flat", 1, 0, 512, []),
    (4, 1, "1gbit", "flat", 1, 0, 512, []),
    (4, 1, "200mbit", "flat", 2, 0, 256, []),
    (4, 1, "200mbit", "flat", 1, 0, 256, ["--groups", "4", "--topk-group", "2"]),  # node-limited
    (2, 2, "200mbit", "flat", 1, 0, 256, []),
    (2, 2, "200mbit", "flat", 2, 0, 256, []),
    (2, 2, "200mbit", "hierarchical", 1, 0, 256, []),
    (2, 2, "200mbit", "hierarchical", 2, 0, 256, []),
    (2, 2, "200mbit", "hierarchical", 1, 0, 256, ["--groups", "2", "--topk-group", "1"]),  # node-limited
]
SHAPE = ["--hidden", "512", "--ffn", "352", "--experts", "16", "--topk", "4"]


def rate_gbps(rate):
    """A tc rate such as 200mbit in GB/s."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f / 8 / 1e9
    raise ValueError("rate %r: expected NNNgbit, NNNmbit or NNNkbit" % rate)


def run(argv, env, timeout=900):
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        sys.exit("model_check: %s failed (%d):\n%s%s" % (" ".join(argv), p.returncode, p.stdout[-3000:],
                                                      p.stderr[-3000:]))
    return [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]


def launcher(nodes, rpn, rate):
    if nodes == 1:
        return ["mpirun", "-np", str(rpn), "--oversubscribe"]
    return [CLUSTER, "--nodes", str(nodes), "--ranks-per-node", str(rpn), "--rate", rate, "--"]


def fit_link(rows, min_bytes):
    """Least squares time_us = lat + bytes / rate over rows with remote bytes >= min_bytes."""
    pts = [(r["remote_bytes"], r["time_us"]) for r in rows if r["remote_bytes"] >= min_bytes]
    pts += [(r["remote_bytes"], r["ret_time_us"]) for r in rows if r["remote_bytes"] >= min_bytes]
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx  # us per byte
    lat = max(0.0, my - slope * mx)
    return 1.0 / slope / 1e3, lat  # GB/s, us


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON lines of every point")
    p.add_argument("--calib-rate", default="500mbit", help="tc cap of the link calibration (not in the grid)")
    p.add_argument("--iters", default="5")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="the first 3 points only")
    a = p.parse_args()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", MOEX_TIMEOUT_S=os.environ.get("MOEX_TIMEOUT_S", "600"))
    ex = [BENCH, "exchange", "--exchange", "flat", "--hidden", "512", "--min-tokens", "64", "--max-tokens", "2048",
          "--iters", "10", "--json"]
    intra = run(launcher(1, 2, None) + ex, env)
    inter = run(launcher(2, 1, a.calib_rate) + ex, env)
    intra_gbps, intra_lat = fit_link(intra, 1e5)
    inter_gbps, inter_lat = fit_link(inter, 4e5)
    eff = inter_gbps / rate_gbps(a.calib_rate)
    print("links: intra %.3f GB/s + %.0f us; inter at %s %.4f GB/s + %.0f us (%.2f of the cap)" %
          (intra_gbps, intra_lat, a.calib_rate, inter_gbps, inter_lat, eff), flush=True)
    out = []
    errors = []
    grid = GRID[:3] if a.quick else GRID
    print("%-6s %-8s %-13s %6s %6s %6s %-8s | %10s %10s %7s" % ("layout", "rate", "exchange", "chunks", "shared",
                                                                 "tokens", "groups", "measured", "predicted",
                                                                 "error"))
    for nodes, rpn, rate, exchange, chunks, shared, tokens, more in grid:
        P = nodes * rpn
        shape = SHAPE + ["--shared", str(shared), "--tokens-per-rank", str(tokens)] + more
        groups = "%s/%s" % (more[3], more[1]) if more else "-"
        m = run(launcher(nodes, rpn, rate) + [BENCH, "layer"] + shape +
                ["--chunks", str(chunks), "--exchange", exchange, "--iters", a.iters, "--warmup", "2",
                 "--reference", "off", "--json"], env)[-1]
        share = max(1.0, P / a.cores)
        # Each node's capped link is shared by its ranks.
        net = rate_gbps(rate) * eff / rpn
        preds = run([BENCH, "model"] + shape +
                    ["--nodes", str(nodes), "--ranks-per-node", str(rpn), "--intra-gbps", "%.4f" % intra_gbps,
                     "--inter-gbps", "%.5f" % net, "--intra-latency-us", "%.1f" % intra_lat,
                     "--inter-latency-us", "%.1f" % inter_lat, "--compute-share", "%.2f" % share, "--show", "0",
                     "--json"], env)
        pick = [q for q in preds if q["exchange"] == exchange and q["chunks"] == chunks and not q["local_first"]
                and q["replicas"] == "off" and q["overlap"] == "on"]
        if not pick:
            sys.exit("model_check: no prediction for %s chunks %d" % (exchange, chunks))
        pred = pick[0]["ms_step"]
        err = (pred - m["ms_step"]) / m["ms_step"]
        errors.append(abs(err))
        print("%-6s %-8s %-13s %6d %6d %6d %-8s | %10.1f %10.1f %+6.1f%%" %
              ("%dx%d" % (nodes, rpn), rate, exchange, chunks, shared, tokens, groups, m["ms_step"], pred, 100 * err),
              flush=True)
        out.append({"nodes": nodes, "ranks_per_node": rpn, "rate": rate, "exchange": exchange, "chunks": chunks,
                    "shared": shared, "tokens_per_rank": tokens, "routing": groups, "measured_ms": m["ms_step"],
                    "measured_comm_ms": m["ms_comm"], "measured_compute_ms": m["ms_compute"], "predicted_ms": pred,
                    "predicted_exchange_ms": pick[0]["ms_exchange"], "predicted_compute_ms": pick[0]["ms_compute"],
                    "error": err, "compute_share": share, "inter_gbps": net, "intra_gbps": intra_gbps,
                    "inter_latency_us": inter_lat, "intra_latency_us": intra_lat, "link_efficiency": eff})
    print("error: median %.1f %%, max %.1f %%, %d of %d within 20 %%" %
          (100 * statistics.median(errors), 100 * max(errors), sum(e <= 0.2 for e in errors), len(errors)))
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            for r in out:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
