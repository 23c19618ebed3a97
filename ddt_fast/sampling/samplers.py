"""Euler and Adams-Bashforth samplers for DDT, drop-in for the published ones.

`sampler(net, noise, condition, uncondition) -> x` integrates the flow from
noise (t = 0) to data (t = 1) with classifier-free guidance inside the
guidance interval and the encoder run at the steps of an encoder-sharing
schedule.

Two modes:
- `reference`: the published sampler step for step. Both CFG halves
  (`[unconditional, conditional]`) every step through `net(x, t, y, s)`; the
  self-condition is dropped at the schedule's steps; outside the interval
  the guidance function runs with scale 1.
- `fast` (default): the same integration with the work the published code
  throws away left out, for a `ddt_fast.DDT`:
  * outside the guidance interval (or with guidance 1) only the conditional
    half runs, and `v = v_c` exactly;
  * an unconditional self-condition needed inside the interval on a reuse
    step, but never computed because its recompute step was unguided, is
    computed at that step (from the current x and t);
  * while `s` is reused, the decoder's per-token modulations are reused too
    (`cache_modulation=True`).
  With guidance on at every step and the encoder at every step, fast mode
  gives the reference's numbers exactly.

`cuda_graph=True` (CUDA tensors, either mode) captures each distinct per-step
model call in a CUDA graph and replays it (see `graphs.py`); the numbers are
those of the eager loop. On other devices it warns and runs eagerly.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Callable, List, Optional, Sequence, Union

import torch

from ddt_fast.sampling.grid import adams_weights, guided, time_grid
from ddt_fast.schedule import Schedule, every_step, from_steps, load_schedule, uniform

__all__ = [
    "Sampler",
    "EulerSampler",
    "AdamsSampler",
    "AdamLMSampler",
    "MODES",
    "sample",
    "make_noise",
    "simple_guidance",
    "resolve_schedule",
]

logger = logging.getLogger("ddt_fast")
Tensor = torch.Tensor
MODES = ("fast", "reference")


def simple_guidance(out: Tensor, scale: float) -> Tensor:
    """`[unconditional; conditional]` halves -> `u + scale * (c - u)` (the published guidance function)."""
    u, c = out.chunk(2, dim=0)
    return u + scale * (c - u)


def resolve_schedule(schedule, num_steps: int, refresh_rate: int) -> Schedule:
    """A Schedule from: None (uniform at `state_refresh_rate`), a Schedule,
    'every', 'uniform:R', a list of steps, or a path to a schedule/calibration file."""
    if schedule is None:
        return every_step(num_steps) if refresh_rate == 1 else uniform(num_steps, refresh_rate)
    if isinstance(schedule, Schedule):
        result = schedule
    elif isinstance(schedule, str) and schedule == "every":
        result = every_step(num_steps)
    elif isinstance(schedule, str) and schedule.startswith("uniform:"):
        result = uniform(num_steps, int(schedule.split(":", 1)[1]))
    elif isinstance(schedule, (str, os.PathLike)):
        result = load_schedule(schedule)
    elif isinstance(schedule, Sequence):
        result = from_steps(schedule, num_steps)
    else:
        raise TypeError(
            f"schedule must be a Schedule, 'every', 'uniform:R', a list of steps or a file path, "
            f"got {type(schedule).__name__}"
        )
    if result.num_steps != num_steps:
        raise ValueError(
            f"the schedule is for {result.num_steps} steps but the sampler takes {num_steps}; "
            "calibrate or build a schedule for this step count"
        )
    return result


def _number(name: str, value) -> float:
    """`float(value)`, or ValueError naming `name` when it is not a finite number."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


class Sampler:
    """Shared loop of the Euler and Adams samplers (see the module docstring)."""

    def __init__(
        self,
        num_steps: int = 250,
        guidance: float = 1.0,
        timeshift: float = 1.0,
        guidance_interval_min: float = 0.0,
        guidance_interval_max: float = 1.0,
        state_refresh_rate: int = 1,
        last_step: Optional[float] = None,
        *,
        mode: str = "fast",
        schedule=None,
        cache_modulation: bool = True,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
        autocast: Optional[torch.dtype] = None,
        cuda_graph: bool = False,
        guidance_fn: Optional[Callable[[Tensor, float], Tensor]] = None,
        scheduler=None,
        w_scheduler=None,
        step_fn=None,
        last_step_fn=None,
    ):
        # scheduler / w_scheduler / step_fn / last_step_fn: accepted so the
        # published configs load; DDT uses the linear flow and the ODE step.
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        guidance = _number("guidance", guidance)
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0 (1 = no guidance, 0 = the unconditional model), got {guidance}")
        timeshift = _number("timeshift", timeshift)
        if timeshift <= 0:
            raise ValueError(f"timeshift must be > 0 (1 = no shift), got {timeshift}")
        lo = _number("guidance_interval_min", guidance_interval_min)
        hi = _number("guidance_interval_max", guidance_interval_max)
        # guided where lo < t < hi, t in [0, 1): lo < 0 takes in t = 0, hi >= 1 runs to the end; lo > 1 or
        # hi < 0 would guide no step at all (e.g. percentages given for fractions)
        if lo > 1.0:
            raise ValueError(
                f"guidance_interval_min must be <= 1 (the interval is on the shifted time, 0..1; "
                f"< 0 takes in t = 0), got {lo}"
            )
        if hi < 0.0:
            raise ValueError(
                f"guidance_interval_max must be >= 0 (the interval is on the shifted time, 0..1), got {hi}"
            )
        if lo > hi:
            raise ValueError(
                f"guidance_interval_min {lo} > guidance_interval_max {hi}: the guidance interval is "
                "(min, max); swap them"
            )
        rate = state_refresh_rate
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
            raise ValueError(f"state_refresh_rate must be an int >= 1, got {state_refresh_rate!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if last_step is not None:
            last_step = _number("last_step", last_step)
        if last_step is None or num_steps == 1:
            last_step = 1.0 / num_steps
        if not 0.0 < last_step <= 1.0:
            raise ValueError(f"last_step must be in (0, 1], got {last_step}")
        self.num_steps = num_steps
        self.guidance = guidance
        self.timeshift = timeshift
        self.guidance_interval_min = lo
        self.guidance_interval_max = hi
        self.state_refresh_rate = state_refresh_rate
        self.last_step = float(last_step)
        self.mode = mode
        self.schedule = resolve_schedule(schedule, num_steps, state_refresh_rate)
        self.cache_modulation = cache_modulation
        self.generator = generator
        self.progress = progress
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast}")
        self.autocast = autocast
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        self._graphs = None  # StepGraphs of the last model sampled with cuda_graph=True
        self.guidance_fn = guidance_fn or simple_guidance
        self.timesteps = time_grid(num_steps, self.last_step, self.timeshift)

    # -- what Euler and Adams do differently -------------------------------

    def _reset(self) -> None:
        pass

    def _combine(self, i: int, v: Tensor) -> Tensor:
        return v

    # -- the loop -----------------------------------------------------------

    def settings(self) -> dict:
        return {
            "sampler": type(self).__name__,
            "num_steps": self.num_steps,
            "guidance": self.guidance,
            "timeshift": self.timeshift,
            "guidance_interval_min": self.guidance_interval_min,
            "guidance_interval_max": self.guidance_interval_max,
            "last_step": self.last_step,
        }

    def is_guided(self, i: int) -> bool:
        return guided(self.timesteps[i], self.guidance_interval_min, self.guidance_interval_max)

    def __call__(
        self,
        net,
        noise: Tensor,
        condition: Tensor,
        uncondition: Tensor,
        on_step: Optional[Callable[[int, Tensor], None]] = None,
    ) -> Tensor:
        """Integrate `noise` `[B, C, H, W]` to data. `condition`/`uncondition`: class ids `[B]`
        (the unconditional ids are the null class). `on_step(i, s)` sees the
        self-condition used at step i (`[2B, L, C]` in reference mode)."""
        self._check_labels(net, noise, condition, uncondition)
        fast = self.mode == "fast" and hasattr(net, "encode") and hasattr(net, "decode")
        if self.mode == "fast" and not fast:
            logger.info("ddt_fast: %s has no encode/decode; sampling in reference mode", type(net).__name__)
        self._reset()
        grid = self.timesteps.to(noise.device)
        x = noise
        graphs = self._step_graphs(net, noise)
        step = (
            self._fast_step(net, condition, uncondition, graphs)
            if fast
            else self._reference_step(net, condition, uncondition, graphs)
        )
        with (
            torch.no_grad(),
            torch.autocast(
                noise.device.type,
                dtype=self.autocast or torch.bfloat16,
                enabled=self.autocast is not None,
                cache_enabled=False if graphs is not None else None,
            ),
        ):
            for i in self._steps():
                v, s = step(i, x, grid[i])
                if on_step is not None:
                    on_step(i, s)
                x = x + self._combine(i, v).to(x.dtype) * (grid[i + 1] - grid[i])
        return x

    def _steps(self):
        steps = range(self.num_steps)
        if self.progress:
            try:
                from tqdm.auto import tqdm

                return tqdm(steps, desc=type(self).__name__, unit="step")
            except ImportError:
                pass
        return steps

    def _step_graphs(self, net, noise: Tensor):
        """The StepGraphs to run `net` through, or None for eager calls."""
        if not self.cuda_graph:
            return None
        if noise.device.type != "cuda":
            warnings.warn(
                f"cuda_graph=True needs CUDA tensors; sampling on {noise.device.type} runs eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        if self._graphs is None or not self._graphs.matches(net):
            from ddt_fast.sampling.graphs import StepGraphs

            self._graphs = StepGraphs(net)
        return self._graphs

    def release_graphs(self) -> None:
        """Free the CUDA graphs (and the model reference) kept for later calls."""
        self._graphs = None

    def _reference_step(self, net, cond: Tensor, uncond: Tensor, graphs=None):
        labels = torch.cat([uncond, cond], dim=0)
        state = {"s": None}
        forward = net if graphs is None else graphs.forward

        def step(i, x, t):
            if self.schedule.recompute(i):
                state["s"] = None
            out, state["s"] = forward(torch.cat([x, x], dim=0), t.repeat(2 * x.shape[0]), labels, state["s"])
            return self.guidance_fn(out, self.guidance if self.is_guided(i) else 1.0), state["s"]

        return step

    def _fast_step(self, net, cond: Tensor, uncond: Tensor, graphs=None):
        from ddt_fast.models.ddt import ModulationCache

        encode, decode = (net.encode, net.decode) if graphs is None else (graphs.encode, graphs.decode)
        labels = torch.cat([uncond, cond], dim=0)
        st = {"s_c": None, "s_u": None, "s_cfg": None}
        caches = (ModulationCache(), ModulationCache()) if self.cache_modulation else (None, None)

        def step(i, x, t):
            B = x.shape[0]
            both = self.is_guided(i) and self.guidance != 1.0
            if self.schedule.recompute(i):
                for c in caches:
                    if c is not None:
                        c.clear()
                if both:
                    st["s_cfg"] = encode(torch.cat([x, x], dim=0), t.repeat(2 * B), labels)
                    st["s_u"], st["s_c"] = st["s_cfg"].chunk(2, dim=0)
                else:
                    st["s_c"], st["s_u"], st["s_cfg"] = encode(x, t.repeat(B), cond), None, None
            elif both and st["s_cfg"] is None:
                if st["s_u"] is None:  # its recompute step was unguided: compute it now
                    st["s_u"] = encode(x, t.repeat(B), uncond)
                st["s_cfg"] = torch.cat([st["s_u"], st["s_c"]], dim=0)
            if both:
                out = decode(torch.cat([x, x], dim=0), st["s_cfg"], caches[1])
                return self.guidance_fn(out, self.guidance), st["s_cfg"]
            return decode(x, st["s_c"], caches[0]), st["s_c"]

        return step

    @staticmethod
    def _check_labels(net, noise: Tensor, cond: Tensor, uncond: Tensor) -> None:
        if noise.dim() != 4:
            raise ValueError(f"noise must be [B, C, H, W], got shape {tuple(noise.shape)}")
        B = noise.shape[0]
        for name, y in (("condition", cond), ("uncondition", uncond)):
            if not isinstance(y, Tensor) or y.shape != (B,) or y.is_floating_point():
                raise ValueError(
                    f"{name} must be an integer tensor of {B} class ids, got {getattr(y, 'shape', type(y))}"
                )
        num_classes = getattr(net, "num_classes", None)
        if num_classes is not None:
            for name, y in (("condition", cond), ("uncondition", uncond)):
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi > num_classes:
                    raise ValueError(
                        f"{name} has class ids in [{lo}, {hi}]; valid ids are 0..{num_classes - 1}, "
                        f"and {num_classes} is the null class"
                    )


class EulerSampler(Sampler):
    """Euler ODE sampler (the published default): `x <- x + v * dt` every step."""


class AdamsSampler(Sampler):
    """Adams-Bashforth multistep sampler: step i combines the last
    `min(order, i + 1)` guided velocities with Lagrange-integral weights
    (order 1 is Euler)."""

    def __init__(
        self,
        num_steps: int = 250,
        guidance: float = 1.0,
        timeshift: float = 1.0,
        guidance_interval_min: float = 0.0,
        guidance_interval_max: float = 1.0,
        state_refresh_rate: int = 1,
        last_step: Optional[float] = None,
        order: int = 2,
        lms_transform_fn=None,
        **kwargs,
    ):
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3 (the Adams-Bashforth order), got {order!r}")
        super().__init__(
            num_steps,
            guidance,
            timeshift,
            guidance_interval_min,
            guidance_interval_max,
            state_refresh_rate,
            last_step,
            **kwargs,
        )
        self.order = order
        self.weights = adams_weights(self.timesteps, order)
        self._history: List[Tensor] = []

    def settings(self) -> dict:
        return dict(super().settings(), order=self.order)

    def _reset(self) -> None:
        self._history = []

    def _combine(self, i: int, v: Tensor) -> Tensor:
        self._history = (self._history + [v])[-self.order :]
        w = self.weights[i]
        out = torch.zeros_like(v, dtype=torch.promote_types(v.dtype, torch.float32))
        for wj, vj in zip(w, self._history[-len(w) :]):
            out += wj.to(v.device) * vj
        return out


AdamLMSampler = AdamsSampler  # the published class name


def make_noise(seeds: Sequence[int], shape: Sequence[int], device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise `[len(seeds), *shape]`, sample k drawn from its own
    generator seeded with `seeds[k]`: the same seed gives the same sample
    whatever the batch it is in."""
    out = torch.empty(len(seeds), *shape, dtype=dtype)
    for k, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        out[k] = torch.randn(*shape, generator=g, dtype=dtype)
    return out.to(device) if device is not None else out


def sample(
    model,
    classes: Union[Sequence[int], Tensor],
    seeds: Optional[Sequence[int]] = None,
    *,
    sampler: Optional[Sampler] = None,
    latent_size: Optional[int] = None,
    device=None,
) -> Tensor:
    """Latents for `classes` (one per class id), noise from `seeds` (default
    0..N-1, or drawn from `sampler.generator` when set). `sampler` defaults to
    the published ImageNet-256 settings (Euler, 250 steps, guidance 2.0 in
    (0.3, 1.0), last step 0.04) in fast mode."""
    device = device if device is not None else next(model.parameters()).device
    classes = torch.as_tensor(classes, dtype=torch.long, device=device)
    sampler = sampler or EulerSampler(250, 2.0, 1.0, 0.3, 1.0, last_step=0.04)
    if seeds is None:  # the sampler's generator, if it has one, picks them
        seeds = (
            torch.randint(0, 2**31 - 1, (len(classes),), generator=sampler.generator).tolist()
            if sampler.generator is not None
            else list(range(len(classes)))
        )
    seeds = list(seeds)
    if len(seeds) != len(classes):
        raise ValueError(f"{len(seeds)} seeds for {len(classes)} classes")
    size = latent_size or 32
    noise = make_noise(seeds, (model.in_channels, size, size), device)
    null = torch.full_like(classes, model.num_classes)
    return sampler(model, noise, classes, null)
