"""Checkpoints: the weights TracIn visits, each with its learning rate (and, for Adam-aware scores, the
optimizer's second moments: :func:`optimizer_record`), read without running code.

Everything here needs torch only (not PyKEEN), so that a query can load checkpoints without paying
for PyKEEN's import. :class:`CheckpointModels` holds the model at every checkpoint, loaded once,
for the build, queries and exact rescoring alike.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import ModelLoadError, TracInWarning, shown

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def optimizer_record(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint keeps of ``optimizer`` for Adam-aware scores: plain tensors and numbers only
    (loadable with ``weights_only=True``). Parameters the optimizer has not stepped yet are left out."""
    record: dict[str, Any] = {"name": type(optimizer).__name__}
    if "exp_avg_sq" not in {key for state in optimizer.state.values() for key in state}:
        return record
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    second, steps = {}, {}
    for name, parameter in model.named_parameters():
        state = optimizer.state.get(parameter, {})
        if "exp_avg_sq" not in state:
            continue
        second[name] = state["exp_avg_sq"].detach().cpu().clone()
        steps[name] = int(state["step"]) if "step" in state else 0
        group = group_of[id(parameter)]
        record.setdefault("beta2", float(group["betas"][1]))
        record.setdefault("eps", float(group["eps"]))
    record["exp_avg_sq"] = second
    record["step"] = steps
    return record


def load_state_dict_into(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Load ``state_dict`` strictly, with an error that names the first parameter that does not fit."""
    check_state_dict(model, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Refuse (:class:`ModelLoadError`, naming the first parameter) a state dict that does not fit ``model``: other
    names, shapes, a complex tensor for a real parameter, one without data. ``model`` may be on the meta device."""
    expected = model.state_dict()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{source}: entry {name!r} of the state dict is a {type(value).__name__}, not a tensor")
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_first_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_first_few(unexpected)}")
        raise ModelLoadError(
            f"{source}: the parameters do not match the model {type(model).__name__} "
            f"({'; '.join(parts)}); was the file written for another model class?"
        )
    for name, value in state_dict.items():
        if value.is_meta:
            raise ModelLoadError(f"{source}: parameter {name!r} is a tensor without data (on the meta device)")
        if value.is_complex() and not expected[name].is_complex():  # copying it in would drop the imaginary part
            raise ModelLoadError(f"{source}: parameter {name!r} is complex ({value.dtype}) in the file but "
                                 f"{expected[name].dtype} in the model {type(model).__name__}")  # fmt: skip
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"{source}: parameter {name!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(expected[name].shape)} in the model {type(model).__name__}; the model_kwargs or the "
                f"number of entities/relations differ from those the file was written with"
            )


def _first_few(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------------------
# Reading torch files without running code


class NeedsPickle(Exception):
    """The file holds Python objects that only a full (code-running) unpickle can restore."""


def load_weights_only(path: Path) -> Any:
    """``torch.load`` restricted to plain tensors, numbers, strings, lists and dicts (runs no code)."""
    try:
        with warnings.catch_warnings():
            # torch's notice about pickle protocols is noise when the probe is expected to fail
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # mmap: a checkpoint that also holds the optimizer state is read only as far as it is used
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as error:
        if not _looks_like_torch_file(path):
            raise ModelLoadError(_NOT_TORCH.format(path=path)) from error
        raise NeedsPickle(str(error)) from error
    except Exception as error:  # torch raises KeyError, EOFError, RuntimeError ... for non-torch files
        raise ModelLoadError(
            f"{path}: is not a PyTorch file that can be read with weights_only=True ({_said(error)}); only "
            f"torch.save files of plain tensors and numbers are accepted"
        ) from error


def _said(error: Exception, limit: int = 120) -> str:
    """What torch's error says, on one line: its first line, cut (some run to a paragraph)."""
    first = next(iter(str(error).strip().splitlines()), "")
    return f"{type(error).__name__}: {first if len(first) <= limit else first[:limit] + '...'}"


_NOT_TORCH = ("{path}: is not a PyTorch file (neither a torch.save archive nor a pickle); expected a checkpoint "
              "written by torch.save, e.g. {{'model_state_dict': model.state_dict(), 'learning_rate': 0.001, 'epoch': 5}}")


def _is_zip(path: Path) -> bool:
    """A torch.save archive (the format torch.load can memory-map), not a legacy pickle."""
    import zipfile

    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _looks_like_torch_file(path: Path) -> bool:
    """A torch.save archive (a zip holding a data.pkl) or a legacy pickle (protocol 2+ starts with 0x80)."""
    import zipfile

    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return dict(obj[key])
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)  # a bare state dict, as torch.save(model.state_dict()) writes it
        found = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
    else:
        found = f"none (it holds a {type(obj).__name__})"
    raise ModelLoadError(f"{path}: no 'model_state_dict' or 'state_dict' in the file; keys found: {found}")


# --------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One set of weights TracIn visits, and the learning rate that weighs it.

    ``path`` None stands for the model as loaded (no checkpoint files given).
    """

    path: Path | None
    epoch: int | None
    learning_rate: float

    def load_into(self, model: torch.nn.Module) -> None:
        """Put this checkpoint's weights into ``model`` (eval mode); the model's own weights for ``path`` None."""
        if self.path is not None:
            load_state_dict_into(model, self.load_state_dict(), str(self.path))
        model.eval()

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        if self.path is None:
            raise ValueError("this checkpoint stands for the loaded model itself; it has no file to load")
        return read_state_dict(self.path)

    def optimizer_state(self) -> Any:
        """The optimizer's record this checkpoint file holds (:func:`optimizer_record`), or None."""
        if self.path is None:
            raise ValueError("this checkpoint stands for the loaded model itself; it has no file to read")
        obj = _load_checked(self.path)
        return obj.get("optimizer") if isinstance(obj, Mapping) else None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a torch file of plain tensors and numbers (``weights_only``: runs no code)."""
    return _state_dict_of(_load_checked(path), path)


def _load_checked(path: Path) -> Any:
    """:func:`load_weights_only`, refusing (:class:`ModelLoadError`) a file that holds more than plain tensors and numbers."""
    try:
        return load_weights_only(path)
    except NeedsPickle as error:
        raise ModelLoadError(_not_plain_message(path)) from error


def _not_plain_message(path: Path) -> str:
    return (
        f"{path}: holds Python objects that cannot be loaded with weights_only=True; checkpoint files may "
        f"hold only plain tensors and numbers, e.g. {{'model_state_dict': model.state_dict(), "
        f"'learning_rate': 0.001, 'epoch': 5}}"
    )


def find_checkpoints(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """The checkpoint files in ``paths`` (files, or folders of ``*.pt``/``*.pth``/``*.ckpt``), by epoch.

    Files that record no epoch come after those that do, by name. A file without a learning rate
    counts with 1.0 (and a :class:`TracInWarning`).
    """
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such checkpoint file or folder")
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                # hidden files are the callback's half-written temporaries
                if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".")
            )  # fmt: skip
            if not found:
                raise ModelLoadError(
                    f"{path}: no checkpoint files (*{', *'.join(CHECKPOINT_SUFFIXES)}) directly in this folder"
                )
            files.extend(found)
        else:
            files.append(path)

    checkpoints = []
    seen: set[Path] = set()
    for path in files:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        checkpoints.append(_read_checkpoint(path))
    return sorted(checkpoints, key=lambda c: (c.epoch is None, c.epoch or 0, c.path.name, str(c.path)))


def _read_checkpoint(path: Path) -> Checkpoint:
    obj = _load_checked(path)
    _state_dict_of(obj, path)  # fail here, not in the middle of a build, when there are no weights
    epoch = _number(obj.get("epoch"), "epoch", path)
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or abs(epoch) >= 2**63):
        raise ModelLoadError(f"{path}: 'epoch' must be an integer (of 64 bits, as an index records it), found {shown(epoch)}")
    learning_rate = obj.get("learning_rate")
    if learning_rate is None:
        warnings.warn(f"{path}: no learning_rate recorded; using 1.0", TracInWarning, stacklevel=3)
        learning_rate = 1.0
    learning_rate = _number(learning_rate, "learning_rate", path)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not _finite(learning_rate):
        raise ModelLoadError(f"{path}: 'learning_rate' must be a finite number, found {shown(learning_rate)}")
    if learning_rate < 0:
        raise ModelLoadError(f"{path}: 'learning_rate' is negative ({learning_rate!r}); TracIn weighs each checkpoint by "
                             "the (non-negative) step size it was trained with")
    return Checkpoint(path=path, epoch=epoch, learning_rate=float(learning_rate))


def _number(value: Any, key: str, path: Path) -> Any:
    """A one-element tensor as the number it holds (a checkpoint may store its epoch and learning rate so)."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        return value
    if value.is_meta:
        raise ModelLoadError(f"{path}: {key!r} is a tensor without data (on the meta device); expected a number")
    return value.item()


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int beyond any float
        return False


class CheckpointModels:
    """The model at each checkpoint, loaded once: a copy per checkpoint while the copies take at most
    ``max_bytes`` together, else one model that is reloaded when another checkpoint is asked for.

    ``checkpoints`` empty: the model as given is the only checkpoint (learning rate 1.0).
    """

    def __init__(self, model: torch.nn.Module, checkpoints: Sequence[Checkpoint], *, max_bytes: int = 2 * 2**30):
        self.base = model
        self.checkpoints = list(checkpoints) or [Checkpoint(path=None, epoch=None, learning_rate=1.0)]
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.keep_all = len(self.checkpoints) * model_bytes <= max_bytes
        self._models: dict[int, torch.nn.Module] = {}

    def __len__(self) -> int:
        return len(self.checkpoints)

    def learning_rate(self, c: int) -> float:
        return self.checkpoints[c].learning_rate

    def model(self, c: int) -> torch.nn.Module:
        """The model with checkpoint ``c``'s weights, in eval mode."""
        if c not in self._models:
            if self.keep_all:  # a path-less checkpoint (the model itself) only ever comes alone
                model = self.base if not self._models else copy.deepcopy(self.base)
            else:
                self._models.clear()
                model = self.base
            self.checkpoints[c].load_into(model)
            self._models[c] = model
        return self._models[c]
