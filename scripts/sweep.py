#!/usr/bin/env python3
"""Scaling sweeps over moex-bench and moex-train, written as JSON lines.

Every run's JSON result lines (the stdout lines that start with '{', or for moex-train the
--log-json file) are kept, each with fields added by this script:

  sweep            weak | strong | skew | schedule | exchange | load
  label            a short name of the point inside its sweep
  scaling          weak | strong (scaling sweeps only)
  nodes            nodes asked for (1 = plain mpirun; > 1 = scripts/cluster.sh namespace nodes)
  ranks_per_node   ranks per node asked for
  rate             the link cap given to cluster.sh (null = none or a single node)
  repeat           0.. when a point is run several times (--repeats)
  oversubscribed   true when there are more ranks than cores (the timing is then total work)
  cpu, cores       the machine (model name from /proc/cpuinfo, os.cpu_count())
  loadavg          the 1-minute load average just before the run
  cmd              the command, as typed from the repository root
  time             when the run started (UTC, ISO 8601)
  binary_sha256    of the moex binary that ran

A run that fails (non-zero exit, no JSON, timeout) is printed with its command, exit status and
the last lines of its stderr, written as a line with "failed": true, and the sweep goes on; the
exit status of this script is then 1.

Usage (from the repository root, as root for the namespace nodes):

  /usr/bin/python3 scripts/sweep.py --out docs/scaling/sweep.jsonl            # every sweep
  /usr/bin/python3 scripts/sweep.py --quick --out /tmp/q.jsonl                # < ~2 minutes
  /usr/bin/python3 scripts/sweep.py --sweep weak,strong --repeats 5 --out w.jsonl

Standard library only.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_SWEEPS = ["weak", "strong", "skew", "schedule", "exchange", "load"]
OVERSUB_NOTE = ("more ranks than cores: the ranks share the cores, so the step time measures the "
                "total work of all ranks, not parallel scaling")


# ------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------------------------
# Output: every line is appended to OUT.partial and flushed; OUT.partial becomes OUT at the end.
# ------------------------------------------------------------------------------------------
class Output:
    def __init__(self, path, append):
        self.path = path
        self.partial = path + ".partial"
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        if append and os.path.exists(path):
            shutil.copyfile(path, self.partial)
            self.f = open(self.partial, "a")
        else:
            self.f = open(self.partial, "w")
        self.lines = 0

    def write(self, obj):
        self.f.write(json.dumps(obj, sort_keys=True) + "\n")
        self.f.flush()
        self.lines += 1

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.partial, self.path)


# ------------------------------------------------------------------------------------------
# Running one point
# ------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args, out):
        self.args = args
        self.out = out
        self.cores = os.cpu_count() or 1
        self.cpu = cpu_model()
        self.failures = []
        self.skipped = []
        self.env = dict(os.environ)
        self.env.update({
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OPENBLAS_NUM_THREADS": str(args.blas_threads),
            "MOEX_TIMEOUT_S": str(args.moex_timeout),
        })
        self.cluster = os.path.join(REPO, "scripts", "cluster.sh")
        self.snapdir = None
        self.bins = {}      # name -> (path to run, path as typed, sha256)
        self.cluster_ok = None

    # The binaries: with --snapshot (default) they are copied once, so every point of the sweep
    # runs the same build even if build/ is rebuilt meanwhile.
    def binary(self, name):
        if name in self.bins:
            return self.bins[name]
        src = os.path.join(self.args.bin_dir, name)
        shown = os.path.relpath(src, REPO) if src.startswith(REPO + os.sep) else src
        if not os.access(src, os.X_OK):
            self.bins[name] = None
            return None
        path = src
        if self.args.snapshot:
            if self.snapdir is None:
                self.snapdir = tempfile.mkdtemp(prefix="moex-sweep-bin.")
            path = os.path.join(self.snapdir, name)
            for attempt in range(4):
                shutil.copy2(src, path)
                # A copy taken while the linker writes would not run: check it, retry.
                try:
                    r = subprocess.run([path, "--help"], env=self.env, capture_output=True,
                                       text=True, timeout=60)
                    if r.returncode >= 0:
                        break
                except (OSError, subprocess.TimeoutExpired):
                    pass
                print("note: the copy of %s does not run (being rebuilt?): trying again in 20 s"
                      % shown, flush=True)
                time.sleep(20)
        self.bins[name] = (path, shown, sha256(path))
        return self.bins[name]

    def cleanup(self):
        if self.snapdir:
            shutil.rmtree(self.snapdir, ignore_errors=True)

    def cluster_available(self):
        if self.cluster_ok is None:
            r = subprocess.run([self.cluster, "--check"], env=self.env, capture_output=True,
                               text=True)
            self.cluster_ok = (r.returncode == 0)
            if not self.cluster_ok:
                text = (r.stdout + r.stderr).strip().splitlines()
                print("note: namespace nodes unavailable here: %s" %
                      (text[-1] if text else "scripts/cluster.sh --check failed"), flush=True)
        return self.cluster_ok

    def launcher(self, nodes, rpn, rate):
        ranks = nodes * rpn
        if nodes == 1:
            cmd = ["mpirun", "-np", str(ranks)]
            if ranks > self.cores:
                cmd.append("--oversubscribe")
            return cmd
        cmd = [self.cluster, "--nodes", str(nodes), "--ranks-per-node", str(rpn)]
        if rate:
            cmd += ["--rate", rate]
        return cmd + ["--"]

    def _exec(self, argv):
        """Runs argv in its own process group with a time limit; returns (rc, stdout, stderr)."""
        p = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            so, se = p.communicate(timeout=self.args.run_timeout)
            return p.returncode, so, se
        except subprocess.TimeoutExpired:
            # cluster.sh cleans its namespaces up on TERM; then KILL whatever is left of the group.
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                so, se = p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                so, se = p.communicate()
            return 124, so or "", (se or "") + "\nsweep.py: timed out after %d s" % self.args.run_timeout

    def run(self, sweep, label, prog, prog_args, nodes, rpn, rate=None, extra=None,
            log_json=False):
        """One point: returns the list of result dicts (empty on failure)."""
        extra = dict(extra or {})
        ranks = nodes * rpn
        b = self.binary(prog)
        base = {"sweep": sweep, "label": label, "nodes": nodes, "ranks_per_node": rpn,
                "rate": rate if nodes > 1 else None, "cpu": self.cpu, "cores": self.cores,
                "oversubscribed": ranks > self.cores}
        if ranks > self.cores:
            base["note"] = OVERSUB_NOTE
        base.update(extra)
        if b is None:
            self._fail(base, "%s/%s" % (self.args.bin_dir, prog), None, "binary not found", [])
            return []
        if nodes > 1 and not self.cluster_available():
            print("  skip %-28s namespace nodes unavailable" % label, flush=True)
            self.skipped.append((sweep, label, "namespace nodes unavailable"))
            return []
        path, shown, digest = b
        logf = None
        args = list(prog_args)
        if log_json:
            fd, logf = tempfile.mkstemp(prefix="moex-sweep-log.", suffix=".jsonl")
            os.close(fd)
            args += ["--log-json", logf]
        launch = self.launcher(nodes, rpn, rate)
        argv = launch + [path] + args
        shown_launch = [("scripts/cluster.sh" if a == self.cluster else a) for a in launch]
        typed = " ".join(shlex.quote(a) for a in shown_launch + [shown] + args)
        if log_json:
            typed = typed.replace(shlex.quote(logf), "STEPS.jsonl")
        base.update({"cmd": typed, "binary_sha256": digest, "loadavg": loadavg(),
                     "time": now_iso()})
        if self.args.dry_run:
            print("  dry-run: " + typed, flush=True)
            if logf:
                os.unlink(logf)
            return []
        t0 = time.monotonic()
        rc, so, se = self._exec(argv)
        base["wall_s"] = round(time.monotonic() - t0, 3)
        results = []
        try:
            if log_json:
                try:
                    with open(logf) as f:
                        lines = f.read().splitlines()
                except OSError:
                    lines = []
            else:
                lines = so.splitlines()
            bad = 0
            for line in lines:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                results.append(obj)
        finally:
            if logf:
                try:
                    os.unlink(logf)
                except OSError:
                    pass
        if rc == 77 and nodes > 1:
            why = next((l for l in (so + se).splitlines() if "SKIPPED" in l), "SKIPPED")
            print("  skip %-28s %s" % (label, why), flush=True)
            self.skipped.append((sweep, label, why))
            return []
        if rc != 0 or not results:
            reason = "exit status %d" % rc if rc != 0 else "no JSON result line"
            self._fail(base, typed, rc, reason, (se or so).splitlines())
            return []
        out = []
        warned = set()

        def warn(msg):
            if msg not in warned:
                warned.add(msg)
                print("  warning: %s: %s" % (label, msg), flush=True)
        for obj in results:
            row = dict(obj)
            for k, v in base.items():
                if k in row and row[k] != v:
                    # moex's own value (e.g. its node count: the ranks that share memory)
                    # differs from the one asked for: keep both, and say so.
                    row[k + "_reported"] = row[k]
                    warn("moex reports %s=%s, asked for %s" % (k, row[k], v))
                row[k] = v
            if "ranks" in obj and obj["ranks"] != ranks:
                warn("moex reports ranks=%s, asked for %d" % (obj["ranks"], ranks))
            if "ranks" not in row:
                row["ranks"] = ranks
            self.out.write(row)
            out.append(row)
        return out

    def _fail(self, base, cmd, rc, reason, err_lines):
        lines = [l.rstrip() for l in err_lines if l.strip() and not set(l.strip()) <= set("-")]
        # moex's own error lines first (mpirun's boilerplate follows them), then the last lines.
        key = [l for l in lines if "error" in l.lower() and "mpirun" not in l.lower()][:3]
        tail = key + [l for l in lines[-self.args.stderr_lines:] if l not in key]
        print("  FAILED %s: %s\n    command: %s\n    %s" %
              (base.get("label"), reason, cmd, "\n    ".join(tail) or "(no output)"), flush=True)
        row = dict(base)
        row.update({"failed": True, "rc": rc, "reason": reason, "stderr_tail": tail, "cmd": cmd})
        self.out.write(row)
        self.failures.append((base.get("sweep"), base.get("label"), cmd, rc, reason, tail))


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------
def med(rows, key):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def table(title, header, rows):
    """header: list of (name, width); rows: lists of already formatted strings."""
    def line(cells):
        return "  " + " ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, (_, w)) in enumerate(zip(cells, header)))
    print("\n" + title, flush=True)
    print(line([n for n, _ in header]))
    for r in rows:
        print(line(r))
    sys.stdout.flush()


LAYER_HEADER = [("point", 36), ("ranks", 5), ("layout", 7), ("tok/rank", 8), ("ms_step", 9),
                ("tokens/s", 9), ("ms_comm", 8), ("ms_comp", 8), ("max/mean", 8), ("n", 2)]


def layer_table(title, groups):
    """groups: list of (label, rows of repeats)."""
    out = []
    for label, rows in groups:
        if not rows:
            out.append([label, "-", "-", "-", "failed", "-", "-", "-", "-", "0"])
            continue
        r0 = rows[0]
        out.append([label, str(r0.get("ranks")), "%dx%d" % (r0["nodes"], r0["ranks_per_node"]),
                    str(r0.get("tokens_per_rank")), fmt(med(rows, "ms_step"), ".1f"),
                    fmt(med(rows, "tokens_per_s"), ".0f"), fmt(med(rows, "ms_comm"), ".1f"),
                    fmt(med(rows, "ms_compute"), ".1f"), fmt(med(rows, "max_mean_load"), ".3f"),
                    str(len(rows))])
    table(title + " (medians over repeats)", LAYER_HEADER, out)


# ------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------
def layer_args(a, tokens_per_rank, more=(), shared=None):
    return ["layer", "--hidden", str(a.hidden), "--ffn", str(a.ffn), "--experts", str(a.experts),
            "--shared", str(a.shared if shared is None else shared), "--topk", str(a.topk), "--tokens-per-rank", str(tokens_per_rank),
            "--iters", str(a.iters), "--warmup", str(a.warmup), "--reference", "off",
            "--json"] + list(a.layer_extra) + list(more)


def point(R, sweep, label, nodes, rpn, rate, prog_args, extra, repeats, print_each=True):
    rows = []
    for rep in range(repeats):
        e = dict(extra)
        e["repeat"] = rep
        got = R.run(sweep, label, "moex-bench", prog_args, nodes, rpn, rate, e)
        rows += got
        if print_each and got:
            g = got[0]
            print("  %-36s rep %d  ms_step %8.1f  tokens/s %8.0f  (%.1f s)" %
                  (label, rep, g.get("ms_step", float("nan")), g.get("tokens_per_s", float("nan")),
                   g.get("wall_s", 0)), flush=True)
    return rows


def layouts(a):
    """(nodes, ranks_per_node) of the scaling sweeps: one node with 1..max ranks, then N nodes x 1."""
    out = [(1, r) for r in a.ranks]
    out += [(n, 1) for n in a.node_counts]
    out += [(n, r) for n, r in a.extra_layouts]
    return out


def sweep_scaling(R, a, kind):
    print("\n== %s scaling ==" % kind, flush=True)
    if max(r for _, r in layouts(a)) > R.cores or max(n * r for n, r in layouts(a)) > R.cores:
        print("note: " + OVERSUB_NOTE + " (this machine: %d cores); the N-node points run N ranks "
              "on these same cores too" % R.cores, flush=True)
    groups = []
    for nodes, rpn in layouts(a):
        ranks = nodes * rpn
        if kind == "weak":
            tpr = a.tokens_per_rank
        else:
            if a.global_tokens % ranks:
                print("  skip %d ranks: %d global tokens do not divide" % (ranks, a.global_tokens))
                continue
            tpr = a.global_tokens // ranks
        rate = a.rate if nodes > 1 else None
        label = "%d node%s x %d rank%s" % (nodes, "s" if nodes > 1 else "", rpn, "s" if rpn > 1 else "")
        extra = {"scaling": kind, "global_tokens": tpr * ranks}
        rows = point(R, kind, label, nodes, rpn, rate, layer_args(a, tpr), extra, a.repeats)
        groups.append((label, rows))
    layer_table("%s scaling: %s" % (kind, "tokens/rank %d" % a.tokens_per_rank if kind == "weak"
                                    else "global tokens %d" % a.global_tokens), groups)


def sweep_skew(R, a):
    print("\n== skew (%d ranks, one node) ==" % a.skew_ranks, flush=True)
    groups = []
    for z in a.skews:
        for rep in a.replica_modes:
            label = "skew %g replicas %s" % (z, rep)
            more = ["--skew", "%g" % z, "--replicas", rep]
            rows = point(R, "skew", label, 1, a.skew_ranks, None,
                         layer_args(a, a.tokens_per_rank, more), {"skew_asked": z, "replicas_asked": rep},
                         a.repeats)
            groups.append((label, rows))
    layer_table("skew", groups)


def sweep_schedule(R, a):
    n, r = a.schedule_layout
    print("\n== schedule (%d nodes x %d ranks, link %s, %d shared experts) ==" %
          (n, r, a.schedule_rate or "uncapped", a.schedule_shared), flush=True)
    groups = []
    for ex in a.exchanges:
        for ov in a.overlaps:
            for ch in a.chunk_list:
                label = "%s overlap %s chunks %s" % (ex, ov, ch)
                more = ["--chunks", ch, "--overlap", ov, "--exchange", ex] + list(a.schedule_extra)
                extra = {"chunks_asked": ch, "overlap_asked": ov, "exchange_asked": ex}
                rows = point(R, "schedule", label, n, r, a.schedule_rate,
                             layer_args(a, a.tokens_per_rank, more, shared=a.schedule_shared),
                             extra, a.repeats)
                groups.append((label, rows))
    layer_table("schedule", groups)


def exchange_help(R):
    """The `moex-bench exchange --help` text, or None where the exchange benchmark is missing."""
    b = R.binary("moex-bench")
    if b is None:
        return None
    try:
        r = subprocess.run(["mpirun", "-np", "1", b[0], "exchange", "--help"], env=R.env,
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    except subprocess.TimeoutExpired:
        return None
    text = r.stdout + r.stderr
    if r.returncode != 0 or "unknown benchmark" in text or "--" not in text:
        return None
    return text


def sweep_exchange(R, a):
    print("\n== exchange ==", flush=True)
    text = exchange_help(R)
    if text is None:
        print("note: `moex-bench exchange --help` does not work with this build: exchange sweep "
              "skipped", flush=True)
        R.skipped.append(("exchange", "all", "moex-bench exchange not available"))
        return
    flags = set(re.findall(r"--[A-Za-z][A-Za-z0-9-]*", text))
    if "--json" not in flags:
        print("note: `moex-bench exchange` has no --json flag: exchange sweep skipped", flush=True)
        R.skipped.append(("exchange", "all", "no --json"))
        return
    groups = []
    for n, r in a.exchange_layouts:
        for ex in a.exchanges:
            if "--exchange" not in flags and ex != a.exchanges[0]:
                print("note: `moex-bench exchange` has no --exchange flag: one run per layout",
                      flush=True)
                continue
            args = ["exchange", "--json"]
            if "--exchange" in flags:
                args += ["--exchange", ex]
            args += list(a.exchange_extra)
            label = "%dx%d %s" % (n, r, ex)
            rows = []
            for rep in range(a.repeats):
                got = R.run("exchange", label, "moex-bench", args, n, r, a.rate if n > 1 else None,
                            {"repeat": rep, "exchange_asked": ex})
                rows += got
                if got:
                    print("  %-16s rep %d: %d sizes, busbw max %.3f GB/s (%.1f s)" %
                          (label, rep, len(got), max(g.get("busbw_GBps") or 0 for g in got),
                           got[0].get("wall_s", 0)), flush=True)
            groups.append((label, rows))
    out = []
    for label, rows in groups:
        sizes = sorted(set(x.get("bytes") for x in rows if x.get("bytes") is not None))
        for s in sizes:
            at = [x for x in rows if x.get("bytes") == s]
            out.append([label, str(s), fmt(med(at, "time_us"), ".1f"), fmt(med(at, "busbw_GBps"), ".3f"),
                        fmt(med(at, "ret_time_us"), ".1f"), fmt(med(at, "ret_busbw_GBps"), ".3f"),
                        str(sum(int(x.get("wrong") or 0) for x in at))])
        if not rows:
            out.append([label, "failed", "-", "-", "-", "-", "-"])
    table("exchange (medians over repeats)",
          [("layout", 20), ("bytes", 10), ("time_us", 10), ("busbw", 8), ("ret_us", 10),
           ("ret_bw", 8), ("wrong", 5)], out)


def sweep_load(R, a):
    print("\n== load (moex-train, %d ranks, skew %g, %d steps) ==" % (a.load_ranks, a.load_skew,
                                                                      a.load_steps), flush=True)
    variants = [("plain", []),
                ("bias 0.001", ["--bias-update-speed", "0.001"]),
                ("replicas", ["--replicas", "on"]),
                ("bias 0.001 + replicas", ["--bias-update-speed", "0.001", "--replicas", "on"])]
    out = []
    for name, more in variants:
        if a.load_variants and name not in a.load_variants:
            continue
        args = ["--steps", str(a.load_steps), "--skew", str(a.load_skew), "--log-every",
                str(a.load_steps)] + more + list(a.train_extra)
        rows = R.run("load", name, "moex-train", args, 1, a.load_ranks, None,
                     {"variant": name, "skew_asked": a.load_skew}, log_json=True)
        if not rows:
            out.append([name, "failed", "-", "-", "-", "-"])
            continue
        last = [x for x in rows if x.get("step", 0) > a.load_steps * 2 // 3]
        out.append([name, str(len(rows)), fmt(rows[0].get("max_mean_rank_load"), ".3f"),
                    fmt(med(last, "max_mean_load"), ".3f"), fmt(med(last, "max_mean_rank_load"), ".3f"),
                    fmt(med(last, "tokens_per_s"), ".0f")])
        print("  %-24s %d steps (%.1f s)" % (name, len(rows), rows[0].get("wall_s", 0)), flush=True)
    table("load (medians of the last third of the steps)",
          [("variant", 24), ("steps", 5), ("rank@1", 7), ("expert", 7), ("rank", 7), ("tokens/s", 9)],
          out)


# ------------------------------------------------------------------------------------------
def csv_list(s, conv=str):
    return [conv(x) for x in s.split(",") if x.strip()]


def layout_list(s):
    out = []
    for x in csv_list(s):
        n, r = x.lower().split("x")
        out.append((int(n), int(r)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON-lines file to write (atomically, at the end)")
    p.add_argument("--append", action="store_true", help="keep the lines already in --out")
    p.add_argument("--sweep", default=",".join(ALL_SWEEPS),
                   help="comma list of: " + ",".join(ALL_SWEEPS) + " (default all)")
    p.add_argument("--quick", action="store_true", help="a tiny version of every sweep (< ~2 min)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--bin-dir", default=os.path.join(REPO, "build", "bin"))
    p.add_argument("--snapshot", default="on", choices=["on", "off"],
                   help="on: copy the binaries once at the start, so a rebuild during the sweep "
                        "does not mix builds (default on)")
    p.add_argument("--repeats", type=int, help="runs per point (default 3; --quick 1)")
    # layer shape
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--shared", type=int, default=1)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--tokens-per-rank", type=int, help="weak scaling and the other sweeps (default 512)")
    p.add_argument("--global-tokens", type=int, help="strong scaling (default 2048)")
    p.add_argument("--iters", type=int, help="timed iterations (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed iterations (default 2; --quick 1)")
    p.add_argument("--layer-extra", default="", help="more moex-bench layer flags, one string")
    # layouts and links
    p.add_argument("--ranks", help="ranks on one node (default 1,2,4; --quick 1,2)")
    p.add_argument("--node-counts", help="namespace nodes x 1 rank (default 2,4; --quick 2)")
    p.add_argument("--extra-layouts", default="", help="more NxR layouts for the scaling sweeps")
    p.add_argument("--rate", default="1gbit",
                   help="link cap of the namespace nodes in the scaling and exchange sweeps "
                        "('none' = uncapped; default 1gbit)")
    p.add_argument("--skews", help="default 0,1,1.5")
    p.add_argument("--skew-ranks", type=int, default=2)
    p.add_argument("--replica-modes", default="off,on")
    p.add_argument("--chunks", help="schedule sweep (default 1,2,4,auto; --quick 1,auto)")
    p.add_argument("--overlaps", help="default on,off; --quick on")
    p.add_argument("--exchanges", default="flat,hierarchical")
    p.add_argument("--schedule-layout", help="NxR (default 2x2; --quick 2x1)")
    p.add_argument("--schedule-rate", default="200mbit", help="'none' = uncapped")
    p.add_argument("--schedule-shared", type=int, default=0,
                   help="shared experts in the schedule sweep (default 0: with a shared expert "
                        "the blocking all-reduce of its gradients over the capped link, which no "
                        "schedule overlaps, dominates the step)")
    p.add_argument("--schedule-extra", default="", help="more flags for the schedule points")
    p.add_argument("--exchange-layouts", help="NxR list (default 1x2,2x1,2x2; --quick 1x2,2x1)")
    p.add_argument("--exchange-extra", default="", help="more moex-bench exchange flags")
    p.add_argument("--load-steps", type=int, help="default 60; --quick 20")
    p.add_argument("--load-skew", type=float, default=1.2)
    p.add_argument("--load-ranks", type=int, default=2)
    p.add_argument("--load-variants", default="",
                   help="comma list of: plain, bias 0.001, replicas, bias 0.001 + replicas (default all)")
    p.add_argument("--train-extra", default="", help="more moex-train flags")
    # environment
    p.add_argument("--blas-threads", type=int, default=1, help="OPENBLAS_NUM_THREADS (default 1)")
    p.add_argument("--moex-timeout", type=int, default=600, help="MOEX_TIMEOUT_S (default 600)")
    p.add_argument("--run-timeout", type=int, default=900, help="seconds one run may take (default 900)")
    p.add_argument("--stderr-lines", type=int, default=8)
    a = p.parse_args()

    q = a.quick
    a.repeats = a.repeats or (1 if q else 3)
    a.tokens_per_rank = a.tokens_per_rank or (256 if q else 512)
    a.global_tokens = a.global_tokens or (512 if q else 2048)
    a.iters = a.iters or (3 if q else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    a.ranks = csv_list(a.ranks or ("1,2" if q else "1,2,4"), int)
    a.node_counts = csv_list(a.node_counts or ("2" if q else "2,4"), int)
    a.extra_layouts = layout_list(a.extra_layouts) if a.extra_layouts else []
    a.skews = csv_list(a.skews or ("0,1.5" if q else "0,1,1.5"), float)
    a.replica_modes = csv_list(a.replica_modes)
    a.chunk_list = csv_list(a.chunks or ("1,auto" if q else "1,2,4,auto"))
    a.overlaps = csv_list(a.overlaps or ("on" if q else "on,off"))
    a.exchanges = csv_list(a.exchanges)
    a.schedule_layout = layout_list(a.schedule_layout or ("2x1" if q else "2x2"))[0]
    a.exchange_layouts = layout_list(a.exchange_layouts or ("1x2,2x1" if q else "1x2,2x1,2x2"))
    a.load_steps = a.load_steps or (20 if q else 60)
    a.load_variants = [v.strip() for v in a.load_variants.split(",") if v.strip()]
    a.rate = None if a.rate in ("", "none") else a.rate
    a.schedule_rate = None if a.schedule_rate in ("", "none") else a.schedule_rate
    a.layer_extra = shlex.split(a.layer_extra)
    a.schedule_extra = shlex.split(a.schedule_extra)
    a.exchange_extra = shlex.split(a.exchange_extra)
    a.train_extra = shlex.split(a.train_extra)
    a.snapshot = a.snapshot == "on"
    sweeps = csv_list(a.sweep)
    for s in sweeps:
        if s not in ALL_SWEEPS:
            p.error("unknown sweep '%s' (expected some of %s)" % (s, ",".join(ALL_SWEEPS)))

    out = Output(os.path.abspath(a.out), a.append)
    R = Runner(a, out)
    print("sweep.py: %s, %d cores%s; sweeps %s%s; output %s" %
          (R.cpu, R.cores, ", AVX-512" if cpu_has("avx512f") else "", ",".join(sweeps),
           " (quick)" if q else "", a.out), flush=True)
    la = loadavg()
    if la is not None and la > 0.5 * R.cores:
        print("warning: load average %.2f on %d cores before the sweep: timings will be noisy"
              % (la, R.cores), flush=True)
    t0 = time.monotonic()
    interrupted = False
    try:
        for s in sweeps:
            if s in ("weak", "strong"):
                sweep_scaling(R, a, s)
            elif s == "skew":
                sweep_skew(R, a)
            elif s == "schedule":
                sweep_schedule(R, a)
            elif s == "exchange":
                sweep_exchange(R, a)
            elif s == "load":
                sweep_load(R, a)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: the lines so far are kept in %s" % out.partial, flush=True)
    finally:
        R.cleanup()
    elapsed = time.monotonic() - t0
    if interrupted:
        out.f.close()
        return 130
    if a.dry_run:
        out.f.close()
        os.unlink(out.partial)
        return 0
    out.close()
    print("\n%d lines written to %s in %.0f s" % (out.lines, a.out, elapsed), flush=True)
    for s, l, why in R.skipped:
        print("skipped: %s / %s: %s" % (s, l, why))
    if R.failures:
        print("%d run(s) FAILED:" % len(R.failures))
        for s, l, cmd, rc, reason, tail in R.failures:
            print("  %s / %s: %s\n    %s" % (s, l, reason, cmd))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
