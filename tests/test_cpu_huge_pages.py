"""CPU op outputs of 32 MiB and more are advised transparent huge pages
(csrc/torch/cpu_output.h); DDT_FAST_CPU_HUGE_PAGES=0 turns that off. Checked
through the VMA flags the kernel reports for the output's memory ("hg" is
MADV_HUGEPAGE in /proc/self/smaps)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ddt_fast import _extension

pytestmark = [
    pytest.mark.skipif(
        not _extension.has_kernel("swiglu", "CPU"), reason="ddt_fast._C with the CPU kernels is not built"
    ),
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
        reason="needs Linux with transparent huge pages",
    ),
]

# Runs in a fresh process: the switch is read once per process.
PROBE = textwrap.dedent("""
    import re, sys, torch
    import ddt_fast  # noqa: F401 (loads the ops)

    def vma_flags(addr):
        inside = False
        with open("/proc/self/smaps") as f:
            for line in f:
                m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
                if m:
                    inside = int(m.group(1), 16) <= addr < int(m.group(2), 16)
                elif inside and line.startswith("VmFlags:"):
                    return line.split()[1:]
        raise AssertionError("no mapping holds the tensor")

    def flags_of(t):
        return vma_flags(t.data_ptr() + t.numel() * t.element_size() // 2)

    rows = int(sys.argv[1])
    a, b = torch.randn(rows, 2304), torch.randn(rows, 2304)
    out = torch.ops.ddt_fast.swiglu(a, b)
    grads = torch.ops.ddt_fast.swiglu_backward(torch.randn_like(a), a, b)
    print("hg" in flags_of(out), all("hg" in flags_of(g) for g in grads))
""")


def run_probe(rows, env_value=None):
    env = dict(os.environ)
    env.pop("DDT_FAST_CPU_HUGE_PAGES", None)
    if env_value is not None:
        env["DDT_FAST_CPU_HUGE_PAGES"] = env_value
    res = subprocess.run([sys.executable, "-c", PROBE, str(rows)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split()


@pytest.mark.slow
def test_large_outputs_get_huge_page_advice():
    assert run_probe(4096) == ["True", "True"]  # 4096 x 2304 float32 = 36 MiB each


@pytest.mark.slow
def test_switch_turns_it_off():
    assert run_probe(4096, "0") == ["False", "False"]


@pytest.mark.slow
def test_small_outputs_are_left_alone():
    assert run_probe(512) == ["False", "False"]  # 4.5 MiB


def test_advised_outputs_are_right():
    a, b = torch.randn(4096, 2304), torch.randn(4096, 2304)
    assert torch.allclose(torch.ops.ddt_fast.swiglu(a, b), torch.nn.functional.silu(a) * b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_info_reports_the_switch_and_the_system_mode():
    code = "import json, ddt_fast; print(json.dumps(ddt_fast.info()['backend']['cpu_huge_pages']))"
    for value, enabled in ((None, True), ("0", False)):
        env = dict(os.environ)
        env.pop("DDT_FAST_CPU_HUGE_PAGES", None)
        if value is not None:
            env["DDT_FAST_CPU_HUGE_PAGES"] = value
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        report = json.loads(res.stdout.strip().splitlines()[-1])
        assert report["enabled"] is enabled
        assert report["system"] in ("always", "madvise", "never")
