"""The benchmark scripts: the analytic FLOP count against PyTorch's FLOP counter,
the compile time limit, and smoke runs of run_all.py and gpu_suite.sh (quick
modes, into a temporary folder)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddt_fast import models, ops, sampling
from ddt_fast.models.ddt import ModulationCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import bench_model  # noqa: E402
import summarize  # noqa: E402

# One thread: the smoke runs are about the plumbing, and a shared 2-core machine
# makes two-thread runs of tiny ops erratic.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("name", ["DDT-tiny/2", "DDT-tiny-d72/2"])
def test_flop_formula_equals_torch_flop_counter(name):
    m = models.create(name).eval()
    B, side = 3, 16
    x, t, y = torch.randn(B, 4, side, side), torch.rand(B), torch.tensor([1, 2, 3])
    expected = bench_model.flop_counts(m, B, (side // 2) ** 2)
    with torch.no_grad(), ops.use_backend("reference", attention="sdpa"), sdpa_kernel(SDPBackend.MATH):
        s = m.encode(x, t, y)
        cache = ModulationCache().fill(m, s)
        for part, fn in (
            ("forward", lambda: m(x, t, y)),
            ("decode", lambda: m.decode(x, s)),
            ("decode_cached_modulation", lambda: m.decode(x, s, cache)),
        ):
            with FlopCounterMode(display=False) as counter:
                fn()
            assert counter.get_total_flops() == expected[part], part


def test_sampling_flops_reference_counts_two_halves_every_step():
    m = models.create("DDT-tiny/2")
    settings = dict(num_steps=6, guidance=2.0, guidance_interval_min=0.3, guidance_interval_max=1.0, last_step=0.04)
    f = bench_model.flop_counts(m, 2, 256)
    ref = bench_model.sampling_flops(m, sampling.EulerSampler(**settings, mode="reference"), 2, 256)
    assert ref == 2 * 6 * f["forward"]
    every = bench_model.sampling_flops(m, sampling.EulerSampler(**settings), 2, 256)
    shared = bench_model.sampling_flops(m, sampling.EulerSampler(**settings, schedule=[0, 3]), 2, 256)
    assert shared < every < ref


def test_compile_time_limit_gives_up_with_a_reason():
    t0 = time.perf_counter()
    ok, why = bench_model.first_compiled_call(lambda: time.sleep(3), 0.3, lambda: None)
    assert not ok and why == "compiling took longer than 0.3 s"
    assert time.perf_counter() - t0 < 2.5

    def broken():
        raise RuntimeError("inductor: unsupported\nmore")

    ok, why = bench_model.first_compiled_call(broken, 5, lambda: None)
    assert not ok and why == "torch.compile failed: RuntimeError: inductor: unsupported"


@pytest.mark.slow
def test_run_all_quick_writes_results_summary_and_plots(tmp_path):
    out = tmp_path / "res"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCH, "run_all.py"),
            "--quick",
            "--only",
            "sampling,model,train",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["sampling"]["rc"] == 0 and summary["stages"]["model"]["rc"] == 0
    if not any(os.path.exists(os.path.join(BENCH, f)) for f in ("bench_train.py", "bench_training.py")):
        assert summary["stages"]["train"]["skipped"] == "bench_train.py / bench_training.py does not exist"
    model = json.loads((out / "model.json").read_text())
    assert model["quick"] and {r["part"] for r in model["forward"]} == {"forward", "decode"}
    for row in model["forward"]:
        assert {"reference_eager", "ddt_fast"} <= set(row["impls"])
        assert row["compile"] == {"skipped": "--no-compile"}  # quick mode on a CPU
    runs = model["sampling"]["results"]
    assert {"published_eager", "fast_every_step", "fast_dp_0.5", "fast_dp_0.8", "fast_dp_0.87"} <= set(runs)
    assert runs["published_eager"]["speedup_vs_published_eager"] == 1.0
    assert runs["fast_dp_0.8"]["flop_ceiling_vs_published"] > runs["fast_every_step"]["flop_ceiling_vs_published"] > 1
    md = (out / "summary.md").read_text()
    assert "Whole model and sampling" in md and "fast_dp_0.87" in md and "| sampling | 0 |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert sorted(summary["plots"]) == ["dp_budget.png", "speedup_vs_batch.png"]
    for png in summary["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_gpu_suite_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "suite"
    env = dict(ENV, DRY_RUN="1", DRY_RUN_ONLY="dp", TEST_PATHS="tests/test_sampling_graphs.py", BUDGET_S="240")
    r = subprocess.run(
        ["bash", os.path.join(BENCH, "gpu_suite.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    suite = json.loads((out / "suite.json").read_text())
    assert suite["stopped_at"] is None
    assert suite["stages"]["cuda_tests"]["rc"] == 0 and suite["stages"]["benchmarks"]["rc"] == 0
    assert suite["benchmarks"]["dp"]["rc"] == 0 and (out / "dp.json").exists()
    assert "skipped" in (out / "cuda_tests.log").read_text()  # the cuda tests skip on a CPU
    assert "rms_norm_modulate" in (out / "verified.log").read_text()  # every op's verification status
    assert (out / "gpu_verified.json").read_text() == open(os.path.join(ROOT, "ddt_fast", "gpu_verified.json")).read()
    assert "gpu_suite summary" in r.stdout and "failed or unfinished: none" in r.stdout


@pytest.mark.slow
def test_gpu_suite_reports_where_it_stopped(tmp_path):
    out = tmp_path / "suite"
    env = dict(ENV, DRY_RUN="1", DRY_RUN_ONLY="dp", TEST_PATHS="tests/test_sampling_graphs.py", BUDGET_S="20")
    r = subprocess.run(
        ["bash", os.path.join(BENCH, "gpu_suite.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 1
    suite = json.loads((out / "suite.json").read_text())
    assert suite["stopped_at"] == "cuda_tests" and suite["stages"]["benchmarks"]["rc"] == "not-run"
    assert "STOPPED EARLY at stage: cuda_tests" in r.stdout


def test_summarize_renders_newest_result_per_device_and_kind(tmp_path):
    def result(date, gpu=None):
        return {
            "machine": {"date_utc": date, "gpu": gpu, "cpu": "X", "cpu_count": 2, "torch": "2", "git_commit": "abc"},
            "rows": [{"step": "fwd", "seconds": 1.5}],
        }

    (tmp_path / "dev").mkdir()
    for path, d in (
        (tmp_path / "train_cpu.json", result("2026-01-01")),
        (tmp_path / "dev" / "train.json", result("2026-02-01")),
        (tmp_path / "dev" / "attention.json", result("2026-02-01", gpu="NVIDIA H100 80GB HBM3")),
        (tmp_path / "train_cpu_quick.json", result("2026-03-01")),
    ):
        path.write_text(json.dumps(d))
    md = summarize.render_files(summarize.result_files(str(tmp_path)), base=str(tmp_path))
    assert "(from `dev/train.json`)" in md and "train_cpu.json" not in md and "quick" not in md
    assert md.index("### CPU: X") < md.index("### NVIDIA H100 80GB HBM3")
    assert "| fwd | 1.5 |" in md


def test_summarize_keeps_a_dtype_variant_beside_the_main_result(tmp_path):
    def ops(date, variant=None, dtype="float32"):
        row = {
            "op": "swiglu",
            "B": 4,
            "L": 256,
            "C": 768,
            "dtype": dtype,
            "fused_fwd_s": 1e-3,
            "fwd_vs_eager": 2.0,
            "fwdbwd_vs_eager": 2.0,
            "bwd_vs_eager": 2.0,
        }
        d = {
            "machine": {"date_utc": date, "cpu": "X", "cpu_count": 2, "torch": "2", "git_commit": "abc"},
            "rows": [row],
        }
        return dict(d, variant=variant) if variant else d

    (tmp_path / "ops_cpu.json").write_text(json.dumps(ops("2026-01-01")))
    (tmp_path / "ops_cpu_float16.json").write_text(json.dumps(ops("2026-02-01", "float16", "float16")))
    md = summarize.render_files(summarize.result_files(str(tmp_path)), base=str(tmp_path))
    assert "(from `ops_cpu.json`)" in md and "(from `ops_cpu_float16.json`)" in md  # the newer variant replaces nothing
    assert md.index("**Fused block ops** (") < md.index("**Fused block ops, float16 grid** (")


def test_summarize_shows_every_build_comparison(tmp_path):
    def compare(commit_after, ratio):
        res = {"before_min_s": 1.0, "after_min_s": ratio, "before_median_s": 1.1, "after_median_s": 1.1 * ratio}
        return {
            "machine": {"date_utc": "2026-01-01", "cpu": "X", "cpu_count": 2, "torch": "2", "git_commit": "abc"},
            "trees": {"before": {"commit": "aaa1111"}, "after": {"commit": commit_after}},
            "settings": {"model": "DDT-B/2", "batch": 2, "threads": 2, "rounds": 5},
            "results": {"forward_fp32": dict(res, after_vs_before=ratio, calls=15)},
        }

    (tmp_path / "compare_a_b.json").write_text(json.dumps(compare("bbb2222", 0.95)))
    (tmp_path / "compare_a_c.json").write_text(json.dumps(compare("ccc3333", 1.02)))
    md = summarize.render_files(summarize.result_files(str(tmp_path)), base=str(tmp_path))
    assert "before `aaa1111` vs after `bbb2222`" in md and "before `aaa1111` vs after `ccc3333`" in md
    assert "| forward_fp32 | 1.0000 | 0.9500 | 0.950 |" in md and "| 1.020 |" in md


@pytest.mark.slow
def test_bench_training_bf16_is_a_result_of_its_own(tmp_path, monkeypatch):
    import bench_training

    monkeypatch.setattr(bench_training, "result_path", lambda name: str(tmp_path / name))
    bench_training.main(["--quick", "--precision", "bf16", "--repeats", "1", "--device", "cpu"])
    d = json.loads((tmp_path / "training_cpu_bf16_quick.json").read_text())
    assert d["variant"] == "bf16" and d["precision"] == "bf16"
    assert set(d["results"]) == {"a_reference", "b_fused"}
    # the summary keeps it beside the float32 result, under its own table
    fp32 = dict(d, precision="fp32", quick=False)
    fp32.pop("variant")
    (tmp_path / "training_cpu.json").write_text(json.dumps(fp32))
    (tmp_path / "training_cpu_bf16.json").write_text(json.dumps(dict(d, quick=False)))
    md = summarize.render_files(summarize.result_files(str(tmp_path)), base=str(tmp_path))
    assert "(from `training_cpu.json`)" in md and "(from `training_cpu_bf16.json`)" in md
    assert ", fp32;" in md and ", bf16;" in md


@pytest.mark.slow
def test_bench_ops_times_the_cpu_backward_directly():
    import bench_ops

    row = bench_ops.bench_case(
        "layer_norm_modulate", 1, 16, 64, torch.float32, torch.device("cpu"), repeats=10, compile_ref=False
    )
    for name in ("fused", "eager"):
        # the backward alone is part of a forward+backward call, and is timed inside it
        assert 0 < row[f"{name}_bwd_s"] < row[f"{name}_fwdbwd_s"]
    assert row["bwd_vs_eager"] == row["eager_bwd_s"] / row["fused_bwd_s"]


@pytest.mark.slow
def test_bench_ops_rejects_unknown_dtypes():
    r = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_ops.py"), "--dtypes", "float8"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and "unknown dtype(s) float8" in r.stderr


def test_benchmark_results_page_is_generated_by_summarize():
    assert summarize.RESULTS_PAGE == os.path.join("docs", "benchmarks.md")
    assert summarize.main(["--check"]) == 0, "docs/benchmarks.md results are stale: run python benchmarks/summarize.py"
    # one generated block, on the benchmarks page only
    with open(os.path.join(ROOT, "README.md")) as f:
        assert summarize.BEGIN not in f.read(), "README.md holds a results block; it lives in docs/benchmarks.md"


@pytest.mark.slow
def test_compare_builds_times_both_trees_and_refuses_to_overwrite(tmp_path):
    """compare_builds.py against the same tree twice: every case timed for both
    sides in one file, and a second run into the same file asks for --force."""
    out = tmp_path / "compare.json"
    cmd = [sys.executable, os.path.join(BENCH, "compare_builds.py"), ROOT, ROOT, "--model", "DDT-tiny/2"]
    cmd += ["--cases", "forward_fp32,train_fp32", "--rounds", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, env=ENV, timeout=600, capture_output=True)
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"forward_fp32", "train_fp32"}
    for case, row in data["results"].items():
        assert len(data["times_s"][case]["before"]) == len(data["times_s"][case]["after"]) == row["calls"] > 0
        assert row["after_vs_before"] == pytest.approx(row["after_min_s"] / row["before_min_s"])
    assert data["trees"]["before"]["ddt_fast"] == os.path.join(ROOT, "ddt_fast")
    again = subprocess.run(cmd, env=ENV, timeout=600, capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr
    bad = subprocess.run(cmd[:2] + [str(tmp_path), ROOT], env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "not a ddt_fast source tree" in bad.stderr
