"""An index larger than the query's memory budget, read from its files in passes: the same exact
answers as the index held in memory, and as the per-triple autograd reference."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_index import NUM_TEST, assert_matches, brute_force, embedding_run, run_ids

from tracin_index.cli import parse_size
from tracin_index.errors import InputError
from tracin_index.index import GradientIndex
from tracin_index.kg.runs import load_model
from tracin_index.storage.reader import IndexFiles


@pytest.fixture(scope="module")
def conve_index(tiny_run, tmp_path_factory):
    """The tiny ConvE (trained with inverse triples) indexed with a 16-direction sketch, held in memory."""
    return GradientIndex.build(tmp_path_factory.mktemp("passes") / "index", model_path=tiny_run, sketch_dim=16)


@pytest.fixture(scope="module")
def conve_reference(tiny_run, tiny_train_gradients):
    """The autograd reference's scores of the first test triples, both losses (as in test_index)."""
    return {loss: brute_force(tiny_run, loss, train_gradients=tiny_train_gradients(loss)) for loss in ("bce", "ce")}


def assert_same_answers(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        for x, y in ((a.proponents, b.proponents), (a.opponents, b.opponents)):
            assert [i.train_index for i in x] == [i.train_index for i in y]
            assert [i.influence for i in x] == pytest.approx([i.influence for i in y], rel=1e-6)  # float32 rescoring
        assert (a.num_proponents, a.num_opponents, a.counts_exact) == (b.num_proponents, b.num_opponents, b.counts_exact)


@pytest.mark.parametrize("share,ranges", [(1.5, 3), (3.9, 2)])
@pytest.mark.parametrize("direction,normalize", [("tail", False), ("both", True), ("head", False)])
def test_an_index_over_its_budget_is_read_in_passes_with_the_answers_held_in_memory(conve_index, tiny_run, direction,
                                                                                    normalize, share, ranges):  # fmt: skip
    arrays = conve_index.files.arrays_bytes()
    streamed = GradientIndex.open(conve_index.directory, device="cpu", max_memory=int(share * arrays))
    assert conve_index.passes is None and len(streamed.passes.ranges) == ranges
    _, _, test = run_ids(tiny_run)
    ours = streamed.query(test[:NUM_TEST], top_k=10, direction=direction, normalize=normalize)
    theirs = conve_index.query(test[:NUM_TEST], top_k=10, direction=direction, normalize=normalize)
    assert_same_answers(ours, theirs)
    # one pass over the files per part of the test triples that the budget holds the candidates of
    assert streamed.engine.search.passes == -(-NUM_TEST // streamed.passes.tests)
    assert len(streamed.last_query.rescored) == NUM_TEST


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_answers_read_in_passes_are_exact_tracin(tiny_run, tmp_path, conve_reference, loss):
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, loss=loss, sketch_dim=16)
    streamed = GradientIndex.open(index.directory, device="cpu", max_memory=2 * index.files.arrays_bytes())
    assert streamed.passes is not None
    _, _, test = run_ids(tiny_run)
    assert_matches(streamed.query(test[:NUM_TEST], top_k=10), conve_reference[loss])


def test_candidates_beyond_those_a_range_sends_are_read_from_their_files(conve_index, tiny_run):
    streamed = GradientIndex.open(conve_index.directory, device="cpu", max_memory=2 * conve_index.files.arrays_bytes())
    streamed.engine.search.ship = 2  # each range keeps 2 candidates' factors per side: refining reads the others
    _, _, test = run_ids(tiny_run)
    ours = streamed.query(test[:NUM_TEST], top_k=10)
    assert max(streamed.last_query.fetched) > 0
    assert_same_answers(ours, conve_index.query(test[:NUM_TEST], top_k=10))


def test_stored_rows_read_from_their_files_are_those_loaded_whole(conve_index):
    files = IndexFiles.open(conve_index.directory)
    rows = np.array([0, 1, 5, 700, 1500, 2 * files.num_triples - 1])
    for c in range(len(files.checkpoints)):
        whole = files.factor_arrays(c)
        read = files.stored_rows(c, rows)
        assert read and not any(key.startswith("interaction.hr1d.0/in/") for key in read)
        for key, value in read.items():
            assert torch.equal(value, whole.arrays[key][torch.as_tensor(rows)]), key


def test_ranges_loaded_apart_hold_the_rows_and_groups_of_the_whole(conve_index):
    files = IndexFiles.open(conve_index.directory)
    whole = files.factor_arrays(0)
    n = files.num_triples
    for facts in ((0, n // 3), (n // 3, n - 1), (n - 1, n)):
        part = files.factor_arrays(0, facts)
        rows = slice(2 * facts[0], 2 * facts[1])  # two stored rows (examples) per triple: inverse triples
        for key, value in part.arrays.items():
            if key.startswith("interaction.hr1d.0/in/"):  # per (head, relation) group: the groups of these rows
                groups = whole.groups["interaction.hr1d.0"][rows]
                assert torch.equal(value[part.groups["interaction.hr1d.0"]], whole.arrays[key][groups]), key
            else:
                assert torch.equal(value, whole.arrays[key][rows]), key


def test_parameters_stored_apart_load_side_by_side_as_the_files_hold_them(conve_index):
    """The batch norm's two parameters, stored apart, are read into one array side by side (a batch's
    products over them are one matrix product): each part a view of its columns, as the files hold it."""
    import h5py

    files = IndexFiles.open(conve_index.directory)
    prefix = "interaction.hr1d.2/values"
    shards = sorted((s for s in files.manifest["shards"] if s["checkpoint"] == 0), key=lambda s: s["row_start"])
    with_files = {}
    for shard in shards:
        with h5py.File(files.directory / shard["file"], "r") as f:
            for i in (0, 1):
                with_files.setdefault(i, []).append(f[f"{prefix}/values{i}"][...])
    for facts in (None, (3, files.num_triples // 2)):
        arrays = files.factor_arrays(0, facts)
        rows = slice(None) if facts is None else slice(2 * facts[0], 2 * facts[1])
        whole = arrays.joined[f"{prefix}/values0+{prefix}/values1"]
        width = whole.shape[1] // 2  # the batch norm's weight and bias, one number per feature each
        for i in (0, 1):
            expected = torch.from_numpy(np.concatenate(with_files[i])[rows])
            assert torch.equal(arrays.arrays[f"{prefix}/values{i}"], expected)
            assert torch.equal(whole[:, width * i : width * (i + 1)], expected)
        moved = arrays.to("cpu")  # still one array: no second copy
        assert moved.arrays[f"{prefix}/values1"].data_ptr() == whole.data_ptr() + width * whole.element_size()
        queries = torch.randn(5, 2 * width)
        queries /= queries.abs().amax(1, keepdim=True)
        product = moved.products((f"{prefix}/values0", f"{prefix}/values1"), queries)
        assert product.float() == pytest.approx((queries @ whole.float().T), abs=1e-2 * (2 * width) ** 0.5)


def test_a_pass_holds_what_its_plan_makes_room_for(conve_index):
    from tracin_index.search.passes import HELD_SHARE, pass_bytes, plan_passes

    files = IndexFiles.open(conve_index.directory)
    arrays = files.arrays_bytes()
    for budget in (arrays, 2 * arrays, 3.9 * arrays, 50 * arrays, 1000 * arrays):
        plan = plan_passes(files, int(budget))
        assert plan.streamed == (arrays > HELD_SHARE * budget)
        if not plan.streamed:
            continue
        assert all(b - a <= -(-files.num_triples // len(plan.ranges)) for a, b in plan.ranges)
        fixed, per_test = pass_bytes(files, plan.ranges)
        assert plan.tests == 1 or fixed + plan.tests * per_test <= budget < fixed + (plan.tests + 1) * per_test


@pytest.mark.parametrize("name", ["DistMult"])
def test_embedding_models_read_in_passes_are_exact(nations, tmp_path, name):
    run = embedding_run(nations, tmp_path, name)
    names = [n for n, _ in load_model(run).model.named_parameters()]
    index = GradientIndex.build(tmp_path / "index", model_path=run)
    streamed = GradientIndex.open(index.directory, device="cpu", max_memory=2 * index.files.arrays_bytes())
    assert streamed.passes is not None
    _, _, test = run_ids(run)
    ours = streamed.query(test[:NUM_TEST], top_k=10)
    assert_matches(ours, brute_force(run, "bce", names))
    for a, b in zip(ours, index.query(test[:NUM_TEST], top_k=10), strict=True):  # DistMult has exact ties: same scores
        for x, y in ((a.proponents, b.proponents), (a.opponents, b.opponents)):
            assert [i.influence for i in x] == pytest.approx([i.influence for i in y], rel=1e-6)


def test_approximate_and_fewer_candidates_are_refused_in_passes_saying_why(conve_index, tiny_run):
    streamed = GradientIndex.open(conve_index.directory, device="cpu", max_memory=2 * conve_index.files.arrays_bytes())
    _, _, test = run_ids(tiny_run)
    for options in ({"approximate": True}, {"candidates": 20}):
        with pytest.raises(InputError, match="scanned from its files in passes.*--max-memory"):
            streamed.query(test[:1], **options)


def test_the_command_line_takes_a_memory_budget_and_says_when_it_reads_in_passes(conve_index, tiny_run, tmp_path, capsys):
    run = load_model(tiny_run)
    arrays = conve_index.files.arrays_bytes()
    outputs = {}
    for budget in (None, f"{2 * arrays / 2**10:.0f}K"):
        out = tmp_path / f"{budget}.json"
        args = ["query", conve_index.directory, "--test", run.test_path, "--test-indices", "0", "--test-indices", "3",
                "--output", out, "--device", "cpu"] + ([] if budget is None else ["--max-memory", budget])  # fmt: skip
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
        assert ("scanned from its files in" in err) == (budget is not None)
        outputs[budget] = json.loads(out.read_text())
    first, second = outputs.values()
    assert first["config"] == second["config"] and len(first["results"]) == len(second["results"]) == 2
    for a, b in zip(first["results"], second["results"]):
        for side in ("proponents", "opponents"):
            assert [i["train_index"] for i in a[side]] == [i["train_index"] for i in b[side]]
            # float32 rescoring of gradients computed in other batches: the last bits may differ
            assert [i["influence"] for i in a[side]] == pytest.approx([i["influence"] for i in b[side]], rel=1e-6)
    code, _, err = run_cli(capsys, "query", conve_index.directory, "--test", run.test_path, "--max-memory", "lots")
    assert code == 2 and "--max-memory 'lots': not a size" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_sizes_are_read_as_people_write_them():
    assert parse_size("4G", "--m") == 4 * 2**30
    assert parse_size("500M", "--m") == 500 * 2**20
    assert parse_size("1.5GiB", "--m") == int(1.5 * 2**30)
    assert parse_size("4000MB", "--m") == 4 * 10**9
    assert parse_size("1048576", "--m") == 2**20
    for bad in ("", "-1G", "0", "4X", "G", "1e9"):
        with pytest.raises(InputError, match="not a size"):
            parse_size(bad, "--m")
