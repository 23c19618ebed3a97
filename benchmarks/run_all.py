"""Run every benchmark that fits the device; JSON, a markdown summary and plots in one folder.

    python benchmarks/run_all.py [--quick] [--only dp,ops,...] [--out DIR] [--device cpu|cuda]
                                 [--stage-timeout S] [--model-args "..."]

Stages (each a separate process, so one failing or running out of time does
not stop the rest), in order:
  dp         bench_dp.py        DP schedule solver
  model      bench_model.py     whole model and sampling vs eager / compiled reference
  sampling   bench_sampling.py  sampling: published path vs fast mode vs DP sharing
  attention  bench_attention.py (GPU only; when the script exists)
  train      bench_train.py or bench_training.py: training step (when the script exists)
  ops        bench_ops.py       fused block ops (the longest: last)
Writes into DIR (default benchmarks/results/<device>/, or <device>_quick with
--quick): <stage>.json, <stage>.log, summary.json (exit status and seconds per
stage), summary.md (the tables) and, with matplotlib, speedup_vs_batch.png
and dp_budget.png. --stage-timeout stops a stage that runs too long;
--budget bounds the whole run (stages that no longer fit are recorded as not
run, and the first of them is named as where the run stopped).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import torch

from common import RESULTS, ROOT, device_tag, machine_info, write_json
from summarize import device_of, render_files

HERE = os.path.dirname(os.path.abspath(__file__))
# (stage, script(s) (the first that exists), needs a GPU, extra arguments on a GPU)
# Most telling first, the long op grid last, so a run cut short by its budget keeps the whole-model numbers.
STAGES = [
    ("dp", "bench_dp.py", False, []),
    ("model", "bench_model.py", False, []),
    ("sampling", "bench_sampling.py", False, ["--model", "DDT-XL/2", "--batch", "64", "--steps", "50"]),
    ("attention", "bench_attention.py", True, []),
    ("train", ("bench_train.py", "bench_training.py"), False, []),
    ("ops", "bench_ops.py", False, []),
]
QUICK_GPU_ARGS = {"sampling": ["--model", "DDT-B/2", "--batch", "16", "--steps", "10"]}


def script_options(script: str) -> set:
    """The command-line options a benchmark script declares (to pass only those it has)."""
    with open(script) as f:
        return set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", f.read()))


def run_stage(name, script, args, out_dir, quick, timeout_s, device) -> dict:
    """Run one benchmark script; its JSON lands in out_dir/<name>.json."""
    path = os.path.join(HERE, script)
    json_out = os.path.join(out_dir, f"{name}.json")
    log = os.path.join(out_dir, f"{name}.log")
    options = script_options(path)
    cmd = [sys.executable, path, *args]
    if quick and "--quick" in options:
        cmd.append("--quick")
    if "--device" in options:
        cmd += ["--device", device.type]
    if "--out" in options:
        cmd += ["--out", json_out]
    t0 = time.time()
    print(f"== {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.time() - t0
    if "--out" not in options:  # a script without --out writes under benchmarks/results: copy its newest file
        prefix = os.path.basename(script)[len("bench_") : -len(".py")]
        fresh = [p for p in glob.glob(os.path.join(RESULTS, f"{prefix}_*.json")) if os.path.getmtime(p) >= t0]
        if fresh:
            shutil.copyfile(max(fresh, key=os.path.getmtime), json_out)
    result = {
        "rc": rc,
        "seconds": round(seconds, 1),
        "log": os.path.basename(log),
        "json": os.path.basename(json_out) if os.path.exists(json_out) else None,
    }
    print(f"   {name}: rc {rc}, {seconds:.0f} s" + ("" if rc == 0 else f" (see {log})"), flush=True)
    return result


# -- plots ------------------------------------------------------------------------------------


def plot(out_dir: str) -> list:
    """speedup_vs_batch.png and dp_budget.png from model.json (needs matplotlib)."""
    model_json = os.path.join(out_dir, "model.json")
    if not os.path.exists(model_json):
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    with open(model_json) as f:
        d = json.load(f)
    made = []
    rows = d.get("forward") or []
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = {}
        for r in rows:
            series.setdefault((r["model"], r["part"], r["dtype"]), []).append(r)
        for (model, part, dtype), rs in series.items():
            rs = sorted(rs, key=lambda r: r["batch"])
            b = [r["batch"] for r in rs]
            (line,) = ax.plot(
                b,
                [r["impls"]["ddt_fast"]["speedup_vs_reference_eager"] for r in rs],
                "o-",
                label=f"{model} {part} {dtype} vs eager",
            )
            comp = [
                (r["batch"], r["ddt_fast_vs_reference_compiled"]) for r in rs if "ddt_fast_vs_reference_compiled" in r
            ]
            if comp:
                ax.plot(
                    *zip(*comp), "s--", color=line.get_color(), alpha=0.6, label=f"{model} {part} {dtype} vs compiled"
                )
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xticks(sorted({r["batch"] for r in rows}))
        ax.set_xlabel("batch size")
        ax.set_ylabel("ddt_fast speed-up (x)")
        ax.set_title(f"Forward speed-up vs batch size ({device_of(d)})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(_save(fig, out_dir, "speedup_vs_batch.png"))
        plt.close(fig)
    sm = d.get("sampling") or {}
    if sm.get("dp_curve") and sm.get("results"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        k, cost = zip(*sm["dp_curve"])
        ax.plot(k, cost, "-", color="tab:blue", label="DP cost (calibrated)")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("encoder budget K (steps that run the encoder)")
        ax.set_ylabel("DP cost", color="tab:blue")
        ax2 = ax.twinx()
        pts = [(v["budget"], sm["results"][name]) for name, v in sm["dp"].items() if name in sm["results"]]
        if "fast_every_step" in sm["results"]:
            pts.append((sm["steps"], sm["results"]["fast_every_step"]))
        pts.sort(key=lambda p: p[0])
        ax2.plot(
            [p[0] for p in pts],
            [p[1]["speedup_vs_published_eager"] for p in pts],
            "o-",
            color="tab:red",
            label="measured speed-up vs published path",
        )
        ax2.plot(
            [p[0] for p in pts],
            [p[1]["flop_ceiling_vs_published"] for p in pts],
            "x--",
            color="tab:orange",
            label="FLOP-count ceiling",
        )
        ax2.set_ylabel("speed-up (x)", color="tab:red")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax2.legend(handles=handles, loc="center right", fontsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(f"{sm['model']}, {sm['steps']} steps: DP cost and speed-up vs encoder budget", fontsize=9)
        fig.tight_layout()
        made.append(_save(fig, out_dir, "dp_budget.png"))
        plt.close(fig)
    return made


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="each benchmark's --quick mode (a smoke run)")
    p.add_argument("--only", default=None, help="comma-separated stages: " + ",".join(s[0] for s in STAGES))
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>[_quick])")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stage-timeout", type=float, default=None, help="seconds per stage (default: none)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: none)")
    p.add_argument("--model-args", default="", help="extra arguments for bench_model.py (quoted)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {s[0] for s in STAGES}
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {[s[0] for s in STAGES]}")
    out_dir = args.out or os.path.join(RESULTS, device_tag(device) + ("_quick" if args.quick else ""))
    os.makedirs(out_dir, exist_ok=True)
    summary = {"machine": machine_info(device), "quick": args.quick, "stages": {}}
    start = time.time()
    for name, scripts, needs_gpu, gpu_args in STAGES:
        if only is not None and name not in only:
            continue
        why = None
        scripts = (scripts,) if isinstance(scripts, str) else scripts
        script = next((s for s in scripts if os.path.exists(os.path.join(HERE, s))), None)
        if script is None:
            why = f"{' / '.join(scripts)} does not exist"
        elif needs_gpu and not gpu:
            why = "needs a GPU"
        timeout = args.stage_timeout
        if args.budget is not None:
            left = args.budget - (time.time() - start)
            if left < 20:
                why = "not run: the time budget is spent"
                summary.setdefault("stopped_at", name)
            timeout = left if timeout is None else min(timeout, left)
        if why:
            summary["stages"][name] = {"rc": None, "skipped": why}
            print(f"== {name}: skipped ({why})")
            continue
        extra = (QUICK_GPU_ARGS.get(name, []) if args.quick else gpu_args) if gpu else []
        if name == "model":
            extra = extra + shlex.split(args.model_args)
        summary["stages"][name] = run_stage(name, script, extra, out_dir, args.quick, timeout, device)
        write_json(os.path.join(out_dir, "summary.json"), summary)
    summary["plots"] = plot(out_dir)
    write_json(os.path.join(out_dir, "summary.json"), summary)
    jsons = [
        os.path.join(out_dir, f"{n}.json")
        for n in summary["stages"]
        if os.path.exists(os.path.join(out_dir, f"{n}.json"))
    ]
    tables = render_files(jsons, base=out_dir, include_quick=True) if jsons else "No results."
    m = summary["machine"]
    stage_rows = "\n".join(
        f"| {n} | {s.get('rc')} | {s.get('seconds', '-')} | {s.get('skipped') or s.get('log')} |"
        for n, s in summary["stages"].items()
    )
    md = (
        f"# Benchmarks on {m.get('gpu') or m.get('cpu')}\n\n{m['date_utc']}, commit `{(m['git_commit'] or '?')[:10]}`"
        f"{' (uncommitted changes)' if m.get('git_dirty') else ''}, torch {m['torch']}"
        f"{', quick mode' if args.quick else ''}\n\n| stage | exit status | seconds | log |\n|---|---|---|---|\n"
        f"{stage_rows}\n\n" + "".join(f"![{x}]({x})\n\n" for x in summary["plots"]) + tables + "\n"
    )
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(md)
    print(f"wrote {out_dir}/summary.md")
    failed = [n for n, s in summary["stages"].items() if s.get("rc") not in (0, None)]
    if failed:
        print("failed stages:", ", ".join(failed))
    if "stopped_at" in summary:
        print(f"stopped early (time budget) at stage {summary['stopped_at']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
