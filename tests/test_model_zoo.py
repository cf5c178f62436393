"""Every PyKEEN model: per-example gradients of the default selection equal one autograd backward per
triple, or the model (or loss) is refused before any work with the reason. The README's model table
is this test's outcome."""

import pytest
import torch
from reference import flat, per_triple_gradients

from tracin_index.errors import LossError, SelectionError
from tracin_index.gradients.computer import GradientComputer
from tracin_index.gradients.selection import select_parameters

EXACT, NOT_LINEAR, REFUSED = "exact", "ce refused: score not linear in the tail", "refused"

#: model -> (outcome under bce, outcome under ce, what "last" selects)
ZOO = {
    "ConvE": (EXACT, EXACT, "interaction.hr1d.0 + interaction.hr1d.2"),
    "ConvKB": (EXACT, EXACT, "interaction.conv + interaction.linear"),
    "ERMLP": (EXACT, "ce refused: hidden layer used outside its forward", "interaction.hidden + interaction.hidden_to_score"),
    "ERMLPE": (EXACT, EXACT, "interaction.mlp.5 + interaction.mlp.7"),
    "TuckER": (EXACT, EXACT, "interaction.head_batch_norm + interaction.head_relation_batch_norm"),
    "DistMult": (EXACT, EXACT, "embeddings"),
    "ComplEx": (EXACT, EXACT, "embeddings"),
    "RESCAL": (EXACT, EXACT, "embeddings"),
    "TransE": (EXACT, NOT_LINEAR, "embeddings"),
    "RotatE": (EXACT, NOT_LINEAR, "embeddings"),
    "TransH": (EXACT, NOT_LINEAR, "embeddings"),
    "TransR": (EXACT, NOT_LINEAR, "embeddings"),
    "HolE": (EXACT, NOT_LINEAR, "embeddings"),
    "SimplE": (EXACT, NOT_LINEAR, "embeddings"),
    "QuatE": (EXACT, NOT_LINEAR, "embeddings"),
    "MuRE": (EXACT, NOT_LINEAR, "embeddings"),
    "PairRE": (EXACT, NOT_LINEAR, "embeddings"),
    "BoxE": (EXACT, NOT_LINEAR, "embeddings"),
    "NTN": (EXACT, NOT_LINEAR, "embeddings"),
    "ProjE": (EXACT, NOT_LINEAR, "embeddings (interaction passed over)"),
    "CrossE": (EXACT, NOT_LINEAR, "embeddings (interaction passed over)"),
    "RGCN": (REFUSED, REFUSED, "-"),
    "CompGCN": (REFUSED, REFUSED, "-"),
    "NodePiece": (REFUSED, REFUSED, "-"),
}


def make(name, training):
    from pykeen.models import model_resolver
    from pykeen.triples import TriplesFactory

    if name in ("CompGCN", "NodePiece"):  # they need inverse triples to be built at all
        training = TriplesFactory(training.mapped_triples, training.entity_to_id, training.relation_to_id,
                                  create_inverse_triples=True)  # fmt: skip
    kwargs = {"ConvE": dict(embedding_dim=32, output_channels=4)}.get(name, dict(embedding_dim=8))
    if name == "RGCN":
        kwargs = dict(embedding_dim=8)
    return model_resolver.make(name, kwargs, triples_factory=training, random_seed=1).eval()


@pytest.mark.parametrize("loss", ["bce", "ce"])
@pytest.mark.parametrize("name", list(ZOO))
def test_the_default_selection_is_exact_or_refused(nations, name, loss):
    expected = ZOO[name][0 if loss == "bce" else 1]
    model = make(name, nations.training)
    if expected == REFUSED:
        with pytest.raises(SelectionError, match="not supported"):
            select_parameters(model, mode="last")
        return
    model = model.double()
    selection = select_parameters(model, mode="last")
    batch = nations.training.mapped_triples[:6]
    if expected != EXACT:
        with pytest.raises(LossError, match="linear in the tail" if expected == NOT_LINEAR else "outside its module"):
            computer = GradientComputer(model, selection, loss)
            computer.check(batch)
        return
    computer = GradientComputer(model, selection, loss)
    computer.check(batch)
    found = flat(computer.compute(batch).to_dense())
    reference = flat(per_triple_gradients(model, batch, selection.parameter_names, loss))
    torch.testing.assert_close(found, reference, rtol=1e-7, atol=1e-12 * float(reference.abs().max()))
