"""Several readers of one index at once (threads, processes, servers), and readers and a second build while a
build writes it: each answers what a query alone answers, or refuses in one line; nothing is corrupted.

The index is built with ``--loss ce``: its gradients come from forward hooks and a backward pass on the model,
the computation that two threads sharing one model would garble."""

import fcntl
import importlib.util
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import run_cli
from reference import flat, per_triple_gradients
from test_index import run_ids

from tracin_index.errors import InputError
from tracin_index.index import GradientIndex

NUM_TEST = 4
TOP_K = 5
BUILD = ["--sketch-dim", "16", "--shard-size", "200", "--loss", "ce", "--device", "cpu"]
#: the parameters the index holds gradients of (the default: ConvE's last 2 layers)
SELECTED = ["interaction.hr1d.0.weight", "interaction.hr1d.0.bias", "interaction.hr1d.2.weight", "interaction.hr1d.2.bias"]

#: `tracin-index ARGS` whose build stops once its manifest records a shard file (the lock held, the manifest
#: not complete), writes the file argv[1] and goes on when the file argv[2] exists: an overlap that does not
#: depend on timing.
PAUSED_BUILD = """
import sys, time
from pathlib import Path
import tracin_index.build.builder as builder
from tracin_index.cli import main

paused, go = Path(sys.argv[1]), Path(sys.argv[2])
write_manifest = builder.write_manifest

def write_then_wait(directory, manifest, **options):
    write_manifest(directory, manifest, **options)
    if manifest["shards"] and not paused.exists():
        paused.touch()
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

builder.write_manifest = write_then_wait
main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def index_dir(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("concurrency") / "index"
    from tracin_index.cli import main

    main(["build", "--model-path", str(tiny_run), "--out", str(out), *BUILD])
    return out


@pytest.fixture(scope="module")
def test_ids(tiny_run):
    return run_ids(tiny_run)[2][:NUM_TEST]


@pytest.fixture(scope="module")
def sequential(index_dir, test_ids):
    """Each test triple's answer from an index queried by one thread, one test triple at a time."""
    index = GradientIndex.open(index_dir, device="cpu")
    return [index.query(test_ids[t : t + 1], top_k=TOP_K)[0] for t in range(NUM_TEST)]


def together(*calls, timeout: float = 120):
    """The calls' results, each call in a thread of its own, all released at once (the first exception raised
    by one is raised here; a call still running after ``timeout`` seconds fails the test)."""
    barrier = threading.Barrier(len(calls))
    outcomes: list = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            outcomes[i] = (call(), None)
        except BaseException as error:  # noqa: BLE001 (raised in the test's thread below)
            outcomes[i] = (None, error)

    threads = [threading.Thread(target=run, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        pytest.fail(f"a call did not return within {timeout} s")
    for _, error in outcomes:
        if error is not None:
            raise error
    return [result for result, _ in outcomes]


def queried_one_by_one(index, test_ids, order):
    return [index.query(test_ids[t : t + 1], top_k=TOP_K)[0] for t in order]


def reference_influences(run_dir, test_triple, rows, loss="ce") -> torch.Tensor:
    """sum_c lr_c <g(test), g(train row)> of the training ``rows``, from one autograd backward per triple
    (tests/reference.py, independent of the package)."""
    run, train, _ = run_ids(run_dir)
    model = run.model.double()
    names = SELECTED
    total = torch.zeros(len(rows), dtype=torch.float64)
    for checkpoint in run.checkpoints:
        state = torch.load(checkpoint.path, weights_only=True)["model_state_dict"]
        model.load_state_dict({k: v.double() for k, v in state.items()})
        g_test = flat(per_triple_gradients(model, test_triple[None], names, loss, "tail"))
        g_train = flat(per_triple_gradients(model, train[rows], names, loss))
        total += checkpoint.learning_rate * (g_train @ g_test[0])
    return total


def test_two_threads_querying_one_opened_index_get_the_answers_of_one_thread(index_dir, test_ids, sequential, tiny_run):
    forward, backward = list(range(NUM_TEST)), list(reversed(range(NUM_TEST)))
    for _ in range(3):  # each time a freshly opened index: its first loads of the model and arrays race too
        index = GradientIndex.open(index_dir, device="cpu")
        a, b = together(lambda: queried_one_by_one(index, test_ids, forward),
                        lambda: queried_one_by_one(index, test_ids, backward))  # fmt: skip
        assert a == sequential and b == sequential[::-1]
    assert index.manifest["selection"]["parameters"] == SELECTED
    for t, result in enumerate(a[:2]):  # and the answers are exact TracIn
        items = [*result.proponents, *result.opponents]
        expected = reference_influences(tiny_run, test_ids[t], [i.train_index for i in items])
        assert [i.influence for i in items] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-9)


def test_two_indexes_opened_on_one_directory_in_two_threads_get_the_answers_of_one_thread(index_dir, test_ids, sequential):
    def open_and_query(order):
        return queried_one_by_one(GradientIndex.open(index_dir, device="cpu"), test_ids, order)

    a, b = together(lambda: open_and_query(range(NUM_TEST)), lambda: open_and_query(reversed(range(NUM_TEST))))
    assert a == sequential and b == sequential[::-1]


def cli(*args: str) -> subprocess.Popen:
    """``tracin-index ARGS`` in a process of its own, its stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "tracin_index.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())  # fmt: skip


def finished(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running after {timeout} s:\n{process.communicate()[0]}")
    return process.returncode, output


def test_two_query_processes_at_once_write_what_one_alone_writes(index_dir, tiny_run, tmp_path, capsys):
    def query(output):
        return ["query", index_dir, "--test", tiny_run / "test.tsv", "--test-indices", *map(str, range(NUM_TEST)),
                "--top-k", str(TOP_K), "--device", "cpu", "--output", output]  # fmt: skip

    alone = tmp_path / "alone.json"
    code, _, err = run_cli(capsys, *query(alone))
    assert code == 0, err
    processes = [cli(*query(tmp_path / f"at-once-{i}.json")) for i in range(2)]
    for process in processes:
        code, output = finished(process)
        assert code == 0, output
    assert (tmp_path / "at-once-0.json").read_bytes() == (tmp_path / "at-once-1.json").read_bytes() == alone.read_bytes()


class PausedBuild:
    """`tracin-index build ARGS` in another process, stopped while it holds the lock with a shard file written
    and the manifest not complete, until :meth:`go_on`."""

    def __init__(self, tmp_path, *args):
        script = tmp_path / "paused_build.py"
        script.write_text(PAUSED_BUILD)
        self.paused, self.go = tmp_path / "paused", tmp_path / "go"
        self.process = subprocess.Popen([sys.executable, str(script), str(self.paused), str(self.go), "build", *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())  # fmt: skip
        deadline = time.monotonic() + 120
        while not self.paused.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the build did not reach its pause:\n{self.go_on()[1]}")
            time.sleep(0.05)

    def go_on(self) -> tuple[int, str]:
        self.go.touch()
        return finished(self.process)


def files_of(index_dir) -> dict:
    """The index's files (but its manifest, which records when it was made) and their bytes."""
    return {str(p.relative_to(index_dir)): p.read_bytes() for p in index_dir.rglob("*") if p.is_file() and p.name != "manifest.json"}


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_queries_verify_serve_and_a_second_build_while_a_build_writes_the_index_are_refused_in_one_line(
        tiny_run, index_dir, test_ids, sequential, tmp_path, capsys, monkeypatch):  # fmt: skip
    out = tmp_path / "index"
    build = PausedBuild(tmp_path, "--model-path", tiny_run, "--out", out, *BUILD)
    try:
        query = cli("query", out, "--triple", "brazil", "embassy", "uk", "--device", "cpu")
        with pytest.raises(InputError, match="a build is writing this index right now"):
            GradientIndex.open(out)
        code, stdout, stderr = run_cli(capsys, "verify", out)
        assert code == 2 and "a build is writing this index right now" in one_line(stdout + stderr)
        code, stdout, stderr = run_cli(capsys, "build", "--model-path", tiny_run, "--out", out, *BUILD)
        assert code == 2 and "another build is writing this index right now" in one_line(stdout + stderr)
        if importlib.util.find_spec("uvicorn") is not None:  # the [serve] extra
            import uvicorn

            monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("served an index that a build is writing"))
            code, stdout, stderr = run_cli(capsys, "serve", out, "--device", "cpu")
            assert code == 2 and "a build is writing this index right now" in one_line(stdout + stderr)
            assert "serving" not in stdout + stderr  # no address announced for an index it does not serve
        code, output = finished(query)
        assert code == 2 and one_line(output) == f"error: {out}: a build is writing this index right now; run this again once it has finished"
    finally:
        code, output = build.go_on()
    assert code == 0, output
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 0, err
    # nothing the refused readers and builder did changed a file: the index is the one an undisturbed build writes
    assert files_of(out) == files_of(index_dir)
    assert queried_one_by_one(GradientIndex.open(out, device="cpu"), test_ids, range(NUM_TEST)) == sequential


def test_a_build_that_starts_while_a_query_checks_for_one_is_not_refused(tmp_path, monkeypatch):
    from tracin_index.storage import layout

    out = tmp_path / "index"
    out.mkdir()
    (out / layout.LOCK).touch()
    with open(out / layout.LOCK, "rb") as probe:
        fcntl.flock(probe, fcntl.LOCK_SH)  # what build_running holds for an instant, caught holding it

        class Clock:  # the build's first wait for the lock is when the probe lets go
            monotonic = staticmethod(time.monotonic)
            sleep = staticmethod(lambda seconds: fcntl.flock(probe, fcntl.LOCK_UN))

        monkeypatch.setattr(layout, "time", Clock)
        with layout.exclusive_lock(out):
            assert layout.build_running(out)
    assert not layout.build_running(out)


def test_an_index_opened_before_a_build_resumes_it_answers_and_a_new_one_is_refused(tiny_run, test_ids, sequential,
                                                                                      tmp_path, capsys):  # fmt: skip
    out = tmp_path / "index"
    code, _, err = run_cli(capsys, "build", "--model-path", tiny_run, "--out", out, *BUILD)
    assert code == 0, err
    opened = GradientIndex.open(out, device="cpu")  # complete; its model and arrays are read at its first query
    build = PausedBuild(tmp_path, "--model-path", tiny_run, "--out", out, *BUILD)  # the same command: resumes, changes nothing
    try:
        assert queried_one_by_one(opened, test_ids, range(NUM_TEST)) == sequential
        with pytest.raises(InputError, match="a build is writing this index right now"):
            GradientIndex.open(out)
    finally:
        code, output = build.go_on()
    assert code == 0, output
    assert queried_one_by_one(GradientIndex.open(out, device="cpu"), test_ids, range(NUM_TEST)) == sequential


# -- servers ----------------------------------------------------------------------------------------


def labelled(index, ids):
    h, r, t = (int(x) for x in ids)
    return {"head": index.entity_labels[h], "relation": index.relation_labels[r], "tail": index.entity_labels[t]}


def assert_answers(responses, expected):
    """The server's results: the lists of a query alone, each influence its exact score up to float32 rounding
    (requests that arrive together are answered in one batch, whose products round otherwise)."""
    assert len(responses) == len(expected)
    for got, want in zip(responses, expected):
        want = want.to_json()
        for kind in ("proponents", "opponents"):
            assert [i["train_index"] for i in got[kind]] == [i["train_index"] for i in want[kind]]
            assert [i["influence"] for i in got[kind]] == pytest.approx([i["influence"] for i in want[kind]], rel=1e-5)


def test_two_apps_serving_one_opened_index_answer_at_once_what_it_answers_alone(index_dir, test_ids, sequential):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    pytest.importorskip("httpx", reason="httpx (the test client) is not installed")
    from fastapi.testclient import TestClient

    from tracin_index.serve.app import create_app

    index = GradientIndex.open(index_dir, device="cpu")
    clients = [TestClient(create_app(index), raise_server_exceptions=False) for _ in range(2)]

    def ask(client, order):
        answers = []
        for t in order:
            response = client.get("/api/query", params={**labelled(index, test_ids[t]), "top_k": TOP_K})
            assert response.status_code == 200, response.text
            answers.append(response.json()["results"][0])
        return answers

    for _ in range(2):
        a, b = together(lambda: ask(clients[0], range(NUM_TEST)), lambda: ask(clients[1], reversed(range(NUM_TEST))))
        assert_answers(a, sequential)
        assert_answers(b, sequential[::-1])


def free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:  # bound together: n different ports
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_serve_processes_on_one_index_answer_at_once_what_it_answers_alone(index_dir, test_ids, sequential):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    httpx = pytest.importorskip("httpx", reason="httpx is not installed")
    index = GradientIndex.open(index_dir, device="cpu")
    ports = free_ports(2)
    servers = [cli("serve", index_dir, "--port", str(port), "--device", "cpu") for port in ports]
    try:
        deadline = time.monotonic() + 120
        for server, port in zip(servers, ports):
            while True:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)

        def ask(port, order):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                return [client.get("/api/query", params={**labelled(index, test_ids[t]), "top_k": TOP_K}).json()["results"][0]
                        for t in order]  # fmt: skip

        a, b = together(lambda: ask(ports[0], range(NUM_TEST)), lambda: ask(ports[1], reversed(range(NUM_TEST))))
        assert_answers(a, sequential)
        assert_answers(b, sequential[::-1])
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.communicate(timeout=30)
