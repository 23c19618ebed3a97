"""Run a test script in a fresh process (kernel switches are read once per process)."""

import os
import subprocess
import sys

import torch


def script_outputs(script, path, env):
    """Run `script` (which saves its outputs to argv[1]) in a fresh process with
    `env` added; load what it saved."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **env),
        cwd=root,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(path)
