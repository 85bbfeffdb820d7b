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
import nextvit_kernels as nk
from nextvit_kernels import serve, testing

TINY = (1, 1, 5, 1)
SIZE = 32

try:
    SERVER = serve.find_server()[0]
except FileNotFoundError as err:
    SERVER = None
    pytest.skip(f"no tritonserver: {err}", allow_module_level=True)
if _builds.find_c_compiler() is None:
    pytest.skip("the backend and the stand-in need a C compiler", allow_module_level=True)

th = pytest.importorskip("tritonclient.http")
tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def _backend(sanitized=False):
    d = _builds.c_library(sanitized=sanitized)
    backend = d / "csrc" / "triton" / "libtriton_nextvit.so"
    if not backend.exists():
        pytest.skip("the Triton backend was not built (pip install nlohmann-json)")
    return backend, d / "libnextvit_kernels.so"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = nk.NextViT(depths=TINY).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding is exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _reference(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        model.kernels = "reference"
        return model(torch.from_numpy(x)).numpy()


def _images(rng, b):
    return rng.standard_normal((b, 3, SIZE, SIZE)).astype(np.float32)


def _http_infer(url, model, x, class_count=0):
    with th.InferenceServerClient(url) as c:
        i = th.InferInput("images", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        out = [th.InferRequestedOutput("logits", class_count=class_count)]
        return c.infer(model, [i], outputs=out).as_numpy("logits")


def _grpc_infer(url, model, x):
    with tg.InferenceServerClient(url) as c:
        i = tg.InferInput("images", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        return c.infer(model, [i]).as_numpy("logits")


def _wait_ready(url, name, timeout=120):
    with th.InferenceServerClient(url) as c:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if c.is_model_ready(name):
                    return
            except InferenceServerException:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"model {name} not ready in {timeout} s")


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
    # a long queue delay: the concurrent requests below meet in one or two executions
    serve.write_repository(tiny, str(repo), "tiny", dtype="fp32", size=SIZE, max_batch=8, instances=1, kind="model",
                           compare=False, queue_delay_us=3_000_000, log=lambda s: None)
    http, grpc, metrics = serve.free_port(), serve.free_port(), serve.free_port()
    env = dict(os.environ, NEXTVIT_CUDA_DRIVER=testing.driver_library(), TRITON_INTERPRET="1",
               NEXTVIT_TRITON_BACKEND=str(backend), NEXTVIT_CLIB=str(library))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nextvit_kernels.serve", "run", "--repo", str(repo),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True, bufsize=0)
    try:
        banner = _lines(proc, 5, timeout=180, log=tmp_path / "serve.log")  # printed once the server is live
        assert f"http://127.0.0.1:{http}" in banner[1] and f"127.0.0.1:{grpc}" in banner[2], banner
        assert banner[4].split() == ["models", "tiny"], banner
        url, gurl = f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
        _wait_ready(url, "tiny")
        rng = np.random.default_rng(7)
        cases = [("http", _images(rng, 1)), ("grpc", _images(rng, 2)), ("http", _images(rng, 3)),
                 ("grpc", _images(rng, 1)), ("classify", _images(rng, 1))]
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(_grpc_infer, gurl, "tiny", x) if kind == "grpc"
                       else pool.submit(_http_infer, url, "tiny", x, 3 if kind == "classify" else 0)
                       for kind, x in cases]
            results = [f.result(timeout=600) for f in futures]
        labels = serve.imagenet_labels()
        for (kind, x), got in zip(cases, results):
            ref = _reference(tiny, x)
            if kind == "classify":  # "value:index:label" strings, best first
                entries = [e.decode().split(":", 2) for e in got.reshape(-1)]
                top = np.argsort(-ref[0])[:3]
                assert [int(e[1]) for e in entries] == list(top)
                assert [e[2] for e in entries] == [labels[i] for i in top]
                np.testing.assert_allclose([float(e[0]) for e in entries], ref[0][top], rtol=1e-4, atol=1e-4)
                continue
            assert got.shape == ref.shape, (kind, got.shape)
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)  # every row its own request's
        with th.InferenceServerClient(url) as c:
            stats = c.get_inference_statistics("tiny")["model_stats"][0]
        assert stats["inference_count"] == sum(len(x) for _, x in cases)
        assert 1 <= stats["execution_count"] < len(cases), stats  # batched
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
    env = {"NEXTVIT_CUDA_DRIVER": testing.driver_library(), testing.REPORT_ENV: str(report), "TRITON_INTERPRET": "0"}
    env.update(extra_env or {})
    return serve.Server(str(repo), backend=str(backend), library=str(library), env=env,
                        log=str(tmp_path / "server.log"), exit_timeout=5), report


def test_bad_requests_corrupt_model_and_reload_counted(tiny, tmp_path):
    backend, library = _backend()
    repo = _counted_repo(tiny, tmp_path)
    srv, report = _counted_server(repo, tmp_path, backend, library)
    with srv:
        assert srv.models == ["auto", "broken", "tiny"]
        _wait_ready(srv.http_url, "tiny")
        _lifecycle(srv.http_url, np.random.default_rng(1))
    assert srv.proc.returncode == 0, srv._tail()
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
        _wait_ready(srv.http_url, "tiny")
        _lifecycle(srv.http_url, np.random.default_rng(2))
        with th.InferenceServerClient(srv.http_url) as c:  # every instance finalized under the sanitizers
            for name in ("tiny", "auto"):
                c.unload_model(name)
            deadline = time.time() + 30
            while (c.is_model_ready("tiny") or c.is_model_ready("auto")) and time.time() < deadline:
                time.sleep(0.1)
        srv.stop(timeout=10)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "AddressSanitizer" not in log and "runtime error:" not in log, log[-4000:]
    assert "successfully unloaded 'tiny'" in log and "successfully unloaded 'auto'" in log
    # Not the exit status: with the ASan runtime preloaded, the wheel's libp11-kit can deadlock in its
    # own destructor (freelocale) after every model is unloaded, and the server is then killed.
    assert json.loads(report.read_text())["live_allocs"] == 0
