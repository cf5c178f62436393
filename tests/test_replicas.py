"""Plain-torch replicas: the PyKEEN model's scores and gradients, and a query that never imports PyKEEN."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import make_model

from tracin_index.gradients.computer import GradientComputer
from tracin_index.gradients.selection import select_parameters
from tracin_index.index import GradientIndex
from tracin_index.kg.replicas import ConvEReplica, build_replica, replica_spec, shortcuts_for


@pytest.mark.parametrize("name,mode,pairs", [("ConvE", "last", False), ("ConvE", "last", True), ("ConvE", "all", False),
                                             ("DistMult", "last", False)])  # fmt: skip
def test_a_replica_scores_and_differentiates_like_the_pykeen_model(nations, name, mode, pairs):
    model = make_model(name, nations.training, dtype=torch.float64)
    replica = build_replica(replica_spec(model)).double()
    replica.load_state_dict(model.state_dict())
    batch = nations.training.mapped_triples[:40]
    repeated = torch.tensor([[h, r, t] for (h, r), t in zip(batch[:10, :2].tolist(), batch[10:20, 2].tolist())])
    batch = torch.cat([batch, repeated])  # ten (head, relation) pairs twice, with other tails
    # per_pair: the layers before the last Linear once per (head, relation) pair
    scores = replica.score_hrt(batch, per_pair=True) if pairs else replica.score_hrt(batch)
    torch.testing.assert_close(scores, model.score_hrt(batch), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(replica.score_t(batch[:, :2]), model.score_t(batch[:, :2]), rtol=1e-12, atol=1e-12)
    for loss in ("bce", "ce"):
        ours = GradientComputer(replica, select_parameters(replica, mode=mode), loss, per_pair=pairs).compute(batch).to_dense()
        theirs = GradientComputer(model, select_parameters(model, mode=mode), loss).compute(batch).to_dense()
        assert set(ours) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12, msg=key)


QUERY = """
import sys
from tracin_index.index import GradientIndex
index = GradientIndex.open(sys.argv[1])
result = index.query([[0, 0, 1]], top_k=3)[0]
print(type(index.run.model).__name__, "pykeen" in sys.modules, [p.train_index for p in result.proponents])
"""


def test_a_query_of_a_conve_index_never_imports_pykeen(tiny_run, tmp_path):
    out = tmp_path / "index"
    built = GradientIndex.build(out, model_path=tiny_run, sketch_dim=16)
    assert built.manifest["replica"]["model"] == "ConvE"
    expected = [p.train_index for p in built.query([[0, 0, 1]], top_k=3)[0].proponents]
    found = subprocess.run([sys.executable, "-c", QUERY, str(out)], capture_output=True, text=True, env=os.environ.copy())
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().split(maxsplit=2) == ["ConvEReplica", "False", str(expected)]


def test_a_replica_that_disagrees_is_not_used(tiny_run, tmp_path, monkeypatch):
    original = ConvEReplica.score_hrt
    monkeypatch.setattr(ConvEReplica, "score_hrt", lambda self, hrt, **kw: original(self, hrt, **kw) * 1.001)
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16)
    assert index.manifest["replica"] is None
    assert type(GradientIndex.open(tmp_path / "index").run.model).__name__ == "ConvE"


def test_linear_inputs_of_a_replica_computing_per_pair_come_in_row_order(nations):
    from tracin_index.gradients.inputs import linear_inputs

    model = make_model("ConvE", nations.training, dtype=torch.float64)
    replica = build_replica(replica_spec(model)).double()
    replica.load_state_dict(model.state_dict())
    shortcuts = shortcuts_for(replica, [("interaction.hr1d.0", ("weight", "bias"))], "bce", per_pair=True)
    assert shortcuts.per_pair
    rows = nations.training.mapped_triples[torch.randperm(200, generator=torch.Generator().manual_seed(3))]
    ours = linear_inputs(replica, {"fc": (replica.interaction.hr1d[0], True)}, rows, shortcuts=shortcuts)["fc"]
    theirs = linear_inputs(model, {"fc": (model.interaction.hr1d[0], True)}, rows)["fc"]
    assert len(torch.unique(rows[:, :2], dim=0)) < len(rows)  # pairs repeat, and torch.unique sorts them
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inverse", [False, True])
def test_closed_form_gradients_of_conve_match_the_per_triple_autograd_loop(nations, inverse):
    """ConvE's last two layers under bce come in closed form (no hooks, no backward pass): the same
    gradients as one autograd backward per triple through the PyKEEN model, every direction."""
    from pykeen.triples import TriplesFactory
    from reference import per_triple_gradients

    def closed_form_applies(model, selection, loss):
        shortcuts = GradientComputer(model, selection, loss).shortcuts
        return shortcuts is not None and shortcuts.closed_form

    training = TriplesFactory(nations.training.mapped_triples, nations.training.entity_to_id,
                              nations.training.relation_to_id, create_inverse_triples=inverse)  # fmt: skip
    model = make_model("ConvE", training, dtype=torch.float64)  # batch norm statistics randomised
    replica = build_replica(replica_spec(model)).double()
    replica.load_state_dict(model.state_dict())
    selection = select_parameters(replica, mode="last")
    assert closed_form_applies(replica, selection, "bce")
    assert not closed_form_applies(replica, selection, "ce")
    assert not closed_form_applies(replica, select_parameters(replica, mode="all"), "bce")
    computer = GradientComputer(replica, selection, "bce")
    batch = nations.training.mapped_triples[:20]
    repeated = torch.tensor([[h, r, t] for (h, r), t in zip(batch[:8, :2].tolist(), batch[8:16, 2].tolist())])
    batch = torch.cat([batch, repeated])  # eight (head, relation) pairs twice, with other tails
    for direction in ("train", "tail", "head", "both") if inverse else ("train",):
        ours = computer.compute(batch, direction).to_dense()
        theirs = per_triple_gradients(model, batch, selection.parameter_names, "bce", direction)
        assert set(ours) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-9, atol=1e-12, msg=f"{direction} {key}")
