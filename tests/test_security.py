"""Nothing in an index directory grants permission to unpickle: only the command line that loads the model does."""

import json

import pytest
import torch
from conftest import run_cli

from tracin_index.errors import PickleRefusedError
from tracin_index.index import GradientIndex
from tracin_index.kg.runs import load_model
from tracin_index.storage.layout import sha256_file


class _Payload:
    """Unpickling this runs code: it creates the marker file (as an attacker's os.system would run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def doctored_index(tiny_run, tmp_path):
    """An index built (with permission) from a pickled model, whose pickle was then swapped for one that runs
    code, with the manifest's digest updated and ``allow_pickle: true`` written into it, as an attacker would."""
    model_file = tmp_path / "model.pkl"
    torch.save(load_model(tiny_run).model, model_file)
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=model_file, allow_pickle=True, training_path=tiny_run / "train.tsv",
                        entity_to_id=tiny_run / "entity_to_id.tsv.gz", relation_to_id=tiny_run / "relation_to_id.tsv.gz",
                        sketch_dim=16)  # fmt: skip
    marker = tmp_path / "code-ran"
    torch.save(_Payload(marker), model_file)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["inputs"]["model"]["files"] = {model_file.name: sha256_file(model_file)}
    manifest["inputs"]["model"]["allow_pickle"] = True
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, marker


def test_no_command_unpickles_what_an_index_points_at_without_allow_pickle(doctored_index, capsys):
    out, marker = doctored_index
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 0, err
    code, _, err = run_cli(capsys, "self-influence", out, "--top-k", "3")
    assert code == 0, err
    code, _, err = run_cli(capsys, "query", out, "--triple", "brazil", "embassy", "uk")
    assert code == 2 and "--allow-pickle" in err and "Traceback" not in err
    assert not marker.exists()


def test_the_python_api_refuses_the_pickle_unless_the_caller_allows_it(doctored_index):
    out, marker = doctored_index
    index = GradientIndex.open(out)
    index.self_influence(top_k=3)
    assert index.verify() == []
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        index.query([[0, 0, 0]])
    assert not marker.exists()
    # the caller's own permission is what runs it: proof that the payload is live
    with pytest.raises(Exception):
        GradientIndex.open(out, allow_pickle=True).query([[0, 0, 0]])
    assert marker.exists()
