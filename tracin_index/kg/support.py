"""Which PyKEEN models tracin-index can explain, and why it refuses the others (in one line, before any work)."""

from __future__ import annotations

from ..errors import SelectionError

_GRAPH = ("message-passing models compute every entity's representation from the whole training graph, so "
          "one triple's gradient is not its own (and a run directory does not record the graph)")
_LITERALS = "it needs numeric literals, which a run directory does not record"
#: PyKEEN models tracin-index refuses, and why.
UNSUPPORTED_MODELS = {
    "RGCN": _GRAPH, "CompGCN": _GRAPH, "NodePiece": _GRAPH, "InductiveNodePiece": _GRAPH,
    "InductiveNodePieceGNN": _GRAPH, "ComplExLiteral": _LITERALS, "DistMultLiteral": _LITERALS,
    "DistMultLiteralGated": _LITERALS,
}  # fmt: skip


def check_supported(model_or_name) -> None:
    """Refuse (:class:`SelectionError`) a model of a kind whose per-example gradients tracin-index cannot take."""
    name = model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__
    if name in UNSUPPORTED_MODELS:
        raise SelectionError(f"{name} is not supported: {UNSUPPORTED_MODELS[name]}; train another model "
                             "(e.g. ConvE, ComplEx, DistMult, TuckER)")  # fmt: skip
