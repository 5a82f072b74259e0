#!/usr/bin/env python3
"""What --metrics-port costs a training step: moex-train on 2 ranks without the endpoint, with it,
and with it scraped at 10 Hz, alternating for a few rounds; prints each run's median step time
(steps 51 on, from --log-json) and the medians over rounds. Run from the repository root after a
build:  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 python3 scripts/metrics_cost.py"""
import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request


def run(args, extra, scrape_hz):
    log = os.path.join(tempfile.mkdtemp(), "steps.jsonl")
    cmd = [args.mpirun, "-np", str(args.ranks), args.train, "--steps", str(args.steps), "--log-every", "1000000",
           "--log-json", log] + extra
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    stop, scrapes, scraper = [False], [0], None

    def scrape(port):
        while not stop[0]:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            except OSError:  # the run has ended and closed its endpoint
                return
            scrapes[0] += 1
            time.sleep(1.0 / scrape_hz)

    for line in p.stdout:
        m = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", line)
        if m and scrape_hz:
            scraper = threading.Thread(target=scrape, args=(int(m.group(1)),), daemon=True)
            scraper.start()
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    stop[0] = True
    if scraper:
        scraper.join()
    ms = [json.loads(line)["ms"] for line in open(log) if '"step"' in line][50:]
    return statistics.median(ms), scrapes[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", default="build/bin/moex-train")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = {"off": ([], 0), "on": (["--metrics-port", "0"], 0), "on, scraped at 10 Hz": (["--metrics-port", "0"], 10)}
    res = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, (extra, hz) in variants.items():
            res[k].append(run(args, extra, hz)[0])
    off = statistics.median(res["off"])
    for k, v in res.items():
        med = statistics.median(v)
        print(f"{k:22s} {' '.join('%.3f' % x for x in v)} ms; median {med:.3f} ms ({100 * (med / off - 1):+.1f} %)")


if __name__ == "__main__":
    main()
