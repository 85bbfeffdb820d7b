"""The GPU benchmark scripts, checked on the CPU so that a device run is not spent on a
script error: each has a CPU mode that runs its whole logic on tiny shapes."""
import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout=600):
    # not a pytest-xdist worker: pytest-benchmark turns itself off in one (and refuses --benchmark-only)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def test_profile_plan_cpu_check(tmp_path):
    out = _run(["bench/profile_plan.py", "--cpu-check"], tmp_path)
    assert "profile_plan --cpu-check: ok" in out
    for op in ("conv_bn_relu", "patch_embed", "mhca", "mlp", "e_mhsa", "head"):  # the by-op table
        assert f"| {op} |" in out, op


def test_op_cases_are_the_model_calls():
    """The op benchmarks' shapes are exactly the distinct op calls of NextViT-S, B and L at 224x224."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nextvit_kernels as nk
    import ops_bench as ob
    from test_bench_model import plan_calls

    ob._import_torch_stack(smoke=True)
    want = sorted({(op, json.dumps(s, sort_keys=True)) for op, s, _ in ob.cases(tiny=False)})
    for name in ("nextvit_small", "nextvit_base", "nextvit_large"):
        calls = plan_calls(getattr(nk, name)().eval(), 224)
        assert sorted({(op, json.dumps(s, sort_keys=True)) for op, s in calls}) == want, name


@pytest.mark.slow
def test_bench_suite_saves_compares_and_prints(tmp_path):
    """CPU mode of the pytest-benchmark suite (one op): a saved run with machine info, a
    --benchmark-compare against it, and ops_bench's table from the JSON."""
    store = f"file://{tmp_path}/store"
    base = ["-m", "pytest", "bench/test_bench_ops.py", "-k", "head", "--benchmark-only", "-q",
            "-p", "no:cacheprovider", f"--benchmark-storage={store}"]
    _run(base + ["--benchmark-save=before"], tmp_path)
    saved = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "store") for f in fs if f.endswith(".json")]
    assert len(saved) == 1, saved
    data = json.load(open(saved[0]))
    info = data["machine_info"]["nextvit"]
    assert info["mode"] == "cpu" and info["torch"] and info["triton"] and "ceilings" in info
    rows = {b["extra_info"]["impl"]: b["extra_info"] for b in data["benchmarks"]}
    assert set(rows) == {"triton", "reference", "eager"}, rows  # compile: one conv case only on a CPU
    assert all(r["check"] == "ok" and r["bytes"] > 0 and r["flops"] > 0 and "pct_floor" in r for r in rows.values())
    out = _run(base + ["--benchmark-compare=0001", "--benchmark-group-by=group"], tmp_path)
    assert "0001_before" in out and "NOW" in out, out[-2000:]
    table = _run(["bench/ops_bench.py", "--from-json", saved[0]], tmp_path)
    assert "head" in table and "3x3x32->20" in table and " ok " in table, table


def test_tune_plan_lists_candidates(tmp_path):
    out = _run(["bench/tune.py", "--plan", "--ops", "mlp"], tmp_path)
    assert "split" in out and "configs to compile and time" in out


@pytest.mark.slow
def test_warm_cache_partition_covers_every_step(tmp_path):
    out = _run(["bench/warm_cache.py", "--cpu-check"], tmp_path)
    assert "2 parts each, 31 of 31 steps on Triton" in out, out


@pytest.mark.slow
def test_serve_bench_counted(tmp_path):
    """serve_bench.py on the CPU: tritonserver with the native backend, launches counted by the
    stand-in; every point measured, the server's split read, the plot drawn."""
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("tritonclient.http")
    from _util import triton_backend
    backend, library = triton_backend()
    out = _run(["bench/serve_bench.py", "--cpu", "--depths", "1,1,5,1", "--size", "64", "--batch", "2",
                "--concurrency", "1,2", "--duration", "1", "--warmup", "0.3", "--backend", str(backend),
                "--library", str(library), "--out", str(tmp_path)], tmp_path, timeout=300)
    assert "serving overhead alone" in out and "not model compute" in out, out
    [path] = tmp_path.glob("serve-cpu-smoke-*.json")
    data = json.loads(path.read_text())
    assert data["meta"]["mode"] == "cpu" and data["meta"]["generator"] in ("builtin", "perf_analyzer")
    points = data["points"]
    assert [(p["model"], p["batch"], p["concurrency"]) for p in points] == [("nextvit_tiny", 2, 1), ("nextvit_tiny", 2, 2)]
    for p in points:
        assert p["images_per_s"] > 0 and p["requests_per_s"] > 0 and p["errors"] == 0, p
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"], p
        s = p["server"]
        assert all(s[f"{k}_us"] is not None and s[f"{k}_us"] >= 0 for k in
                   ("queue", "compute_input", "compute_infer", "compute_output")), s
        assert 1 <= s["executions"] <= s["inferences"], s
        # the snapshots bound the measured window: the server counted the requests the client timed
        assert s["requests"] == p["requests"] and s["inferences"] == 2 * s["requests"], (s, p["requests"])
    assert path.with_suffix(".png").stat().st_size > 0
