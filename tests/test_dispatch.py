import asyncio
import subprocess
import sys
import threading

import pytest
import torch

from ddt_fast import ops
from ddt_fast.ops import dispatch, verified


def test_reference_forced_never_uses_fused(monkeypatch):
    monkeypatch.setattr(dispatch, "has_fused_kernel", lambda op, dev: True)
    with ops.use_backend("reference"):
        assert not dispatch.use_fused("swiglu", torch.device("cpu"))
    with ops.use_backend("fused"):
        assert dispatch.use_fused("swiglu", torch.device("cpu"))


def test_cuda_auto_requires_gpu_verification(monkeypatch):
    monkeypatch.setattr(dispatch, "has_fused_kernel", lambda op, dev: True)
    cuda = torch.device("cuda")
    with ops.use_backend("auto"):
        assert dispatch.use_fused("swiglu", torch.device("cpu"))  # CPU kernels need no GPU run
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: False)
        assert not dispatch.use_fused("swiglu", cuda)
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: op == "swiglu")
        assert dispatch.use_fused("swiglu", cuda)
        assert not dispatch.use_fused("rms_norm_modulate", cuda)
    with ops.use_backend("fused"):
        assert dispatch.use_fused("rms_norm_modulate", cuda)


def test_no_kernel_means_reference_even_when_forced(monkeypatch):
    monkeypatch.setattr(dispatch, "has_fused_kernel", lambda op, dev: False)
    with ops.use_backend("fused"):
        assert not dispatch.use_fused("swiglu", torch.device("cpu"))


def test_auto_on_gpu_is_verified_minus_measured_slower():
    for op in ops.KERNEL_OPS:
        assert verified.auto_on_gpu(op) == (verified.is_verified(op) and op not in verified.SLOWER_ON_GPU)
    assert set(verified.SLOWER_ON_GPU) <= set(ops.KERNEL_OPS)
    assert all(isinstance(why, str) and why for why in verified.SLOWER_ON_GPU.values())


def test_every_kernel_op_has_its_cuda_sources_listed():
    assert set(verified.KERNEL_SOURCES) == set(ops.KERNEL_OPS)


def test_attention_on_cpu_is_sdpa_whatever_is_forced():
    q = torch.randn(1, 2, 5, 8)
    for choice in dispatch.ATTENTION_BACKENDS:
        with ops.use_backend(attention=choice):
            assert dispatch.attention_backend(q, q, q) == "sdpa"


def test_attention_auto_order(monkeypatch):
    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda")
        dtype = torch.bfloat16
        shape = (1, 16, 256, 72)

    q = FakeCuda()
    monkeypatch.setattr(dispatch, "has_fused_kernel", lambda op, dev: True)
    monkeypatch.setattr(dispatch, "flash_attn_importable", lambda: True)
    with ops.use_backend(attention="auto"):
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: False)
        assert dispatch.attention_backend(q, q, q) == "flash_attn"  # ddt kernel not verified
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: True)
        assert dispatch.attention_backend(q, q, q) == "ddt"
        assert dispatch.attention_backend(q, q, q, mask=torch.ones(1)) == "sdpa"
    monkeypatch.setattr(dispatch, "flash_attn_importable", lambda: False)
    with ops.use_backend(attention="flash_attn"):
        assert dispatch.attention_backend(q, q, q) == "sdpa"


def test_fused_qkv_attention_rule(monkeypatch):
    """One kernel from qkv (norm + rotary + attention) only where both the
    op backend and the attention backend would pick our kernels."""
    qkv = torch.empty(2, 256, 3 * 16 * 72, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(
        dispatch, "_ddt_case", lambda device, dtype, head_dim, mask, op: head_dim in (64, 72, 128) and mask is None
    )
    with ops.use_backend("auto", attention="auto"):
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: False)
        assert not dispatch.use_fused_qkv_attention(qkv, 16)  # not GPU-verified
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: op == "qkv_attention")
        assert dispatch.use_fused_qkv_attention(qkv, 16)
        assert not dispatch.use_fused_qkv_attention(qkv, 16, mask=torch.ones(1))
        assert not dispatch.use_fused_qkv_attention(qkv, 12)  # head dim 96
    monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: False)
    with ops.use_backend("auto", attention="ddt"):
        assert dispatch.use_fused_qkv_attention(qkv, 16)
    for backend, attention in (("reference", "ddt"), ("fused", "sdpa"), ("fused", "flash_attn")):
        with ops.use_backend(backend, attention=attention):
            assert not dispatch.use_fused_qkv_attention(qkv, 16)


def test_qkv_attention_on_cpu_is_norm_rope_plus_sdpa():
    from ddt_fast.ops import reference

    B, H, D, grid = 2, 3, 8, (2, 3)
    qkv = torch.randn(B, grid[0] * grid[1], 3 * H * D)
    qw, kw = torch.randn(D), torch.randn(D)
    freqs = ops.rope_frequencies(*grid, D, torch.device("cpu"))
    q, k, v = reference.qk_norm_rope(qkv, qw, kw, H, freqs, 1e-6)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, H * D)
    for choice in dispatch.ATTENTION_BACKENDS:
        with ops.use_backend("reference", attention=choice):
            torch.testing.assert_close(ops.qkv_attention(qkv, qw, kw, H, freqs, 1e-6), want)


def test_bad_names_are_refused_and_change_nothing():
    before = ops.dispatch.current()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fast")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        ops.set_attention_backend("xformers")
    with pytest.raises(ValueError, match="CPU linear mode must be one of"):
        ops.set_cpu_linear("bf16")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        with ops.use_backend("reference", attention="xformers"):
            pass
    assert ops.dispatch.current() == before


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("DDT_FAST_BACKEND", "BACKENDS"),
        ("DDT_FAST_ATTENTION", "ATTENTION_BACKENDS"),
        ("DDT_FAST_CPU_LINEAR", "CPU_LINEAR_MODES"),
    ],
)
def test_environment_values_are_checked(monkeypatch, name, allowed):
    choices = getattr(dispatch, allowed)
    monkeypatch.setenv(name, f" {choices[-1].upper()} ")
    assert dispatch._from_env(name, choices, "auto") == choices[-1]
    monkeypatch.setenv(name, "")
    assert dispatch._from_env(name, choices, "auto") == "auto"
    monkeypatch.setenv(name, "turbo")
    with pytest.raises(ValueError, match=f"{name}='turbo' is not one of {', '.join(choices)}"):
        dispatch._from_env(name, choices, "auto")


@pytest.mark.slow
def test_environment_is_read_at_import():
    """The one test that needs a fresh process: the switches are read from the
    environment when ddt_fast.ops is imported, and a bad value stops that
    import with a message naming the variable."""
    code = "import ddt_fast.ops as o; print(*o.dispatch.current())"
    env = {"DDT_FAST_BACKEND": "reference", "DDT_FAST_ATTENTION": "sdpa", "DDT_FAST_CPU_LINEAR": "native", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["reference", "sdpa", "native"], out.stderr
    out = subprocess.run(
        [sys.executable, "-c", "import ddt_fast"],
        capture_output=True,
        text=True,
        env=dict(env, DDT_FAST_BACKEND="turbo"),
    )
    assert out.returncode != 0 and "DDT_FAST_BACKEND='turbo' is not one of auto, fused, reference" in out.stderr


def test_use_backend_restores_state():
    before = ops.dispatch.current()
    with pytest.raises(RuntimeError):
        with ops.use_backend("reference", attention="sdpa", cpu_linear="native"):
            raise RuntimeError("boom")
    assert ops.dispatch.current() == before


def test_use_backend_nests_and_leaves_unnamed_switches_alone():
    outside = ops.dispatch.current()
    with ops.use_backend("reference", attention="sdpa"):
        with ops.use_backend(cpu_linear="float32"):
            assert ops.dispatch.current() == ("reference", "sdpa", "float32")
            with ops.use_backend("fused"):
                assert ops.dispatch.current() == ("fused", "sdpa", "float32")
            assert ops.dispatch.current() == ("reference", "sdpa", "float32")
        assert ops.dispatch.current() == ("reference", "sdpa", outside.cpu_linear)
    assert ops.dispatch.current() == outside


@pytest.fixture
def process_defaults():
    """Restores the process defaults a test changes with set_backend & co."""
    saved = ops.dispatch.current()  # no override is active around a test
    yield saved
    ops.set_backend(saved.backend)
    ops.set_attention_backend(saved.attention)
    ops.set_cpu_linear(saved.cpu_linear)


def _in_thread(fn):
    result = []
    worker = threading.Thread(target=lambda: result.append(fn()))
    worker.start()
    worker.join()
    return result[0]


def test_set_backend_changes_the_default_of_every_thread(process_defaults):
    ops.set_backend("reference")
    ops.set_cpu_linear("native")
    assert _in_thread(ops.dispatch.current) == ("reference", process_defaults.attention, "native")
    with ops.use_backend("fused"):
        assert ops.get_backend() == "fused"  # the override wins where it is active
        assert _in_thread(ops.get_backend) == "reference"  # and only there
        ops.set_backend("auto")  # a default set inside a block outlives it
        assert ops.get_backend() == "fused"
    assert ops.get_backend() == "auto"


def test_override_stays_in_its_thread():
    """Two threads inside different use_backend blocks at the same time each
    see their own choice; the main thread sees neither."""
    entered, done = threading.Barrier(3), threading.Barrier(3)
    seen = {}

    def worker(name, backend, attention):
        with ops.use_backend(backend, attention=attention):
            entered.wait()
            seen[name] = ops.dispatch.current()
            done.wait()
        seen[name + " after"] = ops.dispatch.current()

    outside = ops.dispatch.current()
    threads = [
        threading.Thread(target=worker, args=("a", "reference", "sdpa")),
        threading.Thread(target=worker, args=("b", "fused", None)),
    ]
    for t in threads:
        t.start()
    entered.wait()
    assert ops.dispatch.current() == outside
    done.wait()
    for t in threads:
        t.join()
    assert seen["a"] == ("reference", "sdpa", outside.cpu_linear)
    assert seen["b"] == ("fused", outside.attention, outside.cpu_linear)
    assert seen["a after"] == seen["b after"] == outside


def test_override_stays_in_its_asyncio_task():
    async def task(backend, steps):
        with ops.use_backend(backend):
            seen = []
            for _ in range(steps):
                await asyncio.sleep(0)  # let the other task run inside its own block
                seen.append(ops.get_backend())
            return seen

    async def both():
        return await asyncio.gather(task("reference", 3), task("fused", 3))

    outside = ops.get_backend()
    assert asyncio.run(both()) == [["reference"] * 3, ["fused"] * 3]
    assert ops.get_backend() == outside


class _RecordingBackend:
    """A torch.compile backend that keeps each traced graph and records, per
    thread, which graph each call ran (dynamo picks it by its guards)."""

    def __init__(self):
        self.graphs, self.runs = [], []

    def __call__(self, gm, example_inputs):
        index = len(self.graphs)
        self.graphs.append(gm)

        def run(*args):
            self.runs.append((threading.current_thread().name, index))
            return gm.forward(*args)

        return run

    def fused(self, index) -> bool:
        return any(str(node.target).startswith("ddt_fast.") for node in self.graphs[index].graph.nodes)


_CPU_SWIGLU = dispatch.has_fused_kernel("swiglu", "cpu")


@pytest.mark.skipif(not _CPU_SWIGLU, reason="ddt_fast._C without the CPU swiglu kernel")
def test_compiled_code_follows_the_override_of_each_caller(process_defaults):
    """torch.compile traces the dispatch decision and guards on the switches
    (the ContextVar overrides and the process defaults): another choice
    retraces, and each thread runs the graph of its own choice."""
    recorder = _RecordingBackend()
    fn = torch.compile(lambda a, b: ops.swiglu(a, b) * 2, fullgraph=True, backend=recorder)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with ops.use_backend("auto"):
        fn(a, b)
    with ops.use_backend("reference"):
        fn(a, b)
    assert [recorder.fused(i) for i in range(len(recorder.graphs))] == [True, False]
    with ops.use_backend("auto"):
        fn(a, b)  # the first graph again, no retrace
    ops.set_backend("reference")
    fn(a, b)  # the process default is guarded on too: no override, another default, another trace
    assert [i for _, i in recorder.runs] == [0, 1, 0, 2] and not recorder.fused(2)

    recorder.runs.clear()
    ready = threading.Barrier(2)

    def caller(backend):
        with ops.use_backend(backend):
            ready.wait()
            for _ in range(3):
                fn(a, b)

    threads = [threading.Thread(target=caller, args=(x,), name=x) for x in ("auto", "reference")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(recorder.runs) == [("auto", 0)] * 3 + [("reference", 1)] * 3
    assert len(recorder.graphs) == 3


@pytest.mark.slow
def test_compiled_model_has_no_graph_break_under_an_override():
    from ddt_fast import models

    m = models.create("DDT-tiny/2").eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    recorder = _RecordingBackend()
    compiled = torch.compile(m, fullgraph=True, backend=recorder)
    with torch.no_grad(), ops.use_backend("reference", attention="sdpa", cpu_linear="float32"):
        torch.testing.assert_close(compiled(x, t, y)[0], m(x, t, y)[0])
    assert len(recorder.graphs) == 1 and not recorder.fused(0)


def test_model_output_identical_under_every_backend_when_no_kernels():
    from ddt_fast import models

    m = models.create("DDT-tiny/2")
    x, t, y = torch.randn(1, 4, 4, 4), torch.rand(1), torch.tensor([3])
    with torch.no_grad(), ops.use_backend("reference"):
        ref = m(x, t, y)[0]
    with torch.no_grad(), ops.use_backend("auto"):
        auto = m(x, t, y)[0]
    plan = ops.plan("cpu")
    if all(v in ("reference", "sdpa") for v in plan.values()):
        assert torch.equal(ref, auto)
    else:
        torch.testing.assert_close(ref, auto, atol=1e-5, rtol=1e-5)


def test_dtype_combinations_the_kernels_do_not_take_fall_back_to_reference():
    from ddt_fast.ops import reference

    x = torch.randn(2, 3, 8)
    w16 = torch.randn(8, dtype=torch.bfloat16)
    sh, sc = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with ops.use_backend("fused"):
        out = ops.rms_norm_modulate(x, w16, sh, sc)  # float32 x with a bf16 weight: promotion
    torch.testing.assert_close(out, reference.rms_norm_modulate(x, w16, sh, sc))
    assert out.dtype == torch.float32
    xi = torch.randint(0, 4, (2, 3, 8))
    with ops.use_backend("fused"):
        assert ops._kernel_takes(x, (torch.randn(8),), (sh, sc))
        assert not ops._kernel_takes(xi.float(), (w16,))
        assert not ops._kernel_takes(x.bfloat16(), (), (sh, sc.bfloat16()))


@pytest.mark.skipif(not hasattr(torch.ops.ddt_fast, "flash_attention"), reason="extension not built")
def test_attention_fake_shapes_and_layout():
    """The fake (meta) kernels torch.compile traces with: shapes, dtypes, and
    the [B, L, H, D] storage of the output that makes merging heads a view."""
    f = torch.ops.ddt_fast
    q = torch.empty(2, 3, 5, 72, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 3, 9, 72, dtype=torch.bfloat16, device="meta")
    out, lse = f.flash_attention(q, k, k, 0.1)
    assert out.shape == (2, 3, 5, 72) and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    gq, gk, gv = f.flash_attention_backward(out, q, k, k, out, lse, 0.1)
    assert gq.shape == q.shape and gk.shape == gv.shape == k.shape
    qkv = torch.empty(2, 16, 3 * 144, dtype=torch.bfloat16, device="meta")
    w = torch.empty(72, device="meta")
    rope = torch.empty(16, 36, 2, device="meta")
    out, lse = f.qkv_attention(qkv, w, w, 2, rope, 1e-6, 0.1)
    assert out.shape == (2, 16, 144) and lse.shape == (2, 2, 16)
