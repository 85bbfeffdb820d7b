"""End-to-end benchmark: ``python -m nextvit_kernels.bench``.

On a GPU: the fused NextViT (`fused`: model(x) as a user calls it, which replays an automatic
CUDA graph from a shape's second call on; `fused_graph`: the zero-copy model.cuda_graph) against timm's
Next-ViT with BatchNorms merged in eager mode, eager + CUDA graph, and
torch.compile with freezing (default and reduce-overhead), all in one run, with
a ratio table.
Without a GPU: the PyTorch reference model timed on the CPU in fp32 (batches up to
--cpu-max-batch) and a Triton-interpreter check of the fused kernels on a tiny model;
the GPU-only options are reported as not used.
Either way it writes <--out>/e2e-<card>-<time>.json and .png (cpu-e2e-<cpu>-<time>.*
on the CPU) and prints their paths.
"""
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import nextvit_kernels as nk
from nextvit_kernels import cli, harness

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = cli.VARIANTS
FUSED_MODES = ("fused", "fused_graph")
BASE_MODES = ("eager", "eager_graph", "compile", "compile_ro")
# The rows the targets are stated for; "full" sweeps everything.
PRESETS = {
    "targets": [("s", "fp16", 256, FUSED_MODES + ("eager", "compile")),
                ("s", "fp16", 1, FUSED_MODES + ("eager_graph", "compile_ro")),
                ("b", "fp16", 256, ("fused", "compile")),
                ("l", "fp16", 256, ("fused", "compile"))],
}


def log(msg):
    print(msg, flush=True)


def make_models(variant, dtype, checkpoint):
    """Our model and timm's (BatchNorms merged) with the same weights, on the GPU."""
    import timm

    ours = getattr(nk, variant)().eval()
    ref = timm.create_model(variant).eval()
    if checkpoint:
        nk.load_checkpoint(ours, checkpoint)
    else:
        with torch.no_grad():  # random BatchNorm statistics, so nothing folds to identity
            for m in ref.modules():
                if isinstance(m, torch.nn.BatchNorm2d) or isinstance(m, torch.nn.BatchNorm1d):
                    m.running_var.uniform_(0.5, 1.5)
                    m.running_mean.normal_(0, 0.1)
        nk.load_checkpoint(ours, ref.state_dict())
    from timm.models.nextvit import checkpoint_filter_fn

    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref) if checkpoint else ref.state_dict())
    for blk in ref.modules():
        if hasattr(blk, "reparameterize"):
            blk.reparameterize()
    ours = ours.cuda().to(dtype).to(memory_format=torch.channels_last)
    ref = ref.cuda().to(dtype).to(memory_format=torch.channels_last)
    return ours, ref


def graphed(model, x):
    """A callable replaying ``model(x)`` captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model(x)
    return g.replay


def compiled(model, mode):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, mode=mode)


def bench_row(variant, dtype_name, batch, modes, args, cache):
    dtype = DTYPES[dtype_name]
    key = (variant, dtype_name)
    if key not in cache:
        cache.clear()  # one variant's models on the GPU at a time
        torch.cuda.empty_cache()
        cache[key] = make_models(variant, dtype, args.checkpoint)
    ours, ref = cache[key]
    x = torch.randn(batch, 3, args.res, args.res, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    rows = []
    with torch.no_grad():
        err = None
        for mode in modes:
            t0 = time.perf_counter()
            try:
                if mode == "fused":
                    fn = lambda: ours(x)  # noqa: E731
                elif mode == "fused_graph":
                    fn = ours.cuda_graph(x)
                    fn = (lambda f: lambda: f(x))(fn)
                elif mode == "eager":
                    fn = lambda: ref(x)  # noqa: E731
                elif mode == "eager_graph":
                    fn = graphed(ref, x)
                elif mode == "compile":
                    c = compiled(ref, "default")
                    fn = lambda: c(x)  # noqa: E731
                elif mode == "compile_ro":
                    c = compiled(ref, "reduce-overhead")
                    fn = lambda: c(x)  # noqa: E731
                else:
                    raise ValueError(mode)
                fn()
                torch.cuda.synchronize()
                setup = time.perf_counter() - t0
                # No L2 flush: an end-to-end row is the latency a caller sees, host launch time included.
                timing = harness.cuda_time_ms(fn, args.iters, warmup=args.warmup, flush=False)
                ms, ms_min = timing["ms"], timing["min"]
                if mode == "fused" and err is None:
                    a, b = ours(x).float(), ref(x).float()
                    err = ((a - b).abs().max() / b.abs().max()).item()
                row = dict(variant=variant, dtype=dtype_name, bs=batch, res=args.res, mode=mode,
                           ms_median=round(ms, 4), ms_min=round(ms_min, 4), img_s=round(batch / ms * 1e3, 1),
                           setup_s=round(setup, 1))
                if mode == "fused":
                    row["rel_err_vs_timm"] = err
            except Exception as e:  # a failing baseline must not end the sweep
                row = dict(variant=variant, dtype=dtype_name, bs=batch, res=args.res, mode=mode,
                           error=f"{type(e).__name__}: {str(e)[:300]}")
            torch._dynamo.reset() if mode.startswith("compile") else None
            rows.append(row)
            log("  " + (f"{variant} {dtype_name} bs={batch:<4} {mode:<12} {row['ms_median']:9.3f} ms "
                        f"{row['img_s']:10.1f} img/s (setup {row['setup_s']} s)"
                        if "error" not in row else f"{variant} {dtype_name} bs={batch} {mode}: FAILED {row['error']}"))
    return rows


RATIO_COLUMNS = ([("variant", "variant", "{}"), ("dtype", "dtype", "{}"), ("bs", "bs", "{}")]
                 + [(m, m, "{:.3f} ms") for m in FUSED_MODES + BASE_MODES]
                 + [("speed-ups (best fused / baseline)", "speedups", "{}")])


def ratio_table(rows):
    """For each (variant, dtype, batch): every mode's median ms, and the best fused mode's
    speed-up over each baseline (its time over the fused one's)."""
    groups = {}
    for r in rows:  # a failed mode leaves its cell empty
        ms = groups.setdefault((r["variant"], r["dtype"], r["bs"]), {})
        if "ms_median" in r:
            ms[r["mode"]] = r["ms_median"]
    table = []
    for (v, d, b), ms in groups.items():
        best = min((ms[m] for m in FUSED_MODES if m in ms), default=None)
        speedups = ", ".join(f"{m} {ms[m] / best:.2f}x" for m in BASE_MODES if m in ms) if best else ""
        table.append(dict(ms, variant=v, dtype=d, bs=b, speedups=speedups))
    return harness.format_table(table, RATIO_COLUMNS)


def plot(rows, path, heading=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    series = {}
    for r in rows:
        if "ms_median" in r:
            series.setdefault((r["variant"], r["dtype"], r["mode"]), []).append((r["bs"], r["ms_median"], r["img_s"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for (v, d, m), pts in sorted(series.items()):
        pts.sort()
        bs = [p[0] for p in pts]
        style = "-" if m.startswith("fused") else "--"
        ax1.plot(bs, [p[1] for p in pts], style, marker="o", label=f"{v} {d} {m}")
        ax2.plot(bs, [p[2] for p in pts], style, marker="o", label=f"{v} {d} {m}")
    for ax, title, yl in ((ax1, "latency", "ms / batch"), (ax2, "throughput", "images / s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7, loc="best")
    if heading:
        fig.suptitle(heading)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def results_base(out_dir, tag, prefix="e2e"):
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{prefix}-{harness.slug(tag)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


CPU_NOTE = ("CPU results: the PyTorch reference model in fp32 on the CPU, not the fused kernels "
            "(their speed needs a GPU)")


def write_results(rows, info, base, final=True, title=None, **extra):
    """Rewritten after every row, so a run cut off by a time limit keeps what it measured."""
    harness.write_json(f"{base}.json", {**extra, "env": info, "complete": final, "rows": rows})
    if final:
        png = plot(rows, f"{base}.png", title) if rows else None
        log(f"wrote {base}.json" + (f"\nwrote {png}" if png else ""))


def gpu_main(args):
    info = harness.environment()
    info["gpu"] = info["card"]  # the key e2e results named the card by before the harness
    log(f"GPU: {info['card']} | driver {info.get('driver')} | torch {info['torch']} | triton {info['triton']}")
    if args.preset:
        plan = [(VARIANTS[v], d, b, modes) for v, d, b, modes in PRESETS[args.preset]]
    else:
        plan = [(VARIANTS[v], d, b, tuple(args.modes)) for v in args.variants for d in args.dtype
                for b in args.batch]
    rows, cache = [], {}
    base = results_base(args.out, info["card"])
    for i, (variant, d, b, modes) in enumerate(plan):
        log(f"[{i + 1}/{len(plan)}] {variant} {d} batch {b}")
        rows += bench_row(variant, d, b, modes, args, cache)
        write_results(rows, info, base, final=False)
    log("\n" + ratio_table(rows))
    write_results(rows, info, base, title=f"NextViT end to end on {info['card']}")


INTERPRETER_CHECK = r"""
import torch, nextvit_kernels as nk
from nextvit_kernels import fused
torch.manual_seed(0)
m = nk.NextViT(depths=(1, 1, 5, 1), num_classes=10).eval()
with torch.no_grad():
    for p in m.parameters():
        p.copy_(torch.randn_like(p) * 0.7 / max(p[0].numel(), 1) ** 0.5 if p.dim() > 1 else p)
x = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    ref = m(x)
    plan = fused.fold(m, "cpu", torch.float32)
    out = fused.run(plan, x, impl="triton")
err = ((out - ref).abs().max() / ref.abs().max()).item()
print(f"{plan.launches(1, 32, 32)} kernel launches; max |fused - reference| / max |reference| = {err:.2e}")
raise SystemExit(0 if err < 1e-3 else 1)
"""


def cpu_main(args):
    info = harness.environment()
    variants = args.variants if args.variants_given else args.variants[:1]
    batches = [b for b in args.batch if b <= args.cpu_max_batch]
    skipped = [b for b in args.batch if b > args.cpu_max_batch]
    log("No CUDA GPU: timing the PyTorch reference model in fp32 on the CPU "
        f"({info['cpu']}, {info['threads']} threads) and checking the fused kernels under Triton's interpreter. "
        "The fused kernels' speed needs a GPU.")
    if not args.variants_given:
        log(f"note: on the CPU only variant {variants[0]} is timed unless --variants is given")
    if skipped:
        log(f"note: batch {','.join(map(str, skipped))} not timed on the CPU (above --cpu-max-batch {args.cpu_max_batch})")
    rows = []
    base = results_base(args.out, info["cpu"], prefix="cpu-e2e")
    with torch.no_grad():
        for v in variants:
            variant = VARIANTS[v]
            model = getattr(nk, variant)().eval()
            if args.checkpoint:
                log(str(nk.load_checkpoint(model, args.checkpoint)))
            for b in batches:
                x = torch.randn(b, 3, args.res, args.res)
                timing = harness.host_time_ms(lambda: model(x), args.cpu_iters, warmup=1)
                ms, ms_min = timing["ms"], timing["min"]
                rows.append(dict(variant=variant, dtype="fp32", bs=b, res=args.res, mode="cpu_reference",
                                 ms_median=round(ms, 2), ms_min=round(ms_min, 2), img_s=round(b / ms * 1e3, 1)))
                log(f"  {variant} fp32 batch {b:<4} {ms:9.1f} ms  {b / ms * 1e3:8.1f} img/s  (CPU reference)")
                write_results(rows, info, base, final=False, note=CPU_NOTE)
    log("Interpreter check (TRITON_INTERPRET=1, tiny model, 32x32 input): every fused kernel against the reference...")
    env = dict(os.environ, TRITON_INTERPRET="1")
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], env=env, capture_output=True, text=True)
    log(("  " + res.stdout.strip()) if res.returncode == 0 else f"  FAILED:\n{res.stdout}\n{res.stderr[-2000:]}")
    log(f"  ({time.perf_counter() - t:.0f} s)")
    check = dict(passed=res.returncode == 0, output=res.stdout.strip() or res.stderr[-2000:])
    write_results(rows, info, base, note=CPU_NOTE, interpreter_check=check,
                  title=f"CPU results: PyTorch reference, fp32, {info['cpu']} (not the fused kernels)")
    return res.returncode


def parse_args(argv=None):
    p = cli.parser(__doc__, prog="python -m nextvit_kernels.bench")
    p.add_argument("--variants", type=cli.variants, default="s,b,l",
                   help="comma list of s, b, l (or small, nextvit_small, ...); the CPU times the first "
                        "unless the option is given")
    p.add_argument("--batch", type=cli.batches, default="1,8,64,256", help="comma list of batch sizes")
    p.add_argument("--dtype", type=cli.dtypes, default="fp16,bf16",
                   help=f"comma list of {', '.join(DTYPES)} (GPU only: the CPU reference runs fp32)")
    p.add_argument("--modes", type=cli.csv("mode", FUSED_MODES + BASE_MODES), default=",".join(FUSED_MODES + BASE_MODES),
                   help=f"comma list of {', '.join(FUSED_MODES + BASE_MODES)} (GPU only)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="instead of --variants/--batch/--dtype/--modes: only the rows the performance targets "
                        "are stated for (GPU only)")
    p.add_argument("--res", type=cli.positive_int, default=224, help="input height and width")
    p.add_argument("--checkpoint", help="weights in any format load_checkpoint reads (default: random weights)")
    p.add_argument("--iters", type=cli.positive_int, default=50, help="timed calls per row (GPU)")
    p.add_argument("--warmup", type=cli.positive_int, default=10, help="untimed calls before them (GPU)")
    p.add_argument("--cpu-iters", type=cli.positive_int, default=3, help="timed calls per row (CPU)")
    p.add_argument("--cpu-max-batch", type=cli.positive_int, default=8, help="largest batch timed on the CPU")
    p.add_argument("--out", default="bench/results", help="folder for the JSON and PNG results")
    args = p.parse_args(argv)
    given = cli.given(p, argv)
    args.variants_given = "variants" in given
    if torch.cuda.is_available():
        if args.preset:
            cli.not_used(p, argv, ("variants", "batch", "dtype", "modes"), "with --preset")
        cli.not_used(p, argv, ("cpu_iters", "cpu_max_batch"), "on a GPU")
    else:
        cli.not_used(p, argv, ("dtype", "modes", "preset", "iters", "warmup"), "on the CPU (no CUDA GPU)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if torch.cuda.is_available():
        gpu_main(args)
        return 0
    return cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
