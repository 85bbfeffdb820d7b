"""The measuring harness of every benchmark in the project: one clock, one L2 flush, one record of
the machine, one table printer and one JSON writer, so that the numbers of
``python -m nextvit_kernels.bench``, of the pytest-benchmark suite (bench/conftest.py) and of the
scripts under bench/ are measured and reported the same way.

The measuring rules it implements:

- device time is read from CUDA events recorded on the current stream around a round (one call
  of the timed function), not from a host clock around a synchronize;
- the L2 cache is overwritten (256 MiB memset, untimed) before each round, so that a round reads
  its inputs and weights from DRAM as it would inside a forward, and the queued memset lets the
  host issue the round before its start event runs (host launch time hidden, as in
  ``triton.testing.do_bench``). Latencies as a caller sees them, host launch time included (the
  end-to-end rows, the C runtime against ``model(x)``), pass ``flush=False``;
- warm-up calls (JIT compilation, allocator growth, cuDNN autotuning) run first and are excluded;
- the result is the median of the rounds (min, p20 and p80 come with it).

Host time (``host_time_ms``, ``median_us``) is ``time.perf_counter`` around each call, one warm-up
call first, median.

What it offers: ``EventClock`` (a pytest-benchmark timer), ``flush_l2``, ``cuda_time_ms``,
``device_rounds``, ``time_device``, ``host_time_ms``, ``median_us``, ``environment``,
``cpu_name``, ``slug``, ``format_table`` and ``write_json``.

It imports no other module of the package, and torch only inside the functions that need it
(``bench/ops_bench.py --list`` runs without torch); it works without a GPU, Triton or matplotlib.
"""
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ timing
_L2 = {}  # device index -> the buffer flush_l2 overwrites


def flush_l2():
    """Overwrites a 256 MiB buffer (larger than any GPU's L2 so far) on the current GPU."""
    import torch

    dev = torch.cuda.current_device()
    buf = _L2.get(dev)
    if buf is None:
        buf = _L2[dev] = torch.empty(64 * 2**20, dtype=torch.int32, device=dev)
    buf.zero_()


class EventClock:
    """A pytest-benchmark timer that reads device time: called in (start, end) pairs around each
    round, it records a CUDA event at each, waits for the end event and returns the elapsed
    device seconds as the end reading (0.0 at the start), so end - start is the GPU time of the
    round. ``reset()`` (the round's setup) drops an unmatched start."""

    def __init__(self):
        import torch

        self._event = torch.cuda.Event
        self._start = None

    def reset(self):
        self._start = None

    def __call__(self):
        ev = self._event(enable_timing=True)
        ev.record()
        if self._start is None:
            self._start = ev
            return 0.0
        start, self._start = self._start, None
        ev.synchronize()
        return start.elapsed_time(ev) * 1e-3

    def __repr__(self):
        return "EventClock(CUDA events, L2 flushed before each round)"


def _stats(times_ms):
    s = sorted(times_ms)

    def at(q):
        return s[min(len(s) - 1, int(q * len(s)))]

    return dict(ms=statistics.median(s), min=s[0], p20=at(0.2), p80=at(0.8))


def cuda_time_ms(fn, iters, warmup=0, flush=True):
    """Device milliseconds of ``fn()``: ``warmup`` untimed calls, then ``iters`` rounds, each between
    two CUDA events on the current stream, the L2 flushed before each unless ``flush`` is False.
    Returns dict(ms=median, min, p20, p80)."""
    for _ in range(warmup):
        fn()
    clock = EventClock()
    times = []
    for _ in range(iters):
        if flush:
            flush_l2()
        clock()
        fn()
        times.append(clock() * 1e3)
    return _stats(times)


def device_rounds(fn, warmup_ms, rep_ms, max_rounds=2000):
    """(warm-up rounds, timed rounds) that fill about warmup_ms / rep_ms with calls of fn, sized
    from one flushed, event-timed call."""
    ms = max(cuda_time_ms(fn, 1)["ms"], 1e-3)
    return (min(max(1, int(warmup_ms / ms)), max_rounds),
            min(max(5, int(rep_ms / ms)), max_rounds))


def time_device(fn, warmup_ms, rep_ms):
    """``cuda_time_ms`` with the warm-up and the rounds sized by time (``device_rounds``)."""
    warm, rounds = device_rounds(fn, warmup_ms, rep_ms)
    return cuda_time_ms(fn, rounds, warmup=warm)


def host_time_ms(fn, iters, warmup=1):
    """Host milliseconds of ``fn()`` (``time.perf_counter``): ``warmup`` untimed calls, then
    ``iters`` timed ones. Returns dict(ms=median, min, p20, p80)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return _stats(times)


def median_us(fn, iters, warmup=1):
    """Median host microseconds of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones."""
    return host_time_ms(fn, iters, warmup)["ms"] * 1e3


# ------------------------------------------------------------------------------- environment
def cpu_name():
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def slug(text):
    """``text`` as a file-name part: lower case, runs of anything but letters and digits as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def _version(name):
    # An imported module's own version, else the installed one: importing Triton here would fix
    # its mode before a CPU run has set TRITON_INTERPRET.
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__version__", None):
        return module.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _commit():
    if not (_REPO / ".git").exists():  # an installed copy: git would answer for another tree, if any
        return None
    rev = _run(["git", "-C", str(_REPO), "rev-parse", "--short", "HEAD"])
    if not rev:
        return None
    return rev + ("-dirty" if _run(["git", "-C", str(_REPO), "status", "--porcelain"]) else "")


def _gpu(torch):
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    gpu = dict(card=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
               memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
               cuda_driver_api=None, max_clocks_sm_mem=None)
    try:  # the CUDA driver API version (e.g. 13000): torch knows it where nvidia-smi is missing
        gpu["cuda_driver_api"] = int(torch._C._cuda_getDriverVersion())
    except Exception:
        pass
    smi = _run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"])
    if smi:
        parts = [p.strip() for p in smi.splitlines()[0].split(",")]
        gpu["driver"] = parts[0] or None
        gpu["max_clocks_sm_mem"] = ", ".join(parts[1:]) or None
    return gpu


def environment(**extra):
    """What a result needs in order to be read later: the date; python, torch, Triton and timm
    versions; the machine (architecture, host name, CPU name, cores, torch's CPU threads); the
    commit of this checkout ("-dirty" with uncommitted changes); and the GPU: card, driver, CUDA,
    cuDNN (None without one), with a GPU also its SM count, capability, memory, CUDA driver API
    version and max clocks. ``extra`` is merged in last."""
    import torch

    env = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               python=platform.python_version(), torch=torch.__version__, triton=_version("triton"),
               timm=_version("timm"), machine=platform.machine(), host=platform.node(), cpu=cpu_name(),
               cores=os.cpu_count(), threads=torch.get_num_threads(), commit=_commit(),
               card=None, driver=None, cuda=None, cudnn=None)
    if torch.cuda.is_available():
        env.update(_gpu(torch))
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------- reports
def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_table(rows, columns, markdown=False):
    """``rows`` (dicts) as a table. ``columns``: (header, key, fmt) triples; ``key`` names a row's
    value or is a function of the row, ``fmt`` is a format string ("{}", "{:.2f}", "{:.1f}%"); a
    missing or None value prints "-". Number columns are right-aligned, others left. Plain text:
    padded columns two spaces apart, a dashed rule under the header; ``markdown``: a pipe table."""
    values = [[key(r) if callable(key) else r.get(key) for _, key, _ in columns] for r in rows]
    cells = [["-" if v is None else fmt.format(v) for v, (_, _, fmt) in zip(vals, columns)] for vals in values]
    heads = [head for head, _, _ in columns]
    right = [all(v is None or _is_number(v) for v in col) for col in zip(*values)] or [False] * len(columns)
    if markdown:
        def line(cs):
            return "| " + " | ".join(cs) + " |"
        rule = ["---:" if r else "---" for r in right]
    else:
        widths = [max(map(len, col)) for col in zip(heads, *cells)]

        def line(cs):
            return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cs, widths, right)).rstrip()
        rule = ["-" * w for w in widths]
    return "\n".join([line(heads), line(rule)] + [line(c) for c in cells])


def _plain(v):
    # Strict JSON: json.dumps writes NaN / Infinity (which JSON readers reject) and fails on
    # tuple keys, torch dtypes and paths.
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def write_json(path, data):
    """Writes ``data`` to ``path`` as strict JSON (indent 1, a final newline), creating the folder,
    and returns the path. Non-finite floats become strings ("nan", "inf"), tuples lists, dict
    keys and other objects (torch.dtype, Path) their str()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(data), indent=1, allow_nan=False) + "\n")
    return path
