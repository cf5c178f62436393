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


LEARNING_RATES = (0.5, 0.03)


@pytest.fixture
def two_checkpoints(nations, tmp_path):
    """A ConvE and two checkpoints of it with different weights and learning rates."""
    model = make_model("ConvE", nations.training)
    states = []
    for epoch, lr in enumerate(LEARNING_RATES, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        states.append((state, lr))
        torch.save({"model_state_dict": state, "learning_rate": lr, "epoch": epoch}, tmp_path / f"epoch-{epoch}.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the model's own weights differ from both checkpoints
    from tracin_index.kg.checkpoints import find_checkpoints

    return model, states, find_checkpoints([tmp_path])


@pytest.fixture
def small_conve(nations):
    return make_model("ConvE", nations.training)


TINY_CONVE = {"embedding_dim": 32, "output_channels": 4}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory of `tracin-index train`: small ConvE on Nations, checkpoints after epochs 1 and 2.

    The dataset is named "Nations" and the learning rate is 0.01 (not the default) on purpose: test_train
    checks that both are recorded as given (the name normalised)."""
    from tracin_index.kg.training import train_run

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    return train_run(
        out, dataset="Nations", model="ConvE", model_kwargs=TINY_CONVE, epochs=2, checkpoint_every=1,
        learning_rate=0.01, progress=False,
    )  # fmt: skip


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``tracin-index ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from tracin_index.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def tiny_train_gradients(tiny_run):
    """test_index.training_gradients(tiny_run, loss), computed once per test session and loss (the slow part)."""
    from test_index import training_gradients

    cache = {}

    def get(loss: str):
        if loss not in cache:
            cache[loss] = training_gradients(tiny_run, loss)
        return cache[loss]

    return get


@pytest.fixture(scope="session")
def conve_run(tmp_path_factory):
    """`tracin-index train` defaults on Nations (ConvE, embedding dim 200), 4 epochs, checkpoints after 2 and 4."""
    from tracin_index.kg.training import train_run

    out = tmp_path_factory.mktemp("conve-run") / "run"
    return train_run(out, dataset="nations", model="ConvE", epochs=4, checkpoint_every=2, progress=False)


@pytest.fixture(scope="session")
def tiny_index(tiny_run, tmp_path_factory):
    """The directory of an index of tiny_run (sketch_dim 16, CPU), built once per test session; a test that changes
    one of its files puts it back."""
    from tracin_index.index import GradientIndex

    directory = tmp_path_factory.mktemp("tiny-index") / "index"
    return GradientIndex.build(directory, model_path=tiny_run, sketch_dim=16, device="cpu").directory
