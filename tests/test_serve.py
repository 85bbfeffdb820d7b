"""Serving on the real NVIDIA Triton Inference Server (tritonserver 2.51.0 from the nvidia-pytriton
wheel), on the CPU: the native backend (csrc/triton) over the C runtime, whose launches go through
the CPU driver stand-in of nextvit_kernels.testing.

- computed: ``python -m nextvit_kernels.serve run`` with ``NEXTVIT_CUDA_DRIVER`` and
  ``TRITON_INTERPRET=1`` in its environment; the stand-in hosts Python in the server and runs every
  launch under Triton's interpreter. Concurrent HTTP and gRPC clients with their own images and batch
  sizes each get their own logits (against the PyTorch model, float32); the statistics show batched
  executions; the classification extension names the reference's top classes.
- counted (launches checked, not run: fast): every bad request gets its error and the next good one
  succeeds; a truncated model file fails its own load only; config auto-complete; unload / reload
  free every device allocation (the stand-in's report at exit); the backend under ASan + UBSan.

The model is the tiny NextViT of tests/test_runtime.py (the published channel counts, fewer blocks),
fp32, at 32 x 32: one interpreted forward takes seconds, so the computed test batches everything it
sends into a few executions.
"""
import concurrent.futures
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import _builds
from _util import randomize_, triton_backend
import nextvit_kernels as nk
from nextvit_kernels import model_file, serve, testing

TINY = (1, 1, 5, 1)
SIZE = 32

th = pytest.importorskip("tritonclient.http")
tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@functools.lru_cache(maxsize=None)
def _driver() -> str:
    """The plain stand-in, for the server's process: built by a child, since a worker of a split run
    builds it only where it is loaded into the worker (tests/_workers.py)."""
    r = subprocess.run([sys.executable, "-c", "from nextvit_kernels import testing; print(testing.driver_library())"],
                       capture_output=True, text=True, timeout=300, env=_child_env())
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def _child_env():
    """This worker's environment for a child, which is no pytest worker (a plain build)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "LD_PRELOAD")}


def _backend(sanitized=False):
    return triton_backend(sanitized)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    with torch.no_grad():  # weights of a sane scale, BatchNorms that are not identities
        return randomize_(nk.NextViT(depths=TINY), gain=0.7).eval()


def _reference(model, x: np.ndarray, features: bool = False):
    """float32 PyTorch: logits, or the four stage maps in NHWC (the backend's layout)."""
    model.kernels = "reference"
    with torch.no_grad():
        if features:
            return [f.permute(0, 2, 3, 1).numpy() for f in model.forward_features(torch.from_numpy(x))]
        return model(torch.from_numpy(x)).numpy()


def _close(got, ref, what):
    """Every element within 1e-4 of the reference's largest magnitude (float32 through another
    summation order), the reference not near zero (a test that can fail)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    scale = float(np.abs(ref).max())
    assert scale > 0.05, (what, scale)
    err = float(np.abs(got - ref).max())
    assert err <= 1e-4 * scale, (what, err, scale)


def _images(rng, b):
    return rng.standard_normal((b, 3, SIZE, SIZE)).astype(np.float32)


def _http_infer(url, model, x, class_count=0, outputs=("logits",)):
    with th.InferenceServerClient(url) as c:
        i = th.InferInput("images", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        out = [th.InferRequestedOutput(o, class_count=class_count) for o in outputs]
        r = c.infer(model, [i], outputs=out)
        return [r.as_numpy(o) for o in outputs] if len(outputs) > 1 else r.as_numpy(outputs[0])


def _grpc_infer(url, model, x):
    with tg.InferenceServerClient(url) as c:
        i = tg.InferInput("images", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        return c.infer(model, [i], outputs=[tg.InferRequestedOutput("logits")]).as_numpy("logits")


def _lines(proc, n, timeout, log):
    """The first ``n`` lines ``proc`` prints, within ``timeout`` seconds."""
    import select
    out, deadline = [], time.time() + timeout
    while len(out) < n:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.time()))
        line = proc.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"serve run printed {out} (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        out.append(line.decode())
    return out


# ------------------------------------------------------------------ computed, through `serve run`
@pytest.mark.slow
def test_serve_run_computes_each_requests_own_logits(tiny, tmp_path):
    backend, library = _backend()
    repo = tmp_path / "repo"
    # a long queue delay: the concurrent requests below meet in few executions
    common = dict(dtype="fp32", size=SIZE, max_batch=8, instances=1, kind="model", compare=False,
                  queue_delay_us=3_000_000, log=lambda s: None)
    serve.write_repository(tiny, str(repo), "tiny", features=True, **common)
    serve.write_repository(tiny, str(repo), "tiny_nhwc", layout="nhwc", **common)
    http, grpc, metrics = serve.free_port(), serve.free_port(), serve.free_port()
    env = dict(os.environ, NEXTVIT_CUDA_DRIVER=_driver(), TRITON_INTERPRET="1",
               NEXTVIT_TRITON_BACKEND=str(backend), NEXTVIT_CLIB=str(library))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nextvit_kernels.serve", "run", "--repo", str(repo),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True, bufsize=0)
    try:
        banner = _lines(proc, 5, timeout=180, log=tmp_path / "serve.log")  # printed once the server is live
        assert f"http://127.0.0.1:{http}" in banner[1] and f"127.0.0.1:{grpc}" in banner[2], banner
        assert banner[4].split() == ["models", "tiny,", "tiny_nhwc"], banner
        url, gurl = f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
        assert serve.wait_ready(url, ["tiny", "tiny_nhwc"]) == {}
        rng = np.random.default_rng(7)
        features = ("logits", "features_0", "features_1", "features_2", "features_3")
        cases = [("http", _images(rng, 1)), ("grpc", _images(rng, 2)), ("http", _images(rng, 3)),
                 ("grpc", _images(rng, 1)), ("classify", _images(rng, 1)), ("features", _images(rng, 1)),
                 ("nhwc", _images(rng, 2)), ("nhwc", _images(rng, 1))]

        def send(kind, x):
            if kind == "grpc":
                return _grpc_infer(gurl, "tiny", x)
            if kind == "nhwc":
                return _http_infer(url, "tiny_nhwc", np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
            return _http_infer(url, "tiny", x, class_count=3 if kind == "classify" else 0,
                               outputs=features if kind == "features" else ("logits",))

        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(send, kind, x) for kind, x in cases]
            results = [f.result(timeout=600) for f in futures]
        labels = serve.imagenet_labels()
        for i, ((kind, x), got) in enumerate(zip(cases, results)):
            ref = _reference(tiny, x)
            if kind == "classify":  # "value:index:label" strings, best first
                entries = [e.decode().split(":", 2) for e in got.reshape(-1)]
                top = np.argsort(-ref[0])[:3]
                assert [int(e[1]) for e in entries] == list(top)
                assert [e[2] for e in entries] == [labels[j] for j in top]
                _close(np.array([float(e[0]) for e in entries]), ref[0][top], "classification")
            elif kind == "features":
                _close(got[0], ref, "logits beside the features")
                for s, (g, r) in enumerate(zip(got[1:], _reference(tiny, x, features=True))):
                    _close(g, r, f"features_{s}")
            else:
                _close(got, ref, f"request {i} ({kind}, batch {len(x)})")  # every row its own request's
        with th.InferenceServerClient(url) as c:
            stats = {m: c.get_inference_statistics(m)["model_stats"][0] for m in ("tiny", "tiny_nhwc")}
        sent = {"tiny": [x for k, x in cases if k != "nhwc"], "tiny_nhwc": [x for k, x in cases if k == "nhwc"]}
        for m, xs in sent.items():
            assert stats[m]["inference_count"] == sum(len(x) for x in xs), stats[m]
            assert 1 <= stats[m]["execution_count"] < len(xs), stats[m]  # batched
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# ------------------------------------------------------------------ counted: errors, lifecycle
def _counted_repo(tiny, root: Path) -> Path:
    repo = root / "repo"
    quiet = {"compare": False, "log": lambda s: None}
    serve.write_repository(tiny, str(repo), "tiny", dtype="fp32", size=SIZE, max_batch=4, instances=2,
                           kind="model", **quiet)
    serve.write_repository(tiny, str(repo), "tiny16", dtype="fp16", size=SIZE, max_batch=4, kind="model", **quiet)
    # a config that names only the backend: the rest is completed from the model file
    (repo / "auto" / "1").mkdir(parents=True)
    shutil.copy(repo / "tiny" / "1" / "model.nvk", repo / "auto" / "1" / "model.nvk")
    (repo / "auto" / "config.pbtxt").write_text('backend: "nextvit"\ninstance_group [ { kind: KIND_MODEL } ]\n')
    # a truncated model file
    (repo / "broken" / "1").mkdir(parents=True)
    data = (repo / "tiny" / "1" / "model.nvk").read_bytes()
    (repo / "broken" / "1" / "model.nvk").write_bytes(data[: len(data) // 2])
    (repo / "broken" / "config.pbtxt").write_text((repo / "tiny" / "config.pbtxt").read_text()
                                                 .replace('"tiny"', '"broken"'))
    return repo


def _lifecycle(url, rng):
    """Every bad request, each followed by a good one; the broken model; unload / reload."""
    good = _images(rng, 2)
    with th.InferenceServerClient(url) as c:
        def infer(model, x, dtype="FP32", name="images"):
            i = th.InferInput(name, list(x.shape), dtype)
            i.set_data_from_numpy(x)
            return c.infer(model, [i]).as_numpy("logits")

        bad = [("tiny", good.astype(np.float16), "FP16", "images", "FP16"),
               ("tiny", _images(rng, 1)[:, :, :16], "FP32", "images", "expected"),
               ("tiny", np.zeros((5, 3, SIZE, SIZE), np.float32), "FP32", "images", "batch"),
               ("tiny", good, "FP32", "pixels", "pixels"),
               ("auto", np.zeros((1, 3, 8, 8), np.float32), "FP32", "images", "cannot run"),
               ("auto", np.zeros((1, 3, 20000, 4), np.float32), "FP32", "images", "image size")]
        errors = []
        for model, x, dtype, name, expect in bad:
            with pytest.raises(InferenceServerException) as e:
                infer(model, x, dtype, name)
            errors.append(str(e.value))
            assert expect.lower() in str(e.value).lower(), (expect, str(e.value))
            assert infer("tiny", good).shape == (2, 1000)  # the server and the model go on
        assert infer("auto", np.zeros((1, 3, 64, 48), np.float32)).shape == (1, 1000)
        cfg = c.get_model_config("auto")
        assert cfg["input"][0]["dims"] == [3, -1, -1] and cfg["input"][0]["data_type"] == "TYPE_FP32"
        assert cfg["output"][0]["dims"] == [1000] and cfg["max_batch_size"] == 64 and "dynamic_batching" in cfg
        # FP16 model, FP32 logits (the classification extension takes no FP16): counted, the logits are
        # the stand-in's fresh-memory bytes (0xA5A5 as FP16) widened on the host
        x16 = th.InferInput("images", [1, 3, SIZE, SIZE], "FP16")
        x16.set_data_from_numpy(np.zeros((1, 3, SIZE, SIZE), np.float16))
        r = c.infer("tiny16", [x16], outputs=[th.InferRequestedOutput("logits")]).as_numpy("logits")
        fresh = np.frombuffer(b"\xa5\xa5", np.float16).astype(np.float32)[0]
        assert r.dtype == np.float32 and r.shape == (1, 1000) and (r == fresh).all(), (r.dtype, r[0, :4])
        r = c.infer("tiny16", [x16], outputs=[th.InferRequestedOutput("logits", class_count=3)]).as_numpy("logits")
        assert r.shape == (1, 3) and all(e.decode().split(":")[0] == f"{fresh:f}" for e in r.reshape(-1)), r
        assert not c.is_model_ready("broken")
        with pytest.raises(InferenceServerException) as e:
            c.load_model("broken")
        assert "runs past the end" in str(e.value) and "broken/1/model.nvk" in str(e.value), str(e.value)
        assert c.is_model_ready("tiny")
        for _ in range(2):
            c.unload_model("tiny", unload_dependents=False)
            deadline = time.time() + 30
            while c.is_model_ready("tiny") and time.time() < deadline:
                time.sleep(0.1)
            c.load_model("tiny")
            assert infer("tiny", good).shape == (2, 1000)
        return errors


def _counted_server(repo, tmp_path, backend, library, extra_env=None):
    report = tmp_path / "driver-report.json"
    env = {"NEXTVIT_CUDA_DRIVER": _driver(), testing.REPORT_ENV: str(report), "TRITON_INTERPRET": "0"}
    env.update(extra_env or {})
    return serve.Server(str(repo), backend=str(backend), library=str(library), env=env,
                        log=str(tmp_path / "server.log"), exit_timeout=5), report


def test_bad_requests_corrupt_model_and_reload_counted(tiny, tmp_path):
    backend, library = _backend()
    repo = _counted_repo(tiny, tmp_path)
    srv, report = _counted_server(repo, tmp_path, backend, library)
    with srv:
        assert srv.models == ["auto", "broken", "tiny", "tiny16"]
        assert srv.wait_ready(["tiny"]) == {}
        _lifecycle(srv.http_url, np.random.default_rng(1))
    assert srv.proc.returncode == 0, srv.log_tail()
    counters = json.loads(report.read_text())
    assert counters["live_allocs"] == 0 and counters["live_bytes"] == 0, counters  # unload freed everything
    assert counters["launches"] > 0


@pytest.mark.slow
def test_backend_under_asan_and_ubsan(tiny, tmp_path):
    runtimes = _builds.sanitizer_runtimes()
    if runtimes is None:
        pytest.skip("no ASan / UBSan runtime for the C compiler")
    backend, library = _backend(sanitized=True)
    repo = _counted_repo(tiny, tmp_path)
    # the server is not instrumented: the runtimes are preloaded; its own leaks are not ours to judge
    srv, report = _counted_server(repo, tmp_path, backend, library, {
        "LD_PRELOAD": ":".join(runtimes), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"})
    with srv:
        assert srv.wait_ready(["tiny"]) == {}
        _lifecycle(srv.http_url, np.random.default_rng(2))
        with th.InferenceServerClient(srv.http_url) as c:  # every instance finalized under the sanitizers
            names = ("tiny", "tiny16", "auto")
            for name in names:
                c.unload_model(name)
            deadline = time.time() + 30
            while any(c.is_model_ready(n) for n in names) and time.time() < deadline:
                time.sleep(0.1)
        srv.stop(timeout=10)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "AddressSanitizer" not in log and "runtime error:" not in log, log[-4000:]
    assert all(f"successfully unloaded '{n}'" in log for n in ("tiny", "tiny16", "auto")), log[-4000:]
    # Not the exit status: with the ASan runtime preloaded, the wheel's libp11-kit can deadlock in its
    # own destructor (freelocale) after every model is unloaded, and the server is then killed.
    assert json.loads(report.read_text())["live_allocs"] == 0


# ------------------------------------------------------------------ the repository, no server
def test_repository_command_writes_a_loadable_model(tmp_path):
    """`serve repo` from the command line: NextViT-S, fp16, the config the backend reads."""
    r = subprocess.run([sys.executable, "-m", "nextvit_kernels.serve", "repo", "--variant", "s", "--dtype", "fp16",
                        "--out", str(tmp_path / "r"), "--size", "224", "--max-batch", "16", "--instances", "2",
                        "--no-compare"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stderr and "serve run --repo" in r.stderr
    mdir = tmp_path / "r" / "nextvit_s"
    cfg = (mdir / "config.pbtxt").read_text()
    for line in ('backend: "nextvit"', "max_batch_size: 16", "data_type: TYPE_FP16", "dims: [ 3, 224, 224 ]",
                 "dims: [ 1000 ]", 'label_filename: "labels.txt"', "count: 2", "kind: KIND_GPU", "dynamic_batching",
                 'string_value: "NCHW"', 'string_value: "model.nvk"'):
        assert line in cfg, line
    labels = (mdir / "labels.txt").read_text().splitlines()
    assert labels == serve.imagenet_labels() and len(labels) == 1000 and labels[0].startswith("tench")
    plan, meta = model_file.load_plan(str(mdir / "1" / "model.nvk"))
    assert plan.dtype == torch.float16 and plan.head[0].shape == (1000, 1024)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["nextvit_s"]


def test_repository_comparisons_hold_the_same_model(tiny, tmp_path):
    """The ONNX Runtime twin computes the same logits; the TensorRT twin is the plugin graph with its
    build line; the Python twin is a valid model.py over the same model file."""
    import onnx
    import onnxruntime as ort
    serve.write_repository(tiny, str(tmp_path), "tiny", dtype="fp32", size=64, max_batch=8, log=lambda s: None)
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "tiny_onnx" / "1" / "model.onnx"))
    _close(sess.run(["logits"], {"input": x})[0], _reference(tiny, x), "onnxruntime twin")
    graph = onnx.load(str(tmp_path / "tiny_trt" / "plugins.onnx"))
    from collections import Counter
    from nextvit_kernels.onnx_export import PLUGIN_DOMAIN, plugin_node_counts
    plugins = Counter(n.op_type for n in graph.graph.node if n.domain == PLUGIN_DOMAIN)
    assert plugins == plugin_node_counts(model_file.fold_for_runtime(tiny, torch.float32))
    build = (tmp_path / "tiny_trt" / "BUILD.md").read_text()
    assert "--staticPlugins=" in build and "--saveEngine=" + str(tmp_path / "tiny_trt" / "1" / "model.plan") in build
    assert 'backend: "tensorrt"' in (tmp_path / "tiny_trt" / "config.pbtxt").read_text()
    compile((tmp_path / "tiny_python" / "1" / "model.py").read_text(), "model.py", "exec")
    assert (tmp_path / "tiny_python" / "1" / "model.nvk").read_bytes() == \
        (tmp_path / "tiny" / "1" / "model.nvk").read_bytes()
    # what serve run would load here: the TensorRT twin waits for its plan, the Python twin for --models
    models = serve.repository_models(str(tmp_path))
    assert models == {"tiny": "nextvit", "tiny_onnx": "onnxruntime", "tiny_python": "python", "tiny_trt": "tensorrt"}
