"""Benchmark: the statistic DP schedule solver against the published-style DP.

    python benchmarks/bench_dp.py [--quick] [--device-tag TAG]

N = 250 sampler steps, a realistic similarity matrix (unit vectors drifting
slowly across steps, so similarity decays with |i - j|):
  (a) one budget K = 50: the compiled op vs the pure-Python published-style DP;
  (b) every budget 1..250 for a batch of 64 matrices: the op vs the NumPy
      reference (solve_reference);
  (c) the whole cost-vs-budget curve for one matrix: one op call vs the
      published approach, which needs one pure-Python run per budget (a few
      budgets are timed, the per-budget time fitted linearly in K and summed
      over K = 1..250).
Times are the median of repeated runs (the minimum is reported too). Writes
benchmarks/results/dp_<device-tag>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from common import ROOT, device_tag, machine_info, result_path, timed, write_json

from ddt_fast import _extension  # noqa: E402
from ddt_fast.schedule import solve  # noqa: E402
from ddt_fast.schedule.reference import solve_published_style, solve_reference  # noqa: E402

TARGETS = {"a_speedup": 200.0, "b_seconds": 1.0, "c_speedup": 10_000.0}


def drifting_similarity(n: int, batch: int = 1, dim: int = 64, drift: float = 0.08, seed: int = 0) -> torch.Tensor:
    """[batch, n, n] cosine similarities of unit vectors on a slow random walk."""
    g = torch.Generator().manual_seed(seed)
    steps = drift * torch.randn(batch, n, dim, generator=g, dtype=torch.float64)
    steps[:, 0] = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    x = torch.nn.functional.normalize(steps.cumsum(dim=1), dim=-1)
    return x @ x.transpose(1, 2)


def fmt_s(s: float) -> str:
    return f"{s * 1e3:10.3f} ms" if s < 1 else f"{s:10.3f} s "


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller baselines (a smoke run)")
    p.add_argument("--n", type=int, default=250, help="sampler steps N (default 250)")
    p.add_argument("--k", type=int, default=50, help="budget for (a) (default 50)")
    p.add_argument("--batch", type=int, default=64, help="problems in (b) (default 64)")
    p.add_argument("--device-tag", default=None, help="name in the output file (default: cpu, or the GPU)")
    p.add_argument("--out", default=None, help="output path (default benchmarks/results/dp_<tag>.json)")
    args = p.parse_args(argv)

    if not _extension.has_kernel("dp_schedule_solve", "CPU"):
        print("ddt_fast._C is not built (or lacks dp_schedule_solve); build it first.", file=sys.stderr)
        return 1
    machine = machine_info(
        torch.device("cuda") if torch.cuda.is_available() else None
    )  # before the runs: the load average then shows other work on the machine
    op = torch.ops.ddt_fast.dp_schedule_solve
    n, k, batch = args.n, args.k, args.batch
    reps = 5 if args.quick else 30
    py_reps = 1 if args.quick else 3
    ref_batch = 4 if args.quick else batch

    sim1 = drifting_similarity(n, 1, seed=1)
    sim1_np = sim1[0].numpy()
    simb = drifting_similarity(n, batch, seed=2)
    rows = []
    results = {}

    # (a) one budget
    op_a = timed(lambda: op(sim1, k), reps)
    solve_a = timed(lambda: solve(sim1[0], k), reps)
    pub_a = timed(lambda: solve_published_style(sim1_np, k), py_reps, warmup=0)
    pub_cost, pub_steps = solve_published_style(sim1_np, k)
    res = solve(sim1[0], k)
    assert pub_cost == res.cost[k - 1].item() and pub_steps == res.steps(k), "op and published-style DP disagree"
    results["a_one_budget"] = {
        "n": n,
        "k": k,
        "op": op_a,
        "solve": solve_a,
        "published_style": pub_a,
        "speedup_op": pub_a["median_s"] / op_a["median_s"],
        "speedup_solve": pub_a["median_s"] / solve_a["median_s"],
    }
    rows += [
        (f"(a) K={k}: published-style pure Python", pub_a, None),
        (f"(a) K={k}: dp_schedule_solve op", op_a, results["a_one_budget"]["speedup_op"]),
        (f"(a) K={k}: schedule.solve() (op + checks)", solve_a, results["a_one_budget"]["speedup_solve"]),
    ]

    # (b) every budget, a batch
    op_b = timed(lambda: op(simb, n), max(3, reps // 3))
    ref_b = timed(lambda: solve_reference(simb[:ref_batch].numpy(), n), 1 if args.quick else 2, warmup=0)
    ref_b_scaled = ref_b["median_s"] * batch / ref_batch
    results["b_batch_all_budgets"] = {
        "n": n,
        "k_max": n,
        "batch": batch,
        "op": op_b,
        "numpy_reference": {**ref_b, "batch_timed": ref_batch, "median_s_for_batch": ref_b_scaled},
        "speedup_vs_reference": ref_b_scaled / op_b["median_s"],
    }
    rows += [
        (
            f"(b) B={batch}, K=1..{n}: NumPy reference"
            + ("" if ref_batch == batch else f" (x{batch // ref_batch} of B={ref_batch})"),
            {"median_s": ref_b_scaled, "min_s": ref_b["min_s"] * batch / ref_batch},
            None,
        ),
        (
            f"(b) B={batch}, K=1..{n}: dp_schedule_solve op",
            op_b,
            results["b_batch_all_budgets"]["speedup_vs_reference"],
        ),
    ]

    # (c) the whole curve vs one published run per budget
    op_c = timed(lambda: op(sim1, n), reps)
    budgets = [5, 25] if args.quick else [5, 25, 50, 100]
    budgets = [b for b in budgets if b <= n]
    per_k = {b: timed(lambda b=b: solve_published_style(sim1_np, b), py_reps, warmup=0)["median_s"] for b in budgets}
    slope, intercept = np.polyfit(budgets, [per_k[b] for b in budgets], 1)
    pub_curve = float(sum(intercept + slope * kk for kk in range(1, n + 1)))
    results["c_whole_curve"] = {
        "n": n,
        "k_max": n,
        "op": op_c,
        "published_style_timed": {str(b): t for b, t in per_k.items()},
        "published_style_fit": {"seconds_per_budget": float(slope), "seconds_fixed": float(intercept)},
        "published_style_estimated_s": pub_curve,
        "speedup": pub_curve / op_c["median_s"],
    }
    rows += [
        (f"(c) K=1..{n}: published, one run per K (fitted)", {"median_s": pub_curve, "min_s": float("nan")}, None),
        (f"(c) K=1..{n}: dp_schedule_solve op, one call", op_c, results["c_whole_curve"]["speedup"]),
    ]

    # CUDA, when there is a GPU and the kernel was built
    if torch.cuda.is_available() and _extension.has_kernel("dp_schedule_solve", "CUDA"):
        s1, sb = sim1.cuda(), simb.cuda()
        cuda_res = {
            "a_one_budget": timed(lambda: op(s1, k), reps, warmup=3, cuda=True),
            "b_batch_all_budgets": timed(lambda: op(sb, n), reps, warmup=3, cuda=True),
            "c_whole_curve": timed(lambda: op(s1, n), reps, warmup=3, cuda=True),
        }
        results["cuda"] = cuda_res
        rows += [
            (f"(a) K={k}: CUDA op", cuda_res["a_one_budget"], pub_a["median_s"] / cuda_res["a_one_budget"]["median_s"]),
            (
                f"(b) B={batch}, K=1..{n}: CUDA op",
                cuda_res["b_batch_all_budgets"],
                ref_b_scaled / cuda_res["b_batch_all_budgets"]["median_s"],
            ),
            (f"(c) K=1..{n}: CUDA op", cuda_res["c_whole_curve"], pub_curve / cuda_res["c_whole_curve"]["median_s"]),
        ]

    checks = {
        "a_speedup_op": results["a_one_budget"]["speedup_op"] >= TARGETS["a_speedup"],
        "b_under_1s": op_b["median_s"] < TARGETS["b_seconds"],
        "c_speedup": results["c_whole_curve"]["speedup"] >= TARGETS["c_speedup"],
    }

    print(
        f"\nDP schedule solver, N={n}  ({machine['cpu']}, {torch.get_num_threads()} threads, "
        f"load average {machine['loadavg_1_5_15min']})\n"
    )
    print(f"{'case':<58}{'median':>14}{'min':>14}{'speedup':>12}")
    for name, t, speedup in rows:
        sp = f"{speedup:11.0f}x" if speedup is not None else ""
        mn = fmt_s(t["min_s"]) if t["min_s"] == t["min_s"] else ""
        print(f"{name:<58}{fmt_s(t['median_s']):>14}{mn:>14}{sp:>12}")
    print("\ntargets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks.items()))

    gpu = torch.cuda.is_available() and _extension.has_kernel("dp_schedule_solve", "CUDA")
    tag = args.device_tag or device_tag(torch.device("cuda" if gpu else "cpu"))
    out = args.out or result_path(f"dp_{tag}.json")
    payload = {
        "benchmark": "dp_schedule",
        "quick": args.quick,
        "device_tag": tag,
        "machine": machine,
        "targets": TARGETS,
        "targets_met": checks,
        "results": results,
    }
    write_json(out, payload)
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
