"""The build on a Dask LocalCluster of 2 worker processes: the same shards, byte for byte, as the
single-process build of the same inputs, also when a worker is killed in the middle."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from conftest import run_cli
from test_index import run_ids

from tracin_index.errors import InputError, MachineError
from tracin_index.index import GradientIndex

distributed = pytest.importorskip("distributed", reason="the [distributed] extra is not installed")

SHARD = 40  # training triples per shard: Nations' 1,592 in 40 shards per checkpoint


def single_process_build(tiny_run, out):
    """The reference: the default build in this process, with the workers' one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return GradientIndex.build(out, model_path=tiny_run, sketch_dim=16, shard_size=SHARD, device="cpu")
    finally:
        torch.set_num_threads(threads)


def shard_digests(index) -> dict:
    return {s["file"]: s["sha256"] for s in index.manifest["shards"]}


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    return single_process_build(tiny_run, tmp_path_factory.mktemp("single") / "index")


@pytest.fixture(scope="module")
def runner():
    from tracin_index.build.runners import DaskRunner

    with DaskRunner.local(2, threads=1) as runner:
        yield runner


def assert_same_index(index, reference, tiny_run):
    assert index.manifest["complete"] and len(index.manifest["shards"]) == len(reference.manifest["shards"]) == 80
    assert shard_digests(index) == shard_digests(reference)  # every shard byte for byte
    assert {k: v for k, v in index.manifest["files"].items()} == reference.manifest["files"]
    _, _, test = run_ids(tiny_run)
    ours, theirs = index.query(test[:3], top_k=10), reference.query(test[:3], top_k=10)
    for a, b in zip(ours, theirs):
        assert [(i.train_index, i.influence) for i in a.proponents + a.opponents] == \
               [(i.train_index, i.influence) for i in b.proponents + b.opponents]  # fmt: skip


def test_a_local_cluster_build_equals_the_single_process_build(tiny_run, tmp_path, reference, runner):
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16, shard_size=SHARD, device="cpu",
                                runner=runner, index_shards=3)  # fmt: skip
    assert_same_index(index, reference, tiny_run)
    assert index.manifest["search_shards"] == [[0, 531], [531, 1061], [1061, 1592]]


def test_a_worker_killed_mid_build_still_ends_in_the_same_index(tiny_run, tmp_path, reference, runner):
    out = tmp_path / "index"
    result, failure = {}, []

    def build():
        try:
            result["index"] = GradientIndex.build(out, model_path=tiny_run, sketch_dim=16, shard_size=SHARD,
                                                  device="cpu", runner=runner)  # fmt: skip
        except BaseException as error:  # reported by the test below
            failure.append(error)

    thread = threading.Thread(target=build)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline:  # some shards done, most not: kill a worker process in the middle
        manifest = out / "manifest.json"
        try:
            done = len(json.loads(manifest.read_text())["shards"]) if manifest.is_file() else 0
        except ValueError:
            done = 0
        if done >= 4:
            break
        time.sleep(0.01)
    pids = runner.client.run(os.getpid)
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert not failure, failure
    assert done < 80  # the kill came mid-build
    assert victim not in runner.client.run(os.getpid).values()  # it did die (the nanny started another)
    assert_same_index(result["index"], reference, tiny_run)


def test_a_task_that_fails_on_every_try_is_a_failure_of_the_cluster_not_bad_input(tiny_run, tmp_path, runner):
    def sabotage():  # on each worker: writing a shard file runs out of memory
        import tracin_index.build.task as task

        def out_of_memory(*args, **kwargs):
            raise MemoryError("no memory left on the worker (test)")

        task.real_write_arrays, task.write_arrays = task.write_arrays, out_of_memory

    def repair():
        import tracin_index.build.task as task

        task.write_arrays = getattr(task, "real_write_arrays", task.write_arrays)

    runner.client.run(sabotage)
    try:
        with pytest.raises(MachineError) as failed:
            GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16, shard_size=SHARD, device="cpu",
                                runner=runner)  # fmt: skip
    finally:
        runner.client.run(repair)
    assert not isinstance(failed.value, InputError) and failed.value.exit_code == 1
    message = str(failed.value)
    assert "failed on the cluster" in message and "MemoryError: no memory left on the worker (test)" in message
    assert "shard-" in message and "resumes" in message  # the task, and what to do


def test_resuming_on_a_cluster_after_a_killed_driver_rebuilds_only_what_is_missing(tiny_run, tmp_path, reference, runner):
    out = tmp_path / "index"
    GradientIndex.build(out, model_path=tiny_run, sketch_dim=16, shard_size=SHARD, device="cpu", runner=runner)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:50]  # as if the driver died after recording 50 shards
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    messages = []
    index = GradientIndex.build(out, model_path=tiny_run, sketch_dim=16, shard_size=SHARD, device="cpu",
                                runner=runner, log=messages.append)  # fmt: skip
    assert any("resuming, 10 of 40 shards already complete" in m for m in messages)
    assert_same_index(index, reference, tiny_run)


def test_cluster_options_are_checked_in_one_line(tiny_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", "--model-path", tiny_run, "--out", tmp_path / "a", "--dask-workers", "2",
                           "--dask-scheduler", "tcp://127.0.0.1:1")  # fmt: skip
    assert code != 0 and "not both" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "build", "--model-path", tiny_run, "--out", tmp_path / "b", "--dask-workers", "0")
    assert code != 0 and "at least 1" in err and "Traceback" not in err
    with pytest.raises(InputError, match="cannot reach the scheduler"):
        from tracin_index.build.runners import DaskRunner

        DaskRunner.connect("tcp://127.0.0.1:9", timeout="2s")


@pytest.mark.parametrize("direction,normalize,ship", [("tail", False, 256), ("both", True, 256), ("tail", False, 3)])
def test_a_query_over_search_shards_on_the_cluster_equals_the_single_query(tiny_run, reference, runner, direction,
                                                                          normalize, ship):  # fmt: skip
    sharded = GradientIndex.open(reference.directory, dask=runner.client, shards=4, device="cpu")
    assert len(sharded.engine.search.shards) == 4
    sharded.engine.search.ship = ship  # 3: the shards send few candidates' factors, the rest is fetched as refining needs it
    _, _, test = run_ids(tiny_run)
    ours = sharded.query(test[:6], top_k=10, direction=direction, normalize=normalize)
    theirs = reference.query(test[:6], top_k=10, direction=direction, normalize=normalize)
    for a, b in zip(ours, theirs):
        for x, y in ((a.proponents, b.proponents), (a.opponents, b.opponents)):
            assert [i.train_index for i in x] == [i.train_index for i in y]
            assert [i.influence for i in x] == pytest.approx([i.influence for i in y], rel=1e-6)  # float32 rescoring
        assert (a.num_proponents, a.num_opponents, a.counts_exact) == (b.num_proponents, b.num_opponents, b.counts_exact)
    # the same candidates refined and rescored as the single index
    assert sharded.last_query.rescored == reference.last_query.rescored
    assert sharded.last_query.refined == reference.last_query.refined
    assert (max(sharded.last_query.fetched) > 0) == (ship == 3)
    with pytest.raises(InputError, match="not available on an index searched in shards"):
        sharded.query(test[:1], approximate=True)
