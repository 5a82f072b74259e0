#!/usr/bin/env python3
"""Float64 numpy reference of one DeepSeekMoE layer (gate + routed experts + shared experts),
forward and analytic backward, written independently of moex for checking it.

Layer semantics (DeepSeek-V3 inference model.py / Hugging Face DeepSeek modeling code):

  logits = x @ Wg.T                                  x: [T, hidden], Wg: [E, hidden]
  scores = softmax(logits) (over all E) | sigmoid(logits)
  sc     = scores + bias   (bias = gate.e_score_correction_bias, if present; selection only)
  topk_method
    greedy / gready       top-K of sc over all experts
    group_limited_greedy  n_group contiguous groups, group score = max of sc in the group
    noaux_tc              group score = sum of the two largest sc in the group
  grouped methods keep the topk_group best groups, then take the top-K of sc among their experts;
  ties go to the lower index (groups and experts).
  w      = scores[picked]  (unbiased);  if norm_topk_prob: w /= sum(w) + 1e-20;  w *= routed_scaling_factor
  expert(x) = down(silu(gate(x)) * up(x))
  y      = shared(x) + sum_k w_k * expert_{id_k}(x)   (shared width = n_shared_experts * moe_intermediate_size)

Backward takes R = dL/dy and returns dL/dx and dL/dW for every weight, with the selected indices held
constant; the bias gets a zero gradient.

Weights are passed as a dict keyed by the names *without* prefix: "gate.weight",
"gate.e_score_correction_bias" (optional), "experts.{e}.{gate,up,down}_proj.weight",
"shared_experts.{gate,up,down}_proj.weight".

Run `deepseek_moe_ref.py --self-test` to check the backward against central finite differences and
the routing against hand-worked examples and a second, loop-based forward.
"""
import argparse
import math
import sys

import numpy as np

NORM_EPS = 1e-20

# Hugging Face class defaults for the routing fields, by model_type.
_HF_DEFAULTS = {
    "deepseek_v3": {
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "n_routed_experts": 256, "hidden_size": 7168,
        "moe_intermediate_size": 2048,
    },
    "deepseek_v2": {
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "n_group": None, "topk_group": None, "n_shared_experts": None,
        "num_experts_per_tok": None, "n_routed_experts": None, "hidden_size": 5120,
        "moe_intermediate_size": 1407,
    },
    "deepseek": {
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "n_shared_experts": None,
        "num_experts_per_tok": None, "n_routed_experts": None, "hidden_size": 4096,
        "moe_intermediate_size": 1407,
    },
}

GROUPED_METHODS = ("group_limited_greedy", "noaux_tc")


def resolve_config(cfg):
    """Fills absent/null fields with the defaults of the HF class named by model_type and validates.
    Returns a plain dict with: model_type, hidden, F, E, K, n_shared, Fs, n_group, topk_group,
    topk_method, scoring_func, norm, scale."""
    model_type = cfg.get("model_type") or "deepseek_v3"
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"unknown model_type {model_type!r}")
    d = _HF_DEFAULTS[model_type]

    def get(key):
        v = cfg.get(key)
        return d.get(key) if v is None else v

    def need_int(key, minimum):
        v = get(key)
        if v is None:
            raise ValueError(f"config: {key} is required for model_type {model_type}")
        if isinstance(v, bool) or int(v) != v or int(v) < minimum:
            raise ValueError(f"config: {key} = {v!r} must be an integer >= {minimum}")
        return int(v)

    r = {"model_type": model_type}
    r["hidden"] = need_int("hidden_size", 1)
    r["F"] = need_int("moe_intermediate_size", 1)
    r["E"] = need_int("n_routed_experts", 1)
    r["K"] = need_int("num_experts_per_tok", 1)
    ns = get("n_shared_experts")
    r["n_shared"] = 0 if ns is None else int(ns)
    if r["n_shared"] < 0:
        raise ValueError("config: n_shared_experts must be >= 0")
    r["Fs"] = r["n_shared"] * r["F"]
    r["n_group"] = 1 if get("n_group") is None else int(get("n_group"))
    r["topk_group"] = 1 if get("topk_group") is None else int(get("topk_group"))
    method = get("topk_method")
    if method == "gready":  # the spelling in the HF deepseek_v2 code
        method = "greedy"
    if method not in ("greedy",) + GROUPED_METHODS:
        raise ValueError(f"config: unknown topk_method {method!r}")
    r["topk_method"] = method
    scoring = get("scoring_func")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"config: unknown scoring_func {scoring!r}")
    r["scoring_func"] = scoring
    r["norm"] = bool(get("norm_topk_prob"))
    r["scale"] = float(get("routed_scaling_factor"))

    E, K, G, TG = r["E"], r["K"], r["n_group"], r["topk_group"]
    if K > E:
        raise ValueError(f"config: num_experts_per_tok {K} > n_routed_experts {E}")
    if method in GROUPED_METHODS:
        if G < 1 or E % G != 0:
            raise ValueError(f"config: n_routed_experts {E} is not divisible by n_group {G}")
        if not 1 <= TG <= G:
            raise ValueError(f"config: topk_group {TG} must be in [1, n_group {G}]")
        if K > TG * (E // G):
            raise ValueError(f"config: num_experts_per_tok {K} > experts in the kept groups {TG * (E // G)}")
    return r


def weight_names(rc, with_bias):
    """All weight names (no prefix) the layer reads, with their shapes."""
    H, F, E, Fs = rc["hidden"], rc["F"], rc["E"], rc["Fs"]
    out = {"gate.weight": (E, H)}
    if with_bias:
        out["gate.e_score_correction_bias"] = (E,)
    for e in range(E):
        out[f"experts.{e}.gate_proj.weight"] = (F, H)
        out[f"experts.{e}.up_proj.weight"] = (F, H)
        out[f"experts.{e}.down_proj.weight"] = (H, F)
    if Fs > 0:
        out["shared_experts.gate_proj.weight"] = (Fs, H)
        out["shared_experts.up_proj.weight"] = (Fs, H)
        out["shared_experts.down_proj.weight"] = (H, Fs)
    return out


def _sigmoid(a):
    # stable for large |a|
    out = np.empty_like(a)
    pos = a >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-a[pos]))
    ea = np.exp(a[~pos])
    out[~pos] = ea / (1.0 + ea)
    return out


def _softmax(a):
    z = a - a.max(axis=-1, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=-1, keepdims=True)


def group_scores(rc, sc):
    """[T, n_group] group scores for a grouped topk_method."""
    T = sc.shape[0]
    g = sc.reshape(T, rc["n_group"], rc["E"] // rc["n_group"])
    if rc["topk_method"] == "group_limited_greedy":
        return g.max(axis=-1)
    return np.sort(g, axis=-1)[..., -2:].sum(axis=-1)  # noaux_tc: sum of the two largest


def route(rc, sc):
    """Selection. sc: [T, E] selection scores. Returns (idx [T, K] int64 in descending-score order,
    margins dict): margins['topk'] = min over tokens of (K-th best - (K+1)-th best) among eligible
    experts (inf if none), margins['group'] = min gap between the last kept and the first dropped group
    score (inf if nothing is dropped), margins['min_picked'] = smallest picked sc (matters only where
    the masked-out experts' fill value could compete, i.e. when groups are dropped)."""
    T, E = sc.shape
    K = rc["K"]
    eligible = sc.copy()
    group_gap = math.inf
    if rc["topk_method"] in GROUPED_METHODS and rc["topk_group"] < rc["n_group"]:
        gs = group_scores(rc, sc)
        order = np.argsort(-gs, axis=1, kind="stable")
        kept = order[:, : rc["topk_group"]]
        gmask = np.zeros_like(gs, dtype=bool)
        np.put_along_axis(gmask, kept, True, axis=1)
        emask = np.repeat(gmask, E // rc["n_group"], axis=1)
        eligible[~emask] = -np.inf
        gsorted = np.take_along_axis(gs, order, axis=1)
        group_gap = float(np.min(gsorted[:, rc["topk_group"] - 1] - gsorted[:, rc["topk_group"]]))
    order = np.argsort(-eligible, axis=1, kind="stable")
    idx = order[:, :K]
    esorted = np.take_along_axis(eligible, order, axis=1)
    n_eligible = int(np.isfinite(esorted[0]).sum())
    topk_gap = math.inf
    if K < n_eligible:
        topk_gap = float(np.min(esorted[:, K - 1] - esorted[:, K]))
    min_picked = float(np.min(esorted[:, K - 1])) if T else math.inf
    return idx.astype(np.int64), {"topk": topk_gap, "group": group_gap, "min_picked": min_picked}


def weight_rule(rc):
    """(normalise, factor) of the picked weights, as the Hugging Face modeling code of each model_type
    reads: `if top_k > 1 and norm_topk_prob: w /= w.sum() + 1e-20`; deepseek_v3 then always does
    `w *= routed_scaling_factor`, deepseek_v2 and deepseek do it only in the else branch."""
    normalise = rc["K"] > 1 and rc["norm"]
    factor = rc["scale"] if rc["model_type"] == "deepseek_v3" or not normalise else 1.0
    return normalise, factor


def gate_forward(rc, weights, x):
    Wg = weights["gate.weight"]
    logits = x @ Wg.T
    scores = _softmax(logits) if rc["scoring_func"] == "softmax" else _sigmoid(logits)
    bias = weights.get("gate.e_score_correction_bias")
    sc = scores + bias[None, :] if bias is not None else scores
    idx, margins = route(rc, sc)
    p = np.take_along_axis(scores, idx, axis=1)
    normalise, factor = weight_rule(rc)
    if normalise:
        denom = p.sum(axis=1, keepdims=True) + NORM_EPS
        w = p / denom * factor
    else:
        denom = None
        w = p * factor
    return {"logits": logits, "scores": scores, "sc": sc, "idx": idx, "p": p, "denom": denom,
            "w": w, "margins": margins}


def _mlp_forward(x, Wgate, Wup, Wdown):
    a = x @ Wgate.T
    b = x @ Wup.T
    sa = _sigmoid(a)
    h = a * sa * b
    return h @ Wdown.T, (a, b, sa, h)


def _mlp_backward(x, Wgate, Wup, Wdown, cache, dout):
    a, b, sa, h = cache
    dWdown = dout.T @ h
    dh = dout @ Wdown
    silu = a * sa
    dsilu = sa * (1.0 + a * (1.0 - sa))
    da = dh * b * dsilu
    db = dh * silu
    dWgate = da.T @ x
    dWup = db.T @ x
    dx = da @ Wgate + db @ Wup
    return dx, dWgate, dWup, dWdown


def forward(cfg, weights, x):
    """Returns (y [T, hidden], cache). cfg: raw config dict or resolve_config() result."""
    rc = cfg if "hidden" in cfg and "Fs" in cfg else resolve_config(cfg)
    x = np.asarray(x, dtype=np.float64)
    g = gate_forward(rc, weights, x)
    y = np.zeros_like(x)
    experts = {}
    for e in range(rc["E"]):
        tok, slot = np.nonzero(g["idx"] == e)
        if tok.size == 0:
            continue
        n = f"experts.{e}."
        out, c = _mlp_forward(x[tok], weights[n + "gate_proj.weight"], weights[n + "up_proj.weight"],
                              weights[n + "down_proj.weight"])
        np.add.at(y, tok, g["w"][tok, slot][:, None] * out)
        experts[e] = (tok, slot, out, c)
    shared = None
    if rc["Fs"] > 0:
        out, c = _mlp_forward(x, weights["shared_experts.gate_proj.weight"],
                              weights["shared_experts.up_proj.weight"], weights["shared_experts.down_proj.weight"])
        y += out
        shared = c
    return y, {"rc": rc, "x": x, "gate": g, "experts": experts, "shared": shared}


def backward(weights, cache, R):
    """Returns (dx, grads) with grads keyed like weights (bias gets zeros)."""
    rc, x, g = cache["rc"], cache["x"], cache["gate"]
    R = np.asarray(R, dtype=np.float64)
    grads = {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in weights.items()}
    dx = np.zeros_like(x)
    dw = np.zeros_like(g["w"])  # dL/dw [T, K]
    for e, (tok, slot, out, c) in cache["experts"].items():
        n = f"experts.{e}."
        dw[tok, slot] = np.sum(R[tok] * out, axis=1)
        dout = g["w"][tok, slot][:, None] * R[tok]
        dxe, dgate, dup, ddown = _mlp_backward(x[tok], weights[n + "gate_proj.weight"], weights[n + "up_proj.weight"],
                                               weights[n + "down_proj.weight"], c, dout)
        np.add.at(dx, tok, dxe)
        grads[n + "gate_proj.weight"] += dgate
        grads[n + "up_proj.weight"] += dup
        grads[n + "down_proj.weight"] += ddown
    if cache["shared"] is not None:
        dxs, dgate, dup, ddown = _mlp_backward(x, weights["shared_experts.gate_proj.weight"],
                                               weights["shared_experts.up_proj.weight"],
                                               weights["shared_experts.down_proj.weight"], cache["shared"], R)
        dx += dxs
        grads["shared_experts.gate_proj.weight"] += dgate
        grads["shared_experts.up_proj.weight"] += dup
        grads["shared_experts.down_proj.weight"] += ddown
    # w = s * p / D (norm) or s * p; D = sum(p) + eps
    normalise, s = weight_rule(rc)
    if normalise:
        D = g["denom"]
        dp = s * (dw / D - np.sum(dw * g["p"], axis=1, keepdims=True) / (D * D))
    else:
        dp = s * dw
    dscores = np.zeros_like(g["scores"])
    np.put_along_axis(dscores, g["idx"], dp, axis=1)  # picked experts are distinct per token
    sc = g["scores"]
    if rc["scoring_func"] == "softmax":
        dlogits = sc * (dscores - np.sum(dscores * sc, axis=1, keepdims=True))
    else:
        dlogits = dscores * sc * (1.0 - sc)
    grads["gate.weight"] += dlogits.T @ x
    dx += dlogits @ weights["gate.weight"]
    return dx, grads


def layer(cfg, weights, x, R=None):
    """Convenience: returns (y, dx, grads, cache); dx/grads are None when R is None."""
    w64 = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    y, cache = forward(cfg, w64, x)
    if R is None:
        return y, None, None, cache
    dx, grads = backward(w64, cache, R)
    return y, dx, grads, cache


def strip_prefix(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# Self-test
# --------------------------------------------------------------------------------------------------

def forward_naive(rc, weights, x):
    """Second, deliberately plain implementation (per token, Python lists) used to cross-check the
    vectorised forward. Returns (y, list of picked index sets)."""
    T, H = x.shape
    E, K = rc["E"], rc["K"]
    Wg = weights["gate.weight"]
    bias = weights.get("gate.e_score_correction_bias")
    y = np.zeros((T, H))
    picks = []
    for t in range(T):
        logit = [float(np.dot(Wg[e], x[t])) for e in range(E)]
        if rc["scoring_func"] == "softmax":
            m = max(logit)
            ex = [math.exp(v - m) for v in logit]
            s = [v / sum(ex) for v in ex]
        else:
            s = [1.0 / (1.0 + math.exp(-v)) for v in logit]
        sel = [s[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        allowed = list(range(E))
        if rc["topk_method"] in GROUPED_METHODS:
            gsz = E // rc["n_group"]
            gsc = []
            for gi in range(rc["n_group"]):
                vals = sorted(sel[gi * gsz:(gi + 1) * gsz], reverse=True)
                gsc.append(vals[0] if rc["topk_method"] == "group_limited_greedy" else sum(vals[:2]))
            kept = sorted(range(rc["n_group"]), key=lambda gi: (-gsc[gi], gi))[: rc["topk_group"]]
            allowed = [e for e in range(E) if e // gsz in kept]
        chosen = sorted(allowed, key=lambda e: (-sel[e], e))[:K]
        p = [s[e] for e in chosen]
        normalise, factor = weight_rule(rc)
        if normalise:
            tot = sum(p) + NORM_EPS
            p = [v / tot for v in p]
        wts = [v * factor for v in p]
        picks.append(set(chosen))
        for e, wt in zip(chosen, wts):
            n = f"experts.{e}."
            a = weights[n + "gate_proj.weight"] @ x[t]
            b = weights[n + "up_proj.weight"] @ x[t]
            h = a / (1.0 + np.exp(-a)) * b
            y[t] += wt * (weights[n + "down_proj.weight"] @ h)
        if rc["Fs"] > 0:
            a = weights["shared_experts.gate_proj.weight"] @ x[t]
            b = weights["shared_experts.up_proj.weight"] @ x[t]
            h = a / (1.0 + np.exp(-a)) * b
            y[t] += weights["shared_experts.down_proj.weight"] @ h
    return y, picks


def rel_err(a, b, floor=1e-12):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), floor))


def random_case(rng, rc, with_bias, T, gate_scale=1.5):
    H = rc["hidden"]
    weights = {}
    for name, shape in weight_names(rc, with_bias).items():
        if name == "gate.weight":
            weights[name] = rng.standard_normal(shape) * gate_scale / math.sqrt(H)
        elif name.endswith("e_score_correction_bias"):
            weights[name] = rng.uniform(-0.15, 0.15, size=shape)
        else:
            weights[name] = rng.standard_normal(shape) / math.sqrt(shape[1])
    x = rng.standard_normal((T, H))
    R = rng.standard_normal((T, H))
    return weights, x, R


def _fd_check(rc, weights, x, R, h, tol):
    """Central differences of L = sum(R * y) over every entry of x and every weight. Returns
    (ok, worst rel err, name of worst, selection_flipped)."""
    y, dx, grads, cache = layer(rc, weights, x, R)
    base_idx = cache["gate"]["idx"]
    base_sets = [set(r) for r in base_idx.tolist()]

    def loss_and_sel(wts, xx):
        yy, c = forward(rc, wts, xx)
        return float(np.sum(R * yy)), c["gate"]["idx"]

    def same_sel(idx):
        return [set(r) for r in idx.tolist()] == base_sets

    worst, worst_name = 0.0, ""
    targets = [("input", None)] + [(k, k) for k in weights]
    for label, key in targets:
        arr = x if key is None else weights[key]
        fd = np.zeros_like(arr)
        it = np.nditer(arr, flags=["multi_index"])
        for _ in it:
            i = it.multi_index
            orig = arr[i]
            arr[i] = orig + h
            lp, ip = loss_and_sel(weights, x)
            arr[i] = orig - h
            lm, im = loss_and_sel(weights, x)
            arr[i] = orig
            if key is None or key.startswith("gate."):
                if not (same_sel(ip) and same_sel(im)):
                    return False, math.inf, label, True
            fd[i] = (lp - lm) / (2 * h)
        analytic = dx if key is None else grads[key]
        if key is not None and key.endswith("e_score_correction_bias"):
            err = float(np.max(np.abs(analytic))) + float(np.max(np.abs(fd)))  # both must be 0
        else:
            err = rel_err(analytic, fd, floor=1e-8)
        if err > worst:
            worst, worst_name = err, label
    return worst <= tol, worst, worst_name, False


def _routing_unit_tests():
    """Hand-worked routing and config examples. Returns (number of checks, list of failures)."""
    failures = []
    checks = [0]

    def check():
        checks[0] += 1

    def rc_of(method, G, TG, K, E=8):
        return resolve_config({"model_type": "deepseek_v3", "hidden_size": 4, "moe_intermediate_size": 2,
                               "n_routed_experts": E, "num_experts_per_tok": K, "n_group": G,
                               "topk_group": TG, "topk_method": method, "n_shared_experts": 0})

    sc = np.array([[0.9, 0.0, 0.5, 0.5, 0.6, 0.1, 0.2, 0.1]])
    # groups of 2: max -> [0.9, 0.5, 0.6, 0.2] keeps groups 0, 2; top-2 sum -> [0.9, 1.0, 0.7, 0.3] keeps 1, 0
    expect = {"greedy": {0, 4}, "group_limited_greedy": {0, 4}, "noaux_tc": {0, 2}}
    for method, want in expect.items():
        check()
        got = set(route(rc_of(method, 4, 2, 2), sc)[0][0].tolist())
        if got != want:
            failures.append(f"route {method}: picked {sorted(got)}, expected {sorted(want)}")
    # only 1 group kept: group_limited keeps group 0 -> experts {0, 1}; noaux keeps group 1 -> {2, 3}
    for method, want in {"group_limited_greedy": {0, 1}, "noaux_tc": {2, 3}}.items():
        check()
        got = set(route(rc_of(method, 4, 1, 2), sc)[0][0].tolist())
        if got != want:
            failures.append(f"route {method} topk_group=1: picked {sorted(got)}, expected {sorted(want)}")
    # ties: all equal -> lowest groups and lowest experts
    flat = np.full((1, 8), 0.25)
    for method, want in {"greedy": [0, 1, 2], "group_limited_greedy": [0, 1, 2], "noaux_tc": [0, 1, 2]}.items():
        check()
        got = route(rc_of(method, 4, 2, 3), flat)[0][0].tolist()
        if got != want:
            failures.append(f"route {method} ties: picked {got}, expected {want}")
    # tie between groups 1 and 3 for the second kept group: group 1 wins
    tie = np.array([[0.9, 0.1, 0.5, 0.3, 0.0, 0.0, 0.5, 0.3]])
    check()
    got = set(route(rc_of("noaux_tc", 4, 2, 3), tie)[0][0].tolist())
    if got != {0, 2, 3}:
        failures.append(f"route noaux_tc group tie: picked {sorted(got)}, expected [0, 2, 3]")
    # bias steers selection but the weights use the unbiased scores
    rc = resolve_config({"model_type": "deepseek_v3", "hidden_size": 2, "moe_intermediate_size": 2,
                         "n_routed_experts": 4, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
                         "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": False,
                         "routed_scaling_factor": 3.0, "n_shared_experts": 0})
    w = {"gate.weight": np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]),
         "gate.e_score_correction_bias": np.array([0.0, 0.5, 0.0, 0.0])}
    xg = np.array([[1.0, 0.5]])  # sigmoid(1) = .731 > sigmoid(.5) = .622, but .622 + .5 wins
    check()
    g = gate_forward(rc, w, xg)
    if g["idx"][0].tolist() != [1] or abs(g["w"][0, 0] - 3.0 / (1.0 + math.exp(-0.5))) > 1e-15:
        failures.append(f"bias: idx {g['idx'][0].tolist()} w {g['w'][0].tolist()}, expected [1] and 3*sigmoid(0.5)")
    # the picked weights' rule of each model_type's HF code
    for mt, K, norm, want in (("deepseek_v3", 4, True, (True, 2.5)), ("deepseek_v3", 1, True, (False, 2.5)),
                              ("deepseek_v3", 4, False, (False, 2.5)), ("deepseek_v2", 4, True, (True, 1.0)),
                              ("deepseek_v2", 4, False, (False, 2.5)), ("deepseek_v2", 1, True, (False, 2.5)),
                              ("deepseek", 4, True, (True, 1.0))):
        check()
        got = weight_rule({"model_type": mt, "K": K, "norm": norm, "scale": 2.5})
        if got != want:
            failures.append(f"weight rule {mt} K={K} norm={norm}: {got} != {want}")
    # defaults
    r3 = resolve_config({"hidden_size": 8, "moe_intermediate_size": 4, "n_routed_experts": 16,
                         "num_experts_per_tok": 4})
    want3 = ("deepseek_v3", "noaux_tc", "sigmoid", True, 2.5, 8, 4, 1)
    got3 = (r3["model_type"], r3["topk_method"], r3["scoring_func"], r3["norm"], r3["scale"], r3["n_group"],
            r3["topk_group"], r3["n_shared"])
    check()
    if got3 != want3:
        failures.append(f"deepseek_v3 defaults: {got3} != {want3}")
    r2 = resolve_config({"model_type": "deepseek_v2", "hidden_size": 8, "moe_intermediate_size": 4,
                         "n_routed_experts": 6, "num_experts_per_tok": 2, "topk_method": "gready",
                         "n_group": None, "topk_group": None})
    got2 = (r2["topk_method"], r2["scoring_func"], r2["norm"], r2["scale"], r2["n_group"], r2["topk_group"])
    check()
    if got2 != ("greedy", "softmax", False, 1.0, 1, 1):
        failures.append(f"deepseek_v2 defaults: {got2}")
    r1 = resolve_config({"model_type": "deepseek", "hidden_size": 8, "moe_intermediate_size": 4,
                         "n_routed_experts": 6, "num_experts_per_tok": 2, "n_shared_experts": None})
    got1 = (r1["topk_method"], r1["scoring_func"], r1["norm"], r1["scale"], r1["n_group"], r1["topk_group"],
            r1["n_shared"])
    check()
    if got1 != ("greedy", "softmax", False, 1.0, 1, 1, 0):
        failures.append(f"deepseek defaults: {got1}")
    check()
    try:
        resolve_config({"hidden_size": 8, "moe_intermediate_size": 4, "n_routed_experts": 4,
                        "num_experts_per_tok": 5, "n_group": 1, "topk_group": 1})
        failures.append("K > E was accepted")
    except ValueError:
        pass
    return checks[0], failures


def self_test(seed=1234, tol=1e-6, h=1e-5, verbose=False):
    rng = np.random.default_rng(seed)
    n_routing, failures = _routing_unit_tests()
    routing_fail = len(failures)
    combos = []
    i = 0
    for method in ("greedy", "group_limited_greedy", "noaux_tc"):
        for scoring in ("softmax", "sigmoid"):
            for with_bias in (False, True):
                for n_shared in (0, 2):
                    norm = (i % 2 == 0) if scoring == "softmax" else (i % 4 != 1)
                    scale = [1.0, 2.5, 0.7, 16.0][i % 4]
                    combos.append((f"{method}/{scoring}/{'bias' if with_bias else 'nobias'}/shared{n_shared}",
                                   dict(topk_method=method, scoring_func=scoring, norm_topk_prob=norm,
                                        routed_scaling_factor=scale, n_group=4, topk_group=2,
                                        num_experts_per_tok=3, n_shared_experts=n_shared), with_bias))
                    i += 1
    combos.append(("top1/softmax/norm-false", dict(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                                                   routed_scaling_factor=1.0, n_group=1, topk_group=1,
                                                   num_experts_per_tok=1, n_shared_experts=1), False))
    combos.append(("top1/sigmoid/norm-true", dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                                                  routed_scaling_factor=2.5, n_group=4, topk_group=1,
                                                  num_experts_per_tok=1, n_shared_experts=0), True))
    combos.append(("topK=E/sigmoid", dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                                          routed_scaling_factor=2.5, n_group=4, topk_group=4,
                                          num_experts_per_tok=8, n_shared_experts=1), True))
    combos.append(("topK=E/softmax", dict(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                                          routed_scaling_factor=1.0, n_group=1, topk_group=1,
                                          num_experts_per_tok=8, n_shared_experts=0), False))
    n_pass = n_fail = 0
    worst_all = 0.0
    for name, fields, with_bias in combos:
        cfg = {"model_type": "deepseek_v3", "hidden_size": 5, "moe_intermediate_size": 3, "n_routed_experts": 8,
               **fields}
        rc = resolve_config(cfg)
        result = None
        for attempt in range(20):
            weights, x, R = random_case(rng, rc, with_bias, T=4)
            _, cache = forward(rc, weights, x)
            m = cache["gate"]["margins"]
            if min(m["topk"], m["group"]) < 1e-3:
                continue  # too close to a tie: finite differences could flip the selection
            y_naive, picks = forward_naive(rc, weights, x)
            y_vec, _ = forward(rc, weights, x)
            sel_vec = [set(r) for r in cache["gate"]["idx"].tolist()]
            if sel_vec != picks or rel_err(y_vec, y_naive) > 1e-12:
                result = (False, rel_err(y_vec, y_naive), "forward vs loop-based forward", False)
                break
            result = _fd_check(rc, weights, x, R, h, tol)
            if result[3]:
                result = None
                continue  # selection flipped under perturbation: resample
            break
        if result is None:
            failures.append(f"{name}: could not draw a case without near-ties")
            n_fail += 1
            continue
        ok, worst, where, _ = result
        worst_all = max(worst_all, worst)
        if verbose or not ok:
            print(f"  {name:45s} max rel err {worst:.2e} ({where}) {'ok' if ok else 'FAIL'}")
        if ok:
            n_pass += 1
        else:
            n_fail += 1
            failures.append(f"{name}: rel err {worst:.3e} in {where}")
    for f in failures:
        print("FAIL:", f)
    total_fail = n_fail + routing_fail
    print(f"self-test: {n_pass}/{len(combos)} finite-difference cases passed (max rel err {worst_all:.2e}, "
          f"tol {tol:g}, h {h:g}), {n_routing - routing_fail}/{n_routing} routing/config checks passed: "
          f"{'PASS' if total_fail == 0 else 'FAIL'}")
    return total_fail == 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--self-test", action="store_true", help="finite-difference and routing self-check")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--verbose", "-v", action="store_true")
    ap.add_argument("--config", help="run the reference on files: config JSON")
    ap.add_argument("--weights", help="weights safetensors")
    ap.add_argument("--input", help="input safetensors (input, optional R)")
    ap.add_argument("--output", help="output safetensors (F64)")
    ap.add_argument("--prefix", default="")
    args = ap.parse_args(argv)
    if args.self_test:
        return 0 if self_test(seed=args.seed, tol=args.tol, verbose=args.verbose) else 1
    if args.config and args.weights and args.input and args.output:
        import json
        from safetensors_io import read_safetensors, write_safetensors
        with open(args.config) as f:
            cfg = json.load(f)
        weights = strip_prefix(read_safetensors(args.weights), args.prefix)
        inp = read_safetensors(args.input)
        y, dx, grads, _ = layer(cfg, weights, inp["input"], inp.get("R"))
        out = {"output": y}
        if dx is not None:
            out["input.grad"] = dx
            out.update({f"{args.prefix}{k}.grad": v for k, v in grads.items()})
        write_safetensors(args.output, out, keep_f64=True)
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
