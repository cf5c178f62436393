"""Independent reference computations: one autograd backward per triple, dense gradients, plain loops."""

from __future__ import annotations

import torch
from torch import nn


def loss_of_one_triple(model: nn.Module, triple: torch.Tensor, loss: str) -> torch.Tensor:
    """The per-triple loss written out directly from DESIGN.md (not via the package)."""
    h, r, t = (int(x) for x in triple)
    if loss == "bce":
        score = model.score_hrt(torch.tensor([[h, r, t]])).view(())
        return -torch.nn.functional.logsigmoid(score)  # -log sigmoid, without rounding sigmoid(large) to 1
    scores = model.score_t(torch.tensor([[h, r]])).view(-1)
    return -torch.log_softmax(scores, dim=0)[t]


def per_triple_gradients(model: nn.Module, triples: torch.Tensor, parameter_names: list[str], loss: str):
    """{name: (n, *shape)} by one backward per triple, the original TracIn method."""
    model.eval()
    params = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in parameter_names}
    for triple in triples:
        grads = torch.autograd.grad(loss_of_one_triple(model, triple, loss), [params[n] for n in parameter_names],
                                    allow_unused=True)
        for name, g in zip(parameter_names, grads):
            out[name].append(torch.zeros_like(params[name]) if g is None else g.detach())
    return {n: torch.stack(v) for n, v in out.items()}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
