"""CUDA-graph capture of the sampling step (`cuda_graph=True`).

On the CPU: the option's errors and eager fallback, and the graphs' buffer
plumbing (static inputs, outputs copied out, the decoder reading the
modulation graph's buffers) with `EagerReplayCall`, which does to its buffers
what a replayed CUDA graph does. On a GPU (`-m cuda`): real graphs against the
eager loop.
"""

import pytest
import torch

from ddt_fast import models, sampling
from ddt_fast.sampling import AdamsSampler, EulerSampler
from ddt_fast.sampling.graphs import EagerReplayCall, StepGraphs

SETTINGS = dict(
    num_steps=8, guidance=2.0, timeshift=1.0, guidance_interval_min=0.3, guidance_interval_max=1.0, last_step=0.04
)
# Step 0 is unguided (t = 0), so with [0, 5] the unconditional s of the first window is computed late
# (step 3); every step and "uniform:2" cover the other paths through the fast step.
CASES = [
    (EulerSampler, dict(mode="fast", schedule=[0, 5])),
    (EulerSampler, dict(mode="fast", schedule="uniform:2", cache_modulation=False)),
    (EulerSampler, dict(mode="fast", schedule="every")),
    (EulerSampler, dict(mode="reference", schedule=[0, 3, 6])),
    (AdamsSampler, dict(mode="fast", schedule=[0, 4], order=2)),
]


def _tiny(device="cpu"):
    torch.manual_seed(0)
    m = models.create("DDT-tiny/2")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(device).eval()


def _inputs(device="cpu", batch=3):
    noise = sampling.make_noise(range(batch), (4, 8, 8), device)
    cond = torch.arange(1, batch + 1, device=device)
    return noise, cond, torch.full_like(cond, 10)


def _with_replay_graphs(sampler, graphs):
    """Route the sampler's calls through `graphs` even on the CPU."""
    sampler._step_graphs = lambda net, noise: graphs
    return sampler


@pytest.mark.slow
def test_cuda_graph_on_cpu_warns_and_samples_eagerly():
    m = _tiny()
    eager = EulerSampler(**SETTINGS)(m, *_inputs())
    sampler = EulerSampler(**SETTINGS, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="cuda_graph=True needs CUDA tensors; sampling on cpu runs eagerly"):
        out = sampler(m, *_inputs())
    assert torch.equal(out, eager)
    assert sampler._graphs is None


def test_cuda_graph_option_type_checked():
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        EulerSampler(**SETTINGS, cuda_graph="yes")


@pytest.mark.parametrize("cls,kw", CASES)
def test_replayed_calls_give_the_eager_numbers(cls, kw):
    m = _tiny()
    eager = cls(**SETTINGS, **kw)(m, *_inputs())
    graphs = StepGraphs(m, call_type=EagerReplayCall)
    sampler = _with_replay_graphs(cls(**SETTINGS, **kw), graphs)
    assert torch.equal(sampler(m, *_inputs()), eager)
    captures = graphs.captures
    assert 0 < captures < graphs.replays
    # a second call reuses every captured call; a different batch captures new ones
    assert torch.equal(sampler(m, *_inputs()), eager)
    assert graphs.captures == captures
    sampler(m, *_inputs(batch=2))
    assert graphs.captures == 2 * captures


def test_modulation_graph_runs_once_per_self_condition():
    m = _tiny()
    graphs = StepGraphs(m, call_type=EagerReplayCall)
    runs = []
    fill = type(m.decoder_blocks[0]).modulation

    def counting(self, cond):
        if cond.shape[1] > 1:  # per-token: a decoder block (the encoder's cond is [B, 1, C])
            runs.append(cond.shape[0])
        return fill(self, cond)

    sampler = _with_replay_graphs(EulerSampler(**SETTINGS, schedule=[0, 5]), graphs)
    type(m.decoder_blocks[0]).modulation = counting
    try:
        sampler(m, *_inputs())
    finally:
        type(m.decoder_blocks[0]).modulation = fill
    # conditional half from step 0 (1 eager capture run + 1 replay per s), the CFG pair
    # from step 3 and again from step 5: each modulation computed once per s, per decoder block
    decoder_blocks = m.num_blocks - m.num_encoder_blocks
    cond_runs, cfg_runs = runs.count(3), runs.count(6)
    assert cond_runs == decoder_blocks * (1 + 1)  # capture + one replay (one conditional s)
    assert cfg_runs == decoder_blocks * (1 + 2)  # capture + replays for s at steps 3 and 5


def test_graphs_dropped_when_parameters_change():
    m = _tiny()
    g = StepGraphs(m, call_type=EagerReplayCall)
    assert g.matches(m) and not g.matches(_tiny())
    m.to(torch.float64)
    assert not g.matches(m)


def test_release_graphs_and_capture_errors_are_clear():
    def broken(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    m = _tiny()
    sampler = _with_replay_graphs(EulerSampler(**SETTINGS), StepGraphs(m, call_type=broken))
    with pytest.raises(
        RuntimeError, match="CUDA-graph capture of the sampler's 'encode' call failed.*cuda_graph=False"
    ):
        sampler(m, *_inputs())
    s = EulerSampler(**SETTINGS, cuda_graph=True)
    s._graphs = object()
    s.release_graphs()
    assert s._graphs is None


# -- on a GPU: real CUDA graphs ------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("cls,kw", CASES)
def test_cuda_graph_sampling_matches_eager_cuda(cls, kw):
    m = _tiny("cuda")
    inputs = _inputs("cuda")
    eager = cls(**SETTINGS, **kw)(m, *inputs)
    sampler = cls(**SETTINGS, **kw, cuda_graph=True)
    out = sampler(m, *inputs)
    graphs = sampler._graphs
    assert graphs is not None and graphs.captures > 0 and graphs.replays > graphs.captures
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    captures = graphs.captures
    again = sampler(m, *inputs)  # replays only
    assert graphs.captures == captures
    torch.testing.assert_close(again, out, atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_graph_bf16_autocast_matches_eager_cuda():
    m = _tiny("cuda")
    inputs = _inputs("cuda")
    kw = dict(schedule=[0, 5], autocast=torch.bfloat16)
    eager = EulerSampler(**SETTINGS, **kw)(m, *inputs)
    sampler = EulerSampler(**SETTINGS, **kw, cuda_graph=True)
    out = sampler(m, *inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eager, atol=1e-2, rtol=1e-2)
    # the same sampler in float32 captures separate graphs (the autocast state is part of the key)
    sampler.autocast = None
    torch.testing.assert_close(
        sampler(m, *inputs), EulerSampler(**SETTINGS, schedule=[0, 5])(m, *inputs), atol=1e-5, rtol=1e-5
    )


@pytest.mark.cuda
def test_cuda_graph_follows_in_place_weight_updates_and_recaptures_on_new_ones_cuda():
    m = _tiny("cuda")
    inputs = _inputs("cuda")
    sampler = EulerSampler(**SETTINGS, cuda_graph=True)
    sampler(m, *inputs)
    first = sampler._graphs
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)  # in place: the graphs read the new values
    torch.testing.assert_close(sampler(m, *inputs), EulerSampler(**SETTINGS)(m, *inputs), atol=1e-5, rtol=1e-5)
    assert sampler._graphs is first
    m2 = _tiny("cuda")
    sampler(m2, *inputs)
    assert sampler._graphs is not first


def test_another_backend_choice_captures_its_own_graphs():
    """A captured graph holds the kernels chosen at capture: a call under
    another `use_backend` choice must not replay it."""
    from ddt_fast import ops

    m = _tiny()
    graphs = StepGraphs(m, call_type=EagerReplayCall)
    sampler = _with_replay_graphs(EulerSampler(**SETTINGS, schedule="every"), graphs)
    with ops.use_backend("reference"):
        ref = sampler(m, *_inputs())
    captures = graphs.captures
    with ops.use_backend("reference"):
        assert torch.equal(sampler(m, *_inputs()), ref)
    assert graphs.captures == captures
    with ops.use_backend("fused", attention="sdpa"):
        sampler(m, *_inputs())
    assert graphs.captures == 2 * captures
    outside = ops.dispatch.current()
    assert {key[-1] for key in graphs.calls} == {
        ("reference", outside.attention, outside.cpu_linear),
        ("fused", "sdpa", outside.cpu_linear),
    }
