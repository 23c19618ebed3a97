"""Side-by-side end-to-end benchmark of two builds of ddt_fast (how a kernel earns its place).

    python benchmarks/compare_builds.py BEFORE AFTER [--cases forward_fp32,...] [--model DDT-B/2]
        [--batch 2] [--steps 10] [--threads N] [--rounds R] [--out PATH] [--force]

BEFORE and AFTER are source trees (git checkouts or worktrees) with the
extension built in place. One long-lived worker process per tree imports that
tree's ddt_fast and prepares every case once; the driver then asks them in
turn (A B, B A, A B, ...) to time one call, so the two builds share the
machine's state and its drifts alike. Reported per case: the fastest and the
median call of each build and after/before (fastest / fastest).

Cases, all on the CPU with random weights and 32x32 latents (256 tokens):
  forward_fp32, forward_bf16   the whole model `model(x, t, y)`, no grad
                               (bf16: bfloat16 weights and inputs)
  forward_fp16                 the same in float16 (informative: no CPU user runs it)
  sampling_fp32                a sampling run: Euler, the published settings
                               (CFG 2.0 in (0.3, 1.0), last step 0.04), fast mode,
                               encoder every step, --steps steps
  train_fp32, train_bf16       one training step `Trainer.train_step` (forward,
                               backward, AdamW, EMA; bf16: autocast)

Writes benchmarks/results/compare_<before>_<after>.json (or --out) and prints
a Markdown table. A result file already there is kept unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("forward_fp32", "forward_bf16", "sampling_fp32", "train_fp32", "train_bf16", "forward_fp16")
# How many timed calls each case gets per round (cheap cases get more).
CALLS_PER_ROUND = {"forward_fp32": 3, "forward_bf16": 3, "forward_fp16": 3}


# ---------------------------------------------------------------- worker side
def _worker(args) -> None:
    """Runs inside one tree: prepares the cases, then times one call per request
    ("<case>" on stdin -> seconds on stdout)."""
    import tempfile

    import torch

    import ddt_fast
    from ddt_fast import models, sampling
    from ddt_fast.training import TrainConfig, Trainer

    torch.set_num_threads(args.threads)

    def random_model(dtype):
        torch.manual_seed(0)
        model = models.create(args.model)
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(torch.randn_like(prm) * 0.02)
        return model.to(dtype=dtype).eval()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, 32, 32, generator=g)
    t = torch.rand(args.batch, generator=g)
    num_classes = models.create(args.model).num_classes
    y = torch.randint(0, num_classes, (args.batch,), generator=g)
    tmp = tempfile.mkdtemp(prefix="compare_builds_")
    prepared = {}

    def forward_case(dtype):
        model = random_model(dtype)
        xs, ts = x.to(dtype), t.to(dtype)

        def run():
            with torch.no_grad():
                model(xs, ts, y)

        return run

    def sampling_case():
        model = random_model(torch.float32)
        sampler = sampling.EulerSampler(
            num_steps=args.steps,
            guidance=2.0,
            timeshift=1.0,
            guidance_interval_min=0.3,
            guidance_interval_max=1.0,
            last_step=0.04,
            mode="fast",
        )
        null = torch.full_like(y, model.num_classes)
        return lambda: sampler(model, x, y, null)

    def train_case(precision):
        cfg = TrainConfig(
            model=args.model,
            global_batch=args.batch,
            steps=10**9,
            ckpt_every=10**9,
            out_dir=os.path.join(tmp, precision),
            precision=precision,
            compile=False,
            device="cpu",
            progress=False,
            tensorboard=False,
        )

        class Latents(torch.utils.data.Dataset):
            def __len__(self):
                return args.batch

            def __getitem__(self, i):
                return {"x": x[i], "y": y[i]}

        trainer = Trainer(cfg, dataset=Latents())
        batch = {"x": x.clone(), "y": y.clone()}
        return lambda: trainer.train_step([batch])

    makers = {
        "forward_fp32": lambda: forward_case(torch.float32),
        "forward_bf16": lambda: forward_case(torch.bfloat16),
        "forward_fp16": lambda: forward_case(torch.float16),
        "sampling_fp32": sampling_case,
        "train_fp32": lambda: train_case("fp32"),
        "train_bf16": lambda: train_case("bf16"),
    }
    for case in args.cases.split(","):
        prepared[case] = makers[case]()
        prepared[case]()  # warm-up (allocations, first-call setup)
    print(json.dumps({"ready": True, "ddt_fast": os.path.dirname(ddt_fast.__file__), "torch": torch.__version__}))
    sys.stdout.flush()
    for line in sys.stdin:
        case = line.strip()
        if not case:
            break
        t0 = time.perf_counter()
        prepared[case]()
        print(json.dumps({"seconds": time.perf_counter() - t0}))
        sys.stdout.flush()


# ---------------------------------------------------------------- driver side
class Worker:
    def __init__(self, tree: str, args):
        env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--cases", args.cases, "--model", args.model]
        cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
        self.tree = tree
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        if os.path.realpath(hello["ddt_fast"]) != os.path.realpath(os.path.join(tree, "ddt_fast")):
            raise SystemExit(f"worker for {tree} imported ddt_fast from {hello['ddt_fast']}; build it in place there")
        self.info = hello

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the worker for {self.tree} stopped (its error is above)")
        return json.loads(line)

    def time(self, case: str) -> float:
        self.proc.stdin.write(case + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def tree_commit(tree: str) -> str:
    try:
        out = subprocess.run(["git", "-C", tree, "describe", "--always", "--dirty"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", nargs="?", help="source tree of the build without the change")
    p.add_argument("after", nargs="?", help="source tree of the build with it")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--model", default="DDT-B/2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="sampler steps of sampling_fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=5, help="rounds of one call per case and build (A B / B A)")
    p.add_argument("--out", default=None)
    p.add_argument("--force", action="store_true", help="replace an existing result file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.worker:
        return _worker(args)
    if not (args.before and args.after):
        p.error("give the two source trees: BEFORE AFTER")
    for tree in (args.before, args.after):
        if not os.path.isdir(os.path.join(tree, "ddt_fast")):
            p.error(f"{tree} is not a ddt_fast source tree (no ddt_fast/ folder)")
    commits = {"before": tree_commit(args.before), "after": tree_commit(args.after)}
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"compare_{commits['before']}_{commits['after']}.json"
    )
    if os.path.exists(out) and not args.force:
        p.error(f"{out} exists; pass --force to replace it or --out for another file")

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.common import machine_info, write_json

    machine = machine_info()
    workers = {"before": Worker(args.before, args), "after": Worker(args.after, args)}
    times = {case: {"before": [], "after": []} for case in args.cases.split(",")}
    try:
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for case in times:
                for _ in range(CALLS_PER_ROUND.get(case, 1)):
                    for side in order:
                        times[case][side].append(workers[side].time(case))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()
    rows = {}
    for case, sides in times.items():
        b, a = min(sides["before"]), min(sides["after"])
        rows[case] = {
            "before_min_s": b,
            "after_min_s": a,
            "before_median_s": statistics.median(sides["before"]),
            "after_median_s": statistics.median(sides["after"]),
            "after_vs_before": a / b,
            "calls": len(sides["before"]),
        }
    lines = [
        f"| case ({args.model}, batch {args.batch}, {args.threads} threads) | before {commits['before']} (s) "
        f"| after {commits['after']} (s) | after / before |",
        "|---|---:|---:|---:|",
    ]
    for case, r in rows.items():
        lines.append(f"| {case} | {r['before_min_s']:.4f} | {r['after_min_s']:.4f} | {r['after_vs_before']:.3f} |")
    table = "\n".join(lines)
    print(table)
    write_json(
        out,
        {
            "machine": machine,
            "trees": {side: {"path": w.tree, "commit": commits[side], **w.info} for side, w in workers.items()},
            "settings": {k: getattr(args, k) for k in ("model", "batch", "steps", "threads", "rounds")},
            "results": rows,
            "times_s": times,
            "table_markdown": table,
        },
    )
    print("wrote", out)


if __name__ == "__main__":
    main()
