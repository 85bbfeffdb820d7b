"""The whole-model C runtime against the Triton JIT path: same logits, time from a fresh process to
the first inference, and forward latency.

GPU mode (NextViT-S, fp16, 224^2, random weights):
- the C runtime's logits against ``model(x)``'s (Triton JIT path), batch 2;
- a fresh process that loads the model file and classifies one image through the C runtime
  (CuPy arrays when CuPy is installed, else torch), against a fresh process whose first
  ``model(x)`` JIT-compiles (or loads from Triton's cache) the kernels, and one running
  ``torch.compile`` of the same model; each wall time from spawn to exit;
- forward latency at each --batch through ``runtime.Model`` (eager, and replayed in a CUDA graph
  at batch 1) against ``model(x)`` with automatic CUDA graphs, CUDA events, median.

CPU mode (no GPU, or --cpu): the same calls under the CPU driver stand-in's counting mode
(launches checked and counted, nothing runs): host time only, which says nothing about the GPU.

    python bench/clib_bench.py [--batch 1,256] [--iters 50] [--out bench/results]
"""
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nextvit_kernels import harness  # noqa: E402

FIRST_C = """
import time, sys
t0 = time.perf_counter()
from nextvit_kernels import runtime
try:
    import cupy as xp
    x = xp.random.standard_normal((1, 3, 224, 224), dtype=xp.float32).astype(xp.float16)
    sync = xp.cuda.get_current_stream().synchronize
except ImportError:
    import torch as xp
    x = xp.randn(1, 3, 224, 224, device="cuda", dtype=xp.float16)
    sync = xp.cuda.synchronize
m = runtime.Model(sys.argv[1])
out = m(x)
sync()
print(f"{type(x).__module__.split('.')[0]} {time.perf_counter() - t0:.3f}")
"""
FIRST_JIT = """
import time, sys
t0 = time.perf_counter()
import torch
import nextvit_kernels as nk
m = nk.nextvit_small(kernels="triton").eval().cuda().half()
x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
with torch.inference_mode():
    if sys.argv[1] == "compile":
        m = torch.compile(m)
    m(x)
torch.cuda.synchronize()
print(f"torch {time.perf_counter() - t0:.3f}")
"""


def parse_args(argv=None):
    from nextvit_kernels import cli
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=cli.batches, default=[1, 256], help="comma list of batch sizes")
    p.add_argument("--iters", type=cli.positive_int, default=50, help="timed forwards per row (median)")
    p.add_argument("--fresh-timeout", type=cli.positive_int, default=120,
                   help="seconds each fresh-process run may take")
    p.add_argument("--cpu", action="store_true", help="CPU mode (counting stand-in) even where a GPU is present")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON")
    return p.parse_args(argv)


def _fresh(code, arg, timeout):
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    wall = time.perf_counter() - t
    if r.returncode:
        return dict(error=r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    kind, inner = r.stdout.split()
    return dict(wall_s=round(wall, 3), in_process_s=float(inner), arrays=kind)


def gpu(args, path, model, rt):
    import torch

    def latency_ms(fn):  # no L2 flush: the host time the C runtime saves is what is measured
        return harness.cuda_time_ms(fn, args.iters, warmup=3, flush=False)["ms"]

    rows = {}
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        ref, out = model(x).float(), rt(x).float()
    rows["logits_rel_diff_vs_triton"] = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"C runtime vs Triton JIT logits, batch 2: max rel diff {rows['logits_rel_diff_vs_triton']:.2e}")
    for name, code, arg in (("c_runtime", FIRST_C, path), ("triton_jit", FIRST_JIT, "eager"),
                            ("torch_compile", FIRST_JIT, "compile")):
        rows[f"first_inference_{name}"] = r = _fresh(code, arg, args.fresh_timeout)
        print(f"fresh process to first inference, {name}: {r}", flush=True)
    lat = []
    for b in args.batch:
        xb = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            c_ms = latency_ms(lambda: rt(xb))
            t_ms = latency_ms(lambda: model(xb))
            row = dict(batch=b, c_runtime_ms=c_ms, model_auto_graphs_ms=t_ms, ratio=t_ms / c_ms)
            if b == 1:
                rt(xb)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    rt(xb)
                row["c_runtime_graph_ms"] = latency_ms(g.replay)
        lat.append(row)
        print(f"batch {b}: C runtime {c_ms:.3f} ms, model(x) {t_ms:.3f} ms"
              + (f", C runtime in a CUDA graph {row['c_runtime_graph_ms']:.3f} ms" if b == 1 else ""), flush=True)
    rows["latency"] = lat
    return rows


def cpu(args, path):
    import torch
    from nextvit_kernels import runtime, testing
    rows = {"note": "CPU stand-in, counting mode: host time of the C calls only; nothing ran"}
    with testing.cpu_driver(execute=False) as drv:
        t = time.perf_counter()
        rt = runtime.Model(path)
        rows["load_ms"] = (time.perf_counter() - t) * 1e3
        lat = []
        for b in args.batch:
            x = torch.zeros(b, 3, 224, 224, dtype=torch.float16)
            host_us = harness.median_us(lambda: rt(x), args.iters)
            drv.reset_counters()
            rt(x)
            lat.append(dict(batch=b, runtime_model_host_us=host_us, launches=drv.counters()["launches"]))
            print(f"batch {b}: runtime.Model(x) host time {lat[-1]['runtime_model_host_us']:.1f} us "
                  f"({lat[-1]['launches']} launches counted)", flush=True)
        rows["latency"] = lat
        rt.close()
    return rows


def main(argv=None):
    args = parse_args(argv)
    import torch
    import nextvit_kernels as nk
    from nextvit_kernels import _library, runtime
    on_gpu = torch.cuda.is_available() and not args.cpu
    try:
        _library.open_default()
    except RuntimeError as err:
        print(f"clib_bench: the C library is not built: {err}")
        return 1
    model = nk.nextvit_small(kernels="triton").eval()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "nextvit_s_fp16.nvk")
        nk.save_runtime(model, path, dtype=torch.float16)
        print(f"clib_bench: {'GPU' if on_gpu else 'CPU (counting stand-in)'} mode; model file "
              f"{os.path.getsize(path) / 1e6:.1f} MB; torch {torch.__version__}", flush=True)
        if on_gpu:
            model = model.cuda().half()
            rows = gpu(args, path, model, runtime.Model(path))
        else:
            rows = cpu(args, path)
    meta = harness.environment(mode="gpu" if on_gpu else "cpu", library=_library.open_default().version())
    out = harness.write_json(args.out / f"clib-{meta['mode']}-{datetime.date.today():%Y%m%d}.json",
                             dict(meta=meta, rows=rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
