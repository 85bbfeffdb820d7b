"""Load test of Next-ViT served by NVIDIA Triton Inference Server through the native backend
(csrc/triton): throughput against p50 / p90 / p99 latency at each batch size and concurrency, with
the server's own queue / compute split and executions against inferences (the dynamic batcher).

GPU mode (torch sees a GPU): the real CUDA driver; the native backend (``nextvit_<v>``) against the
same model file behind Triton's Python backend over ``runtime.Model`` (``nextvit_<v>_python``), in
one server and one run.

CPU mode (no GPU, or --cpu): the server's kernel launches go to the CPU driver stand-in of
``nextvit_kernels.testing`` in counting mode (checked and counted, never executed), so the numbers
are the serving overhead alone (HTTP/gRPC, dynamic batching, the backend's gathers and copies, the C
runtime's host-side walk), not model compute; the client threads share the machine's cores with the
server. The Python-backend comparison needs a GPU and is not run.

Load: ``perf_analyzer`` when it is on $PATH, else a built-in closed-loop generator (C threads, each
with its own gRPC client, sending back-to-back requests of B images for --duration seconds after a
warm-up); the report says which ran.

    python bench/serve_bench.py [--batch 1,8] [--concurrency 1,2,4,8,16,32] [--duration 5] [--out bench/results]
    python bench/serve_bench.py --repo REPO --models nextvit_s      # an existing model repository
"""
import csv
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nextvit_kernels import harness  # noqa: E402

CPU_NOTE = ("CPU mode: the server's kernel launches are counted by the CPU driver stand-in, not executed: "
            "these numbers are the serving overhead alone (HTTP/gRPC, dynamic batching, the backend's gathers "
            "and copies, the C runtime's host-side walk), not model compute; the load generator shares the "
            "CPU cores with the server")
GPU_NOTE = "GPU mode: the real CUDA driver; every request runs the model"
SPLIT = ("queue", "compute_input", "compute_infer", "compute_output")
NP_TYPES = {"FP16": "float16", "FP32": "float32"}


def parse_args(argv=None):
    import argparse
    from nextvit_kernels import cli
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--repo", help="an existing model repository (default: one is written to a temporary folder)")
    p.add_argument("--models", type=cli.csv("model"),
                   help="models to load and measure (default: nextvit_<variant>, and on a GPU its _python twin)")
    p.add_argument("--variant", type=cli.variant, default="s", help="s, b or l (a written repository)")
    p.add_argument("--checkpoint", help="weights for the written repository (default: random)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--size", type=cli.positive_int, default=224,
                   help="image height = width (of a written repository; of the requests where --repo has -1)")
    p.add_argument("--max-batch", type=cli.positive_int, default=64)
    p.add_argument("--instances", type=cli.positive_int, default=1, help="model instances (written repository)")
    p.add_argument("--depths", type=cli.csv("depth", conv=cli.positive_int), help=argparse.SUPPRESS)  # tests
    p.add_argument("--batch", type=cli.batches, default=[1, 8], help="comma list of request batch sizes")
    p.add_argument("--concurrency", type=cli.batches, default=[1, 2, 4, 8, 16, 32],
                   help="comma list of concurrent requests in flight")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    p.add_argument("--generator", choices=("auto", "perf_analyzer", "builtin"), default="auto",
                   help="auto: perf_analyzer when on $PATH, else the built-in closed loop")
    p.add_argument("--cpu", action="store_true", help="CPU mode (counting stand-in) even where a GPU is present")
    p.add_argument("--server", help="the tritonserver executable (default: serve.find_server())")
    p.add_argument("--backend", help="libtriton_nextvit.so (default: the installed one)")
    p.add_argument("--library", help="libnextvit_kernels.so (default: beside the backend)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON and PNG")
    a = p.parse_args(argv)
    if a.duration <= 0 or a.warmup < 0:
        p.error("--duration must be > 0 and --warmup >= 0")
    return a


# ------------------------------------------------------------------ the server
def _write_repo(args, cpu, folder):
    import torch

    import nextvit_kernels as nk
    from nextvit_kernels import cli, serve
    from nextvit_kernels.checkpoint import load_checkpoint
    torch.manual_seed(0)
    if args.depths:
        net = nk.NextViT(depths=tuple(args.depths))
    else:
        net = getattr(nk, cli.VARIANTS[args.variant])()
    if args.checkpoint:
        load_checkpoint(net, args.checkpoint)
    name = "nextvit_tiny" if args.depths else f"nextvit_{args.variant}"
    # KIND_GPU needs a GPU the server can see; the counted stand-in is device 0 of KIND_MODEL.
    # compare=True only on a GPU: the Python-backend twin runs runtime.Model on CUDA.
    serve.write_repository(net, folder, name, args.dtype, args.size, args.max_batch, args.instances,
                           kind="model" if cpu else "gpu", compare=not cpu, log=lambda s: print(s, flush=True))
    return [name] if cpu else [name, f"{name}_python"]


def _model_io(url, model, size):
    """(input name, datatype, per-request dims without the batch, output name) from the metadata;
    a variable H or W (-1) is ``size``."""
    import tritonclient.grpc as grpcclient
    with grpcclient.InferenceServerClient(url) as c:
        meta = c.get_model_metadata(model, as_json=True)
        cfg = c.get_model_config(model, as_json=True)["config"]
    inp = meta["inputs"][0]
    dims = [size if int(d) < 0 else int(d) for d in inp["shape"]]
    if int(cfg.get("max_batch_size", 0)) > 0:
        dims = dims[1:]
    outs = [o["name"] for o in meta["outputs"]]
    return inp["name"], inp["datatype"], dims, "logits" if "logits" in outs else outs[0]


def _probe(url, model, io):
    """Why one request of 1 image does not come back whole (None when it does): a model whose
    replies are empty would time as faster than one that returns its logits."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    name, dtype, dims, out_name = io
    x = np.zeros((1, *dims), NP_TYPES.get(dtype, "float32"))
    try:
        with grpcclient.InferenceServerClient(url) as c:
            inp = grpcclient.InferInput(name, [1, *dims], dtype)
            inp.set_data_from_numpy(x)
            y = c.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(out_name)]).as_numpy(out_name)
    except Exception as err:  # noqa: BLE001 - the reason is the report
        return f"a batch-1 request failed: {err}"
    if y is None or y.shape[0] != 1 or y.size == 0:
        return f"a batch-1 request returned {out_name} of shape {None if y is None else y.shape}"
    return None


def _stats(url, model):
    """The model's cumulative statistics (summed over versions): counts and ns."""
    import tritonclient.http as httpclient
    with httpclient.InferenceServerClient(url) as c:
        data = c.get_inference_statistics(model)["model_stats"]
    out = dict(inference_count=0, execution_count=0)
    for s in data:
        out["inference_count"] += int(s.get("inference_count", 0))
        out["execution_count"] += int(s.get("execution_count", 0))
        for k in ("success", "fail") + SPLIT:
            v = s.get("inference_stats", {}).get(k, {})
            out[f"{k}_count"] = out.get(f"{k}_count", 0) + int(v.get("count", 0))
            out[f"{k}_ns"] = out.get(f"{k}_ns", 0) + int(v.get("ns", 0))
    return out


def _settled_stats(url, model, timeout=1.0):
    """``_stats`` once two reads 20 ms apart agree: the backend reports a request's statistics after
    its response is sent, so the last replies of a window may not be counted yet."""
    prev, deadline = _stats(url, model), time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.02)
        cur = _stats(url, model)
        if cur == prev:
            break
        prev = cur
    return prev


def _server_split(before, after):
    """Per-request server times (us) and the batcher's effect between two statistics snapshots."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    n = d["success_count"]
    out = dict(requests=n, failed=d["fail_count"], inferences=d["inference_count"],
               executions=d["execution_count"],
               images_per_execution=d["inference_count"] / d["execution_count"] if d["execution_count"] else None,
               request_us=d["success_ns"] / n / 1e3 if n else None)
    for k in SPLIT:
        out[f"{k}_us"] = d[f"{k}_ns"] / n / 1e3 if n else None
    return out


# ------------------------------------------------------------------ load generators
def _closed_loop(url, model, io, batch, concurrency, warmup, duration, on_measure):
    """C threads, each with its own gRPC client, sending back-to-back requests of ``batch`` images:
    ``warmup`` s unmeasured, then all stop at a barrier (``on_measure()`` runs there: the statistics
    snapshot), then ``duration`` s measured. Returns (latencies in s, measured s, errors)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    name, dtype, dims, out_name = io
    x = np.random.default_rng(0).standard_normal((batch, *dims)).astype(NP_TYPES.get(dtype, "float32"))
    clients = [grpcclient.InferenceServerClient(url) for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    go = threading.Event()
    window = {}
    lat = [[] for _ in range(concurrency)]
    done = [0.0] * concurrency
    errors = []

    def worker(i):
        c = clients[i]
        inp = grpcclient.InferInput(name, [batch, *dims], dtype)
        inp.set_data_from_numpy(x)
        out = [grpcclient.InferRequestedOutput(out_name)]  # logits only: the stage maps cost a forward
        warm_end = time.perf_counter() + warmup
        try:
            while True:  # at least one request: connections are set up before the window
                c.infer(model, [inp], outputs=out)
                if time.perf_counter() >= warm_end:
                    break
        except Exception as err:  # noqa: BLE001 - reported with the point
            errors.append(f"warm-up: {err}")
        barrier.wait()
        go.wait()
        end = window["end"]
        while True:
            t = time.perf_counter()
            if t >= end:
                break
            try:
                c.infer(model, [inp], outputs=out)
                lat[i].append(time.perf_counter() - t)
            except Exception as err:  # noqa: BLE001
                errors.append(str(err))
        done[i] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    on_measure()
    window["start"] = time.perf_counter()
    window["end"] = window["start"] + duration
    go.set()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    # the last requests started before the end finish after it: the window runs to the last reply
    return [v for per in lat for v in per], max(done) - window["start"], errors


def _perf_analyzer(exe, url, model, io, batch, concurrency, duration):
    """One perf_analyzer run (gRPC, one concurrency): its CSV row as this script's fields."""
    name, _, dims, _ = io
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pa.csv")
        cmd = [exe, "-m", model, "-b", str(batch), "--concurrency-range", str(concurrency), "-u", url, "-i", "grpc",
               "--measurement-interval", str(int(duration * 1000)), "--max-trials", "5", "-f", path,
               "--shape", f"{name}:{','.join(map(str, dims))}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10 * duration + 120)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}:\n{(r.stdout + r.stderr)[-2000:]}")
        with open(path) as f:
            row = next(csv.DictReader(f))
    ips = float(row["Inferences/Second"])  # images per second: perf_analyzer counts batch x requests
    out = dict(images_per_s=ips, requests_per_s=ips / batch, mean_ms=float(row["Avg latency"]) / 1e3)
    for q in (50, 90, 99):
        out[f"p{q}_ms"] = float(row[f"p{q} latency"]) / 1e3  # microseconds in the CSV
    return out


def _point(args, srv, model, io, batch, conc, generator):
    import numpy as np
    snap = {}
    row = dict(model=model, batch=batch, concurrency=conc, generator=generator)
    if generator == "perf_analyzer":
        snap["before"] = _settled_stats(srv.http_url, model)
        row.update(_perf_analyzer(shutil.which("perf_analyzer"), srv.grpc_url, model, io, batch, conc, args.duration))
        row["errors"] = 0
    else:
        lat, window, errors = _closed_loop(srv.grpc_url, model, io, batch, conc, args.warmup, args.duration,
                                           lambda: snap.__setitem__("before", _settled_stats(srv.http_url, model)))
        ms = np.asarray(lat) * 1e3
        row.update(measured_s=window, requests=len(lat), errors=len(errors), first_error=errors[0] if errors else None,
                   images_per_s=len(lat) * batch / window if lat else 0.0, requests_per_s=len(lat) / window if lat else 0.0)
        if lat:
            row.update(mean_ms=float(ms.mean()), **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)})
    row["server"] = _server_split(snap["before"], _settled_stats(srv.http_url, model))
    return row


# ------------------------------------------------------------------ report
COLUMNS = [("model", "model", "{}"), ("batch", "batch", "{}"), ("concurrency", "concurrency", "{}"),
           ("images/s", "images_per_s", "{:.1f}"), ("requests/s", "requests_per_s", "{:.1f}"),
           ("p50 ms", "p50_ms", "{:.2f}"), ("p90 ms", "p90_ms", "{:.2f}"), ("p99 ms", "p99_ms", "{:.2f}"),
           ("queue us", lambda r: r["server"]["queue_us"], "{:.0f}"),
           ("input us", lambda r: r["server"]["compute_input_us"], "{:.0f}"),
           ("infer us", lambda r: r["server"]["compute_infer_us"], "{:.0f}"),
           ("output us", lambda r: r["server"]["compute_output_us"], "{:.0f}"),
           ("inferences", lambda r: r["server"]["inferences"], "{}"),
           ("executions", lambda r: r["server"]["executions"], "{}"),
           ("images/execution", lambda r: r["server"]["images_per_execution"], "{:.2f}"),
           ("errors", "errors", "{}")]


def _progress(i, n, r):
    s = r["server"]
    lat = (f"latency p50 {r['p50_ms']:.2f} / p90 {r['p90_ms']:.2f} / p99 {r['p99_ms']:.2f} ms"
           if r.get("p50_ms") is not None else "no successful request")

    def us(v):
        return "-" if v is None else f"{v:.0f}"
    split = " / ".join(f"{k} {us(s[k + '_us'])}" for k in SPLIT)
    err = f"; {r['errors']} errors (first: {r.get('first_error')})" if r.get("errors") else ""
    print(f"serve_bench [{i}/{n}] {r['model']} batch {r['batch']} concurrency {r['concurrency']}: "
          f"{r['images_per_s']:.1f} images/s ({r['requests_per_s']:.1f} requests/s), {lat}; "
          f"server per request (us): {split}; {s['inferences']} inferences in {s['executions']} executions{err}",
          flush=True)


def plot(points, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(13, 9))
    grid = fig.add_gridspec(2, 2)
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    curves = sorted({(p["model"], p["batch"]) for p in points})
    for ax, q in zip(axes, ("p50", "p99")):
        for model, b in curves:
            ps = sorted((p for p in points if (p["model"], p["batch"]) == (model, b) and p.get(f"{q}_ms") is not None),
                        key=lambda p: p["concurrency"])
            if not ps:
                continue
            ax.plot([p["images_per_s"] for p in ps], [p[f"{q}_ms"] for p in ps], marker="o",
                    label=f"{model} batch {b}")
            for p in ps:
                ax.annotate(f"c{p['concurrency']}", (p["images_per_s"], p[f"{q}_ms"]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("throughput (images/s)")
        ax.set_ylabel(f"{q} latency per request (ms)")
        ax.set_title(f"throughput vs {q} latency (c = concurrency)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    parts = [(f"{k}_us", k.replace("_", " ")) for k in SPLIT]
    labels = [f"{p['model'].replace('nextvit_', '')}\nb{p['batch']} c{p['concurrency']}" for p in points]
    bottom = [0.0] * len(points)
    for key, label in parts:
        vals = [(p["server"].get(key) or 0.0) / 1e3 for p in points]
        ax.bar(range(len(points)), vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    # the server's request time beyond queue + compute (its request handling), then what the client
    # waited beyond the server's request time (gRPC, the client's own work, the network)
    other = [max(0.0, (p["server"].get("request_us") or 0.0) / 1e3 - b) for p, b in zip(points, bottom)]
    ax.bar(range(len(points)), other, bottom=bottom, label="server, other (request time - queue - compute)")
    bottom = [b + v for b, v in zip(bottom, other)]
    rest = [max(0.0, (p.get("mean_ms") or 0.0) - (p["server"].get("request_us") or 0.0) / 1e3) for p in points]
    ax.bar(range(len(points)), rest, bottom=bottom, label="client + transport (mean latency - server request time)",
           color="lightgray")
    ax.set_xticks(range(len(points)), labels, fontsize=6)
    ax.set_ylabel("ms per request (server statistics, mean)")
    ax.set_title("server queue / compute split per point")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401

        from nextvit_kernels import serve
        exe = serve.find_server(args.server)[0]
    except (ImportError, FileNotFoundError) as err:
        print(f"serve_bench: cannot run: {err} (tritonclient[grpc,http] and a tritonserver are needed)")
        return 2
    import torch
    cpu = args.cpu or not torch.cuda.is_available()
    generator = args.generator
    if generator == "auto":
        generator = "perf_analyzer" if shutil.which("perf_analyzer") else "builtin"
    elif generator == "perf_analyzer" and not shutil.which("perf_analyzer"):
        print("serve_bench: --generator perf_analyzer, but there is no perf_analyzer on $PATH")
        return 2
    note = CPU_NOTE if cpu else GPU_NOTE
    print(f"serve_bench: {note}", flush=True)
    print(f"serve_bench: load from {generator}" + ("" if generator == "perf_analyzer" else
          " (built-in closed loop: C threads, one gRPC client each, back-to-back requests)"), flush=True)

    with tempfile.TemporaryDirectory(prefix="nvk-serve-bench-") as tmp:
        repo = args.repo or os.path.join(tmp, "repo")
        if args.repo:
            models = args.models or [f"nextvit_{args.variant}"]
        else:
            written = _write_repo(args, cpu, repo)
            models = args.models or written
        env = {}
        if cpu:
            from nextvit_kernels import testing
            # TRITON_INTERPRET=0: counted, not computed (the computed mode takes seconds per forward)
            env.update({testing.DRIVER_ENV: testing.driver_library(), "TRITON_INTERPRET": "0"})
        backends = serve.repository_models(repo)
        python_models = [m for m in models if backends.get(m) == "python"]
        log = os.path.join(tmp, "server.log")
        try:
            srv = serve.Server(repo, server=args.server, backend=args.backend, library=args.library,
                               models=models, env=env, log=log, exit_timeout=5)
        except (FileNotFoundError, ValueError) as err:  # no backend / C library built, a model not in --repo
            print(f"serve_bench: cannot run: {err}")
            return 2
        if python_models:
            srv.env["NEXTVIT_CLIB"] = srv.library  # runtime.Model in the stub: the library the backend uses
        skipped = dict(srv.skipped)
        points, base = [], None
        with srv:
            skipped.update(srv.wait_ready(timeout=300))
            for m, why in skipped.items():
                print(f"serve_bench: not measuring {m}: {why}", flush=True)
            ready = [m for m in srv.models if m not in skipped]
            if not ready:
                print(f"serve_bench: no model ready; the server's log:\n{srv.log_tail()}")
                return 1
            card = "cpu-smoke" if cpu else harness.slug(torch.cuda.get_device_name())
            base = args.out / f"serve-{card}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
            meta = harness.environment(mode="cpu" if cpu else "gpu", note=note, generator=generator,
                                       server=exe, backend=srv.backend, library=srv.library,
                                       duration_s=args.duration, warmup_s=args.warmup,
                                       repository=args.repo or dict(variant=args.variant, dtype=args.dtype,
                                                                    size=args.size, max_batch=args.max_batch,
                                                                    instances=args.instances, depths=args.depths,
                                                                    checkpoint=args.checkpoint))
            ios = {m: _model_io(srv.grpc_url, m, args.size) for m in ready}
            for m in ready:
                why = _probe(srv.grpc_url, m, ios[m])
                if why:
                    skipped[m] = why
                    print(f"serve_bench: not measuring {m}: {why}", flush=True)
            ready = [m for m in ready if m not in skipped]
            if not ready:
                print(f"serve_bench: no model answers; the server's log:\n{srv.log_tail()}")
                return 1
            plan = [(m, b, c) for m in ready for b in args.batch for c in args.concurrency]
            for i, (m, b, c) in enumerate(plan, 1):
                row = _point(args, srv, m, ios[m], b, c, generator)
                points.append(row)
                _progress(i, len(plan), row)
                # rewritten after every point: a run cut off by a time limit keeps what it measured
                harness.write_json(base.with_suffix(".json"), dict(meta=meta, models=ready, skipped=skipped,
                                                                   points=points))
        rc = srv.proc.returncode
    print()
    print(harness.format_table(points, COLUMNS))
    title = f"serve_bench: {', '.join(ready)} ({generator}); " + ("CPU: serving overhead only, launches counted"
                                                                   if cpu else meta.get("card") or "GPU")
    png = plot(points, base.with_suffix(".png"), title)
    print(f"\nserve_bench: {note}")
    print(f"wrote {base.with_suffix('.json')} and {png}")
    if rc not in (0, None):
        print(f"serve_bench: the server exited with {rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
