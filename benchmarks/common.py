"""Shared helpers of the benchmark scripts: machine and version info, the quiet-machine timing guard,
results files and the shared ``benchmarks/results/summary.json``.

Import from a script in ``benchmarks/`` (the folder is not a package)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import QuietGuard, machine_info, update_summary, versions, write_results

- :func:`machine_info` / :func:`versions` / :func:`command_line`: what ran where, for the JSON.
- :class:`QuietGuard`: on a shared machine, wait for other processes to go quiet before a timed run,
  measure the cores they used during it (from ``/proc/stat``) and re-run a disturbed run, keeping the
  least disturbed attempt (never simply the fastest). The CPU time of this process *and of its reaped
  children* counts as ours, so a timed subprocess is not mistaken for another process.
- :func:`run_measured`: run a command in a subprocess; its wall time, CPU time and peak RSS (``wait4``).
- :func:`write_results`: ``benchmarks/results/<name>.json`` written atomically, with machine, versions,
  command and date added.
- :func:`update_summary`: read-modify-write of ``benchmarks/results/summary.json`` under an ``fcntl``
  lock, atomically, keeping the keys other scripts wrote.
- :func:`peak_rss_mb`: peak resident memory of this process (or its reaped children) in MiB.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
#: where results files go: benchmarks/results/, or TRACIN_BENCH_RESULTS (smoke runs write elsewhere)
RESULTS = Path(os.environ.get("TRACIN_BENCH_RESULTS") or REPO / "benchmarks" / "results")
SUMMARY = RESULTS / "summary.json"

__all__ = [
    "REPO", "RESULTS", "SUMMARY", "Measurement", "QuietGuard", "command_line", "cpu_counters", "foreign_cores",
    "machine_info", "peak_rss_mb", "run_measured", "update_summary", "versions", "write_json_atomic", "write_results",
]  # fmt: skip


# -- what ran where ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_gib(field: str) -> float | None:
    """A ``/proc/meminfo`` field (``MemTotal``, ``MemAvailable``) in GiB; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ram_total_gib() -> float | None:
    total = _meminfo_gib("MemTotal")
    if total is not None:
        return total
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 2)
    except Exception:  # noqa: BLE001 - informative only
        return None


def _ram_available_gib() -> float | None:
    return _meminfo_gib("MemAvailable")


def machine_info() -> dict[str, Any]:
    """Platform, CPU model, cores, torch threads, RAM (total and available now), load average now."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "ram_total_gib": _ram_total_gib(),
        "ram_available_gib": _ram_available_gib(),
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    else:
        try:
            import torch

            info["torch_threads"] = torch.get_num_threads()
        except ImportError:
            info["torch_threads"] = None
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    return info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def versions() -> dict[str, Any]:
    """python, torch, pykeen, numpy, h5py, tracin_index versions; git commit and uncommitted tracked files."""
    modified = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "pykeen": _version("pykeen"),
        "numpy": _version("numpy"),
        "h5py": _version("h5py"),
        "tracin_index": _version("tracin-index"),
        "git_commit": (_git("rev-parse", "HEAD") or "").strip() or None,
        # the benchmarks run the working tree: tracked files that differ from the commit are named here
        "git_uncommitted_tracked_files": None if modified is None else [line[3:] for line in modified.splitlines() if line.strip()],
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed (``python benchmarks/x.py --flag ...``), shell-quoted."""
    return " ".join(shlex.quote(a) for a in ["python", *(sys.argv if argv is None else argv)])


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- memory ---------------------------------------------------------------------------------------


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size in MiB of this process (``children``: the largest reaped child), ru_maxrss (KiB on Linux)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # macOS reports bytes
    return usage.ru_maxrss * scale / 1024


# -- the quiet-machine guard ----------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_counters() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process and its reaped children), None without /proc."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in own[11:15])
    except (OSError, ValueError, IndexError):
        return None
    busy = (user + nice + system + irq + softirq + steal) / _CLK_TCK
    return time.perf_counter(), busy, (utime + stime + cutime + cstime) / _CLK_TCK


def foreign_cores(before, after, extra_own_cpu_s: float = 0.0) -> float | None:
    """Average number of cores other processes kept busy between two :func:`cpu_counters`.

    ``extra_own_cpu_s``: CPU seconds of our own that the counters cannot see (a child still running
    or not reaped by ``waitpid`` through ``os.wait*``) to subtract as well.
    """
    if before is None or after is None or after[0] <= before[0]:
        return None
    own = (after[2] - before[2]) + extra_own_cpu_s
    return max(0.0, ((after[1] - before[1]) - own) / (after[0] - before[0]))


@dataclass
class Measurement:
    seconds: float
    foreign: float | None  # cores other processes used during the kept attempt
    waited: float  # seconds spent waiting for quiet, all attempts
    attempts: int
    result: Any = None
    foreign_per_attempt: list = field(default_factory=list)


@dataclass
class QuietGuard:
    """Shared-machine guard around one timed run.

    Before a run, wait (up to ``max_wait`` s, in 0.5 s samples) until other processes use under
    ``quiet_cores`` cores; measure the cores they used during the run; if that was ``quiet_cores`` or
    more, run again (up to ``retries`` times) and keep the attempt least disturbed by others (never
    the fastest as such). After ``deadline`` (a ``time.perf_counter()`` value) runs are taken as they come.
    ``fn`` returns ``(seconds, result)``; a ``result`` that is a dict with ``"own_cpu_s_unseen"``
    has that subtracted (CPU of a child that ``/proc/self/stat`` cannot see).
    """

    quiet_cores: float = 0.3
    max_wait: float = 20.0
    retries: int = 2
    deadline: float = float("inf")

    def wait(self) -> float:
        waited = 0.0
        while waited < self.max_wait and time.perf_counter() < self.deadline:
            before = cpu_counters()
            time.sleep(0.5)
            waited += 0.5
            foreign = foreign_cores(before, cpu_counters())
            if foreign is None or foreign < self.quiet_cores:
                break
        return waited

    def measure(self, fn: Callable[[], tuple[float, Any]]) -> Measurement:
        best: Measurement | None = None
        waited = 0.0
        per_attempt = []
        attempt = 0
        for attempt in range(1, self.retries + 2):
            waited += self.wait()
            before = cpu_counters()
            seconds, result = fn()
            unseen = result.get("own_cpu_s_unseen", 0.0) if isinstance(result, dict) else 0.0
            foreign = foreign_cores(before, cpu_counters(), unseen)
            per_attempt.append(foreign)
            if best is None or (foreign is not None and best.foreign is not None and foreign < best.foreign):
                best = Measurement(seconds, foreign, 0.0, 0, result)
            if foreign is None or foreign < self.quiet_cores or time.perf_counter() >= self.deadline:
                break
        best.waited, best.attempts, best.foreign_per_attempt = waited, attempt, per_attempt
        return best

    def describe(self) -> str:
        return (
            f"before each timed run, wait up to {self.max_wait:g} s for other processes to use under "
            f"{self.quiet_cores:g} cores; re-run a run during which they used more, up to {self.retries} times, "
            "keeping the least disturbed attempt; the cores others used are recorded"
        )


# -- subprocesses -------------------------------------------------------------------------------


def run_measured(cmd: Sequence[str], *, env: dict | None = None, cwd: str | os.PathLike | None = None,
                 timeout: float | None = None, log_path: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``cmd``; returns wall_s, user_s, sys_s, peak_rss_mb (the child's ru_maxrss from ``wait4``),
    returncode, foreign_cores (others' load during the run) and the output tail (all output to ``log_path``).
    """
    log = open(log_path, "wb") if log_path else subprocess.PIPE
    before = cpu_counters()
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    output = b""
    try:
        if log is subprocess.PIPE:
            # small outputs only: read all, then reap with wait4 for the child's own rusage
            output = proc.stdout.read()
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log is not subprocess.PIPE and log_path:
            log.close()
    wall = time.perf_counter() - start
    after = cpu_counters()
    if log_path:
        output = Path(log_path).read_bytes()
    return {
        "command": " ".join(shlex.quote(str(c)) for c in cmd),
        "returncode": proc.returncode,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        # wait4 reaped the child, so its CPU is in our cutime/cstime: what remains is other processes'
        "foreign_cores": foreign_cores(before, after),
        "output_tail": output.decode(errors="replace")[-4000:],
    }


# -- results files ------------------------------------------------------------------------------


MEASURE_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from common import run_measured
print(json.dumps(run_measured(json.loads(sys.argv[2]), env=json.loads(sys.argv[3]), log_path=sys.argv[4] or None)))
"""


def run_measured_from_small_process(cmd: Sequence[str], *, env: dict | None = None,
                                    log_path: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """:func:`run_measured` from a fresh small Python process: a child's ru_maxrss counts its parent's memory at
    fork, so a command measured from a process that holds a model or an index reports at least that."""
    here = str(Path(__file__).resolve().parent)
    helper = subprocess.run([sys.executable, "-c", MEASURE_WORKER, here, json.dumps([str(c) for c in cmd]),
                             json.dumps(dict(os.environ if env is None else env)), str(log_path or "")],
                            capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(helper.stdout.strip().splitlines()[-1])


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """JSON with numpy and torch values turned into plain ones, written whole (tracin_index.files)."""
    from tracin_index.files import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n", fsync=True)
    return Path(path)


def _json_default(value: Any) -> Any:
    for attr in ("tolist", "item"):  # numpy / torch scalars and arrays
        if hasattr(value, attr):
            return getattr(value, attr)()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_results(name: str, data: dict[str, Any], *, results_dir: str | os.PathLike | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically; adds machine, versions, command and date
    (keys already in ``data`` are kept as given)."""
    out = {"benchmark": name, **data}
    out.setdefault("machine", machine_info())
    out.setdefault("versions", versions())
    out.setdefault("command", command_line())
    out.setdefault("date", utc_now())
    return write_json_atomic(Path(results_dir or RESULTS) / f"{name}.json", out)


def update_summary(keys: dict[str, Any], *, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Merge ``keys`` into ``summary.json`` (other keys kept) under an exclusive lock; returns the new summary."""
    path = Path(path or SUMMARY)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the lock file lives outside the repository (no untracked file in benchmarks/results/), one per summary path
    lock_path = Path(tempfile.gettempdir()) / f"tracin-bench-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            if not isinstance(summary, dict):
                raise ValueError(f"{path} does not hold a JSON object")
            summary.update(keys)
            write_json_atomic(path, summary)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return summary


#: The settings whose default query and size the issue's accuracy and size targets are about.
ACCURACY_SETTINGS = (("agreement", "umls-conve"), ("agreement", "kinships-conve"), ("scale", "1m"))


def update_accuracy_summary() -> dict[str, Any]:
    """Write ``recall_at_10_proponents`` / ``recall_at_10_opponents`` (the lowest over UMLS and Kinships
    ConvE in agreement.json and the 1M graph in scale.json, default query) and ``index_bytes_per_triple_ckpt``
    (the largest of them) from whichever of those results files exist; the settings they cover are listed."""
    found = []
    for name, setting in ACCURACY_SETTINGS:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        row = data.get("results", {}).get(setting)
        if row is None:
            continue
        default = row["indexes"]["default"]
        found.append((f"{name}:{setting}", default["default"], default["bytes_per_triple_checkpoint"]))
    if not found:
        return {}
    return update_summary({
        "recall_at_10_proponents": round(min(f[1]["recall_at_10_proponents"] for f in found), 4),
        "recall_at_10_opponents": round(min(f[1]["recall_at_10_opponents"] for f in found), 4),
        "index_bytes_per_triple_ckpt": round(max(f[2] for f in found)),
        "accuracy_settings": [f[0] for f in found],
    })
