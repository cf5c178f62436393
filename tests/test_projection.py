"""Projections: exact when dim 0, unbiased inner products, matrices a function of (seed, checkpoint, layer, side)."""

import pytest
import torch

from conftest import make_model
from reference import flat, per_triple_gradients
from tracin_index.errors import InputError
from tracin_index.gradients import GradientComputer
from tracin_index.layers import select_parameters
from tracin_index.projection import GradientProjector, ProjectionSpec, fit_principal_bases, random_matrix


@pytest.fixture
def conve_grads(nations):
    model = make_model("ConvE", nations.training)
    selection = select_parameters(model)
    triples = nations.training.mapped_triples[:12]
    return model, selection, triples, GradientComputer(model, selection, "bce").compute(triples)


@pytest.mark.parametrize("model_name,mode,loss", [("ConvE", "last", "bce"), ("DistMult", "all", "ce"), ("TransE", "last", "bce")])
def test_dim_zero_gives_the_exact_flat_gradient(nations, model_name, mode, loss):
    model = make_model(model_name, nations.training)
    selection = select_parameters(model, mode=mode)
    triples = nations.training.mapped_triples[:6]
    grads = GradientComputer(model, selection, loss).compute(triples)
    vectors = GradientProjector(selection, ProjectionSpec(0), checkpoint=0).project(grads)
    expected = flat(per_triple_gradients(model, triples, selection.parameter_names, loss))
    torch.testing.assert_close(vectors @ vectors.T, expected @ expected.T, rtol=1e-9, atol=1e-12)


def test_matrices_depend_only_on_seed_checkpoint_layer_and_side():
    a = random_matrix(7, 1, "interaction.hr1d.0", "in", 16, 100, "gaussian")
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(a, random_matrix(7, 1, "interaction.hr1d.0", "in", 16, 100, "gaussian"))
    assert not torch.equal(a, random_matrix(8, 1, "interaction.hr1d.0", "in", 16, 100, "gaussian"))
    assert not torch.equal(a, random_matrix(7, 2, "interaction.hr1d.0", "in", 16, 100, "gaussian"))
    assert not torch.equal(a, random_matrix(7, 1, "interaction.hr1d.0", "out", 16, 100, "gaussian"))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_matrix_entries_have_variance_one_over_rows(kind):
    m = random_matrix(0, 0, "layer", "in", 64, 4096, kind)
    assert m.mean().abs() < 0.01 / 8
    assert m.var().item() == pytest.approx(1 / 64, rel=0.05)


def test_linear_layer_keeps_a_small_output_side_exact_and_projects_the_input_side(conve_grads):
    model, selection, triples, grads = conve_grads
    projector = GradientProjector(selection, ProjectionSpec(dim=512), checkpoint=0)
    linear, batch_norm = projector.layouts
    assert linear.projected == (32, 16)  # 32 outputs kept, 145 inputs -> 16
    assert linear.principal == 12  # three quarters of the input side on exact principal directions
    assert batch_norm.projected == (1, 64)  # 64 batch-norm parameters: kept exact
    bases = fit_principal_bases(selection, ProjectionSpec(dim=512), GradientComputer(model, selection, "bce"), triples)
    assert bases["interaction.hr1d.0"].shape == (12, 145)
    projector = GradientProjector(selection, ProjectionSpec(dim=512), checkpoint=0, bases=bases)
    assert projector.project(grads).shape == (12, 512 + 64)


def test_a_large_output_side_is_projected_too(conve_grads):
    _, selection, _, _ = conve_grads
    linear = GradientProjector(selection, ProjectionSpec(dim=256), checkpoint=0).layouts[0]
    assert linear.projected == (16, 16) and linear.principal == 12


def test_principal_directions_are_orthonormal_and_reproducible(conve_grads):
    model, selection, triples, _ = conve_grads
    computer = GradientComputer(model, selection, "bce")
    first = fit_principal_bases(selection, ProjectionSpec(dim=512), computer, triples)["interaction.hr1d.0"]
    again = fit_principal_bases(selection, ProjectionSpec(dim=512), computer, triples)["interaction.hr1d.0"]
    assert torch.equal(first, again)
    torch.testing.assert_close(first @ first.T, torch.eye(12), atol=1e-5, rtol=0)
    largest = first.gather(1, first.abs().argmax(dim=1, keepdim=True))
    assert (largest > 0).all()  # a canonical sign: builds on other devices agree


def test_inputs_inside_the_principal_subspace_are_projected_exactly(nations):
    model = make_model("ConvE", nations.training)
    selection = select_parameters(model, mode="names", names=["interaction.hr1d.0"])
    spec = ProjectionSpec(dim=32 * 40, principal_fraction=0.9)  # 32 x 40: 40 input dims, 36 of them principal
    triples = nations.training.mapped_triples[:4]  # at most 4 distinct inputs: rank <= 4 < 36
    computer = GradientComputer(model, selection, "bce")
    bases = fit_principal_bases(selection, spec, computer, triples)
    grads = computer.compute(triples)
    v = GradientProjector(selection, spec, checkpoint=0, bases=bases).project(grads)
    torch.testing.assert_close((v @ v.T).double(), grads.dot(grads), rtol=1e-4, atol=1e-8)


def test_missing_principal_directions_are_an_error(conve_grads):
    _, selection, _, grads = conve_grads
    with pytest.raises(InputError, match="principal directions"):
        GradientProjector(selection, ProjectionSpec(dim=256), checkpoint=0, bases={})


@pytest.mark.parametrize("model_name,mode,loss,dim", [("ConvE", "last", "bce", 64), ("DistMult", "all", "ce", 32)])
def test_projected_inner_products_are_unbiased(nations, model_name, mode, loss, dim):
    model = make_model(model_name, nations.training)
    selection = select_parameters(model, mode=mode)
    triples = nations.training.mapped_triples[:4]
    grads = GradientComputer(model, selection, loss).compute(triples)
    exact = grads.dot(grads)
    computer = GradientComputer(model, selection, loss)
    bases = fit_principal_bases(selection, ProjectionSpec(dim), computer, nations.training.mapped_triples[100:110])
    # average over independent seeds (fixed principal directions): the mean converges to the exact inner products
    estimates = torch.stack(
        [
            (lambda v: v @ v.T)(
                GradientProjector(selection, ProjectionSpec(dim, seed=s), checkpoint=0, bases=bases).project(grads)
            )
            for s in range(200)
        ]
    )
    error_of_mean = (estimates.mean(0) - exact).abs().max() / exact.abs().max()
    assert error_of_mean < 0.05
    assert (estimates.std(0) > 0).any()  # it really is random


def test_negative_dim_and_unknown_kind_are_refused():
    with pytest.raises(InputError, match="projection dim"):
        ProjectionSpec(-1)
    with pytest.raises(InputError, match="gaussian, rademacher"):
        ProjectionSpec(8, kind="sparse")
