r"""Global, target-side and curvature statistics (CHIPS_METHOD.md §2, §4, §5).

* :func:`eval_gradient` — the exact end-point gradient of the mean symmetric InfoNCE over the
  evaluation set (each eval pair uses the other eval pairs as negatives), chunked by rows.
* :func:`target_stats` — :math:`\hat u = S(\nabla_\theta L_{eval})` and :math:`\mu_x, \mu_y`.
* :func:`curvature_stats` — :math:`\Phi_{pos}, \Phi_{neg}` and the empirical Fisher ``F`` of the
  sketched per-sample gradients, over a seeded pool sample; :meth:`CurvatureStats.matrix`
  assembles :math:`M = (1-\alpha)\Phi_{pos} + \alpha\Phi_{neg} + \lambda I` for any ``alpha``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import check
from .featurize import Embedded, FeaturizeConfig, ScoringContext, forward_pre, pad_rows, padded_chunks, sample_features
from .identity import FeatureIdentity, seeded_sample


@dataclass(frozen=True)
class CurvatureConfig:
    alpha: float = 0.7  # mix of negative-pair curvature: M = (1-alpha) Phi_pos + alpha Phi_neg + lambda I
    lambda_rel: float = 0.1  # lambda = lambda_rel * trace(mixed Phi) / k  (ours)
    hard_negatives: int = 16  # m: hardest negatives kept per anchor and direction
    n_curv: int = 20_000  # pool pairs sampled to estimate M (all if the pool is smaller)
    seed: int = 0  # seed of that sample

    def __post_init__(self):
        check(0.0 <= self.alpha <= 1.0, "CurvatureConfig", "alpha", self.alpha, "must lie in [0, 1]")
        check(self.lambda_rel > 0, "CurvatureConfig", "lambda_rel", self.lambda_rel, "must be > 0")
        check(self.hard_negatives >= 1, "CurvatureConfig", "hard_negatives", self.hard_negatives, "must be >= 1")
        check(self.n_curv >= 1, "CurvatureConfig", "n_curv", self.n_curv, "must be >= 1")


# ---------------------------------------------------------------------------------------------
# The evaluation-set gradient

@dataclass
class EvalGradient:
    G_v: torch.Tensor  # (D, d_v)
    G_t: torch.Tensor  # (D, d_t)
    g_t: torch.Tensor  # ()
    loss: float


def eval_gradient(ctx: ScoringContext, emb: Embedded, chunk: int = 4096) -> EvalGradient:
    r"""Exact :math:`\nabla_\theta L_{eval}` through the pair Jacobians of §3.

    With logits :math:`L = s X Y^\top`, row softmax :math:`P`, column softmax :math:`Q` and
    :math:`\Omega = (P + Q - 2I)/(2N)`: :math:`G_v = \sum_a [\sum_b \Omega_{ab}\alpha_{ab}] \otimes h_{v,a}`,
    :math:`G_t = \sum_b [\sum_a \Omega_{ab}\beta_{ab}] \otimes h_{t,b}`, :math:`g_t = s\sum\Omega_{ab}c_{ab}`.
    Only ``chunk`` rows of the ``N x N`` logit matrix are held at once.
    """
    X, Y, s, N = emb.x, emb.y, ctx.s, emb.x.shape[0]
    if N < 2:
        raise ValueError(f"the target evaluation set needs at least 2 pairs, got {N}")
    lse_row = torch.empty(N, dtype=X.dtype, device=X.device)
    lse_col = torch.full((N,), -math.inf, dtype=X.dtype, device=X.device)
    for a in range(0, N, chunk):
        L = s * (X[a:a + chunk] @ Y.t())
        lse_row[a:a + chunk] = L.logsumexp(1)
        lse_col = torch.logaddexp(lse_col, L.logsumexp(0))
    diag = s * (X * Y).sum(1)
    A = torch.zeros_like(X)  # rows: sum_b Omega_ab alpha_ab * n_v,a / s, assembled below
    Bx = torch.zeros_like(Y)  # rows b: sum_a Omega_ab x_a
    Bc = torch.zeros(N, dtype=X.dtype, device=X.device)  # sum_a Omega_ab c_ab
    g_t = X.new_zeros(())
    for a in range(0, N, chunk):
        rows = slice(a, a + chunk)
        C = X[rows] @ Y.t()
        L = s * C
        Om = (torch.exp(L - lse_row[rows, None]) + torch.exp(L - lse_col[None, :])) / (2 * N)
        idx = torch.arange(a, min(a + chunk, N), device=X.device)
        Om[idx - a, idx] -= 1.0 / N
        A[rows] = Om @ Y - (Om * C).sum(1, keepdim=True) * X[rows]
        Bx += Om.t() @ X[rows]
        Bc += (Om * C).sum(0)
        g_t = g_t + s * (Om * C).sum()
    A = A * (s / emb.nv)[:, None]
    Bt = (Bx - Bc[:, None] * Y) * (s / emb.nt)[:, None]
    loss = (0.5 * (lse_row - diag + lse_col - diag)).mean()
    return EvalGradient(A.t() @ emb.h_v, Bt.t() @ emb.h_t, g_t, float(loss))


@dataclass
class TargetStats:
    """What a target evaluation set contributes to scoring; independent of the bank."""

    u: np.ndarray  # (k,) sketched eval-loss gradient
    mu_x: np.ndarray  # (D,) normalised mean of eval image embeddings
    mu_y: np.ndarray  # (D,) normalised mean of eval text embeddings
    eval_loss: float
    n_eval: int
    identity: FeatureIdentity  # bank_id is the context's; only model_checksum, sketch_seed, k bind
    # the eval pairs' own unit embeddings (n_eval, D): what `chips_plus` calibrates its gates on
    eval_x: np.ndarray | None = None
    eval_y: np.ndarray | None = None


def target_stats(ctx: ScoringContext, images, texts, pair_ids: Sequence[str],
                 config: FeaturizeConfig = FeaturizeConfig()) -> TargetStats:
    """Forward the eval set once and compute :math:`\\hat u, \\mu_x, \\mu_y` (§4, §6)."""
    hv, ht = forward_pre(ctx.endpoint, images, texts, config.micro_batch)
    return target_stats_pre(ctx, hv, ht, pair_ids, config)


def target_stats_pre(ctx: ScoringContext, h_v, h_t, pair_ids, config: FeaturizeConfig = FeaturizeConfig()) -> TargetStats:
    emb = ctx.embed(h_v, h_t, list(pair_ids))
    eg = eval_gradient(ctx, emb, config.eval_chunk)
    u = ctx.sketch.sketch_blocks(eg.G_v, eg.G_t, eg.g_t)
    mu_x = emb.x.mean(0)
    mu_y = emb.y.mean(0)
    as_np = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    return TargetStats(as_np(u), as_np(mu_x / mu_x.norm()), as_np(mu_y / mu_y.norm()),
                       eg.loss, len(pair_ids), ctx.identity, as_np(emb.x), as_np(emb.y))


# ---------------------------------------------------------------------------------------------
# Curvature

@dataclass
class CurvatureStats:
    r"""Sums over the sample of :math:`\hat s\hat s^\top` (positive / hard-negative) and :math:`\hat g\hat g^\top`."""

    phi_pos: np.ndarray  # (k, k) mean over the sample
    phi_neg: np.ndarray  # (k, k)
    fisher: np.ndarray  # (k, k) mean of g g^T (TRAK's empirical Fisher)
    n: int
    hard_negatives: int
    sample_seed: int
    identity: FeatureIdentity

    def matrix(self, alpha: float, lambda_rel: float) -> tuple[np.ndarray, float]:
        r""":math:`M = (1-\alpha)\Phi_{pos} + \alpha\Phi_{neg} + \lambda I`, :math:`\lambda = \lambda_{rel}\,\mathrm{tr}(\cdot)/k`."""
        mixed = (1 - alpha) * self.phi_pos + alpha * self.phi_neg
        lam = lambda_rel * np.trace(mixed) / mixed.shape[0]
        return mixed + lam * np.eye(mixed.shape[0]), float(lam)

    def fisher_matrix(self, lambda_rel: float) -> tuple[np.ndarray, float]:
        lam = lambda_rel * np.trace(self.fisher) / self.fisher.shape[0]
        return self.fisher + lam * np.eye(self.fisher.shape[0]), float(lam)


def logit_jacobians(ctx: ScoringContext, a: dict, b: dict, c: torch.Tensor) -> torch.Tensor:
    r"""Sketched Jacobians :math:`\hat s_{ab} = S(J(a, b))` of logits image ``a`` × text ``b``.

    ``a`` holds image-side rows ``uxv, uyv?, nv, vhv, uxt`` and ``b`` text-side rows
    ``uyv, uyt, nt, vht``, broadcast together; ``c`` their cosines.
    """
    s, r = ctx.s, ctx.mats[4]
    img = (s * (b["uyv"] - c[..., None] * a["uxv"]) / a["nv"][..., None]) * a["vhv"]
    txt = (s * (a["uxt"] - c[..., None] * b["uyt"]) / b["nt"][..., None]) * b["vht"]
    return (img + txt + (s * c)[..., None] * r) / math.sqrt(ctx.k)


def _image_side(e: Embedded, idx=None) -> dict:
    pick = (lambda t: t) if idx is None else (lambda t: t[idx])
    return {"uxv": pick(e.uxv), "nv": pick(e.nv), "vhv": pick(e.vhv), "uxt": pick(e.uxt)}


def _text_side(e: Embedded, idx=None) -> dict:
    pick = (lambda t: t) if idx is None else (lambda t: t[idx])
    return {"uyv": pick(e.uyv), "nt": pick(e.nt), "vht": pick(e.vht), "uyt": pick(e.uyt)}


def curvature_terms(ctx: ScoringContext, emb: Embedded, m: int):
    r"""Per-anchor sketched Jacobians: positives ``(B, k)``, and each direction's ``m`` hardest
    bank negatives ``(B, m, k)`` with weights :math:`\tfrac12\pi` (softmax renormalised over the
    kept negatives; each direction weighted ½ as in the loss *(ours)*)."""
    C_it, C_ti, mask = ctx.bank_logits(emb)
    c = (emb.x * emb.y).sum(1)
    pos = logit_jacobians(ctx, _image_side(emb), _text_side(emb), c)
    m = min(m, C_it.shape[1])
    neg, weights = [], []
    # image i -> bank text j: J(i, j)
    top, j = C_it.masked_fill(mask, -math.inf).topk(m, dim=1)
    A = {k_: v[:, None] if v.ndim == 1 else v[:, None, :] for k_, v in _image_side(emb).items()}
    neg.append(logit_jacobians(ctx, A, _text_side(ctx.bank, j), torch.gather(C_it, 1, j)))
    weights.append(0.5 * (ctx.s * top).softmax(1))
    # bank image j -> text i: J(j, i)
    top, j = C_ti.masked_fill(mask, -math.inf).topk(m, dim=1)
    T = {k_: v[:, None] if v.ndim == 1 else v[:, None, :] for k_, v in _text_side(emb).items()}
    neg.append(logit_jacobians(ctx, _image_side(ctx.bank, j), T, torch.gather(C_ti, 1, j)))
    weights.append(0.5 * (ctx.s * top).softmax(1))
    return pos, torch.cat(neg, 1), torch.cat(weights, 1)


def curvature_sample(pool_ids: Sequence[str], config: CurvatureConfig) -> list[str]:
    """The seeded pool sample that ``M`` is estimated on, in canonical order."""
    return seeded_sample(pool_ids, min(config.n_curv, len(pool_ids)), config.seed)


def curvature_stats_pre(ctx: ScoringContext, h_v, h_t, pair_ids: Sequence[str], config: CurvatureConfig,
                        micro_batch: int = 64) -> CurvatureStats:
    """Accumulate :math:`\\Phi_{pos}, \\Phi_{neg}, F` over the given sample pairs (float64 sums, fixed order)."""
    k, n = ctx.k, len(pair_ids)
    sums = {name: torch.zeros(k, k, dtype=torch.float64, device=ctx.device) for name in ("pos", "neg", "fisher")}
    for rows, n_real in padded_chunks(n, micro_batch):
        ids = list(pair_ids[rows]) + [None] * (micro_batch - n_real)
        emb = ctx.embed(pad_rows(h_v[rows], micro_batch), pad_rows(h_t[rows], micro_batch), ids)
        pos, neg, w = curvature_terms(ctx, emb, config.hard_negatives)
        g = sample_features(ctx, emb)["g"]
        pos, neg, w, g = (t[:n_real].double() for t in (pos, neg, w, g))
        sums["pos"] += pos.t() @ pos
        negf = neg.reshape(-1, k)
        sums["neg"] += (negf * w.reshape(-1, 1)).t() @ negf
        sums["fisher"] += g.t() @ g
    as_np = lambda t: (t / n).cpu().numpy()  # noqa: E731
    return CurvatureStats(as_np(sums["pos"]), as_np(sums["neg"]), as_np(sums["fisher"]), n,
                          config.hard_negatives, config.seed, ctx.identity)


def curvature_stats(ctx: ScoringContext, images, texts, pair_ids, config: CurvatureConfig,
                    featurize: FeaturizeConfig = FeaturizeConfig()) -> CurvatureStats:
    """Forward the given sample pairs and accumulate the curvature statistics."""
    hv, ht = forward_pre(ctx.endpoint, images, texts, featurize.micro_batch)
    return curvature_stats_pre(ctx, hv, ht, list(pair_ids), config, featurize.micro_batch)
