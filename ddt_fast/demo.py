"""`ddt-fast demo`: the whole DDT story on the CPU, with data that ships with
scikit-learn (the 8x8 handwritten digits), in a few minutes.

1. Train a small class-conditional DDT on the digits (pixel space, 1 channel).
2. Train a digits classifier on real digits (an MLP; held-out accuracy reported).
3. Calibrate the DP encoder-sharing schedule (the paper's statistic).
4. Sample every class with classifier-free guidance under: the encoder at
   every step, and for budgets K in {N/2, N/4, N/5, N/8} the uniform and the
   DP schedule, every schedule from the same noise.
5. Score each: wall time and speed-up over every step; the classifier's
   accuracy on the samples w.r.t. the class they were conditioned on; the
   Frechet distance between generated and real digits in the classifier's
   hidden-layer feature space; the pixel MSE to the every-step samples drawn
   from the same noise; the schedule's DP cost under the calibration statistic.

Writes into `out_dir`: `metrics.json`, `grids/<schedule>.png` (a row per
class), `cost_vs_budget.png`, `calibration.json`, `model/` (save_pretrained
of the EMA weights) and `train/` (the training run: checkpoints,
config.json, metrics.jsonl). Running it again on the same folder resumes the
training run (nothing is trained twice) and redoes everything after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from ddt_fast._io import atomic_write_text

__all__ = [
    "DemoSettings",
    "DEMO_FILES",
    "DIGIT_SIDE",
    "run_demo",
    "real_digits",
    "DigitsClassifier",
    "frechet_distance",
    "to_uint8",
    "machine",
    "check_out_dir",
    "train_model",
    "schedules",
    "format_table",
    "summary",
    "report",
]

DIGIT_SIDE = 8


@dataclass
class DemoSettings:
    """Everything the demo does; `DemoSettings.quick()` is the one-minute version."""

    out_dir: str = "demo_out"
    # model: DDT-tiny/2 widened, on 1-channel 8x8 digits, patch 2 (16 tokens)
    model_args: Dict[str, Any] = field(
        default_factory=lambda: dict(
            in_channels=1,
            num_classes=10,
            hidden_size=128,
            num_groups=4,
            num_blocks=4,
            num_encoder_blocks=3,
            patch_size=2,
        )
    )
    # training
    train_steps: int = 1200
    global_batch: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    # sampling
    num_steps: int = 40
    guidance: float = 2.0
    interval: Tuple[float, float] = (0.0, 1.0)
    per_class: int = 50
    grid_per_class: int = 10
    calib_samples: int = 8
    budgets_div: Tuple[int, ...] = (2, 4, 5, 8)
    # classifier
    classifier_hidden: int = 64
    seed: int = 0
    device: str = "cpu"
    # one thread: the model is tiny, and on a machine shared with other work two threads that wait for
    # each other are several times slower than one
    threads: int = 1
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "DemoSettings":
        """About a minute on two CPU cores: a narrower model, 250 steps at a higher learning rate,
        10 samples per class. Recognisable digits for some classes, not all."""
        quick = dict(
            out_dir="demo_out_quick",
            train_steps=250,
            lr=3e-3,
            warmup_steps=20,
            ema_decay=0.9,
            per_class=10,
            grid_per_class=10,
            model_args=dict(
                in_channels=1,
                num_classes=10,
                hidden_size=64,
                num_groups=2,
                num_blocks=4,
                num_encoder_blocks=3,
                patch_size=2,
            ),
        )
        return cls(**{**quick, **overrides})

    def budgets(self) -> List[int]:
        bad = [d for d in self.budgets_div if self.num_steps % d]
        if bad:
            raise ValueError(
                f"num_steps={self.num_steps} is not divisible by {bad}: the budgets are N/d for d in "
                f"{list(self.budgets_div)}; use a multiple of 40"
            )
        return [self.num_steps // d for d in self.budgets_div]


# ---------------------------------------------------------------------------
# quality: a digits classifier and the Frechet distance in its feature space


def real_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits as float32 `[N, 8, 8]` in [-1, 1] (what the DDT learns) and int labels."""
    from ddt_fast.training import DigitsDataset

    d = DigitsDataset()
    return d.x[:, 0].numpy(), d.y.numpy()


class DigitsClassifier:
    """An MLP (one ReLU hidden layer) on the 64 pixels of real digits, trained
    on a stratified 75% split; `held_out_accuracy` is its accuracy on the
    other 25%. `features(images)` are its hidden-layer activations, the space
    the Frechet distance is measured in."""

    def __init__(self, hidden: int = 64, seed: int = 0):
        try:
            from sklearn.model_selection import train_test_split
            from sklearn.neural_network import MLPClassifier
        except ImportError as e:
            raise ImportError("the demo's digits classifier needs scikit-learn: pip install scikit-learn") from e
        x, y = real_digits()
        x = x.reshape(len(x), -1)
        self.x_train, self.x_test, self.y_train, self.y_test = train_test_split(
            x, y, test_size=0.25, stratify=y, random_state=seed
        )
        self.mlp = MLPClassifier(
            hidden_layer_sizes=(hidden,), activation="relu", alpha=1e-3, max_iter=2000, random_state=seed
        ).fit(self.x_train, self.y_train)
        self.held_out_accuracy = float(self.mlp.score(self.x_test, self.y_test))
        self.hidden = hidden

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        return np.clip(images.reshape(len(images), -1), -1.0, 1.0)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.mlp.predict(self._flat(images))

    def accuracy(self, images: np.ndarray, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def features(self, images: np.ndarray) -> np.ndarray:
        h = self._flat(images) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0]
        return np.maximum(h, 0.0).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets `a` `[n, d]`
    and `b` `[m, d]`: `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`,
    with symmetric eigendecompositions (no complex round-off)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [n>=2, d] of the same d, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_root = float(np.sum(np.sqrt(np.clip(cross, 0.0, None))))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_root)


# ---------------------------------------------------------------------------
# pictures


def to_uint8(images: np.ndarray, scale: int = 4) -> np.ndarray:
    """`[N, 8, 8]` in [-1, 1] (ink high) -> `[N, 8*scale, 8*scale, 3]` uint8, dark ink on white."""
    x = np.clip(np.asarray(images, dtype=np.float32), -1.0, 1.0)
    x = np.round((1.0 - x) * 127.5).astype(np.uint8)
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.repeat(x[..., None], 3, axis=-1)


# ---------------------------------------------------------------------------
# the demo


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _log(message: str) -> None:
    print(message, flush=True)


# what the demo writes into its folder; a folder holding anything else is not the demo's to overwrite
DEMO_FILES = ("metrics.json", "calibration.json", "cost_vs_budget.png", "grids", "model", "train")


def check_out_dir(out_dir: str) -> None:
    """Refuse a folder that holds anything but an earlier demo's outputs (the demo
    rewrites those: it resumes the training run and redoes what follows)."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise FileExistsError(f"{out_dir} is a file; the demo writes a folder there: choose another --out")
        return
    other = sorted(set(os.listdir(out_dir)) - set(DEMO_FILES))
    if other:
        raise FileExistsError(
            f"{out_dir} holds files the demo did not write ({', '.join(other[:5])}); nothing "
            "is overwritten without asking: choose a new or empty --out, or an earlier demo's"
        )


def train_model(s: DemoSettings):
    """Train (or resume) the demo's DDT in `out_dir/train`; returns the EMA model and a report."""
    from ddt_fast.models import load_checkpoint
    from ddt_fast.training import TrainConfig, Trainer, list_checkpoints

    out = os.path.join(s.out_dir, "train")
    done = list_checkpoints(out)
    config = TrainConfig(
        model="DDT-tiny/2",
        model_args=dict(s.model_args),
        data="digits",
        global_batch=s.global_batch,
        steps=s.train_steps,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        ema_decay=s.ema_decay,
        ckpt_every=min(500, s.train_steps),
        keep_last=1,
        log_every=25,
        seed=s.seed,
        out_dir=out,
        resume=True,
        device=s.device,
        tensorboard=False,
        progress=s.progress,
    )
    start = done[-1][0] if done else 0
    if start > s.train_steps:
        raise ValueError(
            f"{out} holds a run trained for {start} steps, more than train_steps={s.train_steps}; "
            "use another --out (or delete that folder)"
        )
    t0 = time.perf_counter()
    result = Trainer(config).fit()
    seconds = time.perf_counter() - t0
    model = load_checkpoint(result["checkpoint"]).to(s.device).eval()
    losses = _read_losses(os.path.join(out, "metrics.jsonl"))
    return model, {
        "steps": result["step"],
        "resumed_from_step": start,
        "seconds_this_run": round(seconds, 2),
        "final_loss": losses[-1][1] if losses else None,
        "checkpoint": result["checkpoint"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": config.to_dict(),
    }


def _read_losses(path: str) -> List[Tuple[int, float]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(d["step"], d["loss"]) for d in map(json.loads, filter(str.strip, f))]


def schedules(s: DemoSettings, calibration) -> List[Tuple[str, Any]]:
    """`[(name, Schedule)]`: every step, then uniform and DP at each budget."""
    from ddt_fast.schedule import every_step, uniform

    N = s.num_steps
    out = [("every", every_step(N))]
    for d, k in zip(s.budgets_div, s.budgets()):
        out.append((f"uniform K={k}", uniform(N, d)))
        out.append((f"dp K={k}", calibration.schedule(k)))
    return out


def _sampler(s: DemoSettings, schedule=None, progress: bool = False):
    from ddt_fast.sampling import EulerSampler

    return EulerSampler(
        num_steps=s.num_steps,
        guidance=s.guidance,
        guidance_interval_min=s.interval[0],
        guidance_interval_max=s.interval[1],
        schedule=schedule,
        mode="fast",
        progress=progress,
    )


def run_demo(s: DemoSettings, log: Callable[[str], None] = _log) -> Dict[str, Any]:
    """Run the demo (see the module docstring); returns what `metrics.json` holds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _run_demo(s, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(s: DemoSettings, log: Callable[[str], None]) -> Dict[str, Any]:
    from ddt_fast.sampling import calibrate, make_grid, make_noise, plot_cost_curve, save_png
    from ddt_fast.schedule.reference import schedule_cost

    t_start = time.perf_counter()
    budgets = s.budgets()  # checks num_steps before any work
    check_out_dir(s.out_dir)
    os.makedirs(s.out_dir, exist_ok=True)
    torch.manual_seed(s.seed)

    log(
        f"[1/5] training a class-conditional DDT on the 8x8 digits ({s.train_steps} steps, batch "
        f"{s.global_batch}, {s.device})"
    )
    model, training = train_model(s)
    model.save_pretrained(os.path.join(s.out_dir, "model"), overwrite=True)  # the demo's own folder
    log(
        f"      {training['parameters']:,} parameters, final loss {training['final_loss']}, "
        f"{training['seconds_this_run']:.1f} s this run"
    )

    log("[2/5] training the digits classifier on real digits")
    clf = DigitsClassifier(hidden=s.classifier_hidden, seed=s.seed)
    real_x, _ = real_digits()
    real_features = clf.features(real_x)
    floor = frechet_distance(clf.features(clf.x_test), clf.features(clf.x_train))
    log(f"      held-out accuracy {clf.held_out_accuracy:.4f}; FD held-out real vs train real {floor:.3f}")

    log(f"[3/5] calibrating the DP schedule ({s.calib_samples} samples, {s.num_steps} steps)")
    cal = calibrate(
        model,
        _sampler(s),
        num_samples=s.calib_samples,
        seed=s.seed,
        latent_size=DIGIT_SIDE,
        device=torch.device(s.device),
    )
    cal.save(os.path.join(s.out_dir, "calibration.json"), overwrite=True)

    plan = schedules(s, cal)
    classes = [c for c in range(model.num_classes) for _ in range(s.per_class)]
    seeds = list(range(s.seed * 1_000_003, s.seed * 1_000_003 + len(classes)))
    dev = torch.device(s.device)
    y = torch.tensor(classes, device=dev)
    null = torch.full_like(y, model.num_classes)
    noise = make_noise(seeds, (model.in_channels, DIGIT_SIDE, DIGIT_SIDE), dev)
    log(
        f"[4/5] sampling {len(classes)} digits ({s.per_class} per class) under {len(plan)} schedules, "
        f"CFG {s.guidance} in {tuple(s.interval)}"
    )
    with torch.inference_mode():  # warm-up, not timed (allocator, thread pool)
        _sampler(s)(model, noise[:8], y[:8], null[:8])
    rows, every_images = [], None
    os.makedirs(os.path.join(s.out_dir, "grids"), exist_ok=True)
    for name, sched in plan:
        sampler = _sampler(s, sched, progress=s.progress)
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = sampler(model, noise, y, null)
            wall = time.perf_counter() - t0
        images = x[:, 0].float().cpu().numpy()
        if every_images is None:
            every_images = images
        pick = [i for i in range(len(classes)) if i % s.per_class < s.grid_per_class]
        grid_name = name.replace(" K=", "_K").replace(" ", "_") + ".png"
        save_png(
            make_grid(to_uint8(images[pick]), nrow=min(s.grid_per_class, s.per_class)),
            os.path.join(s.out_dir, "grids", grid_name),
            overwrite=True,
        )
        rows.append(
            {
                "schedule": name,
                "kind": sched.kind,
                "K": sched.budget,
                "steps": list(sched.steps),
                "wall_s": round(wall, 4),
                "accuracy": round(clf.accuracy(images, classes), 4),
                "fd": round(frechet_distance(clf.features(images), real_features), 4),
                "mse_vs_every": float(f"{np.mean((images - every_images) ** 2):.6g}"),
                "dp_cost": float(f"{schedule_cost(cal.similarity, sched.steps):.6g}"),
                "grid": os.path.join("grids", grid_name),
            }
        )
        log(f"      {name:<14} {wall:7.2f} s  accuracy {rows[-1]['accuracy']:.3f}  FD {rows[-1]['fd']:.3f}")
    for r in rows:
        r["speedup"] = round(rows[0]["wall_s"] / r["wall_s"], 3)

    log("[5/5] cost-vs-budget plot and metrics")
    uniform_pts = [(r["K"], r["dp_cost"]) for r in rows if r["kind"] == "uniform"]
    plot_cost_curve(
        cal.curve(),
        os.path.join(s.out_dir, "cost_vs_budget.png"),
        points={"uniform": uniform_pts},
        overwrite=True,
        title=f"digits DDT, {s.num_steps} Euler steps, CFG {s.guidance}",
    )
    by = {(r["kind"], r["K"]): r for r in rows}
    comparison = []
    for k in budgets:
        u, d = by[("uniform", k)], by[("dp", k)]
        comparison.append(
            {
                "K": k,
                "accuracy": {"uniform": u["accuracy"], "dp": d["accuracy"]},
                "fd": {"uniform": u["fd"], "dp": d["fd"]},
                "mse_vs_every": {"uniform": u["mse_vs_every"], "dp": d["mse_vs_every"]},
                "dp_better_fd": d["fd"] < u["fd"],
                "dp_better_mse": d["mse_vs_every"] < u["mse_vs_every"],
                "dp_accuracy_not_lower": d["accuracy"] >= u["accuracy"],
            }
        )
    metrics = {
        "format": "ddt_fast.demo/1",
        "machine": machine(),
        "settings": _jsonable(dataclasses.asdict(s)),
        "training": training,
        "classifier": {
            "model": f"MLP, one ReLU hidden layer of {clf.hidden}, on 64 pixels (scikit-learn)",
            "train_images": len(clf.y_train),
            "held_out_images": len(clf.y_test),
            "held_out_accuracy": round(clf.held_out_accuracy, 4),
            "fd_held_out_real_vs_train_real": round(floor, 4),
            "fd_reference_set": f"all {len(real_x)} real digits",
        },
        "calibration": {"samples": s.calib_samples, "cost_curve": [[k, c] for k, c in cal.curve()]},
        "schedules": rows,
        "dp_vs_uniform": comparison,
        "total_s": round(time.perf_counter() - t_start, 2),
    }
    atomic_write_text(os.path.join(s.out_dir, "metrics.json"), json.dumps(metrics, indent=1) + "\n", overwrite=True)
    return metrics


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def format_table(metrics: Dict[str, Any]) -> str:
    """The demo's result table (plain text)."""
    head = ("schedule", "K", "wall s", "speed-up", "accuracy", "FD", "MSE vs every", "DP cost")
    lines = [head]
    for r in metrics["schedules"]:
        lines.append(
            (
                r["schedule"],
                str(r["K"]),
                f"{r['wall_s']:.2f}",
                f"{r['speedup']:.2f}x",
                f"{r['accuracy']:.3f}",
                f"{r['fd']:.3f}",
                f"{r['mse_vs_every']:.2e}",
                f"{r['dp_cost']:.3g}",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def summary(metrics: Dict[str, Any]) -> str:
    """Lines under the table: classifier, training, and DP vs uniform at equal K."""
    c, t = metrics["classifier"], metrics["training"]
    cmp_ = metrics["dp_vs_uniform"]
    fd_wins = sum(c_["dp_better_fd"] for c_ in cmp_)
    mse_wins = sum(c_["dp_better_mse"] for c_ in cmp_)
    acc_ok = sum(c_["dp_accuracy_not_lower"] for c_ in cmp_)
    return "\n".join(
        [
            f"quality: accuracy of an MLP digits classifier (held-out accuracy {c['held_out_accuracy']:.3f}) on the "
            f"samples w.r.t. their class; FD: Frechet distance to the real digits in its hidden-layer features "
            f"(held-out real vs train real: {c['fd_held_out_real_vs_train_real']:.3f})",
            f"training: {t['steps']} steps, {t['seconds_this_run']:.1f} s this run (resumed from step "
            f"{t['resumed_from_step']}), final loss {t['final_loss']}",
            f"DP vs uniform at equal K ({len(cmp_)} budgets): lower FD at {fd_wins}, lower MSE to every-step at "
            f"{mse_wins}, accuracy not lower at {acc_ok}",
            f"total {metrics['total_s']:.1f} s",
        ]
    )


def report(metrics: Dict[str, Any]) -> str:
    return format_table(metrics) + "\n\n" + summary(metrics)
