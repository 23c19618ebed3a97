"""GPU verification bound to the code: per-op digests of the CUDA sources,
the records of the digests that passed on a GPU, and what `auto` does with
them (ddt_fast/_kernel_digest.py, ddt_fast/ops/verified.py)."""

import os
import shutil
import subprocess

import pytest
import torch

from ddt_fast import _extension
from ddt_fast import _kernel_digest as kd
from ddt_fast.ops import dispatch, verified

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM_OPS = {"rms_norm_modulate", "layer_norm_modulate", "gated_residual", "gated_residual_rms_norm_modulate"}


def _copy_sources(tmp_path):
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    return kd.tree_reader(str(tmp_path))


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_editing_a_kernel_source_changes_the_digests_of_its_ops_only(tmp_path):
    before = kd.op_digests(_copy_sources(tmp_path))
    cu = tmp_path / "csrc" / "cuda" / "norm_modulate.cu"
    _edit(cu, "namespace ddt {", "namespace ddt {\nconstexpr int kEdited = 1;")
    after = kd.op_digests(kd.tree_reader(str(tmp_path)))
    assert {op for op in before if before[op] != after[op]} == NORM_OPS


def test_a_shared_header_changes_every_op_that_includes_it(tmp_path):
    before = kd.op_digests(_copy_sources(tmp_path))
    _edit(tmp_path / "csrc" / "include" / "ddt" / "dtypes.h", "namespace ddt {", "namespace ddt {\nusing edited = int;")
    after = kd.op_digests(kd.tree_reader(str(tmp_path)))
    changed = {op for op in before if before[op] != after[op]}
    assert NORM_OPS | {"swiglu", "qk_norm_rope", "flash_attention", "qkv_attention"} == changed  # not the DP solver


def test_comments_and_blank_lines_do_not_change_a_digest_but_flags_do(tmp_path):
    before = kd.op_digests(_copy_sources(tmp_path))
    cu = tmp_path / "csrc" / "cuda" / "swiglu.cu"
    cu.write_text("// a reworded comment\n/* and a block\n   comment */\n\n" + cu.read_text().replace("\n", "  \n"))
    assert kd.op_digests(kd.tree_reader(str(tmp_path))) == before
    flags = kd.NVCC_FLAGS + ("--use_fast_math",)
    assert kd.op_digest(kd.tree_reader(str(tmp_path)), "swiglu", flags) != before["swiglu"]


def test_normalize_keeps_comment_markers_inside_string_literals():
    code = "const char* s = \"a // b\"; // gone\nint c = '/'; /* gone */ int d;\n"
    assert kd.normalize(code) == "const char* s = \"a // b\";\nint c = '/';   int d;\n"


def test_a_missing_kernel_source_is_an_error(tmp_path):
    _copy_sources(tmp_path)
    os.remove(tmp_path / "csrc" / "cuda" / "swiglu.cu")
    with pytest.raises(FileNotFoundError, match="swiglu.cu"):
        kd.op_digest(kd.tree_reader(str(tmp_path)), "swiglu")


def _git_has(commit):
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        return False
    out = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    return out.returncode == 0


def test_every_record_is_the_digest_of_its_commits_sources():
    recs = verified.records()
    assert recs, "gpu_verified.json holds no records"
    commits = sorted({r.commit for r in recs})
    if not all(_git_has(c) for c in commits):
        pytest.skip("the git history of the recorded commits is not in this checkout")
    for commit in commits:
        digests = kd.op_digests(kd.git_reader(ROOT, commit))
        for r in recs:
            if r.commit == commit:
                assert r.digest == digests[r.op], (r.op, commit)
    for r in recs:
        assert r.op in kd.KERNEL_SOURCES and r.gpu and r.date and r.torch and r.suite


def _build_info():
    if not _extension.available():
        pytest.skip("the extension is not built")
    return _extension._C.build_info()


def test_the_extension_embeds_the_digests_of_the_sources_it_was_built_from():
    info = _build_info()
    if not info["with_cuda"]:
        pytest.skip("the extension was built without its CUDA part")
    assert verified.built_digests() == kd.op_digests(kd.tree_reader(ROOT))


def test_status_states():
    rec = verified.Record("swiglu", "a" * 64, "NVIDIA H200", "2026-11-26", "2.11.0", "13.0", "suite", "abc1234")
    ok = verified._status("swiglu", {"swiglu": "a" * 64}, [rec])
    assert ok.state == "verified" and "verified on NVIDIA H200 at 2026-11-26" in ok.reason and ok.record == rec
    changed = verified._status("swiglu", {"swiglu": "b" * 64}, [rec])
    assert changed.state == "changed"
    assert changed.reason.startswith("changed since verified on NVIDIA H200 at 2026-11-26 (commit abc1234)")
    assert verified._status("swiglu", {"swiglu": "b" * 64}, []).state == "unverified"
    assert verified._status("swiglu", {}, [rec]).state == "not built"
    assert verified._status("swiglu", {}, [], has_cuda_kernel=True).state == "unverified"
    with pytest.raises(ValueError, match="has no CUDA kernel"):
        verified.status("attention")


@pytest.fixture
def statuses():
    saved = verified._set_statuses(verified._STATUSES)
    yield
    verified._set_statuses(saved)


def test_auto_takes_the_reference_for_a_changed_kernel_and_fused_still_forces_it(statuses):
    if not _extension.has_kernel("rms_norm_modulate", "CUDA"):
        pytest.skip("the extension was built without its CUDA part")
    cuda = torch.device("cuda")  # the decision needs no GPU
    rec = verified.Record("rms_norm_modulate", "a" * 64, "NVIDIA H200", "2026-11-26", "2.11", "13.0", "s", "c")
    verified._set_statuses(
        {"rms_norm_modulate": verified._status("rms_norm_modulate", {"rms_norm_modulate": "b" * 64}, [rec])}
    )
    with dispatch.use_backend("auto"):
        assert not dispatch.use_fused("rms_norm_modulate", cuda)
    with dispatch.use_backend("fused"):
        assert dispatch.use_fused("rms_norm_modulate", cuda)
    verified._set_statuses(
        {"rms_norm_modulate": verified._status("rms_norm_modulate", {"rms_norm_modulate": "a" * 64}, [rec])}
    )
    with dispatch.use_backend("auto"):
        assert dispatch.use_fused("rms_norm_modulate", cuda)
    assert dispatch.use_fused("rms_norm_modulate", torch.device("cpu"))  # the CPU kernels need no GPU record


def test_ops_passed_reads_a_junit_report(tmp_path):
    report = tmp_path / "cuda.xml"
    report.write_text(
        """<?xml version="1.0"?><testsuites><testsuite name="pytest">
        <testcase classname="tests.test_op_norm_modulate" name="test_forward[cuda-float32]"/>
        <testcase classname="tests.test_op_norm_modulate" name="test_backward[cuda-bfloat16]"/>
        <testcase classname="tests.test_op_swiglu" name="test_swiglu[cuda]"><failure message="x"/></testcase>
        <testcase classname="tests.test_op_qk_norm_rope" name="test_qk_norm_rope[cuda]"/>
        <testcase classname="tests.test_op_attention" name="test_attention[cuda]"><skipped message="y"/></testcase>
        </testsuite></testsuites>"""
    )
    assert verified.ops_passed(str(report)) == sorted(NORM_OPS | {"qk_norm_rope"})


def test_recording_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        verified.add_records(["swiglu"], "suite", path=str(tmp_path / "records.json"))


def test_info_reports_every_cuda_kernel_with_its_state():
    import ddt_fast

    kernels = ddt_fast.info()["cuda_kernels"]
    assert set(kernels) == set(kd.KERNEL_SOURCES)
    for op, line in kernels.items():
        assert line.split(" ")[0].rstrip(":") in ("verified", "changed", "unverified", "not"), line
        assert verified.status(op).reason in line
