"""What defines an index besides its inputs: validated once, recorded in the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import InputError
from ..gradients.computer import LOSSES
from ..gradients.selection import ParameterSelection, recorded_selection

#: Training triples per shard file (``--shard-size``).
DEFAULT_SHARD_SIZE = 16384


@dataclass(frozen=True)
class BuildSettings:
    """What defines an index besides its inputs; validated once, recorded in the manifest."""

    selection: str = "last"  # last | all | names
    num_last_layers: int = 2
    layer_names: tuple[str, ...] = ()
    loss: str = "bce"
    #: principal directions of a sketched side; None: chosen by the build from the sampled inputs'
    #: energy (:func:`tracin_index.build.plan.plan_storage`)
    sketch_dim: int | None = None
    seed: int = 0
    batch_size: int = 256
    #: training triples per shard file
    shard_size: int = DEFAULT_SHARD_SIZE
    #: store a Linear layer's input once per (head, relation) pair where it depends on nothing else (ConvE)
    share_pairs: bool = True

    def __post_init__(self):
        if self.selection not in ("last", "all", "names"):
            raise InputError(f"unknown parameter selection {self.selection!r}; valid: last, all, names")
        if self.selection == "names" and not self.layer_names:
            raise InputError("no layer names given; pass module or parameter names, e.g. interaction.hr1d.0")
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        for name in ("num_last_layers", "sketch_dim", "batch_size", "shard_size"):
            value = getattr(self, name)
            if name == "sketch_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name.replace('_', '-')} must be a positive whole number, got {value!r}")

    def to_json(self) -> dict:
        return {**asdict(self), "layer_names": list(self.layer_names)}

    def select(self, model: torch.nn.Module) -> ParameterSelection:
        """The parameters of ``model`` these settings select."""
        return recorded_selection(model, self.to_json())
