"""The command-line tools: help with defaults, one-line errors for bad options, the same
variant names everywhere, options a run will not use named, and the main command's files."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {"bench": ["-m", "nextvit_kernels.bench"], "aot": ["-m", "nextvit_kernels.aot"],
         "warm_cache": ["bench/warm_cache.py"], "profile_plan": ["bench/profile_plan.py"],
         "trt_bench": ["bench/trt_bench.py"]}
VARIANT_OPTION = {"bench": "--variants", "aot": "--variants", "warm_cache": "--variants",
                  "profile_plan": "--variant", "trt_bench": "--variant"}


def _run(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_shows_defaults(tool):
    r = _run(TOOLS[tool] + ["--help"])
    assert r.returncode == 0, r.stderr
    assert "(default: " in r.stdout and "(default: None)" not in r.stdout


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_unknown_variant_is_a_one_line_error(tool):
    extra = ["--out", "unused"] if tool == "aot" else []
    r = _run(TOOLS[tool] + extra + [VARIANT_OPTION[tool], "x"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("unknown variant 'x'; choose from s, b, l")


@pytest.mark.parametrize("args, message", [
    (["--modes", "foo"], "argument --modes: unknown mode 'foo'; choose from fused,"),
    (["--batch", "1,0"], "argument --batch: bad batch size '0': must be >= 1"),
    (["--dtype", "fp8"], "argument --dtype: unknown dtype 'fp8'; choose from fp16,bf16,fp32"),
])
def test_bench_rejects_bad_values(capsys, args, message):
    from nextvit_kernels import bench
    with pytest.raises(SystemExit) as e:
        bench.parse_args(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--arch", "sm_75"], "argument --arch: bad arch 'sm_75': the kernels need sm_80 or newer"),
    (["--from-manifest"], "--from-manifest only emits C: give --emit-c FILE"),
])
def test_aot_rejects_bad_values(capsys, tmp_path, args, message):
    from nextvit_kernels import aot
    with pytest.raises(SystemExit):
        aot.main(["--out", str(tmp_path)] + args)
    assert message in capsys.readouterr().err


def test_variant_names_are_shared():
    from nextvit_kernels import cli
    assert cli.variants("s,base,nextvit_large") == ["s", "b", "l"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the main command")
def test_bench_on_the_cpu_writes_labelled_results_and_names_unused_options(tmp_path):
    out = tmp_path / "results"
    r = _run(["-m", "nextvit_kernels.bench", "--batch", "1,16", "--res", "64", "--cpu-iters", "1",
              "--dtype", "fp16", "--modes", "eager", "--out", str(out)], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "note: not used on the CPU (no CUDA GPU): --dtype, --modes" in r.stdout
    assert "note: batch 16 not timed on the CPU (above --cpu-max-batch 8)" in r.stdout
    wrote = [line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("wrote ")]
    assert sorted(os.path.splitext(p)[1] for p in wrote) == [".json", ".png"]
    assert all(os.path.isfile(p) and os.path.dirname(p) == str(out) for p in wrote)
    assert all(os.path.basename(p).startswith("cpu-e2e-") for p in wrote)
    res = json.load(open(next(p for p in wrote if p.endswith(".json"))))
    assert res["note"].startswith("CPU results") and res["complete"] and res["interpreter_check"]["passed"]
    assert [(row["variant"], row["bs"], row["mode"], row["dtype"]) for row in res["rows"]] == \
        [("nextvit_small", 1, "cpu_reference", "fp32")]
