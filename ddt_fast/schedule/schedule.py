"""Encoder-sharing schedules: the set of sampler steps that run the encoder."""

from __future__ import annotations

import bisect
import json
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple

from ddt_fast._io import atomic_write_text

__all__ = ["Schedule", "KINDS", "every_step", "uniform", "from_steps"]

KINDS = ("every", "uniform", "dp", "explicit")
_FORMAT = "ddt_fast.schedule"
_VERSION = 1


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} ({value!r})") from None


@dataclass(frozen=True)
class Schedule:
    """The steps at which the encoder runs, out of ``num_steps`` sampler steps.

    ``steps`` is strictly increasing, starts at 0 (step 0 always runs the
    encoder) and stays below ``num_steps``. ``kind`` records where it came
    from ('every', 'uniform', 'dp', 'explicit'); ``cost`` is the DP cost when
    known; ``meta`` holds JSON-serialisable extras (refresh_rate, k_max, ...).
    """

    steps: Tuple[int, ...]
    num_steps: int
    kind: str = "explicit"
    cost: Optional[float] = None
    meta: Dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        num_steps = _as_int(self.num_steps, "num_steps")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if isinstance(self.steps, (str, bytes)) or not isinstance(self.steps, Iterable):
            raise TypeError(f"steps must be a sequence of ints, got {type(self.steps).__name__}")
        steps = tuple(_as_int(s, "every step") for s in self.steps)
        if not steps:
            raise ValueError("a schedule needs at least one step (step 0 always runs the encoder)")
        if steps[0] != 0:
            raise ValueError(
                f"a schedule must start at step 0 (the first step always runs the encoder), got {steps[0]}"
            )
        for a, b in zip(steps, steps[1:]):
            if b <= a:
                problem = "duplicate" if a == b else "unsorted"
                raise ValueError(f"schedule steps must be strictly increasing: {problem} steps {a} then {b}")
        if steps[-1] >= num_steps:
            raise ValueError(
                f"schedule step {steps[-1]} is out of range for num_steps={num_steps} (steps are 0..{num_steps - 1})"
            )
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        cost = self.cost
        if cost is not None:
            if isinstance(cost, (bool, str, bytes)):
                raise TypeError(f"cost must be a float or None, got {type(cost).__name__}")
            try:
                cost = float(cost)
            except (TypeError, ValueError):
                raise TypeError(f"cost must be a float or None, got {type(cost).__name__}") from None
            if not math.isfinite(cost):
                raise ValueError(f"cost must be finite, got {cost}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")
        object.__setattr__(self, "num_steps", num_steps)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "cost", cost)
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def budget(self) -> int:
        """Number of encoder runs."""
        return len(self.steps)

    def recompute(self, i: int) -> bool:
        """Whether the encoder runs at sampler step ``i`` (0 <= i < num_steps)."""
        i = _as_int(i, "step")
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step {i} is out of range for a {self.num_steps}-step schedule")
        return self._has(i)

    def _has(self, i: int) -> bool:
        at = bisect.bisect_left(self.steps, i)
        return at < len(self.steps) and self.steps[at] == i

    def __contains__(self, i: object) -> bool:
        if isinstance(i, bool):
            return False
        try:
            return self._has(operator.index(i))
        except TypeError:
            return False

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "kind": self.kind,
            "num_steps": self.num_steps,
            "budget": self.budget,
            "steps": list(self.steps),
            "cost": self.cost,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Schedule":
        if not isinstance(d, dict):
            raise TypeError(f"a schedule dict is expected, got {type(d).__name__}")
        if d.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"not a ddt_fast schedule (format {d.get('format')!r})")
        if d.get("version", _VERSION) != _VERSION:
            raise ValueError(f"unsupported schedule version {d.get('version')!r} (this ddt_fast reads {_VERSION})")
        missing = [k for k in ("steps", "num_steps") if k not in d]
        if missing:
            raise ValueError(f"schedule dict is missing {', '.join(missing)}")
        s = cls(
            steps=tuple(d["steps"]),
            num_steps=d["num_steps"],
            kind=d.get("kind", "explicit"),
            cost=d.get("cost"),
            meta=d.get("meta") or {},
        )
        if "budget" in d and d["budget"] != s.budget:
            raise ValueError(f"schedule dict says budget {d['budget']} but lists {s.budget} steps")
        return s

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"schedule JSON is malformed: {e}") from None
        return cls.from_dict(d)

    def save(self, path: "os.PathLike[str] | str", overwrite: bool = False) -> None:
        """Write as JSON; a temporary file is renamed to ``path``, so an
        interrupted save never leaves a half-written schedule behind. An
        existing ``path`` is replaced only with ``overwrite=True``."""
        atomic_write_text(path, self.to_json(indent=1) + "\n", overwrite=overwrite)

    @classmethod
    def load(cls, path: "os.PathLike[str] | str") -> "Schedule":
        path = os.fspath(path)
        with open(path) as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid schedule: {e}") from None


def every_step(num_steps: int) -> Schedule:
    """The encoder runs at every step (no sharing)."""
    num_steps = _as_int(num_steps, "num_steps")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return Schedule(tuple(range(num_steps)), num_steps, kind="every")


def uniform(num_steps: int, refresh_rate: int) -> Schedule:
    """The encoder runs when ``i % refresh_rate == 0``."""
    num_steps = _as_int(num_steps, "num_steps")
    refresh_rate = _as_int(refresh_rate, "refresh_rate")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if refresh_rate < 1:
        raise ValueError(f"refresh_rate must be >= 1, got {refresh_rate}")
    return Schedule(
        tuple(range(0, num_steps, refresh_rate)), num_steps, kind="uniform", meta={"refresh_rate": refresh_rate}
    )


def from_steps(steps: Iterable[int], num_steps: int) -> Schedule:
    """A schedule from an explicit list of steps (validated, not sorted)."""
    return Schedule(tuple(steps), num_steps, kind="explicit")
