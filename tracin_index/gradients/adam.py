r"""Optimizer-aware TracIn: the step Adam took, not the gradient (``--optimizer adam``).

TracIn's derivation assumes SGD: at checkpoint c a training example z moves the weights by
:math:`-\eta_c\, g(z)`, so the test loss changes by :math:`\eta_c \langle g(z), g(q)\rangle`. PyKEEN
trains with Adam by default, which moves each parameter by its gradient divided by the root of
its second-moment estimate. With Adam's bias-corrected second moment :math:`\hat v_c` at checkpoint c
(one number per parameter), the preconditioned score is

.. math:: \mathrm{influence}(z, q) = \sum_c \eta_c \bigl\langle g(z) \oslash (\sqrt{\hat v_c} + \epsilon),\ g(q) \bigr\rangle,

as in LESS (Xia et al., 2024) and TrackStar (Chang et al., 2024), without their momentum term: a
single example's share of the step. :math:`P_c = 1 / (\sqrt{\hat v_c} + \epsilon)` is diagonal, so
:math:`\langle P g(z), g(q)\rangle = \langle g(z), P g(q)\rangle`: the test side is preconditioned
(a few gradients) and the training side keeps its compact structure. A Linear layer's test gradient
is no longer rank one after that; it becomes a dense matrix per test triple
(:class:`MatrixBlock`), and a training row's product with it costs one Linear forward.

Checkpoints record the state (:func:`~tracin_index.kg.checkpoints.optimizer_record`, written by
:class:`~tracin_index.kg.callback.TracInCheckpointCallback` and ``tracin-index train``): the optimizer's
name, its step count, beta2 and epsilon, and ``exp_avg_sq`` per parameter. Scoring with
``--optimizer adam`` is refused, in one line, for checkpoints without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..errors import InputError, shown
from ..kg.checkpoints import Checkpoint
from .blocks import Block, DenseBlock, FactoredBlock, PerExampleGradients, RowsBlock

#: The scores ``--optimizer`` picks: plain TracIn (gradients, as SGD steps them) or Adam's steps.
OPTIMIZERS = ("sgd", "adam")
#: Optimizers whose state holds Adam's second moment (``exp_avg_sq``).
ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax")


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise InputError(f"unknown --optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return name


@dataclass
class Preconditioner:
    """:math:`P = 1 / (\\sqrt{\\hat v} + \\epsilon)` per selected parameter, by full parameter name."""

    factors: dict[str, torch.Tensor]

    @classmethod
    def at(cls, checkpoint: Checkpoint, names: list[str], shapes: Mapping[str, Sequence[int]] | None = None) -> "Preconditioner":
        """Adam's preconditioner at ``checkpoint`` for the parameters ``names`` (of ``shapes``, where given); refused
        where the file records no optimizer state (or there is no file: the model alone)."""
        if checkpoint.path is None:
            raise InputError("--optimizer adam needs checkpoint files that record the optimizer's state; the model "
                             "alone has none")  # fmt: skip
        return cls.from_record(checkpoint.optimizer_state(), list(names), str(checkpoint.path), shapes)

    @classmethod
    def from_record(cls, record: Any, names: list[str], where: str,
                    shapes: Mapping[str, Sequence[int]] | None = None) -> "Preconditioner":  # fmt: skip
        """From a checkpoint's optimizer record, for the parameters ``names`` (of ``shapes``, where given); refuses,
        naming ``where`` (the checkpoint), a record without Adam's second moments for all of them, or one that
        is not what :func:`~tracin_index.kg.checkpoints.optimizer_record` writes."""
        if not isinstance(record, Mapping) or "exp_avg_sq" not in record:
            trained = f" (it was trained with {shown(record['name'])})" if isinstance(record, Mapping) and "name" in record else ""
            raise InputError(
                f"{where}: no optimizer state (Adam's second moments) recorded{trained}; --optimizer adam needs "
                "checkpoints written by `tracin-index train` or TracInCheckpointCallback from a model trained with "
                "Adam; use --optimizer sgd (plain TracIn)"
            )
        second, steps = record["exp_avg_sq"], record.get("step")
        if not isinstance(second, Mapping) or not isinstance(steps, Mapping):
            raise InputError(f"{where}: the optimizer record's 'exp_avg_sq' and 'step' must map parameter names to "
                             f"tensors and step counts; found {shown(second, 40)} and {shown(steps, 40)}")  # fmt: skip
        missing = [n for n in names if n not in second]
        if missing:
            raise InputError(f"{where}: no second moment recorded for parameter {missing[0]!r}; --optimizer adam needs "
                             "one for every selected parameter")  # fmt: skip
        beta2, eps = _rate(record, "beta2", where), _rate(record, "eps", where)
        if not beta2 < 1:
            raise InputError(f"{where}: the optimizer's beta2 is {beta2!r}; Adam's is in [0, 1)")
        factors = {}
        for name in names:
            v, step = second[name], steps.get(name)
            if not isinstance(v, torch.Tensor) or v.is_meta or not v.is_floating_point():
                raise InputError(f"{where}: the second moment of {name!r} must be a real tensor, found {shown(v)}")
            if shapes is not None and tuple(v.shape) != tuple(shapes[name]):
                raise InputError(f"{where}: the second moment of {name!r} has shape {tuple(v.shape)}, the parameter "
                                 f"{tuple(shapes[name])}; was the checkpoint written for another model?")  # fmt: skip
            if isinstance(step, bool) or not isinstance(step, int) or step >= 2**63:
                raise InputError(f"{where}: the optimizer's step count of {name!r} must be an integer, found {shown(step)}")
            if step < 1:
                raise InputError(f"{where}: parameter {name!r} has not been stepped by the optimizer yet")
            v_hat = v.double() / (1.0 - beta2**step)
            factors[name] = 1.0 / (v_hat.sqrt() + eps)
            if not torch.isfinite(factors[name]).all():
                raise InputError(f"{where}: the second moments of {name!r} give steps that are not finite (negative or "
                                 "NaN moments, or zero ones with eps 0)")  # fmt: skip
        return cls(factors)

    def to(self, device, dtype=None) -> "Preconditioner":
        return Preconditioner({k: v.to(device=device, dtype=dtype) for k, v in self.factors.items()})

    def apply(self, grads: PerExampleGradients) -> PerExampleGradients:
        """P times the gradients (the test side): the same blocks, but a Linear's becomes a :class:`MatrixBlock`."""
        blocks: dict[str, Block] = {}
        for module, block in grads.blocks.items():
            names = grads.parameter_names[module]
            factors = [self.factors[n].to(_dtype_of(block)) for n in names]
            if isinstance(block, DenseBlock):
                blocks[module] = DenseBlock(block.values * torch.cat([f.reshape(-1) for f in factors]), block.shapes)
            elif isinstance(block, RowsBlock):
                if block.coef is not None:
                    raise InputError("--optimizer adam with --loss ce on embedding tables is not supported (the 1-N tail "
                                     "term is rank one only before preconditioning); use --loss bce or --optimizer sgd")  # fmt: skip
                (table,) = factors
                blocks[module] = RowsBlock(block.num_rows, block.ids, block.rows * table[block.ids])
            else:
                by_kind = {n.rsplit(".", 1)[-1]: f for n, f in zip(names, factors)}
                blocks[module] = MatrixBlock.of(block, by_kind.get("weight"), by_kind.get("bias"))
        return PerExampleGradients(blocks, grads.parameter_names)


def _rate(record: Mapping, key: str, where: str) -> float:
    """The optimizer record's ``key`` (beta2, eps): a finite number, not negative."""
    value = record.get(key)
    try:
        number = None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:  # an int beyond any float
        number = None
    if number is None or not math.isfinite(number) or number < 0:
        raise InputError(f"{where}: the optimizer's {key} must be a finite number, not negative; found {shown(value)}")
    return number


def _dtype_of(block: Block) -> torch.dtype:
    return block.a.dtype if isinstance(block, FactoredBlock) else block.values.dtype if isinstance(block, DenseBlock) else block.rows.dtype


@dataclass
class MatrixBlock:
    """A Linear layer's preconditioned gradients as dense matrices, (B, out, in [+1 for the bias]),
    the bias's gradient as the last column. Its inner product with a :class:`FactoredBlock` (training
    rows) is :math:`\\sum_l \\delta_l^\\top M a_l` per pair."""

    matrix: torch.Tensor

    @classmethod
    def of(cls, block: FactoredBlock, weight: torch.Tensor | None, bias: torch.Tensor | None) -> "MatrixBlock":
        """``weight`` (out, in), ``bias`` (out,): the factors of the parameters ``block`` holds."""
        dense = torch.einsum("bln,blm->bnm", block.delta, block.a)
        parts = []
        if block.has_weight:
            parts.append(weight)
        if block.has_bias:
            parts.append(bias.view(-1, 1))
        return cls(dense * torch.cat(parts, dim=1))

    def dot(self, other: FactoredBlock) -> torch.Tensor:
        """(len(self), len(other)) inner products with training rows' factored gradients."""
        out = other.a.new_empty(self.matrix.shape[0], other.a.shape[0])
        for b in range(self.matrix.shape[0]):
            # (C, L, out) @ (out, in) -> (C, L, in), times a, summed: one Linear product per row
            out[b] = ((other.delta @ self.matrix[b]) * other.a).sum(dim=(1, 2))
        return out
