#!/usr/bin/env python3
"""End-to-end check of `moex-layer` against the float64 numpy reference (deepseek_moe_ref.py).

For every named case (fixed seeds) and every rank count it writes config.json, weights.safetensors
and input.safetensors (input + R), runs

    mpirun -np N --oversubscribe MOEX_LAYER --config .. --weights .. --input .. --output .. \
        [--prefix P] --backward

and compares `output`, `input.grad` and every `<prefix><weight>.grad` with the reference using
max|a - b| / max(max|b|, 1e-6) <= rtol. One line per (case, ranks), then `N passed, N failed`.

--generate-only writes the case files and the reference (reference.safetensors, F64) and runs nothing.
--bad-inputs checks that moex-layer rejects malformed inputs with a non-zero exit and a message.
"""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_moe_ref as ref  # noqa: E402
from safetensors_io import read_safetensors, write_safetensors  # noqa: E402

RUN_TIMEOUT_S = 120
BAD_INPUT_TIMEOUT_S = 60
TIE_MARGIN = 1e-4     # selection-score gap below which a case is regenerated (moex computes in fp32)
DENOM_FLOOR = 1e-6

MOEX_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MOEX_TIMEOUT_S": "60",
}


def _cfg(model_type, hidden, F, E, K, **routing):
    c = {"model_type": model_type, "hidden_size": hidden, "moe_intermediate_size": F,
         "n_routed_experts": E, "num_experts_per_tok": K}
    c.update(routing)
    return c


# name -> dict(config, T, prefix, bias, skew, gate_scale)
CASES = {
    # DeepSeek-V3-like: normalised sigmoid, noaux_tc over groups, correction bias, 1 shared expert
    "v3_noaux_bias": dict(
        config=_cfg("deepseek_v3", 32, 16, 16, 4, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2, n_shared_experts=1),
        T=24, prefix="model.layers.0.mlp.", bias=True),
    # V3 with only sizes given: every routing field from the deepseek_v3 defaults (n_group 8, topk_group 4)
    "v3_defaults": dict(
        config=_cfg("deepseek_v3", 24, 8, 16, 4),
        T=16, prefix="model.layers.0.mlp.", bias=True),
    # model_type absent entirely -> deepseek_v3
    "no_model_type": dict(
        config={k: v for k, v in _cfg("deepseek_v3", 16, 8, 16, 3, topk_method="noaux_tc",
                                      scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                                      n_group=8, topk_group=4, n_shared_experts=1).items() if k != "model_type"},
        T=10, prefix="model.layers.0.mlp.", bias=True),
    "sigmoid_greedy_nobias": dict(
        config=_cfg("deepseek_v3", 24, 12, 8, 2, topk_method="greedy", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1, n_shared_experts=1),
        T=17, prefix="model.layers.3.mlp.", bias=False),
    # DeepSeek-V2-Lite-like: softmax, greedy, no groups, no normalisation, 2 shared experts
    "v2lite_softmax_greedy": dict(
        config=_cfg("deepseek_v2", 40, 12, 12, 6, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1, n_shared_experts=2),
        T=20, prefix="model.layers.1.mlp.", bias=False),
    # V2 with the HF defaults/nulls and the HF "gready" spelling
    "v2_nulls_gready": dict(
        config=_cfg("deepseek_v2", 16, 8, 8, 2, topk_method="gready", n_group=None, topk_group=None,
                    n_shared_experts=1),
        T=9, prefix="model.layers.0.mlp.", bias=False),
    # DeepSeek-V2-like: softmax group_limited_greedy, scaling 16 without normalisation
    "softmax_group_limited": dict(
        config=_cfg("deepseek_v2", 32, 16, 16, 3, topk_method="group_limited_greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=16.0, n_group=4, topk_group=2, n_shared_experts=2),
        T=30, prefix="model.layers.0.mlp.", bias=False),
    # softmax + norm_topk_prob + scaling != 1 (V3 semantics: scale applied after normalising)
    "softmax_norm_scaled": dict(
        config=_cfg("deepseek_v3", 24, 8, 10, 3, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=True, routed_scaling_factor=2.0, n_group=1, topk_group=1, n_shared_experts=1),
        T=13, prefix="model.layers.0.mlp.", bias=False),
    # deepseek_v2 with norm_topk_prob and scaling != 1: the HF V2 code normalises OR scales, never both
    "v2_norm_not_scaled": dict(
        config=_cfg("deepseek_v2", 24, 8, 12, 3, topk_method="group_limited_greedy", scoring_func="softmax",
                    norm_topk_prob=True, routed_scaling_factor=16.0, n_group=3, topk_group=2, n_shared_experts=1),
        T=15, prefix="model.layers.0.mlp.", bias=False),
    # top-1 with norm_topk_prob: no model_type normalises at K = 1; deepseek_v3 still scales
    "v3_top1_norm": dict(
        config=_cfg("deepseek_v3", 16, 8, 8, 1, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5, n_group=2, topk_group=1, n_shared_experts=1),
        T=12, prefix="model.layers.0.mlp.", bias=True),
    # no shared experts; T < ranks so some ranks hold no tokens
    "no_shared_few_tokens": dict(
        config=_cfg("deepseek_v3", 16, 8, 8, 2, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5, n_group=2, topk_group=1, n_shared_experts=0),
        T=3, prefix="model.layers.0.mlp.", bias=True),
    "single_token": dict(
        config=_cfg("deepseek_v3", 48, 24, 16, 4, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2, n_shared_experts=1),
        T=1, prefix="model.layers.0.mlp.", bias=True),
    # DeepSeekMoE-16B-like (model_type deepseek), 2 shared experts, weights under the empty prefix
    "moe16b_empty_prefix": dict(
        config=_cfg("deepseek", 32, 8, 16, 6, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1, n_shared_experts=2),
        T=25, prefix="", bias=False),
    "top1": dict(
        config=_cfg("deepseek_v2", 20, 12, 8, 1, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1, n_shared_experts=1),
        T=7, prefix="model.layers.0.mlp.", bias=False),
    "topk_eq_E": dict(
        config=_cfg("deepseek_v3", 16, 8, 6, 6, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5, n_group=2, topk_group=2, n_shared_experts=0),
        T=11, prefix="model.layers.0.mlp.", bias=True),
    # almost every token picks experts 1 and 5: other experts (and ranks) get little or nothing
    "skewed_gate": dict(
        config=_cfg("deepseek_v2", 24, 8, 8, 2, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1, n_shared_experts=1),
        T=40, prefix="model.layers.0.mlp.", bias=False, skew=(1, 5)),
    "skewed_sigmoid_groups": dict(
        config=_cfg("deepseek_v3", 16, 8, 12, 3, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5, n_group=3, topk_group=1, n_shared_experts=1),
        T=32, prefix="model.layers.2.mlp.", bias=True, skew=(8, 9, 10)),
    # A DeepSeek-V3-style FP8 checkpoint: expert and shared weights F8_E4M3 with 16x16 block scales
    # (weight_scale_inv), the gate BF16, spread over 3 shards named by model.safetensors.index.json
    # with other layers' tensors beside it; selected with --layer 3. The reference uses the exact
    # dequantised values (f32(code * scale), as DeepSeek's weight_dequant).
    "v3_fp8_sharded": dict(
        config=_cfg("deepseek_v3", 48, 32, 16, 4, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2, n_shared_experts=1,
                    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}),
        T=20, prefix="model.layers.3.mlp.", bias=True, storage="fp8_sharded", layer=3),
}


def e4m3_values():
    """float64 value of every F8_E4M3 ("fn") code; NaN for the two NaN codes."""
    v = np.empty(256)
    for b in range(256):
        s, e, m = -1.0 if b & 0x80 else 1.0, (b >> 3) & 15, b & 7
        v[b] = math.nan if (e == 15 and m == 7) else s * (m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return v


def quantize_fp8(w, block):
    """Block-scaled FP8 of a 2-D f32 weight: (codes uint8, scale_inv f32 [ceil(M/b), ceil(N/b)], the
    dequantised f32 weight as a loader computes it: f32(code value) * f32(scale))."""
    table = e4m3_values()
    finite = np.where(np.isfinite(table))[0]
    order = finite[np.argsort(table[finite], kind="stable")]
    sorted_vals = table[order]
    M, N = w.shape
    R, C = -(-M // block), -(-N // block)
    scale = np.empty((R, C), dtype=np.float32)
    codes = np.empty((M, N), dtype=np.uint8)
    for i in range(R):
        for j in range(C):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].astype(np.float64)
            s = np.float32(max(float(np.max(np.abs(blk))), 1e-12) / 448.0)
            q = blk / float(s)
            k = np.clip(np.searchsorted(sorted_vals, q), 1, len(sorted_vals) - 1)
            nearer = np.where(np.abs(sorted_vals[k - 1] - q) <= np.abs(sorted_vals[k] - q), k - 1, k)
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = order[nearer]
            scale[i, j] = s
    rows = np.repeat(np.repeat(scale, block, axis=0), block, axis=1)[:M, :N]
    deq = table[codes].astype(np.float32) * rows  # f32 * f32, rounded to f32
    return codes, scale, deq.astype(np.float32)


def to_bf16(w):
    """Round-to-nearest-even bf16 of an f32 array: (uint16 bits, the f32 value they hold)."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def fp8_storage(weights, block):
    """The stored form of a layer's weights in an FP8 checkpoint and the values a loader gets back:
    ({name: tensor or (dtype, raw)}, {name: f32 value})."""
    stored, values = {}, {}
    for k, v in weights.items():
        if k == "gate.weight":
            bits, val = to_bf16(v)
            stored[k], values[k] = ("BF16", bits), val
        elif k.endswith("_proj.weight"):
            codes, scale, val = quantize_fp8(v, block)
            stored[k], values[k] = ("F8_E4M3", codes), val
            stored[k[:-len(".weight")] + ".weight_scale_inv"] = scale
        else:
            stored[k], values[k] = v, v
    return stored, values


def write_sharded(folder, tensors, shards=3):
    """{name: tensor} over `shards` files model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, f in enumerate(files):
        part = {n: tensors[n] for j, n in enumerate(names) if j % shards == i}
        write_safetensors(os.path.join(folder, f), part, metadata={"format": "pt"})
        weight_map.update({n: f for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh)


STORED = {}  # case name -> the stored form of its weights (FP8 cases), from generate_case


def _seed(name, attempt):
    return (zlib.crc32(name.encode()) * 1000 + attempt) % (2 ** 32)


def generate_case(name, spec, max_attempts=200):
    """Returns (config dict, weights {unprefixed: f32 array}, input f32, R f32, attempt) with routing away
    from ties. All reference computation must use the f32-rounded values."""
    rc = ref.resolve_config(spec["config"])
    H = rc["hidden"]
    for attempt in range(max_attempts):
        rng = np.random.default_rng(_seed(name, attempt))
        w64, x, R = ref.random_case(rng, rc, spec.get("bias", False), spec["T"], gate_scale=spec.get("gate_scale", 2.0))
        if "skew" in spec:
            # a shared direction u in every token, and hot experts whose gate rows point along it
            u = rng.standard_normal(H)
            u /= np.linalg.norm(u)
            x = x + 3.0 * u[None, :]
            for e in spec["skew"]:
                w64["gate.weight"][e] += 2.0 * u
            # a few tokens get pushed elsewhere so selection is "almost" uniform, not entirely
            for t in range(0, spec["T"], 9):
                x[t] -= 6.0 * u
        weights = {k: v.astype(np.float32) for k, v in w64.items()}
        if spec.get("storage") == "fp8_sharded":
            block = spec["config"]["quantization_config"]["weight_block_size"][0]
            STORED[name], weights = fp8_storage(weights, block)
        x32 = x.astype(np.float32)
        R32 = R.astype(np.float32)
        w = {k: v.astype(np.float64) for k, v in weights.items()}
        _, cache = ref.forward(rc, w, x32.astype(np.float64))
        m = cache["gate"]["margins"]
        if min(m["topk"], m["group"]) < TIE_MARGIN:
            continue
        # masked-out experts compete only if a picked selection score is <= 0 (fill 0 vs -inf conventions)
        if rc["topk_method"] in ref.GROUPED_METHODS and rc["topk_group"] < rc["n_group"] and m["min_picked"] < TIE_MARGIN:
            continue
        return spec["config"], weights, x32, R32, attempt
    raise RuntimeError(f"case {name}: no tie-free draw in {max_attempts} attempts")


def expected_names(prefix, weights):
    return ["output", "input.grad"] + [f"{prefix}{k}.grad" for k in weights]


def write_case(case_dir, name, spec):
    os.makedirs(case_dir, exist_ok=True)
    cfg, weights, x, R, attempt = generate_case(name, spec)
    prefix = spec["prefix"]
    paths = {k: os.path.join(case_dir, f) for k, f in
             (("config", "config.json"), ("weights", "weights.safetensors"), ("input", "input.safetensors"),
              ("reference", "reference.safetensors"))}
    with open(paths["config"], "w") as f:
        json.dump(cfg, f, indent=2)
    if spec.get("storage") == "fp8_sharded":
        # A checkpoint folder: the layer's tensors among others (attention, a dense layer, an
        # embedding), sharded, the MoE layer found by --layer.
        folder = os.path.join(case_dir, "checkpoint")
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng(_seed(name, 10 ** 6))
        H = cfg["hidden_size"]
        tensors = {prefix + k: v for k, v in STORED[name].items()}
        tensors.update({"model.embed_tokens.weight": rng.standard_normal((8, H)).astype(np.float32),
                        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((H, 8)).astype(np.float32),
                        "model.layers.3.self_attn.o_proj.weight": rng.standard_normal((H, H)).astype(np.float32),
                        "model.layers.3.post_attention_layernorm.weight": np.ones(H, dtype=np.float32)})
        write_sharded(folder, tensors)
        paths["weights"] = folder
    else:
        write_safetensors(paths["weights"], {prefix + k: v for k, v in weights.items()}, metadata={"format": "pt"})
    write_safetensors(paths["input"], {"input": x, "R": R})
    y, dx, grads, cache = ref.layer(cfg, weights, x.astype(np.float64), R.astype(np.float64))
    expect = {"output": y, "input.grad": dx}
    expect.update({f"{prefix}{k}.grad": v for k, v in grads.items()})
    write_safetensors(paths["reference"], expect, keep_f64=True)
    load = np.bincount(cache["gate"]["idx"].ravel(), minlength=cache["rc"]["E"])
    return paths, expect, {"attempt": attempt, "margins": cache["gate"]["margins"], "load": load.tolist()}


def _env(extra=None):
    env = dict(os.environ)
    env.update(MOEX_ENV)
    env.update(extra or {})
    return env


# Layer schedules checked at the largest rank count besides the default one (flat, 1 chunk): every
# option of moex-layer's scheduler must leave the result equal to the reference. MOEX_RANKS_PER_NODE
# makes 2-rank "nodes" so the hierarchical exchange and node-aware replicas have nodes to work with.
SCHEDULES = {
    "chunks3-hier": (["--chunks", "3", "--exchange", "hierarchical"], {"MOEX_RANKS_PER_NODE": "2"}),
    "determ-serial": (["--deterministic", "on", "--chunks", "2", "--overlap", "off"], {}),
    "replicas": (["--replicas", "on", "--chunks", "2"], {"MOEX_RANKS_PER_NODE": "2"}),
    "local-first": (["--chunks", "2", "--local-first", "on"], {}),
    "local-split": (["--chunks", "3", "--local-first", "split"], {}),
}
# With --device cuda (GpuMoELayer) every option applies but the deterministic mode over the
# hierarchical exchange.
CUDA_SCHEDULES = {
    "chunks3-hier": (["--chunks", "3", "--exchange", "hierarchical"], {"MOEX_RANKS_PER_NODE": "2"}),
    "determ": (["--deterministic", "on", "--chunks", "2"], {}),
    "replicas": (["--replicas", "on", "--chunks", "2"], {"MOEX_RANKS_PER_NODE": "2"}),
    "replicas-hier": (["--replicas", "on", "--exchange", "hierarchical"], {"MOEX_RANKS_PER_NODE": "2"}),
    "local-first": (["--chunks", "2", "--local-first", "on"], {}),
    "local-split": (["--chunks", "3", "--local-first", "split"], {}),
}
# Exit status of moex-layer (and of this script) where --device cuda finds no GPU: ctest's skip code.
NO_DEVICE = 77


def run_cmd(cmd, timeout, extra_env=None):
    """Runs cmd in its own process group; on timeout kills that group. Returns (rc, stdout, stderr,
    seconds, timed_out). A launch that Open MPI itself fails before any rank starts (its session
    directory raced with another mpirun's cleanup: "orte_session_dir failed") is tried once more."""
    for attempt in range(2):
        result = _run_once(cmd, timeout, extra_env)
        if attempt == 0 and result[0] != 0 and "orte_session_dir failed" in result[2]:
            time.sleep(0.5)
            continue
        return result


def _run_once(cmd, timeout, extra_env):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(extra_env),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err, time.monotonic() - t0, False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        return -9, out, err, time.monotonic() - t0, True


def layer_cmd(args, ranks, paths, output, prefix, backward=True):
    cmd = [args.mpirun, "-np", str(ranks), "--oversubscribe", args.moex_layer,
           "--config", paths["config"], "--weights", paths["weights"], "--input", paths["input"],
           "--output", output]
    if prefix:
        cmd += ["--prefix", prefix]
    if backward:
        cmd.append("--backward")
    if getattr(args, "device", "cpu") != "cpu":
        cmd += ["--device", args.device, "--device-comm", args.device_comm, "--precision", args.precision]
    return cmd


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if b.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), DENOM_FLOOR))


def _tail(text, n=1500):
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


class NoDevice(Exception):
    """moex-layer --device cuda found no GPU."""


def check_cases(args, names):
    n_pass = n_fail = 0
    print(f"{'case':26s} {'ranks':>19s}  {'output':>10s}  {'grads':>10s}  result")
    for name in names:
        spec = CASES[name]
        case_dir = os.path.join(args.workdir, name)
        paths, expect, info = write_case(case_dir, name, spec)
        if args.generate_only:
            rc = ref.resolve_config(spec["config"])
            m = info["margins"]
            print(f"{name:26s} generated: T={spec['T']} E={rc['E']} K={rc['K']} {rc['topk_method']}/{rc['scoring_func']}"
                  f" shared={rc['n_shared']} prefix={spec['prefix']!r} attempt={info['attempt']}"
                  f" gaps topk={m['topk']:.2e} group={m['group']:.2e} load={info['load']}")
            continue
        runs = [(ranks, "", [], {}) for ranks in args.ranks]
        if args.schedules and max(args.ranks) >= 2:
            schedules = SCHEDULES if args.device == "cpu" else CUDA_SCHEDULES
            runs += [(max(args.ranks), label, extra, env) for label, (extra, env) in schedules.items()]
        for ranks, label, extra, extra_env in runs:
            out_path = os.path.join(case_dir, f"output_np{ranks}{'_' + label if label else ''}.safetensors")
            if os.path.exists(out_path):
                os.remove(out_path)
            if "layer" in spec:  # select the checkpoint's layer by index instead of by prefix
                cmd = layer_cmd(args, ranks, paths, out_path, "") + ["--layer", str(spec["layer"])] + extra
            else:
                cmd = layer_cmd(args, ranks, paths, out_path, spec["prefix"]) + extra
            code, out, err, secs, timed_out = run_cmd(cmd, RUN_TIMEOUT_S, extra_env)
            if code == NO_DEVICE and "SKIPPED: no CUDA device" in err:
                print(err.strip().splitlines()[0])
                raise NoDevice()
            problem = None
            e_out = e_grad = math.inf
            if timed_out:
                problem = f"timed out after {RUN_TIMEOUT_S} s"
            elif code != 0:
                problem = f"exit code {code}"
            elif not os.path.exists(out_path):
                problem = "no output file written"
            else:
                try:
                    got = read_safetensors(out_path)
                except Exception as ex:  # noqa: BLE001 - report anything the reader rejects
                    got, problem = None, f"cannot read output: {ex}"
                if got is not None:
                    missing = [k for k in expect if k not in got]
                    e_out = rel(got["output"], expect["output"]) if "output" in got else math.inf
                    errs = {k: rel(got[k], v) for k, v in expect.items() if k != "output" and k in got}
                    e_grad = max(errs.values()) if errs else math.inf
                    if missing:
                        problem = f"missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
                    elif e_out > args.rtol or e_grad > args.rtol:
                        worst = max(errs, key=errs.get) if errs else "-"
                        problem = f"worst grad {worst} ({errs.get(worst, math.inf):.3e})"
            ok = problem is None
            n_pass += ok
            n_fail += not ok
            print(f"{name:26s} {str(ranks) + (' ' + label if label else ''):>19s}  {e_out:10.3e}  {e_grad:10.3e}  {'PASS' if ok else 'FAIL'}"
                  f"{'' if ok else '  (' + problem + ')'}", flush=True)
            if not ok:
                print("    command: " + "".join(f"{k}={v} " for k, v in extra_env.items()) +
                      " ".join(_shell_quote(c) for c in cmd))
                if err.strip():
                    print("    stderr: " + _tail(err).replace("\n", "\n    "))
    return n_pass, n_fail


def _shell_quote(s):
    return s if s and all(c.isalnum() or c in "-_./=:," for c in s) else "'" + s.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------

def bad_input_variants(base_dir):
    """Builds the malformed variants from a small valid case. Returns a list of
    (name, paths, prefix, keywords): stderr must contain at least one keyword (case-insensitive)."""
    spec = CASES["v3_noaux_bias"]
    prefix = spec["prefix"]
    paths, _, _ = write_case(os.path.join(base_dir, "valid"), "v3_noaux_bias", spec)
    cfg, weights, x, R, _ = generate_case("v3_noaux_bias", spec)
    rc = ref.resolve_config(cfg)
    d = os.path.join(base_dir, "bad")
    os.makedirs(d, exist_ok=True)
    variants = []

    # 1. truncated weights file
    p = os.path.join(d, "weights_truncated.safetensors")
    with open(paths["weights"], "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[: len(data) - len(data) // 3])
    variants.append(("truncated_weights", {**paths, "weights": p}, prefix,
                     ["weights_truncated", "truncat", "offset", "bytes", "size", "length", "bound", "end of file"]))

    # 2. a missing expert tensor
    p = os.path.join(d, "weights_missing_expert.safetensors")
    missing = "experts.3.up_proj.weight"
    write_safetensors(p, {prefix + k: v for k, v in weights.items() if k != missing})
    variants.append(("missing_expert_tensor", {**paths, "weights": p}, prefix, ["experts.3.up_proj"]))

    # 3. a weight with the wrong shape (down_proj stored as [F, hidden] instead of [hidden, F])
    p = os.path.join(d, "weights_wrong_shape.safetensors")
    wrong = "experts.1.down_proj.weight"
    assert rc["hidden"] != rc["F"]
    write_safetensors(p, {prefix + k: (v.T.copy() if k == wrong else v) for k, v in weights.items()})
    variants.append(("wrong_weight_shape", {**paths, "weights": p}, prefix, ["experts.1.down_proj", "shape"]))

    # 4. input with the wrong hidden size
    p = os.path.join(d, "input_wrong_hidden.safetensors")
    T = x.shape[0]
    rng = np.random.default_rng(7)
    write_safetensors(p, {"input": rng.standard_normal((T, rc["hidden"] + 1)).astype(np.float32),
                          "R": rng.standard_normal((T, rc["hidden"] + 1)).astype(np.float32)})
    variants.append(("input_wrong_hidden", {**paths, "input": p}, prefix,
                     ["hidden", "shape", str(rc["hidden"] + 1)]))

    # 5. num_experts_per_tok > n_routed_experts
    p = os.path.join(d, "config_topk_gt_experts.json")
    bad_cfg = dict(cfg)
    bad_cfg["num_experts_per_tok"] = rc["E"] + 1
    with open(p, "w") as f:
        json.dump(bad_cfg, f, indent=2)
    variants.append(("topk_gt_experts", {**paths, "config": p}, prefix,
                     ["num_experts_per_tok", "n_routed_experts", "top-k", "topk"]))

    # 6. nonexistent input path
    p = os.path.join(d, "does_not_exist_input.safetensors")
    variants.append(("nonexistent_input", {**paths, "input": p}, prefix, ["does_not_exist_input"]))
    return variants


def check_bad_inputs(args):
    n_pass = n_fail = 0
    base = os.path.join(args.workdir, "bad_inputs")
    variants = bad_input_variants(base)
    print(f"{'bad input':26s} {'ranks':>5s}  {'exit':>5s}  {'secs':>6s}  result")
    for name, paths, prefix, keywords in variants:
        for ranks in args.ranks:
            out_path = os.path.join(base, f"out_{name}_np{ranks}.safetensors")
            if os.path.exists(out_path):
                os.remove(out_path)
            cmd = layer_cmd(args, ranks, paths, out_path, prefix)
            code, out, err, secs, timed_out = run_cmd(cmd, BAD_INPUT_TIMEOUT_S)
            low = err.lower()
            problem = None
            if timed_out:
                problem = f"hung: killed after {BAD_INPUT_TIMEOUT_S} s"
            elif code == 0:
                problem = "exit code 0 (input accepted)"
            elif not err.strip():
                problem = "nothing on stderr"
            elif not any(k.lower() in low for k in keywords):
                problem = f"stderr mentions none of {keywords}"
            ok = problem is None
            n_pass += ok
            n_fail += not ok
            print(f"{name:26s} {ranks:5d}  {code:5d}  {secs:6.1f}  {'PASS' if ok else 'FAIL'}"
                  f"{'' if ok else '  (' + problem + ')'}", flush=True)
            if not ok or args.verbose:
                print("    command: " + " ".join(_shell_quote(c) for c in cmd))
                print("    stderr: " + (_tail(err, 800).replace("\n", "\n    ") or "(empty)"))
    return n_pass, n_fail


def main(argv=None):
    ap = argparse.ArgumentParser(description="Check moex-layer against the float64 numpy reference.")
    ap.add_argument("--moex-layer", default="build/bin/moex-layer", help="path of the moex-layer binary")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--ranks", default="1,2,3,4", help="comma-separated rank counts")
    ap.add_argument("--workdir", default=None, help="where case files go (default: a new temporary directory)")
    ap.add_argument("--cases", default="all", help="all, or comma-separated case names")
    ap.add_argument("--rtol", type=float, default=None,
                    help="relative tolerance (default 1e-4; 3e-2 with --precision bf16)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: moex-layer --device cuda (exits 77 here, SKIPPED, where there is no GPU)")
    ap.add_argument("--device-comm", default="staged", choices=["staged", "nccl"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-schedules", dest="schedules", action="store_false",
                    help="skip the extra schedules (" + ", ".join(SCHEDULES) + ") at the largest rank count")
    ap.add_argument("--generate-only", action="store_true",
                    help="write case files and reference outputs (reference.safetensors, F64); run nothing")
    ap.add_argument("--bad-inputs", action="store_true", help="check rejection of malformed inputs instead")
    ap.add_argument("--list", action="store_true", help="list case names and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)

    if args.list:
        print("\n".join(CASES))
        return 0
    if args.rtol is None:
        # bf16 weights and activations (8-bit mantissa) against the float64 reference: about 1e-2.
        args.rtol = 3e-2 if args.precision == "bf16" else 1e-4
    try:
        args.ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--ranks: expected comma-separated integers, got {args.ranks!r}")
    if not args.ranks or min(args.ranks) < 1:
        ap.error("--ranks: need at least one rank count >= 1")
    if args.cases == "all":
        names = list(CASES)
    else:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if not args.generate_only:
        if not (os.path.isfile(args.moex_layer) and os.access(args.moex_layer, os.X_OK)):
            print(f"error: moex-layer binary not found or not executable: {args.moex_layer}", file=sys.stderr)
            return 2
        args.moex_layer = os.path.abspath(args.moex_layer)
        if shutil.which(args.mpirun) is None:
            print(f"error: mpirun not found: {args.mpirun}", file=sys.stderr)
            return 2

    temp = args.workdir is None
    if temp:
        args.workdir = tempfile.mkdtemp(prefix="moex-layer-check-")
    os.makedirs(args.workdir, exist_ok=True)
    args.workdir = os.path.abspath(args.workdir)
    try:
        if args.bad_inputs:
            if args.generate_only:
                variants = bad_input_variants(os.path.join(args.workdir, "bad_inputs"))
                for v in variants:
                    print(f"{v[0]:26s} generated")
                n_pass, n_fail = len(variants), 0
            else:
                n_pass, n_fail = check_bad_inputs(args)
        else:
            try:
                n_pass, n_fail = check_cases(args, names)
            except NoDevice:
                return NO_DEVICE
            if args.generate_only:
                n_pass, n_fail = len(names), 0
    finally:
        if temp and not args.keep and not args.generate_only:
            shutil.rmtree(args.workdir, ignore_errors=True)
        elif temp:
            print(f"files kept in {args.workdir}")
    print(f"{n_pass} passed, {n_fail} failed")
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
