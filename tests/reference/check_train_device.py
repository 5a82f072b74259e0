#!/usr/bin/env python3
"""Checks `moex-train --device cuda` against the same run on the CPU.

For each rank count, runs `mpirun -np N moex-train` twice with the same seed and model (once with
--device cpu, once with --device cuda and the chosen --device-comm / --precision), reads both
--log-json files, and requires every step's loss (and auxiliary balance loss, where --train-args turns
one on) to agree, and the picks a capacity factor drops and the replica slots migrated to be the same:

    |loss_gpu - loss_cpu| / |loss_cpu| <= rtol   (default 1e-5 for fp32, 2e-2 for bf16)

The two runs may be different binaries (--cpu-train, --gpu-train), so that a build of moex-train
against the tests' CUDA emulator can be checked against the real CPU tool. Exits 77 (ctest's skip code)
when the GPU run finds no CUDA device, 1 on any mismatch or failure.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

NO_DEVICE = 77


def run_train(args, binary, ranks, log, extra):
    cmd = [args.mpirun, "-np", str(ranks), binary, "--steps", str(args.steps), "--tokens-per-rank",
           str(args.tokens_per_rank), "--seed", "3", "--log-json", log, "--chunks", str(args.chunks)]
    cmd += shlex.split(args.train_args) + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    return cmd, proc


def losses(path, key):
    with open(path) as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def max_rel(a, b):
    return max((abs(y - x) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=0.0)


def main():
    ap = argparse.ArgumentParser(description="Check moex-train --device cuda against the CPU run.")
    ap.add_argument("--cpu-train", required=True, help="moex-train binary for the CPU run")
    ap.add_argument("--gpu-train", required=True, help="moex-train binary for the --device cuda run")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    ap.add_argument("--device-comm", default="staged", choices=["staged", "nccl"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tokens-per-rank", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--train-args", default="", help="further moex-train options for both runs, e.g. "
                    "'--aux-seq-alpha 0.01 --seq-len 16'")
    ap.add_argument("--rtol", type=float, default=None)
    ap.add_argument("--timeout", type=float, default=600, help="seconds each run may take")
    args = ap.parse_args()
    if args.rtol is None:
        args.rtol = 2e-2 if args.precision == "bf16" else 1e-5
    ranks = [int(r) for r in args.ranks.split(",") if r]
    if not ranks or min(ranks) < 1:
        print(f"error: --ranks = '{args.ranks}': expected positive rank counts such as 1,2", file=sys.stderr)
        return 1
    for binary in (args.cpu_train, args.gpu_train):
        if not os.access(binary, os.X_OK):
            print(f"error: moex-train binary not found or not executable: {binary}", file=sys.stderr)
            return 1

    failed = 0
    with tempfile.TemporaryDirectory(prefix="moex-train-check-") as work:
        for n in ranks:
            cpu_log, gpu_log = os.path.join(work, f"cpu{n}.json"), os.path.join(work, f"gpu{n}.json")
            cmd, proc = run_train(args, args.cpu_train, n, cpu_log, [])
            if proc.returncode != 0:
                print(f"FAIL ranks {n}: CPU run exited {proc.returncode}: {' '.join(cmd)}\n{proc.stderr}")
                return 1
            cmd, proc = run_train(args, args.gpu_train, n, gpu_log, ["--device", "cuda", "--device-comm",
                                                                     args.device_comm, "--precision", args.precision])
            if proc.returncode != 0:
                why = [line for line in proc.stderr.splitlines() if "no CUDA device" in line]
                if why:
                    print(f"SKIPPED: {why[0].strip()}")
                    return NO_DEVICE
                print(f"FAIL ranks {n}: GPU run exited {proc.returncode}: {' '.join(cmd)}\n{proc.stderr}")
                return 1
            a, b = losses(cpu_log, "loss"), losses(gpu_log, "loss")
            aux_a, aux_b = losses(cpu_log, "aux_loss"), losses(gpu_log, "aux_loss")
            drop_a, drop_b = losses(cpu_log, "picks_dropped"), losses(gpu_log, "picks_dropped")
            mig_a, mig_b = losses(cpu_log, "migrated_slots"), losses(gpu_log, "migrated_slots")
            if len(a) != args.steps or len(b) != args.steps:
                print(f"FAIL ranks {n}: expected {args.steps} logged steps, got {len(a)} (cpu) and {len(b)} (gpu)")
                failed += 1
                continue
            err = max_rel(a, b)
            aux_err = max_rel(aux_a, aux_b) if any(aux_a) else 0.0
            ok = err <= args.rtol and aux_err <= args.rtol and drop_a == drop_b and mig_a == mig_b
            failed += not ok
            print(f"ranks {n} {args.device_comm} {args.precision}: loss {a[0]:.6f} -> {a[-1]:.6f} (cpu), "
                  f"-> {b[-1]:.6f} (gpu); max relative step difference {err:.3e}"
                  + (f", auxiliary loss {aux_err:.3e}" if any(aux_a) else "")
                  + (f"; picks dropped {sum(drop_a)} (cpu), {sum(drop_b)} (gpu)" if any(drop_a) or any(drop_b) else "")
                  + (f"; slots migrated {sum(mig_a)} (cpu), {sum(mig_b)} (gpu)" if any(mig_a) or any(mig_b) else "")
                  + f" (rtol {args.rtol:g})  "
                  f"{'PASS' if ok else 'FAIL'}")
    print(f"{len(ranks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
