#!/usr/bin/env python
"""Launch-configuration sweep for the fused Next-ViT kernels.

For every op at the Next-ViT-S stage shapes of bench/ops_bench.py (batch 256, fp16 by
default) it times the configuration the op's ``_config`` returns today and a small,
hand-picked set of alternatives, each applied by temporarily replacing the op module's
``_config`` attribute (the launchers look it up at call time). Every configuration is
first run once on NaN-poisoned outputs and checked against the eager reference; one that
fails to compile or launch (e.g. out of shared memory) or gives a wrong result is
recorded and skipped. Then ``harness.time_device`` (median). The op modules are not
changed: the results (bench/results/tune-*.json / .md, and a paste-ready summary of the
``_config`` rules that should change) decide later changes.

    python bench/tune.py [--ops mhca,mlp,...] [--dtype fp16] [--batch 256] [--budget-s 170]
    python bench/tune.py --plan      # print shapes, current configs and candidates; no GPU
    python bench/tune.py --smoke     # CPU, TRITON_INTERPRET=1, tiny shapes: proves the logic

Everything op-specific is in the table TUNE below (module, ``_config`` arguments, candidate
moves, register estimate, problem extents); shapes, costs and eager baselines come from
ops_bench, the timer and the environment from nextvit_kernels.harness. See bench/README.md
("Config sweep").
"""
import copy
import importlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import ops_bench as ob  # noqa: E402  (no torch at import time)
from nextvit_kernels import cli, harness  # noqa: E402

ALL_OPS = ob.ALL_OPS
MAX_CANDIDATES = 12           # hard cap per shape (the brief's bound)
TRITON_DEFAULT_STAGES = 3     # what Triton uses when a launcher passes no num_stages
REG_LIMIT = 128               # fp32 tile values per thread we allow (half of 255 registers)
MAX_WIDE = 256                # widest N / CO tile: wider fp32 accumulators spill (static report)

log = ob.log


# ---------------------------------------------------------------------------------------
# Tuning table. Per op:
#   module   the op module whose `_config` is replaced
#   args     (shape, batch, torch dtype) -> the `_config` arguments the launcher passes
#            (used to plan; the real run records what the launcher actually passed)
#   extents  (shape, batch) -> {config key: problem size}: a tile wider than
#            max(16, next_pow2(size)) is pruned as larger than the problem
#   regs     (cfg, shape) -> fp32 tile values per thread (accumulators and other fp32
#            tiles live at once); more than REG_LIMIT is pruned as a certain spill
#   rules    (cfg, shape) -> reason string or None: op-specific validity
#   inactive (cfg) -> key prefixes the config's mode ignores (MLP / MHCA split or fused):
#            a move that only changes those is pruned
#   moves    hand-picked changes applied to the current config, most promising first;
#            dotted keys address e_mhsa's {"kv": {...}, "attn": {...}} sub-dicts
# ---------------------------------------------------------------------------------------
def _p2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _g(cfg, key, default=None):
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return default
        cfg = cfg[part]
    return cfg


def _warps(cfg, prefix=""):
    return _g(cfg, prefix + "num_warps", 4)


def _hw2(s):
    return s["hw"] * s["hw"]


def _conv_rules(cfg, s):
    if cfg["FLAT_K"]:
        if cfg["BLOCK_K"] < 9 * s["cin"]:
            return f"FLAT_K needs BLOCK_K >= 9*C_in = {9 * s['cin']}"
        if cfg["num_stages"] != 1:
            return "FLAT_K has no K loop to pipeline"
    return None


def _emhsa_rules(cfg, s):
    nk = _hw2(s) // s["sr"] ** 2
    for k in ("attn", "heads"):
        if _g(cfg, f"{k}.ONE_TILE") and _g(cfg, f"{k}.BLOCK_N") < nk:
            return f"ONE_TILE needs {k}.BLOCK_N >= Nk = {nk}"
    return None


TUNE = {
    "mhca": dict(
        module="nextvit_kernels.ops.mhca",
        args=lambda s, b, dt: (s["c"], s["c"], dt.itemsize, b * _hw2(s)),
        extents=lambda s, b: {"fused.BLOCK_M": b * _hw2(s), "fused.BLOCK_N": s["c"], "conv.BLOCK_M": b * _hw2(s),
                              "proj.BLOCK_M": b * _hw2(s), "proj.BLOCK_N": s["c"], "proj.BLOCK_H": s["c"]},
        # fused: projection accumulator [M, N] + per-head conv accumulator [M, 32];
        # split: conv kernel [M, 32], projection GEMM [M, N]
        regs=lambda c, s: (max(_g(c, "conv.BLOCK_M") * 32 / (32 * _warps(c, "conv.")),
                               _g(c, "proj.BLOCK_M") * _g(c, "proj.BLOCK_N") / (32 * _warps(c, "proj.")))
                           if c["split"] else
                           _g(c, "fused.BLOCK_M") * (_g(c, "fused.BLOCK_N") + 32) / (32 * _warps(c, "fused."))),
        inactive=lambda c: ("fused.",) if c["split"] else ("conv.", "proj."),
        moves=[{"split": False}, {"split": True},
               {"fused.num_stages": 3}, {"fused.num_stages": 1},
               {"fused.BLOCK_M": 128, "fused.BLOCK_N": 128, "fused.num_warps": 8},
               {"fused.BLOCK_M": 64, "fused.BLOCK_N": 128, "fused.num_warps": 4},
               {"fused.BLOCK_M": 64, "fused.num_warps": 8},
               {"fused.BLOCK_M": 128, "fused.BLOCK_N": 64, "fused.num_warps": 4},
               {"split": True, "conv.BLOCK_M": 128, "conv.num_warps": 8},
               {"split": True, "proj.BLOCK_M": 128, "proj.BLOCK_N": 128, "proj.num_warps": 8},
               {"split": True, "proj.BLOCK_N": 128},
               {"fused.num_warps": 4}]),
    "mlp": dict(
        module="nextvit_kernels.ops.mlp",
        args=lambda s, b, dt: (s["c1"], s["c2"], s["hid"], s["cout"], dt),
        extents=lambda s, b: {"mlp.BLOCK_M": b * _hw2(s), "mlp.BLOCK_N": s["cout"], "mlp.BLOCK_H": s["hid"],
                              "mlp.BLOCK_K": max(s["c1"], s["c2"]), "fc1.BLOCK_M": b * _hw2(s),
                              "fc1.BLOCK_H": s["hid"], "fc1.BLOCK_K": max(s["c1"], s["c2"])},
        # fused: output accumulator [M, N] + hidden accumulator [M, H] in one kernel;
        # split: the fc2 kernel holds [M, N], the fc1 kernel [M, H].
        regs=lambda c, s: (max(_g(c, "mlp.BLOCK_M") * _g(c, "mlp.BLOCK_N") / (32 * _warps(c, "mlp.")),
                               _g(c, "fc1.BLOCK_M") * _g(c, "fc1.BLOCK_H") / (32 * _warps(c, "fc1.")))
                           if c["split"] else
                           (_g(c, "mlp.BLOCK_M") * (_g(c, "mlp.BLOCK_N") + _g(c, "mlp.BLOCK_H")))
                           / (32 * _warps(c, "mlp."))),
        inactive=lambda c: () if c["split"] else ("fc1.",),
        moves=[{"split": False, "mlp.BLOCK_M": 64, "mlp.BLOCK_N": 256, "mlp.num_warps": 8,
                "mlp.num_stages": 2},  # the one-kernel mode with recompute, as before split existed
               {"split": True},
               {"mlp.num_stages": 3}, {"mlp.num_stages": 4},
               {"mlp.BLOCK_H": 128}, {"mlp.BLOCK_H": 32},
               {"mlp.BLOCK_K": 64}, {"mlp.BLOCK_K": 32},
               {"split": True, "fc1.BLOCK_H": 256},
               {"split": True, "fc1.num_stages": 4},
               {"split": True, "mlp.BLOCK_M": 64, "mlp.BLOCK_N": 256},
               {"mlp.BLOCK_M": 128, "mlp.BLOCK_N": 128, "mlp.num_warps": 8},
               {"mlp.BLOCK_M": 64, "mlp.num_warps": 8}]),
    "patch_embed": dict(
        module="nextvit_kernels.ops.patch_embed",
        args=lambda s, b, dt: (s["cin"], s["cout"], s["stride"], dt),
        extents=lambda s, b: dict(BLOCK_M=b * ob._pool_out(s["hw"], s["stride"]) ** 2,
                                  BLOCK_N=s["cout"], BLOCK_K=s["cin"]),
        # accumulator [M, N] (+ the fp32 pooled A tile [M, K] at stride 2)
        regs=lambda c, s: (c["BLOCK_M"] * c["BLOCK_N"]
                           + (c["BLOCK_M"] * c["BLOCK_K"] if s["stride"] == 2 else 0)) / (32 * _warps(c)),
        moves=[{"num_stages": 3}, {"num_stages": 4}, {"num_stages": 2},
               {"BLOCK_K": 64}, {"BLOCK_K": 32},
               {"BLOCK_M": 64, "BLOCK_N": 256, "num_warps": 8},
               {"num_warps": 4},
               {"BLOCK_M": 64, "num_warps": 4},
               {"BLOCK_N": 64, "num_warps": 4}]),
    "conv_bn_relu": dict(
        module="nextvit_kernels.ops.conv_bn_relu",
        args=lambda s, b, dt: (s["cin"], s["cout"], dt.itemsize),
        extents=lambda s, b: dict(BLOCK_M=b * ob._conv_out(s["hw"], s["stride"]) ** 2, BLOCK_N=s["cout"],
                                  BLOCK_K=9 * s["cin"] if 9 * s["cin"] <= 64 else s["cin"]),
        regs=lambda c, s: c["BLOCK_M"] * c["BLOCK_N"] / (32 * _warps(c)),
        rules=_conv_rules,
        moves=[{"num_stages": 2}, {"num_stages": 4},
               {"num_warps": 8},
               {"BLOCK_M": 64},
               {"BLOCK_M": 256, "num_warps": 8},
               {"BLOCK_K": 32}, {"BLOCK_K": 64},
               {"BLOCK_N": 32}]),
    "e_mhsa": dict(
        module="nextvit_kernels.ops.e_mhsa",
        args=lambda s, b, dt: (_hw2(s), s["c"], s["c"], _hw2(s) // s["sr"] ** 2, ob.HEAD_DIM, s["sr"]),
        extents=lambda s, b: {"attn.BLOCK_M": _hw2(s), "attn.BLOCK_CO": s["c"], "attn.BLOCK_K": s["c"],
                              "kv.BLOCK_NK": b * (_hw2(s) // s["sr"] ** 2), "kv.BLOCK_O": s["c"],
                              "kv.BLOCK_K": s["c"]},
        # attn: accumulator [M, CO] + q [M, 32] + o [M, 32] + scores [M, N];
        # kv: k and v accumulators [NK, O] each + the pooling tile [NK, R, K]
        # split: the per-head kernel holds q, o and the scores; the projection GEMM [M, N]
        regs=lambda c, s: max(
            (max(_g(c, "heads.BLOCK_M") * (2 * ob.HEAD_DIM + _g(c, "heads.BLOCK_N")) / (32 * _warps(c, "heads.")),
                 _g(c, "proj.BLOCK_M") * _g(c, "proj.BLOCK_N") / (32 * _warps(c, "proj.")))
             if c["split"] else
             (_g(c, "attn.BLOCK_M") * (_g(c, "attn.BLOCK_CO") + 2 * ob.HEAD_DIM + _g(c, "attn.BLOCK_N")))
             / (32 * _warps(c, "attn."))),
            (_g(c, "kv.BLOCK_NK") * (2 * _g(c, "kv.BLOCK_O")
                                     + (_g(c, "kv.BLOCK_R") * _g(c, "kv.BLOCK_K") if _g(c, "kv.POOL") else 0)))
            / (32 * _warps(c, "kv."))),
        rules=_emhsa_rules,
        inactive=lambda c: ("attn.",) if c["split"] else ("heads.", "proj."),
        moves=[{"split": False}, {"split": True},
               {"attn.num_stages": 2}, {"attn.num_stages": 1},
               {"attn.BLOCK_CO": 128},
               {"attn.BLOCK_CO": 128, "attn.num_warps": 4},
               {"attn.BLOCK_K": 32},
               {"attn.BLOCK_M": 128, "attn.BLOCK_CO": 128},
               {"kv.num_warps": 4},
               {"kv.BLOCK_NK": 64}, {"kv.BLOCK_NK": 32},
               {"heads.num_warps": 8}, {"proj.BLOCK_M": 64, "proj.BLOCK_N": 64, "proj.num_warps": 4},
               {"attn.num_stages": 4}]),
    "head": dict(
        module="nextvit_kernels.ops.head",
        args=lambda s, b, dt: (_hw2(s), s["c"], s["n"]),
        extents=lambda s, b: dict(BLOCK_HW=_hw2(s), BLOCK_K=s["c"], BLOCK_N=s["n"]),
        # fp32 weight tile [N, K] + fp32 activation tile [HW, K]
        regs=lambda c, s: (c["BLOCK_N"] + c["BLOCK_HW"]) * c["BLOCK_K"] / (32 * _warps(c)),
        moves=[{"BLOCK_N": 64}, {"BLOCK_N": 256, "num_warps": 8},
               {"BLOCK_K": 32}, {"BLOCK_K": 128, "num_warps": 8},
               {"num_warps": 8}, {"BLOCK_N": 64, "num_warps": 2},
               {"BLOCK_HW": 32}, {"BLOCK_HW": 16}]),
}


# ---------------------------------------------------------------------------------------
# Config helpers (pure Python)
# ---------------------------------------------------------------------------------------
def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _normal(cfg):
    """Flat view with Triton's default num_stages filled in (for dedupe and diffs)."""
    flat = _flat(cfg)
    prefixes = {k.rsplit(".", 1)[0] + "." if "." in k else "" for k in flat}
    for p in prefixes:
        flat.setdefault(p + "num_stages", TRITON_DEFAULT_STAGES)
    return flat


def cfg_key(cfg):
    return json.dumps(_normal(cfg), sort_keys=True, default=str)


def cfg_diff(cur, new):
    a, b = _normal(cur), _normal(new)
    parts = [f"{k} {a.get(k)}->{b[k]}" for k in b if a.get(k) != b[k]]
    return ", ".join(parts) if parts else "(current)"


def apply_move(cur, move):
    cfg = copy.deepcopy(cur)
    for key, val in move.items():
        d = cfg
        *path, last = key.split(".")
        for part in path:
            d = d[part]
        d[last] = val
    return cfg


def prune_reason(op, s, b, cfg, cur):
    """Why `cfg` is not worth compiling, or None. Only what the move changed is judged:
    the current config is always timed, whatever it is."""
    t = TUNE[op]
    flat, base = _normal(cfg), _normal(cur)
    changed = {k: v for k, v in flat.items() if base.get(k) != v}
    unused = t.get("inactive", lambda c: ())(cfg)
    if unused and changed and all(k.startswith(unused) for k in changed):
        return f"changes only {'/'.join(unused)} settings, which this mode (split={cfg['split']}) does not use"
    for key, size in t["extents"](s, b).items():
        v = changed.get(key)
        if v is not None and v > max(16, _p2(size)) and v > base.get(key, 0):
            return f"{key}={v} is larger than the problem ({size})"
    for key, v in changed.items():
        if key.rsplit(".", 1)[-1] in ("BLOCK_N", "BLOCK_CO") and v > MAX_WIDE and op != "head":
            return f"{key}={v} > {MAX_WIDE}: wider fp32 accumulators spill (static report)"
        if key.endswith("num_warps") and (v < 1 or v > 16 or v & (v - 1)):
            return f"{key}={v} is not a power of two in [1, 16]"
    regs = t["regs"](cfg, s)
    if regs > REG_LIMIT and regs > t["regs"](cur, s):
        return f"~{regs:.0f} fp32 tile values per thread > {REG_LIMIT}: would spill"
    rule = t.get("rules")
    return rule(cfg, s) if rule else None


def plan_candidates(op, s, b, cur, cap, tiles_first=False):
    """(candidates, pruned): candidates are dicts {cfg, diff}; pruned are (diff, reason).
    tiles_first (smoke): moves that change a BLOCK_* size first, since the interpreter
    ignores num_warps / num_stages and only a tile change proves the patch reaches the kernel."""
    seen = {cfg_key(cur)}
    cands, pruned = [], []
    moves = TUNE[op]["moves"]
    if tiles_first:
        moves = sorted(moves, key=lambda m: not any("BLOCK_" in k for k in m))
    for move in moves:
        try:
            cfg = apply_move(cur, move)
        except (KeyError, TypeError) as e:
            pruned.append((str(move), f"move does not apply to this config ({e!r})"))
            continue
        key = cfg_key(cfg)
        if key in seen:
            continue
        seen.add(key)
        diff = cfg_diff(cur, cfg)
        why = prune_reason(op, s, b, cfg, cur)
        if why:
            pruned.append((diff, why))
        elif len(cands) >= cap:
            pruned.append((diff, f"over the per-shape cap of {cap} candidates"))
        else:
            cands.append(dict(cfg=cfg, diff=diff))
    return cands, pruned


def _py(v):
    if isinstance(v, dict):
        if all(isinstance(x, dict) for x in v.values()):
            return "{" + ", ".join(f"{k!r}: {_py(x)}" for k, x in v.items()) + "}"
        return "dict(" + ", ".join(f"{k}={x!r}" for k, x in v.items()) + ")"
    return repr(v)


def _args_repr(args):
    return "(" + ", ".join(repr(a) for a in args) + ("," if len(args) == 1 else "") + ")"


# ---------------------------------------------------------------------------------------
# CLI and plan
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = cli.parser("Time each fused op's current _config against a few hand-picked alternatives "
                   "(needs a CUDA GPU; --plan and --smoke run on the CPU).")
    p.add_argument("--ops", type=cli.csv("op", ALL_OPS), default=list(ALL_OPS),
                   help=f"comma list from {','.join(ALL_OPS)}")
    p.add_argument("--batch", type=cli.csv("batch", conv=cli.positive_int), default=[256],
                   help="comma list of batch sizes (GPU; --smoke uses 1)")
    p.add_argument("--dtype", type=cli.csv("dtype", ("fp16", "bf16")), default=["fp16"],
                   help="comma list from fp16,bf16 (GPU; --smoke uses fp32)")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="start no new shape after this many seconds (warm-up included); the results "
                        "are still written (0 = no limit)")
    p.add_argument("--max-candidates", type=int, default=8,
                   help=f"alternatives per shape besides the current config, 0..{MAX_CANDIDATES} (--smoke: at most 2)")
    p.add_argument("-j", "--jobs", type=int, default=None,
                   help="processes that compile every planned config in parallel first, filling Triton's "
                        "cache (None: min(8, CPUs) on a GPU, 2 with --smoke; 0 = no warm-up)")
    p.add_argument("--warm-s", type=float, default=None,
                   help="time limit of that warm-up (None: 0.55 x --budget-s)")
    p.add_argument("--min-gain", type=float, default=0.03,
                   help="a candidate must beat the current config by this fraction and by the "
                        "current config's own run-to-run spread to count as a change")
    p.add_argument("--warmup-ms", type=float, default=10.0,
                   help="warm-up time per timing (harness.time_device; --smoke: one wall-clock call)")
    p.add_argument("--rep-ms", type=float, default=40.0, help="measured time per timing")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="folder for the JSON / Markdown results")
    p.add_argument("--plan", action="store_true",
                   help="print shapes, current configs and candidates (pruned ones with reasons); no GPU")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, TRITON_INTERPRET=1, ops_bench's tiny shapes, batch 1, float32, "
                        "1-call timer, 2 candidates per shape, plus two synthetic failures")
    p.add_argument("--seed", type=int, default=0, help="seed of the first shape's inputs (+1 per shape)")
    args = p.parse_args(argv)
    if not 0 <= args.max_candidates <= MAX_CANDIDATES:
        p.error(f"--max-candidates must be in [0, {MAX_CANDIDATES}]")
    for name in ("budget_s", "warm_s", "min_gain", "warmup_ms", "rep_ms", "jobs"):
        v = getattr(args, name)
        if v is not None and v < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if args.smoke and args.plan:
        p.error("--smoke and --plan: choose one")
    ignored = [f for f, d in (("--batch", [256]), ("--dtype", ["fp16"])) if getattr(args, f[2:]) != d]
    if args.smoke and ignored:
        log(f"tune --smoke: {', '.join(ignored)} not applied (the CPU run is batch 1, fp32)")
    if args.smoke:
        args.max_candidates = min(args.max_candidates, 2)
    if args.jobs is None:
        args.jobs = 2 if args.smoke else min(8, os.cpu_count() or 1)
    if args.warm_s is None:
        args.warm_s = 0.55 * args.budget_s if args.budget_s else 300.0
    return args


def plan_rows(args):
    """Rows (one per op/shape/batch/dtype) with costs, current config and candidates,
    costliest first within each (dtype, batch) so a budget cut drops the cheapest shapes."""
    rows = []
    dtypes = ["fp32"] if args.smoke else args.dtype
    batches = [1] if args.smoke else args.batch
    for dt in dtypes:
        tdt = getattr(ob.torch, ob.DTYPE_NAMES[dt])
        group = []
        for b in batches:
            for op in args.ops:
                spec = ob.OP_SPECS[op]
                for s in (spec["smoke"] if args.smoke else spec["shapes"]):
                    esize = tdt.itemsize
                    nbytes, flops = spec["cost"](s, b, esize)
                    row = dict(op=op, shape=dict(s), label=spec["label"](s), batch=b, dtype=dt,
                               bytes=nbytes, flops=flops,
                               floor_ms=ob.floor_seconds(nbytes, flops) * 1e3)
                    mod = importlib.import_module(TUNE[op]["module"])
                    row["config_args"] = TUNE[op]["args"](s, b, tdt)
                    row["current"] = mod._config(*row["config_args"])
                    row["candidates"], row["pruned"] = plan_candidates(
                        op, s, b, row["current"], args.max_candidates, args.smoke)
                    group.append(row)
        group.sort(key=lambda r: (batches.index(r["batch"]), -r["floor_ms"]))
        rows += group
    if args.smoke and rows:
        # Synthetic failures on the first row prove that a failing config is recorded and skipped.
        rows[0]["candidates"] += [
            dict(cfg=rows[0]["current"], diff="smoke self-test: _config raises", selftest="raise"),
            dict(cfg=rows[0]["current"], diff="smoke self-test: corrupted output", selftest="corrupt")]
    return rows


def print_plan(rows):
    for i, r in enumerate(rows, 1):
        log(f"{i:2d}. {r['op']} {r['label']} B{r['batch']} {r['dtype']}  floor {r['floor_ms'] * 1e3:.1f} us"
            f"  _config{_args_repr(r['config_args'])}")
        log(f"      current: {_py(r['current'])}")
        for c in r["candidates"]:
            log(f"      try    : {c['diff']}")
        for diff, why in r["pruned"]:
            log(f"      pruned : {diff}  [{why}]")
    n = sum(1 + len(r["candidates"]) for r in rows)
    log(f"{len(rows)} shapes, {n} configs to compile and time")


# ---------------------------------------------------------------------------------------
# Running one configuration (main process and warm-up workers)
# ---------------------------------------------------------------------------------------
def _sync(dev):
    if dev.type == "cuda":
        ob.torch.cuda.synchronize()


def _build(row, dev):
    ob.torch.manual_seed(row.get("seed", 0))
    return ob.build(row["op"], row["shape"], row["batch"], dev, row["dtype"])


def run_config(mod, fused, cfg, dev, selftest=None):
    """Runs the op once with `mod._config` replaced by one returning `cfg` (None: the
    original, recorded). Outputs are NaN-poisoned. Returns (output, _config args seen)."""
    orig = mod._config
    seen = []

    def patched(*a, **k):
        seen.append(a + tuple(k.values()))
        if selftest == "raise":
            raise RuntimeError("smoke self-test: simulated compile failure")
        return orig(*a, **k) if cfg is None else copy.deepcopy(cfg)

    mod._config = patched
    try:
        ob._common.POISON_OUTPUTS = True
        out = fused()
        _sync(dev)
    finally:
        ob._common.POISON_OUTPUTS = False
        mod._config = orig
    if not seen:
        raise RuntimeError("the launcher did not call the module's _config: the patch had no effect")
    if selftest == "corrupt":
        out = out + 0
        out[(0,) * out.dim()] += 1e3
    return out, seen[0]


def timed(mod, fused, cfg, timer):
    """do_bench of the op with `mod._config` replaced (cfg None: the original)."""
    orig = mod._config
    if cfg is not None:
        mod._config = lambda *a, **k: copy.deepcopy(cfg)
    try:
        return timer(fused)
    finally:
        mod._config = orig


# -------------------------------------------------------------------- parallel warm-up
_W = {}


def _worker_init(smoke):
    ob._import_torch_stack(smoke)
    _W["dev"] = ob.torch.device("cpu") if smoke else ob.torch.device("cuda", 0)


def _worker(job):
    """Compiles one (row, config) by running it once; the kernel lands in Triton's cache."""
    row, cfg = job
    dev = _W["dev"]
    t = time.perf_counter()
    if _W.get("broken"):  # a sticky CUDA error earlier in this process: leave the rest to the main run
        return False, 0.0, _W["broken"]
    try:
        key = (row["op"], json.dumps(row["shape"], sort_keys=True), row["batch"], row["dtype"])
        if _W.get("key") != key:
            _W.pop("case", None)
            _W["case"] = _build(row, dev)
            _W["key"] = key
        fused = _W["case"].call("triton")
        mod = importlib.import_module(TUNE[row["op"]]["module"])
        with ob.torch.no_grad():
            run_config(mod, fused, cfg, dev)
        return True, time.perf_counter() - t, None
    except Exception as e:
        err = ob._err(e)
        if any(m in err for m in ob.CUDA_FATAL):
            _W["broken"] = "worker CUDA context broken earlier: " + err
        return False, time.perf_counter() - t, err


def warm_up(rows, jobs, limit_s, smoke):
    """Runs every planned config once in `jobs` spawned processes (Triton compiles serially
    per process; the on-disk cache is shared), for at most limit_s seconds."""
    work = []
    for r in rows:
        slim = {k: r[k] for k in ("op", "shape", "batch", "dtype", "seed")}
        work.append((slim, None))
        work += [(slim, c["cfg"]) for c in r["candidates"] if not c.get("selftest")]
    t0 = time.perf_counter()
    res = dict(jobs=jobs, configs=len(work), done=0, failed=0, limit_s=limit_s, complete=False)
    log(f"warm-up: {len(work)} configs in {jobs} processes (limit {limit_s:.0f} s) ...")
    pool = mp.get_context("spawn").Pool(jobs, initializer=_worker_init, initargs=(smoke,))
    try:
        it = pool.imap_unordered(_worker, work)
        for _ in range(len(work)):
            left = limit_s - (time.perf_counter() - t0)
            if left <= 0:
                raise mp.TimeoutError
            ok, _, err = it.next(timeout=left)
            res["done"] += 1
            res["failed"] += 0 if ok else 1
        res["complete"] = True
    except mp.TimeoutError:
        log(f"warm-up: time limit reached after {res['done']}/{len(work)} configs; the rest compile when timed")
    except Exception as e:
        log(f"warm-up: stopped ({ob._err(e)}); the rest compile when timed")
    finally:
        pool.terminate()
        pool.join()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"warm-up: {res['done']} configs run ({res['failed']} failed: recorded again when timed) "
        f"in {res['wall_s']:.0f} s")
    return res


# -------------------------------------------------------------------- one shape
def tune_row(row, dev, timer, args):
    """Checks and times the current config and every candidate of one shape. Never raises."""
    t_row = time.perf_counter()
    mod = importlib.import_module(TUNE[row["op"]]["module"])
    row.update(status="FAIL", error=None, tol=ob.TOLERANCE[row["dtype"]], results=[])
    try:
        case = _build(row, dev)
        fused, as_ref = case.call("triton"), case.as_ref
        ref = case.eager(*case.args)
        _sync(dev)
    except Exception as e:
        row["error"] = "build/reference: " + ob._err(e)
        if any(m in row["error"] for m in ob.CUDA_FATAL):
            row["fatal"] = row["error"]
        return row

    def check(cfg, selftest=None):
        res = dict(status="error", rel_err=None, error=None, first_call_s=None)
        try:
            t = time.perf_counter()
            out, seen = run_config(mod, fused, cfg, dev, selftest)
            res["first_call_s"] = round(time.perf_counter() - t, 3)
            err = ob.rel_error(as_ref(out), ref)
            res["rel_err"] = err
            res["status"] = "ok" if err <= row["tol"] else "wrong"
            if res["status"] == "wrong":
                res["error"] = ("output has NaN/inf (unwritten or overflow)" if math.isinf(err) else
                                f"max|out-ref|/max|ref| = {err:.3g} > {row['tol']:g}")
            del out
            return res, seen
        except Exception as e:
            res["error"] = ob._err(e)
            return res, None

    # Current config: run through the original _config, recording what the launcher passes.
    cur, seen = check(None)
    if seen is not None:
        args_seen = tuple(seen)
        if args_seen != tuple(row["config_args"]):
            row["note"] = (f"launcher passed _config{_args_repr(args_seen)}, planned "
                           f"{_args_repr(row['config_args'])}: candidates re-planned")
            row["config_args"] = args_seen
            row["current"] = mod._config(*args_seen)
            row["candidates"], row["pruned"] = plan_candidates(
                row["op"], row["shape"], row["batch"], row["current"], args.max_candidates, args.smoke)
    if cur["status"] != "ok":
        row["error"] = f"current config: {cur['error']}"
        if any(m in (cur["error"] or "") for m in ob.CUDA_FATAL):
            row["fatal"] = cur["error"]
        return row
    try:
        cur["t1"] = timed(mod, fused, None, timer)
    except Exception as e:
        row["error"] = "timing current config: " + ob._err(e)
        return row
    row["status"] = "ok"

    for cand in row["candidates"]:
        res, _ = check(cand["cfg"], cand.get("selftest"))
        res.update(diff=cand["diff"], cfg=cand["cfg"])
        if cand.get("selftest"):
            res["selftest"] = cand["selftest"]
        if res["status"] == "ok":
            try:
                res["timing"] = timed(mod, fused, cand["cfg"], timer)
                res["ms"] = res["timing"]["ms"]
            except Exception as e:
                res.update(status="error", error="timing: " + ob._err(e))
        row["results"].append(res)
        if res["status"] == "error" and any(m in (res["error"] or "") for m in ob.CUDA_FATAL):
            row["fatal"] = res["error"]
            break

    if not row.get("fatal"):
        try:
            cur["t2"] = timed(mod, fused, None, timer)  # second run of the same config: the noise
        except Exception as e:
            row["error"] = "re-timing current config: " + ob._err(e)
    row["current_result"] = cur
    row["wall_s"] = round(time.perf_counter() - t_row, 2)
    return row


def derive(row, min_gain):
    cur = row.get("current_result") or {}
    t = [cur[k]["ms"] for k in ("t1", "t2") if cur.get(k)]
    row["current_ms"] = sum(t) / len(t) if t else None
    row["noise"] = abs(t[0] - t[1]) / row["current_ms"] if len(t) == 2 else None
    ok = [r for r in row.get("results", []) if r["status"] == "ok" and not r.get("selftest")]
    row["counts"] = {s: sum(1 for r in row.get("results", []) if r["status"] == s and not r.get("selftest"))
                     for s in ("ok", "wrong", "error")}
    row["counts"]["pruned"] = len(row.get("pruned", []))
    row["best"] = None
    if row["current_ms"]:
        best = min(ok, key=lambda r: r["ms"], default=None)
        row["pct_floor_before"] = 100.0 * row["floor_ms"] / row["current_ms"]
        if best is not None and best["ms"] < row["current_ms"]:
            row["best"] = dict(cfg=best["cfg"], diff=best["diff"], ms=best["ms"])
        else:
            row["best"] = dict(cfg=row["current"], diff="(current)", ms=row["current_ms"])
        row["best_ms"] = row["best"]["ms"]
        row["speedup"] = row["current_ms"] / row["best_ms"]
        row["pct_floor_after"] = 100.0 * row["floor_ms"] / row["best_ms"]
        threshold = max(min_gain, row["noise"] or 0.0)
        row["verdict"] = "change" if row["best_ms"] < row["current_ms"] * (1 - threshold) else "keep"
    else:
        row.update(best_ms=None, speedup=None, pct_floor_before=None, pct_floor_after=None, verdict="-")
    return row


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------
COLUMNS = [  # (header, key, format) of the printed and the Markdown table
    ("op", "op", "{}"), ("shape", "label", "{}"), ("B", "batch", "{}"), ("dtype", "dtype", "{}"),
    ("check", "status", "{}"), ("current ms", "current_ms", "{:.4f}"), ("% floor", "pct_floor_before", "{:.0f}"),
    ("best ms", "best_ms", "{:.4f}"), ("% floor", "pct_floor_after", "{:.0f}"), ("speed-up", "speedup", "{:.2f}x"),
    ("noise", lambda r: r.get("noise") and 100 * r["noise"], "{:.1f}%"), ("verdict", "verdict", "{}"),
    ("best change", lambda r: (r.get("best") or {}).get("diff"), "{}"),
    ("ok/wrong/err/pruned", lambda r: "/".join(str(r.get("counts", {}).get(k, 0))
                                               for k in ("ok", "wrong", "error", "pruned")), "{}"),
]


def rules_summary(rows, env):
    """Markdown/plain text: per op, which shapes want a different config and a paste-ready
    table keyed by the `_config` arguments."""
    lines = []
    for op in ALL_OPS:
        sel = [r for r in rows if r["op"] == op and r.get("current_ms")]
        if not sel:
            continue
        changed = [r for r in sel if r["verdict"] == "change"]
        where = f"{TUNE[op]['module'].replace('.', '/')}.py::_config"
        lines.append(f"### {op} ({where})")
        lines.append("")
        if not changed:
            lines.append(f"- keep the current rules: no candidate beat them by more than the threshold "
                         f"at {len(sel)} shape(s)")
            lines.append("")
            continue
        for r in sel:
            if r["verdict"] == "change":
                lines.append(f"- {r['label']} B{r['batch']} {r['dtype']}: {r['best']['diff']}: "
                             f"{r['current_ms']:.4f} -> {r['best_ms']:.4f} ms ({r['speedup']:.2f}x, "
                             f"noise {100 * (r['noise'] or 0):.1f}%)")
            else:
                lines.append(f"- {r['label']} B{r['batch']} {r['dtype']}: keep (best {r['speedup']:.2f}x)")
        counts = {}
        for r in changed:
            for part in r["best"]["diff"].split(", "):
                counts[part] = counts.get(part, 0) + 1
        common = sorted(counts.items(), key=lambda kv: -kv[1])
        lines.append("- changes by how many shapes chose them: "
                     + "; ".join(f"{k} ({n}/{len(sel)})" for k, n in common))
        lines.append("")
        lines.append("```python")
        lines.append(f"# {op}._config: measured best per call ({env['card']}, triton {env['triton']}); "
                     "look the arguments up first, fall back to the rules")
        lines.append("_TUNED = {")
        for r in changed:
            lines.append(f"    {_args_repr(r['config_args'])}: {_py(r['best']['cfg'])},  "
                         f"# {r['label']} B{r['batch']} {r['dtype']}: {r['speedup']:.2f}x")
        lines.append("}")
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


def markdown(meta, rows):
    env = meta["env"]
    lines = [f"# Launch-config sweep: {env['card']}", ""]
    facts = [("card", env["card"]), ("driver", env.get("driver")),
             ("CUDA driver API", env.get("cuda_driver_api")), ("CUDA", env.get("cuda")),
             ("torch", env["torch"]), ("triton", env["triton"]), ("commit", env.get("commit")),
             ("date", env["date"])]
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in facts if v is not None))
    lines.append(f"- {env['ceiling_note']}; floor = max(bytes / {ob.DRAM_BYTES_PER_S / 1e12:.2f} TB/s, "
                 f"flops / {ob.TENSOR_FLOPS_PER_S / 1e12:.0f} TFLOP/s) (ops_bench's costs)")
    lines.append(f"- timing: {meta['timer']}; current ms = mean of two runs of the current config "
                 "(before and after the candidates), noise = their difference / mean")
    lines.append(f"- verdict `change` when best < current x (1 - max({meta['args']['min_gain']}, noise)); "
                 f"check: max|out - ref| / max|ref| <= {ob.TOLERANCE} on NaN-poisoned outputs")
    w = meta.get("warm") or {}
    lines.append(f"- warm-up: {w.get('done', 0)}/{w.get('configs', 0)} configs compiled in "
                 f"{w.get('jobs', 0)} processes in {w.get('wall_s', 0)} s; sweep wall time "
                 f"{meta.get('wall_s', 0):.0f} s" + ("" if meta.get("done") else " (incomplete)")
                 + (f"; stopped: {meta['stopped']}" if meta.get("stopped") else ""))
    lines.append("")
    lines.append(harness.format_table(rows, COLUMNS, markdown=True))
    lines += ["", "## Suggested `_config` changes", "", rules_summary(rows, env), "## Every configuration", ""]
    for r in rows:
        lines.append(f"### {r['op']} {r['label']} B{r['batch']} {r['dtype']}: "
                     f"`_config{_args_repr(r['config_args'])}`")
        lines.append("")
        if r.get("error"):
            lines.append(f"- error: {r['error']}")
        if r.get("note"):
            lines.append(f"- note: {r['note']}")
        cur = r.get("current_result") or {}
        ts = ", ".join(f"{cur[k]['ms']:.4f}" for k in ("t1", "t2") if cur.get(k))
        lines.append(f"- current `{_py(r['current'])}`: {cur.get('status', '-')} ({ts or '-'} ms)")
        for x in r.get("results", []):
            got = (f"{x['ms']:.4f} ms ({r['current_ms'] / x['ms']:.2f}x)" if x.get("ms") and r.get("current_ms")
                   else f"{x['status']}: {x['error']}")
            lines.append(f"- {x['diff']}: {got}")
        for diff, why in r.get("pruned", []):
            lines.append(f"- {diff}: pruned ({why})")
        lines.append("")
    if meta.get("not_run"):
        lines += [f"## Not run ({meta.get('stopped')})", ""] + [f"- {x}" for x in meta["not_run"]] + [""]
    return "\n".join(lines)


def write_results(base, meta, rows):
    harness.write_json(base.with_suffix(".json"), dict(meta=meta, rows=rows))
    base.with_suffix(".md").write_text(markdown(meta, rows))


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    if not (args.smoke or args.plan):
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            log("tune: TRITON_INTERPRET=1 is set; unset it to time compiled kernels on the GPU.")
            return 2
        import torch
        if not torch.cuda.is_available():
            log("tune: no CUDA GPU found. The config sweep times Triton kernels on an NVIDIA GPU "
                "(H100 reference).\nOn this machine you can\n"
                "    python bench/tune.py --plan    # shapes, current configs, candidates (no GPU)\n"
                "    python bench/tune.py --smoke   # the whole sweep on the CPU under TRITON_INTERPRET=1")
            return 2
    # --plan only calls the pure-Python _config functions: the interpreter setting is harmless.
    ob._import_torch_stack(args.smoke or args.plan)
    torch = ob.torch
    rows = plan_rows(args)
    for i, r in enumerate(rows, 1):
        r["seed"] = args.seed + i
    if args.plan:
        print_plan(rows)
        return 0

    dev = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    env = ob.run_environment(args.smoke)
    if args.smoke:  # one call proves the plumbing; the interpreter's times mean nothing
        def timer(fn):
            return harness.host_time_ms(fn, 1, warmup=0)
    else:
        def timer(fn):
            return harness.time_device(fn, args.warmup_ms, args.rep_ms)
    meta = dict(env=env, done=False, wall_s=0.0, warm=None,
                timer=("1 call, wall clock (smoke)" if args.smoke else
                       f"harness.time_device median (CUDA events, L2 flushed before each call), warmup "
                       f"{args.warmup_ms:g} ms, rep {args.rep_ms:g} ms"),
                ceilings=dict(card=ob.CEILING_CARD, dram_bytes_per_s=ob.DRAM_BYTES_PER_S,
                              tensor_flops_per_s=ob.TENSOR_FLOPS_PER_S),
                tolerance=ob.TOLERANCE, limits=dict(reg_limit=REG_LIMIT, max_wide=MAX_WIDE),
                args=dict(ops=args.ops, batch=[1] if args.smoke else args.batch,
                          dtype=["fp32"] if args.smoke else args.dtype, budget_s=args.budget_s,
                          max_candidates=args.max_candidates, jobs=args.jobs, warm_s=args.warm_s,
                          min_gain=args.min_gain, smoke=args.smoke))
    stamp = time.strftime("%Y%m%d-%H%M")
    base = args.out / f"tune-{env['card_slug']}-{stamp}"
    k = 2
    while base.with_suffix(".json").exists():
        base = args.out / f"tune-{env['card_slug']}-{stamp}-{k}"
        k += 1
    log(f"card: {env['card']} | driver {env.get('driver')} | torch {env['torch']} | triton {env['triton']}"
        f" | commit {env.get('commit')}")
    if args.smoke:
        log("smoke mode: CPU, batch 1, float32, tiny shapes, TRITON_INTERPRET=1, 1-call timer "
            "(timings meaningless); --batch / --dtype ignored")
    n_cfg = sum(1 + len(r["candidates"]) for r in rows)
    log(f"{len(rows)} shapes, {n_cfg} configs; budget {args.budget_s:g} s; results -> {base}.{{json,md}}")

    t0 = time.perf_counter()
    if args.jobs > 0 and rows:
        meta["warm"] = warm_up(rows, args.jobs, min(args.warm_s, args.budget_s or args.warm_s), args.smoke)

    done = []
    with torch.no_grad():
        for i, row in enumerate(rows, 1):
            elapsed = time.perf_counter() - t0
            if args.budget_s and elapsed > args.budget_s:
                meta["not_run"] = [f"{r['op']} {r['label']} B{r['batch']} {r['dtype']}" for r in rows[i - 1:]]
                meta["stopped"] = f"--budget-s {args.budget_s:g} reached after {elapsed:.0f} s"
                log(f"stopping: {meta['stopped']}; {len(meta['not_run'])} shapes not run")
                break
            tag = f"[{i}/{len(rows)} {elapsed:5.1f}s] {row['op']} {row['label']} B{row['batch']} {row['dtype']}"
            log(f"{tag} ... {1 + len(row['candidates'])} configs")
            derive(tune_row(row, dev, timer, args), args.min_gain)
            c = row["counts"]
            if row.get("current_ms"):
                log(f"{tag}: current {row['current_ms']:.4f} ms ({row['pct_floor_before']:.0f}% floor), "
                    f"best {row['best_ms']:.4f} ms ({row['speedup']:.2f}x, {row['pct_floor_after']:.0f}% floor) "
                    f"{row['best']['diff']} -> {row['verdict']}; {c['ok']} ok, {c['wrong']} wrong, "
                    f"{c['error']} failed, {c['pruned']} pruned; {row.get('wall_s', 0):.1f} s")
            else:
                log(f"{tag}: FAIL {row['error']}")
            for x in row["results"]:
                if x["status"] != "ok":
                    log(f"    {x['status']}: {x['diff']}: {x['error']}")
            done.append(row)
            meta["wall_s"] = time.perf_counter() - t0
            write_results(base, meta, done)  # after every shape: a killed run keeps what it measured
            if row.get("fatal") and dev.type == "cuda":
                meta["not_run"] = [f"{r['op']} {r['label']} B{r['batch']} {r['dtype']}" for r in rows[i:]]
                meta["stopped"] = f"CUDA context broken ({row['fatal']})"
                log(f"stopping: {meta['stopped']}")
                break
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    meta.update(done=True, wall_s=time.perf_counter() - t0)
    write_results(base, meta, done)

    # The summary first and the table last: a device call returns only the output's tail.
    log("")
    log(rules_summary(done, env))
    log(harness.format_table(done, COLUMNS))
    log("")
    fails = [r for r in done if r["status"] != "ok"]
    bad_selftest = []
    if args.smoke:
        expect = {"raise": "error", "corrupt": "wrong"}
        got = {x["selftest"]: x["status"] for r in done for x in r["results"] if x.get("selftest")}
        bad_selftest = [k for k, v in expect.items() if got.get(k) != v]
        log(f"smoke self-tests: {got} (expected {expect})" + (" FAILED" if bad_selftest else " ok"))
    log(f"wrote {base}.json, {base}.md")
    log(f"{len(done)}/{len(rows)} shapes in {meta['wall_s']:.0f} s (total {time.perf_counter() - t_start:.0f} s); "
        f"{sum(r.get('verdict') == 'change' for r in done)} want a config change; {len(fails)} FAIL"
        + (f"; {len(meta['not_run'])} not run" if meta.get("not_run") else ""))
    for r in fails:
        log(f"  FAIL {r['op']} {r['label']} B{r['batch']} {r['dtype']}: {r['error']}")
    return 1 if fails or meta.get("not_run") or bad_selftest else 0


if __name__ == "__main__":
    sys.exit(main())
