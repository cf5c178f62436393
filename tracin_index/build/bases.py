"""Each checkpoint's principal directions: the bases the sketched sides are projected on, fitted on the
seeded sample of rows (each checkpoint starting from the previous one's), stored int8 in ``bases/``,
read back when intact."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..gradients.computer import CheckpointGradients
from ..gradients.inputs import linear_inputs
from ..storage.encoding import sketch_sample as encoded_sample
from ..storage.layout import bases_path, read_arrays, sha256_file, write_arrays, write_manifest
from ..storage.plans import BlockPlan, sketched_sides
from ..storage.sketch import Basis, dequantize, fit_basis, quantize, read_bases, stable_seed
from ..words import counted
from .rows import BuildRows

Side = tuple[str, str]  # (module name, "out" or "in")


def sketch_sample(gradients: CheckpointGradients, c: int, plans: list[BlockPlan], wanted: dict[Side, int], rows: BuildRows,
                  groups: np.ndarray | None, batch_size: int, device: str) -> dict[Side, torch.Tensor]:  # fmt: skip
    """The sampled factors each sketched side (``wanted``: side -> directions) is fitted on, at checkpoint c.
    When only Linear inputs are sketched (ConvE), a forward pass that stops at those layers gives them (no
    gradients); where those sides are stored once per (head, relation) group (``groups``), each group's rows
    count once, weighted by the square root of their number."""
    wide = max(size for p in plans for _, size, dim in p.sides() if dim)
    sampled = rows.sample_for(max(wanted.values()), wide)
    parts: dict[Side, list[torch.Tensor]] = {key: [] for key in wanted}
    computer = gradients.computer(c)
    if all(side == "in" for _, side in wanted):
        modules = {m.name: m for m in computer.selection.modules}
        grouped = {p.name for p in plans if p.grouped}
        weights = None
        if groups is not None and all(name in grouped for name, _ in wanted):
            _, first, counts = np.unique(groups[sampled], return_index=True, return_counts=True)
            sampled, weights = sampled[first], torch.from_numpy(np.sqrt(counts)).float()[:, None]
        sample = rows.examples[torch.as_tensor(sampled)].to(device)
        linears = {name: (modules[name].module, "bias" in modules[name].parameter_names) for name, _ in wanted}
        for start in range(0, len(sample), batch_size):
            found = linear_inputs(computer.model, linears, sample[start : start + batch_size], shortcuts=computer.shortcuts)
            for name, side in wanted:
                parts[(name, side)].append(found[name].float().cpu())
        if weights is not None:
            return {key: torch.cat(value) * weights for key, value in parts.items()}
    else:
        sample = rows.examples[torch.as_tensor(sampled)].to(device)
        for start in range(0, len(sample), batch_size):
            found = encoded_sample(plans, computer.compute_examples(sample[start : start + batch_size]))
            for key in wanted:
                parts[key].append(found[key].float().cpu())
    return {key: torch.cat(value) for key, value in parts.items()}


class CheckpointBases:
    """The principal directions of an index being built, checkpoint by checkpoint (:meth:`at`)."""

    def __init__(self, out: Path, gradients: CheckpointGradients, rows: BuildRows, groups: np.ndarray | None, seed: int,
                 batch_size: int, device: str, log: Callable[[str], None]):  # fmt: skip
        self.out, self.gradients, self.rows, self.groups = out, gradients, rows, groups
        self.seed, self.batch_size, self.device, self.log = seed, batch_size, device, log
        self._last: dict[int, dict[Side, torch.Tensor]] = {}  # the last fitted bases: the next one's start

    def at(self, c: int, plans: list[BlockPlan], manifest: dict) -> dict[Side, Basis]:
        """Checkpoint c's principal directions: read when intact, else fitted again (and then every shard
        file of the checkpoint is stale: they were sketched on the old directions, and are dropped from
        the manifest)."""
        wanted = sketched_sides(plans)
        if not wanted:
            return {}
        name = bases_path(c)
        digest = manifest["files"].get(name)
        path = self.out / name
        if digest is not None and path.is_file() and sha256_file(path) == digest:
            self._last = {c: read_bases(read_arrays(path), wanted)}
            return self._on_device(c)
        stale = [s for s in manifest["shards"] if s["checkpoint"] == c]
        if digest is not None or stale:
            self.log(f"{name}: missing or changed; fitting it again and rebuilding the {counted(len(stale), 'shard')} of checkpoint {c + 1}")
            manifest["shards"] = [s for s in manifest["shards"] if s["checkpoint"] != c]
        # (a build killed from here on finds the recorded digest wrong, or missing, and drops these shards again)
        manifest["files"].pop(name, None)
        samples = sketch_sample(self.gradients, c, plans, wanted, self.rows, self.groups, self.batch_size, self.device)
        previous = self._last.get(c - 1, {})
        stored = {key: quantize(fit_basis(samples[key], dim, stable_seed(self.seed, "basis", c, *key), start=previous.get(key)))
                  for key, dim in wanted.items()}  # fmt: skip
        arrays = {f"{k[0]}/{k[1]}/{part}": v.numpy() for k, parts in stored.items() for part, v in parts.items()}
        manifest["files"][name] = write_arrays(path, arrays)
        write_manifest(self.out, manifest, durable=False)
        self._last = {c: {key: dequantize(**parts) for key, parts in stored.items()}}
        return self._on_device(c)

    def _on_device(self, c: int) -> dict[Side, Basis]:
        return {key: Basis.from_matrix(matrix, self.device) for key, matrix in self._last[c].items()}
