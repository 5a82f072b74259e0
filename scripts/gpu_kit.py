#!/usr/bin/env python3
"""The GPU session kit: build the GPU path here, run its checks and benchmarks on a lent GPU machine.

A lent GPU machine (see BENCHMARKS.md, "GPU") has the CUDA toolkit, PyTorch and Python, but none of
this project's Debian packages (Open MPI, OpenBLAS, GoogleTest, Boost, nlohmann-json), and it cannot
fetch any. So the GPU build is made on a Debian machine with the CUDA toolkit, and travels as a kit:

  pack   (here, Debian 12 + CUDA toolkit, no GPU needed) builds build-gpu (Release, CUDA on, sm_90 +
         PTX), and writes the kit folder (default .gpu-kit/, git-ignored):
           build/...     the GPU tests (ctest label `cuda`) and the tools, at their build-tree paths
           tests.json    those tests' commands, environment, timeouts and skip codes, as ctest has them
           debs/         Debian's runtime packages of Open MPI (with PMIx, hwloc, libevent) and OpenBLAS
           manifest.json commit, build type, nvcc, sizes
  run    (there) unpacks the packages into a private prefix (Open MPI relocated through OPAL_PREFIX /
         PMIX_PREFIX; nothing is installed into /), finds the CUDA libraries (cudart, cuBLAS, NCCL; in
         the toolkit or in pip's nvidia-* packages), then, within --budget seconds:
           1. the GPU tests (the same commands as `ctest -L ^cuda$`), --jobs at a time;
           2. moex-bench-gpu --json (grouped GEMM vs dense, permute/combine vs copy, single-GPU layer);
           3. examples/torch_moe_bench.py --check, then its timings (HF loop and grouped variants);
           4. moex-bench layer --device cuda, chunks 1, 4 and auto (the device trials' choice; np 1
              over NCCL, np 2 over the staged path, there also local-first and local-split),
              and moex-bench exchange --device cuda (np 2, staged);
           5. moex-train --device cuda against the CPU run (200 steps, np 1 over NCCL).
         Everything goes to $OUT (gpu_run.log, bench.jsonl, summary.json); a summary table with the
         issue's three ratios is printed last.

Usage (the device tool runs commands in the repository root; name the kit in `carry`):
  python3 scripts/gpu_kit.py pack
  python3 scripts/gpu_kit.py run --out "$OUT" --budget 480
"""
import argparse
import concurrent.futures
import datetime
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runtime packages (Debian 12) that the GPU build's binaries and Open MPI's launcher need beyond libc.
DEBS = ["openmpi-bin", "openmpi-common", "libopenmpi3", "libpmix2", "libhwloc15", "libevent-core-2.1-7",
        "libevent-pthreads-2.1-7", "libopenblas0-pthread", "libgfortran5", "libquadmath0", "libnuma1", "libmunge2"]
TOOLS = ["moex-train", "moex-layer", "moex-bench", "moex-bench-gpu"]
# Libraries of the CUDA toolkit and NCCL that the kit does not carry (hundreds of MB): found there.
CUDA_LIBS = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libnccl.so.2"]
KIT_LIMIT = 56 << 20  # the device tool carries at most 64 MiB with the working tree


def sh(cmd, **kw):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


# ----------------------------------------------------------------------------------------------- pack

def pack(a):
    kit = os.path.abspath(a.kit)
    build = os.path.abspath(a.build)
    if os.path.exists(kit):
        shutil.rmtree(kit)
    os.makedirs(os.path.join(kit, "debs"))
    try:
        sh(["apt-get", "download"] + DEBS, cwd=os.path.join(kit, "debs"))
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"gpu_kit pack: apt-get download of {' '.join(DEBS)} failed ({e}); it needs Debian 12's "
                 "package lists (apt-get update)")
    sh(["cmake", "-S", REPO, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DMOEX_WITH_CUDA=ON",
        "-DMOEX_CUDA_EMULATION=OFF"])
    sh(["cmake", "--build", build, "-j", str(a.jobs)])
    listing = subprocess.run(["ctest", "--test-dir", build, "-L", "^cuda$", "--show-only=json-v1"], check=True,
                             capture_output=True, text=True).stdout
    cache = open(os.path.join(build, "CMakeCache.txt")).read()
    mpiexec = re.search(r"^MPIEXEC_EXECUTABLE:FILEPATH=(.*)$", cache, re.M).group(1)
    python = re.search(r"^MOEX_PYTHON3:FILEPATH=(.*)$", cache, re.M)

    def generic(s):
        s = s.replace(build, "@BUILD@").replace(REPO, "@SOURCE@").replace(mpiexec, "@MPIRUN@")
        return s.replace(python.group(1), "@PYTHON@") if python else s

    copied = set()

    def carry(path):
        if path.startswith(build + "/") and os.path.isfile(path) and path not in copied:
            dst = os.path.join(kit, "build", os.path.relpath(path, build))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(path, dst)
            copied.add(path)

    tests = []
    for t in json.loads(listing)["tests"]:
        props = {p["name"]: p["value"] for p in t.get("properties", [])}
        for arg in t["command"]:
            carry(arg)
        tests.append({"name": t["name"], "command": [generic(x) for x in t["command"]],
                      "env": [generic(x) for x in props.get("ENVIRONMENT", [])],
                      "timeout": props.get("TIMEOUT", 300), "skip_code": props.get("SKIP_RETURN_CODE"),
                      "processors": props.get("PROCESSORS", 1),
                      "cwd": generic(props.get("WORKING_DIRECTORY", build))})
    for tool in TOOLS:
        carry(os.path.join(build, "bin", tool))
    with open(os.path.join(kit, "tests.json"), "w") as f:
        json.dump({"tests": tests}, f, indent=1)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(kit) for n in ns)
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    manifest = {"commit": commit + ("+changes" if dirty else ""), "made": datetime.datetime.now().isoformat(),
                "build_type": "Release", "nvcc": nvcc[-1] if nvcc else "?", "tests": [t["name"] for t in tests],
                "binaries": sorted(os.path.relpath(p, build) for p in copied), "debs": sorted(os.listdir(
                    os.path.join(kit, "debs"))), "bytes": size}
    with open(os.path.join(kit, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"gpu_kit pack: {kit}: {len(tests)} tests, {len(copied)} binaries, {len(manifest['debs'])} packages, "
          f"{size / 2**20:.1f} MiB")
    if size > KIT_LIMIT:
        sys.exit(f"gpu_kit pack: the kit is {size / 2**20:.1f} MiB, over {KIT_LIMIT >> 20} MiB: the device tool "
                 "carries at most 64 MiB with the working tree")


# ------------------------------------------------------------------------------------------------ run

def unpack_deb(deb, root):
    """Extracts a .deb's data archive into root (dpkg -x without dpkg: an ar archive holding data.tar.*)."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{deb}: not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise RuntimeError(f"{deb}: no data.tar member")
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
            body = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                    # Our own Debian packages: extracted as dpkg would (Python >= 3.12 asks for a filter).
                    if hasattr(tarfile, "fully_trusted_filter"):
                        tar.extractall(root, filter="fully_trusted")
                    else:
                        tar.extractall(root)
                return


class Runner:
    def __init__(self, a):
        self.a = a
        self.kit = os.path.abspath(a.kit)
        self.out = os.path.abspath(a.out)
        os.makedirs(self.out, exist_ok=True)
        self.deadline = time.monotonic() + a.budget
        self.log = open(os.path.join(self.out, "gpu_run.log"), "w")
        self.bench = open(os.path.join(self.out, "bench.jsonl"), "w")
        self.lock = threading.Lock()
        self.results = {"tests": {}, "steps": {}}
        self.env = dict(os.environ)
        # PyTorch runs in the machine's own environment: the kit's libraries (Debian's libgfortran,
        # libnuma, ...) stay out of its way.
        self.plain_env = dict(os.environ, PYTHONUNBUFFERED="1")

    def say(self, text):
        with self.lock:
            print(text, flush=True)
            self.log.write(text + "\n")
            self.log.flush()

    def left(self):
        return self.deadline - time.monotonic()

    def exec(self, name, cmd, timeout, env=None, cwd=None):
        """Runs cmd (a list) with a deadline; returns (code, stdout+stderr text, seconds). code None = timed out.
        The command runs in its own process group, killed whole at the deadline (mpirun and its ranks)."""
        timeout = max(1.0, min(timeout, self.left()))
        t0 = time.monotonic()
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=env or self.env, cwd=cwd or REPO, start_new_session=True)
        except OSError as e:
            code, text = 127, str(e)
        else:
            try:
                text, _ = p.communicate(timeout=timeout)
                code = p.returncode
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                text, _ = p.communicate()
                code = None
                text = (text or "") + f"\n[gpu_kit: {name} stopped after {timeout:.0f} s]"
        dt = time.monotonic() - t0
        with self.lock:
            self.log.write(f"\n===== {name} (exit {code}, {dt:.1f} s): {' '.join(cmd)}\n{text}\n")
            self.log.flush()
        return code, text, dt

    def setup(self):
        root = "/tmp/moex-kit-root"
        shutil.rmtree(root, ignore_errors=True)
        debs = sorted(os.listdir(os.path.join(self.kit, "debs")))
        for deb in debs:
            unpack_deb(os.path.join(self.kit, "debs", deb), root)
        usr, lib = root + "/usr", root + "/usr/lib/x86_64-linux-gnu"
        dirs = [lib, lib + "/openmpi/lib", lib + "/openblas-pthread", lib + "/pmix2/lib"]
        found = self.find_cuda_libs()
        dirs += sorted(set(found.values()))
        e = self.env
        e["LD_LIBRARY_PATH"] = ":".join(dirs + [p for p in e.get("LD_LIBRARY_PATH", "").split(":") if p])
        e["PATH"] = usr + "/bin:" + e.get("PATH", "")
        e.update({"OPAL_PREFIX": usr, "PMIX_PREFIX": lib + "/pmix2",
                  "PMIX_MCA_mca_base_component_path": lib + "/pmix2/lib/pmix",
                  "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                  "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
                  "PYTHONUNBUFFERED": "1", "GTEST_COLOR": "no"})
        self.mpirun = usr + "/bin/orterun"
        self.say(f"kit: {len(debs)} packages unpacked into {root}; CUDA libraries: "
                 + ", ".join(f"{k} in {v}" for k, v in sorted(found.items())))
        missing = [n for n in CUDA_LIBS if n not in found]
        if missing:
            self.say("kit: not found on this machine: " + ", ".join(missing))
        probes = [(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                    "--format=csv,noheader"], self.plain_env), (["nvcc", "--version"], self.plain_env),
                  ([sys.executable, "-c", "import torch; print('torch', torch.__version__)"], self.plain_env),
                  (["sh", "-c", "ldd --version | head -1; grep PRETTY /etc/os-release"], self.plain_env),
                  (["ldd", os.path.join(self.kit, "build/bin/moex-bench-gpu")], self.env),
                  ([self.mpirun, "--version"], self.env)]
        for probe, env in probes:
            code, text, _ = self.exec("probe " + probe[0], probe, 60, env)
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            if probe[0] == "ldd":
                shown = [ln.strip() for ln in lines if "not found" in ln] or ["every library found"]
            elif probe[0] in ("sh", self.mpirun):
                shown = lines[:2]
            else:
                shown = lines[-1:] or ["(no output)"]
            self.say(f"probe {os.path.basename(probe[0])}: exit {code}: " + " | ".join(shown))

    def find_cuda_libs(self):
        found = {}
        try:
            cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        except OSError:
            cache = ""
        for name in CUDA_LIBS:
            m = re.search(r"\s" + re.escape(name) + r" .*=> (\S+)", cache)
            if m:
                found[name] = os.path.dirname(m.group(1))
        roots = ["/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/local/cuda/targets/x86_64-linux/lib"]
        try:
            import site
            roots += [os.path.join(p, "nvidia") for p in site.getsitepackages()]
        except Exception:
            pass
        roots += ["/usr/local", "/opt", "/usr/lib"]
        for name in CUDA_LIBS:
            for r in roots:
                if name in found or not os.path.isdir(r):
                    continue
                for d, subdirs, files in os.walk(r):
                    if d.count(os.sep) - r.count(os.sep) > 6:
                        subdirs[:] = []
                    if name in files:
                        found[name] = d
                        break
        return found

    def subst(self, s):
        return (s.replace("@BUILD@", os.path.join(self.kit, "build")).replace("@SOURCE@", REPO)
                .replace("@MPIRUN@", self.mpirun).replace("@PYTHON@", sys.executable))

    def run_test(self, t):
        if self.left() < 5:
            return t["name"], "not run (budget)", 0.0
        env = dict(self.env)
        for kv in t["env"]:
            k, _, v = self.subst(kv).partition("=")
            env[k] = v
        cwd = self.subst(t["cwd"])
        os.makedirs(cwd, exist_ok=True)
        code, text, dt = self.exec("test " + t["name"], [self.subst(x) for x in t["command"]], t["timeout"], env, cwd)
        if code is None:
            status = "timeout"
        elif code == 0:
            status = "passed"
        elif t["skip_code"] is not None and code == t["skip_code"]:
            status = "skipped"
        else:
            status = f"failed ({code})"
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        skips = len(set(re.findall(r"\[  SKIPPED \] (\w+\.\w+)", text)))
        if status == "passed" and skips:
            status = f"passed, {skips} skipped"
        self.say(f"test {t['name']:32s} {status:24s} {dt:6.1f} s")
        return t["name"], status, dt

    def tests(self):
        tests = json.load(open(os.path.join(self.kit, "tests.json")))["tests"]
        if self.a.tests:
            tests = [t for t in tests if re.search(self.a.tests, t["name"])]
        # Largest first, so the long float64-reference checks start at once.
        tests.sort(key=lambda t: -t["timeout"])
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.a.jobs) as pool:
            for name, status, dt in pool.map(self.run_test, tests):
                self.results["tests"][name] = {"status": status, "seconds": round(dt, 1)}

    def step(self, name, cmd, timeout, json_lines=True, env=None):
        if self.left() < 10:
            self.say(f"step {name}: not run (budget spent)")
            self.results["steps"][name] = {"status": "not run (budget)"}
            return []
        code, text, dt = self.exec(name, cmd, timeout, env)
        rows = []
        for line in text.splitlines():
            if json_lines and line.startswith("{"):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                row["step"] = name
                rows.append(row)
                self.bench.write(json.dumps(row) + "\n")
        self.bench.flush()
        status = "ok" if code == 0 else "timeout" if code is None else f"failed ({code})"
        said = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("---")]
        errors = [ln for ln in said if "error" in ln.lower()]
        tail = (errors[:1] if code != 0 and errors else said[-1:]) or [""]
        self.say(f"step {name:28s} {status:12s} {dt:6.1f} s  {tail[0][:150]}")
        self.results["steps"][name] = {"status": status, "seconds": round(dt, 1), "rows": len(rows)}
        return rows

    def benches(self):
        b = os.path.join(self.kit, "build", "bin")
        mpi = [self.mpirun, "-np"]
        gpu = self.step("moex-bench-gpu", [os.path.join(b, "moex-bench-gpu"), "--json"], 240)
        torch_cmd = [sys.executable, "examples/torch_moe_bench.py"]
        self.step("torch --check", torch_cmd + ["--check"], 120, False, self.plain_env)
        torch = self.step("torch bench", torch_cmd, 180, True, self.plain_env)
        layer = []
        shape = ["--hidden", "2048", "--ffn", "1408", "--experts", "64", "--topk", "6", "--shared", "2",
                 "--groups", "1", "--topk-group", "1", "--tokens-per-rank", "4096", "--iters", "10", "--json"]
        # Schedules: whole chunks; at 2 ranks also local-first (the own rows skip the exchange) and
        # local-split (half of them hide the last return).
        schedules = [("c1", ["--chunks", "1"]), ("c4", ["--chunks", "4"]), ("auto", ["--chunks", "auto"])]
        own = [("c1 local-first", ["--chunks", "1", "--local-first", "on"]),
               ("c2 local-split", ["--chunks", "2", "--local-first", "split"])]
        for np_, comm in (("1", "nccl"), ("2", "staged")):
            for name, sched in schedules + (own if np_ != "1" else []):
                layer += self.step(f"bench layer np{np_} {comm} {name}",
                                   mpi + [np_, os.path.join(b, "moex-bench"), "layer", "--device", "cuda",
                                          "--device-comm", comm] + sched + shape, 120)
        # The exchange alone with device buffers: 2 ranks share the GPU over the staged path.
        self.step("bench exchange np2 staged", mpi + ["2", os.path.join(b, "moex-bench"), "exchange", "--device", "cuda",
                                                      "--device-comm", "staged", "--iters", "10", "--json"], 120)
        train = {}
        for dev in ("cpu", "cuda"):
            log = os.path.join(self.out, f"train_{dev}.jsonl")
            extra = ["--device", "cuda", "--device-comm", "nccl"] if dev == "cuda" else []
            self.step(f"train {dev}", mpi + ["1", os.path.join(b, "moex-train"), "--steps", "200", "--log-every",
                                             "50", "--log-json", log] + extra, 180, False)
            if os.path.exists(log):
                train[dev] = [json.loads(ln) for ln in open(log) if ln.strip()]
        self.summarise(gpu, torch, layer, train)

    def summarise(self, gpu, torch, layer, train):
        s = {}
        # The issue's ratio: expert GEMMs' TFLOP/s over one dense GEMM of the same FLOPs, per GEMM and for
        # the whole FFN (ffn_fwd, ffn_bwd), through cublasGemmGroupedBatchedEx ("grouped") and a loop.
        grouped = [r for r in gpu if r.get("case") in ("grouped_gemm", "grouped_ffn")]
        if grouped:
            s["gemm_ratio"] = {f"{r['gemm']}/{r['impl']}": round(r["ratio"], 3) for r in grouped}
        perm = [r for r in gpu if r.get("case") == "permute+combine"]
        if perm:
            s["permute_combine_ratio"] = {r["dtype"]: round(r["ratio"], 3) for r in perm}
        mine = [r for r in gpu if r.get("case") == "layer"]
        theirs = [r for r in torch if r.get("bench") == "torch"]
        if mine and theirs:
            fastest = min(theirs, key=lambda r: r["ms_fwd_bwd"])
            s["layer_vs_torch"] = {"moex_ms": round(mine[0]["ms_fwd_bwd"], 3),
                                   "torch": {f"{r['variant']}({r['impl']})": round(r["ms_fwd_bwd"], 3) for r in theirs},
                                   "speedup_vs_fastest": round(fastest["ms_fwd_bwd"] / mine[0]["ms_fwd_bwd"], 3)}
        if layer:
            s["layer_chunks"] = {r["step"]: round(r["ms_step"], 3) for r in layer if "ms_step" in r}
        if len(train) == 2 and train["cpu"] and train["cuda"]:
            pairs = list(zip(train["cpu"], train["cuda"]))
            s["train"] = {"steps": len(pairs), "loss_cpu": train["cpu"][-1]["loss"],
                          "loss_cuda": train["cuda"][-1]["loss"],
                          "max_rel_diff": max(abs(b["loss"] - c["loss"]) / abs(c["loss"]) for c, b in pairs),
                          "ms_step_cpu": statistics.median(r["ms"] for r in train["cpu"]),
                          "ms_step_cuda": statistics.median(r["ms"] for r in train["cuda"])}
        self.results["summary"] = s

    def finish(self):
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(self.results, f, indent=1)
        counts = {}
        for r in self.results["tests"].values():
            key = r["status"].split(" ")[0].rstrip(",")
            counts[key] = counts.get(key, 0) + 1
        self.say("\n==== summary (" + os.path.join(self.out, "summary.json") + ")")
        self.say("tests: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for name, r in sorted(self.results["tests"].items()):
            if not r["status"].startswith("passed"):
                self.say(f"  {name}: {r['status']}")
        for k, v in self.results.get("summary", {}).items():
            self.say(f"{k}: {json.dumps(v)}")
        self.say(f"time used: {self.a.budget - self.left():.0f} s of {self.a.budget:.0f} s")


def run(a):
    r = Runner(a)
    try:
        r.setup()
        if "tests" in a.parts:
            # The tests get at most --tests-budget of the whole, so that a hanging test (each has its own
            # timeout, up to 900 s) cannot leave the benchmarks nothing.
            end = r.deadline
            if "bench" in a.parts and a.tests_budget > 0:
                r.deadline = min(end, time.monotonic() + a.tests_budget)
            r.tests()
            r.deadline = end
        if "bench" in a.parts:
            r.benches()
    finally:
        r.finish()
    failed = [n for n, t in r.results["tests"].items() if not t["status"].startswith(("passed", "skipped"))]
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description="Build the GPU kit here (pack) or run it on a GPU machine (run).")
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="build build-gpu and write the kit")
    p.add_argument("--kit", default=os.path.join(REPO, ".gpu-kit"))
    p.add_argument("--build", default=os.path.join(REPO, "build-gpu"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    r = sub.add_parser("run", help="on the GPU machine: tests, then benchmarks, within --budget seconds")
    r.add_argument("--kit", default=os.path.join(REPO, ".gpu-kit"))
    r.add_argument("--out", default=os.environ.get("OUT", "/tmp/moex-gpu-out"))
    r.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    r.add_argument("--tests-budget", type=float, default=0,
                   help="seconds at most for the tests when the benchmarks follow (default 0: no cap)")
    r.add_argument("--jobs", type=int, default=4, help="tests at a time (they share the GPU)")
    r.add_argument("--tests", default="", help="regex: only the tests whose names match")
    r.add_argument("--parts", default="tests,bench", help="tests, bench, or both (default)")
    a = ap.parse_args()
    return pack(a) if a.verb == "pack" else run(a)


if __name__ == "__main__":
    sys.exit(main() or 0)
