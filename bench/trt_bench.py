#!/usr/bin/env python3
"""TensorRT benchmark: stock engine (standard ONNX) vs plugin engine (nextvit plugins).

Both graphs come from ``nextvit_kernels.export_onnx`` with a dynamic batch. Each engine is
built once with one optimization profile per batch size (min = opt = max = that batch), so
every batch gets its own tactics. Timing: per batch, the engine's enqueue is captured in a
CUDA graph and replayed (median of CUDA-event timed replays after warm-up); stock and plugin
engines are timed in the same run, alternating. The logits of the plugin engine are compared
with the stock engine's (and the first batch with the PyTorch model in float32).

Precision: a strongly typed network (TensorRT 10 and 11; the only mode of 11) takes the
precision from the ONNX (fp16 / bf16 weights and I/O). ``--weakly-typed`` (TensorRT 10 only)
builds from the same ONNX with the FP16/BF16 builder flags instead.

Writes bench/results/trt_bench_<variant>_<dtype>_<time>.json with the card, driver, TensorRT,
torch and nextvit_kernels versions, and prints a ratio table. Exits 2 with a message saying
what is missing when TensorRT, a GPU or the plugin library is not there.

    python bench/trt_bench.py --plugins build/csrc/trt/libnextvit_trt_plugins_trt10.so
"""
import datetime as _dt
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nextvit_kernels import cli, harness  # noqa: E402


def default_plugin_paths(trt_major: int):
    """Where the build puts the plugin library for this TensorRT major (one build per major)."""
    name = f"libnextvit_trt_plugins_trt{trt_major}.so"
    return [ROOT / f"build-trt{trt_major}" / "csrc" / "trt" / name, ROOT / "build" / "csrc" / "trt" / name]


def _positive_float(text):
    v = float(text)
    if not v > 0:
        raise ValueError("must be > 0")
    return v


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0] + "\n\nNeeds TensorRT 10 or 11, a CUDA GPU and (unless --stock-only) "
                   "the plugin library; exits 2 saying which is missing.", prog="python bench/trt_bench.py")
    p.add_argument("--variant", type=cli.variant, default="s", help="s, b or l (or small, nextvit_small, ...)")
    p.add_argument("--checkpoint", help="weights in any format load_checkpoint reads (default: random weights)")
    p.add_argument("--dtype", default="fp16", choices=cli.DTYPES, help="precision of the ONNX graphs and engines")
    p.add_argument("--size", type=cli.positive_int, nargs=2, default=(224, 224), metavar=("H", "W"),
                   help="input height and width")
    p.add_argument("--batches", type=cli.batches, default="1,8,64,256",
                   help="comma list of batch sizes (one optimization profile each)")
    p.add_argument("--plugins", default=os.environ.get("NEXTVIT_TRT_PLUGINS"),
                   help="path of libnextvit_trt_plugins_trt<major>.so (env NEXTVIT_TRT_PLUGINS; unset: "
                        "build-trt<major>/csrc/trt/, then build/csrc/trt/)")
    p.add_argument("--kernels-lib", default=os.environ.get("NEXTVIT_KERNELS_LIB"),
                   help="libnextvit_kernels.so to preload when it is not on the loader path (env NEXTVIT_KERNELS_LIB)")
    p.add_argument("--stock-only", action="store_true", help="skip the plugin engine")
    p.add_argument("--weakly-typed", action="store_true",
                   help="TensorRT 10 only: FP16/BF16 builder flags instead of a strongly typed network")
    p.add_argument("--workspace-gib", type=_positive_float, default=8.0, help="builder workspace limit, GiB")
    p.add_argument("--opt-level", type=int, choices=range(6), default=3, metavar="{0..5}",
                   help="builder optimization level")
    p.add_argument("--warmup", type=cli.positive_int, default=20, help="untimed replays per batch")
    p.add_argument("--iters", type=cli.positive_int, default=100, help="timed replays per batch (median)")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    p.add_argument("--keep-onnx", help="folder to keep the exported ONNX files in (default: a temporary one)")
    args = p.parse_args(argv)
    if args.stock_only:
        cli.not_used(p, argv, ("plugins", "kernels_lib"), "with --stock-only")
    args.variant = cli.VARIANTS[args.variant]
    return args


def fail(msg: str, code: int = 2):
    print(f"trt_bench: {msg}", file=sys.stderr)
    sys.exit(code)


def check_environment(args):
    """Imports TensorRT and torch, checks the GPU and the plugin library; exits 2 otherwise."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the PyPI stub failing to fetch its wheel
        fail(f"TensorRT's Python package is not available ({type(e).__name__}: {e}). Install TensorRT 10 or 11 "
             "with its Python bindings (e.g. `pip install tensorrt-cu12` or the tar/deb package).")
    try:
        import torch
    except ImportError as e:
        fail(f"torch is not available ({e})")
    if not torch.cuda.is_available():
        fail("no CUDA GPU is visible to torch (torch.cuda.is_available() is False): the benchmark needs one")
    plugin_path = None
    if not args.stock_only:
        candidates = [Path(args.plugins)] if args.plugins else default_plugin_paths(int(trt.__version__.split(".")[0]))
        plugin_path = next((c for c in candidates if c.is_file()), None)
        if plugin_path is None:
            fail("the plugin library libnextvit_trt_plugins_trt<major>.so was not found (looked at: "
                 + ", ".join(str(c) for c in candidates) + "). Build it with "
                 "`cmake -B build -DNEXTVIT_TRT=ON -DTENSORRT_ROOT=... && cmake --build build` (once per TensorRT "
                 "major), pass --plugins PATH, "
                 "or run with --stock-only.")
    return trt, torch, plugin_path


def load_plugins(trt, plugin_path, kernels_lib):
    import ctypes
    if kernels_lib:
        ctypes.CDLL(str(kernels_lib), mode=ctypes.RTLD_GLOBAL)
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(plugin_path))
    if handle is None:
        fail(f"TensorRT could not load the plugin library {plugin_path} (see the TensorRT log above)")
    from nextvit_kernels.onnx_export import PLUGIN_NAMESPACE, PLUGINS
    try:
        creators = registry.all_creators if hasattr(registry, "all_creators") else registry.plugin_creator_list
        found = {getattr(c, "name", None) for c in creators if getattr(c, "plugin_namespace", "") == PLUGIN_NAMESPACE}
    except Exception as e:  # the creator listing differs between TensorRT versions: only a sanity check
        print(f"trt_bench: warning: could not list the plugin creators ({e})", file=sys.stderr)
        return handle
    missing = sorted({s.name for s in PLUGINS.values()} - found)
    if missing:
        fail(f"plugin library {plugin_path} loaded but these creators are missing from the registry: {missing}")
    return handle


def build_engine(trt, logger, onnx_path, batches, shape_chw, args, dtype):
    builder = trt.Builder(logger)
    flags = 0
    strongly = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not args.weakly_typed
    if strongly:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        fail(f"the ONNX parser rejected {onnx_path}:\n{errs}", code=1)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(args.workspace_gib * (1 << 30)))
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = args.opt_level
    if not strongly:
        if not hasattr(trt.BuilderFlag, "FP16"):
            fail("--weakly-typed needs TensorRT 10 (this TensorRT has no FP16 builder flag)")
        if dtype == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif dtype == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
    for b in batches:
        profile = builder.create_optimization_profile()
        shape = (b,) + tuple(shape_chw)
        profile.set_shape("input", shape, shape, shape)
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        fail(f"TensorRT failed to build an engine from {onnx_path} (see the log above)", code=1)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(blob)
    return engine, strongly


class Runner:
    """One execution context per profile, its I/O buffers and a CUDA graph of its enqueue."""

    def __init__(self, trt, torch, engine, profile, batch, shape_chw, torch_dtype):
        self.torch = torch
        self.ctx = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
        self.x = torch.empty((batch,) + tuple(shape_chw), device="cuda", dtype=torch_dtype)
        self.ctx.set_input_shape("input", tuple(self.x.shape))
        out_shape = tuple(self.ctx.get_tensor_shape("logits"))
        self.y = torch.empty(out_shape, device="cuda", dtype=torch_dtype)
        self.ctx.set_tensor_address("input", self.x.data_ptr())
        self.ctx.set_tensor_address("logits", self.y.data_ptr())
        self.graph = None

    def enqueue(self):
        if not self.ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("execute_async_v3 failed")

    def run(self, x):
        self.x.copy_(x)
        self.torch.cuda.synchronize()
        self.enqueue()
        self.stream.synchronize()
        return self.y.clone()

    def capture(self, warmup):
        torch = self.torch
        for _ in range(warmup):  # TensorRT's lazy initialization happens outside the capture
            self.enqueue()
        self.stream.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            self.enqueue()
        torch.cuda.synchronize()

    def time_ms(self, iters):
        # No L2 flush: a served engine replays back to back, and both engines are timed alike.
        with self.torch.cuda.stream(self.stream):
            return harness.cuda_time_ms(self.graph.replay, iters, flush=False)["ms"]


def main(argv=None):
    args = parse_args(argv)
    batches = args.batches
    trt, torch, plugin_path = check_environment(args)
    sys.path.insert(0, str(ROOT))
    import nextvit_kernels as nk

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    if plugin_path is not None:
        load_plugins(trt, plugin_path, args.kernels_lib)

    model = getattr(nk, args.variant)().eval()
    if args.checkpoint:
        nk.load_checkpoint(model, args.checkpoint)
    h, w = args.size
    shape_chw = (3, h, w)
    opset = 22 if args.dtype == "bf16" else 17

    tmp = Path(args.keep_onnx) if args.keep_onnx else Path(tempfile.mkdtemp(prefix="nextvit_trt_"))
    tmp.mkdir(parents=True, exist_ok=True)
    kinds = ["stock"] + ([] if args.stock_only else ["plugin"])
    engines = {}
    for kind in kinds:
        path = tmp / f"{args.variant}_{args.dtype}_{kind}.onnx"
        # the plugin graph's only standard op (Transpose) accepts bf16 at opset 17
        nk.export_onnx(model, path, input_shape=(1,) + shape_chw, dtype=torch_dtype, plugins=(kind == "plugin"),
                       dynamic_batch=True, opset=opset if kind == "stock" else 17)
        print(f"building the {kind} engine from {path} (batches {batches}) ...", flush=True)
        engines[kind], strongly = build_engine(trt, logger, path, batches, shape_chw, args, args.dtype)

    model = model.cuda()
    results = []
    for pi, b in enumerate(batches):
        x = torch.randn((b,) + shape_chw, device="cuda")
        x = x * torch.linspace(1, 3, b, device="cuda").view(b, 1, 1, 1)
        row = {"batch": b}
        outs = {}
        runners = {k: Runner(trt, torch, engines[k], pi, b, shape_chw, torch_dtype) for k in kinds}
        for k, r in runners.items():
            outs[k] = r.run(x.to(torch_dtype)).float()
            r.capture(args.warmup)
        for k in kinds:  # alternate, then take each one's median
            row[f"{k}_ms"] = runners[k].time_ms(args.iters)
        for k in kinds:
            row[f"{k}_ms"] = min(row[f"{k}_ms"], runners[k].time_ms(args.iters))
            row[f"{k}_img_s"] = b / row[f"{k}_ms"] * 1e3
        if "plugin" in outs:
            ref = outs["stock"]
            row["plugin_vs_stock_rel_err"] = ((outs["plugin"] - ref).abs().max() / ref.abs().max()).item()
            row["speedup"] = row["stock_ms"] / row["plugin_ms"]
        if pi == 0:
            with torch.no_grad():
                ref32 = model(x)
            for k in kinds:
                row[f"{k}_vs_torch_fp32_rel_err"] = ((outs[k] - ref32).abs().max() / ref32.abs().max()).item()
        results.append(row)
        del runners

    env = harness.environment(tensorrt=trt.__version__, nextvit_kernels=nk.__version__)
    info = {
        **env, "variant": args.variant, "dtype": args.dtype, "size": [h, w], "weights": args.checkpoint or "random",
        "strongly_typed": strongly, "timing": f"CUDA-graph replay, median of {args.iters} (best of 2 rounds)",
        "plugin_library": str(plugin_path) if plugin_path else None,
        # the names these two had in the files written before the harness
        "cuda_runtime": env["cuda"], "time": env["date"], "results": results,
    }
    out = harness.write_json(
        Path(args.out_dir) / f"trt_bench_{args.variant}_{args.dtype}_{_dt.datetime.now():%Y%m%d_%H%M%S}.json", info)

    print(f"\n{args.variant} {args.dtype} {h}x{w} on {info['card']} (driver {info['driver']}, "
          f"TensorRT {info['tensorrt']}, torch {info['torch']})")
    columns = [("batch", "batch", "{}"), ("stock ms", "stock_ms", "{:.3f}"), ("stock img/s", "stock_img_s", "{:.0f}")]
    if "plugin" in kinds:
        columns += [("plugin ms", "plugin_ms", "{:.3f}"), ("plugin img/s", "plugin_img_s", "{:.0f}"),
                    ("speedup", "speedup", "{:.2f}x"), ("rel err", "plugin_vs_stock_rel_err", "{:.2e}")]
    print(harness.format_table(results, columns))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
