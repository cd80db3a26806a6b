r"""Johnson–Lindenstrauss sketches of end-point gradients (CHIPS_METHOD.md §4).

A gradient :math:`G = (G_v, G_t, g_t)` with :math:`G_v \in R^{D\times d_v}`,
:math:`G_t \in R^{D\times d_t}`, :math:`g_t \in R` is sketched block-wise:

.. math::  S(G) = \big(\mathrm{diag}(U_v G_v V_v^\top) + \mathrm{diag}(U_t G_t V_t^\top) + g_t r\big)/\sqrt k

so a rank-one block :math:`a \otimes h` costs :math:`(U a) \odot (V h)`, never :math:`O(kDd)`.
:class:`DenseSketch` is the reference: one Gaussian :math:`k \times P` matrix over the
flattened gradient, for small models only.

Flattened layout used throughout (``P = D*d_v + D*d_t + 1``): ``[vec(G_v), vec(G_t), g_t]``,
row-major, so ``vec(a ⊗ h) = (a[:, None] * h[None, :]).reshape(-1)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import check


@dataclass(frozen=True)
class SketchConfig:
    k: int = 512  # JL dimension of the sketched gradient (§4)
    seed: int = 0  # seed of the Gaussian sketch matrices; part of a run's identity

    def __post_init__(self):
        check(isinstance(self.k, int) and self.k >= 1, "SketchConfig", "k", self.k, "an int >= 1")


def _gaussian(gen: torch.Generator, *shape: int) -> torch.Tensor:
    # Drawn on the CPU in float64 so the matrices are the same on every device and dtype.
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


class RankOneSketch:
    """Block-wise, rank-one-aware Gaussian sketch. Matrices are a function of (dims, k, seed)."""

    def __init__(self, D: int, d_v: int, d_t: int, k: int = 512, seed: int = 0):
        self.D, self.d_v, self.d_t, self.k, self.seed = D, d_v, d_t, k, seed
        gen = torch.Generator().manual_seed(seed)
        self.U_v, self.V_v = _gaussian(gen, k, D), _gaussian(gen, k, d_v)
        self.U_t, self.V_t = _gaussian(gen, k, D), _gaussian(gen, k, d_t)
        self.r = _gaussian(gen, k)
        self._cache: dict = {}

    @property
    def P(self) -> int:
        return self.D * self.d_v + self.D * self.d_t + 1

    def mats(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
        """``(U_v, V_v, U_t, V_t, r)`` in the given dtype and device (cached)."""
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = tuple(m.to(device=device, dtype=dtype)
                                     for m in (self.U_v, self.V_v, self.U_t, self.V_t, self.r))
        return self._cache[key]

    def sketch_blocks(self, G_v: torch.Tensor, G_t: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
        r"""Sketch dense gradients. ``G_v (..., D, d_v)``, ``G_t (..., D, d_t)``, ``g_t (...)`` -> ``(..., k)``."""
        U_v, V_v, U_t, V_t, r = self.mats(G_v.dtype, G_v.device)
        img = ((U_v @ G_v) * V_v).sum(-1)  # diag(U G V^T) = rowsum((U G) ⊙ V)
        txt = ((U_t @ G_t) * V_t).sum(-1)
        return (img + txt + g_t[..., None] * r) / math.sqrt(self.k)

    def project_flat(self, g: torch.Tensor) -> torch.Tensor:
        """Sketch flattened gradients ``(n, P)`` -> ``(n, k)`` (the same map as :meth:`sketch_blocks`)."""
        n, D = g.shape[0], self.D
        G_v = g[:, : D * self.d_v].reshape(n, D, self.d_v)
        G_t = g[:, D * self.d_v: -1].reshape(n, D, self.d_t)
        return self.sketch_blocks(G_v, G_t, g[:, -1])


class DenseSketch:
    """Reference sketch: ``S(g) = R g / sqrt(k)`` with one dense Gaussian ``R (k, P)``."""

    def __init__(self, P: int, k: int = 512, seed: int = 0):
        if P * k > 200_000_000:
            raise ValueError(f"DenseSketch of k={k} over P={P} coordinates is too large; it is for small models")
        self.P, self.k, self.seed = P, k, seed
        self.R = _gaussian(torch.Generator().manual_seed(seed), k, P)

    def project_flat(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.R.to(g.dtype).t() / math.sqrt(self.k)


class IdentityProjection:
    """No sketch at all: the exact, unsketched gradient (``k = P``); for small models only."""

    def __init__(self, P: int):
        self.P = self.k = P

    def project_flat(self, g: torch.Tensor) -> torch.Tensor:
        return g
