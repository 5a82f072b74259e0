#!/usr/bin/env python3
"""Checkpoints of moex-train: exact resume, resharding, atomic folders, validation.

  1. Exact resume: an uninterrupted run of S steps against a run stopped at S/2 (saving every
     S/4 steps, keeping 1) and resumed to S. The resumed steps' losses must be bitwise those of the
     uninterrupted run, and its final checkpoint's files byte for byte the same. Done for the plain
     run and for one with load balancing (bias updates, auxiliary losses, replicas migrating).
  2. Resharding: the S/2 checkpoint saved at N ranks resumed at other rank counts with the same
     global batch: with --steps S/2 (nothing trained) the re-saved weights and AdamW moments are
     bitwise those loaded; trained on to S, the losses agree with the N-rank continuation within
     --reshard-rtol (fp32 sums in another order).
  3. --init-from: a checkpoint's model shards (a Hugging Face folder) loaded at another rank count,
     bitwise.
  4. Validation: a damaged shard (one byte flipped) and another model (--layers) are refused on
     every rank with an error naming the file or field; a --steps below the checkpoint's step too.
  5. Lost ranks (--kill-trials): a rank killed mid-run (SIGKILL, SIGSEGV, SIGABRT) ends the whole
     job non-zero with no process left; SIGTERM to one rank makes every rank stop after the step,
     save and exit 0. Each run then resumes from its latest checkpoint and must reach the
     uninterrupted run's final loss bit for bit.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import read_safetensors  # noqa: E402


def run(args, ranks, extra, expect_ok=True):
    cmd = [args.mpirun, "-np", str(ranks), args.train, "--log-every", "1000"] + \
        ([] if "--timeout" in extra else ["--timeout", "60"]) + extra
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=args.timeout)
    if expect_ok and p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}")
    if not expect_ok and p.returncode == 0:
        sys.exit(f"FAIL: {' '.join(cmd)} should have failed:\n{p.stdout[-3000:]}")
    return p.stdout


def losses(path):
    return {r["step"]: r["loss"] for r in (json.loads(line) for line in open(path) if line.strip())}


def tensors(folder, stem):
    """Every tensor of a checkpoint's shards of `stem` (model or trainer), by name."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith(stem + "-") and f.endswith(".safetensors"):
            for k, v in read_safetensors(os.path.join(folder, f)).items():
                if k in out:
                    sys.exit(f"FAIL: {k} is in two shards of {folder}")
                out[k] = v
    return out


def same_tensors(a, b, what):
    for stem in ("model", "trainer"):
        ta, tb = tensors(a, stem), tensors(b, stem)
        if sorted(ta) != sorted(tb):
            sys.exit(f"FAIL: {what}: {stem} shards of {a} and {b} hold different tensors: "
                     f"{sorted(set(ta) ^ set(tb))[:5]}")
        for k in ta:
            if ta[k].shape != tb[k].shape or ta[k].tobytes() != tb[k].tobytes():
                n = int(np.sum(ta[k].view(np.uint32) != tb[k].view(np.uint32))) if ta[k].shape == tb[k].shape else -1
                sys.exit(f"FAIL: {what}: tensor {k} differs between {a} and {b} ({n} values)")


def rank_pids(marker, rank_var="OMPI_COMM_WORLD_RANK"):
    """moex-train rank processes whose command line holds `marker`, by the rank their environment
    variable `rank_var` gives (mpirun's OMPI_COMM_WORLD_RANK; srun's SLURM_PROCID)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if not cmd or not cmd[0].endswith(b"moex-train") or marker.encode() not in cmd:
            continue
        for kv in env:
            if kv.startswith(rank_var.encode() + b"="):
                out[int(kv.split(b"=")[1])] = int(pid)
    return out


def kill_trials(args, w, steps, N, extra, tpr, final_loss):
    import random
    rng = random.Random(args.seed)
    trials = [s.strip() for s in args.kill_trials.split(",") if s.strip()] * args.kill_rounds
    for i, name in enumerate(trials):
        sig = getattr(signal, name)
        d = w(f"kill{i}")
        cmd = [args.mpirun, "-np", str(N), args.train, "--log-every", "1000", "--timeout", "60"] + extra + tpr(N) + [
            "--steps", str(steps), "--save", d, "--save-every", "2"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.monotonic()
        while not os.path.exists(os.path.join(d, "latest")) and p.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, args.kill_delay))  # a random step
        victim = rank_pids(d).get(N - 1)
        if victim is None:
            p.kill()
            sys.exit(f"FAIL: kill trial {name}: no rank {N - 1} to signal (the run ended first?)\n{p.communicate()[0]}")
        os.kill(victim, sig)
        t_signal = time.monotonic()
        try:
            out = p.communicate(timeout=args.timeout)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            sys.exit(f"FAIL: kill trial {name}: the job did not end within {args.timeout} s of the signal")
        ended = time.monotonic() - t_signal
        time.sleep(0.5)
        left = rank_pids(d)
        if left:
            for pid in left.values():
                os.kill(pid, signal.SIGKILL)
            sys.exit(f"FAIL: kill trial {name}: processes left behind: {left}")
        if sig == signal.SIGTERM:
            if p.returncode != 0 or "stopping after step" not in out:
                sys.exit(f"FAIL: SIGTERM trial: exit {p.returncode}, expected a clean stop and save:\n{out[-2000:]}")
        elif p.returncode == 0:
            sys.exit(f"FAIL: kill trial {name}: mpirun exited 0 after a rank died:\n{out[-2000:]}")
        at = open(os.path.join(d, "latest")).read().strip()
        run(args, N, extra + tpr(N) + ["--steps", str(steps), "--resume", d, "--log-json", d + ".jsonl"])
        got = losses(d + ".jsonl")
        if got.get(steps) != final_loss:
            sys.exit(f"FAIL: kill trial {name}: resumed from {at}, final loss {got.get(steps)!r} != the "
                     f"uninterrupted {final_loss!r}")
        print(f"ok kill trial {i + 1} {name}: job ended (exit {p.returncode}) {ended:.1f} s after the signal, none left; "
              f"resumed from {at} to the uninterrupted final loss")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="moex-train binary")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--ranks", type=int, default=2, help="rank count of the saving runs")
    ap.add_argument("--reshard", default="1,4", help="rank counts to resume the checkpoint at")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128, help="global tokens per step")
    ap.add_argument("--reshard-rtol", type=float, default=1e-4)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--kill-trials", default="SIGKILL,SIGSEGV,SIGABRT,SIGTERM",
                    help="signals to send a rank mid-run, one trial each (empty: none)")
    ap.add_argument("--kill-rounds", type=int, default=1, help="trials per signal")
    ap.add_argument("--kill-steps", type=int, default=0, help="steps of the killed runs (default 4 x --steps)")
    ap.add_argument("--kill-delay", type=float, default=0.0,
                    help="seconds, at most, of random wait after the first checkpoint before the signal")
    ap.add_argument("--seed", type=int, default=1, help="of the random waits")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    w = lambda *p: os.path.join(args.workdir, *p)  # noqa: E731
    S, half, N = args.steps, args.steps // 2, args.ranks
    tpr = lambda n: ["--tokens-per-rank", str(args.tokens // n)]  # noqa: E731
    cases = {"plain": ["--chunks", "2"],
             "balanced": ["--chunks", "1", "--bias-update-speed", "0.001", "--aux-seq-alpha", "0.0001",
                          "--replicas", "on", "--rebalance-interval", "2", "--rebalance-lag", "1", "--skew", "1.0"]}
    for name, extra in cases.items():
        os.makedirs(w(name))
        run(args, N, extra + tpr(N) + ["--steps", str(S), "--save", w(name, "full"), "--log-json", w(name, "full.jsonl")])
        out = run(args, N, extra + tpr(N) + ["--steps", str(half), "--save", w(name, "part"), "--save-every",
                                             str(max(half // 2, 1)), "--keep", "1"])
        kept = sorted(d for d in os.listdir(w(name, "part")) if not d.startswith("."))
        want = sorted(["latest", f"step-{half:08d}"])
        if kept != want:
            sys.exit(f"FAIL: {name}: --keep 1 left {kept} in {w(name, 'part')}, expected {want}\n{out}")
        if open(w(name, "part", "latest")).read().strip() != f"step-{half:08d}":
            sys.exit(f"FAIL: {name}: latest does not name step-{half:08d}")
        out = run(args, N, extra + tpr(N) + ["--steps", str(S), "--resume", w(name, "part"), "--save", w(name, "resumed"),
                                             "--log-json", w(name, "resumed.jsonl")])
        full, resumed = losses(w(name, "full.jsonl")), losses(w(name, "resumed.jsonl"))
        if sorted(resumed) != list(range(half + 1, S + 1)):
            sys.exit(f"FAIL: {name}: the resumed run logged steps {sorted(resumed)}, expected {half + 1}..{S}\n{out}")
        for s in resumed:
            if resumed[s] != full[s]:
                sys.exit(f"FAIL: {name}: step {s}: resumed loss {resumed[s]!r} != uninterrupted {full[s]!r}")
        same_tensors(w(name, "full", f"step-{S:08d}"), w(name, "resumed", f"step-{S:08d}"), f"{name} exact resume")
        print(f"ok {name}: resumed at step {half} of {S} on {N} ranks: losses and final checkpoint bitwise equal")

    # Resharding (plain run): the step-half checkpoint at other rank counts.
    part = w("plain", "part", f"step-{half:08d}")
    full = losses(w("plain", "full.jsonl"))
    for n in [int(x) for x in args.reshard.split(",") if x]:
        run(args, n, cases["plain"] + tpr(n) + ["--steps", str(half), "--resume", part, "--save", w(f"re{n}")])
        same_tensors(part, w(f"re{n}", f"step-{half:08d}"), f"reshard {N} -> {n} ranks")
        run(args, n, cases["plain"] + tpr(n) + ["--steps", str(S), "--resume", part, "--log-json", w(f"re{n}.jsonl")])
        got = losses(w(f"re{n}.jsonl"))
        worst = max(abs(got[s] - full[s]) / abs(full[s]) for s in got)
        if sorted(got) != list(range(half + 1, S + 1)) or worst > args.reshard_rtol:
            sys.exit(f"FAIL: reshard {N} -> {n}: steps {sorted(got)}, worst relative loss difference {worst:.3g} "
                     f"(tolerance {args.reshard_rtol})")
        print(f"ok reshard {N} -> {n} ranks: state bitwise equal; losses within {worst:.2e} of the {N}-rank run")

    # --init-from: a checkpoint's model shards as a Hugging Face checkpoint, at another rank count;
    # with --steps 0 the saved student is the loaded one, bit for bit (its optimiser fresh).
    run(args, 1, cases["plain"] + tpr(1) + ["--steps", "0", "--init-from", part, "--save", w("init")])
    a, b = tensors(part, "model"), tensors(w("init", "step-00000000"), "model")
    if sorted(a) != sorted(b) or any(a[k].tobytes() != b[k].tobytes() for k in a):
        sys.exit("FAIL: --init-from: the student saved after loading differs from the checkpoint's model")
    print("ok --init-from: a 2-rank checkpoint's model loaded at 1 rank, bitwise")

    # Validation.
    bad = w("damaged")
    shutil.copytree(part, bad)
    shard = os.path.join(bad, f"model-{N + 1:05d}-of-{N + 1:05d}.safetensors")  # the last rank's experts
    data = bytearray(open(shard, "rb").read())
    data[-5] ^= 0x40
    open(shard, "wb").write(bytes(data))
    out = run(args, N, cases["plain"] + tpr(N) + ["--steps", str(S), "--resume", bad], expect_ok=False)
    if "checksum" not in out or os.path.basename(shard) not in out:
        sys.exit(f"FAIL: a damaged shard was not refused by name and checksum:\n{out[-2000:]}")
    out = run(args, N, cases["plain"] + tpr(N) + ["--steps", str(S), "--layers", "3", "--resume", part],
              expect_ok=False)
    if "num_hidden_layers" not in out:
        sys.exit(f"FAIL: another model (--layers 3) was not refused naming num_hidden_layers:\n{out[-2000:]}")
    out = run(args, N, cases["plain"] + tpr(N) + ["--steps", str(half - 1), "--resume", part], expect_ok=False)
    if "past --steps" not in out:
        sys.exit(f"FAIL: --steps below the checkpoint's step was not refused:\n{out[-2000:]}")
    for flags, want in ((["--lr", "-1"], "--lr = -1"), (["--lr", "1e300"], "learning rate in (0, 10]"),
                        (["--weight-decay", "-1"], "--weight-decay = -1"),
                        (["--timeout", "1e12"], "seconds in (0, 1e7]"),
                        (["--config", args.workdir], "is a folder")):
        out = run(args, 1, ["--steps", "1"] + flags, expect_ok=False)
        if want not in out:
            sys.exit(f"FAIL: moex-train {' '.join(flags)}: no error saying '{want}':\n{out[-1500:]}")
    print("ok validation: damaged shard, other model, --steps below the checkpoint, bad --lr, --weight-decay, "
          "--timeout and --config refused")

    if args.kill_trials:
        steps = args.kill_steps or 4 * S
        run(args, N, cases["plain"] + tpr(N) + ["--steps", str(steps), "--log-json", w("long.jsonl")])
        kill_trials(args, w, steps, N, cases["plain"], tpr, losses(w("long.jsonl"))[steps])


if __name__ == "__main__":
    main()
