"""Serving Next-ViT with NVIDIA Triton Inference Server, through the native backend over the C
runtime (csrc/triton: ``libtriton_nextvit.so``).

    python -m nextvit_kernels.serve repo --variant s --checkpoint C --dtype fp16 --out REPO
        [--size 224] [--max-batch 64] [--instances 2] [--layout nchw|nhwc] [--features] [--no-compare]
    python -m nextvit_kernels.serve run --repo REPO [--http-port P] [--grpc-port Q] [--metrics-port M]
        [--server PATH] [--models a,b]

``repo`` writes ``REPO/nextvit_<v>/`` (config.pbtxt, labels.txt, 1/model.nvk) for this backend and,
unless ``--no-compare``, the same weights for Triton's other backends beside it: ``nextvit_<v>_trt``
(the plugin-node ONNX and the trtexec line that builds its ``model.plan``), ``nextvit_<v>_onnx``
(plain ONNX for the ONNX Runtime backend) and ``nextvit_<v>_python`` (the Python backend over
``nextvit_kernels.runtime.Model``, the usual way to serve a library from Python).

``run`` starts ``tritonserver`` (``--server``, else ``tritonserver`` on ``$PATH``, else the one in
the ``nvidia-pytriton`` wheel) with a backend folder holding this package's backend and C library,
loads every model of the repository that this server can load (and says why it skips the others),
prints the endpoints and serves until interrupted. With ``NEXTVIT_CUDA_DRIVER`` naming the CPU
stand-in (``nextvit_kernels.testing.driver_library()``) and ``TRITON_INTERPRET=1`` the server's
launches are computed on the CPU (``testing.hosted_environment``): the whole serving path, without
a GPU.
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional, Sequence

from . import cli

BACKEND = "nextvit"
BACKEND_LIB = "libtriton_nextvit.so"
CLIB = "libnextvit_kernels.so"
KINDS = {"gpu": "KIND_GPU", "model": "KIND_MODEL"}
LAYOUTS = ("nchw", "nhwc")
TYPES = {"fp16": "TYPE_FP16", "fp32": "TYPE_FP32"}


# ------------------------------------------------------------------ the model repository
def imagenet_labels() -> List[str]:
    """The 1000 ImageNet class names in index order (timm's packaged ImageNetInfo)."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def _pbtxt(name: str, backend: str, max_batch: int, inp, outputs, instances: int, kind: str, queue_delay_us: int,
           params=()) -> str:
    """A config.pbtxt: one input and the outputs, each (name, data_type, dims[, label file])."""
    def tensor(t):
        label = f'\n    label_filename: "{t[3]}"' if len(t) > 3 and t[3] else ""
        return f'  {{\n    name: "{t[0]}"\n    data_type: {t[1]}\n    dims: [ {", ".join(map(str, t[2]))} ]{label}\n  }}'
    return (f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {max_batch}\n'
            f'input [\n{tensor(inp)}\n]\noutput [\n{("," + chr(10)).join(map(tensor, outputs))}\n]\n'
            f'instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[kind]}\n  }}\n]\n'
            f'dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n'
            + "".join(f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in params))


def config_text(name: str, dtype: str, size: Optional[int], max_batch: int, instances: int, kind: str = "gpu",
                layout: str = "nchw", n_classes: int = 1000, features: bool = False, labels: bool = True,
                queue_delay_us: int = 100) -> str:
    """config.pbtxt of a model served by this backend."""
    if dtype not in TYPES or kind not in KINDS or layout not in LAYOUTS:
        raise ValueError(f"dtype {dtype!r} ({'/'.join(TYPES)}), kind {kind!r} ({'/'.join(KINDS)}), "
                         f"layout {layout!r} ({'/'.join(LAYOUTS)})")
    h = w = size if size else -1
    t = TYPES[dtype]
    outs = []
    if n_classes:  # FP32 whatever the model's dtype: Triton's classification extension takes no FP16 output
        outs.append(("logits", "TYPE_FP32", [n_classes], "labels.txt" if labels else None))
    if features:
        outs += [(f"features_{s}", t, [-1, -1, -1]) for s in range(4)]
    return _pbtxt(name, BACKEND, max_batch, ("images", t, [3, h, w] if layout == "nchw" else [h, w, 3]), outs,
                  instances, kind, queue_delay_us, [("layout", layout.upper()), ("model_file", "model.nvk")])


def write_repository(model, out: str, name: str, dtype: str = "fp16", size: Optional[int] = 224, max_batch: int = 64,
                     instances: int = 1, kind: str = "gpu", layout: str = "nchw", features: bool = False,
                     compare: bool = True, queue_delay_us: int = 100, log=print) -> str:
    """Writes ``model`` (a NextViT) into the Triton model repository ``out`` as ``name``; returns the
    model's folder. ``compare`` adds the TensorRT, ONNX Runtime and Python-backend versions beside it."""
    from . import config, model_file
    from .plan import DTYPES
    if dtype not in TYPES:
        raise ValueError(f"dtype {dtype!r}: the server takes {' or '.join(TYPES)}")
    if max_batch < 1 or instances < 1:
        raise ValueError(f"max_batch {max_batch} and instances {instances} must be >= 1")
    model = model.eval()
    mdir = os.path.join(out, name)
    os.makedirs(os.path.join(mdir, "1"), exist_ok=True)
    plan = model_file.fold_for_runtime(model, DTYPES[dtype])
    model_file.save_plan(plan, os.path.join(mdir, "1", "model.nvk"), config.variant_of(model.depths))
    n_classes = plan.head[0].shape[0] if plan.head is not None else 0  # a backbone has no head
    labels = n_classes == 1000
    if labels:
        with open(os.path.join(mdir, "labels.txt"), "w") as f:
            f.write("\n".join(imagenet_labels()) + "\n")
    with open(os.path.join(mdir, "config.pbtxt"), "w") as f:
        f.write(config_text(name, dtype, size, max_batch, instances, kind, layout, n_classes, features, labels,
                            queue_delay_us))
    log(f"serve: wrote {mdir} (backend {BACKEND}, {dtype}, {size or 'any'}x{size or 'any'}, max batch {max_batch}, "
        f"{instances} x {KINDS[kind]})")
    if compare:
        _write_comparisons(model, out, name, dtype, size or 224, max_batch, instances, n_classes, labels, log)
    return mdir


def _plain_config(name, backend, dtype, size, max_batch, instances, n_classes):
    """config.pbtxt of a comparison model (input ``input``, NCHW, fixed size; logits in the model's dtype)."""
    t = TYPES[dtype]
    return _pbtxt(name, backend, max_batch, ("input", t, [3, size, size]), [("logits", t, [n_classes])], instances,
                  "gpu", 100)


def trtexec_command(onnx_path: str, plan_path: str, size: int, max_batch: int) -> str:
    opt = min(64, max_batch)
    return (f"trtexec --onnx={onnx_path} --staticPlugins=libnextvit_trt_plugins_trt10.so --stronglyTyped "
            f"--minShapes=input:1x3x{size}x{size} --optShapes=input:{opt}x3x{size}x{size} "
            f"--maxShapes=input:{max_batch}x3x{size}x{size} --saveEngine={plan_path}")


def _write_comparisons(model, out, name, dtype, size, max_batch, instances, n_classes, labels, log):
    from .onnx_export import export_onnx
    from .plan import DTYPES
    if not n_classes:
        log("serve: a backbone without a head: no comparison models")
        return
    tdt = DTYPES[dtype]
    shape = (1, 3, size, size)
    # TensorRT: the plan is built where TensorRT is (trtexec), from the plugin-node ONNX written here.
    trt = os.path.join(out, f"{name}_trt")
    os.makedirs(os.path.join(trt, "1"), exist_ok=True)
    export_onnx(model, os.path.join(trt, "plugins.onnx"), input_shape=shape, dtype=tdt, plugins=True,
                dynamic_batch=True)
    with open(os.path.join(trt, "config.pbtxt"), "w") as f:
        f.write(_plain_config(f"{name}_trt", "tensorrt", dtype, size, max_batch, instances, n_classes))
    cmd = trtexec_command(os.path.join(trt, "plugins.onnx"), os.path.join(trt, "1", "model.plan"), size, max_batch)
    with open(os.path.join(trt, "BUILD.md"), "w") as f:
        f.write(f"# {name}_trt: build its TensorRT plan where TensorRT is installed\n\n```sh\n{cmd}\n```\n\n"
                "The plugin library comes from csrc/trt (one per TensorRT major); the server loads it with\n"
                "`tritonserver --backend-config=tensorrt,plugins=/path/libnextvit_trt_plugins_trt10.so`.\n")
    # ONNX Runtime: plain ONNX (no plugins), loaded by Triton's onnxruntime backend.
    ort = os.path.join(out, f"{name}_onnx")
    os.makedirs(os.path.join(ort, "1"), exist_ok=True)
    export_onnx(model, os.path.join(ort, "1", "model.onnx"), input_shape=shape, dtype=tdt, plugins=False,
                dynamic_batch=True)
    with open(os.path.join(ort, "config.pbtxt"), "w") as f:
        f.write(_plain_config(f"{name}_onnx", "onnxruntime", dtype, size, max_batch, instances, n_classes))
    # Python backend over runtime.Model: the same C runtime behind Triton's Python process boundary.
    py = os.path.join(out, f"{name}_python")
    os.makedirs(os.path.join(py, "1"), exist_ok=True)
    shutil.copy2(os.path.join(out, name, "1", "model.nvk"), os.path.join(py, "1", "model.nvk"))
    with open(os.path.join(py, "1", "model.py"), "w") as f:
        f.write(PYTHON_BACKEND_MODEL)
    with open(os.path.join(py, "config.pbtxt"), "w") as f:
        f.write(_plain_config(f"{name}_python", "python", dtype, size, max_batch, instances, n_classes))
    log(f"serve: wrote {trt} (build its plan: {cmd}), {ort} and {py}")


PYTHON_BACKEND_MODEL = '''"""Triton Python backend over nextvit_kernels.runtime.Model (written by nextvit_kernels.serve):
the comparison the native backend is measured against."""
import os

import torch
import triton_python_backend_utils as pb_utils

from nextvit_kernels import runtime


class TritonPythonModel:
    def initialize(self, args):
        device = int(args["model_instance_device_id"])
        self.device = torch.device("cuda", device)
        self.model = runtime.Model(os.path.join(os.path.dirname(__file__), "model.nvk"), device=device)

    def execute(self, requests):
        xs = [torch.from_numpy(pb_utils.get_input_tensor_by_name(r, "input").as_numpy()) for r in requests]
        sizes = [x.shape[0] for x in xs]
        out = self.model(torch.cat(xs).to(self.device)).cpu().numpy()
        responses, row = [], 0
        for n in sizes:
            t = pb_utils.Tensor("logits", out[row:row + n])
            responses.append(pb_utils.InferenceResponse(output_tensors=[t]))
            row += n
        return responses
'''


# ------------------------------------------------------------------ the server
def find_server(server: Optional[str] = None):
    """(tritonserver path, the library folders it needs or []) from ``server``, ``$PATH`` or the
    nvidia-pytriton wheel; raises FileNotFoundError saying how to get one."""
    if server:
        if not os.access(server, os.X_OK):
            raise FileNotFoundError(f"--server {server} is not an executable")
        return os.path.abspath(server), []
    found = shutil.which("tritonserver")
    if found:
        return found, []
    import importlib.util
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        pkg = list(spec.submodule_search_locations)[0]
        exe = os.path.join(pkg, "tritonserver", "bin", "tritonserver")
        libs = os.path.join(os.path.dirname(pkg), "nvidia_pytriton.libs")
        if os.path.exists(exe):
            if not os.access(exe, os.X_OK):
                os.chmod(exe, 0o755)  # wheels do not always keep the mode
            return exe, [libs] if os.path.isdir(libs) else []
    raise FileNotFoundError("no tritonserver: pass --server PATH, put it on $PATH, or "
                            "`pip install --no-deps nvidia-pytriton==0.7.0` (it carries tritonserver 2.51.0; "
                            "--no-deps keeps its numpy<2 pin out)")


def _default_backend() -> str:
    return os.environ.get("NEXTVIT_TRITON_BACKEND") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                      BACKEND_LIB)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, path: str, body: Optional[bytes] = None):
    """(status, body) of a GET (or, with ``body``, a POST) to the server's HTTP endpoint; (0, b"") when
    it does not answer."""
    try:
        req = urllib.request.Request(f"http://{url}{path}", data=body, method="POST" if body is not None else "GET")
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def wait_ready(url: str, models: Sequence[str], timeout: float = 120.0, alive=lambda: True) -> Dict[str, str]:
    """Waits up to ``timeout`` seconds for each of ``models`` on the server at ``url`` (host:port,
    HTTP) to be ready; returns {model: why not} for those that are not: a failed load answers at
    once, with the server's reason. ``alive()`` false stops the wait (the server exited)."""
    deadline, missing = time.time() + timeout, {}
    for m in models:
        why = f"not ready after {timeout:.0f} s"
        while time.time() < deadline and alive():
            if _http(url, f"/v2/models/{m}/ready")[0] == 200:
                why = None
                break
            status, index = _http(url, "/v2/repository/index", b"{}")
            failed = [e for e in (json.loads(index) if status == 200 else [])
                      if e.get("name") == m and e.get("state") == "UNAVAILABLE" and e.get("reason")]
            if failed:
                why = failed[0]["reason"]
                break
            time.sleep(0.2)
        if why:
            missing[m] = why
    return missing


def repository_models(repo: str) -> Dict[str, Optional[str]]:
    """{name: backend} of the repository's models (read from each config.pbtxt)."""
    out = {}
    for name in sorted(os.listdir(repo)):
        cfg = os.path.join(repo, name, "config.pbtxt")
        if not os.path.isfile(cfg):
            continue
        backend = None
        for line in open(cfg):
            key, _, value = line.partition(":")
            if key.strip() in ("backend", "platform"):
                backend = value.strip().strip('"')
                break
        out[name] = backend
    return out


class Server:
    """A ``tritonserver`` process serving ``repo`` with this package's backend (a context manager).

    ``backend`` / ``library``: the backend and C library to serve with (default: the installed ones);
    ``models``: the models to load at start (default: every model this server can load); ports 0
    are picked free; ``env`` adds environment variables; ``log``: a path for the server's output
    (None: inherited). ``skipped`` says which models were not loaded, and why."""

    def __init__(self, repo: str, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 server: Optional[str] = None, backend: Optional[str] = None, library: Optional[str] = None,
                 models: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None,
                 log: Optional[str] = None, args: Sequence[str] = (), exit_timeout: int = 30):
        self.repo = os.path.abspath(repo)
        if not os.path.isdir(self.repo):
            raise FileNotFoundError(f"no model repository at {repo}")
        self.exe, self.lib_dirs = find_server(server)
        self.backend = os.path.abspath(backend or _default_backend())
        if library is None:  # beside the backend (an install), else the one the package uses
            library = os.path.join(os.path.dirname(self.backend), CLIB)
            if not os.path.exists(library):
                from ._library import candidates
                library = candidates()[0]
        self.library = os.path.abspath(library)
        for what, path in (("backend", self.backend), ("C library", self.library)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no {what} at {path}: build the C library (README, 'What the install does') "
                                        f"with nlohmann-json installed, or set NEXTVIT_TRITON_BACKEND")
        self.http_port, self.grpc_port, self.metrics_port = (p or free_port() for p in (http_port, grpc_port,
                                                                                        metrics_port))
        self.env, self.log_path, self.args = dict(env or {}), log, list(args)
        self.exit_timeout = exit_timeout  # seconds the server waits for open connections when stopping
        self.models, self.skipped = self._loadable(models)
        self.proc = None
        self._dir = None

    # ---------------------------------------------------------------- what to load
    def _backend_dirs(self) -> Dict[str, str]:
        """{backend name: folder} the server can use: ours, and those installed with the server."""
        dirs = {BACKEND: None}
        for base in (os.path.join(os.path.dirname(os.path.dirname(self.exe)), "backends"), "/opt/tritonserver/backends"):
            if os.path.isdir(base):
                for b in os.listdir(base):
                    dirs.setdefault(b, os.path.join(base, b))
        return dirs

    def _loadable(self, wanted):
        have = self._backend_dirs()
        models, skipped = [], {}
        for name, backend in repository_models(self.repo).items():
            if wanted is not None and name not in wanted:
                continue
            mdir = os.path.join(self.repo, name)
            if backend == "tensorrt" and not any(os.path.exists(os.path.join(mdir, v, "model.plan"))
                                                 for v in os.listdir(mdir)):
                build = os.path.join(mdir, "BUILD.md")
                skipped[name] = f"no model.plan yet ({build} says how to build it)"
            elif backend == "python" and wanted is None:
                skipped[name] = "the Python-backend comparison loads only when named (--models)"
            elif backend not in have:
                skipped[name] = f"this server has no {backend} backend"
            else:
                models.append(name)
        missing = set(wanted or ()) - set(models) - set(skipped)
        if missing:
            raise ValueError(f"no model {', '.join(sorted(missing))} in {self.repo}")
        return models, skipped

    # ---------------------------------------------------------------- start / stop
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def environment(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        paths = self.lib_dirs + [os.path.dirname(self.library)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        if env.get("NEXTVIT_CUDA_DRIVER") and env.get("TRITON_INTERPRET", "0") not in ("", "0"):
            # the CPU stand-in computes the server's launches: it hosts this Python to do it
            from .testing import DRIVER_ENV, hosted_environment
            hosted = hosted_environment(library=self.library)
            hosted.pop(DRIVER_ENV, None)  # the caller's choice of stand-in stands
            env.update(hosted)
        return env

    def command(self) -> List[str]:
        return [self.exe, f"--model-repository={self.repo}", f"--backend-directory={self._dir}",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--model-control-mode=explicit", "--exit-on-error=false",
                f"--exit-timeout-secs={self.exit_timeout}"] + [f"--load-model={m}" for m in self.models] + self.args

    def start(self, timeout: float = 120.0) -> "Server":
        self._dir = tempfile.mkdtemp(prefix="nvk-backends-")
        ours = os.path.join(self._dir, BACKEND)
        os.makedirs(ours)
        # symlinks: the backend's RUNPATH ($ORIGIN) finds the C library beside it
        os.symlink(self.backend, os.path.join(ours, BACKEND_LIB))
        os.symlink(self.library, os.path.join(ours, CLIB))
        for name, path in self._backend_dirs().items():
            if name == "python":
                self._python_backend(path)
            elif path is not None:
                os.symlink(path, os.path.join(self._dir, name))
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=out,
                                         stderr=subprocess.STDOUT if out else None, start_new_session=True)
        finally:
            if out:
                out.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            if _http(self.http_url, "/v2/health/live")[0] == 200:
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"tritonserver did not come up in {timeout:.0f} s:\n{self.log_tail()}")

    def _python_backend(self, path: str) -> None:
        """The Python backend, with a stub for this Python: the nvidia-pytriton wheel keeps one stub
        per Python version outside backends/python (pytriton copies the right one in when it starts),
        and without it the backend does not initialize."""
        import sysconfig
        py = os.path.join(self._dir, "python")
        os.makedirs(py)
        for f in os.listdir(path):
            os.symlink(os.path.join(path, f), os.path.join(py, f))
        stub = os.path.join(py, "triton_python_backend_stub")
        if not os.path.exists(stub):
            ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
            found = os.path.join(os.path.dirname(os.path.dirname(path)), "python_backend_stubs", ver,
                                 "triton_python_backend_stub")
            if os.path.exists(found):
                os.symlink(found, stub)
        # the stub runs this Python's packages (nextvit_kernels, torch) and links its libpython
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env.setdefault("PYTHONPATH", os.pathsep.join([root] + [p for p in sys.path if p and p != root]))
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            self.lib_dirs = self.lib_dirs + [libdir]

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server's log ("" without one)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def model_ready(self, name: str) -> bool:
        return _http(self.http_url, f"/v2/models/{name}/ready")[0] == 200

    def wait_ready(self, models: Optional[Sequence[str]] = None, timeout: float = 120.0) -> Dict[str, str]:
        """``wait_ready`` for this server's models (default: those it loads at start)."""
        return wait_ready(self.http_url, self.models if models is None else models, timeout,
                          alive=lambda: self.proc is not None and self.proc.poll() is None)

    def stop(self, timeout: Optional[float] = None) -> Optional[int]:
        """Stops the server (SIGINT: a graceful exit that unloads every model, then SIGKILL)."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(self.exit_timeout + 15 if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            rc = self.proc.returncode
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return rc

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ------------------------------------------------------------------ command line
def _repo_main(a) -> int:
    from . import model as model_mod
    from .checkpoint import load_checkpoint
    variant = cli.VARIANTS[a.variant]
    net = getattr(model_mod, variant)()
    if a.checkpoint:
        res = load_checkpoint(net, a.checkpoint)
        print(f"serve: loaded {a.checkpoint} ({res.format} format)", file=sys.stderr)
    else:
        print("serve: no --checkpoint: random weights (a repository to test with, not to classify)", file=sys.stderr)
    write_repository(net, a.out, a.name or f"nextvit_{a.variant}", a.dtype, a.size or None, a.max_batch,
                     a.instances, a.kind, a.layout, a.features, not a.no_compare,
                     log=lambda s: print(s, file=sys.stderr))
    print(f"serve: start it with: python -m nextvit_kernels.serve run --repo {a.out}", file=sys.stderr)
    return 0


def _run_main(a) -> int:
    try:
        srv = Server(a.repo, a.http_port, a.grpc_port, a.metrics_port, a.server, models=a.models)
    except (FileNotFoundError, ValueError) as err:  # no server, backend or repository; an unknown model
        print(f"serve: {err}", file=sys.stderr)
        return 2
    for name, why in srv.skipped.items():
        print(f"serve: not loading {name}: {why}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        stack.callback(srv.stop)
        srv.start(timeout=a.timeout)
        print(f"serve: tritonserver {srv.exe}\n  HTTP    http://{srv.http_url}\n  gRPC    {srv.grpc_url}\n"
              f"  metrics {srv.metrics_url}\n  models  {', '.join(srv.models) or '(none)'}", flush=True)
        try:
            return srv.proc.wait()
        except KeyboardInterrupt:
            return 0


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("repo", help="write a model repository", formatter_class=cli.HelpFormatter)
    r.add_argument("--variant", type=cli.variant, default="s", help="s, b or l")
    r.add_argument("--checkpoint", help="weights (any format load_checkpoint takes); default: random init")
    r.add_argument("--dtype", choices=sorted(TYPES), default="fp16")
    r.add_argument("--out", required=True, help="the repository folder (created)")
    r.add_argument("--name", help="the model's name (default nextvit_<variant>)")
    r.add_argument("--size", type=int, default=224, help="image height = width; 0: any size (dims -1)")
    r.add_argument("--max-batch", type=cli.positive_int, default=64)
    r.add_argument("--instances", type=cli.positive_int, default=1, help="instances per GPU")
    r.add_argument("--kind", choices=sorted(KINDS), default="gpu",
                   help="instance kind: gpu (one set per GPU) or model (parameters.device)")
    r.add_argument("--layout", choices=LAYOUTS, default="nchw", help="input layout: [3,H,W] or [H,W,3]")
    r.add_argument("--features", action="store_true", help="also publish the four stage maps")
    r.add_argument("--no-compare", action="store_true", help="skip the TensorRT / ONNX Runtime / Python versions")
    s = sub.add_parser("run", help="start tritonserver on a repository", formatter_class=cli.HelpFormatter)
    s.add_argument("--repo", required=True)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--server", help="the tritonserver executable (default: $PATH, then the nvidia-pytriton wheel)")
    s.add_argument("--models", type=cli.csv("model"), help="comma list of the models to load (default: all)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to come up")
    a = p.parse_args(argv)
    if a.command == "repo":
        if a.size < 0:
            p.error("--size must be >= 0")
        return _repo_main(a)
    return _run_main(a)


if __name__ == "__main__":
    sys.exit(main())
