#!/usr/bin/python3
"""Mutation sweep over moex-train's flags, config and checkpoints and moex-layer's inputs.

Builds valid inputs once (a layer case with config, weights and input; a sharded FP8 layer
checkpoint; a tiny training config; a 2-rank training checkpoint), then runs the tools on N
mutated variants of them (seeded, reproducible): hostile flag values, missing or repeated flags,
JSON edited structurally and as text, safetensors headers and bytes edited, NaN and Inf in
tensors, damaged checkpoints with and without their checksums fixed up, paths that are folders,
FIFOs or absent. About one case in five runs under `mpirun -np 2`.

Every case must end in one of:
  accepted  exit 0 (only where the mutation may be valid),
  rejected  non-zero exit with a `moex-train: error:` / `moex-layer: error:` line,
and never with a signal, a sanitizer report, a hang (killed after --timeout), a non-zero exit
without a moex error, an error that is a bare library message, or a process left behind.
Under AddressSanitizer a huge allocation is fatal instead of std::bad_alloc; such cases are run
again on --release-bin (address space capped) and must give moex's out-of-memory error there.

Usage: scripts/mutate.py --bin build-asan/bin [--cases 3200] [--jobs 2] [--seed 1]
                         [--release-bin build/bin] [--workdir DIR] [--report out.json]
Exit status 0 when every case ended well.
"""
import argparse
import concurrent.futures as cf
import copy
import json
import os
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import check_layer  # noqa: E402  (the layer cases and their writers)

ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MOEX_KEEP_BLAS_CORETYPE": "1",
    "MOEX_TIMEOUT_S": "20",
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
SANITIZER = re.compile(r"ERROR: AddressSanitizer|runtime error:|UndefinedBehaviorSanitizer|"
                       r"ERROR: LeakSanitizer|ThreadSanitizer")
ASAN_OOM = re.compile(r"AddressSanitizer: (requested allocation size|allocation-size-too-big|"
                      r"out of memory|allocator is out of memory)")
MOEX_ERROR = re.compile(r"^moex-(train|layer): error: (.*)$", re.M)
# An error that is only a library's own text tells the user nothing about what to fix.
BARE = re.compile(r"^(\[rank \d+\] )?(\[json\.exception|basic_string|vector::|stoi|stol|stod|stoul|"
                  r"map::at|unordered_map::at|bad_optional|std::|filesystem error)")
SIGNAL_WORDS = re.compile(r"exited on signal|Segmentation fault|Aborted \(core|terminate called|"
                          r"core dumped|Bus error")

# --------------------------------------------------------------------------------------------------
# value pools
# --------------------------------------------------------------------------------------------------
INT_BAD = ["-1", "0", "-0", "2147483648", "-2147483649", "9223372036854775808", "99999999999999999999",
           "1e3", "1.5", "0x10", "abc", "", " 2", "2 ", "+2", "nan", "inf", "-inf", "1e308", "2a", "--", "٣"]
INT_OK = ["1", "2", "3", "4", "7", "16"]
FLOAT_BAD = ["-1", "0", "-0", "1e-300", "1e300", "1e10", "1e12", "0.0001", "nan", "NaN", "inf", "-inf",
             "abc", "", "1e", "0x1p3", "1,5", "5e-324", "1.7976931348623157e309"]
FLOAT_OK = ["0.001", "0.01", "0.5", "1", "2", "10", "11", "1e-5"]
ENUM_POOL = ["on", "off", "auto", "ON", "yes", "1", "0", "", "maybe", "flat", "hierarchical", "cpu", "cuda",
             "nccl", "staged", "split", "bf16", "fp32", "fp16", "-1"]
LONG = "x" * 5000

# moex-train: flag -> kind. Work-scaling flags draw from pools without valid huge values, so that no
# valid case runs for minutes.
TRAIN_FLAGS = {
    "--steps": "work", "--seed": "int", "--tokens-per-rank": "work", "--layers": "work", "--lr": "float",
    "--weight-decay": "float", "--bias-update-speed": "float", "--aux-seq-alpha": "float",
    "--aux-expert-alpha": "float", "--seq-len": "int", "--replicas": "enum", "--spare-slots": "int",
    "--rebalance-interval": "int", "--rebalance-lag": "int", "--skew": "float", "--save-every": "int",
    "--keep": "int", "--eval-tokens": "work", "--eval-every": "int", "--log-every": "int",
    "--metrics-port": "port", "--metrics-bind": "bind", "--timeout": "float", "--chunks": "chunks",
    "--local-first": "enum", "--overlap": "enum", "--exchange": "enum", "--deterministic": "enum",
    "--capacity-factor": "float", "--device": "enum", "--device-comm": "enum", "--precision": "enum",
    "--save": "outdir", "--resume": "inpath", "--init-from": "inpath", "--config": "inpath",
    "--log-json": "outfile", "--eval-routes": "outfile", "--trace": "outfile",
}
LAYER_FLAGS = {
    "--prefix": "prefix", "--layer": "int", "--replicas": "enum", "--timeout": "float", "--device": "enum",
    "--device-comm": "enum", "--precision": "enum", "--chunks": "chunks", "--local-first": "enum",
    "--overlap": "enum", "--exchange": "enum", "--deterministic": "enum", "--capacity-factor": "float",
    "--trace": "outfile", "--output": "outfile", "--config": "inpath", "--weights": "inpath",
    "--input": "inpath",
}


def flag_value(rng, kind, fx, tmp):
    if kind == "work":
        return rng.choice(INT_BAD + INT_OK) if rng.random() < 0.7 else rng.choice(["1", "2", "3"])
    if kind == "int":
        return rng.choice(INT_BAD + INT_OK + ["100000", "2147483647"])
    if kind == "float":
        return rng.choice(FLOAT_BAD + FLOAT_OK)
    if kind == "enum":
        return rng.choice(ENUM_POOL)
    if kind == "chunks":
        return rng.choice(["auto", "AUTO", "0", "1", "2", "3", "17", "64", "-1", "1000000", "abc", "", "1.5"])
    if kind == "port":
        return rng.choice(["0", "1", "-1", "65535", "65536", "70000", "abc", "", "99999999999999999999"])
    if kind == "bind":  # never an address beyond loopback that could be reached from outside
        return rng.choice(["127.0.0.1", "::1", "localhost", "999.1.1.1", "", "abc", "127.0.0.1:80",
                           "192.0.2.1", "256.0.0.1", LONG])
    if kind == "prefix":
        return rng.choice(["", "model.layers.0.mlp.", "model.layers.0.mlp", "model.layers.9.mlp.", ".", LONG,
                           "model.layers.0.mlp.experts.0.", "\u00e9", "model.layers.-1.mlp."])
    return path_value(rng, kind, fx, tmp)


def path_value(rng, kind, fx, tmp):
    choices = [os.path.join(tmp, "absent", "x"), "", "/", "/dev/null", tmp, fx["junk"], fx["fifo"],
               fx["empty"], os.path.join(tmp, LONG[:300]), os.path.join(tmp, "a\nb")]
    if kind == "inpath":
        choices += [fx["layer"]["config"], fx["layer"]["weights"], fx["ckpt"], fx["fp8"], fx["train_config"],
                    fx["loop"]]
    else:  # outputs never point into the fixtures, which later cases read
        existing = os.path.join(tmp, "existing.json")
        shutil.copy(fx["junk"], existing)
        choices = [c for c in choices if c not in (fx["junk"], fx["empty"], "/")]  # nothing written to /
        choices += [os.path.join(tmp, "out"), existing]
    return rng.choice(choices)


# --------------------------------------------------------------------------------------------------
# file mutators
# --------------------------------------------------------------------------------------------------
def hostile_json_value(rng, depth=0):
    r = rng.random()
    if r < 0.12:
        return None
    if r < 0.24:
        return rng.choice([True, False])
    if r < 0.5:
        return rng.choice([-1, 0, 1, 2, 3, 7, 64, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30, 16, 1000000])
    if r < 0.66:
        return rng.choice([0.5, -0.0, 1e-300, 1e300, 2.5, -3.5, 1e-6])
    if r < 0.8:
        return rng.choice(["", "abc", "deepseek_v3", "sigmoid", "softmax", "noaux_tc", "greedy", "8", LONG])
    if r < 0.9 or depth > 2:
        return [hostile_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"k": hostile_json_value(rng, depth + 1)}


def deep_nest(rng):
    n = rng.choice([100, 1000, 100000])
    return ("[" * n + "1" + "]" * n) if rng.random() < 0.5 else ('{"a":' * n + "1" + "}" * n)


def mutate_json_text(rng, text, keys_hint=()):
    """A JSON document edited structurally (a key removed, retyped, renamed, added, nested deep) or
    as text (a byte flipped, cut, a character inserted). Returns (text, may_be_valid)."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    r = rng.random()
    if isinstance(doc, dict) and r < 0.7:
        doc = copy.deepcopy(doc)
        keys = list(doc) or ["x"]
        k = rng.choice(keys + list(keys_hint))
        op = rng.choice(["del", "set", "set", "set", "near", "unknown", "nest", "dup", "wrap"])
        if op == "del":
            doc.pop(k, None)
            return json.dumps(doc), True
        if op == "set":
            doc[k] = hostile_json_value(rng)
            return json.dumps(doc), True
        if op == "near":
            if k in doc and len(k) > 2:
                v = doc.pop(k)
                i = rng.randrange(len(k))
                doc[k[:i] + k[i + 1:]] = v
            return json.dumps(doc), True
        if op == "unknown":
            doc["x_" + rng.choice(["a", "lora", "attn"])] = hostile_json_value(rng)
            return json.dumps(doc), True
        if op == "nest":
            body = json.dumps(doc)
            return body[:-1] + (", " if len(doc) else "") + json.dumps(k) + ": " + deep_nest(rng) + "}", False
        if op == "dup":
            body = json.dumps(doc)
            return body[:-1] + (", " if len(doc) else "") + json.dumps(k) + ": " + \
                json.dumps(hostile_json_value(rng)) + "}", True
        return json.dumps([doc]), False
    b = bytearray(text.encode())
    op = rng.choice(["flip", "cut", "insert", "empty", "nan", "bom"])
    if op == "flip" and b:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif op == "cut":
        b = b[: rng.randrange(len(b) + 1)]
    elif op == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.choice([b"\x00", b"\xff", b",", b"}", b"[", b"\"", b"NaN", b"1e999"])
    elif op == "empty":
        b = bytearray()
    elif op == "nan":
        return re.sub(r"(\d+\.?\d*)", "NaN", text, count=1), False
    else:
        b = bytearray(b"\xef\xbb\xbf") + b
    return b.decode("utf-8", "replace") if rng.random() < 0.5 else bytes(b), True


def split_safetensors(data):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body, raw_header=None):
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + body


def poison_value(rng):
    return struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf"), 3e38, 1e-45]))


def mutate_safetensors(rng, data):
    """Returns (bytes, must_reject: None = may be valid)."""
    header, body = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    r = rng.random()
    if r < 0.25:  # byte level
        b = bytearray(data)
        op = rng.choice(["cut", "cut", "len", "flip_head", "flip_body", "extend", "len8"])
        if op == "cut":
            return bytes(b[: rng.randrange(len(b))]), True
        if op in ("len", "len8"):
            v = rng.choice([0, 1, 7, len(b), len(b) - 8, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 100 * 2 ** 20 + 1])
            b[:8] = struct.pack("<Q", v)
            return bytes(b), True
        if op == "flip_head":
            n = struct.unpack("<Q", data[:8])[0]
            i = 8 + rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
            return bytes(b), None
        if op == "flip_body" and len(b) > len(data) - len(body):
            i = len(data) - len(body) + rng.randrange(len(body))
            b[i] ^= 1 << rng.randrange(8)
            return bytes(b), None
        return bytes(b) + b"\x00" * rng.choice([1, 8, 4096]), None
    if r < 0.4 and names:  # a poisoned float value
        name = rng.choice(names)
        info = header[name]
        beg, end = info["data_offsets"]
        if info["dtype"] == "F32" and end > beg:
            off = beg + 4 * rng.randrange((end - beg) // 4)
            b = bytearray(body)
            b[off:off + 4] = poison_value(rng)
            return join_safetensors(header, bytes(b)), None  # 3e38 / denormal may be fine
    if r < 0.47:
        return join_safetensors(header, body, deep_nest(rng).encode()), True
    header = copy.deepcopy(header)
    name = rng.choice(names) if names else "x"
    info = header.get(name, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    op = rng.choice(["dtype", "shape", "shape", "offsets", "offsets", "drop", "rename", "extra", "meta",
                     "field", "many"])
    must = True
    if op == "dtype":
        info["dtype"] = rng.choice(["F64", "F16", "BF16", "I32", "U8", "F8_E4M3", "F8_E5M2", "BOOL", "f32", "",
                                    7, None])
    elif op == "shape":
        info["shape"] = rng.choice([[], [0], [-1], [2 ** 62, 2 ** 62], [1, 2, 3, 4], [2 ** 63], ["4"], None, 5,
                                    list(reversed(info.get("shape", [])))])
        must = None
    elif op == "offsets":
        b0, e0 = info.get("data_offsets", [0, 0])
        info["data_offsets"] = rng.choice([[e0, b0], [b0, e0 + 4], [b0 - 4, e0 - 4], [0, 2 ** 64 - 1],
                                           [-1, e0], [b0], [b0, e0, 0], None, [b0 + 1, e0 + 1], [0, e0 - b0]])
        must = None
    elif op == "drop":
        header.pop(name, None)
        must = None
    elif op == "rename":
        header[name + rng.choice(["x", "", ".weight", "\u0000"])] = header.pop(name, info)
        must = None
    elif op == "extra":
        header[rng.choice(["zzz", "model.layers.0.mlp.experts.999.up_proj.weight", ""])] = dict(info)
        must = None
    elif op == "meta":
        header["__metadata__"] = rng.choice([{"format": 5}, [1], None, {"a": {"b": 1}}, "x", {"format": LONG}])
        must = None
    elif op == "field":
        info[rng.choice(["dtype", "shape", "data_offsets", "extra"])] = hostile_json_value(rng)
        must = None
    else:  # many tiny tensors: the parser must stay linear
        for i in range(rng.choice([1000, 20000])):
            header[f"t{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        must = None
    if name in header or op == "dtype" or op in ("shape", "offsets", "field"):
        header[name] = info
    return join_safetensors(header, body), must


# --------------------------------------------------------------------------------------------------
# checkpoint checksums (FNV-1a 64 over little-endian 64-bit words, as runtime/io/checkpoint_files.cpp)
# --------------------------------------------------------------------------------------------------
def fnv1a64w(data):
    h, prime, mask = 1469598103934665603, 1099511628211, (1 << 64) - 1
    padded = data + b"\x00" * ((8 - len(data) % 8) % 8)
    for (w,) in struct.iter_unpack("<Q", padded):
        h = ((h ^ w) * prime) & mask
    return "%016x" % (((h ^ len(data)) * prime) & mask)


def fix_checksum(folder, name):
    path = os.path.join(folder, "checksums.json")
    sums = json.load(open(path))
    data = open(os.path.join(folder, name), "rb").read()
    sums[name] = {"bytes": len(data), "fnv1a64w": fnv1a64w(data)}
    with open(path, "w") as f:
        json.dump(sums, f)


# --------------------------------------------------------------------------------------------------
# fixtures and cases
# --------------------------------------------------------------------------------------------------
def run(cmd, timeout, env_extra=None, limit_as=None):
    env = dict(os.environ)
    env.update(ENV)
    env.update(env_extra or {})

    def pre():
        os.setsid()
        if limit_as:
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=pre)
    try:
        out, err = p.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        hung = True
    # the process group must be empty once the command has returned (nothing left behind)
    left = False
    try:
        os.killpg(p.pid, 0)
        time.sleep(0.5)
        os.killpg(p.pid, 0)
        left = True
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return (p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
            time.monotonic() - t0, hung, left)


def make_fixtures(args, work):
    fx = {}
    spec = check_layer.CASES["v3_noaux_bias"]
    paths, _, _ = check_layer.write_case(os.path.join(work, "layer"), "v3_noaux_bias", spec)
    fx["layer"] = dict(paths, prefix=spec["prefix"])
    fp8 = check_layer.CASES["v3_fp8_sharded"]
    p8, _, _ = check_layer.write_case(os.path.join(work, "fp8"), "v3_fp8_sharded", fp8)
    fx["fp8"] = p8["weights"]
    fx["fp8_config"] = p8["config"]
    fx["fp8_input"] = p8["input"]
    train_cfg = {"model_type": "deepseek_v3", "hidden_size": 32, "moe_intermediate_size": 16,
                 "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2,
                 "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
                 "routed_scaling_factor": 2.5, "num_hidden_layers": 2, "rms_norm_eps": 1e-6}
    fx["train_config_doc"] = train_cfg
    fx["train_config"] = os.path.join(work, "train_config.json")
    json.dump(train_cfg, open(fx["train_config"], "w"))
    ck = os.path.join(work, "ckpt")
    code, out, err, _, _, _ = run([args.mpirun, "-np", "2", os.path.join(args.bin, "moex-train"), "--steps", "2",
                                   "--tokens-per-rank", "16", "--save", ck, "--log-every", "100"], 300)
    if code != 0:
        sys.exit(f"mutate: the training checkpoint could not be made (exit {code}):\n{err[-2000:]}")
    fx["ckpt"] = os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())
    fx["junk"] = os.path.join(work, "junk.bin")
    open(fx["junk"], "wb").write(os.urandom(4096))
    fx["empty"] = os.path.join(work, "empty.json")
    open(fx["empty"], "wb").close()
    fx["fifo"] = os.path.join(work, "fifo")
    os.mkfifo(fx["fifo"])
    fx["loop"] = os.path.join(work, "loop")
    os.symlink(fx["loop"], fx["loop"])
    return fx


def layer_base(fx, out, which="plain"):
    if which == "fp8":
        return {"--config": fx["fp8_config"], "--weights": fx["fp8"], "--input": fx["fp8_input"], "--output": out,
                "--layer": "3"}
    L = fx["layer"]
    return {"--config": L["config"], "--weights": L["weights"], "--input": L["input"], "--output": out,
            "--prefix": L["prefix"]}


def flatten(opts, extra_tail=()):
    argv = []
    for k, v in opts.items():
        argv += [k] if v is None else [k, v]
    return argv + list(extra_tail)


def mutate_flags(rng, opts, table, fx, tmp):
    """1-3 flags given hostile values, or a flag syntax error. Returns (argv, must_reject)."""
    opts = dict(opts)
    r = rng.random()
    if r < 0.78:
        for _ in range(rng.choice([1, 1, 2, 3])):
            flag = rng.choice(list(table))
            opts[flag] = flag_value(rng, table[flag], fx, tmp)
        return flatten(opts), None
    op = rng.choice(["missing_value", "unknown", "near", "dup", "equals", "positional", "drop_required"])
    if op == "missing_value":
        flag = rng.choice(list(table))
        opts.pop(flag, None)
        return flatten(opts, [flag]), True
    if op == "unknown":
        return flatten(opts, [rng.choice(["--bogus", "-x", "--", "---steps", "--STEPS"]), "1"]), True
    if op == "near":
        flag = rng.choice(list(table))
        return flatten(opts, [flag[:-1], "1"]), True
    if op == "dup":
        flag = rng.choice(list(table))
        return flatten(opts, [flag, flag_value(rng, table[flag], fx, tmp)]), None
    if op == "equals":  # --flag=value is the same as --flag value
        flag = rng.choice(list(table))
        return flatten(opts, [flag + "=" + flag_value(rng, table[flag], fx, tmp)]), None
    if op == "positional":
        return flatten(opts, ["stray"]), True
    required = [k for k in ("--config", "--weights", "--input", "--output") if k in opts]
    if required:
        opts.pop(rng.choice(required))
        return flatten(opts), True
    return flatten(opts, ["--bogus"]), True


def build_case(i, rng, fx, tmp, binary):
    """Returns (target, argv after the tool, must_reject)."""
    kind = rng.choices(["layer_flags", "layer_config", "layer_weights", "layer_input", "fp8_index", "fp8_shard",
                        "train_flags", "train_config", "train_resume", "train_init"],
                       weights=[12, 10, 12, 6, 5, 7, 22, 8, 12, 6])[0]
    out = os.path.join(tmp, "out.safetensors")
    if kind.startswith("layer") or kind.startswith("fp8"):
        which = "fp8" if kind.startswith("fp8") or rng.random() < 0.15 else "plain"
        opts = layer_base(fx, out, which)
        if rng.random() < 0.5:
            opts["--backward"] = None
        must = None
        if kind == "layer_flags":
            return "moex-layer", kind, *mutate_flags(rng, opts, LAYER_FLAGS, fx, tmp)
        if kind == "layer_config":
            src = opts["--config"]
            text, _ = mutate_json_text(rng, open(src).read(), ("n_routed_experts", "num_experts_per_tok",
                                                                 "hidden_size", "n_group", "topk_group"))
            p = os.path.join(tmp, "config.json")
            open(p, "wb").write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
            opts["--config"] = p
        elif kind in ("layer_weights", "layer_input"):
            key = "--weights" if kind == "layer_weights" else "--input"
            if os.path.isdir(opts[key]):
                opts = layer_base(fx, out, "plain")
            data, must = mutate_safetensors(rng, open(opts[key], "rb").read())
            p = os.path.join(tmp, "m.safetensors")
            open(p, "wb").write(data)
            opts[key] = p
        elif kind.startswith("fp8"):
            opts = layer_base(fx, out, "fp8")
            folder = os.path.join(tmp, "ck")
            shutil.copytree(fx["fp8"], folder)
            opts["--weights"] = folder
            if kind == "fp8_index":
                p = os.path.join(folder, "model.safetensors.index.json")
                doc = json.load(open(p))
                r = rng.random()
                if r < 0.5:
                    wm = doc["weight_map"]
                    k = rng.choice(list(wm))
                    wm[k] = rng.choice(["../../etc/passwd", "/etc/passwd", "absent.safetensors", "", 5, None,
                                        "model.safetensors.index.json", list(wm.values())[0]])
                    open(p, "w").write(json.dumps(doc))
                    must = None
                else:
                    text, _ = mutate_json_text(rng, json.dumps(doc), ("weight_map", "metadata"))
                    open(p, "wb").write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
            else:
                shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
                p = os.path.join(folder, rng.choice(shards))
                data, must = mutate_safetensors(rng, open(p, "rb").read())
                open(p, "wb").write(data)
                if rng.random() < 0.2:
                    os.remove(p)
                    must = True
        return "moex-layer", kind, flatten(opts), must
    opts = {"--steps": "2", "--tokens-per-rank": "16", "--log-every": "100"}
    if kind == "train_flags":
        return "moex-train", kind, *mutate_flags(rng, opts, TRAIN_FLAGS, fx, tmp)
    if kind == "train_config":
        text, _ = mutate_json_text(rng, json.dumps(fx["train_config_doc"]),
                                   ("num_hidden_layers", "n_routed_experts", "hidden_size", "num_experts_per_tok"))
        p = os.path.join(tmp, "config.json")
        open(p, "wb").write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        opts["--config"] = p
        return "moex-train", kind, flatten(opts), None
    # a damaged checkpoint: --resume it, or --init-from its model shards
    folder = os.path.join(tmp, "ck")
    shutil.copytree(fx["ckpt"], folder)
    files = sorted(os.listdir(folder))
    if kind == "train_init":
        files = [f for f in files if f.startswith("model") or f == "config.json"]
    name = rng.choice(files)
    p = os.path.join(folder, name)
    data = open(p, "rb").read()
    must = None
    r = rng.random()
    if r < 0.1:
        os.remove(p)
        must = None if kind == "train_init" and name == "config.json" else True  # --init-from needs only weights
    elif name.endswith(".safetensors"):
        data, must = mutate_safetensors(rng, data)
        open(p, "wb").write(data)
    else:
        text, _ = mutate_json_text(rng, data.decode(), ())
        open(p, "wb").write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    fixed = os.path.exists(p) and name != "checksums.json" and rng.random() < 0.75
    if fixed:
        fix_checksum(folder, name)  # the damage is seen by validation, not only by the checksum
    elif os.path.exists(p) and data != open(fx["ckpt"] + "/" + name, "rb").read():
        must = True if name != "checksums.json" else must
    if kind == "train_init":
        opts["--init-from"] = folder
    else:
        opts["--resume"] = folder
        opts["--steps"] = "3"
    return "moex-train", kind, flatten(opts), must


def classify(code, out, err, hung, left, must):
    if hung:
        return "hang", "killed after the case timeout"
    if left:
        return "left_behind", "a process outlived the command"
    if ASAN_OOM.search(err):
        return "asan_oom", ""
    if SANITIZER.search(err):
        m = SANITIZER.search(err)
        return "sanitizer", err[max(0, m.start() - 200): m.start() + 1500]
    if code < 0 or SIGNAL_WORDS.search(err):
        return "signal", f"exit {code}: " + err[-1500:]
    errors = MOEX_ERROR.findall(err)
    if code == 0:
        if must:
            return "accepted_bad", "exit 0 for an input that must be refused"
        return "accepted", ""
    if code == 77 and "SKIPPED: no CUDA device" in err + out:
        return "skipped", ""
    if not errors:
        return "no_moex_error", f"exit {code}: " + err[-1500:]
    bare = [e for _, e in errors if BARE.match(e)]
    if bare:
        return "bare_error", bare[0][:500]
    return "rejected", errors[0][1][:200]


GOOD = {"accepted", "rejected", "skipped"}


def run_case(args, fx, i):
    rng = random.Random(args.seed * 1_000_003 + i)
    tmp = tempfile.mkdtemp(prefix=f"case{i:05d}-", dir=args.workdir)
    try:
        tool, kind, argv, must = build_case(i, rng, fx, tmp, args.bin)
        ranks = 2 if rng.random() < 0.2 else 1
        exe = os.path.join(args.bin, tool)
        cmd = ([args.mpirun, "-np", "2", exe] if ranks == 2 else [exe]) + argv
        code, out, err, secs, hung, left = run(cmd, args.timeout)
        outcome, detail = classify(code, out, err, hung, left, must)
        for path, is_kind in (("/dev/null", stat.S_ISCHR), (fx["fifo"], stat.S_ISFIFO)):
            if not is_kind(os.lstat(path).st_mode):  # an atomic write renamed a file over it
                outcome, detail = "system_damage", f"{path} was replaced"
        if outcome == "asan_oom" and args.release_bin:
            rel = ([args.mpirun, "-np", "2"] if ranks == 2 else []) + [os.path.join(args.release_bin, tool)] + argv
            code2, out2, err2, _, hung2, left2 = run(rel, args.timeout, limit_as=8 << 30)
            o2, d2 = classify(code2, out2, err2, hung2, left2, must)
            ok_oom = o2 == "rejected" and "out of memory" in err2
            outcome, detail = ("oom_rejected", "") if ok_oom else ("oom_" + o2, d2 or "no out-of-memory error")
        res = dict(case=i, tool=tool, kind=kind, ranks=ranks, outcome=outcome, secs=round(secs, 2), exit=code,
                   detail=detail, cmd=cmd)
        if outcome not in GOOD and outcome != "oom_rejected":
            keep = os.path.join(args.workdir, "failures", f"case{i:05d}")
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(tmp, keep, symlinks=True)
            res["kept"] = keep
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="folder with moex-train and moex-layer (the sanitizer build)")
    ap.add_argument("--release-bin", default="", help="a build without ASan for the out-of-memory cases")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--cases", type=int, default=3200)
    ap.add_argument("--first", type=int, default=0, help="index of the first case (to rerun one: --first I --cases 1)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=90, help="seconds a case may take before it counts as a hang")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--report", default="")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    args.release_bin = os.path.abspath(args.release_bin) if args.release_bin else ""
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="moex-mutate-"))
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.monotonic()
    fx = make_fixtures(args, os.path.join(args.workdir, "fixtures"))
    results = []
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futs = [pool.submit(run_case, args, fx, i) for i in range(args.first, args.first + args.cases)]
        for n, f in enumerate(cf.as_completed(futs), 1):
            r = f.result()
            results.append(r)
            if r["outcome"] not in GOOD and r["outcome"] != "oom_rejected":
                print(f"case {r['case']} {r['tool']} {r['kind']} np{r['ranks']}: {r['outcome']}: "
                      f"{r['detail'][:600]}\n    {' '.join(map(repr, r['cmd']))}", flush=True)
            if n % 200 == 0:
                print(f"mutate: {n}/{args.cases} cases, {time.monotonic() - t0:.0f} s", flush=True)
    results.sort(key=lambda r: r["case"])
    counts = {}
    for r in results:
        key = (r["tool"], r["kind"])
        counts.setdefault(key, {})
        counts[key][r["outcome"]] = counts[key].get(r["outcome"], 0) + 1
    outcomes = sorted({r["outcome"] for r in results})
    print(f"\n{'tool':11s} {'mutation':14s} " + " ".join(f"{o:>12s}" for o in outcomes))
    for (tool, kind), c in sorted(counts.items()):
        print(f"{tool:11s} {kind:14s} " + " ".join(f"{c.get(o, 0):12d}" for o in outcomes))
    total = {o: sum(1 for r in results if r["outcome"] == o) for o in outcomes}
    print(f"{'all':26s} " + " ".join(f"{total[o]:12d}" for o in outcomes))
    secs = sorted(r["secs"] for r in results)
    bad = [r for r in results if r["outcome"] not in GOOD and r["outcome"] != "oom_rejected"]
    print(f"mutate: {len(results)} cases ({sum(r['ranks'] == 2 for r in results)} at 2 ranks) in "
          f"{time.monotonic() - t0:.0f} s, median case {secs[len(secs) // 2]:.2f} s, slowest {secs[-1]:.1f} s; "
          f"{len(bad)} bad endings" + (f" (kept under {args.workdir}/failures)" if bad else ""))
    if args.report:
        tmp = args.report + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seed": args.seed, "cases": len(results), "totals": total, "results": results}, f)
        os.replace(tmp, args.report)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
