"""Labels, paths and messages are data: every command prints them as written, never as markup."""

import random

import pytest
from conftest import run_cli

#: Labels that rich would read as markup (or that other printers mangle), and plain text of other scripts.
ENTITIES = ["foo[/x]", "[bold]bar", "[red]x[/red]", "back\\slash", "\\[escaped]", '"quoted"', "it's",
            "<script>alert(1)</script>", "naïve café", "עברית", "plain", "[/]"]  # fmt: skip
RELATIONS = ["[bold]rel", "[link=http://x]r[/link]", "rel]"]


@pytest.fixture(scope="module")
def bracket_run(tmp_path_factory):
    """A DistMult trained by `tracin-index train` on a graph whose labels look like markup."""
    folder = tmp_path_factory.mktemp("brackets")
    rng = random.Random(0)
    triples = {(h, r, t) for h in ENTITIES for r in RELATIONS for t in ENTITIES if h != t and rng.random() < 0.25}
    lines = [f"{h}\t{r}\t{t}\n" for h, r, t in sorted(triples)]
    (folder / "train.tsv").write_text("".join(lines), encoding="utf-8")
    (folder / "test.tsv").write_text(f"{ENTITIES[0]}\t{RELATIONS[0]}\t{ENTITIES[2]}\n", encoding="utf-8")
    return folder, folder / "run"


@pytest.fixture(scope="module")
def trained(bracket_run):
    folder, run = bracket_run
    from tracin_index.cli import main

    try:
        main(["train", "--out", str(run), "--train", str(folder / "train.tsv"), "--test", str(folder / "test.tsv"),
              "--model", "DistMult", "--embedding-dim", "8", "--epochs", "2", "--checkpoint-every", "1"])  # fmt: skip
    except SystemExit as exit_:
        assert not exit_.code
    return folder, run


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # tables must not wrap the labels they print


def test_exact_prints_markup_like_labels_as_written(trained, capsys):
    folder, run = trained
    code, out, err = run_cli(capsys, "exact", "--model-path", run, "--test-indices", "0", "--top-k", "1000",
                             "--use-last-layers-only")  # fmt: skip
    assert code == 0, err
    assert f"({ENTITIES[0]}, {RELATIONS[0]}, {ENTITIES[2]})" in out  # the test triple in the table titles
    listed = [label for label in ENTITIES + RELATIONS if label in out]
    assert len(listed) >= len(ENTITIES + RELATIONS) - 2, f"labels missing from the tables: {set(ENTITIES + RELATIONS) - set(listed)}"
    assert "bar" not in out.replace("[bold]bar", "")  # never printed without its brackets


def test_index_commands_print_markup_like_labels_as_written(trained, tmp_path, capsys):
    folder, run = trained
    index = tmp_path / "idx"
    code, _, err = run_cli(capsys, "build", "--out", index, "--model-path", run)
    assert code == 0, err
    code, out, err = run_cli(capsys, "query", index, "--triple", ENTITIES[0], RELATIONS[0], ENTITIES[2], "--top-k", "1000")
    assert code == 0, err
    assert f"({ENTITIES[0]}, {RELATIONS[0]}, {ENTITIES[2]})" in out
    assert sum(label in out for label in ENTITIES + RELATIONS) >= len(ENTITIES + RELATIONS) - 2
    code, out, err = run_cli(capsys, "self-influence", index, "--top-k", "1000")
    assert code == 0, err
    assert all(label in out for label in ENTITIES + RELATIONS)  # every training triple is listed


def test_an_unknown_markup_like_label_is_named_as_written(trained, tmp_path, capsys):
    folder, run = trained
    code, _, err = run_cli(capsys, "exact", "--model-path", run, "--test", folder / "missing[/x].tsv")
    assert code == 2
    assert "missing[/x].tsv" in err and "Traceback" not in err
    index = tmp_path / "idx"
    assert run_cli(capsys, "build", "--out", index, "--model-path", run)[0] == 0
    code, _, err = run_cli(capsys, "query", index, "--triple", "foo[/y]", RELATIONS[0], ENTITIES[2])
    assert code == 2
    assert "'foo[/y]'" in err and "'foo[/x]'" in err  # the label given and its closest match, brackets and all
    assert err.count("\n") == 1


def test_the_api_returns_markup_like_labels_as_written(trained, tmp_path):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from tracin_index.index import GradientIndex
    from tracin_index.serve.app import create_app

    _, run = trained
    index = GradientIndex.build(tmp_path / "idx", model_path=run)
    client = TestClient(create_app(index), raise_server_exceptions=False)
    assert sorted(client.get("/api/entities", params={"limit": 100}).json()) == sorted(ENTITIES)
    answer = client.get("/api/query", params={"head": ENTITIES[0], "relation": RELATIONS[1], "tail": ENTITIES[7], "top_k": 1000})
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    assert result["test_triple"] == {"head": ENTITIES[0], "relation": RELATIONS[1], "tail": ENTITIES[7]}
    listed = {label for item in result["proponents"] + result["opponents"] for label in (item["head"], item["relation"], item["tail"])}
    assert listed <= set(ENTITIES + RELATIONS) and len(listed) >= len(ENTITIES + RELATIONS) - 2
    unknown = client.get("/api/query", params={"head": "foo[/y]", "relation": RELATIONS[0], "tail": ENTITIES[2]})
    assert unknown.status_code == 422 and "'foo[/y]'" in unknown.json()["error"] and "\n" not in unknown.json()["error"]


def test_a_tab_inside_quotes_is_a_field_separator_named_with_its_line(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text('a\tr\tb\n"x\ty"\tr\tb\nb\tr\ta\n', encoding="utf-8")  # TSV has no quoting, as in PyKEEN
    code, _, err = run_cli(capsys, "train", "--train", train, "--out", tmp_path / "run", "--model", "DistMult")
    assert code == 2 and err.strip() == (f"error: {train}:2: expected 3 tab-separated fields (head, relation, tail), "
                                         "found 4: '\"x\\ty\"\\tr\\tb'")  # fmt: skip
