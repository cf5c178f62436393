"""`query --test FILE --output x.jsonl`: batches, one line per test triple as each batch completes, and a
run that was killed resumes where it stopped, ending with the file an uninterrupted run writes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def stream_index(tiny_run, tmp_path_factory):
    from tracin_index.cli import main

    out = tmp_path_factory.mktemp("stream-index") / "index"
    main(["build", "--model-path", str(tiny_run), "--out", str(out), "--sketch-dim", "16"])
    return out


def assert_same_results(ours, theirs):
    """The same lists and counts; the same exact influences up to float32 rounding (a test triple's gradient
    is computed in a batch of other test triples: the products' rounding depends on the batch)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for key in ("test_index", "test_triple", "num_proponents", "num_opponents", "counts_exact"):
            assert a[key] == b[key], key
        for kind in ("proponents", "opponents"):
            assert [i["train_index"] for i in a[kind]] == [i["train_index"] for i in b[kind]]
            assert [i["influence"] for i in a[kind]] == pytest.approx([i["influence"] for i in b[kind]], rel=1e-5)


def _args(tiny_run, index, output, *extra):
    return ["query", str(index), "--test", str(tiny_run / "test.tsv"), "--test-indices", *map(str, range(12)),
            "--top-k", "5", *extra, "--output", str(output)]  # fmt: skip


def test_jsonl_holds_the_json_outputs_results_line_by_line(capsys, tiny_run, stream_index, tmp_path):
    from tracin_index.cli import main

    main(_args(tiny_run, stream_index, tmp_path / "all.json"))
    code, _, err = run_cli(capsys, *_args(tiny_run, stream_index, tmp_path / "all.jsonl", "--batch-size", "5"))
    assert code == 0, err
    whole = json.loads((tmp_path / "all.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert lines[0] == {"config": whole["config"]}
    assert_same_results(lines[1:], whole["results"])  # batches of 5 answer as the single call of 12 does
    assert [r["test_index"] for r in lines[1:]] == list(range(12))


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(capsys, tiny_run, stream_index, tmp_path, monkeypatch):
    from tracin_index.index import GradientIndex

    reference = tmp_path / "reference.jsonl"
    assert run_cli(capsys, *_args(tiny_run, stream_index, reference, "--batch-size", "4"))[0] == 0

    original, calls = GradientIndex.query, []

    def query_then_stop(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second batch runs
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientIndex, "query", query_then_stop)
    out = tmp_path / "run.jsonl"
    code, _, err = run_cli(capsys, *_args(tiny_run, stream_index, out, "--batch-size", "4"))
    assert code == 130 and "4 test triples written; the same command resumes" in err
    assert len(out.read_text().splitlines()) == 1 + 4  # the config and the first batch, whole
    monkeypatch.setattr(GradientIndex, "query", original)
    # a run killed in the middle of a write leaves a line without its end: cut off when resuming
    with open(out, "a") as f:
        f.write('{"test_index": 4, "test_tri')
    code, _, err = run_cli(capsys, *_args(tiny_run, stream_index, out, "--batch-size", "4"))
    assert code == 0, err
    assert "4 of 12 test triples already answered; resuming" in err
    assert out.read_bytes() == reference.read_bytes()

    def must_not_run(self, *args, **kwargs):
        raise AssertionError("a complete file was computed again")

    monkeypatch.setattr(GradientIndex, "query", must_not_run)
    code, _, err = run_cli(capsys, *_args(tiny_run, stream_index, out, "--batch-size", "4"))
    assert code == 0 and "nothing left to do" in err and out.read_bytes() == reference.read_bytes()


def test_a_run_killed_by_sigkill_resumes_to_the_same_file(capsys, tiny_run, stream_index, tmp_path):
    reference = tmp_path / "reference.jsonl"
    args = _args(tiny_run, stream_index, reference, "--batch-size", "1")
    args[args.index("--test-indices") + 1 : args.index("--top-k")] = map(str, range(60))
    assert run_cli(capsys, *args)[0] == 0
    killed = tmp_path / "killed.jsonl"
    args[-1] = str(killed)
    process = subprocess.Popen([sys.executable, "-m", "tracin_index.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=os.environ.copy())  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if killed.is_file() and killed.read_text().count("\n") >= 4:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    written = killed.read_bytes()
    assert 4 <= written.count(b"\n") < 61
    assert all(json.loads(line) for line in written.decode().splitlines())  # only whole lines
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert killed.read_bytes() == reference.read_bytes()


def test_a_file_of_other_settings_or_not_of_results_is_refused_and_kept(capsys, tiny_run, stream_index, tmp_path):
    out = tmp_path / "r.jsonl"
    assert run_cli(capsys, *_args(tiny_run, stream_index, out))[0] == 0
    before = out.read_bytes()
    args = _args(tiny_run, stream_index, out)
    args[args.index("--top-k") + 1] = "3"
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "holds results of other settings (config.top_k (in the file: 5, now: 3))" in err
    assert "Traceback" not in err and out.read_bytes() == before
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"hello": 1}\n')
    code, _, err = run_cli(capsys, *_args(tiny_run, stream_index, notes))
    assert code == 2 and "not a results file of tracin-index" in err and notes.read_text() == '{"hello": 1}\n'


def test_exact_in_test_batches_streams_the_answers_of_one_pass(capsys, tiny_run, tmp_path):
    """`exact --test-batch-size 3 --output x.jsonl`: several passes over the training set, one per batch of
    test triples, give the answers of the single pass; a rerun computes nothing."""
    args = ["exact", "--model-path", tiny_run, "--use-last-layers-only", "--test-indices", *map(str, range(7)), "--top-k", "5"]
    assert run_cli(capsys, *args, "--output", tmp_path / "one.json")[0] == 0
    code, _, err = run_cli(capsys, *args, "--test-batch-size", "3", "--output", tmp_path / "batched.jsonl")
    assert code == 0, err
    whole = json.loads((tmp_path / "one.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "batched.jsonl").read_text().splitlines()]
    assert lines[0] == {"config": whole["config"]}
    assert_same_results(lines[1:], whole["results"])
    code, _, err = run_cli(capsys, *args, "--test-batch-size", "3", "--output", tmp_path / "batched.jsonl")
    assert code == 0 and "7 of 7 test triples already answered; nothing left to do" in err
