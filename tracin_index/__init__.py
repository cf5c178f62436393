"""TracIn proponents and opponents for PyKEEN models.

The public API, importable from the top level (loaded on first use, so that ``import tracin_index``
stays fast)::

    from tracin_index import GradientIndex, TracInAnalyzer, TracInCheckpointCallback, load_run
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

#: public name -> module that defines it
_PUBLIC = {
    "GradientIndex": ".index",
    "TracInAnalyzer": ".exact",
    "TracInCheckpointCallback": ".kg.callback",
    "load_run": ".kg.runs",
    "load_model": ".kg.runs",
    "save_run_directory": ".kg.runs",
    "train_run": ".kg.training",
    "Checkpoint": ".kg.checkpoints",
    "find_checkpoints": ".kg.checkpoints",
    "IdMaps": ".kg.triples",
    "read_labeled_triples": ".kg.triples",
    "BuildSettings": ".build.settings",
    "LocalRunner": ".build.runners",
    "DaskRunner": ".build.runners",
    "InfluenceResult": ".results",
    "Influence": ".results",
    "Triple": ".results",
    "SelfInfluence": ".results",
    "write_results": ".results",
    "TracInError": ".errors",
    "InputError": ".errors",
    "TracInWarning": ".errors",
}

__all__ = [
    "__version__",
    "GradientIndex",
    "TracInAnalyzer",
    "TracInCheckpointCallback",
    "load_run",
    "load_model",
    "save_run_directory",
    "train_run",
    "Checkpoint",
    "find_checkpoints",
    "IdMaps",
    "read_labeled_triples",
    "BuildSettings",
    "LocalRunner",
    "DaskRunner",
    "InfluenceResult",
    "Influence",
    "Triple",
    "SelfInfluence",
    "write_results",
    "TracInError",
    "InputError",
    "TracInWarning",
]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tracin_index' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .build.runners import DaskRunner, LocalRunner
    from .build.settings import BuildSettings
    from .errors import InputError, TracInError, TracInWarning
    from .exact import TracInAnalyzer
    from .index import GradientIndex
    from .kg.callback import TracInCheckpointCallback
    from .kg.checkpoints import Checkpoint, find_checkpoints
    from .kg.runs import load_model, load_run, save_run_directory
    from .kg.training import train_run
    from .kg.triples import IdMaps, read_labeled_triples
    from .results import Influence, InfluenceResult, SelfInfluence, Triple, write_results
