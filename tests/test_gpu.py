"""The CUDA paths against independent CPU computations. Skipped without CUDA (CI has none); run
``python -m pytest tests/test_gpu.py`` on a GPU machine."""

import copy

import numpy as np
import pytest
import torch

from conftest import make_model
from reference import flat, per_triple_gradients
from test_analyzer import brute_force
from test_index import exact_analyzer, shard_vectors
from tracin_index.analyzer import TracInAnalyzer
from tracin_index.gradients import GradientComputer
from tracin_index.index import GradientIndex
from tracin_index.layers import select_parameters
from tracin_index.projection import GradientProjector, ProjectionSpec, fit_principal_bases
from tracin_index.search import InnerProductIndex, gpu_available

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


def test_cuda_projection_equals_the_cpu_projection(nations):
    model = make_model("ConvE", nations.training, embedding_dim=200, output_channels=32)  # a 10368 -> 200 Linear, as in practice
    selection = select_parameters(model, mode="last")
    spec = ProjectionSpec(4096)
    batch = nations.training.mapped_triples[:64]
    computer = GradientComputer(model, selection, "bce")
    bases = fit_principal_bases(selection, spec, computer, nations.training.mapped_triples[:512])
    expected = GradientProjector(selection, spec, 0, bases=bases).project(computer.compute(batch))

    on_gpu = copy.deepcopy(model).to("cuda")
    gpu_selection = select_parameters(on_gpu, mode="last")
    grads = GradientComputer(on_gpu, gpu_selection, "bce").compute(batch.to("cuda"))
    found = GradientProjector(gpu_selection, spec, 0, device="cuda", bases=bases).project(grads)
    assert found.is_cuda
    torch.testing.assert_close(found.cpu(), expected, rtol=1e-7, atol=1e-10)


def test_cuda_analyzer_equals_brute_force_on_the_cpu(nations, two_checkpoints):
    model, states, checkpoints = two_checkpoints
    training = nations.training.mapped_triples[:40]
    test = nations.testing.mapped_triples[:3]
    analyzer = TracInAnalyzer(copy.deepcopy(model), checkpoints=checkpoints, device="cuda", batch_size=16)
    scores = analyzer.influence_scores(test, training).cpu()
    expected = brute_force(model, states, test, training, analyzer.selection.parameter_names, "bce")
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_an_index_built_on_cuda_holds_the_cpu_vectors_and_answers_alike(tiny_run, tmp_path):
    cpu = GradientIndex.build(tmp_path / "cpu", model_path=tiny_run, projection_dim=256, dtype="float32", device="cpu",
                              progress=False)  # fmt: skip
    gpu = GradientIndex.build(tmp_path / "gpu", model_path=tiny_run, projection_dim=256, dtype="float32",
                              device="cuda", progress=False)  # fmt: skip
    # principal directions may differ by sign or rotation within their span (rounding); the inner
    # products, which are all an index is for, do not
    on_gpu, on_cpu = shard_vectors(gpu).astype(np.float64), shard_vectors(cpu).astype(np.float64)
    gram_gpu, gram_cpu = on_gpu[:300] @ on_gpu.T, on_cpu[:300] @ on_cpu.T
    np.testing.assert_allclose(gram_gpu, gram_cpu, rtol=1e-4, atol=1e-5 * np.abs(gram_cpu).max())
    np.testing.assert_allclose(gpu.self_influences(), cpu.self_influences(), rtol=1e-5)
    _, _, test = exact_analyzer(tiny_run)
    for a, b in zip(gpu.query(test[:5], top_k=10, rerank=50), cpu.query(test[:5], top_k=10, rerank=50)):
        assert [i.train_index for i in a.proponents] == [i.train_index for i in b.proponents]
        assert [i.train_index for i in a.opponents] == [i.train_index for i in b.opponents]
        np.testing.assert_allclose([i.influence for i in a.proponents], [i.influence for i in b.proponents], rtol=1e-4)


def test_an_exact_index_opened_on_this_machine_uses_cuda_and_matches_the_cpu_analyzer(tiny_run, tmp_path):
    GradientIndex.build(tmp_path / "index", model_path=tiny_run, projection_dim=0, dtype="float32", device="cpu",
                        progress=False)  # fmt: skip
    index = GradientIndex.open(tmp_path / "index")  # the default device: cuda here
    assert str(index.device).startswith("cuda")
    analyzer, train, test = exact_analyzer(tiny_run)
    expected = analyzer.compute_influences(test[:5], train, top_k=10)
    for e, f in zip(expected, index.query(test[:5], top_k=10)):
        assert [i.train_index for i in f.proponents] == [i.train_index for i in e.proponents]
        np.testing.assert_allclose([i.influence for i in f.proponents], [i.influence for i in e.proponents],
                                   rtol=1e-4, atol=1e-9)  # fmt: skip


# -- FAISS on the GPU (needs a FAISS GPU build) ---------------------------------------------------

needs_faiss_gpu = pytest.mark.skipif(not gpu_available(), reason="needs a FAISS GPU build")


@needs_faiss_gpu
@pytest.mark.parametrize("index_type", ["flat", "flat-fp16", "ivf"])
def test_faiss_on_the_gpu_finds_what_the_cpu_finds_and_survives_save_and_open(index_type, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5000, 64)).astype(np.float32)
    queries = rng.standard_normal((7, 64)).astype(np.float32)
    index = InnerProductIndex.create(64, index_type, **({"nlist": 16, "nprobe": 16} if index_type == "ivf" else {}))
    index.train(vectors)
    index.add(vectors)
    cpu_rows = index.search(queries, 10).rows
    assert index.to_gpu().on_gpu
    np.testing.assert_array_equal(index.search(queries, 10).rows, cpu_rows)
    assert index.search(queries, 3000).rows.shape == (7, 3000)  # beyond the GPU's k: the CPU answers
    index.save(tmp_path / "faiss.index")
    reopened = InnerProductIndex.open(tmp_path / "faiss.index")
    assert reopened.on_gpu and reopened.index_type == index_type
    np.testing.assert_array_equal(reopened.search(queries, 10).rows, cpu_rows)
