"""nextvit_kernels.harness, the measuring and reporting every benchmark uses: the parts that run
on a CPU, each against an expectation worked out by hand, and its clock on a GPU."""
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextvit_kernels import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_needs_no_torch_triton_matplotlib_or_other_package_modules():
    # ops_bench.py --list runs without torch, and a CPU run sets TRITON_INTERPRET before Triton loads.
    code = ("import sys, nextvit_kernels.harness; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'triton', 'matplotlib') or m.startswith('nextvit_kernels.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['nextvit_kernels.harness']"


ROWS = [dict(op="mlp", batch=1, ms=0.12345, note=None), dict(op="e_mhsa", batch=256, ms=12.5, note="slow")]
COLUMNS = [("op", "op", "{}"), ("B", "batch", "{}"), ("ms", "ms", "{:.2f}"), ("x2", lambda r: 2 * r["ms"], "{:.1f}x"),
           ("note", "note", "{}"), ("absent", "missing", "{}")]


def test_format_table_aligns_numbers_right_and_text_left():
    assert harness.format_table(ROWS, COLUMNS).splitlines() == [
        "op        B     ms     x2  note  absent",
        "------  ---  -----  -----  ----  ------",
        "mlp       1   0.12   0.2x  -          -",
        "e_mhsa  256  12.50  25.0x  slow       -",
    ]


def test_format_table_markdown():
    assert harness.format_table(ROWS, COLUMNS, markdown=True).splitlines() == [
        "| op | B | ms | x2 | note | absent |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
        "| mlp | 1 | 0.12 | 0.2x | - | - |",
        "| e_mhsa | 256 | 12.50 | 25.0x | slow | - |",
    ]


def test_format_table_without_rows_is_the_header():
    assert harness.format_table([], COLUMNS[:2]) == "op  B\n--  -"


def test_write_json_round_trip_is_strict_json(tmp_path):
    data = dict(meta=dict(card=None, dtype=torch.float16, out=Path("/x/y")),
                rows=[dict(ms=1.5, n=3, ok=True, shape=(1, 2), err=math.inf, bad=math.nan, by_batch={1: 2.0})])
    path = harness.write_json(tmp_path / "new" / "r.json", data)
    text = path.read_text()
    assert path == tmp_path / "new" / "r.json" and text.endswith("}\n")
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert back == dict(meta=dict(card=None, dtype="torch.float16", out="/x/y"),
                        rows=[dict(ms=1.5, n=3, ok=True, shape=[1, 2], err="inf", bad="nan", by_batch={"1": 2.0})])


def test_environment_records_the_machine():
    env = harness.environment(mode="cpu", iters=7)
    assert env["mode"] == "cpu" and env["iters"] == 7
    assert env["python"] == platform.python_version() and env["machine"] == platform.machine()
    assert env["torch"] == torch.__version__ and env["cores"] == os.cpu_count()
    assert env["threads"] == torch.get_num_threads()
    assert isinstance(env["cpu"], str) and env["cpu"] and env["date"][:4].isdigit()
    if torch.cuda.is_available():
        assert env["card"] == torch.cuda.get_device_name() and env["cuda"] == torch.version.cuda
    else:
        assert (env["card"], env["driver"], env["cuda"], env["cudnn"]) == (None, None, None, None)
    for key in ("triton", "timm", "host", "commit"):
        assert key in env


def test_slug():
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.slug("  AMD EPYC (tm)  ") == "amd-epyc-tm"


def test_host_time_skips_the_warm_up_and_takes_the_median(monkeypatch):
    # A fake clock: each call of fn lasts the next of these microseconds; the first is the warm-up.
    durations = iter([1000.0, 5.0, 1.0, 3.0, 100.0, 2.0])
    now = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])

    def fn():
        now[0] += next(durations) * 1e-6

    t = harness.host_time_ms(fn, 5)
    assert t["ms"] * 1e3 == pytest.approx(3.0) and t["min"] * 1e3 == pytest.approx(1.0)
    assert t["p20"] * 1e3 == pytest.approx(2.0) and t["p80"] * 1e3 == pytest.approx(100.0)
    durations = iter([1000.0, 4.0, 1.0, 2.0, 8.0])  # an even count: the mean of the middle two
    assert harness.median_us(fn, 4) == pytest.approx(3.0)


def test_median_us_of_real_work_is_positive_and_below_a_second():
    us = harness.median_us(lambda: sum(range(1000)), 20)
    assert 0 < us < 1e6


def test_cuda_time_flushes_before_each_round_and_skips_the_warm_up(monkeypatch):
    """The device timer's rules, with a fake clock in EventClock's place (0.0 at a round's start,
    the round's seconds at its end) and a recording flush."""
    events, now = [], [0.0]

    class FakeClock:
        def __init__(self):
            self.start = None

        def __call__(self):
            if self.start is None:
                self.start = now[0]
                return 0.0
            elapsed, self.start = now[0] - self.start, None
            return elapsed

    monkeypatch.setattr(harness, "EventClock", FakeClock)
    monkeypatch.setattr(harness, "flush_l2", lambda: events.append("flush"))
    durations = iter([9.0, 4.0, 2.0, 6.0])  # ms a call; the first is the warm-up

    def fn():
        events.append("call")
        now[0] += next(durations) * 1e-3

    t = harness.cuda_time_ms(fn, 3, warmup=1)
    assert t["ms"] == pytest.approx(4.0) and t["min"] == pytest.approx(2.0)
    assert events == ["call", "flush", "call", "flush", "call", "flush", "call"]
    events.clear()
    durations = iter([1.0, 3.0])
    assert harness.cuda_time_ms(fn, 2, flush=False)["ms"] == pytest.approx(2.0) and events == ["call", "call"]
    durations, now[0] = iter([2.0]), 0.0  # 2 ms a call: 10 ms of warm-up is 5 rounds, 100 ms measured 50
    assert harness.device_rounds(fn, warmup_ms=10, rep_ms=100) == (5, 50)


@pytest.mark.gpu
def test_cuda_time_follows_the_work():
    """Four times the GPU sleep reads about four times the device time, flushed or not."""
    torch.cuda.init()
    for flush in (True, False):
        one = harness.cuda_time_ms(lambda: torch.cuda._sleep(1_000_000), 10, warmup=2, flush=flush)["ms"]
        four = harness.cuda_time_ms(lambda: torch.cuda._sleep(4_000_000), 10, warmup=2, flush=flush)["ms"]
        assert one > 0 and 3.5 < four / one < 4.5, (flush, one, four)
    warm, rounds = harness.device_rounds(lambda: torch.cuda._sleep(1_000_000), warmup_ms=5, rep_ms=50)
    assert warm >= 1 and rounds >= 5
