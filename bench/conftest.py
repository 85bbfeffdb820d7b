"""The pytest-benchmark suite's options, mode, machine info and measuring helper.

GPU mode (a CUDA GPU, TRITON_INTERPRET unset): the stage shapes, each benchmark's first call
timed apart (Triton JIT / torch.compile) and checked against eager, then
``benchmark.pedantic`` with device time per round (``harness.EventClock``, L2 flushed
in the untimed setup) and warm-up rounds excluded. CPU mode (anything else): tiny shapes,
float32, the Triton kernels under the interpreter, one round per benchmark: it proves the
suite runs; its times mean nothing.
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ops_bench as ob  # noqa: E402

from nextvit_kernels import cli, harness  # noqa: E402

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
ob._import_torch_stack(smoke=not GPU)
CLOCK = harness.EventClock() if GPU else None
if GPU:
    torch.backends.cudnn.benchmark = True  # the strongest eager baseline (recorded in the machine info)


def _nonneg(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


# (option, dest, type, default, help); the GPU-only ones are reported when given on a CPU.
_OPTIONS = [
    ("--bench-dtype", "bench_dtype", cli.csv("dtype", ("fp16", "bf16")), ["fp16"],
     "comma list from fp16,bf16 (GPU; default fp16). A CPU run is float32 only"),
    ("--bench-batch", "bench_batch", cli.csv("batch", conv=cli.positive_int), [256],
     "comma list of op batch sizes (GPU; default 256). A CPU run uses batch 1"),
    ("--bench-model-batch", "bench_model_batch", cli.csv("batch", conv=cli.positive_int), [1, 256],
     "comma list of model batch sizes at 224x224 (GPU; default 1,256). A CPU run: batch 1 at 32x32"),
    ("--bench-variants", "bench_variants", cli.variants, ["s", "b", "l"],
     "comma list of model variants from s,b,l (GPU; default s,b,l). A CPU run uses a tiny NextViT"),
    ("--bench-warmup-ms", "bench_warmup_ms", _nonneg, 25.0,
     "warm-up time per benchmark, excluded from the stats (GPU; default 25)"),
    ("--bench-rep-ms", "bench_rep_ms", _nonneg, 100.0,
     "measured time per benchmark: rounds = this / one call, 5..2000 (GPU; default 100)"),
    ("--bench-budget-s", "bench_budget_s", _nonneg, 0.0,
     "benchmarks that would start this many seconds after the session start are skipped, "
     "with the reason (default 0 = no limit)"),
    ("--bench-compile-budget-s", "bench_compile_budget_s", _nonneg, 0.0,
     "the same for the torch.compile benchmarks only (default 0 = no limit)"),
]
_GPU_ONLY = ("bench_dtype", "bench_batch", "bench_model_batch", "bench_variants", "bench_warmup_ms",
             "bench_rep_ms")


def pytest_addoption(parser):
    g = parser.getgroup("nextvit benchmarks")
    for flag, dest, conv, default, text in _OPTIONS:
        g.addoption(flag, dest=dest, type=conv, default=default, help=text)
    g.addoption("--bench-no-compile", dest="bench_no_compile", action="store_true",
                help="skip every torch.compile benchmark (default: compile runs on a GPU, and for one "
                     "tiny op case on a CPU)")


class Settings:
    def __init__(self, config):
        o = config.option
        self.gpu = GPU
        self.dtypes = o.bench_dtype if GPU else ["fp32"]
        self.batches = o.bench_batch if GPU else [1]
        self.model_batches = o.bench_model_batch if GPU else [1]
        self.variants = o.bench_variants if GPU else ["tiny"]
        self.res = 224 if GPU else 32
        self.warmup_ms, self.rep_ms = o.bench_warmup_ms, o.bench_rep_ms
        self.budget_s, self.compile_budget_s = o.bench_budget_s, o.bench_compile_budget_s
        self.no_compile = o.bench_no_compile
        self.start = time.perf_counter()
        defaults = {dest: default for _, dest, _, default, _ in _OPTIONS}
        self.ignored = [f"--{d.replace('_', '-')}" for d in _GPU_ONLY if getattr(o, d) != defaults[d]] if not GPU else []

    def elapsed(self):
        return time.perf_counter() - self.start

    def skip_reason(self, compile_row=False):
        """Why a benchmark starting now must not run (a time budget is spent), or None."""
        t = self.elapsed()
        if self.budget_s and t > self.budget_s:
            return f"--bench-budget-s {self.budget_s:g} spent ({t:.0f} s into the session)"
        if compile_row:
            if self.no_compile:
                return "--bench-no-compile"
            if self.compile_budget_s and t > self.compile_budget_s:
                return f"--bench-compile-budget-s {self.compile_budget_s:g} spent ({t:.0f} s into the session)"
            if not GPU and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
                return "torch.compile on a CPU needs a C++ compiler and none was found"
        return None


def pytest_configure(config):
    config._nextvit = Settings(config)


def pytest_report_header(config):
    s = config._nextvit
    if s.gpu:
        return [f"nextvit benchmarks: GPU mode on {torch.cuda.get_device_name()}: dtypes {s.dtypes}, op batches "
                f"{s.batches}, model variants {s.variants} at batches {s.model_batches}; device time per round "
                f"(CUDA events, L2 flushed), warm-up {s.warmup_ms:g} ms, measured {s.rep_ms:g} ms"]
    lines = ["nextvit benchmarks: CPU mode (no GPU, or TRITON_INTERPRET=1): tiny shapes, float32, batch 1, "
             "Triton kernels under the interpreter, one round each, torch.compile for one op case only. "
             "This proves the suite runs; the times mean nothing."]
    if s.ignored:
        lines.append("nextvit benchmarks: not applied on this machine (they need a GPU): " + ", ".join(s.ignored))
    return lines


def pytest_terminal_summary(terminalreporter, config):
    s = getattr(config, "_nextvit", None)
    if s is not None and not s.gpu:  # also with -q, which hides the header
        terminalreporter.write_line("nextvit benchmarks: CPU mode: tiny shapes, interpreter; the times mean nothing"
                                    + (f"; not applied without a GPU: {', '.join(s.ignored)}" if s.ignored else ""))


def pytest_collection_modifyitems(config, items):
    if CLOCK is None:
        return
    for item in items:  # device time: the suite's clock for every benchmark
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=CLOCK))


def pytest_benchmark_update_machine_info(config, machine_info):
    env = ob.run_environment(not GPU)
    for key in ("date", "commit", "smoke", "card_slug"):  # commit_info has the commit; dates differ per run
        env.pop(key, None)
    env.update(mode="gpu" if GPU else "cpu", ceilings=dict(card=ob.CEILING_CARD, dram_bytes_per_s=ob.DRAM_BYTES_PER_S,
                                                          tensor_flops_per_s=ob.TENSOR_FLOPS_PER_S),
               timer=repr(CLOCK) if CLOCK else "one wall-clock round (CPU mode)")
    machine_info["nextvit"] = env


@pytest.fixture
def settings(request):
    return request.config._nextvit


@pytest.fixture
def measure(benchmark, settings):
    """measure(fn, group, info, check=None, tol=None, cost=None, compile_row=False) times fn.

    GPU: a first call timed apart (``first_call_s``: JIT or compile) with outputs NaN-poisoned
    and checked (``check(out)`` -> relative error <= ``tol``), then ``benchmark.pedantic`` with
    warm-up rounds and device time per round. CPU: one poisoned, checked round. ``info`` and,
    with ``cost`` (bytes, flops, floor_ms), the achieved rates and % of floor go to extra_info."""

    def run(fn, group, info, check=None, tol=None, cost=None, compile_row=False):
        why = settings.skip_reason(compile_row)
        if why:
            pytest.skip(why)
        benchmark.group = group
        x = benchmark.extra_info
        x.update(info)
        x.update(cost or {})

        def poisoned():
            ob._common.POISON_OUTPUTS = True
            try:
                return fn()
            finally:
                ob._common.POISON_OUTPUTS = False

        if settings.gpu:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = poisoned()
            torch.cuda.synchronize()
            x["first_call_s"] = round(time.perf_counter() - t, 3)
        else:
            out = benchmark.pedantic(poisoned, rounds=1, warmup_rounds=0, iterations=1)
        x["check"] = "ok"
        if check is not None:
            err = check(out)
            x.update(rel_err=err, tol=tol, check="ok" if err <= tol else "FAIL")
        del out
        if settings.gpu:
            warm, rounds = harness.device_rounds(fn, settings.warmup_ms, settings.rep_ms)

            def setup():
                harness.flush_l2()
                CLOCK.reset()

            benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warm, iterations=1)
            torch.cuda.empty_cache()
        if benchmark.stats is not None and cost:
            x.update({k: round(v, 3) for k, v in ob.roofline(cost, benchmark.stats.stats.median * 1e3).items()})
        assert x["check"] == "ok", f"max|out - eager| / max|eager| = {x['rel_err']:.3g} > {tol:g}"

    return run
