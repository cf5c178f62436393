"""Parameter selection: last N layers by execution order, names (new and old), all, embedding fallback."""

import pytest
from conftest import make_model

from tracin_index.errors import SelectionError
from tracin_index.gradients.selection import select_parameters, split_names


def test_last_two_layers_of_conve_are_final_linear_and_batch_norm(nations):
    selection = select_parameters(make_model("ConvE", nations.training))
    assert [m.name for m in selection.modules] == ["interaction.hr1d.0", "interaction.hr1d.2"]
    assert [m.kind for m in selection.modules] == ["linear", "dense"]
    assert selection.parameter_names == [
        "interaction.hr1d.0.weight",
        "interaction.hr1d.0.bias",
        "interaction.hr1d.2.weight",
        "interaction.hr1d.2.bias",
    ]


def test_last_layers_follow_execution_order_not_definition_order(nations):
    selection = select_parameters(make_model("ConvE", nations.training), num_last_layers=4)
    assert [m.name for m in selection.modules] == [
        "interaction.hr2d.2",
        "interaction.hr2d.3",
        "interaction.hr1d.0",
        "interaction.hr1d.2",
    ]


@pytest.mark.parametrize(
    "names,expected",
    [
        (["interaction.linear", "interaction.bn2"], ["interaction.hr1d.0", "interaction.hr1d.2"]),
        (["interaction.linear.*", "interaction.bn2.*"], ["interaction.hr1d.0", "interaction.hr1d.2"]),
        (["interaction.hr1d.0.weight"], ["interaction.hr1d.0"]),
        (["interaction.hr1d.2"], ["interaction.hr1d.2"]),
    ],
)
def test_names_accept_pykeen_1_11_and_older_conve_names(nations, names, expected):
    selection = select_parameters(make_model("ConvE", nations.training), mode="names", names=names)
    assert [m.name for m in selection.modules] == expected


def test_a_weight_name_selects_only_the_weight(nations):
    selection = select_parameters(make_model("ConvE", nations.training), mode="names", names=["interaction.linear.weight"])
    assert selection.parameter_names == ["interaction.hr1d.0.weight"]


def test_unknown_name_lists_the_valid_ones(nations):
    with pytest.raises(SelectionError) as error:
        select_parameters(make_model("ConvE", nations.training), mode="names", names=["interaction.nope"])
    message = str(error.value)
    assert "interaction.nope" in message and "interaction.hr1d.0" in message and "\n" not in message


def test_all_selects_every_parameter(nations):
    model = make_model("ConvE", nations.training)
    selection = select_parameters(model, mode="all")
    assert sorted(selection.parameter_names) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("model_name", ["TransE", "DistMult", "ComplEx", "RotatE"])
def test_embedding_only_models_fall_back_to_embeddings_and_say_so(nations, model_name):
    selection = select_parameters(make_model(model_name, nations.training))
    assert selection.embedding_fallback
    assert all(m.kind == "embedding" for m in selection.modules)
    assert "no layers besides" in selection.describe()


def test_split_names_accepts_spaces_commas_and_repeats():
    assert split_names(["a b", "c,d", "e"]) == ["a", "b", "c", "d", "e"]
