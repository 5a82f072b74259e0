#!/usr/bin/env python3
"""--trace: the timeline moex-train and moex-bench write (Chrome trace / Perfetto JSON).

  1. moex-train at --ranks ranks: one process per rank (process_name "rank r"), named tracks (the
     compute thread and every layer's communication stream), complete spans with non-negative
     durations for every stage (gate, permute, dispatch, experts, combine, shared experts, return)
     and the trainer's phases (forward, backward, optimizer, all-reduce, checkpoint save).
  2. The overlap is visible: on every rank some dispatch span (stream track) runs while the shared
     experts (compute track) do, and stream spans lie on other tracks than the compute spans.
  3. moex-bench layer --trace writes one too.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if p.returncode != 0:
        fail(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}")
    return p.stdout


def load(path):
    doc = json.load(open(path))
    ev = doc.get("traceEvents")
    if not isinstance(ev, list) or not ev:
        fail(f"{path}: no traceEvents")
    return ev


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    P = args.ranks
    path = os.path.join(args.workdir, "train.json")
    out = run([args.mpirun, "-np", str(P), args.train, "--steps", "6", "--chunks", "1", "--log-every", "1000",
               "--trace", path, "--save", os.path.join(args.workdir, "ckpt"), "--timeout", "60"])
    if "trace of" not in out:
        fail(f"moex-train did not say it wrote the trace:\n{out[-1500:]}")
    ev = load(path)
    procs = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e["name"] == "process_name"}
    if procs != {r: f"rank {r}" for r in range(P)}:
        fail(f"process names {procs}, expected one per rank")
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e.get("ph") == "M" and e["name"] == "thread_name"}
    spans = [e for e in ev if e.get("ph") == "X"]
    for e in spans:
        if e["dur"] < 0 or e["ts"] < -1e3:
            fail(f"span with negative duration or time: {e}")
        if (e["pid"], e["tid"]) not in threads:
            fail(f"span on an unnamed track: {e}")
    want = {"gate", "permute", "dispatch", "experts", "combine", "shared experts", "return", "forward", "backward",
            "teacher forward", "optimizer", "all-reduce (loss, loads)", "all-reduce (replicated grads)",
            "checkpoint save"}
    for r in range(P):
        names = {e["name"] for e in spans if e["pid"] == r}
        if not want <= names:
            fail(f"rank {r}: spans {sorted(names)} lack {sorted(want - names)}")
        main = [t for (pid, t), n in threads.items() if pid == r and n == "main (compute)"]
        streams = [t for (pid, t), n in threads.items() if pid == r and n.startswith("stream: ")]
        if len(main) != 1 or not streams:
            fail(f"rank {r}: tracks {[(t, n) for (pid, t), n in threads.items() if pid == r]}: expected the compute "
                 f"thread and the communication streams")
        disp = [e for e in spans if e["pid"] == r and e["name"] == "dispatch"]
        shared = [e for e in spans if e["pid"] == r and e["name"] == "shared experts"]
        if any(e["tid"] not in streams for e in disp) or any(e["tid"] != main[0] for e in shared):
            fail(f"rank {r}: dispatch spans belong on the streams' tracks and shared experts on the compute track")
        both = sum(1 for d in disp for s in shared
                   if min(d["ts"] + d["dur"], s["ts"] + s["dur"]) > max(d["ts"], s["ts"]))
        if both == 0:
            fail(f"rank {r}: no dispatch overlaps the shared experts in time ({len(disp)} dispatches, "
                 f"{len(shared)} shared spans)")
        print(f"ok rank {r}: {sum(1 for e in spans if e['pid'] == r)} spans on {1 + len(streams)} tracks; "
              f"{both} (dispatch, shared experts) pairs overlap in time")

    bpath = os.path.join(args.workdir, "bench.json")
    run([args.mpirun, "-np", str(P), args.bench, "layer", "--hidden", "64", "--ffn", "32", "--experts", "8",
         "--topk", "2", "--tokens-per-rank", "64", "--iters", "2", "--reference", "off", "--trace", bpath])
    bnames = {e["name"] for e in load(bpath) if e.get("ph") == "X"}
    if not {"gate", "dispatch", "experts", "combine"} <= bnames:
        fail(f"moex-bench layer --trace: spans {sorted(bnames)}")
    print(f"ok moex-bench layer --trace: {len(bnames)} span kinds")
    print("all trace checks passed")


if __name__ == "__main__":
    main()
