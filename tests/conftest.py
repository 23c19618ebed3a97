import pytest
import torch
from helpers import DEVICES

from ddt_fast import _extension


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to PyTorch)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    """The device an op test runs on (helpers.DEVICES; helpers.on picks some).
    Skips where the extension has no kernel there for the op the test module
    names in KERNEL."""
    op = getattr(request.module, "KERNEL", None)
    if op is not None and not _extension.has_kernel(op, request.param.upper()):
        pytest.skip(f"ddt_fast._C has no {request.param} kernel for {op}")
    return request.param
