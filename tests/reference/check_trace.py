#!/usr/bin/env python3
"""--trace: the timeline moex-train and moex-bench write (Chrome trace / Perfetto JSON).

  1. moex-train at --ranks ranks: one process per rank (process_name "rank r"), named tracks (the
     compute thread and every layer's communication stream), complete spans with non-negative
     durations for every stage (gate, permute, dispatch, experts, combine, shared experts, return)
     and the trainer's phases (forward, backward, optimizer, all-reduce, checkpoint save).
  2. The overlap is visible: on every rank some dispatch span (stream track) runs while the shared
     experts (compute track) do, and stream spans lie on other tracks than the compute spans.
  3. moex-bench layer --trace writes one too.
  4. With --gpu-bench (a moex-bench built with CUDA, e.g. the emulator's): moex-bench layer --device
     cuda --trace puts every stage of every forward and backward on a "cuda stream" track and the
     shared experts on a "cuda shared-expert stream" track, per rank, each pass's stages in order.
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


def check_gpu(args, P):
    path = os.path.join(args.workdir, "bench_cuda.json")
    iters = 3
    out = run([args.mpirun, "-np", str(P), args.gpu_bench, "layer", "--device", "cuda", "--hidden", "64", "--ffn",
               "32", "--experts", "8", "--topk", "2", "--shared", "1", "--tokens-per-rank", "64", "--iters",
               str(iters), "--warmup", "1", "--chunks", "2", "--trace", path])
    if "SKIPPED" in out:
        print("moex-bench layer --device cuda: no device, CUDA stream tracks not checked")
        return
    ev = load(path)
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e.get("ph") == "M" and e["name"] == "thread_name"}
    spans = [e for e in ev if e.get("ph") == "X"]
    order = ["gate", "permute", "experts", "combine"]
    for r in range(P):
        for track, names in (("cuda stream", order), ("cuda shared-expert stream", ["shared experts"])):
            tids = [t for (pid, t), n in threads.items() if pid == r and n == track]
            if len(tids) != 1:
                fail(f"rank {r}: {len(tids)} tracks named {track!r}, expected 1")
            mine = [e for e in spans if e["pid"] == r and e["tid"] == tids[0]]
            for pas in ("forward", "backward"):
                got = sorted((e for e in mine if e.get("args", {}).get("layer") == pas), key=lambda e: e["ts"])
                want = names if pas == "forward" else (["permute", "experts", "combine", "gate"]
                                                       if names == order else names)
                # every pass (warmup and the benchmark's profiled passes included) adds one span of
                # each stage, in order
                if len(got) < len(want) * (iters + 1) or len(got) % len(want):
                    fail(f"rank {r} {track} {pas}: {len(got)} spans, expected whole passes of {want}, at least "
                         f"{iters + 1}")
                for i in range(0, len(got), len(want)):
                    seq = [e["name"] for e in got[i:i + len(want)]]
                    if seq != want:
                        fail(f"rank {r} {track} {pas}: stages {seq}, expected {want}")
                    for a, b in zip(got[i:i + len(want)], got[i + 1:i + len(want)]):
                        if b["ts"] + 1.0 < a["ts"] + a["dur"]:  # 1 us of rounding
                            fail(f"rank {r} {track} {pas}: {b['name']} starts before {a['name']} ends")
                if any(e["dur"] < 0 for e in got):
                    fail(f"rank {r} {track} {pas}: a negative duration")
        print(f"ok rank {r}: the CUDA stream tracks hold every stage of every forward and backward, in order")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--gpu-bench", help="a moex-bench with CUDA: also check the CUDA stream tracks")
    ap.add_argument("--only-gpu", action="store_true", help="only check 4 (with --gpu-bench)")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    P = args.ranks
    if args.gpu_bench:
        check_gpu(args, P)
        if args.only_gpu:
            return
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
