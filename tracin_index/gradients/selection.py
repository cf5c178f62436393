"""Which parameters TracIn differentiates: the last N layers, named layers, or all parameters.

Layers are found by module type and forward-execution order (one traced forward pass), never by
name patterns alone, so PyKEEN's renames between versions do not change what "last 2" means.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from ..errors import SelectionError
from ..kg.support import check_supported

SelectionMode = Literal["last", "names", "all"]
ModuleKind = Literal["linear", "dense", "embedding"]

#: Names of ConvE's layers before PyKEEN 1.11 moved them into ``hr2d`` / ``hr1d`` Sequentials.
LEGACY_CONVE_NAMES = {
    "interaction.bn0": "interaction.hr2d.0",
    "interaction.conv1": "interaction.hr2d.2",
    "interaction.bn1": "interaction.hr2d.3",
    "interaction.linear": "interaction.hr1d.0",
    "interaction.fc": "interaction.hr1d.0",
    "interaction.bn2": "interaction.hr1d.2",
}


@dataclass(frozen=True)
class SelectedModule:
    """One module whose parameters (all or some) are differentiated.

    ``kind`` decides how per-example gradients are kept: ``linear`` as factors (input activation
    times output gradient), ``embedding`` as touched rows, ``dense`` as flat vectors.
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    parameter_names: tuple[str, ...]
    kind: ModuleKind

    @property
    def full_parameter_names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}.{p}" if self.name else p for p in self.parameter_names)

    @property
    def num_parameters(self) -> int:
        return sum(getattr(self.module, p).numel() for p in self.parameter_names)


@dataclass(frozen=True)
class ParameterSelection:
    """The selected modules, in forward-execution order, and how they were chosen."""

    modules: tuple[SelectedModule, ...]
    mode: SelectionMode
    num_last_layers: int | None = None
    requested_names: tuple[str, ...] = ()
    embedding_fallback: bool = False
    #: modules "last" passed over: fed several tensors, they have no per-example gradient from their input and output
    skipped: tuple[str, ...] = ()

    @property
    def parameter_names(self) -> list[str]:
        return [n for m in self.modules for n in m.full_parameter_names]

    @property
    def num_parameters(self) -> int:
        return sum(m.num_parameters for m in self.modules)

    @property
    def has_embeddings(self) -> bool:
        return any(m.kind == "embedding" for m in self.modules)

    def describe(self) -> str:
        what = {"last": f"last {self.num_last_layers} layers", "names": "named layers", "all": "all parameters"}
        if self.embedding_fallback:
            what["last"] = "embeddings (the model has no layers besides them; kept sparse)"
        skipped = f"; passed over (fed several tensors): {', '.join(self.skipped)}" if self.skipped else ""
        return f"{what[self.mode]}: {', '.join(m.name for m in self.modules)} ({self.num_parameters:,} parameters){skipped}"

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "num_last_layers": self.num_last_layers,
            "requested_names": list(self.requested_names),
            "parameters": self.parameter_names,
            "embedding_fallback": self.embedding_fallback,
            "skipped": list(self.skipped),
        }


def _is_embedding(name: str, module: nn.Module, representation_prefixes: Sequence[str]) -> bool:
    return isinstance(module, nn.Embedding) or any(
        name == p or name.startswith(p + ".") for p in representation_prefixes
    )


def _kind(name: str, module: nn.Module, representation_prefixes: Sequence[str]) -> ModuleKind:
    if _is_embedding(name, module, representation_prefixes):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    return "dense"


def _representation_prefixes(model: nn.Module) -> list[str]:
    """Module names of PyKEEN representation modules (entity/relation embeddings and the like)."""
    import sys

    if "pykeen" not in sys.modules:  # no PyKEEN model can exist (a replica's tables are nn.Embedding)
        return []
    from pykeen.nn.representation import Representation

    return [name for name, m in model.named_modules() if isinstance(m, Representation)]


def parametrised_modules_in_execution_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with parameters of their own, in the order a ``score_hrt`` forward pass first calls them.

    Modules never called by the forward pass (e.g. unused heads) come last, in definition order.
    """
    return _trace(model)[0]


def _trace(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], set[str]]:
    """The modules of :func:`parametrised_modules_in_execution_order`, and the names of those called
    with more than one tensor input (an interaction holding a core tensor, say): their per-example
    gradients cannot be taken from one input and one output."""
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    order: list[str] = []
    several: set[str] = set()
    handles = []

    def hook(mod, args, out, name):
        order.append(name)
        if sum(1 for a in args if torch.is_tensor(a)) != 1:
            several.add(name)

    for name, module in owners:
        handles.append(module.register_forward_hook(lambda mod, args, out, name=name: hook(mod, args, out, name)))
    try:
        with evaluating(model), torch.no_grad():
            device = next(model.parameters()).device
            model.score_hrt(torch.zeros((2, 3), dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    first_call: dict[str, int] = {}
    for i, name in enumerate(order):
        first_call.setdefault(name, i)
    by_name = dict(owners)
    called = sorted(first_call, key=first_call.__getitem__)
    uncalled = [n for n, _ in owners if n not in first_call]
    return [(n, by_name[n]) for n in called + uncalled], several


def _own_parameter_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in module.named_parameters(recurse=False))


def _translate_legacy(name: str, known_modules: set[str]) -> str:
    """Map an old ConvE name (``interaction.linear.weight``) onto PyKEEN 1.11's (``interaction.hr1d.0.weight``)."""
    for old, new in LEGACY_CONVE_NAMES.items():
        if (name == old or name.startswith(old + ".")) and old not in known_modules and new in known_modules:
            return new + name[len(old) :]
    return name


def select_parameters(
    model: nn.Module,
    *,
    mode: SelectionMode = "last",
    num_last_layers: int = 2,
    names: Sequence[str] | None = None,
) -> ParameterSelection:
    """Choose the parameters whose gradients define TracIn.

    - ``last``: the last ``num_last_layers`` parametrised modules in forward-execution order,
      embeddings excluded (ConvE: ``interaction.hr1d.0`` Linear and ``interaction.hr1d.2`` BatchNorm1d).
      A model whose only parameters are embeddings falls back to its embeddings.
    - ``names``: modules or parameters by name (PyKEEN 1.11 names or the older ConvE ones such as
      ``interaction.linear``; ``*`` globs allowed). Unknown names raise :class:`SelectionError`.
    - ``all``: every parameter.
    """
    check_supported(model)
    ordered, several_inputs = _trace(model)
    rep_prefixes = _representation_prefixes(model)
    for name, module in ordered:
        if _is_embedding(name, module, rep_prefixes) and not isinstance(module, nn.Embedding):
            raise SelectionError(
                f"module {name!r} ({type(module).__name__}) holds representation parameters that are not a plain "
                "embedding table; per-example gradients are supported for nn.Embedding-backed representations only"
            )

    def selected(name: str, module: nn.Module, params: Sequence[str] | None = None) -> SelectedModule:
        return SelectedModule(
            name=name,
            module=module,
            parameter_names=tuple(params) if params is not None else _own_parameter_names(module),
            kind=_kind(name, module, rep_prefixes),
        )

    if mode == "all":
        return ParameterSelection(tuple(selected(n, m) for n, m in ordered), mode="all")

    if mode == "last":
        if num_last_layers < 1:
            raise SelectionError(f"num_last_layers must be at least 1, got {num_last_layers}")
        # a module fed several tensors (TuckER's core tensor, ProjE's and CrossE's interactions) has no
        # per-example gradient from one input and one output: "last" takes the layers that do
        skipped = tuple(n for n, m in ordered if not _is_embedding(n, m, rep_prefixes) and n in several_inputs)
        layers = [(n, m) for n, m in ordered if not _is_embedding(n, m, rep_prefixes) and n not in several_inputs]
        if not layers:
            embeddings = tuple(selected(n, m) for n, m in ordered if n not in several_inputs)
            return ParameterSelection(
                embeddings, mode="last", num_last_layers=num_last_layers, embedding_fallback=True, skipped=skipped
            )
        return ParameterSelection(
            tuple(selected(n, m) for n, m in layers[-num_last_layers:]),
            mode="last",
            num_last_layers=num_last_layers,
            skipped=skipped,
        )

    if mode != "names":
        raise SelectionError(f"unknown parameter selection {mode!r}; valid: last, names, all")
    if not names:
        raise SelectionError("no layer names given; pass module or parameter names, e.g. interaction.hr1d.0")
    modules = dict(ordered)
    known = set(modules)
    all_params = {f"{n}.{p}": (n, p) for n, m in ordered for p in _own_parameter_names(m)}
    chosen: dict[str, list[str]] = {}
    for raw in names:
        name = _translate_legacy(raw, known)
        if any(c in name for c in "*?["):
            hits = [all_params[p] for p in all_params if fnmatch.fnmatchcase(p, name)]
        elif name in modules:
            hits = [(name, p) for p in _own_parameter_names(modules[name])]
        elif name in all_params:
            hits = [all_params[name]]
        else:
            hits = []
        if not hits:
            valid = ", ".join(known_sorted(ordered))
            raise SelectionError(f"unknown layer name {raw!r}; valid layer names: {valid} (or their .weight/.bias)")
        for module_name, param in hits:
            chosen.setdefault(module_name, [])
            if param not in chosen[module_name]:
                chosen[module_name].append(param)
    in_order = [
        selected(n, m, [p for p in _own_parameter_names(m) if p in chosen[n]]) for n, m in ordered if n in chosen
    ]
    return ParameterSelection(tuple(in_order), mode="names", requested_names=tuple(names))


def recorded_selection(model: nn.Module, settings: Mapping) -> ParameterSelection:
    """The selection an index's recorded settings (its manifest's ``settings``) make of ``model``."""
    if settings["selection"] == "names":
        return select_parameters(model, mode="names", names=list(settings["layer_names"]))
    return select_parameters(model, mode=settings["selection"], num_last_layers=settings["num_last_layers"])


def known_sorted(ordered: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Layer names in execution order, for error messages."""
    return [n for n, _ in ordered]


def split_names(values: Sequence[str] | None) -> list[str]:
    """Accept ``a b``, ``a,b`` and repeated flags alike."""
    return [v for value in values or () for v in re.split(r"[,\s]+", value.strip()) if v]


@contextlib.contextmanager
def evaluating(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[None]:
    """``model`` in eval mode for the block, its mode restored after; no work where it is in eval mode
    already (``train()`` visits every submodule: a query's many small forward passes felt it).
    ``modules``: the model's modules, where the caller holds them (walking them costs too)."""
    if not any(m.training for m in (modules if modules is not None else model.modules())):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
