"""The ``tracin-index`` command line: parses arguments, calls the library, prints results.

Errors of our own (:class:`~tracin_index.errors.TracInError`) end the program with a one-line
message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import List, Optional, Sequence

import typer
from rich.console import Console
from rich.text import Text

from .errors import DiskFullError, InputError, MachineError, TracInError
from .files import disk_full, mib
from .words import counted

app = typer.Typer(
    name="tracin-index",
    help="TracIn proponents and opponents for PyKEEN knowledge-graph models. Add --verbose to any command to see "
         "PyKEEN's and torch's own warnings and log lines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: "[run dir's train.tsv]" as written (rich ate it), flags without "<bool>"
)
# markup off: labels, paths and messages are data, printed as written (styles come only through styled())
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # messages stay one line, whatever the width
out = Console(markup=False, highlight=False)


def styled(prefix: str, style: str, message: str = "") -> Text:
    """``prefix`` in ``style``, then ``message`` as written (never read as markup)."""
    return Text.assemble((prefix, style), (f" {message}" if message else ""))

#: Options that, as in the original argparse script, take several values after one flag.
MULTI_VALUE_OPTIONS = frozenset({"--test-indices", "--last-layer-names", "--checkpoints", "--triple"})


class Loss(str, Enum):
    bce = "bce"
    ce = "ce"


class Direction(str, Enum):
    tail = "tail"
    head = "head"
    both = "both"


_MAX_MEMORY_HELP = ("Memory budget of the query process, e.g. 4G or 500M [a quarter of the memory available]: an index "
                    "whose stored arrays take more than a quarter of it is read from its files in passes, each "
                    "answering many test triples (the same answers).")
_DIRECTION_HELP = ("The prediction explained, for a model trained with inverse triples: tail = f(h, r, t); "
                   "head = f(t, r_inv, h), how PyKEEN scores heads; both = the sum.")


_NORMALIZE_HELP = ("Cosine form: each checkpoint's inner product divided by both gradients' norms, so that "
                   "influence ranks by gradient direction rather than size.")


class Optimizer(str, Enum):
    sgd = "sgd"
    adam = "adam"


_OPTIMIZER_HELP = ("sgd: plain TracIn (gradients). adam: each training gradient divided by the root of Adam's "
                   "second moment recorded with the checkpoint (the step Adam took).")


class Mode(str, Enum):
    single = "single"
    all = "all"


def expand_multi_value_options(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--opt a b c`` as ``--opt a --opt b --opt c`` for :data:`MULTI_VALUE_OPTIONS`.

    Values run until the next token that starts with ``-`` (negative numbers are not valid values
    of these options). ``--opt=a`` and repeated flags pass through unchanged.
    """
    result: list[str] = []
    current: str | None = None
    for token in argv:
        if token.startswith("-"):
            current = token if token in MULTI_VALUE_OPTIONS else None
            result.append(token)
            continue
        if current is not None and result[-1] != current:
            result.append(current)
        result.append(token)
    return result


@contextlib.contextmanager
def _warnings_shown(verbose: bool):
    """Our warnings (:class:`~tracin_index.errors.TracInWarning`) on one line each, each text once per command;
    other libraries' warnings, and their log lines ("Reconstructing all label-based triples ...", "The ConvE
    model should be trained with inverse triples"), only with ``verbose``."""
    from .errors import TracInWarning

    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if (verbose or issubclass(category, TracInWarning)) and text not in seen:
            seen.add(text)
            console.print(styled("warning:", "yellow", text))

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # repeats are dropped by show(), which sees every one
        warnings.showwarning = show
        if not verbose:  # PyKEEN sets its loggers' levels when imported: only a global switch holds
            logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    verbose = "--verbose" in args[: args.index("--")] if "--" in args else "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    # typer ships its own copy of click: take its exception classes from typer's public BadParameter
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        with _warnings_shown(verbose):
            result = app(args=args, prog_name="tracin-index", standalone_mode=False)
        if isinstance(result, int) and result:  # --help and the like return their exit code
            raise SystemExit(result)
    except usage_error as error:  # a bad flag or value: one line, as for our own errors
        if not error.format_message().strip():  # no arguments at all: the help was shown
            raise SystemExit(2) from None
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
        console.print(styled("error:", "red", f"{error.format_message()}{hint}"))
        raise SystemExit(2) from None
    except TracInError as error:  # bad input (2), or the machine or the cluster failed (1)
        console.print(styled("error:", "red", str(error)))
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        console.print(styled("interrupted", "red"))
        raise SystemExit(130) from None
    except OSError as error:  # a write outside our atomic writers, e.g. a library's own file
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            _bug(error)
        console.print(styled("error:", "red", f"{error.filename or 'a file'}: could not be written, the disk is full; "
                             "free some space and run the same command again"))  # fmt: skip
        raise SystemExit(1) from None
    except Exception as error:  # noqa: BLE001 (a bug: its traceback, and where it goes)
        _bug(error)


def _bug(error: Exception) -> None:
    """A failure that is neither the input nor the machine: the traceback, then what to do with it; exit 1."""
    import traceback

    from .version import __version__

    traceback.print_exception(error, file=sys.stderr)
    console.print(styled("error:", "red", f"this is a bug in tracin-index {__version__} ({type(error).__name__}); "
                         "please report it with the command and the traceback above"))  # fmt: skip
    raise SystemExit(1) from None


# ---------------------------------------------------------------------------------------------


@app.command()
def train(
    out_dir: Path = typer.Option(..., "--out", help="Run directory to create (must not exist or be empty)."),
    dataset: Optional[str] = typer.Option(
        None, help="Bundled PyKEEN dataset: nations, umls or kinships (default nations unless --train is given)."
    ),
    train_path: Optional[Path] = typer.Option(None, "--train", help="Training triples TSV (head, relation, tail)."),
    valid_path: Optional[Path] = typer.Option(None, "--valid", help="Validation triples TSV."),
    test_path: Optional[Path] = typer.Option(None, "--test", help="Test triples TSV."),
    model: str = typer.Option("ConvE", help="Any PyKEEN model name (ConvE, TransE, DistMult, ComplEx, RotatE...)."),
    embedding_dim: Optional[int] = typer.Option(None, help="Embedding dimension (model default when omitted)."),
    epochs: int = typer.Option(20),
    checkpoint_every: int = typer.Option(5, help="Save a checkpoint every N epochs (and after the last)."),
    learning_rate: float = typer.Option(0.001),
    batch_size: int = typer.Option(256),
    training_loop: str = typer.Option("slcwa", help="slcwa (negative sampling) or lcwa (1-N)."),
    seed: int = typer.Option(42),
    device: str = typer.Option("cpu"),
):
    """Train a PyKEEN model with TracIn-ready checkpoints, writing a run directory."""
    from .kg.training import train_run

    if train_path is None and dataset is None:
        dataset = "nations"
    if train_path is not None and dataset is not None:
        raise InputError("give either --dataset or --train/--valid/--test, not both")
    model_kwargs = {"embedding_dim": embedding_dim} if embedding_dim else None
    full = f"free some space, delete {out_dir} and run the same command again (training starts over)"
    with _start_over_when_full(full):
        run = train_run(out_dir, dataset=dataset, train_path=train_path, valid_path=valid_path, test_path=test_path, model=model,
                        model_kwargs=model_kwargs, epochs=epochs, checkpoint_every=checkpoint_every,
                        learning_rate=learning_rate, batch_size=batch_size, training_loop=training_loop, random_seed=seed,
                        device=device)  # fmt: skip
    console.print(f"run directory written: {run}")


@contextlib.contextmanager
def _when_interrupted(advice: str):
    """Ctrl-C: one line saying what the same command does next (``advice``), exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(styled("interrupted;", "red", advice))
        raise SystemExit(130) from None


@contextlib.contextmanager
def _start_over_when_full(advice: str):
    """A full disk where the same command does not resume: say what to do instead."""
    try:
        yield
    except DiskFullError as error:
        raise disk_full(error.path, error.free, advice) from None


@app.command()
def exact(
    model_path: Path = typer.Option(..., help="Run directory, or a pickled PyKEEN model with --allow-pickle."),
    train_path: Optional[Path] = typer.Option(None, "--train", help="Training triples TSV [run dir's train.tsv]."),
    test_path: Optional[Path] = typer.Option(None, "--test", help="Test triples TSV [run dir's test.tsv]."),
    entity_to_id: Optional[Path] = typer.Option(None, help="entity_to_id.tsv(.gz) [run dir's]."),
    relation_to_id: Optional[Path] = typer.Option(None, help="relation_to_id.tsv(.gz) [run dir's]."),
    output: Optional[Path] = typer.Option(None, help="Write results as JSON (.json), TSV (.tsv), or JSON lines "
                                          "(.jsonl: one line per test triple as each batch completes; the same "
                                          "command again resumes after the last one written)."),
    use_last_layers_only: bool = typer.Option(
        False, "--use-last-layers-only", help="Differentiate the last layers only (default: all parameters)."
    ),
    num_last_layers: int = typer.Option(2),
    last_layer_names: Optional[List[str]] = typer.Option(None, metavar="<name>...", help="Layer or parameter names (several allowed)."),
    mode: Mode = typer.Option(Mode.single, help="single: the --test-indices triples; all: every test triple."),
    test_indices: Optional[List[int]] = typer.Option(None, metavar="<int>...", help="0-based rows of the test file [0]."),
    checkpoints: Optional[List[Path]] = typer.Option(None, metavar="<path>...", help="Checkpoint files or folders [run dir's]."),
    top_k: int = typer.Option(10),
    loss: Loss = typer.Option(Loss.bce),
    direction: Direction = typer.Option(Direction.tail, help=_DIRECTION_HELP),
    normalize: bool = typer.Option(False, "--normalize", help=_NORMALIZE_HELP),
    optimizer: Optimizer = typer.Option(Optimizer.sgd, help=_OPTIMIZER_HELP),
    batch_size: int = typer.Option(256, help="Training triples per gradient batch."),
    test_batch_size: Optional[int] = typer.Option(
        None, help="Test triples per pass over the training set [as many as a quarter of the available memory "
        "holds scores of]."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... [cuda when available]."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow unpickling (runs arbitrary code)."),
):
    """Exact TracIn proponents and opponents of test triples (ground truth; one pass over the training set)."""
    from .exact import TracInAnalyzer
    from .kg.checkpoints import find_checkpoints
    from .kg.runs import load_model
    from .kg.triples import read_labeled_triples, warn_duplicates
    from .machine import available_memory
    from .results import render

    _check_positive("--top-k", top_k)
    _check_positive("--batch-size", batch_size)
    _check_positive("--num-last-layers", num_last_layers)
    if test_batch_size is not None:
        _check_positive("--test-batch-size", test_batch_size)
    _check_output(output)
    run = load_model(model_path, allow_pickle=allow_pickle)
    id_maps = run.resolve_id_maps(entity_to_id, relation_to_id)
    training = run.read_training(train_path, id_maps)  # labels, or PyKEEN's numeric triples
    test_file = _required_path(test_path, run.test_path, "--test", "test triples")
    test = read_labeled_triples(test_file)
    if mode is Mode.all:
        indices = list(range(len(test)))
    else:
        indices = _checked_indices(list(test_indices or [0]), test_file, len(test))
    ckpts = find_checkpoints(checkpoints) if checkpoints else run.checkpoints
    device = device or ("cuda" if _cuda_available() else "cpu")
    analyzer = TracInAnalyzer(
        run.model,
        use_last_layers_only=use_last_layers_only,
        num_last_layers=num_last_layers,
        last_layer_names=_split(last_layer_names),
        device=device,
        checkpoints=ckpts,
        loss=loss.value,
        batch_size=batch_size,
        id_maps=id_maps,
        progress=True,
        direction=direction.value,
        normalize=normalize,
        optimizer=optimizer.value,
    )
    console.print(f"parameters: {analyzer.selection.describe()}", highlight=False)
    console.print(
        f"checkpoints: {len(ckpts) or 'the model itself'}; training triples: {len(training.ids):,}; "
        f"test triples: {len(indices)}",
        highlight=False,
    )
    train_ids = training.ids
    warn_duplicates(train_ids, str(training.path), training.line_numbers)
    test_ids = id_maps.to_ids(test)[indices]
    config = {
        "command": "exact",
        "model_path": str(model_path),
        "train": str(training.path),
        "test": str(test_file),
        "checkpoints": [{"path": str(c.path), "epoch": c.epoch, "learning_rate": c.learning_rate} for c in ckpts],
        "parameters": analyzer.selection.to_json(),
        "loss": loss.value,
        "direction": direction.value,
        "inverse_triples": analyzer.gradients.inverse,
        "normalize": normalize,
        "optimizer": optimizer.value,
        "top_k": top_k,
    }
    # a pass holds each test triple's scores and norms against every training triple (float64)
    available = available_memory()
    per_test = 24 * max(1, len(train_ids))
    test_batch = test_batch_size or (len(indices) if available is None else max(1, min(len(indices), available // 4 // per_test)))
    analyzer.progress = test_batch >= len(indices)  # one pass: its own bar; several: one bar over the test triples
    keys = [(i, *map(str, test.labels[i].tolist())) for i in indices]

    def answer(batch: list[int]):
        return analyzer.compute_influences(test_ids[batch], train_ids, top_k=top_k, test_indices=[indices[i] for i in batch])

    results = _answer_in_batches(keys, answer, test_batch, output, config)
    if not output:
        render(results, out)


class Selection(str, Enum):
    last = "last"
    all = "all"


def _progress_bar(transient: bool = False):
    """A rich progress display and the callback the library reports to: (what, done, total); with the rate
    and the time left. ``transient``: gone when done (tables follow on the terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    rate = TextColumn("{task.fields[rate]}", markup=False)
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   rate, TimeRemainingColumn(), console=console, transient=transient)  # fmt: skip
    tasks: dict[str, int] = {}

    def report(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total, rate="")
        bar.update(tasks[what], completed=done, total=total)
        speed = bar.tasks[tasks[what]].speed
        bar.update(tasks[what], rate=f"{speed:,.1f}/s" if speed else "")

    return bar, report


@app.command()
def build(
    out_dir: Path = typer.Option(..., "--out", help="Index directory to write (or to resume)."),
    model_path: Path = typer.Option(..., help="Run directory, or a pickled PyKEEN model with --allow-pickle."),
    train_path: Optional[Path] = typer.Option(None, "--train", help="Training triples TSV [run dir's train.tsv]."),
    checkpoints: Optional[List[Path]] = typer.Option(None, metavar="<path>...", help="Checkpoint files or folders [run dir's]."),
    entity_to_id: Optional[Path] = typer.Option(None, help="entity_to_id.tsv(.gz) [run dir's]."),
    relation_to_id: Optional[Path] = typer.Option(None, help="relation_to_id.tsv(.gz) [run dir's]."),
    parameters: Selection = typer.Option(Selection.last, help="last: the last N layers; all: every parameter."),
    num_last_layers: int = typer.Option(2),
    last_layer_names: Optional[List[str]] = typer.Option(None, metavar="<name>...", help="Layer or parameter names (overrides --parameters)."),
    loss: Loss = typer.Option(Loss.bce),
    sketch_dim: int = typer.Option(
        None, help="Principal directions kept of a wide side (e.g. ConvE's Linear input) [128, or 256 where 128 "
        "leave over 10% of the sampled inputs' energy out]."
    ),
    seed: int = typer.Option(0, help="Seed of the sample the principal directions are fitted on."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... [cuda when available]."),
    batch_size: int = typer.Option(256),
    shard_size: int = typer.Option(None, help="Training rows per shard [16384]."),
    dask_workers: Optional[int] = typer.Option(
        None, help="Run the shard tasks on a local Dask cluster of N worker processes (needs the [distributed] extra)."),
    dask_scheduler: Optional[str] = typer.Option(
        None, help="Run the shard tasks on a running Dask cluster (e.g. tcp://host:8786); --out must be on a "
        "filesystem every worker sees."),
    index_shards: Optional[int] = typer.Option(
        None, help="Search shards (ranges of training triples) a cluster holds the index in for `query "
        "--dask-scheduler` [one per worker]."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow unpickling (runs arbitrary code)."),
):
    """Build an index of the training triples' gradient factors (resumes an interrupted build)."""
    from .build.runners import runner_for
    from .build.settings import DEFAULT_SHARD_SIZE, BuildSettings
    from .index import GradientIndex

    for flag, value in (("--num-last-layers", num_last_layers), ("--sketch-dim", sketch_dim), ("--batch-size", batch_size),
                        ("--shard-size", shard_size)):  # fmt: skip
        if value is not None:
            _check_positive(flag, value)
    names = _split(last_layer_names)
    settings = BuildSettings(
        selection="names" if names else parameters.value,
        num_last_layers=num_last_layers,
        layer_names=tuple(names or ()),
        loss=loss.value,
        sketch_dim=sketch_dim,
        seed=seed,
        batch_size=batch_size,
        shard_size=DEFAULT_SHARD_SIZE if shard_size is None else shard_size,
    )
    bar, report = _progress_bar()
    runner = runner_for(dask_workers=dask_workers, dask_scheduler=dask_scheduler)
    resumes = "run the same command to resume: it continues after the shard files already written"
    with _when_interrupted(resumes), bar, (runner or contextlib.nullcontext()):
        index_ = GradientIndex.build(
            out_dir,
            model_path=model_path,
            allow_pickle=allow_pickle,
            training_path=train_path,
            checkpoint_paths=checkpoints,
            entity_to_id=entity_to_id,
            relation_to_id=relation_to_id,
            settings=settings,
            device=device,
            log=lambda message: console.print(message, highlight=False),
            progress=report,
            runner=runner,
            index_shards=index_shards,
        )
    console.print(f"index written: {index_.directory} ({index_.num_triples:,} training triples, "
                  f"{_directory_bytes(index_.directory) / 2**20:,.1f} MiB)", highlight=False)  # fmt: skip


@app.command()
def query(
    index_dir: Path = typer.Argument(..., help="Index directory written by `tracin-index build`."),
    triple: Optional[List[str]] = typer.Option(None, metavar="<head> <relation> <tail>", help="HEAD RELATION TAIL (labels, or ids with --ids).", show_default=False),
    by_id: bool = typer.Option(False, "--ids", help="--triple gives ids, not labels."),
    test_path: Optional[Path] = typer.Option(None, "--test", help="TSV of test triples (labels)."),
    test_indices: Optional[List[int]] = typer.Option(None, metavar="<int>...", help="0-based rows of --test [all]."),
    top_k: int = typer.Option(10),
    candidates: Optional[int] = typer.Option(
        None, help="Rescore the K best estimates each way instead of every candidate the bounds leave (faster, "
        "not guaranteed to be the exact top k)."
    ),
    approximate: bool = typer.Option(False, "--approximate", help="Print the index's estimates; rescore nothing."),
    direction: Direction = typer.Option(Direction.tail, help=_DIRECTION_HELP),
    normalize: bool = typer.Option(False, "--normalize", help=_NORMALIZE_HELP),
    optimizer: Optimizer = typer.Option(Optimizer.sgd, help=_OPTIMIZER_HELP + " The index answers sgd only."),
    output: Optional[Path] = typer.Option(None, help="Write results as JSON (.json), TSV (.tsv), or JSON lines "
                                          "(.jsonl: one line per test triple as each batch completes; the same "
                                          "command again resumes after the last one written)."),
    batch_size: Optional[int] = typer.Option(None, help="Test triples answered per batch (each batch's results are "
                                             "written before the next one starts, with --output x.jsonl) [64, or "
                                             "a pass's worth where the index is scanned from its files in passes].",
                                             show_default=False),
    max_memory: Optional[str] = typer.Option(None, help=_MAX_MEMORY_HELP, show_default=False),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... [cuda when available]."),
    dask_scheduler: Optional[str] = typer.Option(
        None, help="Hold the index in search shards on a running Dask cluster's workers and query them there "
        "(the index directory on a filesystem they all see)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow unpickling (runs arbitrary code)."),
):
    """Proponents and opponents of test triples from an index, with exact TracIn scores."""
    import torch

    from .index import GradientIndex
    from .kg.triples import read_labeled_triples
    from .results import render

    _check_positive("--top-k", top_k)
    if triple is not None and len(triple) != 3:
        raise InputError(f"--triple takes HEAD RELATION TAIL, got {counted(len(triple), 'value')}: {' '.join(triple)}")
    if batch_size is not None:
        _check_positive("--batch-size", batch_size)
    _check_output(output)
    budget = None if max_memory is None else parse_size(max_memory, "--max-memory")
    if candidates is not None:
        _check_positive("--candidates", candidates)
    if approximate and candidates is not None:
        raise InputError("give --approximate or --candidates, not both")
    if optimizer is not Optimizer.sgd:
        raise InputError(f"the index scores plain TracIn (--optimizer sgd): its bounds hold for gradients, not for "
                         f"Adam's steps; for --optimizer {optimizer.value} use `tracin-index exact --optimizer "
                         f"{optimizer.value}` (one pass over the training set)")  # fmt: skip
    if (triple is None) == (test_path is None):
        raise InputError("give either --triple HEAD RELATION TAIL or --test FILE")
    client = None
    if dask_scheduler is not None:
        from .build.runners import DaskRunner

        client = DaskRunner.connect(dask_scheduler).client
    index_ = GradientIndex.open(index_dir, device=device, allow_pickle=allow_pickle, dask=client, max_memory=budget)
    if index_.passes is not None:
        console.print(index_.passes.describe())
        batch_size = batch_size or index_.passes.tests
    batch_size = batch_size or 64
    maps = index_.id_maps()
    if triple is not None:
        hrt = torch.tensor([maps.resolve_triple(*triple, by_id=by_id)])
        indices: list = [None]
    else:
        test = read_labeled_triples(test_path)
        indices = _checked_indices(list(test_indices) if test_indices else list(range(len(test))), test_path, len(test))
        hrt = maps.to_ids(test)[indices]
    config = {
        "command": "query",
        "index": str(index_dir),
        "top_k": top_k,
        "scores": "approximate" if approximate else "exact",
        "candidates": None if approximate else (candidates or "all the bounds leave"),
        "loss": index_.loss,
        "direction": direction.value,
        "inverse_triples": index_.inverse_triples,
        "normalize": normalize,
        "parameters": index_.manifest["selection"],
        "checkpoints": index_.manifest["inputs"]["checkpoints"],
    }
    labels = index_.files.row_labels()
    keys = [(indices[i], *labels.of(hrt[i].tolist())) for i in range(len(hrt))]

    def answer(batch: list[int]):
        return index_.query(hrt[batch], top_k=top_k, candidates=candidates, approximate=approximate,
                            test_indices=[indices[i] for i in batch], direction=direction.value,
                            normalize=normalize)  # fmt: skip

    results = _answer_in_batches(keys, answer, batch_size, output, config)
    if output:
        return
    if approximate:
        console.print("scores are the index's estimates, not exact TracIn (--approximate)")
    render(results, out)


@app.command("self-influence")
def self_influence(
    index_dir: Path = typer.Argument(..., help="Index directory written by `tracin-index build`."),
    top_k: int = typer.Option(20),
    output: Optional[Path] = typer.Option(None, help="Write all rows as TSV (.tsv) or the top-k as JSON (.json)."),
):
    """Training triples ranked by self-influence (sum over checkpoints of lr x squared gradient norm)."""
    from .index import GradientIndex
    from .results import write_self_influence

    _check_positive("--top-k", top_k)
    _check_output(output, (".tsv", ".json"))
    index_ = GradientIndex.open(index_dir)
    ranked = index_.self_influence(top_k=None if output and output.suffix.lower() == ".tsv" else top_k)
    if output:
        try:
            write_self_influence(output, ranked)
        except (OSError, MachineError) as error:
            _write_failed(output, error, lambda: _print_self_influence(ranked[:top_k]), f"the top {top_k} are printed above")
        console.print(f"self-influence written to {output}")
        return
    _print_self_influence(ranked)


def _print_self_influence(ranked) -> None:
    from rich.table import Table

    table = Table(title="Training triples by self-influence", title_justify="left")
    for column in ("#", "train row", "head", "relation", "tail", "self-influence"):
        table.add_column(column, justify="right" if column in {"#", "train row", "self-influence"} else "left")
    for rank, item in enumerate(ranked, start=1):
        table.add_row(str(rank), str(item.train_index), item.head, item.relation, item.tail, f"{item.self_influence:.4g}")
    out.print(table)


@app.command()
def serve(
    index_dir: Path = typer.Argument(..., help="Index directory written by `tracin-index build`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, help="Require 'Authorization: Bearer TOKEN' on every request "
                                        "(the explorer: http://HOST:PORT/?token=TOKEN).", envvar="TRACIN_TOKEN"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... [cuda when available]."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow unpickling (runs arbitrary code)."),
    batching: bool = typer.Option(True, "--batching/--no-batching",
                                  help="Answer the queries that arrive while one runs together, in one pass."),
    max_memory: Optional[str] = typer.Option(None, help=_MAX_MEMORY_HELP, show_default=False),
):
    """Serve the index: a JSON API (docs at /docs) and an explorer in the browser at /."""
    from .serve.app import serve as run_server

    if not 0 < port < 65536:
        raise InputError(f"--port {port}: not a port number (1..65535)")
    budget = None if max_memory is None else parse_size(max_memory, "--max-memory")
    banner = f"serving {index_dir} at http://{host}:{port}/ (API docs at /docs); Ctrl-C stops it"
    run_server(index_dir, host=host, port=port, token=token, allow_pickle=allow_pickle, device=device, batching=batching,
               max_memory=budget, warn=lambda m: console.print(Text(m, style="yellow")),
               ready=lambda: console.print(banner, highlight=False))  # fmt: skip


@app.command()
def verify(index_dir: Path = typer.Argument(..., help="Index directory.")):
    """Check every file of an index against the checksums in its manifest, and that the model, checkpoints and
    training triples it was built from are unchanged (loads no model)."""
    from .storage.layout import read_manifest, refuse_while_building
    from .storage.reader import verify_directory, verify_inputs

    refuse_while_building(index_dir)  # its files are not yet those the finished manifest will record
    manifest = read_manifest(index_dir)
    damaged, changed = verify_directory(index_dir, manifest), verify_inputs(index_dir, manifest)
    for problem in damaged:
        console.print(styled("damaged:", "red", problem))
    for problem in changed:
        console.print(styled("changed:", "red", problem))
    if damaged or changed:
        what = [f"{counted(len(damaged), 'file')} damaged (run the same `tracin-index build` again to rebuild them)"] if damaged else []
        what += [f"{counted(len(changed), 'input')} missing or changed (queries refuse the index until they are restored or it is "
                 "rebuilt)"] if changed else []  # fmt: skip
        raise InputError(f"{index_dir}: " + "; ".join(what))
    console.print("all files match their checksums, and the model, checkpoints and training triples are those it was built from")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("tracin-demo"), "--out", help="Working directory (run and index)."),
    epochs: int = typer.Option(9),
    checkpoint_every: int = typer.Option(3),
    top_k: int = typer.Option(5),
):
    """Train a small ConvE on the bundled UMLS, build its gradient index and explain a test triple."""
    import time

    import torch

    from .index import GradientIndex
    from .kg.training import train_run
    from .kg.triples import read_labeled_triples
    from .results import render

    run_dir, index_dir = out_dir / "run", out_dir / "index"
    started = time.perf_counter()
    if (run_dir / "model.pt").is_file():
        console.print(f"1/3 reusing the trained model in {run_dir}")
    else:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # an unfinished demo run: start it again
        console.print(f"1/3 training ConvE on UMLS for {epochs} epochs, a checkpoint every {checkpoint_every} -> {run_dir}")
        train_run(run_dir, dataset="umls", model="ConvE", epochs=epochs, checkpoint_every=checkpoint_every,
                  learning_rate=0.001, batch_size=256, random_seed=42)  # fmt: skip
    console.print(f"2/3 building the gradient index -> {index_dir}")
    bar, report = _progress_bar()
    with bar:
        index_ = GradientIndex.build(index_dir, model_path=run_dir, log=lambda m: console.print(f"    {m}", highlight=False),
                                     progress=report)  # fmt: skip
    test = read_labeled_triples(run_dir / "test.tsv")
    maps = index_.id_maps()
    hrt = torch.tensor([maps.resolve_triple(*test.labels[0])])
    query_started = time.perf_counter()
    results = index_.query(hrt, top_k=top_k, test_indices=[0])
    query_ms = (time.perf_counter() - query_started) * 1000
    console.print(f"3/3 proponents and opponents of the first test triple, exact TracIn ({query_ms:.0f} ms from the index):")
    render(results, out)
    h, r, t = test.labels[0]
    console.print(
        f"done in {time.perf_counter() - started:.0f} s, {_directory_bytes(out_dir) / 2**20:,.0f} MiB in {out_dir}. "
        f"Next: tracin-index query {index_dir} --triple {h} {r} {t}   |   "
        f"tracin-index exact --model-path {run_dir} --use-last-layers-only",
        highlight=False,
    )


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _answer_in_batches(keys: list[tuple], answer, batch_size: int, output: Path | None, config: dict):
    """Answer the test triples (``keys``: their (test_index, head, relation, tail)) a batch at a time,
    ``answer(positions)`` -> results, with a progress bar where there is more than one batch. With
    ``output`` a .jsonl file each batch's results are appended as it completes (those already there are
    skipped: a rerun resumes); else the results are written to ``output`` (.json, .tsv) at the end, or
    returned."""
    from .results import JsonlResults, render, write_results

    streamed = JsonlResults.open(output, config) if output and output.suffix.lower() == ".jsonl" else None
    todo = list(range(len(keys)))
    if streamed is not None:
        todo = [i for i in todo if keys[i] not in streamed.done]
        if len(todo) < len(keys):
            console.print(f"{output}: {len(keys) - len(todo):,} of {counted(len(keys), 'test triple')} already answered; "
                          f"{'resuming' if todo else 'nothing left to do'}")  # fmt: skip
    results = []
    bar, report = _progress_bar(transient=output is None)
    with bar if len(todo) > batch_size else contextlib.nullcontext(), _resumable(streamed):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            found = answer(batch)
            if streamed is not None:
                streamed.append(found)
            else:
                results.extend(found)
            report("test triples", start + len(batch), len(todo))
    if streamed is not None:
        console.print(f"results of {counted(len(streamed.done), 'test triple')} in {output}")
    elif output:
        try:
            write_results(output, results, config)
        except (OSError, MachineError) as error:
            _write_failed(output, error, lambda: render(results, out), "the results are printed above")
        console.print(f"results written to {output}")
    return results


def _write_failed(output: Path, error: OSError | MachineError, show, shown: str) -> None:
    """The work is done but ``output`` could not be written: ``show()`` the results on the terminal, then one
    line (``shown``: what was printed), exit 1."""
    show()
    why = f"the disk is full, {mib(error.free)} free" if isinstance(error, DiskFullError) else getattr(error, "strerror", None) or error
    console.print(styled("error:", "red", f"{output}: could not be written ({why}); {shown}, nothing else was written"))
    raise SystemExit(1)


@contextlib.contextmanager
def _resumable(streamed):
    """Where results are streamed to a .jsonl file, an interruption says what is kept and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        if streamed is not None:
            console.print(f"{streamed.path}: {counted(len(streamed.done), 'test triple')} written; the same command resumes "
                          "after them")  # fmt: skip
        raise


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
               "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}  # fmt: skip


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size as a person writes it: ``4G``, ``500M``, ``1.5GiB``, ``4000MB``, ``1048576``."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise InputError(f"{flag} {text!r}: not a size; give a positive number of bytes with an optional unit "
                         "(K, M, G, T; e.g. 4G, 500M, 1.5GiB)")  # fmt: skip
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _check_positive(flag: str, value: int) -> None:
    if value < 1:
        raise InputError(f"{flag} must be at least 1, got {value}")


RESULT_SUFFIXES = (".json", ".tsv", ".jsonl")


def _check_output(output: Optional[Path], suffixes: Sequence[str] = RESULT_SUFFIXES) -> None:
    """``--output`` checked before anything is loaded: a known extension, not a folder, not under a file, and
    a folder that can be written (tried) or made: a run should not compute for an hour and then fail to write."""
    if output is None:
        return
    if output.suffix.lower() not in suffixes:
        raise InputError(f"--output {output}: unknown extension {output.suffix or '(none)'!r}; give a file ending in "
                         f"{', '.join(suffixes)}")  # fmt: skip
    if output.is_dir():
        raise InputError(f"--output {output}: is a folder; give a file name ending in {', '.join(suffixes)}")
    existing = output.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--output {output}: {existing} is a file, not a folder")
    import tempfile

    try:  # a probe file where the results will go (the folders below it are made when they are written)
        with tempfile.TemporaryFile(dir=existing, prefix=".tracin-index-write-test-"):
            pass
    except OSError as error:
        raise InputError(f"--output {output}: cannot write in {existing} ({error.strerror or error})") from None


def _split(values: Optional[List[str]]) -> list[str] | None:
    from .gradients.selection import split_names

    return split_names(values) or None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _required_path(given: Optional[Path], default: Optional[Path], flag: str, what: str) -> Path:
    path = given or default
    if path is None:
        raise InputError(f"no {what}: pass {flag} (the model directory has none)")
    return path


def _checked_indices(indices: list[int], test_file: Path, num_test: int) -> list[int]:
    bad = [i for i in indices if not 0 <= i < num_test]
    if bad:
        raise InputError(f"--test-indices {bad[0]} is out of range: {test_file} has {num_test} triples (0..{num_test - 1})")
    return indices


if __name__ == "__main__":  # pragma: no cover
    main()
