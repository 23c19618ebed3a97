"""Render benchmarks/results/*.json as markdown and write it into README.md
between the `<!-- results -->` markers (numbers are never typed by hand).

    python benchmarks/summarize.py [--check]

--check exits non-zero if README.md is not up to date with the JSON files.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from common import RESULTS, ROOT

BEGIN, END = "<!-- results -->", "<!-- /results -->"


def _machine(m: dict) -> str:
    where = m.get("gpu") or f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores)"
    commit = (m.get("git_commit") or "?")[:10]
    return f"{where}, torch {m.get('torch', '?')}, {m.get('date_utc', '?')[:10]}, commit `{commit}`"


def dp_section(d: dict) -> str:
    r = d["results"]
    a, b, c = r["a_one_budget"], r["b_batch_all_budgets"], r["c_whole_curve"]
    t = d["targets"]
    rows = [
        "| case | ddt_fast | baseline | ratio | target |",
        "|---|---|---|---|---|",
        f"| (a) one budget K={a['k']}, N={a['n']} | {a['op']['median_s'] * 1e3:.3f} ms | pure-Python DP "
        f"{a['published_style']['median_s'] * 1e3:.1f} ms | {a['speedup_op']:.0f}x | >= {t['a_speedup']:.0f}x |",
        f"| (b) {b['batch']} problems, every budget 1..{b['k_max']} | {b['op']['median_s'] * 1e3:.1f} ms | NumPy "
        f"reference {b['numpy_reference']['median_s_for_batch']:.2f} s | {b['speedup_vs_reference']:.0f}x | "
        f"< {t['b_seconds']:.0f} s |",
        f"| (c) whole cost curve, budgets 1..{c['k_max']} | {c['op']['median_s'] * 1e3:.2f} ms | one Python run "
        f"per budget, {c['published_style_estimated_s']:.0f} s (fitted) | {c['speedup']:,.0f}x | "
        f">= {t['c_speedup']:,.0f}x |",
    ]
    return "\n".join([f"**DP schedule solver** ({_machine(d['machine'])}):", "", *rows])


def ops_section(d: dict) -> str:
    rows = ["| op | B | L | C | dtype | fused fwd | vs eager | vs compile | fwd+bwd vs eager | bwd vs eager |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        rows.append(f"| {r['op']} | {r['B']} | {r['L']} | {r['C']} | {r['dtype']} | "
                    f"{r['fused_fwd_s'] * 1e3:.3f} ms | {r['fwd_vs_eager']:.2f}x | "
                    f"{r.get('fwd_vs_compile', float('nan')):.2f}x | {r['fwdbwd_vs_eager']:.2f}x | "
                    f"{r['bwd_vs_eager']:.2f}x |")
    model = [f"- whole {m['model']} forward ({m['dtype']}, batch {m['batch']}, {m['tokens']} tokens): reference "
             f"backend {m['reference_s'] * 1e3:.0f} ms, fused {m['fused_s'] * 1e3:.0f} ms ({m['speedup']:.2f}x)"
             for m in d.get("model", [])]
    summary = []
    for op, s in d.get("summary", {}).items():
        summary.append(f"- {op}, worst case over the grid: forward {s['fwd_vs_eager']:.2f}x eager, "
                       f"{s['fwd_vs_compile']:.2f}x compiled, backward {s['bwd_vs_eager']:.2f}x eager "
                       f"(targets {d['cpu_targets']['fwd_vs_eager']:.0f}x / {d['cpu_targets']['fwd_vs_compile']}x / "
                       f"{d['cpu_targets']['bwd_vs_eager']:.0f}x: {'met' if s['meets_targets'] else 'not met'})")
    return "\n".join([f"**Fused block ops** ({_machine(d['machine'])}; medians, same process, "
                      "ratios > 1 mean ddt_fast is faster):", "", *rows, "", *model, *summary])


def sampling_section(d: dict) -> str:
    rows = ["| run | seconds | images/s | vs (a) | multiply-add ceiling | target |", "|---|---|---|---|---|---|"]
    ceil = {"b_fast_every_step": d["ceilings"]["ceiling_b"], "c_fast_dp_ratio_0.8": d["ceilings"]["ceiling_c"]}
    target = {"b_fast_every_step": d["targets"]["b_vs_a"], "c_fast_dp_ratio_0.8": d["targets"]["c_vs_a"]}
    for k, r in d["results"].items():
        rows.append(f"| {k} | {r['seconds']:.2f} | {r['images_per_s']:.3f} | {r['speedup_vs_a']:.2f}x | "
                    f"{'%.2fx' % ceil[k] if k in ceil else '-'} | {'>= %.2fx' % target[k] if k in target else '-'} |")
    dp = d["dp"]
    return "\n".join([f"**Sampling** ({_machine(d['machine'])}): {d['model']} (random weights), {d['steps']} Euler "
                      f"steps, batch {d['batch']}, 32x32 latents, CFG 2.0 in (0.3, 1.0) ({d['guided_steps']} guided "
                      f"steps); (a) published code path, (b) fast mode, (c) fast mode + DP schedule at sharing "
                      f"ratio 0.8 (K={dp['budget']}, steps {dp['steps']}, DP cost {dp['cost']:.4f}):", "", *rows])


def training_section(d: dict) -> str:
    rows = ["| run | seconds / step (fastest) | median | images/s | vs reference |", "|---|---|---|---|---|"]
    for k, r in d["results"].items():
        rows.append(f"| {k} | {r['seconds']:.3f} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
                    f"{r['speedup_vs_reference']:.2f}x |")
    load = d["machine"].get("loadavg_1_5_15min")
    notes = [f"- load average before the runs: {load[0]:.1f} (other work shared the machine: compare the fastest "
             "runs, the medians are noisy)"] if load else []
    if d.get("compile_seconds") is not None:
        notes.append(f"- first compiled step (compilation included): {d['compile_seconds']:.0f} s")
    t = d["targets_gpu"]
    notes.append(f"- GPU targets (not measured here): fused >= {t['fused_vs_reference']}x the reference backend "
                 f"and >= {t['fused_vs_compiled']}x its compiled form")
    return "\n".join([f"**Training step** ({_machine(d['machine'])}): {d['model']} (random weights), batch "
                      f"{d['batch']}, {d['tokens']} tokens, {d['precision']}; forward, backward, AdamW and EMA "
                      "through `Trainer.train_step`, same process, same batch:", "", *rows, "", *notes])


def render() -> str:
    parts = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        if path.endswith("_quick.json"):
            continue
        with open(path) as f:
            d = json.load(f)
        name = os.path.basename(path)
        if name.startswith("dp_"):
            parts.append(dp_section(d))
        elif name.startswith("ops_"):
            parts.append(ops_section(d))
        elif name.startswith("sampling_"):
            parts.append(sampling_section(d))
        elif name.startswith("training_"):
            parts.append(training_section(d))
        else:
            continue
        parts[-1] += f"\n\n(from `benchmarks/results/{name}`)"
    return "\n\n".join(parts) if parts else "No results yet: run `make bench`."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"README.md lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, readme)
    print("README.md results section updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
