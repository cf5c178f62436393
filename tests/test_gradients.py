"""Batched per-example gradients equal one autograd backward per triple."""

import pytest
import torch
from conftest import make_model
from reference import flat, per_triple_gradients

from tracin_index.errors import LossError
from tracin_index.gradients.blocks import FactoredBlock, RowsBlock
from tracin_index.gradients.computer import GradientComputer
from tracin_index.gradients.selection import select_parameters

CASES = [
    ("ConvE", "last", "bce"),
    ("ConvE", "last", "ce"),
    ("ConvE", "all", "bce"),
    ("ConvE", "all", "ce"),
    ("DistMult", "last", "bce"),
    ("DistMult", "last", "ce"),
    ("TransE", "last", "bce"),
    ("ComplEx", "all", "ce"),
]


@pytest.fixture
def batch(nations):
    # rows with a repeated head and a triple whose head equals its tail would be nice; take a spread of rows
    return nations.training.mapped_triples[::97][:9]


@pytest.mark.parametrize("model_name,mode,loss", CASES)
def test_batched_gradients_equal_per_triple_autograd(nations, batch, model_name, mode, loss):
    model = make_model(model_name, nations.training)
    selection = select_parameters(model, mode=mode)
    grads = GradientComputer(model, selection, loss).compute(batch)

    expected = per_triple_gradients(model, batch, selection.parameter_names, loss)
    dense = grads.to_dense()
    assert set(dense) == set(expected)
    for name in expected:
        torch.testing.assert_close(dense[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("model_name,mode,loss", CASES)
def test_inner_products_and_norms_equal_dense_ones(nations, batch, model_name, mode, loss):
    model = make_model(model_name, nations.training)
    selection = select_parameters(model, mode=mode)
    grads = GradientComputer(model, selection, loss).compute(batch)
    other = GradientComputer(model, selection, loss).compute(nations.training.mapped_triples[5:8])

    a = flat(per_triple_gradients(model, batch, selection.parameter_names, loss))
    b = flat(per_triple_gradients(model, nations.training.mapped_triples[5:8], selection.parameter_names, loss))
    torch.testing.assert_close(grads.dot(other), a @ b.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads.squared_norms(), (a * a).sum(1), rtol=1e-9, atol=1e-12)


def test_conve_linear_layer_is_kept_as_factors_not_dense(nations, batch):
    model = make_model("ConvE", nations.training)
    grads = GradientComputer(model, select_parameters(model), "bce").compute(batch)
    block = grads.blocks["interaction.hr1d.0"]
    assert isinstance(block, FactoredBlock)
    linear = model.interaction.hr1d[0]
    assert block.a.shape == (len(batch), 1, linear.in_features + 1)  # a 1 appended for the bias
    assert block.delta.shape == (len(batch), 1, linear.out_features)


def test_batch_norm_gradients_are_included_and_nonzero(nations, batch):
    model = make_model("ConvE", nations.training)
    grads = GradientComputer(model, select_parameters(model), "bce").compute(batch).to_dense()
    expected = per_triple_gradients(model, batch, ["interaction.hr1d.2.weight", "interaction.hr1d.2.bias"], "bce")
    for name in expected:
        assert expected[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-9, atol=1e-12)


def test_embedding_gradients_keep_rows_not_tables(nations, batch):
    model = make_model("DistMult", nations.training)
    selection = select_parameters(model, mode="all")
    grads = GradientComputer(model, selection, "bce").compute(batch)
    for block in grads.blocks.values():
        assert isinstance(block, RowsBlock)
        assert block.rows.shape[0] == len(batch) and block.rows.shape[1] <= 2  # head + tail, or relation
        assert block.coef is None


def test_ce_tail_gradient_is_rank_one_per_example(nations, batch):
    model = make_model("DistMult", nations.training)
    grads = GradientComputer(model, select_parameters(model, mode="all"), "ce").compute(batch)
    entities = grads.blocks["entity_representations.0._embeddings"]
    assert entities.coef.shape == (len(batch), model.num_entities)
    assert entities.vec.shape == (len(batch), entities.rows.shape[-1])


def test_ce_with_entity_embeddings_of_transe_is_refused(nations):
    model = make_model("TransE", nations.training)
    with pytest.raises(LossError, match="linear in the tail"):
        GradientComputer(model, select_parameters(model, mode="all"), "ce")


def test_unknown_loss_is_refused(nations):
    model = make_model("DistMult", nations.training)
    with pytest.raises(LossError, match="valid: bce, ce"):
        GradientComputer(model, select_parameters(model), "mse")


def test_requires_grad_flags_are_restored(nations, batch):
    model = make_model("ConvE", nations.training)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    GradientComputer(model, select_parameters(model), "bce").compute(batch)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not model.training
