r"""Utilities, baselines and budgeted selection (CHIPS_METHOD.md §6–§7).

.. math::
    \hat A(z) = \hat g(z)^\top M^{-1}\hat u,\quad
    w_L(z) = (1-p_{corr}(z))\,(1+\sigma(-m(z))),\quad
    w_R(z) = \sigma\big((1-\beta)\cos(x,\mu_x) + \beta\cos(y,\mu_y)\big),\quad
    I(z) = \hat A\, w_L\, w_R

``chips`` is exactly the paper's utility. ``chips_plus`` is the product's guarded selector (not in
the paper; see :func:`guarded_tier`): a pair is eligible when CHIPS's relevance factor and its
image–text agreement are typical of the target's own eval pairs, and eligible pairs come first in a
seeded random order.

Everything here reads stored features plus target and curvature statistics; the model is not
needed. Scores are computed in float64 from the (possibly float16-stored) features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from ..errors import check
from .featurize import FeatureBatch
from .identity import seeded_unit
from .target import CurvatureConfig, CurvatureStats, TargetStats


@dataclass(frozen=True)
class ScoreConfig:
    beta: float = 0.5  # text share of the relevance weight w_R (§6)
    random_seed: int = 0  # seed of the `random` baseline's keys (and of chips_plus's order within a tier)
    # chips_plus gates, as quantiles of the target eval pairs' own values: in-domain when w_R >= the eval
    # set's 5th percentile (set, not tuned); caption agrees with the image when x.y >= the eval set's 25th
    # percentile (chosen among 0/25/50/75 on the v2 eval set: docs/benchmarks/chips_plus_defaults.md).
    plus_relevance_quantile: float = 0.05
    plus_match_quantile: float = 0.25  # the agreement gate's quantile (see plus_relevance_quantile)

    def __post_init__(self):
        check(0.0 <= self.beta <= 1.0, "ScoreConfig", "beta", self.beta, "must lie in [0, 1]")
        for key in ("plus_relevance_quantile", "plus_match_quantile"):
            v = getattr(self, key)
            check(0.0 <= v < 1.0, "ScoreConfig", key, v, "must lie in [0, 1)")


METHODS = ("random", "clipscore", "dot", "trak", "chips_align", "chips_align_learn", "chips", "chips_plus")


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def learnability_weight(p_corr: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """:math:`w_L = (1 - p_{corr})(1 + \\sigma(-m))`: high for pairs the model has not learned yet."""
    return (1.0 - p_corr) * (1.0 + sigmoid(-margin))


def relevance_weight(x: np.ndarray, y: np.ndarray, mu_x: np.ndarray, mu_y: np.ndarray, beta: float) -> np.ndarray:
    """:math:`w_R \\in [\\sigma(-1), \\sigma(1)]`: a soft domain weight, never a hard filter."""
    cx = _cos(x, mu_x)
    cy = _cos(y, mu_y)
    return sigmoid((1.0 - beta) * cx + beta * cy)


def in_domain(w_r: np.ndarray, target: TargetStats, config: ScoreConfig) -> np.ndarray:
    """The relevance gate of ``chips_plus`` (and of the warm-up's sample, stages/warmup.py): ``w_R`` at least the
    target eval pairs' own ``plus_relevance_quantile``."""
    if target.eval_x is None or target.eval_y is None:
        raise ValueError("the relevance gate needs the eval pairs' embeddings in the target statistics "
                         "(TargetStats.eval_x, eval_y); compute them with target_stats")
    eval_wr = relevance_weight(target.eval_x.astype(np.float64), target.eval_y.astype(np.float64), target.mu_x,
                               target.mu_y, config.beta)
    return w_r >= np.quantile(eval_wr, config.plus_relevance_quantile)


def guarded_tier(features: FeatureBatch, w_r: np.ndarray, target: TargetStats, config: ScoreConfig) -> np.ndarray:
    """``chips_plus``'s tier per pair: 2 = in the target domain and its caption agrees with its image,
    1 = in the domain only, 0 = neither. Both gates are calibrated on the target eval set, so they
    adapt to any domain and noise rate: in-domain means ``w_R`` at least the eval pairs'
    ``plus_relevance_quantile``; agreeing means ``x·y`` at least the eval pairs' ``plus_match_quantile``."""
    if target.eval_x is None or target.eval_y is None:
        raise ValueError("chips_plus needs the eval pairs' embeddings in the target statistics (TargetStats.eval_x, "
                         "eval_y); compute them with target_stats")
    ex, ey = target.eval_x.astype(np.float64), target.eval_y.astype(np.float64)
    eval_match = np.einsum("ij,ij->i", ex, ey)
    relevant = in_domain(w_r, target, config)
    agrees = features.clipscore.astype(np.float64) >= np.quantile(eval_match, config.plus_match_quantile)
    return relevant.astype(np.float64) + (relevant & agrees)


ROW_BLOCK = 256  # rows converted to float64 at once (a block stays in cache)


def row_dots(a: np.ndarray, vectors, squares: bool = False) -> np.ndarray:
    """``a @ v`` for each ``v`` in ``vectors`` (and each row's ``a_i·a_i`` with ``squares``), in float64, the same
    bits for a row whatever the rows beside it: scoring a pool part by part (the score stage) gives the same bits as
    scoring it whole. Rows are converted into one block of :data:`ROW_BLOCK` rows, the last one zero-padded, and
    each block is one matrix product of that fixed shape: BLAS takes the same path for every row of every block,
    where a product over all the rows at once (or over a short last block) does not promise that. Returns
    ``(len(vectors) [+ 1], n)``."""
    V = np.stack([np.asarray(v, dtype=np.float64) for v in vectors], axis=1)
    m, n = V.shape[1], len(a)
    out = np.empty((m + int(squares), n), dtype=np.float64)
    block = np.zeros((ROW_BLOCK, a.shape[1]), dtype=np.float64)
    widen = _Float16Widener(a) if a.dtype == np.float16 else None
    for s in range(0, n, ROW_BLOCK):
        rows = a[s:s + ROW_BLOCK]
        r = len(rows)
        if r < ROW_BLOCK:
            block[r:] = 0.0
        if widen is None:
            np.copyto(block[:r], rows)
        else:
            widen(s, r, block)
        out[:m, s:s + r] = (block @ V)[:r].T
        if squares:
            out[m, s:s + r] = np.einsum("ij,ij->i", block[:r], block[:r])
    return out


class _Float16Widener:
    """Stored float16 rows into a float64 block, exactly and ~3x faster than NumPy's float16 cast (which widens one
    element at a time; it was half of a rescore's arithmetic): torch's vectorised float16 -> float32, then NumPy's
    float32 -> float64. Both steps are exact, so the block holds the very values ``np.copyto`` gives."""

    def __init__(self, a: np.ndarray):
        try:  # zero copy; unlike from_numpy, no warning for a read-only (memory-mapped) array
            self.src = torch.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError):  # negative strides, or a NumPy before read-only DLPack: a copy
            self.src = torch.from_numpy(np.array(a))  # (a writable one, so no warning either)
        self.f32 = torch.empty((ROW_BLOCK, a.shape[1]), dtype=torch.float32)
        self.f32_np = self.f32.numpy()

    def __call__(self, start: int, r: int, block: np.ndarray) -> None:
        self.f32[:r].copy_(self.src[start:start + r])  # on torch's threads: see the score stage's ``torch_threads``
        np.copyto(block[:r], self.f32_np[:r])


def _cos(v: np.ndarray, mu: np.ndarray) -> np.ndarray:
    # Stored embeddings are unit vectors up to float16 rounding; renormalise so |cos| <= 1 exactly.
    dot, sq = row_dots(v, [mu], squares=True)
    return np.clip(dot / np.maximum(np.sqrt(sq), 1e-300), -1.0, 1.0)


@dataclass
class Preconditioners:
    """Solved once per (target, curvature, alpha): ``v = M^{-1} u`` and TRAK's ``(F + λI)^{-1} u``."""

    v_chips: np.ndarray
    v_trak: np.ndarray
    lam_chips: float
    lam_trak: float

    @classmethod
    def solve(cls, target: TargetStats, curv: CurvatureStats, config: CurvatureConfig = CurvatureConfig()):
        M, lam = curv.matrix(config.alpha, config.lambda_rel)
        F, lam_f = curv.fisher_matrix(config.lambda_rel)
        return cls(_spd_solve(M, target.u), _spd_solve(F, target.u), lam, lam_f)


def _spd_solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    return scipy.linalg.solve(A, b, assume_a="pos")


def score_features(features: FeatureBatch, target: TargetStats, curv: CurvatureStats,
                   curvature: CurvatureConfig = CurvatureConfig(), config: ScoreConfig = ScoreConfig(),
                   pre: Preconditioners | None = None) -> dict[str, np.ndarray]:
    """Every factor and every score of the §7 table for each pair (float64 arrays)."""
    features.identity.require_same(curv.identity, "curvature statistics")
    features.identity.require_same(target.identity, "target statistics", ("model_checksum", "sketch_seed", "k", "precision"))
    pre = pre or Preconditioners.solve(target, curv, curvature)
    align, dot, trak = row_dots(features.g, [pre.v_chips, target.u, pre.v_trak])
    w_l = learnability_weight(features.p_corr.astype(np.float64), features.margin.astype(np.float64))
    w_r = relevance_weight(features.x, features.y, target.mu_x, target.mu_y, config.beta)
    key = seeded_unit(features.pair_id, config.random_seed)
    return {
        "random": key,
        "clipscore": features.clipscore.astype(np.float64),
        "dot": dot,
        "trak": trak,
        "chips_align": align,
        "chips_align_learn": align * w_l,
        "chips": align * w_l * w_r,
        # tier + a key in [0, 1): every eligible pair outranks every other, in the seeded random order
        "chips_plus": guarded_tier(features, w_r, target, config) + np.minimum(key, 1.0 - 2.0**-52),
        "w_learn": w_l,
        "w_relevance": w_r,
    }


def select_top(scores: np.ndarray, pair_ids, budget: float) -> np.ndarray:
    """Indices of the ``ceil(budget * N)`` largest scores, ties broken by ascending ``pair_id``."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget!r} must lie in (0, 1]")
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} scores are NaN; refusing to rank them")
    n_keep = math.ceil(budget * len(scores) - 1e-9)
    order = np.lexsort((np.asarray(pair_ids, dtype=str), -scores))
    return order[:n_keep]
