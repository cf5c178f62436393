"""The build's plan: how each selected block is stored (:func:`plan_storage`), what the index will
weigh (:func:`estimate_bytes`), and whether the disk and memory can hold the build (:func:`check_room`).

With ``--sketch-dim`` unset, the plan widens the sketch where the sampled inputs are far from
low-rank: 128 directions, 256 where 128 leave more than AUTO_RESIDUAL of the sampled inputs' energy
out, and 512 where 256 still do and the wider scan stays affordable (WIDEST_SCAN_BYTES per
checkpoint, WIDEST_BYTES per stored row and checkpoint). Looser bounds cost a query refinements
whose number does not grow with the graph, while the scan does; ``benchmarks/scale.py`` measures both.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError, VanishingGradientError
from ..files import mib
from ..gradients.computer import CheckpointGradients, not_finite_message, vanished, vanishing_message
from ..kg.triples import IdMaps
from ..machine import DEFAULT_BUDGET_SHARE, available_memory, budget_to_hold
from ..storage.plans import DEFAULT_SKETCH_DIM, BlockPlan, plan_blocks, sketched_sides
from ..storage.sketch import Basis, dequantize, fit_basis, quantize, stable_seed
from ..words import counted
from .bases import sketch_sample
from .rows import BuildRows
from .settings import BuildSettings

#: Rows on which the build checks its plan (grouping, derived sides) and that gradients do not vanish.
CHECK_ROWS = 64
AUTO_RESIDUAL = 0.1
WIDE_SKETCH_DIM = 256
WIDEST_SKETCH_DIM = 512
WIDEST_SCAN_BYTES = 64 * 2**20
WIDEST_BYTES = 1536


def plan_storage(gradients: CheckpointGradients, rows: BuildRows, settings: BuildSettings, num_entities: int,
                 id_maps: IdMaps, device: str) -> list[BlockPlan]:  # fmt: skip
    """Block plans from checks at the first checkpoint; refuses gradients that are not finite, or that
    vanish on every sampled row."""
    check = rows.examples[torch.as_tensor(rows.sample[:CHECK_ROWS])].to(device)
    computer = gradients.computer(0)
    computer.check(check[:8])

    def plan_with(dim: int) -> list[BlockPlan]:
        return plan_blocks(computer.model, computer.selection, computer, check, num_entities, dim, settings.seed,
                           share_pairs=settings.share_pairs)  # fmt: skip

    def residual(plans: list[BlockPlan]) -> float:
        return residual_energy(gradients, rows, plans, settings, device)

    plans = plan_with(settings.sketch_dim or DEFAULT_SKETCH_DIM)
    if settings.sketch_dim is None and residual(plans) > AUTO_RESIDUAL:
        plans = plan_with(WIDE_SKETCH_DIM)
        widest = plan_with(WIDEST_SKETCH_DIM)
        if affordable(widest, rows, len(gradients), id_maps) and residual(plans) > AUTO_RESIDUAL:
            plans = widest
    norms = torch.zeros(len(check), dtype=torch.float64)
    for c in sorted({0, len(gradients) - 1}):
        norms += gradients.computer(c).compute_examples(check).squared_norms().double().cpu()
        if not bool(torch.isfinite(norms).all()):
            raise InputError(not_finite_message(c, "sampled training triples"))
    if bool(vanished(norms).all()):
        raise VanishingGradientError(vanishing_message(f"all {len(check)} sampled training examples", settings.loss))
    return plans


def residual_energy(gradients: CheckpointGradients, rows: BuildRows, plans: list[BlockPlan], settings: BuildSettings,
                    device: str) -> float:  # fmt: skip
    """The largest share of the sampled inputs' energy that the planned sketches leave out, at the first
    checkpoint (0 when nothing is sketched)."""
    wanted = sketched_sides(plans)
    if not wanted:
        return 0.0
    worst = 0.0
    for key, sample in sketch_sample(gradients, 0, plans, wanted, rows, None, settings.batch_size, device).items():
        fitted = fit_basis(sample, wanted[key], stable_seed(settings.seed, "basis", 0, *key))
        basis = Basis.from_matrix(dequantize(**quantize(fitted)))
        _, rho = basis.sketch(sample)
        worst = max(worst, float(rho.pow(2).sum() / sample.double().pow(2).sum().clamp_min(1e-300)))
    return worst


def affordable(plans: list[BlockPlan], rows: BuildRows, num_checkpoints: int, id_maps: IdMaps) -> bool:
    """Whether ``plans`` keep each checkpoint's scan of the sketched sides within WIDEST_SCAN_BYTES and the
    index within WIDEST_BYTES per stored row and checkpoint."""
    stored = rows.num_rows
    if any(p.grouped for p in plans):
        stored = len(rows.pairs()[1])
    scan = sum(stored if p.grouped else rows.num_rows for p in plans for _, _, dim in p.sides() if dim)
    scan_bytes = 2 * scan * max((dim for p in plans for _, _, dim in p.sides()), default=0)
    total = estimate_bytes(plans, stored, rows, num_checkpoints, id_maps)["total"]
    return scan_bytes <= WIDEST_SCAN_BYTES and total <= WIDEST_BYTES * rows.num_rows * num_checkpoints


def estimate_bytes(plans: list[BlockPlan], num_groups: int, rows: BuildRows, num_checkpoints: int,
                   id_maps: IdMaps) -> dict[str, float]:  # fmt: skip
    """The index's size on disk: shard files, bases, the triples file, and their total."""
    per_group = rows.num_rows / max(1, num_groups)
    shards = num_checkpoints * (8 * rows.num_triples + rows.num_rows * sum(p.row_bytes(per_group) for p in plans))
    bases = num_checkpoints * sum(dim * (size + 4) for p in plans for _, size, dim in p.sides() if dim)  # int8 + a scale per row
    labels = sum(len(x) + 8 for x in id_maps.entity_to_id) + sum(len(x) + 8 for x in id_maps.relation_to_id)
    triples = rows.num_triples * 24 + rows.num_rows * (8 if any(p.grouped for p in plans) else 0) + labels
    return {"shards": shards, "bases": bases, "triples": triples, "total": shards + bases + triples}


def check_room(out: Path, sizes: dict[str, float], plans: list[BlockPlan], rows: BuildRows, model: torch.nn.Module,
               batch_size: int, log: Callable[[str], None]) -> None:  # fmt: skip
    """Refuse, before anything is written, a build that the disk or the memory cannot hold."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    already = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
    free = shutil.disk_usage(existing).free
    if sizes["total"] - already > free:
        raise InputError(f"{out}: the index needs about {mib(sizes['total'])} but the disk has {mib(free)} free; "
                         "free some space or choose another --out")  # fmt: skip
    available = available_memory()
    if available is None:
        return
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    sample = sum(4 * size * len(rows.sample_for(dim, size)) for p in plans for _, size, dim in p.sides() if dim)
    per_row = sum(4 * (sum(p.sizes) if p.kind != "rows" else p.sizes[1] * p.sizes[2]) for p in plans)
    need = 2 * model_bytes + sample + 4 * batch_size * per_row + 32 * rows.num_rows
    if need > available:
        raise InputError(f"the build needs about {mib(need)} of memory (models, the sketch sample, a batch of "
                         f"gradients, the training ids) but {mib(available)} is available; "
                         "lower --batch-size or --sketch-dim, or free memory")  # fmt: skip
    log(f"memory: the build needs about {mib(need)} ({mib(available)} available now)")
    held = budget_to_hold(sizes["shards"])
    if held > DEFAULT_BUDGET_SHARE * available:
        log(f"queries: the stored arrays ({mib(sizes['shards'])}) are held in memory under a budget of "
            f"{mib(held)} or more (--max-memory); at the default ({mib(DEFAULT_BUDGET_SHARE * available)} now) they "
            "are read from the files in passes, with the same answers")  # fmt: skip


def describe_plans(plans: list[BlockPlan], num_rows: int, num_groups: int | None) -> str:
    """One line for the build's log: how each block is stored."""
    parts = []
    for p in plans:
        if p.kind == "factored":
            out = "derived from the batch norm" if p.derived else (f"sketched to {p.sketch[0]}" if p.sketch[0] else "whole")
            inp = f"sketched to {p.sketch[1]}" if p.sketch[1] else "whole"
            grouped = f", once per (head, relation) pair ({num_groups:,} for {num_rows:,} rows)" if p.grouped else ""
            parts.append(f"{p.name}: output side ({p.sizes[0]}) {out}, input side ({p.sizes[1]:,}) {inp}{grouped}")
        elif p.kind == "dense":
            parts.append(f"{p.name}: {sum(p.sizes):,} values " + (f"sketched to {p.sketch[0]}" if p.sketch[0] else "whole"))
        elif p.kind == "rows":
            parts.append(f"{p.name}: {counted(p.sizes[2], 'embedding row')} of {p.sizes[1]} per triple, whole")
        else:
            parts.append(f"{p.name}: norms only (rescored exactly)")
    return "stored: " + "; ".join(parts)
