"""What this machine offers: memory available to new allocations, and the device to compute on."""

from __future__ import annotations

#: The memory budget of a query process, by default: this share of the memory available when it opens the index.
DEFAULT_BUDGET_SHARE = 0.25
#: An index is held in memory while its stored arrays take at most this share of the budget; the rest
#: is a batch's working memory (the estimates of every row for each test triple scanned together).
HELD_SHARE = 0.25


def budget_to_hold(arrays_bytes: float) -> float:
    """The smallest memory budget under which an index whose stored arrays take ``arrays_bytes`` is held."""
    return arrays_bytes / HELD_SHARE


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_device() -> str:
    """``cuda`` where torch sees a GPU, else ``cpu``: the default of every command's ``--device``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
