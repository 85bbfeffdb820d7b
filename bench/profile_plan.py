#!/usr/bin/env python
"""Where the time of one fused NextViT forward goes: a per-step profile (docs/design.md §4, §8).

For each batch size it times every step of the fused plan (stem convs, PatchEmbeds, MHCA,
MLP, E-MHSA, head) with CUDA events, the GPU held busy by a sleep kernel first so that the
events measure kernel time and not Python launch time; then the whole forward with eager
launches and as a CUDA-graph replay. Per step: median us, share of the forward, bytes and
FLOPs of the fused op (ops_bench's cost model), % of its roofline floor. The gap between
the graph replay and the sum of the steps is launch/dependency overhead. This is the
profile issue #5 asks for where a target is missed.

    python bench/profile_plan.py [--variant s] [--dtype fp16] [--batch 1,256] [--res 224] [--out DIR]
    python bench/profile_plan.py --cpu-check   # CPU, reference ops, tiny model: checks the plumbing

Writes profile-<card>-<variant>-<dtype>-<date>.json / .md under --out (bench/results).
"""
import datetime
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import ops_bench as ob  # noqa: E402  (no torch at import time)

sys.path.insert(0, str(BENCH.parent))
from nextvit_kernels import cli, harness  # noqa: E402


def describe(op, args, kwargs):
    """(label, ops_bench-style shape dict, cost function) of one plan step from its arguments."""
    x = args[0]
    b, c, h, w = x.shape
    hw = h if h == w else (h * w) ** 0.5  # the cost model takes a square side
    if op == "conv_bn_relu":
        s = dict(cin=c, cout=args[1].shape[0], stride=kwargs["stride"], hw=hw)
        return f"conv3x3 {c}->{s['cout']} s{s['stride']} @{h}x{w}", s, ob._cost_conv_bn_relu
    if op == "patch_embed":
        s = dict(cin=c, cout=args[1].shape[0], stride=kwargs["stride"], hw=hw)
        return f"patch_embed {c}->{s['cout']} s{s['stride']} @{h}x{w}", s, ob._cost_patch_embed
    if op == "mhca":
        s = dict(c=c, hw=hw)
        return f"mhca C{c} @{h}x{w}", s, ob._cost_mhca
    if op == "mlp":
        x2 = kwargs.get("x2")
        c2 = 0 if x2 is None else x2.shape[1]
        s = dict(c1=c, c2=c2, hid=args[1].shape[0], cout=args[3].shape[0], hw=hw)
        return f"mlp {ob._label_mlp(s).split(' @')[0]} @{h}x{w}", s, ob._cost_mlp
    if op == "e_mhsa":
        s = dict(c=c, hw=hw, sr=kwargs["sr_ratio"])
        return f"e_mhsa C{c} N{h * w} sr{s['sr']}", s, ob._cost_e_mhsa
    if op == "head":
        s = dict(hw=hw, c=c, n=args[1].shape[0])
        return f"head {c}->{s['n']} @{h}x{w}", s, ob._cost_head
    raise ValueError(op)


class Recorder:
    """A fused.run backend: calls the real op and brackets it with timing marks."""

    def __init__(self, torch, ops, cuda, impl):
        self.torch, self.ops, self.cuda, self.impl = torch, ops, cuda, impl
        self.calls = []  # (op, args, kwargs, start, end) of the last pass

    def __getattr__(self, op):
        if op.startswith("_"):
            raise AttributeError(op)
        fn = getattr(self.ops, op)

        def call(*args, **kwargs):
            kwargs = dict(kwargs, impl=self.impl)
            if self.cuda:
                s, e = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
                s.record()
                out = fn(*args, **kwargs)
                e.record()
            else:
                s = time.perf_counter()
                out = fn(*args, **kwargs)
                e = time.perf_counter()
            self.calls.append((op, args, kwargs, s, e))
            return out
        return call


def profile_batch(torch, fused, plan, rec, b, res, dtype, dev, iters):
    x = torch.randn(b, 3, res, res, device=dev).to(dtype)
    per_step = None
    for it in range(iters + 2):  # two warm-up passes (compiles, allocator)
        rec.calls = []
        if rec.cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU work: the launches below queue behind it
        fused.run(plan, x, backend=rec)
        if rec.cuda:
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) * 1e3 for (_, _, _, s, e) in rec.calls]
        else:
            times = [(e - s) * 1e6 for (_, _, _, s, e) in rec.calls]
        if it < 2:
            continue
        per_step = [[t] for t in times] if per_step is None else [p + [t] for p, t in zip(per_step, times)]
    rows = []
    esize = torch.empty((), dtype=dtype).element_size()
    for (op, args, kwargs, _, _), ts in zip(rec.calls, per_step):
        label, shape, cost = describe(op, args, kwargs)
        nbytes, flops = cost(shape, b, esize)
        us = statistics.median(ts)
        floor_us = ob.floor_seconds(nbytes, flops) * 1e6
        rows.append(dict(op=op, label=label, us=us, floor_us=floor_us, pct_floor=100 * floor_us / us if us else None,
                         tbps=nbytes / us / 1e6 if us else None, tflops=flops / us / 1e6 if us else None))
    total = sum(r["us"] for r in rows)
    for i, r in enumerate(rows):
        r.update(step=i, share=100 * r["us"] / total if total else None)
    whole = {}
    if rec.cuda:
        def fwd():
            return fused.run(plan, x, impl="triton")
        whole["eager_us"] = harness.time_device(fwd, 25, 100)["ms"] * 1e3
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fwd()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fwd()
        whole["graph_us"] = harness.time_device(g.replay, 25, 100)["ms"] * 1e3
    return dict(batch=b, steps=rows, sum_us=total, floor_us=sum(r["floor_us"] for r in rows), **whole)


def by_op(rows):
    agg = {}
    for r in rows:
        a = agg.setdefault(r["op"], dict(op=r["op"], n=0, us=0.0, floor_us=0.0))
        a["n"] += 1
        a["us"] += r["us"]
        a["floor_us"] += r["floor_us"]
    total = sum(a["us"] for a in agg.values())
    for a in agg.values():
        a.update(share=100 * a["us"] / total if total else None,
                 pct_floor=100 * a["floor_us"] / a["us"] if a["us"] else None)
    return sorted(agg.values(), key=lambda a: -a["us"])


BY_OP = [  # (header, key, format) of the per-op table, rows from by_op()
    ("op", "op", "{}"), ("steps", "n", "{}"), ("us", "us", "{:.1f}"), ("share", "share", "{:.1f}%"),
    ("floor us", "floor_us", "{:.1f}"), ("% floor", "pct_floor", "{:.0f}%"),
]
STEPS = [  # the same for the per-step table, rows from profile_batch()'s steps
    ("step", "step", "{}"), ("what", "label", "{}"), ("us", "us", "{:.1f}"), ("share", "share", "{:.1f}%"),
    ("TB/s", "tbps", "{:.2f}"), ("TFLOP/s", "tflops", "{:.1f}"), ("% floor", "pct_floor", "{:.0f}%"),
]


def markdown(env, results, plan, args):
    out = [f"# Fused NextViT-{args.variant.upper()} per-step profile, {args.dtype}, {args.res}x{args.res}", "",
           f"Card: {env.get('card')}; driver {env.get('driver')}; CUDA {env.get('cuda')}; torch {env.get('torch')}; "
           f"Triton {env.get('triton')}; commit {env.get('commit')}; {env.get('date')}.", "",
           "Kernel launches a forward: " + ", ".join(f"{plan.launches(r['batch'], args.res, args.res)} at batch "
                                                     f"{r['batch']}" for r in results) + ". Step times: CUDA events around each op with the GPU "
           "queue pre-filled (kernel time, not launch time); median of the passes. Floor = max(bytes / 2.98 TB/s, "
           "FLOPs / 753 TFLOP/s) of the fused op (H100 ceilings, DESIGN §7).", ""]
    for r in results:
        out += [f"## batch {r['batch']}", "",
                f"sum of steps {r['sum_us']:.1f} us; floor {r['floor_us']:.1f} us "
                f"({100 * r['floor_us'] / r['sum_us']:.0f}% of the sum)"
                + (f"; whole forward: eager launches {r['eager_us']:.1f} us, CUDA graph {r['graph_us']:.1f} us "
                   f"(graph - sum = {r['graph_us'] - r['sum_us']:.1f} us of launch/dependency gaps)"
                   if "graph_us" in r else ""), "",
                harness.format_table(by_op(r["steps"]), BY_OP, markdown=True),
                "", harness.format_table(r["steps"], STEPS, markdown=True), ""]
    return "\n".join(out)


def parse_args(argv=None):
    p = cli.parser(__doc__, prog="python bench/profile_plan.py")
    p.add_argument("--variant", type=cli.variant, default="s", help="s, b or l (or small, nextvit_small, ...)")
    p.add_argument("--dtype", choices=cli.DTYPES, default="fp16", help="element type")
    p.add_argument("--batch", type=cli.batches, default="1,256", help="comma list of batch sizes")
    p.add_argument("--res", type=cli.positive_int, default=224, help="input height and width")
    p.add_argument("--iters", type=cli.positive_int, default=10, help="timed passes per batch (median)")
    p.add_argument("--out", default=str(BENCH / "results"), help="folder for the JSON and Markdown profile")
    p.add_argument("--cpu-check", action="store_true",
                   help="CPU, reference ops, a tiny model and input: checks the script, times nothing useful, "
                        "writes nothing")
    args = p.parse_args(argv)
    if args.cpu_check:
        cli.not_used(p, argv, ("variant", "dtype", "batch", "res", "iters", "out"), "with --cpu-check")
    return args


def main(argv=None):
    args = parse_args(argv)
    cpu = args.cpu_check
    if cpu:
        args.variant, args.dtype, args.batch, args.res, args.iters = "s", "fp32", [1, 2], 64, 1
    import torch
    if not cpu and not torch.cuda.is_available():
        ob.log("profile_plan: needs a CUDA GPU (it times kernels); --cpu-check checks the script on the CPU.")
        return 2
    ob._import_torch_stack(smoke=False) if not cpu else None
    sys.path.insert(0, str(ob.REPO))
    from nextvit_kernels import fused, model as model_mod, ops
    dev = torch.device("cpu" if cpu else "cuda")
    dtype = getattr(torch, ob.DTYPE_NAMES[args.dtype])
    torch.manual_seed(0)
    if cpu:
        net = model_mod.NextViT(depths=(1, 1, 5, 1), num_classes=10).eval()
    else:
        net = getattr(model_mod, cli.VARIANTS[args.variant])().eval()
    plan = fused.fold(net, dev, dtype)
    rec = Recorder(torch, ops, cuda=not cpu, impl="reference" if cpu else "triton")
    env = ob.run_environment(False) if not cpu else harness.environment(card="CPU (--cpu-check, reference ops)")
    results = []
    with torch.inference_mode():
        for b in args.batch:
            t0 = time.time()
            r = profile_batch(torch, fused, plan, rec, b, args.res, dtype, dev, args.iters)
            results.append(r)
            extra = f", CUDA graph {r['graph_us']:.1f} us" if "graph_us" in r else ""
            ob.log(f"profile_plan: batch {b}: {len(r['steps'])} steps, sum {r['sum_us']:.1f} us{extra} "
                   f"({time.time() - t0:.0f} s)")
    md = markdown(env, results, plan, args)
    print(md)
    if cpu:
        assert all(len(r["steps"]) == len(plan.steps) + 1 for r in results)
        ob.log("profile_plan --cpu-check: ok (nothing written)")
        return 0
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    base = Path(args.out) / f"profile-{env.get('card_slug', 'gpu')}-{args.variant}-{args.dtype}-{stamp}"
    launches = {r["batch"]: plan.launches(r["batch"], args.res, args.res) for r in results}
    harness.write_json(base.with_suffix(".json"), dict(env=env, args=vars(args), launches=launches, results=results))
    base.with_suffix(".md").write_text(md + "\n")
    ob.log(f"wrote {base}.json, {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
