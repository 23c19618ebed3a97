"""Exponential moving average of a model's weights (`torch._foreach` ops).

After every optimizer step `ema = decay * ema + (1 - decay) * param`, as in
the published trainer. The shadow weights are plain tensors beside the
model's parameters (checkpoints store them as `ema_denoiser`; `copy_to`
puts them into a model for sampling). Under FSDP2 the parameters are sharded
DTensors and so are their shadows; `state_dict()` gathers full tensors.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ddt_fast import _torch_private

__all__ = ["EMA"]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self._names: List[str] = [n for n, _ in model.named_parameters()]
        self._shadow: List[torch.Tensor] = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the parameters of `model` (same architecture)."""
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._shadow):
            raise ValueError(f"EMA tracks {len(self._shadow)} parameters, the model has {len(params)}")
        _torch_private.foreach_mul_(self._shadow, self.decay)
        _torch_private.foreach_add_(self._shadow, params, alpha=1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Full (gathered) shadow weights on the CPU, keyed like the model's state dict."""
        return {n: _full(p).detach().to("cpu", copy=True) for n, p in zip(self._names, self._shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = [n for n in self._names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weight(s), first: {missing[:3]}")
        for n, p in zip(self._names, self._shadow):
            src = state[n]
            if hasattr(p, "device_mesh"):  # sharded DTensor: take this rank's part
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(src.to(p.device, p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(src)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the shadow weights into `model` (e.g. a fresh DDT for sampling)."""
        from ddt_fast.models.checkpoint import load_into

        load_into(model, self.state_dict(), context=" (EMA weights)")
        return model
