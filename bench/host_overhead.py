"""Host time of the fused forward: what Python costs around the kernels.

At batch 1 the GPU work of a Next-ViT forward is well under a millisecond, so the host's
time per forward decides the latency unless a CUDA graph replays it.

CPU mode (no GPU, or --cpu): every Triton launch is replaced by a no-op and the fused
forward runs on CPU tensors, so what is timed is exactly the host work of one forward:
the lean path (``model(x)``: bound programs), and the registered-op path it replaced
(``fused.run``: custom-op dispatch, checks and launch set-up per op), per forward and per
op. Triton's own launch cost comes on top on a GPU.

With the C library built, CPU mode also times the whole-model C runtime on the same plan under the
CPU driver stand-in's counting mode (launches checked and counted, nothing runs): one
``nvk_model_forward`` call, ``runtime.Model(x)``, the cost per launch, and the model file's size
and load time.

GPU mode: ``model(x)`` with automatic CUDA graphs and without, ``model.cuda_graph(x)``'s
replay, and the sum of the kernels' device times (torch.profiler), per forward.

    python bench/host_overhead.py                     # CPU: S, B, L at batch 1
    python bench/host_overhead.py --variants s --batch 1,8 --iters 200
"""
import datetime
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nextvit_kernels import harness  # noqa: E402


def parse_args(argv=None):
    from nextvit_kernels import cli

    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--variants", type=cli.variants, default=["s", "b", "l"], help="comma list of s, b, l")
    p.add_argument("--batch", type=cli.csv("batch", conv=cli.positive_int), default=[1],
                   help="comma list of batch sizes")
    p.add_argument("--res", type=cli.positive_int, default=224, help="square input size")
    p.add_argument("--iters", type=cli.positive_int, default=100, help="timed forwards per row (median)")
    p.add_argument("--cpu", action="store_true", help="CPU mode even where a GPU is present")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON")
    return p.parse_args(argv)


def _stub_launches():
    """Every Triton kernel launch becomes a no-op (JIT and interpreter alike)."""
    from triton.runtime import interpreter, jit

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        cls.run = lambda self, *args, **kwargs: None


def cpu_rows(args):
    import torch

    import nextvit_kernels as nk
    from nextvit_kernels import cli, fused

    _stub_launches()
    torch.set_num_threads(1)
    rows = []
    for v in args.variants:
        model = getattr(nk, cli.VARIANTS[v])(kernels="triton").eval()
        for b in args.batch:
            x = torch.randn(b, 3, args.res, args.res)
            with torch.inference_mode():
                lean = harness.median_us(lambda: model(x), args.iters)
                plan = model.fused_plan(x.device, x.dtype)
                dispatch = harness.median_us(lambda: fused.run(plan, x, impl="triton"), args.iters)
                check = harness.median_us(plan.is_current, args.iters)
                prog = fused.Program(plan, x.shape, False)
                per_op = defaultdict(list)
                for _ in range(max(3, args.iters // 10)):
                    stamps = [time.perf_counter()]
                    prog._run(x, lambda: stamps.append(time.perf_counter()))
                    for (run_op, *_), t0, t1 in zip(prog.calls, stamps, stamps[1:]):
                        per_op[run_op.__module__.rsplit(".", 1)[-1]].append((t1 - t0) * 1e6)
            row = dict(variant=v, batch=b, res=args.res, ops=len(prog.calls) + 1,
                       launches=plan.launches(b, args.res, args.res),
                       lean_us=lean, registered_ops_us=dispatch, weight_check_us=check,
                       per_op_us={op: statistics.median(ts) for op, ts in sorted(per_op.items())})
            row.update(_c_runtime(model, x, args.iters))
            rows.append(row)
            print(f"{v} batch {b:>3}: lean {lean:8.1f} us/forward   registered ops {dispatch:8.1f} us   "
                  f"weight check {check:6.1f} us   ({row['ops']} ops, {row['launches']} launches)", flush=True)
            print("    per op (lean, us/call): " + ", ".join(f"{k} {u:.1f}" for k, u in row["per_op_us"].items()))
            if "c_forward_us" in row:
                print(f"    C runtime: nvk_model_forward {row['c_forward_us']:.1f} us/forward "
                      f"({row['c_launches']} launches, {row['c_per_launch_us']:.3f} us each), "
                      f"{lean / row['c_forward_us']:.0f}x less host time than model(x); runtime.Model(x) "
                      f"{row['c_front_us']:.1f} us; fp16 model file {row['file_mb']:.1f} MB, loaded in "
                      f"{row['load_ms']:.1f} ms", flush=True)
    return rows


def _c_runtime(model, x, iters):
    """The whole-model C runtime on the same model and input size, in fp16 (a deployment's dtype),
    under the CPU driver stand-in's counting mode (launches checked and counted, nothing runs): host time of one nvk_model_forward call and
    of runtime.Model(x), per launch, and the model file's size and load time (the CPU part: parse,
    checks, allocation and copy into host memory). {} when the C library is not built."""
    import tempfile

    import torch

    from nextvit_kernels import _library, model_file, runtime, testing
    try:
        _library.open_default()
    except RuntimeError as err:
        print(f"    C runtime: not measured ({err})")
        return {}
    data = model_file.plan_bytes(model_file.fold_for_runtime(model, torch.float16))
    x = x.half()
    with tempfile.TemporaryDirectory() as d, testing.cpu_driver(execute=False) as drv:
        path = os.path.join(d, "model.nvk")
        with open(path, "wb") as f:
            f.write(data)
        loads = []
        for _ in range(3):
            t = time.perf_counter()
            runtime.Model(path).close()
            loads.append(time.perf_counter() - t)
        m = runtime.Model(path)
        b, _, h, w = x.shape
        nbytes = m.workspace_size(b, h, w)
        out = torch.empty(b, m.n_classes, dtype=x.dtype)
        ws = torch.empty(nbytes, dtype=torch.uint8)
        with drv.registered(x, out, ws):
            args = (m._handle, x.data_ptr(), runtime.NCHW, out.data_ptr(), ws.data_ptr(), nbytes, b, h, w, None)
            forward = m._lib.model_forward
            if forward(*args):
                raise RuntimeError(m._lib.last_error())
            drv.reset_counters()
            forward(*args)
            launches = drv.counters()["launches"]
            c_us = harness.median_us(lambda: forward(*args), iters * 10)
        front_us = harness.median_us(lambda: m(x), iters)
        m.close()
    return dict(c_forward_us=c_us, c_launches=launches, c_per_launch_us=c_us / launches, c_front_us=front_us,
                file_dtype="fp16", file_mb=len(data) / 1e6, load_ms=min(loads) * 1e3)


def gpu_rows(args):
    import torch

    import nextvit_kernels as nk
    from nextvit_kernels import cli

    rows = []
    for v in args.variants:
        model = getattr(nk, cli.VARIANTS[v])().eval().cuda().half()
        for b in args.batch:
            x = torch.randn(b, 3, args.res, args.res, device="cuda", dtype=torch.half)

            def per_forward_us(fn):
                fn()
                fn()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                issue = (time.perf_counter() - t) / args.iters * 1e6
                torch.cuda.synchronize()
                return issue, (time.perf_counter() - t) / args.iters * 1e6

            with torch.inference_mode():
                model.cuda_graphs = "auto"
                auto_issue, auto_wall = per_forward_us(lambda: model(x))
                model.cuda_graphs = "off"
                off_issue, off_wall = per_forward_us(lambda: model(x))
                graphed = model.cuda_graph(x)
                fixed_issue, fixed_wall = per_forward_us(lambda: graphed(x))
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        model(x)
                    torch.cuda.synchronize()
                kernels_us = sum(e.device_time_total for e in prof.key_averages()) / 5
            model.cuda_graphs = "auto"
            row = dict(variant=v, batch=b, res=args.res, auto_graph_issue_us=auto_issue, auto_graph_us=auto_wall,
                       no_graph_issue_us=off_issue, no_graph_us=off_wall, cuda_graph_issue_us=fixed_issue,
                       cuda_graph_us=fixed_wall, kernel_sum_us=kernels_us)
            rows.append(row)
            print(f"{v} batch {b:>3}: model(x) auto graphs {auto_wall:8.1f} us (host {auto_issue:.1f})   "
                  f"graphs off {off_wall:8.1f} us (host {off_issue:.1f})   cuda_graph() {fixed_wall:8.1f} us   "
                  f"kernels {kernels_us:8.1f} us", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    cpu = args.cpu or not _cuda_available()
    if cpu:
        # The launches are stubbed, but the kernels must exist as interpreter functions on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    print(f"host_overhead: {'CPU mode, Triton launches stubbed' if cpu else 'GPU mode'}; torch {torch.__version__}, "
          f"triton {triton.__version__}, {harness.cpu_name()}, {os.cpu_count()} cores")
    rows = cpu_rows(args) if cpu else gpu_rows(args)
    meta = harness.environment(mode="cpu" if cpu else "gpu", iters=args.iters)
    path = harness.write_json(args.out / f"host_overhead-{meta['mode']}-{datetime.date.today():%Y%m%d}.json",
                              dict(meta=meta, rows=rows))
    print(f"wrote {path}")


def _cuda_available():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
