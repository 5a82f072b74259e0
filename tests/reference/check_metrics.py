#!/usr/bin/env python3
"""moex-train --metrics-port: the Prometheus endpoint, checked as a cluster's scraper and a hostile
client would use it.

1. Nothing listens unless asked: without --metrics-port no rank process holds a listening socket
   (Open MPI's TCP transport is switched off for the test, so any listener would be moex's); with it,
   rank 0 holds exactly one, on 127.0.0.1 at the printed port, and the other ranks none.
2. 1,000 scrapes during training, each parsed by prometheus_client's text parser: every one succeeds,
   `moex_step` never goes back, counters never decrease, and the values agree with the training log
   (the loss of the scraped step exactly, tokens, per-layer expert loads summing to tokens x top-K,
   Jain's index recomputed from them).
3. Bad requests while training: POST, HEAD, an unknown path, garbage, a wrong HTTP version, control
   bytes, an oversized head, a slow (byte-by-byte) and a silent client, and more connections than the
   limit: each gets its 4xx/5xx answer (or, for the oversized head, is cut off and counted) within the
   deadline, and a good scrape works right after.
4. Training is not affected: the per-step losses of the run with metrics (and all the above) equal
   bitwise those of the same run without metrics.
5. Errors: a port in use, a bad address, a port out of range and --metrics-bind without a port end the
   run on every rank with a message naming the problem.
The run with metrics is stopped with SIGTERM to every rank once the checks are done (the clean-stop
path, with the server shutting down).
"""
import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_checkpoint import rank_pids  # noqa: E402

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("SKIPPED: needs prometheus_client's parser (apt-get install python3-prometheus-client)")
    sys.exit(77)

DEADLINE_S = 2.0  # MetricsServerOptions::request_deadline


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def env():
    e = dict(os.environ)
    e["OMPI_MCA_btl"] = "self,vader"  # no TCP transport: any listening socket of a rank is moex's
    e["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    return e


def train_cmd(args, marker, extra):
    return [args.mpirun, "-np", str(args.ranks), args.train, "--steps", str(args.steps), "--log-every", "1000000",
            "--seed", marker] + extra


def listeners(pid):
    """(address, port) of the TCP sockets process `pid` listens on."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.match(r"socket:\[(\d+)\]", t)
            if m:
                inodes.add(m.group(1))
    except OSError:
        return []
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:
                continue
            addr, port = f[1].split(":")
            if v6:
                # four 32-bit words, each in host (little-endian) order
                a = socket.inet_ntop(socket.AF_INET6,
                                     b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8)))
            else:
                a = socket.inet_ntoa(bytes.fromhex(addr)[::-1])
            out.append((a, int(port, 16)))
    return out


def wait_for_ranks(marker, n, proc, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        pids = rank_pids(marker)
        if len(pids) == n:
            return pids
        if proc.poll() is not None:
            fail(f"the run ended before its {n} ranks were seen: {proc.stdout.read()}")
        time.sleep(0.05)
    fail(f"{n} rank processes with marker {marker} did not appear within {timeout} s")


def losses(path):
    out = {}
    for line in open(path):
        j = json.loads(line)
        if "step" in j:
            out[j["step"]] = j["loss"]
    return out


def raw(port, data, read=True, timeout=DEADLINE_S * 4):
    """Sends `data` on a fresh connection and returns what comes back (b"" on a reset)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if data:
            s.sendall(data)
        if not read:
            return s
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)
    finally:
        if read:
            s.close()


def status_of(reply):
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", reply)
    return int(m.group(1)) if m else None


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE_S * 4) as r:
        if r.status != 200:
            fail(f"scrape answered {r.status}")
        ctype = r.headers.get("Content-Type", "")
        if not ctype.startswith("text/plain; version=0.0.4"):
            fail(f"Content-Type {ctype!r}: expected Prometheus text format 0.0.4")
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
    if key not in samples:
        fail(f"scrape has no {name}{labels}")
    return samples[key]


def check_values(samples, logged, ranks, tokens_per_rank, top_k):
    step = int(value(samples, "moex_step"))
    if step < 1:
        return step
    if step not in logged:
        fail(f"scraped step {step} is not in the training log")
    if value(samples, "moex_loss") != logged[step]:
        fail(f"step {step}: scraped loss {value(samples, 'moex_loss')!r} != logged {logged[step]!r}")
    if value(samples, "moex_tokens_total") != step * tokens_per_rank * ranks:
        fail(f"step {step}: moex_tokens_total {value(samples, 'moex_tokens_total')} != {step * tokens_per_rank * ranks}")
    layers = sorted({dict(k[1])["layer"] for k in samples if k[0] == "moex_layer_expert_load"})
    if not layers:
        fail("no moex_layer_expert_load samples")
    for layer in layers:
        load = [v for k, v in sorted(samples.items(), key=lambda kv: int(dict(kv[0][1]).get("expert", -1)))
                if k[0] == "moex_layer_expert_load" and dict(k[1])["layer"] == layer]
        if sum(load) != tokens_per_rank * ranks * top_k:
            fail(f"layer {layer}: expert loads sum to {sum(load)}, expected tokens x top-K = "
                 f"{tokens_per_rank * ranks * top_k}")
        jain = sum(load) ** 2 / (len(load) * sum(v * v for v in load))
        got = value(samples, "moex_layer_jain_index", layer=layer)
        if abs(got - jain) > 1e-12:
            fail(f"layer {layer}: jain index {got} != {jain} recomputed from the loads")
    for p in range(ranks):
        if not value(samples, "moex_step_seconds", rank=p) > 0:
            fail(f"moex_step_seconds of rank {p} is not positive")
        if value(samples, "moex_layer_stage_seconds_total", rank=p, layer=0, stage="experts") <= 0:
            fail(f"rank {p}: no expert time counted")
    return step


def bad_requests(port):
    """Each bad request, its expected status (None: cut off, only counted) and the counter code."""
    cases = [
        ("POST", b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 405),
        ("HEAD", b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ("unknown path", b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("garbage", b"garbage\r\n\r\n", 400),
        ("HTTP/9.9", b"GET /metrics HTTP/9.9\r\n\r\n", 400),
        ("control bytes", b"GET /met\x00rics HTTP/1.1\r\n\r\n", 400),
        ("two spaces", b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
    ]
    for name, data, want in cases:
        t0 = time.time()
        got = status_of(raw(port, data))
        if got != want:
            fail(f"{name}: answered {got}, expected {want}")
        print(f"  {name}: {got} in {1e3 * (time.time() - t0):.1f} ms")
    # An oversized head (over 8 KiB): 431, or cut off when the reset overtakes the answer.
    reply = raw(port, b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"a" * 100000 + b"\r\n\r\n")
    if reply and status_of(reply) != 431:
        fail(f"oversized head: answered {status_of(reply)}, expected 431 or a closed connection")
    print(f"  oversized head (100 kB): {status_of(reply) or 'closed'}")
    # A slow client, one byte every 0.25 s: answered 408 at the deadline.
    s = raw(port, b"GET /met", read=False)
    t0 = time.time()
    got = b""
    try:
        for c in b"rics HTTP/1.1\r\nHost: x\r\n\r\n":
            time.sleep(0.25)
            s.sendall(bytes([c]))
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while True:
            c = s.recv(4096)
            if not c:
                break
            got += c
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    took = time.time() - t0
    if status_of(got) != 408 or not (DEADLINE_S * 0.9 <= took <= DEADLINE_S + 3):
        fail(f"slow client: answered {status_of(got)} after {took:.2f} s, expected 408 at about {DEADLINE_S} s")
    print(f"  slow client: 408 after {took:.2f} s")
    # A silent client: 408 at the deadline.
    t0 = time.time()
    got = raw(port, b"")
    took = time.time() - t0
    if status_of(got) != 408 or took > DEADLINE_S + 3:
        fail(f"silent client: answered {status_of(got)} after {took:.2f} s, expected 408 at {DEADLINE_S} s")
    print(f"  silent client: 408 after {took:.2f} s")
    # More connections than the limit (16): the extra ones get 503 at once; all close by the deadline.
    held = [raw(port, b"", read=False) for _ in range(40)]
    time.sleep(0.3)
    codes = []
    for s in held:
        s.settimeout(DEADLINE_S + 3)
        data = b""
        try:
            while True:
                c = s.recv(4096)
                if not c:
                    break
                data += c
        except (ConnectionResetError, socket.timeout):
            pass
        s.close()
        codes.append(status_of(data))
    if codes.count(503) < 40 - 16 or codes.count(408) + codes.count(503) != 40:
        fail(f"40 idle connections: answers {codes}; expected 24 or more 503 and the rest 408")
    print(f"  40 idle connections: {codes.count(503)} x 503, {codes.count(408)} x 408")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--mpirun", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--scrapes", type=int, default=1000)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    tokens_per_rank, top_k = 256, 4  # moex-train's defaults (built-in model: top-4)

    # The run with metrics, scraped and attacked while it trains, then stopped with SIGTERM.
    log_m = os.path.join(args.workdir, "metrics.jsonl")
    marker = "7"
    proc = subprocess.Popen(train_cmd(args, marker, ["--metrics-port", "0", "--log-json", log_m]), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    t0 = time.time()
    port = None
    while port is None and time.time() - t0 < 60:
        for line in list(lines):
            m = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", line)
            if m:
                port = int(m.group(1))
        if proc.poll() is not None:
            fail("moex-train ended before serving metrics:\n" + "".join(lines))
        time.sleep(0.05)
    if port is None:
        fail("moex-train did not print 'metrics at http://127.0.0.1:PORT/metrics' within 60 s")
    pids = wait_for_ranks(marker, args.ranks, proc)
    held = {r: listeners(p) for r, p in pids.items()}
    if held[0] != [("127.0.0.1", port)] or any(held[r] for r in held if r != 0):
        fail(f"listening sockets by rank {held}: expected rank 0 on 127.0.0.1:{port} only")
    print(f"listening: rank 0 on 127.0.0.1:{port} only")

    last_step, last = 0, None
    t0 = time.time()
    for i in range(args.scrapes):
        samples = scrape(port)
        step = int(value(samples, "moex_step"))
        if step < last_step:
            fail(f"scrape {i}: moex_step went back from {last_step} to {step}")
        if last is not None:
            for k, v in samples.items():
                if k[0].endswith("_total") and k in last and v < last[k]:
                    fail(f"scrape {i}: counter {k} decreased from {last[k]} to {v}")
        last_step, last = step, samples
    took = time.time() - t0
    print(f"{args.scrapes} scrapes in {took:.2f} s ({1e3 * took / args.scrapes:.2f} ms each), steps up to {last_step}")
    if proc.poll() is not None:
        fail(f"training ended during the scrapes (at step {last_step}): raise --steps")
    if last_step < 2:
        fail("training made no progress during the scrapes")

    print("bad requests while training:")
    before = int(value(scrape(port), "moex_step"))
    bad_requests(port)
    after_samples = scrape(port)
    after = int(value(after_samples, "moex_step"))
    if after <= before:
        fail(f"training did not go on during the bad requests (step {before} -> {after})")
    for code, least in (("4xx", 7), ("408", 2 + 16), ("503", 24)):
        got = value(after_samples, "moex_metrics_requests_total", code=code)
        if got < least:
            fail(f"moex_metrics_requests_total{{code={code}}} = {got}, expected >= {least}")
    big = value(after_samples, "moex_metrics_requests_total", code="431")
    if big != 1:
        fail(f"moex_metrics_requests_total{{code=431}} = {big}, expected 1 (the oversized head)")
    print(f"training went on: step {before} -> {after}; a good scrape works after them")
    if subprocess.run(["curl", "--version"], capture_output=True).returncode == 0:
        c = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True)
        if c.returncode != 0 or "moex_loss " not in c.stdout:
            fail(f"curl scrape failed (rc {c.returncode})")
        print("curl scrape: ok")

    for p in pids.values():
        os.kill(p, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("the run did not stop within 60 s of SIGTERM")
    reader.join(timeout=5)
    if proc.returncode != 0:
        fail(f"SIGTERM: exit {proc.returncode}, expected a clean stop:\n" + "".join(lines[-20:]))
    logged = losses(log_m)
    stopped = max(logged)
    check_values(last, logged, args.ranks, tokens_per_rank, top_k)
    check_values(after_samples, logged, args.ranks, tokens_per_rank, top_k)
    print(f"stopped cleanly at step {stopped}; scraped values agree with the log")
    try:
        raw(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        fail(f"port {port} still answers after the run ended")
    except OSError:
        pass

    # The same run without metrics, to the same step: bitwise the same losses; nothing listens.
    log_b = os.path.join(args.workdir, "base.jsonl")
    cmd = train_cmd(args, marker, ["--log-json", log_b])
    cmd[cmd.index("--steps") + 1] = str(stopped)
    base = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = wait_for_ranks(marker, args.ranks, base)
    time.sleep(0.5)
    held = {r: listeners(p) for r, p in pids.items()}
    out = base.communicate(timeout=600)[0]
    if base.returncode != 0:
        fail("run without metrics failed:\n" + out)
    if any(held.values()):
        fail(f"without --metrics-port the ranks listen on {held}: expected nothing")
    print("without --metrics-port: no rank listens")
    lb = losses(log_b)
    if lb != logged:
        diff = [s for s in logged if lb.get(s) != logged[s]]
        fail(f"losses with metrics differ from those without at steps {diff[:5]}")
    print(f"losses of {len(lb)} steps bitwise equal with and without the endpoint")

    # Errors on every rank.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    for flags, want in ((["--metrics-port", str(busy)], "in use"),
                        (["--metrics-port", "0", "--metrics-bind", "999.1.2.3"], "not an IPv4 or IPv6 address"),
                        (["--metrics-port", "70000"], "expected a TCP port"),
                        (["--metrics-bind", "127.0.0.1"], "--metrics-bind needs --metrics-port")):
        cmd = train_cmd(args, marker, flags)
        cmd[cmd.index("--steps") + 1] = "3"
        t0 = time.time()
        r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
        text = r.stdout + r.stderr
        if r.returncode == 0 or text.count(want) < args.ranks:
            fail(f"{flags}: rc {r.returncode}, expected a failure with '{want}' from all {args.ranks} ranks:\n{text}")
        print(f"{' '.join(flags)}: every rank says '{want}' (rc {r.returncode}, {time.time() - t0:.1f} s)")
    blocker.close()
    print("OK")


if __name__ == "__main__":
    main()
