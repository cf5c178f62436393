"""GradientIndex: agreement with exact TracIn, trustworthy storage, refusals."""

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
from tracin_index.analyzer import TracInAnalyzer
from tracin_index.errors import InputError
from tracin_index.index import GradientIndex
from tracin_index.models import load_model
from tracin_index.store import exclusive_lock
from tracin_index.triples import read_labeled_triples


def exact_analyzer(run_dir):
    run = load_model(run_dir)
    train = run.id_maps.to_ids(read_labeled_triples(run.training_path))
    test = run.id_maps.to_ids(read_labeled_triples(run.test_path))
    return TracInAnalyzer(run.model, checkpoints=run.checkpoints, id_maps=run.id_maps), train, test


def rows(items):
    return [i.train_index for i in items]


def test_exact_index_gives_the_analyzer_top_k_and_scores(tiny_run, tiny_exact_index):
    analyzer, train, test = exact_analyzer(tiny_run)
    expected = analyzer.compute_influences(test[:5], train, top_k=10)
    found = tiny_exact_index.query(test[:5], top_k=10)
    for e, f in zip(expected, found):
        assert rows(f.proponents) == rows(e.proponents)
        assert rows(f.opponents) == rows(e.opponents)
        scale = max(abs(e.proponents[0].influence), abs(e.opponents[0].influence))
        for a, b in zip(e.proponents + e.opponents, f.proponents + f.opponents):
            assert b.influence == pytest.approx(a.influence, rel=1e-5, abs=1e-6 * scale)
        assert (f.test_triple.head, f.test_triple.relation, f.test_triple.tail) == (
            e.test_triple.head, e.test_triple.relation, e.test_triple.tail,
        )  # fmt: skip


def test_self_influence_equals_the_analyzer(tiny_run, tiny_exact_index):
    analyzer, train, _ = exact_analyzer(tiny_run)
    expected = analyzer.self_influence(train).numpy()
    np.testing.assert_allclose(tiny_exact_index.self_influences(), expected, rtol=1e-5)
    top = tiny_exact_index.self_influence(top_k=3)
    assert [t.train_index for t in top] == list(np.argsort(-expected)[:3])


def test_default_projection_finds_most_exact_proponents_and_rerank_finds_all(conve_run, tmp_path):
    analyzer, train, test = exact_analyzer(conve_run)
    index = GradientIndex.build(tmp_path / "index", model_path=conve_run, progress=False)
    exact = analyzer.influence_scores(test[:20], train)
    found = index.query(test[:20], top_k=10)
    reranked = index.query(test[:20], top_k=10, rerank=100)
    overlap = [len(set(rows(f.proponents)) & set(exact[i].topk(10).indices.tolist())) for i, f in enumerate(found)]
    assert np.mean(overlap) >= 8
    for i, r in enumerate(reranked):
        assert rows(r.proponents) == exact[i].topk(10).indices.tolist()
        assert rows(r.opponents) == (-exact[i]).topk(10).indices.tolist()
        assert [p.influence for p in r.proponents] == pytest.approx(exact[i].topk(10).values.tolist(), rel=1e-4)


def test_exact_vectors_of_a_large_layer_are_refused_with_advice(conve_run, tmp_path, monkeypatch):
    monkeypatch.setattr("tracin_index.index.MAX_EXACT_BYTES", 2**30)
    with pytest.raises(InputError, match="--projection-dim"):
        GradientIndex.build(tmp_path / "index", model_path=conve_run, projection_dim=0, progress=False)
    assert not (tmp_path / "index" / "manifest.json").exists()


BUILD_SCRIPT = """
import sys
from tracin_index.index import GradientIndex
GradientIndex.build(sys.argv[1], model_path=sys.argv[2], projection_dim=256, shard_size=32, progress=False)
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
    resumed = GradientIndex.build(out, model_path=tiny_run, projection_dim=256, shard_size=32, progress=False,
                                  log=messages.append)  # fmt: skip
    assert any("resuming" in m for m in messages)
    clean = GradientIndex.build(tmp_path / "clean", model_path=tiny_run, projection_dim=256, shard_size=32, progress=False)
    _, _, test = exact_analyzer(tiny_run)
    for a, b in zip(resumed.query(test[:5], top_k=10), clean.query(test[:5], top_k=10)):
        assert a == b
    np.testing.assert_array_equal(resumed.self_influences(), clean.self_influences())


def test_a_corrupted_shard_is_reported_by_name_and_rebuilt(tiny_run, tmp_path, capsys):
    out = tmp_path / "index"
    index = GradientIndex.build(out, model_path=tiny_run, projection_dim=256, shard_size=512, progress=False)
    shard = out / index.manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    assert any(str(shard) in problem for problem in GradientIndex.open(out).verify())
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 2 and str(shard) in err

    messages = []
    GradientIndex.build(out, model_path=tiny_run, projection_dim=256, shard_size=512, progress=False, log=messages.append)
    assert any(index.manifest["shards"][1]["file"] in m and "rebuilding" in m for m in messages)
    assert GradientIndex.open(out).verify() == []


def test_an_index_refuses_a_checkpoint_changed_since_the_build(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=run, projection_dim=256, progress=False)
    checkpoint = sorted((run / "checkpoints").iterdir())[0]
    saved = torch.load(checkpoint, weights_only=True)
    saved["learning_rate"] = 0.5
    torch.save(saved, checkpoint)
    with pytest.raises(InputError, match="changed since the index was built"):
        GradientIndex.open(out).query([[0, 0, 0]])
    code, _, err = run_cli(capsys, "query", out, "--triple", "brazil", "embassy", "uk")
    assert code == 2 and checkpoint.name in err and "Traceback" not in err


def test_a_second_build_into_the_same_directory_is_refused_while_one_runs(tiny_run, tmp_path):
    out = tmp_path / "index"
    with exclusive_lock(out):
        with pytest.raises(InputError, match="another build"):
            GradientIndex.build(out, model_path=tiny_run, projection_dim=256, progress=False)


def test_resuming_with_other_settings_is_refused_naming_the_setting(tiny_run, tmp_path):
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=tiny_run, projection_dim=256, progress=False)
    with pytest.raises(InputError, match="projection"):
        GradientIndex.build(out, model_path=tiny_run, projection_dim=512, progress=False)


def test_opening_something_that_is_not_an_index(tmp_path):
    with pytest.raises(InputError, match="no such index directory"):
        GradientIndex.open(tmp_path / "missing")
    with pytest.raises(InputError, match="not an index directory"):
        GradientIndex.open(tmp_path)


def test_rebuilding_a_complete_index_recomputes_nothing_and_another_index_type_reuses_the_shards(tiny_run, tmp_path):
    out = tmp_path / "index"
    first = GradientIndex.build(out, model_path=tiny_run, projection_dim=256, progress=False)
    messages = []
    again = GradientIndex.build(out, model_path=tiny_run, projection_dim=256, progress=False, log=messages.append)
    assert "all shards complete" in messages and "the flat index is up to date" in messages
    assert again.manifest["index"] == first.manifest["index"]

    messages.clear()
    hnsw = GradientIndex.build(out, model_path=tiny_run, projection_dim=256, index_type="hnsw", progress=False,
                               log=messages.append)  # fmt: skip
    assert "all shards complete" in messages and hnsw.manifest["index"]["type"] == "hnsw"
    assert hnsw.search_index.index_type == "hnsw"


def shard_vectors(index: GradientIndex) -> np.ndarray:
    """The index's rows as its shards hold them: checkpoints side by side, float32."""
    import h5py

    shards = index.manifest["shards"]
    parts = []
    for c in range(index.num_checkpoints):
        mine = sorted((s for s in shards if s["checkpoint"] == c), key=lambda s: s["row_start"])
        with_rows = []
        for s in mine:
            with h5py.File(index.directory / s["file"], "r") as f:
                with_rows.append(f["vectors"][...].astype(np.float32))
        parts.append(np.concatenate(with_rows))
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("rows_first", [True, False], ids=["rows-first", "checkpoint-first"])
def test_the_faiss_index_holds_exactly_the_shard_vectors_in_either_build_order(tiny_run, tmp_path, monkeypatch,
                                                                              rows_first):  # fmt: skip
    import tracin_index.index as index_module

    if not rows_first:  # as if one model copy per checkpoint did not fit in memory
        monkeypatch.setattr(index_module, "MODEL_COPIES_BYTES", 0)
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, projection_dim=256, shard_size=300,
                                progress=False)  # fmt: skip
    expected = shard_vectors(index)
    assert expected.shape == (len(index.hrt), index.search_index.dim) and np.abs(expected).max() > 0
    stored = index.search_index._cpu.reconstruct_n(0, index.search_index.ntotal)
    np.testing.assert_array_equal(stored, expected)
    reopened = GradientIndex.open(tmp_path / "index")
    np.testing.assert_array_equal(reopened.search_index._cpu.reconstruct_n(0, len(expected)), expected)


@pytest.mark.parametrize("sample_rows", [500, 100_000], ids=["leading-rows", "all-rows"])
def test_an_ivf_index_trained_on_the_leading_rows_finds_what_brute_force_finds(tiny_run, tmp_path, monkeypatch,
                                                                               sample_rows):  # fmt: skip
    import tracin_index.index as index_module

    # 500: trained after 2 of 6 row ranges, the rest assigned as they come; 100,000: trained on all rows
    monkeypatch.setattr(index_module, "IVF_SAMPLE_ROWS", sample_rows)
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, projection_dim=256, shard_size=300,
                                index_type="ivf", progress=False)  # fmt: skip
    assert index.search_index.ntotal == len(index.hrt)
    index.search_index.nprobe = index.search_index.nlist  # every list: exact
    vectors = shard_vectors(index)
    _, _, test = exact_analyzer(tiny_run)
    queries = index.query_vectors(test[:5])
    found = index.search_index.search(queries, 10)
    brute = np.argsort(-(queries.astype(np.float64) @ vectors.T.astype(np.float64)), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found.rows, brute)


def test_a_deleted_faiss_file_is_named_by_verify_and_rebuilt_from_the_shards(tiny_run, tmp_path, capsys):
    out = tmp_path / "index"
    first = GradientIndex.build(out, model_path=tiny_run, projection_dim=256, progress=False)
    _, _, test = exact_analyzer(tiny_run)
    expected = first.query(test[:3], top_k=10)
    (out / "faiss.index").unlink()
    assert any("faiss.index" in problem for problem in first.verify())
    code, _, err = run_cli(capsys, "query", out, "--triple", "brazil", "embassy", "uk")
    assert code == 2 and "faiss.index: missing" in err and "build" in err and "Traceback" not in err

    messages = []
    again = GradientIndex.build(out, model_path=tiny_run, projection_dim=256, progress=False, log=messages.append)
    assert "all shards complete" in messages and "the flat index is up to date" not in messages
    assert again.verify() == [] and again.query(test[:3], top_k=10) == expected
