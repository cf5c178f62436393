"""Shared fixtures. PyKEEN writes into PYSTOW_HOME, so every test session gets its own."""

import os
import tempfile

# Set before pykeen is imported anywhere, so nothing is written into the home directory.
os.environ.setdefault("PYSTOW_HOME", tempfile.mkdtemp(prefix="tracin-pystow-"))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def nations():
    """PyKEEN's bundled Nations dataset (1,592 training triples; no download)."""
    from pykeen.datasets import Nations

    return Nations()
