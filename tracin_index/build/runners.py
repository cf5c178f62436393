"""Where the build's tasks run: in this process (the default) or on a Dask cluster.

Dask (``pip install -e '.[distributed]'``) schedules, retries and moves data; nothing here is a
scheduler of its own. ``--dask-workers N`` starts a ``LocalCluster`` of N worker processes on this
machine, ``--dask-scheduler ADDRESS`` sends the tasks to a running cluster (SLURM or PBS through
``dask-jobqueue``, or ``dask scheduler`` / ``dask worker`` by hand). The index directory must be on
a filesystem that every worker sees: a task writes its shard file there, atomically, and returns
only the shard's record to the building process, which keeps the manifest.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterable, Iterator, Protocol

from ..errors import InputError, MachineError, TracInError
from .task import BuildTask, run_task

#: Attempts of a failed task beyond the first, on any worker, before the build stops and names it.
RETRIES = 2


class Runner(Protocol):
    #: torch threads per task (None: leave torch's default)
    threads: int | None

    def run(self, batches: Iterable[list[BuildTask]]) -> Iterator[tuple[BuildTask, dict]]:
        """Run the tasks, batch by batch (a batch is asked for once the one before is under way: the
        building process prepares the next checkpoint meanwhile); yields (task, record) as each
        completes (any order)."""
        ...


class LocalRunner:
    """Every task in this process, in order (the single-process build)."""

    threads = None

    def run(self, batches: Iterable[list[BuildTask]]) -> Iterator[tuple[BuildTask, dict]]:
        for tasks in batches:
            for task in tasks:
                yield task, run_task(task)


def worker_environment() -> dict:
    """Dask's environment for new worker processes, without ``MALLOC_TRIM_THRESHOLD_``: Dask sets it
    (to 64 KiB) to hand freed memory back to the system sooner, but setting it turns off glibc's
    adaptive mmap threshold, so every large temporary (ConvE's 10,368-wide activations) is mapped and
    unmapped again, and a task spends much of its time in system calls (``benchmarks/dask_cluster.py``
    times a task in a worker against the same task in the building process)."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise InputError("--dask-workers / --dask-scheduler need Dask's distributed scheduler: "
                         "pip install -e '.[distributed]' (or pip install 'distributed')") from None  # fmt: skip
    return distributed


class DaskRunner:
    """The tasks on a Dask cluster: submitted at once (checkpoint by checkpoint, so that a worker tends
    to keep one checkpoint loaded), collected as they complete, each retried :data:`RETRIES` times
    (a worker that dies takes its running task with it; Dask reschedules it) and then reported by
    its shard. ``threads``: torch threads per task, so that tasks on one machine do not oversubscribe it."""

    def __init__(self, client, *, threads: int | None = 1, retries: int = RETRIES, cluster=None):
        self.client, self.threads, self.retries, self._cluster = client, threads, retries, cluster

    @classmethod
    def local(cls, workers: int, *, threads: int | None = None) -> "DaskRunner":
        """A ``LocalCluster`` of ``workers`` single-threaded worker processes on this machine, each task
        with ``threads`` torch threads (default: the cores shared out, at least 1)."""
        if workers < 1:
            raise InputError(f"--dask-workers must be at least 1, got {workers}")
        distributed = _import_distributed()
        import dask

        with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environment()}):
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=40)  # fmt: skip
        client = distributed.Client(cluster)
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        return cls(client, threads=threads, cluster=cluster)

    @classmethod
    def connect(cls, address: str, *, threads: int | None = 1, timeout: str = "20s") -> "DaskRunner":
        distributed = _import_distributed()
        try:
            client = distributed.Client(address, timeout=timeout)
        except (OSError, TimeoutError) as error:
            raise InputError(f"--dask-scheduler {address}: cannot reach the scheduler ({error})") from None
        return cls(client, threads=threads)

    def run(self, batches: Iterable[list[BuildTask]]) -> Iterator[tuple[BuildTask, dict]]:
        distributed = _import_distributed()
        build = uuid.uuid4().hex[:8]
        futures = {}
        completed = distributed.as_completed()

        def result(future) -> tuple[BuildTask, dict]:
            task = futures[future]
            try:
                return task, future.result()
            except TracInError:  # bad input, or a full disk: as it would be here
                raise
            except Exception as error:  # the worker's exception (or its death), after the retries: not the input
                raise MachineError(f"{task.shard.relative_path}: failed on the cluster after {self.retries} retries "
                                   f"({type(error).__name__}: {error}); the same command resumes after the shard files "
                                   "already written") from None  # fmt: skip

        try:
            for tasks in batches:  # the next batch is prepared while this one runs on the workers
                for task in tasks:
                    key = f"tracin-shard-{task.shard.checkpoint}-{task.shard.shard}-{build}"
                    future = self.client.submit(run_task, task, key=key, retries=self.retries, pure=False)
                    futures[future] = task
                    completed.add(future)
                for future in completed.next_batch(block=False) if completed.has_ready() else []:
                    yield result(future)
            for future in completed:
                yield result(future)
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> "DaskRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def runner_for(*, dask_workers: int | None = None, dask_scheduler: str | None = None):
    """The runner the options ask for: None (this process), a local cluster, or an existing scheduler."""
    if dask_workers is not None and dask_scheduler is not None:
        raise InputError("give --dask-workers or --dask-scheduler, not both")
    if dask_workers is not None:
        return DaskRunner.local(dask_workers)
    if dask_scheduler is not None:
        return DaskRunner.connect(dask_scheduler)
    return None
