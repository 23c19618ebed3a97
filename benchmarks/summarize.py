"""Render benchmark result JSON as markdown and write it into docs/benchmarks.md
between the `<!-- results -->` markers (numbers are never typed by hand).

    python benchmarks/summarize.py [--check]

Reads benchmarks/results/*.json and benchmarks/results/<device>/*.json (what
run_all.py and gpu_suite.sh write), skipping quick runs; for each device and
benchmark the newest result is shown, grouped by device.
--check exits non-zero if docs/benchmarks.md is not up to date with the JSON files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from common import RESULTS, ROOT

BEGIN, END = "<!-- results -->", "<!-- /results -->"
# the page that holds the generated tables, relative to the repository root
RESULTS_PAGE = os.path.join("docs", "benchmarks.md")


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


def _gbs(r: dict, name: str) -> str:
    """'GB/s (% of peak)' for name, from the CUDA-graph timing when there is one."""
    for key in (f"{name}_graph", name):
        if f"{key}_pct_peak" in r:
            return f"{r[f'{key}_GBs']:.0f} ({r[f'{key}_pct_peak']:.0f}%)"
    return "-"


def _ops_bandwidth(r: dict, mode: str) -> str:
    """The bandwidth cells of one ops row for the table's mode."""
    if mode == "cpu":
        compiled = f"{r['compile_fwd_GBs']:.1f}" if "compile_fwd_GBs" in r else "-"
        return f" {r['fused_fwd_GBs']:.1f} / {compiled} / {r['copy_GBs']:.1f} ({r['fused_fwd_pct_copy']:.0f}%) |"
    line = f" {_gbs(r, 'fused_fwd')} / {_gbs(r, 'compile_fwd')} |"
    if mode == "gpu_graph":
        line += f" {_gbs(r, 'fused_bwd')} | {_gbs(r, 'copy')} |"
    return line


# Extra header cells per bandwidth mode: GPU with HBM peak (stream timing only,
# or with CUDA-graph columns), and CPU with a copy of the same bytes.
_OPS_BANDWIDTH_HEADER = {
    "": "",
    "gpu": " fwd GB/s: fused / compiled (% of HBM peak) |",
    "gpu_graph": " fwd GB/s: fused / compiled | bwd GB/s: fused | copy GB/s (% of HBM peak, CUDA graph) |",
    "cpu": " fwd GB/s: fused / compiled / copy of the same bytes (fused % of copy) |",
}


def ops_section(d: dict) -> str:
    rows_in = d["rows"]
    mode = (
        "gpu_graph"
        if any("fused_fwd_graph_pct_peak" in r for r in rows_in)
        else "gpu"
        if any("fused_fwd_pct_peak" in r for r in rows_in)
        else "cpu"
        if any("copy_GBs" in r for r in rows_in)
        else ""
    )
    extra = _OPS_BANDWIDTH_HEADER[mode]
    rows = [
        "| op | B | L | C | dtype | fused fwd | vs eager | vs compile | fwd+bwd vs eager | bwd vs eager |" + extra,
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * extra.count("|"),
    ]
    for r in rows_in:
        op = r["op"] + (" (per sample)" if r.get("modulation") == "per_sample" else "")
        line = (
            f"| {op} | {r['B']} | {r['L']} | {r['C']} | {r['dtype']} | "
            f"{r['fused_fwd_s'] * 1e3:.3f} ms | {r['fwd_vs_eager']:.2f}x | "
            f"{_x(r.get('fwd_vs_compile'))} | {r['fwdbwd_vs_eager']:.2f}x | "
            f"{r['bwd_vs_eager']:.2f}x |"
        )
        if mode:
            line += _ops_bandwidth(r, mode)
        rows.append(line)
    model = [
        f"- whole {m['model']} forward ({m['dtype']}, batch {m['batch']}, {m['tokens']} tokens): reference "
        f"backend {m['reference_s'] * 1e3:.0f} ms, fused {m['fused_s'] * 1e3:.0f} ms ({m['speedup']:.2f}x)"
        for m in d.get("model", [])
    ]
    summary = []
    for op, s in d.get("summary", {}).items():
        summary.append(
            f"- {op}, worst case over the grid: forward {s['fwd_vs_eager']:.2f}x eager, "
            f"{s['fwd_vs_compile']:.2f}x compiled, backward {s['bwd_vs_eager']:.2f}x eager "
            f"(targets {d['cpu_targets']['fwd_vs_eager']:.0f}x / {d['cpu_targets']['fwd_vs_compile']}x / "
            f"{d['cpu_targets']['bwd_vs_eager']:.0f}x: {'met' if s['meets_targets'] else 'not met'})"
        )
    note = [f"- {d['note']}"] if d.get("note") else []
    if any("fused_bwd_s" in r for r in rows_in):
        note.append(
            "- bwd vs eager: the backward alone, timed around `torch.autograd.backward` inside each "
            "forward+backward call of the rotation"
        )
    else:
        note.append("- bwd vs eager: (fastest forward+backward) - (fastest forward)")
    title = "Fused block ops" + (f", {d['variant'].replace('_', ' and ')} grid" if d.get("variant") else "")
    return "\n".join(
        [
            f"**{title}** ({_machine(d['machine'])}; fastest of interleaved repeats, same process, "
            "ratios > 1 mean ddt_fast is faster):",
            "",
            *rows,
            "",
            *model,
            *summary,
            *note,
        ]
    )


def sampling_section(d: dict) -> str:
    rows = ["| run | seconds | images/s | vs (a) | multiply-add ceiling | target |", "|---|---|---|---|---|---|"]
    ceil = {"b_fast_every_step": d["ceilings"]["ceiling_b"], "c_fast_dp_ratio_0.8": d["ceilings"]["ceiling_c"]}
    target = {"b_fast_every_step": d["targets"]["b_vs_a"], "c_fast_dp_ratio_0.8": d["targets"]["c_vs_a"]}
    for k, r in d["results"].items():
        rows.append(
            f"| {k} | {r['seconds']:.2f} | {r['images_per_s']:.3f} | {r['speedup_vs_a']:.2f}x | "
            f"{f'{ceil[k]:.2f}x' if k in ceil else '-'} | {f'>= {target[k]:.2f}x' if k in target else '-'} |"
        )
    dp = d["dp"]
    return "\n".join(
        [
            f"**Sampling** ({_machine(d['machine'])}): {d['model']} (random weights), {d['steps']} Euler "
            f"steps, batch {d['batch']}, {d.get('dtype', 'float32')}, 32x32 latents, CFG 2.0 in (0.3, 1.0) "
            f"({d['guided_steps']} guided "
            f"steps); (a) published code path, (b) fast mode, (c) fast mode + DP schedule at sharing "
            f"ratio 0.8 (K={dp['budget']}, steps {dp['steps']}, DP cost {dp['cost']:.4f}):",
            "",
            *rows,
        ]
    )


def _x(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _ms(r) -> str:
    return "-" if r is None else f"{r['seconds'] * 1e3:.1f}"


def model_section(d: dict) -> str:
    gpu = bool(d["machine"].get("gpu"))
    out = [
        f"**Whole model and sampling** ({_machine(d['machine'])}; fastest of interleaved repeats, "
        "same process; x = speed-up, > 1 means faster):"
    ]
    if gpu and d.get("peak"):
        pk = d["peak"]
        out.append(
            f"Peak dense bf16: {pk['table_bf16_tflops'] or '?'} TFLOP/s (published), "
            f"{pk['matmul_bf16_tflops']:.0f} TFLOP/s (8192^3 matmul, measured); MFU against the published peak."
        )
    if d.get("forward"):
        head = (
            "| model | part | dtype | batch | eager ref ms | compiled ref ms | ddt_fast ms | vs eager | vs compiled "
            "| decode, cached modulation, vs eager |" + (" ddt_fast TFLOP/s | MFU |" if gpu else "")
        )
        out += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for r in d["forward"]:
            i = r["impls"]
            f = i["ddt_fast"]
            cached = i.get("ddt_fast_cached_modulation")
            line = (
                f"| {r['model']} | {r['part']} | {r['dtype']} | {r['batch']} | {_ms(i['reference_eager'])} | "
                f"{_ms(i.get('reference_compiled'))} | {_ms(f)} | {_x(f['speedup_vs_reference_eager'])} | "
                f"{_x(r.get('ddt_fast_vs_reference_compiled'))} | "
                f"{_x(cached['speedup_vs_reference_eager']) if cached else '-'} |"
            )
            if gpu:
                mfu = f.get("mfu_table_peak")
                line += f" {f['tflops']:.0f} | {'-' if mfu is None else f'{100 * mfu:.0f}%'} |"
            out.append(line)
        if d.get("forward_machine"):
            out += ["", f"Forward rows from a separate run: {_machine(d['forward_machine'])}."]
        skipped = sorted(
            {
                f"{r['model']} {r['part']} ({r['dtype']}): {r['compile']['skipped']}"
                for r in d["forward"]
                if "skipped" in r["compile"]
            }
        )
        if skipped:
            out += ["", "torch.compile baseline missing: " + "; ".join(skipped)]
    sm = d.get("sampling")
    if sm and "results" in sm:
        dp = ", ".join(f"{v['ratio']}: K={v['budget']} (DP cost {v['cost']:.4f})" for v in sm["dp"].values())
        out += [
            "",
            f"Sampling: {sm['model']} (random weights), batch {sm['batch']}, {sm['steps']} Euler steps, "
            f"{sm['dtype']}, CFG 2.0 in (0.3, 1.0) ({sm['guided_steps']} guided steps), DP schedules at "
            f"sharing ratios {dp}:",
            "",
            "| run | seconds | images/s | vs published eager | vs published compiled | FLOP ceiling |"
            + (" TFLOP/s |" if gpu else ""),
            "|---|---|---|---|---|---|" + ("---|" if gpu else ""),
        ]
        for k, r in sm["results"].items():
            out.append(
                f"| {k} | {r['seconds']:.2f} | {r['images_per_s']:.3f} | {_x(r['speedup_vs_published_eager'])} "
                f"| {_x(r.get('speedup_vs_published_compiled'))} | {_x(r['flop_ceiling_vs_published'])} |"
                + (f" {r['tflops']:.0f} |" if gpu else "")
            )
        if "skipped" in sm.get("compile", {}):
            out += ["", f"torch.compile of the published path: {sm['compile']['skipped']}"]
    elif sm:
        out += ["", f"Sampling: {sm.get('error', 'no result')}"]
    if gpu:
        out += ["", gpu_targets(d)]
    if d.get("training"):
        out += [
            "",
            generic_section(
                "Training step",
                {"machine": d["training"].get("machine") or d["machine"], "results": d["training"]["results"]},
            ),
        ]
    return "\n".join(out)


def gpu_targets(d: dict) -> str:
    """The GPU targets (set for an H100, DDT-XL/2, batch >= 64) against what this run measured."""
    t, sm = d.get("targets_gpu", {}), d.get("sampling", {})
    res = sm.get("results", {})

    def best(*names, key="speedup_vs_published_eager"):
        vals = [res[n][key] for n in names if n in res and key in res[n]]
        return max(vals) if vals else None

    mfu = [
        r["impls"]["ddt_fast"].get("mfu_table_peak")
        for r in d.get("forward", [])
        if r["part"] == "forward" and r["model"] == "DDT-XL/2" and r["batch"] >= 64
    ]
    mfu = [m for m in mfu if m is not None]
    measured = {
        "fast_every_step_vs_published_eager": best("fast_every_step", "fast_every_step_cuda_graph"),
        "fast_every_step_vs_published_compiled": best(
            "fast_every_step", "fast_every_step_cuda_graph", key="speedup_vs_published_compiled"
        ),
        "fast_dp_0.8_vs_published_eager": best("fast_dp_0.8", "fast_dp_0.8_cuda_graph"),
        "forward_mfu": max(mfu) if mfu else None,
    }
    items = []
    for k, target in t.items():
        v = measured.get(k)
        got = "not measured" if v is None else f"{v:.2f} ({'met' if v >= target else 'not met'})"
        items.append(f"{k.replace('_', ' ')} >= {target}: {got}")
    return (
        f"Targets (set for an H100, DDT-XL/2, batch >= 64; this run: sampling {sm.get('model', '?')} batch "
        f"{sm.get('batch', '?')}): " + "; ".join(items)
    )


def _scalar(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4g}"


def generic_section(title: str, d: dict) -> str:
    """A table of the scalar fields of `rows` (a list) or `results` (a dict of dicts),
    for benchmarks without a renderer of their own."""
    rows = d.get("rows")
    if rows is None and isinstance(d.get("results"), dict):
        res = d["results"]
        rows = [dict(run=k, **v) if isinstance(v, dict) else {"run": k, "value": v} for k, v in res.items()]
    rows = [r for r in (rows or []) if isinstance(r, dict)]
    cols = [c for c in dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list)))]
    head = f"**{title}** ({_machine(d.get('machine') or {})}):"
    if not rows or not cols:
        return head + " no table fields"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_scalar(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join([head, "", *lines])


def training_section(d: dict) -> str:
    rows = ["| run | seconds / step (fastest) | median | images/s | vs reference |", "|---|---|---|---|---|"]
    for k, r in d["results"].items():
        rows.append(
            f"| {k} | {r['seconds']:.3f} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
            f"{r['speedup_vs_reference']:.2f}x |"
        )
    load = d["machine"].get("loadavg_1_5_15min")
    notes = (
        [
            f"- load average before the runs: {load[0]:.1f} (other work shared the machine: compare the fastest "
            "runs, the medians are noisy)"
        ]
        if load
        else []
    )
    if d.get("compile_seconds") is not None:
        notes.append(f"- first compiled step (compilation included): {d['compile_seconds']:.0f} s")
    t = d["targets_gpu"]
    notes.append(
        f"- GPU targets (not measured here): fused >= {t['fused_vs_reference']}x the reference backend "
        f"and >= {t['fused_vs_compiled']}x its compiled form"
    )
    return "\n".join(
        [
            f"**Training step** ({_machine(d['machine'])}): {d['model']} (random weights), batch "
            f"{d['batch']}, {d['tokens']} tokens, {d['precision']}; forward, backward, AdamW and EMA "
            "through `Trainer.train_step`, same process, same batch:",
            "",
            *rows,
            "",
            *notes,
        ]
    )


def attention_section(d: dict) -> str:
    out = [
        f"**Flash attention** ({_machine(d['machine'])}; {d['dtype']}, median of {d['repeats']}; "
        "TFLOP/s, forward and forward+backward):",
        "",
        "| shape | B | heads | L | D | " + " | ".join(d["attention"][0]["impls"]) + " |",
        "|---|---|---|---|---|" + "---|" * len(d["attention"][0]["impls"]),
    ]
    for r in d["attention"]:
        out.append(
            f"| {r['shape']} | {r['B']} | {r['H']} | {r['L']} | {r['D']} | "
            + " | ".join(f"{i['fwd_tflops']:.0f} / {i['fwd_bwd_tflops']:.0f}" for i in r["impls"].values())
            + " |"
        )
    names = list(d["prologue"][0]["impls"])
    out += [
        "",
        "The model's attention from the packed qkv projection (ms, forward / forward+backward):",
        "",
        "| shape | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for r in d["prologue"]:
        out.append(
            f"| {r['shape']} | "
            + " | ".join(f"{i['fwd_ms']:.3f} / {i['fwd_bwd_ms']:.3f}" for i in r["impls"].values())
            + " |"
        )
    return "\n".join(out)


def compare_section(d: dict) -> str:
    """compare_builds.py: two builds side by side, end to end."""
    trees, st = d["trees"], d["settings"]
    head = (
        f"**Build comparison**: before `{trees['before']['commit']}` vs after `{trees['after']['commit']}`, "
        f"{st['model']}, batch {st['batch']}, {st['threads']} threads, {st['rounds']} rounds "
        f"({_machine(d.get('machine') or {})}):"
    )
    rows = [
        "| case | before (s, fastest) | after (s, fastest) | after / before | median before | median after | calls |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, r in d["results"].items():
        rows.append(
            f"| {case} | {r['before_min_s']:.4f} | {r['after_min_s']:.4f} | {r['after_vs_before']:.3f} "
            f"| {r['before_median_s']:.4f} | {r['after_median_s']:.4f} | {r['calls']} |"
        )
    return "\n".join([head, "", *rows])


SECTIONS = {
    "dp": dp_section,
    "ops": ops_section,
    "sampling": sampling_section,
    "model": model_section,
    "training": training_section,
    "train": training_section,
    "attention": attention_section,
    "compare": compare_section,
}


def render_one(kind: str, d: dict) -> str:
    """The benchmark's own table; a result file in another (older) layout gets the generic table."""
    try:
        return SECTIONS[kind](d)
    except (KeyError, IndexError, TypeError):
        return generic_section(kind.capitalize(), d)


def kind_of(path: str) -> str:
    """`dp_cpu.json`, `dp.json` -> `dp` (`training_*` -> `train`)."""
    kind = os.path.basename(path)[: -len(".json")].split("_", 1)[0]
    return {"training": "train"}.get(kind, kind)


def device_of(d: dict) -> str:
    m = d.get("machine") or {}
    return m.get("gpu") or f"CPU: {m.get('cpu', '?')}"


def result_files(root: str = RESULTS) -> list:
    """Full (not quick) result files under `root` and its device folders."""
    paths = sorted(glob.glob(os.path.join(root, "*.json")) + glob.glob(os.path.join(root, "*", "*.json")))
    return [p for p in paths if "_quick" not in p and kind_of(p) in SECTIONS]


def render_files(paths, base: str = ROOT, include_quick: bool = False) -> str:
    """Markdown for result files: per device (CPUs first), the newest result of each benchmark
    (quick-mode results only with `include_quick`)."""
    newest = {}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        if d.get("quick") and not include_quick:
            continue
        # e.g. the float16 grid beside the main one; every build comparison is a result of its own
        variant = os.path.basename(path) if kind_of(path) == "compare" else d.get("variant", "")
        key = (device_of(d), kind_of(path), variant)
        date = (d.get("machine") or {}).get("date_utc", "")
        if key not in newest or date > newest[key][0]:
            newest[key] = (date, path, d)
    devices = sorted({k[0] for k in newest}, key=lambda dev: (not dev.startswith("CPU"), dev))
    parts = []
    for dev in devices:
        if len(devices) > 1:
            parts.append(f"### {dev}")
        for kind in SECTIONS:
            for key in sorted(k for k in newest if k[:2] == (dev, kind)):
                _, path, d = newest[key]
                parts.append(f"{render_one(kind, d)}\n\n(from `{os.path.relpath(path, base)}`)")
    return "\n\n".join(parts)


def render() -> str:
    return render_files(result_files()) or "No results yet: run `make bench`."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    page = os.path.join(ROOT, RESULTS_PAGE)
    with open(page) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{RESULTS_PAGE} lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    tmp = page + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, page)
    print(f"{RESULTS_PAGE} results section updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
