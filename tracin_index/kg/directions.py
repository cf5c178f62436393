r"""Training facts and the examples PyKEEN trained on; the direction a test prediction is explained in.

A model trained with inverse triples (``create_inverse_triples=True``; PyKEEN advises it for ConvE
and ``tracin-index train`` does it) never sees a fact (h, r, t) as such. PyKEEN 1.11 numbers the
relations internally so that r's forward id is 2r and its inverse's is 2r + 1, and every training
fact is two examples, each with its own loss and gradient:

.. math:: (h, 2r, t) \quad\text{and}\quad (t, 2r + 1, h).

So the gradient of a training fact is the sum of its two examples' gradients. On the test side one
prediction is explained: ``tail`` (default) is f(h, 2r, t), how PyKEEN scores tails; ``head`` is
f(t, 2r + 1, h), how it scores heads; ``both`` is the sum of the two losses. A model trained without
inverse triples has one example per fact, its ids as given, and only the ``tail`` direction.

Everything outside this module speaks of facts in the label maps' ids (0 .. R - 1 for relations);
the gradient code and the index's stored rows speak of examples in the model's ids.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

#: What a training fact is: every example it was trained as.
TRAIN = "train"
#: The test-side directions.
DIRECTIONS = ("tail", "head", "both")
DEFAULT_DIRECTION = "tail"


def uses_inverse_triples(model: nn.Module) -> bool:
    """Whether ``model`` (PyKEEN or a replica) was trained with inverse triples."""
    return bool(getattr(model, "use_inverse_triples", False))


def check_direction(direction: str, inverse: bool) -> None:
    if direction == TRAIN:
        return
    if direction not in DIRECTIONS:
        raise InputError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if direction != "tail" and not inverse:
        raise InputError(
            f"direction {direction!r} needs a model trained with inverse triples (it scores heads as f(t, r_inv, h)); "
            "this model scores every triple one way: use --direction tail"
        )


def example_batches(hrt: torch.Tensor, inverse: bool, direction: str = TRAIN) -> list[torch.Tensor]:
    """The example batches whose gradients, summed row by row, give the facts' ``hrt`` gradients: one
    batch, or [forward, inverse] for a both-way sum. ``hrt``: (B, 3) facts in the label maps' ids."""
    check_direction(direction, inverse)
    if not inverse:
        return [hrt]
    forward = hrt.clone()
    forward[:, 1] *= 2
    backward = hrt[:, [2, 1, 0]].clone()
    backward[:, 1] = 2 * backward[:, 1] + 1
    if direction == "tail":
        return [forward]
    if direction == "head":
        return [backward]
    return [forward, backward]


def examples_per_fact(inverse: bool) -> int:
    return 2 if inverse else 1


def training_examples(hrt: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Every training example of the facts ``hrt`` in the model's ids, a fact's examples next to each
    other: row ``k * i + j`` is example j of fact i (k examples per fact)."""
    parts = example_batches(hrt, inverse, TRAIN)
    return torch.stack(parts, dim=1).reshape(-1, 3)
