"""GradientIndex: exact TracIn from stored factors, checked against a per-triple autograd loop;
bounds that hold; trustworthy storage; refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import run_cli
from reference import flat, per_triple_gradients

from tracin_index.errors import InputError, TracInWarning
from tracin_index.index import GradientIndex
from tracin_index.kg.runs import ModelConfig, load_model, save_run_directory
from tracin_index.kg.triples import IdMaps, read_labeled_triples
from tracin_index.search.refine import refinable
from tracin_index.storage.layout import exclusive_lock

NUM_TEST = 6


def run_ids(run_dir):
    run = load_model(run_dir)
    train = run.id_maps.to_ids(read_labeled_triples(run.training_path))
    test = run.id_maps.to_ids(read_labeled_triples(run.test_path))
    return run, train, test


def training_gradients(run_dir, loss: str, parameter_names=None) -> list[tuple[float, torch.Tensor]]:
    """Per checkpoint: its learning rate and every training triple's gradient (as trained), flat, float64,
    from one autograd backward per triple (independent of the package)."""
    run, train, _ = run_ids(run_dir)
    model = run.model.double()
    names = parameter_names or [n for n in dict(model.named_parameters()) if n.startswith("interaction.hr1d")]
    out = []
    for checkpoint in run.checkpoints:
        state = torch.load(checkpoint.path, weights_only=True)["model_state_dict"]
        model.load_state_dict({k: v.double() for k, v in state.items()})
        out.append((checkpoint.learning_rate, flat(per_triple_gradients(model, train, names, loss))))
    return out


def brute_force(run_dir, loss: str, parameter_names=None, direction: str = "tail", num_test: int = NUM_TEST,
                train_gradients=None) -> torch.Tensor:  # fmt: skip
    """sum_c lr_c <g(train), g(test)> from one autograd backward per triple, float64 (independent of the package)."""
    run, _, test = run_ids(run_dir)
    model = run.model.double()
    names = parameter_names or [n for n in dict(model.named_parameters()) if n.startswith("interaction.hr1d")]
    train_gradients = train_gradients or training_gradients(run_dir, loss, parameter_names)
    scores = torch.zeros(num_test, train_gradients[0][1].shape[0], dtype=torch.float64)
    for checkpoint, (lr, g_train) in zip(run.checkpoints, train_gradients):
        state = torch.load(checkpoint.path, weights_only=True)["model_state_dict"]
        model.load_state_dict({k: v.double() for k, v in state.items()})
        g_test = flat(per_triple_gradients(model, test[:num_test], names, loss, direction))
        scores += lr * g_test @ g_train.T
    return scores


def expected_rows(scores: torch.Tensor, k: int, sign: int) -> list[int]:
    """The k rows of largest positive (sign +1) or most negative (-1) score, ties by row."""
    s = (scores * sign).numpy()
    rows = [r for r in np.lexsort((np.arange(len(s)), -s)) if s[r] > 0]
    return [int(r) for r in rows[:k]]


@pytest.fixture(scope="module")
def conve_reference(tiny_run, tiny_train_gradients):
    return {loss: brute_force(tiny_run, loss, train_gradients=tiny_train_gradients(loss)) for loss in ("bce", "ce")}


def assert_matches(results, reference, k=10):
    """Each list is the exact top k: at every rank, the row listed has the reference's score of that rank
    (the same row, or one tied with it: symmetric models such as DistMult have exact ties), and its
    printed influence is its reference score."""
    for t, result in enumerate(results):
        for items, sign in ((result.proponents, +1), (result.opponents, -1)):
            expected = expected_rows(reference[t], k, sign)
            assert len(items) == len(expected) and len({i.train_index for i in items}) == len(items)
            for item, row in zip(items, expected):
                score = float(reference[t, item.train_index])
                assert item.influence == pytest.approx(score, rel=1e-4, abs=1e-9)
                assert score == pytest.approx(float(reference[t, row]), rel=1e-6, abs=1e-12)
        if result.counts_exact:
            assert result.num_proponents == int((reference[t] > 0).sum())
            assert result.num_opponents == int((reference[t] < 0).sum())
        else:  # counted from estimates where the bounds leave the sign open: close, and said to be
            assert abs(result.num_proponents - int((reference[t] > 0).sum())) <= 0.02 * len(reference[t])


def assert_bounds_hold(index, test, reference):
    """The scan's bounds hold for every row, and so do the refined ones (Linear inputs recomputed),
    which are tighter where an input side is sketched."""
    grads = index.test_gradients(test[:NUM_TEST])
    rows = np.arange(index.num_triples)
    # a batched scan (each stored array's products for all test triples in one matrix product) bounds alike
    for t, (value, error) in enumerate(index.engine.batch_estimates(grads, list(range(NUM_TEST)))):
        assert bool(((value - reference[t]).abs() <= error).all())
    for t in range(NUM_TEST):
        value, error = index.estimates(grads, t)
        assert bool(((value - reference[t]).abs() <= error).all())
        if not refinable(index.plans):
            continue
        refined, refined_error = index.estimates(grads, t, rows=rows)
        assert bool(((refined - reference[t]).abs() <= refined_error).all())
        assert float(refined_error.sum()) < 0.5 * float(error.sum())


@pytest.mark.parametrize("share_pairs", [True, False], ids=["pairs-shared", "per-row"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_conve_queries_are_exact_tracin_from_sketched_factors(tiny_run, tmp_path, conve_reference, loss, share_pairs):
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, loss=loss, sketch_dim=16, share_pairs=share_pairs)
    linear, batch_norm = index.plans
    assert linear.grouped == share_pairs and linear.sketch[1] == 16 and linear.derived == (batch_norm.name, 1)
    _, _, test = run_ids(tiny_run)
    assert_bounds_hold(index, test, conve_reference[loss])
    assert_matches(index.query(test[:NUM_TEST], top_k=10), conve_reference[loss])
    # fewer candidates than the bounds leave: still exact values, and the lists agree here
    assert_matches(index.query(test[:NUM_TEST], top_k=5, candidates=200), conve_reference[loss], k=5)


def test_scans_of_arrays_packed_for_fbgemm_stay_within_their_bounds(tiny_run, tmp_path, conve_reference, monkeypatch):
    import tracin_index.storage.arrays as arrays

    if not arrays._fbgemm_available():
        pytest.skip("this torch has no fbgemm")
    monkeypatch.setattr(arrays, "PACK_MIN_ROWS", 1)  # the tiny index's arrays too
    monkeypatch.setattr(arrays, "PACK_MIN_WIDTH", 1)  # (its input side's 16 directions included)
    GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16)
    index = GradientIndex.open(tmp_path / "index", pack=True)
    _, _, test = run_ids(tiny_run)
    assert_bounds_hold(index, test, conve_reference["bce"])
    # the batch norm's two parts packed side by side (one pass for its own and the derived side's queries)
    assert sorted(index.factor_arrays(0).packed) == ["interaction.hr1d.0/in/basis", "interaction.hr1d.0/in/values",
                                              "interaction.hr1d.2/values/values0+interaction.hr1d.2/values/values1"]  # fmt: skip
    assert_matches(index.query(test[:NUM_TEST], top_k=10), conve_reference["bce"])
    unpacked = GradientIndex.open(tmp_path / "index", pack=False)
    unpacked.query(test[:NUM_TEST], top_k=10)
    assert not unpacked.factor_arrays(0).packed
    # without the memory for the packed copies: scanned unpacked, said once, still exact (single test triples:
    # packing serves them; a batch's products and sketches are matrix products, unpacked)
    monkeypatch.setattr(arrays, "available_memory", lambda: 2**10)
    short = GradientIndex.open(tmp_path / "index", pack=True)
    with pytest.warns(TracInWarning, match="not packing"):
        assert_matches([short.query(test[t : t + 1], top_k=10)[0] for t in range(NUM_TEST)], conve_reference["bce"])
    assert not short.factor_arrays(0).packed


def test_approximate_scores_are_within_their_bounds_and_said_to_be(tiny_run, tmp_path, conve_reference, capsys):
    out = tmp_path / "index"
    index = GradientIndex.build(out, model_path=tiny_run, sketch_dim=16)
    _, _, test = run_ids(tiny_run)
    (result,) = index.query(test[:1], approximate=True)
    value, error = index.estimates(index.test_gradients(test[:1]), 0)
    for item in result.proponents + result.opponents:
        assert abs(item.influence - float(conve_reference["bce"][0, item.train_index])) <= float(error[item.train_index])
    output = tmp_path / "q.json"
    assert run_cli(capsys, "query", out, "--test", tiny_run / "test.tsv", "--test-indices", "0", "--approximate",
                   "--output", output)[0] == 0  # fmt: skip
    assert json.loads(output.read_text())["config"]["scores"] == "approximate"


def embedding_run(nations, tmp_path, name: str):
    """A run directory of a randomly initialised embedding model with two checkpoints."""
    from pykeen.models import model_resolver

    training = nations.training
    model = model_resolver.make(name, dict(embedding_dim=8), triples_factory=training, random_seed=3)
    run = tmp_path / f"run-{name}"
    labels = training.label_triples(training.mapped_triples)
    save_run_directory(run, model=model, config=ModelConfig(name, {"embedding_dim": 8}, training.num_entities,
                                                           training.real_num_relations),
                       id_maps=IdMaps.from_triples_factory(training), training=labels,
                       testing=nations.testing.label_triples(nations.testing.mapped_triples))  # fmt: skip
    (run / "checkpoints").mkdir()
    for epoch, lr in ((1, 0.1), (2, 0.05)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"model_state_dict": state, "learning_rate": lr, "epoch": epoch}, run / "checkpoints" / f"e{epoch}.pt")
    return run


@pytest.mark.parametrize("name,loss", [("ComplEx", "bce"), ("DistMult", "bce"), ("DistMult", "ce")])
def test_embedding_models_keep_their_sparse_rows_and_are_exact(nations, tmp_path, name, loss):
    run = embedding_run(nations, tmp_path, name)
    model = load_model(run).model
    names = [n for n, _ in model.named_parameters()]
    reference = brute_force(run, loss, names)
    index = GradientIndex.build(tmp_path / "index", model_path=run, loss=loss)
    kinds = {p.kind for p in index.plans}
    assert kinds == ({"rows"} if loss == "bce" else {"opaque", "rows"})
    _, _, test = run_ids(run)
    assert_bounds_hold(index, test, reference)
    assert_matches(index.query(test[:NUM_TEST], top_k=10), reference)
    if loss == "bce":  # rows that share no entity or relation with the test triple meet it nowhere: exactly 0
        value, error = index.estimates(index.test_gradients(test[:1]), 0)
        h, r, t = test[0].tolist()
        apart = ~np.isin(index.hrt[:, 0], [h, t]) & ~np.isin(index.hrt[:, 2], [h, t]) & (index.hrt[:, 1] != r)
        assert apart.any() and (value[apart] == 0).all() and (error[apart] == 0).all()


def test_linear_layers_that_store_their_own_output_sides_are_scanned_within_their_bounds(nations, tmp_path):
    """ERMLP's last Linear layers have no batch norm to derive an output side from: each stores its own."""
    run = embedding_run(nations, tmp_path, "ERMLP")
    names = ["interaction.hidden.weight", "interaction.hidden.bias", "interaction.hidden_to_score.weight",
             "interaction.hidden_to_score.bias"]  # fmt: skip
    reference = brute_force(run, "bce", names)
    index = GradientIndex.build(tmp_path / "index", model_path=run)
    assert [(p.kind, p.derived, p.sketch[0]) for p in index.plans] == [("factored", None, 0)] * 2
    _, _, test = run_ids(run)
    assert_bounds_hold(index, test, reference)
    assert_matches(index.query(test[:NUM_TEST], top_k=10), reference)


def test_a_batch_norm_with_its_bias_alone_selected_derives_the_output_side_from_it(tiny_run, tmp_path):
    """One parameter of the batch norm selected: its values stored whole (not per parameter), and the
    Linear's output side still derived from them."""
    names = ["interaction.hr1d.0.weight", "interaction.hr1d.0.bias", "interaction.hr1d.2.bias"]
    reference = brute_force(tiny_run, "bce", names)
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, selection="names", sketch_dim=16,
                                layer_names=("interaction.hr1d.0", "interaction.hr1d.2.bias"))  # fmt: skip
    assert index.plans[0].derived == (index.plans[1].name, 0) and index.plans[1].sizes == (32,)
    _, _, test = run_ids(tiny_run)
    assert_bounds_hold(index, test, reference)
    assert_matches(index.query(test[:NUM_TEST], top_k=10), reference)


def test_self_influence_equals_the_squared_gradient_norms(tiny_run, tmp_path):
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16)
    run, train, _ = run_ids(tiny_run)
    model = run.model.double()
    names = [n for n in dict(model.named_parameters()) if n.startswith("interaction.hr1d")]
    expected = np.zeros(200)
    for checkpoint in run.checkpoints:
        state = torch.load(checkpoint.path, weights_only=True)["model_state_dict"]
        model.load_state_dict({k: v.double() for k, v in state.items()})
        expected += checkpoint.learning_rate * (flat(per_triple_gradients(model, train[:200], names, "bce")) ** 2).sum(1).numpy()
    found = index.self_influences()
    np.testing.assert_allclose(found[:200], expected, rtol=1e-5)
    top = index.self_influence(top_k=3)
    assert [t.train_index for t in top] == list(np.lexsort((np.arange(len(found)), -found))[:3])


def test_the_size_estimate_printed_before_the_build_is_within_ten_percent(conve_run, tmp_path):
    messages = []
    index = GradientIndex.build(tmp_path / "index", model_path=conve_run, log=messages.append)
    (estimate,) = [m for m in messages if "bytes per triple and checkpoint" in m]
    estimated = float(estimate.split("(")[-1].split(" bytes")[0].replace(",", ""))
    actual = sum(p.stat().st_size for p in (tmp_path / "index").rglob("*") if p.is_file())
    per_row = actual / (index.num_triples * index.num_checkpoints)
    assert abs(estimated - per_row) <= 0.1 * per_row


BUILD_SCRIPT = """
import sys
from tracin_index.index import GradientIndex
GradientIndex.build(sys.argv[1], model_path=sys.argv[2], shard_size=32, sketch_dim=16)
"""


def test_a_build_killed_midway_resumes_to_the_same_results(tiny_run, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(out), str(tiny_run)], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        else:
            pytest.fail("the build wrote no shards in time")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) < 2 * 50
    with pytest.raises(InputError, match="did not finish"):
        GradientIndex.open(out)

    messages = []
    resumed = GradientIndex.build(out, model_path=tiny_run, shard_size=32, sketch_dim=16, log=messages.append)
    assert any("resuming" in m for m in messages)
    clean = GradientIndex.build(tmp_path / "clean", model_path=tiny_run, shard_size=32, sketch_dim=16)
    for a, b in zip(sorted(out.rglob("*.h5")), sorted((tmp_path / "clean").rglob("*.h5"))):
        assert a.relative_to(out) == b.relative_to(tmp_path / "clean") and a.read_bytes() == b.read_bytes()
    _, _, test = run_ids(tiny_run)
    assert resumed.query(test[:3]) == clean.query(test[:3])


def test_a_corrupted_shard_is_reported_by_name_and_rebuilt(tiny_run, tmp_path, capsys):
    out = tmp_path / "index"
    index = GradientIndex.build(out, model_path=tiny_run, shard_size=512, sketch_dim=16)
    shard = out / index.manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    assert any(str(shard) in problem for problem in GradientIndex.open(out).verify())
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 2 and str(shard) in err

    messages = []
    GradientIndex.build(out, model_path=tiny_run, shard_size=512, sketch_dim=16, log=messages.append)
    assert any(index.manifest["shards"][1]["file"] in m and "rebuilding" in m for m in messages)
    assert GradientIndex.open(out).verify() == []


def test_verify_names_a_replaced_checkpoint_and_changed_training_triples_as_query_would(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=run, shard_size=512, sketch_dim=16)
    assert run_cli(capsys, "verify", out)[0] == 0
    checkpoints = sorted((run / "checkpoints").glob("*.pt"))
    shutil.copy(checkpoints[0], checkpoints[1])  # intact, readable, but not the weights the index was built from
    _, _, test = run_ids(run)
    with pytest.raises(InputError, match="changed since the index was built"):
        GradientIndex.open(out).query(test[:1])
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 2 and str(checkpoints[1]) in err and "checkpoint changed since the index was built" in err
    assert any(str(checkpoints[1]) in p for p in GradientIndex.open(out).verify())

    lines = (run / "train.tsv").read_text().splitlines(keepends=True)
    (run / "train.tsv").write_text("".join(lines[1:] + lines[:1]))  # the same triples in another order: other rows
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 2 and "training triples changed" in err and str(run / "train.tsv") in err
    (run / "train.tsv").unlink()
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 2 and "training triples recorded in the index are missing" in err


def test_replaced_principal_directions_are_refused_then_refitted_with_their_shards(tiny_run, tmp_path):
    out = tmp_path / "index"
    index = GradientIndex.build(out, model_path=tiny_run, shard_size=512, sketch_dim=16)
    _, _, test = run_ids(tiny_run)
    expected = index.query(test[:3])
    bases = out / "bases" / "ckpt-001.h5"
    other = tmp_path / "other"
    GradientIndex.build(other, model_path=tiny_run, shard_size=512, sketch_dim=16, seed=7)
    shutil.copy(other / "bases" / "ckpt-001.h5", bases)  # intact, but not the directions the shards were sketched on
    with pytest.raises(InputError, match="changed since the index was built"):
        GradientIndex.open(out).query(test[:1])
    assert any("ckpt-001.h5" in p for p in GradientIndex.open(out).verify())

    messages = []
    rebuilt = GradientIndex.build(out, model_path=tiny_run, shard_size=512, sketch_dim=16, log=messages.append)
    assert any("bases/ckpt-001.h5" in m and "rebuilding the 4 shards of checkpoint 2" in m for m in messages)
    assert rebuilt.verify() == [] and rebuilt.query(test[:3]) == expected


def test_a_changed_triples_file_is_refused(tiny_run, tmp_path):
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=tiny_run, sketch_dim=16)
    data = bytearray((out / "triples.h5").read_bytes())
    data[-10] ^= 0x01
    (out / "triples.h5").write_bytes(bytes(data))
    with pytest.raises(InputError, match="triples.h5"):
        GradientIndex.open(out)


def test_an_index_moved_with_its_run_directory_still_opens(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "a" / "run")
    GradientIndex.build(tmp_path / "a" / "index", model_path=tmp_path / "a" / "run", sketch_dim=16)
    _, _, test = run_ids(tiny_run)
    expected = GradientIndex.open(tmp_path / "a" / "index").query(test[:2])
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert GradientIndex.open(tmp_path / "b" / "index").query(test[:2]) == expected
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints")
    with pytest.raises(InputError, match="epoch-0001.pt: checkpoint recorded in the index is missing"):
        GradientIndex.open(tmp_path / "b" / "index").query(test[:1])


def test_an_index_refuses_a_checkpoint_changed_since_the_build(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=run, sketch_dim=16)
    checkpoint = sorted((run / "checkpoints").iterdir())[0]
    saved = torch.load(checkpoint, weights_only=True)
    saved["learning_rate"] = 0.5
    torch.save(saved, checkpoint)
    with pytest.raises(InputError, match="changed since the index was built"):
        GradientIndex.open(out).query([[0, 0, 0]])
    code, _, err = run_cli(capsys, "query", out, "--triple", "brazil", "embassy", "uk")
    assert code == 2 and checkpoint.name in err and "Traceback" not in err


def test_a_build_that_does_not_fit_is_refused_before_writing(tiny_run, tmp_path, monkeypatch):
    import shutil as shutil_module

    import tracin_index.build.plan as plan

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(InputError, match=r"needs about .* MiB but the disk has 0.0 MiB free"):
        GradientIndex.build(tmp_path / "index", model_path=tiny_run)
    assert not (tmp_path / "index").exists()
    monkeypatch.undo()
    monkeypatch.setattr(plan, "available_memory", lambda: 2**17)
    with pytest.raises(InputError, match=r"needs about .* of memory .* but 0.1 MiB is available"):
        GradientIndex.build(tmp_path / "index", model_path=tiny_run)
    assert not (tmp_path / "index").exists()


def test_gradients_beyond_float16_are_stored_scaled_and_scored_within_bounds():
    from tracin_index.gradients.blocks import DenseBlock, PerExampleGradients
    from tracin_index.search.scan import checkpoint_estimate
    from tracin_index.storage.arrays import FactorArrays
    from tracin_index.storage.encoding import encode
    from tracin_index.storage.plans import BlockPlan

    values = torch.randn(50, 30, dtype=torch.float64) * 1e9  # float16 holds at most 65504
    values[0, :5] = torch.tensor([1e-9, -3e-7, 2e3, 7e10, -1e12])  # many orders of magnitude in one row
    plan = BlockPlan("dense", "dense", (30,), (0,))
    grads = PerExampleGradients({"dense": DenseBlock(values, (torch.Size([30]),))})
    arrays = encode([plan], grads, {})
    assert all(torch.isfinite(v.float()).all() for v in arrays.values())
    query = PerExampleGradients({"dense": DenseBlock(torch.randn(1, 30, dtype=torch.float64) * 1e7, (torch.Size([30]),))})
    estimate = checkpoint_estimate([plan], FactorArrays(arrays, {}, {}, 50), query, {})
    exact = values @ query.blocks["dense"].values[0]
    assert bool(((estimate.value - exact).abs() <= estimate.error).all())
    norms = values.norm(dim=1) * query.blocks["dense"].values.norm()
    assert bool((estimate.error <= 2**-8 * norms).all())  # a float16 slack, not an overflow


def test_a_second_build_into_the_same_directory_is_refused_while_one_runs(tiny_run, tmp_path):
    out = tmp_path / "index"
    with exclusive_lock(out):
        with pytest.raises(InputError, match="another build"):
            GradientIndex.build(out, model_path=tiny_run, sketch_dim=16)


def test_resuming_with_other_settings_is_refused_naming_the_setting(tiny_run, tmp_path):
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=tiny_run, sketch_dim=16)
    with pytest.raises(InputError, match="sketch_dim"):
        GradientIndex.build(out, model_path=tiny_run, sketch_dim=32)


def test_rebuilding_a_complete_index_recomputes_nothing(tiny_run, tmp_path):
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=tiny_run, sketch_dim=16)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    messages = []
    GradientIndex.build(out, model_path=tiny_run, sketch_dim=16, log=messages.append)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")} == before
    assert not any("rebuilding" in m or "resuming" in m for m in messages)


def test_opening_something_that_is_not_an_index(tmp_path):
    with pytest.raises(InputError, match="no such index directory"):
        GradientIndex.open(tmp_path / "missing")
    with pytest.raises(InputError, match="not an index directory"):
        GradientIndex.open(tmp_path)


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_out_at_a_file_is_refused_in_one_line(tiny_run, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me\n")
    out = blocker if where == "file" else blocker / "index"
    code, _, err = run_cli(capsys, "build", "--model-path", tiny_run, "--out", out)
    assert code == 2 and "Traceback" not in err and "is a file" in err
    assert blocker.read_text() == "keep me\n"


def test_a_checkpoint_whose_gradients_overflow_is_refused_before_writing(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    last = sorted((run / "checkpoints").iterdir())[-1]
    saved = torch.load(last, weights_only=True)
    saved["model_state_dict"]["interaction.hr1d.0.weight"] *= float("inf")
    torch.save(saved, last)
    with pytest.raises(InputError, match="checkpoint 2: the gradients of sampled training triples are not finite"):
        GradientIndex.build(tmp_path / "index", model_path=run, sketch_dim=16)
    assert not (tmp_path / "index").exists()


def test_a_batch_without_new_groups_stores_no_group_rows():
    from tracin_index.gradients.blocks import FactoredBlock, PerExampleGradients
    from tracin_index.storage.encoding import encode
    from tracin_index.storage.plans import BlockPlan
    from tracin_index.storage.sketch import Basis, fit_basis

    a, delta = torch.rand(6, 1, 40), torch.randn(6, 1, 3)
    plan = BlockPlan("linear", "factored", (3, 40), (0, 8), grouped=True)
    basis = Basis.from_matrix(fit_basis(a[:, 0], 8, seed=0))
    grads = PerExampleGradients({"linear": FactoredBlock(a, delta, True, False)})
    arrays = encode([plan], grads, {("linear", "in"): basis}, torch.zeros(0, dtype=torch.long))
    assert arrays["linear/in/values"].shape == (0, 1, 8) and arrays["linear/in/rho"].shape == (0, 1)
    assert arrays["linear/out/values"].shape == (6, 1, 3)


def test_loose_bounds_are_settled_by_rescoring_in_rounds_most_promising_first(tiny_run, tmp_path, conve_reference):
    from tracin_index.search.settle import candidates

    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=4)  # a sketch far too small
    _, _, test = run_ids(tiny_run)
    results = index.query(test[:NUM_TEST], top_k=10)
    assert_matches(results, conve_reference["bce"])
    grads = index.test_gradients(test[:NUM_TEST])
    at_once = []
    for t in range(NUM_TEST):
        value, error = index.estimates(grads, t)
        at_once.append(len(np.union1d(*candidates(value - error, value + error, 10))))
    assert max(index.last_query.rounds) > 1  # several rounds were needed ...
    assert sum(index.last_query.refined) > sum(index.last_query.rescored)  # ... most of them refining bounds ...
    assert sum(index.last_query.rescored) < sum(at_once)  # ... and spared rescoring every candidate


@pytest.mark.parametrize("allowed,affordable,expected", [(1.0, True, 128), (0.0, False, 256), (0.0, True, 512)],
                         ids=["128-enough", "512-too-big", "512"])  # fmt: skip
def test_the_default_sketch_widens_where_128_directions_leave_too_much_out(conve_run, tmp_path, monkeypatch, allowed,
                                                                           affordable, expected):  # fmt: skip
    """128 directions, 256 where they leave too much out, 512 where 256 do too and the index and each scan
    stay small enough (here: a small graph, whose 512-direction bases alone would exceed the budget)."""
    import tracin_index.build.plan as plan

    monkeypatch.setattr(plan, "AUTO_RESIDUAL", allowed)
    if affordable:
        monkeypatch.setattr(plan, "WIDEST_BYTES", 10**9)
    index = GradientIndex.build(tmp_path / "index", model_path=conve_run)
    assert index.plans[0].sketch == (0, expected) and index.manifest["settings"]["sketch_dim"] is None


def test_the_build_says_what_it_needs_of_memory_and_how_queries_will_hold_the_index(tiny_run, tmp_path, monkeypatch):
    import tracin_index.build.plan as plan

    messages = []
    monkeypatch.setattr(plan, "available_memory", lambda: 2**40)
    GradientIndex.build(tmp_path / "roomy", model_path=tiny_run, log=messages.append)
    assert any(m.startswith("memory: the build needs about ") and "(1,024.00 GiB available now)" in m for m in messages)
    assert not any(m.startswith("queries:") for m in messages)  # held at the default budget: nothing to say

    messages.clear()
    shards = sum(p.stat().st_size for p in (tmp_path / "roomy").rglob("*.h5") if p.parent != tmp_path / "roomy")
    monkeypatch.setattr(plan, "available_memory", lambda: 8 * shards)  # a default budget of 2x the arrays: < 4x
    GradientIndex.build(tmp_path / "tight", model_path=tiny_run, log=messages.append)
    said = [m for m in messages if m.startswith("queries:")]
    assert len(said) == 1 and "read from the files in passes, with the same answers" in said[0], messages
