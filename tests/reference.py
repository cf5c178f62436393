"""Independent reference computations: one autograd backward per triple, dense gradients, plain loops.

For a model trained with inverse triples, the examples of a fact come from PyKEEN's own API (its
relation inverter and ``score_*_inverse``), not from :mod:`tracin_index.kg.directions`.
"""

from __future__ import annotations

import torch
from torch import nn


def _examples(model: nn.Module, direction: str) -> tuple[str, ...]:
    if not getattr(model, "use_inverse_triples", False):
        return ("forward",)
    return {"train": ("forward", "inverse"), "both": ("forward", "inverse"), "tail": ("forward",),
            "head": ("inverse",)}[direction]  # fmt: skip


def loss_of_one_triple(model: nn.Module, triple: torch.Tensor, loss: str, direction: str = "train") -> torch.Tensor:
    """The per-triple loss written out directly from DESIGN.md (not via the package): summed over the
    examples the fact was trained as (``train``), or of one test ``direction``."""
    h, r, t = (int(x) for x in triple)
    batch = torch.tensor([[h, r, t]])
    inverse = getattr(model, "use_inverse_triples", False)
    total = torch.zeros((), dtype=next(model.parameters()).dtype)
    for example in _examples(model, direction):
        if loss == "bce":
            if example == "forward":
                mapped = model.relation_inverter.map(batch=batch) if inverse else batch
                score = model.score_hrt(mapped).view(())
            else:
                # score_* take the model's ids (predict_* map them); score_hrt_inverse inverts its argument in place
                score = model.score_hrt_inverse(model.relation_inverter.map(batch=batch)).view(())
            total = total - torch.nn.functional.logsigmoid(score)  # -log sigmoid, without rounding sigmoid(large) to 1
        else:
            if example == "forward":
                hr = model.relation_inverter.map(batch=batch[:, :2]) if inverse else batch[:, :2]
                scores, target = model.score_t(hr).view(-1), t
            else:  # PyKEEN's head prediction: predict_h's path
                rt = model.relation_inverter.map(batch=batch[:, 1:], index=0)
                scores, target = model.score_h_inverse(rt_batch=rt).view(-1), h
            total = total - torch.log_softmax(scores, dim=0)[target]
    return total


def per_triple_gradients(model: nn.Module, triples: torch.Tensor, parameter_names: list[str], loss: str,
                         direction: str = "train"):  # fmt: skip
    """{name: (n, *shape)} by one backward per triple, the original TracIn method."""
    model.eval()
    params = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in parameter_names}
    for triple in triples:
        grads = torch.autograd.grad(loss_of_one_triple(model, triple, loss, direction),
                                    [params[n] for n in parameter_names], allow_unused=True)  # fmt: skip
        for name, g in zip(parameter_names, grads):
            out[name].append(torch.zeros_like(params[name]) if g is None else g.detach())
    return {n: torch.stack(v) for n, v in out.items()}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
