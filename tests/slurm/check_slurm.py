#!/usr/bin/env python3
"""moex-train under a real Slurm: a one-machine cluster (slurmctld + slurmd) started by this script.

  1. srun --mpi=pmix -n 4: ranks and sizes come from Slurm's PMIx; the losses must be bitwise those
     of `mpirun -np 4` with the same arguments.
  2. sbatch with mpirun inside the allocation (Open MPI launching through Slurm): bitwise the losses
     of `mpirun -np 2` outside Slurm.
  3. Preemption: `scancel --signal=TERM` on a running srun job with --save stops every rank after
     its step with a checkpoint and exit 0; `srun -n 2 --resume` continues to the uninterrupted
     run's final loss bit for bit, and `srun -n 4 --resume` (resharding) trains on.
  4. A lost rank: SIGKILL to one task of an srun job ends the whole job non-zero within the
     deadline plus a few seconds, with no moex-train process left behind.

Exit 0 when all pass, 1 on a failure, 77 (with a line starting "SKIPPED:") when a Slurm cluster
cannot be started here (no slurm-wlm, not root, daemons that do not come up).
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from check_checkpoint import losses, rank_pids  # noqa: E402

SKIP = 77


def skip(why):
    print(f"SKIPPED: {why}")
    sys.exit(SKIP)


def fail(why):
    print(f"FAIL: {why}")
    sys.exit(1)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """slurmctld and slurmd in the foreground of this script, with their own config, state and ports."""

    def __init__(self, root, cpus):
        self.root = root
        self.host = socket.gethostname()
        ctld_port, d_port = free_ports(2)
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        self.conf = os.path.join(root, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=moextest
SlurmctldHost={self.host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={self.host} CPUs={cpus} State=UNKNOWN
PartitionName=moex Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
""")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs = []

    def start(self, deadline_s=30):
        for daemon in ("slurmctld", "slurmd"):
            log = open(os.path.join(self.root, "log", daemon + ".out"), "w")
            self.procs.append(subprocess.Popen([daemon, "-D", "-f", self.conf], stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env))
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            if any(p.poll() is not None for p in self.procs):
                break
            p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env, timeout=10)
            if p.returncode == 0 and p.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        self.stop()
        logs = ""
        for name in ("slurmctld.out", "slurmd.out"):
            try:
                logs += f"--- {name}\n" + open(os.path.join(self.root, "log", name)).read()[-1500:]
            except OSError:
                pass
        skip(f"the Slurm daemons did not bring node {self.host} to idle within {deadline_s} s:\n{logs}")

    def stop(self):
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=10)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def jobs(self):
        p = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env, timeout=10)
        return [j for j in p.stdout.split() if j]


def check(cmd, p, expect_ok=True):
    if expect_ok and p.returncode != 0:
        fail(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}")
    return p.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="the moex-train binary")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=240, help="seconds any one job may take")
    args = ap.parse_args()

    for tool in ("slurmctld", "slurmd", "srun", "sbatch", "scancel", "sinfo", "squeue"):
        if shutil.which(tool) is None:
            skip(f"{tool} is not installed (Debian: apt-get install slurm-wlm)")
    if os.geteuid() != 0:
        skip("slurmd must run as root to launch tasks; this test starts its own one-machine cluster")

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    root = tempfile.mkdtemp(prefix="moex-slurm-")
    cluster = Cluster(root, os.cpu_count() or 2)
    cluster.start()
    env = dict(cluster.env, OPENBLAS_NUM_THREADS="1")
    w = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    # A fixed schedule: --chunks auto times the machine, and two runs could choose differently.
    common = ["--log-every", "1000", "--timeout", "30", "--chunks", "1"]
    S = args.steps

    def launch(cmd, **kw):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           timeout=args.timeout, **kw)
        return check(cmd, p)

    srun = ["srun", "--mpi=pmix", "--overcommit", "--kill-on-bad-exit=1", f"--time={int(args.timeout // 60) + 1}"]
    try:
        # 1. srun -n 4 against mpirun -np 4.
        out = launch(srun + ["-n", "4", args.train] + common + ["--steps", str(S), "--log-json", w("srun4.jsonl")])
        if "moex-train: 4 ranks" not in out:
            fail(f"srun -n 4: moex-train did not report 4 ranks:\n{out[-2000:]}")
        launch([args.mpirun, "-np", "4", args.train] + common + ["--steps", str(S), "--log-json", w("mpirun4.jsonl")])
        a, b = losses(w("srun4.jsonl")), losses(w("mpirun4.jsonl"))
        if a != b or len(a) != S:
            fail(f"srun -n 4 and mpirun -np 4 losses differ: {a} vs {b}")
        print(f"ok srun --mpi=pmix -n 4: {S} steps, losses bitwise those of mpirun -np 4 (final {a[S]:.6e})")

        # 2. sbatch, mpirun inside the allocation.
        script = w("job.sh")
        with open(script, "w") as f:
            f.write(f"""#!/bin/bash
#SBATCH -n 2
#SBATCH --overcommit
#SBATCH --output={w('sbatch.out')}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
exec {args.mpirun} -np 2 {args.train} {' '.join(common)} --steps {S} --log-json {w('sbatch2.jsonl')}
""")
        launch(["sbatch", "--wait", script])
        launch([args.mpirun, "-np", "2", args.train] + common + ["--steps", str(S), "--log-json", w("mpirun2.jsonl")])
        a, b = losses(w("sbatch2.jsonl")), losses(w("mpirun2.jsonl"))
        if a != b or len(a) != S:
            fail(f"sbatch + mpirun -np 2 and mpirun -np 2 losses differ: {a} vs {b}\n"
                 f"{open(w('sbatch.out')).read()[-2000:]}")
        print(f"ok sbatch with mpirun -np 2 inside: losses bitwise those of mpirun -np 2 outside Slurm")

        # 3. Preemption: scancel --signal=TERM, save, resume at 2 (exact) and at 4 (resharded).
        long_steps = 100000
        d = w("preempt")
        cmd = srun + ["-n", "2", args.train] + common + ["--steps", str(long_steps), "--save", d, "--save-every",
                                                          "1000", "--log-json", w("preempt.jsonl")]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        t0 = time.monotonic()
        while (not os.path.exists(w("preempt.jsonl")) or len(open(w("preempt.jsonl")).read().splitlines()) < 3) \
                and p.poll() is None and time.monotonic() - t0 < args.timeout:
            time.sleep(0.05)
        jobs = cluster.jobs()
        if p.poll() is not None or not jobs:
            fail(f"preemption: the job ended before it could be signalled:\n{p.communicate()[0][-2000:]}")
        subprocess.run(["scancel", "--signal=TERM", jobs[0]], env=env, check=True, timeout=10)
        try:
            out = p.communicate(timeout=args.timeout)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            fail("preemption: the job did not end after scancel --signal=TERM")
        if p.returncode != 0 or "stopping after step" not in out:
            fail(f"preemption: srun exited {p.returncode}; expected a clean stop with a checkpoint:\n{out[-2000:]}")
        at = open(os.path.join(d, "latest")).read().strip()
        saved = max(losses(w("preempt.jsonl")))
        if saved >= long_steps:
            fail(f"preemption: the run finished all {long_steps} steps before the signal reached it")
        final = saved + 3
        launch(srun + ["-n", "2", args.train] + common + ["--steps", str(final), "--resume", d, "--log-json",
                                                           w("resume2.jsonl")])
        launch([args.mpirun, "-np", "2", args.train] + common + ["--steps", str(final), "--log-json", w("whole2.jsonl")])
        got, want = losses(w("resume2.jsonl")), losses(w("whole2.jsonl"))
        if got.get(final) != want[final]:
            fail(f"preemption: resumed from {at} (step {saved}), final loss {got.get(final)!r} != the uninterrupted "
                 f"{want[final]!r}")
        # --tokens-per-rank halves at 4 ranks: the same global batch.
        tpr = None
        for line in out.splitlines():
            if "tokens/rank" in line:
                tpr = int(line.split("tokens/rank")[0].split("|")[-1].strip())
        launch(srun + ["-n", "4", args.train] + common + ["--steps", str(final), "--resume", d, "--log-json",
                                                           w("resume4.jsonl")] +
               (["--tokens-per-rank", str(tpr // 2)] if tpr else []))
        r4 = losses(w("resume4.jsonl"))
        rel = abs(r4[final] - want[final]) / abs(want[final])
        if rel > 1e-4:
            fail(f"preemption: resharded 2 -> 4 from {at}: final loss {r4[final]!r} vs {want[final]!r} (rel {rel:.2e})")
        print(f"ok scancel --signal=TERM at step {saved}: every rank saved {at} and exited 0; srun -n 2 --resume "
              f"reached the uninterrupted final loss bitwise, srun -n 4 --resume within {rel:.1e}")

        # 4. A lost rank under srun.
        marker = w("lost")
        cmd = srun + ["-n", "2", args.train] + common + ["--steps", str(long_steps), "--log-json", marker]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        t0 = time.monotonic()
        victim = None
        while p.poll() is None and time.monotonic() - t0 < args.timeout:
            if os.path.exists(marker) and len(open(marker).read().splitlines()) >= 2:
                victim = rank_pids(marker, "SLURM_PROCID").get(1)
                if victim:
                    break
            time.sleep(0.05)
        if victim is None:
            p.kill()
            fail(f"lost rank: no rank 1 to kill:\n{p.communicate()[0][-2000:]}")
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            out = p.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            fail("lost rank: srun did not end within 60 s of SIGKILL to rank 1")
        ended = time.monotonic() - t_kill
        time.sleep(1.0)
        left = {**rank_pids(marker), **rank_pids(marker, "SLURM_PROCID")}
        if left:
            for pid in left.values():
                os.kill(pid, signal.SIGKILL)
            fail(f"lost rank: processes left behind: {left}")
        if p.returncode == 0:
            fail(f"lost rank: srun exited 0 after a rank was killed:\n{out[-2000:]}")
        named = [line for line in out.splitlines() if "task 1" in line]
        if not named:
            fail(f"lost rank: nothing in the job's output names task 1, the rank killed:\n{out[-2000:]}")
        print(f"ok SIGKILL to rank 1 under srun: the job ended {ended:.1f} s later, exit {p.returncode}, none left "
              f"({named[0].strip()})")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("all Slurm checks passed")


if __name__ == "__main__":
    main()
