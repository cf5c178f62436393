r"""Principal sketches of wide factors, with the residual that bounds their error.

A wide factor x (ConvE's Linear input: 10,369 numbers) is stored as its coordinates in a basis B
(k rows, the top principal directions, uncentred, of a sample of such factors) plus the norm of
what the basis misses. The basis is stored in 8 bits per entry (a scale per row), so its rows are
only nearly orthonormal; the sketch therefore works with the projection onto the row space of B,
exactly as stored, through the Gram matrix :math:`G = B B^\top`:

.. math::

    s = B x, \qquad \Pi x = B^\top G^{-1} s, \qquad
    \langle \Pi x, \Pi y\rangle = s_x^\top G^{-1} s_y, \qquad
    \rho_x^2 = \lVert x\rVert^2 - s_x^\top G^{-1} s_x = \lVert x - \Pi x\rVert^2 ,

and, as :math:`x - \Pi x` and :math:`y - \Pi y` are orthogonal to the basis,

.. math::

    \bigl|\langle x, y\rangle - s_x^\top G^{-1} s_y\bigr| = \bigl|\langle x - \Pi x, y - \Pi y\rangle\bigr| \le \rho_x \rho_y .

That bound is what lets a query decide, before any exact computation, which training triples can
still be among the top k.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def stable_seed(*parts) -> int:
    """A seed that is a function of ``parts`` only (same on any machine and in any process)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _subspace_iteration(a: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rows) of span(a^T a start^T): one step of subspace iteration."""
    return torch.linalg.qr(a.T @ (a @ start.T))[0].T


def fit_basis(sample: torch.Tensor, k: int, seed: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """An orthonormal basis (float16, (k, d)) of the leading principal subspace (uncentred) of the rows of ``sample``.

    Only the subspace matters (the index uses the orthogonal projection onto it), not the directions
    within it. Without ``start``: two steps of subspace iteration from a seeded random start, on the
    CPU; with ``start`` (k, d), the basis of a neighbouring checkpoint: one step from it (about
    the energy a randomised SVD captures, in half the time of the first fit). Each direction's largest entry
    is made positive, so that builds on other devices store the same directions. Fewer sample rows
    than ``k`` give fewer directions (the rest of the basis is zero and takes no part).
    """
    a = sample.detach().float().cpu()
    r = max(0, min(k, a.shape[0], a.shape[1]))
    basis = torch.zeros(k, a.shape[1], dtype=torch.float32)
    if r:
        if start is not None and start.shape == basis.shape and r == k:
            directions = _subspace_iteration(a, start.float())
        else:
            generator = torch.Generator().manual_seed(seed % (2**31))
            directions = _subspace_iteration(a, _subspace_iteration(a, torch.randn(r, a.shape[1], generator=generator)))
        largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
        basis[:r] = directions * torch.where(largest < 0, -1.0, 1.0)
    return basis.half()


def quantize(basis: torch.Tensor) -> dict[str, torch.Tensor]:
    """The basis as stored: int8 entries ``q`` and a float32 scale per row, B = q * scale.

    Any basis gives exact bounds (the projection is onto the stored rows' span, whatever they are);
    8 bits cost the sketch little of the captured energy and halve the bases' bytes (for ConvE, more
    than the shard files of a small graph in float16)."""
    b = basis.detach().float().cpu()
    scale = (b.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    return {"q": torch.round(b / scale[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}


def dequantize(q, scale) -> torch.Tensor:
    """The stored basis (float32, exactly q * scale) from :func:`quantize`'s arrays."""
    return torch.as_tensor(q).float() * torch.as_tensor(scale).float()[:, None]


def read_quantized_bases(arrays, keys) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """The stored (q, scale) of the sides ``keys`` ((block, side) pairs) from a bases file's arrays, each
    side's :func:`quantize` arrays under ``block/side/q`` and ``block/side/scale``."""
    return {key: (torch.as_tensor(arrays[f"{key[0]}/{key[1]}/q"]), torch.as_tensor(arrays[f"{key[0]}/{key[1]}/scale"]).float())
            for key in keys}  # fmt: skip


def read_bases(arrays, keys) -> dict[tuple[str, str], torch.Tensor]:
    """The stored bases (:func:`dequantize`) of the sides ``keys`` (see :func:`read_quantized_bases`)."""
    return {key: dequantize(q, scale) for key, (q, scale) in read_quantized_bases(arrays, keys).items()}


@dataclass
class Basis:
    """A basis B (k, d) ready for sketching: B in float32 and G^{-1} over its nonzero rows."""

    matrix: torch.Tensor  # (k, d) float32: the stored basis, exactly
    gram_inverse: torch.Tensor  # (k, k) float64
    #: the stored 8-bit entries and row scales (matrix = q * scale), where known: q is exact in float16
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, device: torch.device | str = "cpu",
                    quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Basis":  # fmt: skip
        b = matrix.to(device=device, dtype=torch.float32)
        b64 = b.double()
        gram = b64 @ b64.T
        live = b64.abs().sum(1) > 0  # rows left zero (tiny samples) take no part
        inverse = torch.zeros_like(gram)
        if bool(live.any()):
            inverse[live.nonzero()[:, 0][:, None], live.nonzero()[:, 0][None, :]] = torch.linalg.inv(gram[live][:, live])
        return cls(b, inverse, quantized)

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def sketch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates s = B x (float32) and residual norms rho = ||x - Pi x|| (float64) of the rows of ``x``.

        ||x||^2 is summed in float32 (a float64 copy of 10,369-wide rows costs more than the sketch); the
        1e-6 ||x||^2 added to rho^2 covers that rounding, so rho never falls below the true residual.
        """
        s = x.float() @ self.matrix.T
        return s, self._residual(x, s.double())[1]

    def sketch_query(self, x: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """A query vector's coordinates G^{-1} s (their inner products with stored coordinates are
        <Pi x, Pi y>) and residual norm rho. ``s``: B x, where the caller computed it (float32)."""
        s = x.reshape(1, -1).float() @ self.matrix.T if s is None else s.reshape(1, -1)
        weighted, rho = self._residual(x.reshape(1, -1), s.double())
        return weighted[0].float(), float(rho[0])

    def sketch_queries(self, x: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        """:meth:`sketch_query` of each row of ``x`` (M, d), in one matrix product with the basis."""
        weighted, rho = self._residual(x, (x.float() @ self.matrix.T).double())
        return [(weighted[i].float(), float(rho[i])) for i in range(len(x))]

    def _residual(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G^{-1} s (float64) and rho of rows ``x`` with coordinates ``s`` (float64), as :meth:`sketch` says."""
        weighted = s @ self.gram_inverse
        captured = (weighted * s).sum(-1)
        squared = torch.linalg.vector_norm(x.float(), dim=-1).double().pow(2)
        return weighted, ((squared - captured).clamp_min(0) + 1e-6 * squared).sqrt()
