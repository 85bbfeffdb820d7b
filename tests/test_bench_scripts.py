"""The GPU benchmark scripts, checked on the CPU so that a device run is not spent on a
script error: each has a CPU mode that runs its whole logic on tiny shapes."""
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def test_profile_plan_cpu_check(tmp_path):
    out = _run(["bench/profile_plan.py", "--cpu-check"], tmp_path)
    assert "profile_plan --cpu-check: ok" in out
    for op in ("conv_bn_relu", "patch_embed", "mhca", "mlp", "e_mhsa", "head"):  # the by-op table
        assert f"| {op} |" in out, op


def test_ops_bench_smoke_writes_results(tmp_path):
    _run(["bench/ops_bench.py", "--smoke", "--out", str(tmp_path)], tmp_path)
    js = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(js) == 1
    rows = json.load(open(tmp_path / js[0]))["rows"]
    assert rows and all(r["status"] == "ok" and r["rel_err"] <= r["tol"] for r in rows), rows


def test_tune_plan_lists_candidates(tmp_path):
    out = _run(["bench/tune.py", "--plan", "--ops", "mlp"], tmp_path)
    assert "split" in out and "configs to compile and time" in out


def test_warm_cache_partition_covers_every_step(tmp_path):
    out = _run(["bench/warm_cache.py", "--cpu-check"], tmp_path)
    assert "2 parts each, 31 of 31 steps on Triton" in out, out
