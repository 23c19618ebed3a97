"""CUDA-graph capture of a sampler's per-step model calls (`cuda_graph=True`).

A sampling step is a few model calls on fixed shapes: the encoder on both CFG
halves or on one, the decoder with or without cached modulations, or (the
published path) `net(x, t, y[, s])`. Each distinct call, keyed by its kind,
its inputs' shapes/dtypes, the autocast state and the op backends in effect
(`ddt_fast.ops.dispatch.current()`), is captured once into a CUDA graph with
static input buffers; later steps copy their inputs into the buffers and
replay it: one launch instead of hundreds of kernel launches. (A graph holds
the kernels chosen when it was captured, so a call under another
`use_backend` choice captures its own graph.)

- Outputs are cloned out of the graph's static buffers, so the sampler can
  keep them (a self-condition reused over a window, the Adams history).
- The decoder's cached modulations (`ModulationCache`) are the exception:
  one graph computes them from `s` into its static buffers when `s` changes,
  and the decoder graph reads those buffers directly (copying them every
  step would cost about as much memory traffic as the decoder itself).
- Graphs belong to one model and stay with the sampler for its later calls;
  they are dropped when the model's parameters are replaced (storage
  pointers are compared) and freed by `sampler.release_graphs()`. Each graph
  has its own memory pool, about one call's activations.
- The loop runs under autocast with its weight-cast cache off when graphs
  are on: cached casts made during warm-up would be freed when autocast
  exits while a graph still reads them.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ddt_fast._torch_private import tree_leaves, tree_map
from ddt_fast.ops.dispatch import current as current_backends

__all__ = ["StepGraphs", "CUDAGraphCall", "EagerReplayCall", "WARMUP_RUNS"]

Tensor = torch.Tensor
WARMUP_RUNS = 2  # eager runs on a side stream before capture (lazy library init, caches)


class CUDAGraphCall:
    """`fn(*inputs)` captured in a CUDA graph; `outputs` are its static outputs."""

    def __init__(self, fn: Callable, inputs: Sequence[Tensor]):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*inputs)

    def replay(self) -> None:
        self.graph.replay()


class EagerReplayCall:
    """What a captured call does to its buffers, without a GPU: `replay()` reruns
    `fn` on the static inputs and copies the results into the first run's output
    tensors. Lets the buffer plumbing of `StepGraphs` be tested on the CPU."""

    def __init__(self, fn: Callable, inputs: Sequence[Tensor]):
        self.fn, self.inputs = fn, inputs
        self.outputs = fn(*inputs)

    def replay(self) -> None:
        for dst, src in zip(tree_leaves(self.outputs), tree_leaves(self.fn(*self.inputs))):
            dst.copy_(src)


def _modulations(net, s: Tensor):
    from ddt_fast.models.ddt import ModulationCache

    cache = ModulationCache().fill(net, s)
    return cache.blocks, cache.final


def _fingerprint(net) -> Tuple:
    tensors = list(net.parameters()) + list(net.buffers()) if isinstance(net, torch.nn.Module) else []
    return tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors)


def _autocast_state(device_type: str) -> Tuple:
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


class StepGraphs:
    """Captured per-step calls of one model (see the module docstring). The
    methods mirror what the samplers call: `encode`, `decode`, `forward`."""

    def __init__(self, net, call_type=CUDAGraphCall):
        self.net = net
        self.call_type = call_type
        self.fingerprint = _fingerprint(net)
        self.calls: Dict[Tuple, Tuple[object, list]] = {}
        self.modulation_source: Dict[Tuple, Tensor] = {}  # the s each modulation graph last ran on
        self.held: Dict[Tuple, object] = {}  # ModulationCaches over the modulation graphs' outputs
        self.captures = 0
        self.replays = 0

    def matches(self, net) -> bool:
        return self.net is net and self.fingerprint == _fingerprint(net)

    def _key(self, kind: str, inputs: Sequence[Tensor]) -> Tuple:
        device_type = inputs[0].device.type
        shapes = tuple((tuple(t.shape), t.dtype) for t in inputs)
        return (kind, shapes, _autocast_state(device_type), current_backends())

    def _entry(self, key: Tuple, fn: Callable, inputs: Sequence[Tensor]):
        """The captured call for `key` (capturing it on first use) and its static inputs."""
        entry = self.calls.get(key)
        if entry is None:
            static = [t.clone() for t in inputs]
            try:
                call = self.call_type(fn, static)
            except RuntimeError as e:
                raise RuntimeError(
                    f"CUDA-graph capture of the sampler's {key[0]!r} call failed ({e}); sample with cuda_graph=False"
                ) from e
            entry = self.calls[key] = (call, static)
            self.captures += 1
        return entry

    def _run(self, key: Tuple, fn: Callable, inputs: Sequence[Tensor]):
        call, static = self._entry(key, fn, inputs)
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        call.replay()
        self.replays += 1
        return call.outputs

    def run(self, kind: str, fn: Callable, *inputs: Tensor):
        """`fn(*inputs)` through the graph for this call; outputs are copies."""
        return tree_map(torch.clone, self._run(self._key(kind, inputs), fn, inputs))

    # -- the calls the samplers make ----------------------------------------

    def encode(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.run("encode", self.net.encode, x, t, y)

    def decode(self, x: Tensor, s: Tensor, cache=None) -> Tensor:
        """The decoder for `s`. With a `ModulationCache`, the modulations are
        computed (into the modulation graph's buffers) only when `s` is not the
        tensor they were last computed from, or `cache` was cleared since."""
        if cache is None:
            return self.run("decode", self.net.decode, x, s)
        mod_key = self._key("modulation", [s])
        mod_call, (static_s,) = self._entry(mod_key, lambda s: _modulations(self.net, s), [s])
        if cache.source is not s or self.modulation_source.get(mod_key) is not s:
            static_s.copy_(s)
            mod_call.replay()
            self.replays += 1
            cache.bind(s)
            self.modulation_source[mod_key] = s
        if mod_key not in self.held:  # a cache holding the graph's static modulations, bound to its static s
            from ddt_fast.models.ddt import ModulationCache

            held = self.held[mod_key] = ModulationCache().bind(static_s)
            held.blocks, held.final = mod_call.outputs
        held = self.held[mod_key]
        return self.run("decode_cached", lambda x: self.net.decode(x, static_s, held), x)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, s: Optional[Tensor] = None):
        if s is None:
            return self.run("forward", lambda x, t, y: self.net(x, t, y), x, t, y)
        return self.run("forward_s", lambda x, t, y, s: self.net(x, t, y, s), x, t, y, s)
