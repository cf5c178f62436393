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


def _randomise_batch_norm(model: torch.nn.Module) -> None:
    """Give batch norm layers non-trivial running statistics and affine parameters (fresh ones are 0/1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


def make_model(name: str, training, dtype=torch.float64, seed: int = 1, **kwargs):
    """A small PyKEEN model in float64 (so that exactness checks can use tight tolerances)."""
    from pykeen.models import model_resolver

    defaults = {"ConvE": dict(embedding_dim=32, output_channels=4)}.get(name, dict(embedding_dim=16))
    model = model_resolver.make(name, {**defaults, **kwargs}, triples_factory=training, random_seed=seed)
    model = model.to(dtype)
    _randomise_batch_norm(model)
    return model.eval()


@pytest.fixture
def small_conve(nations):
    return make_model("ConvE", nations.training)
