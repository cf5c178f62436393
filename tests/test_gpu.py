"""The CUDA paths against independent CPU computations. Skipped without CUDA (CI has none); run
``python -m pytest tests/test_gpu.py`` on a GPU machine."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_model
from reference import flat, per_triple_gradients
from test_analyzer import brute_force
from test_index import run_ids

from tracin_index.exact import TracInAnalyzer
from tracin_index.gradients.computer import GradientComputer
from tracin_index.gradients.selection import select_parameters
from tracin_index.index import GradientIndex

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [("ConvE", "last", "bce"), ("ConvE", "all", "ce"), ("DistMult", "last", "ce"), ("TransE", "last", "bce")]


@pytest.fixture(autouse=True)
def _full_precision():
    """No TF32 in convolutions or products: the comparisons below are at float64 / float32 precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("model_name,mode,loss", CASES)
def test_cuda_gradients_equal_per_triple_autograd_on_the_cpu(nations, model_name, mode, loss):
    model = make_model(model_name, nations.training)
    batch = nations.training.mapped_triples[::97][:9]
    expected = per_triple_gradients(model, batch, select_parameters(model, mode=mode).parameter_names, loss)

    on_gpu = copy.deepcopy(model).to("cuda")
    grads = GradientComputer(on_gpu, select_parameters(on_gpu, mode=mode), loss).compute(batch.to("cuda"))
    dense = grads.to_dense()
    assert set(dense) == set(expected)
    for name in expected:
        assert dense[name].is_cuda
        torch.testing.assert_close(dense[name].cpu(), expected[name], rtol=1e-9, atol=1e-12, msg=name)
    reference = flat(expected)
    torch.testing.assert_close(grads.dot(grads).cpu(), reference @ reference.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads.squared_norms().cpu(), (reference**2).sum(1), rtol=1e-9, atol=1e-12)


def test_cuda_analyzer_equals_brute_force_on_the_cpu(nations, two_checkpoints):
    model, states, checkpoints = two_checkpoints
    training = nations.training.mapped_triples[:40]
    test = nations.testing.mapped_triples[:3]
    analyzer = TracInAnalyzer(copy.deepcopy(model), checkpoints=checkpoints, device="cuda", batch_size=16)
    scores = analyzer.influence_scores(test, training).cpu()
    expected = brute_force(model, states, test, training, analyzer.selection.parameter_names, "bce")
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_an_index_built_and_queried_on_cuda_answers_as_on_the_cpu(tiny_run, tmp_path):
    cpu = GradientIndex.build(tmp_path / "cpu", model_path=tiny_run, sketch_dim=16, device="cpu")
    gpu = GradientIndex.build(tmp_path / "gpu", model_path=tiny_run, sketch_dim=16, device="cuda")
    assert gpu.factor_arrays(0).device.type == "cuda"  # the scan runs on the GPU
    np.testing.assert_allclose(gpu.self_influences(), cpu.self_influences(), rtol=1e-5)
    _, _, test = run_ids(tiny_run)
    for a, b in zip(gpu.query(test[:5], top_k=10), cpu.query(test[:5], top_k=10)):
        assert [i.train_index for i in a.proponents] == [i.train_index for i in b.proponents]
        assert [i.train_index for i in a.opponents] == [i.train_index for i in b.opponents]
        np.testing.assert_allclose([i.influence for i in a.proponents], [i.influence for i in b.proponents], rtol=1e-4)


def test_an_index_opened_on_this_machine_scans_on_cuda_within_the_cpu_bounds(tiny_run, tmp_path):
    GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16, device="cpu")
    index = GradientIndex.open(tmp_path / "index", pack=True)  # the default device: cuda here (packing is for CPUs)
    on_cpu = GradientIndex.open(tmp_path / "index", device="cpu")
    assert str(index.device).startswith("cuda")
    _, _, test = run_ids(tiny_run)
    value, error = index.estimates(index.test_gradients(test[:1]), 0)
    value_cpu, error_cpu = on_cpu.estimates(on_cpu.test_gradients(test[:1]), 0)
    assert bool(((value - value_cpu).abs() <= error_cpu + error).all())
    for a, b in zip(index.query(test[:3]), on_cpu.query(test[:3])):
        assert [i.train_index for i in a.proponents] == [i.train_index for i in b.proponents]
        assert [i.train_index for i in a.opponents] == [i.train_index for i in b.opponents]
    assert not index.factor_arrays(0).packed
