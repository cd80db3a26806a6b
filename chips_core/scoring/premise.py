r"""Premise checks: can gradient-based selection be trusted with this model and this target?

CHIPS (like TRAK, LESS or any first-order influence) ranks pairs by how one step on them would
move the target loss *at the current parameters* :math:`\theta_0`. That ranking means something
only when :math:`\theta_0` already knows the target coarsely, as a web-pretrained CLIP does for
most domains. When it does not — the target's pairs are no better matched than chance, the
embeddings have collapsed — every pair's gradient points along one shared "domain shift"
direction, and the scores measure that instead of the pair's quality. These checks measure the
premise on the target evaluation set and a pool sample and say, per failing check, what to do.

Each check has a threshold in :class:`PremiseConfig` (ours, not the paper's, recorded with every
run). They were set to separate the demo's trained CLIP from the same architecture untrained, on
the demo's scan target (no selection result was looked at): matching 0.67–0.69 vs 0.49, median
p_corr 2.3× vs 0.67× chance, mean cosine 0.62–0.77 vs 0.99, w_L spread 0.15–0.19 vs 0.04.

- *eval matching*: the fraction of (eval image, other eval caption) comparisons in which the
  image's own caption scores higher (both directions; ties count half). Chance is 0.5. The
  in-set top-1 retrieval rate is reported beside it (chance ``1/N``), not judged: templated
  captions make it ambiguous.
- *eval loss*: :math:`L_{eval} / \ln N`. Uniform guessing gives 1. An eval set with repeated
  captions (templates) raises the achievable floor, and a confident model can sit near 1 there
  (the demo's trained CLIP: 1.01–1.09), so only a loss clearly worse than guessing fails (the
  cold model of the v1 benchmark: 10.45 / ln 300 = 1.83).
- *p_corr*: the median probability of matching an eval pair against the bank, over chance
  :math:`1/(K+1)`.
- *embedding collapse*: the mean pairwise cosine of the eval set's image embeddings and of its
  text embeddings (the larger is judged).
- *learnability spread*: :math:`(q_{90} - q_{10}) / q_{50}` of :math:`w_L` over a pool sample; near
  0, :math:`w_L` multiplies every pair by the same number and carries no information.
- *end-point vs full*: Spearman correlation of end-point and full-parameter alignment
  :math:`\langle\nabla\ell_i, \nabla L_{eval}\rangle` on a small pool sample (§1, the paper
  reports 0.83); optional, it costs a backward pass per sampled pair. On 32 pairs it is a noisy
  estimate (one benchmark model measured 0.33, 0.35 and 0.52 on three seeded samples), so its 95%
  interval is reported beside it (Fisher's z with the Fieller–Hartley–Pearson variance
  :math:`1.06/(n-3)`); the verdict still compares the estimate with the threshold.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import check
from .featurize import FeatureBatch
from .score import learnability_weight


@dataclass(frozen=True)
class PremiseConfig:
    pool_sample: int = 1024  # pool pairs whose features the learnability check reads
    full_param_sample: int = 32  # pool pairs for the end-point vs full-parameter Spearman (0: skip it)
    full_param_bank: int = 64  # bank pairs and eval pairs (at most) in that comparison's losses
    seed: int = 0  # seed of both samples
    min_eval_matching: float = 0.6  # eval matching accuracy (chance 0.5) at least this
    max_eval_loss_ratio: float = 1.5  # L_eval / ln N below this (1 = uniform guessing; see the module doc)
    min_p_corr_over_chance: float = 1.5  # median eval p_corr / (1/(K+1)) at least this
    max_mean_cosine: float = 0.85  # mean pairwise cosine of eval image / text embeddings below this
    min_w_learn_spread: float = 0.05  # (q90 - q10) / median of w_L over the pool sample at least this
    min_endpoint_spearman: float = 0.5  # end-point vs full-parameter alignment, Spearman at least this

    def __post_init__(self):
        check(self.pool_sample >= 2, "PremiseConfig", "pool_sample", self.pool_sample, "must be >= 2")
        check(self.full_param_sample == 0 or self.full_param_sample >= 3, "PremiseConfig", "full_param_sample",
              self.full_param_sample, "0 (skip) or >= 3")
        check(self.full_param_bank >= 2, "PremiseConfig", "full_param_bank", self.full_param_bank, "must be >= 2")
        check(0.5 <= self.min_eval_matching <= 1, "PremiseConfig", "min_eval_matching", self.min_eval_matching,
              "must lie in [0.5, 1]")
        check(self.max_eval_loss_ratio > 0, "PremiseConfig", "max_eval_loss_ratio", self.max_eval_loss_ratio,
              "must be > 0")
        check(-1 <= self.max_mean_cosine <= 1, "PremiseConfig", "max_mean_cosine", self.max_mean_cosine,
              "must lie in [-1, 1]")


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None  # None: not measured (skipped)
    threshold: str  # what passing means, e.g. ">= 0.7"
    passed: bool | None  # None: informational, or not measured
    advice: str = ""  # what to do when it fails
    interval: tuple[float, float] | None = None  # 95% interval of an estimate from a sample, where there is one


ADVICE = {
    "cold": "the model does not know the target: warm it up first with `chips warmup CONFIG` (CPT rounds on "
            "in-domain pool pairs, checked after each round, config warmup:), or select with chips_plus (no gradient "
            "ranking)",
    "flat": "w_L is the same for every pair: chips ranks as chips_align; consider chips_plus or chips_align",
    "endpoint": "end-point alignment does not track full-model influence for this model: the gradient scores "
                "(chips, dot, trak, the set-aware selectors) are unreliable here; select with chips_plus",
}


@dataclass(frozen=True)
class PremiseReport:
    checks: tuple[Check, ...]

    @property
    def failing(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    @property
    def passed(self) -> bool:
        return not self.failing

    def verdict(self) -> str:
        """One line: pass, or the failing checks and what to do."""
        if self.passed:
            # what the benchmarks support (docs/benchmarks/selection_v3.md): on animal_sheets the check passes and
            # every gradient selector loses to chips_plus or ties it; passing is needed, and not enough
            return ("premise check passed: the model knows this target, which gradient-based selection needs; on our "
                    "benchmarks it was not enough for a gradient selector to beat chips_plus: select with chips_plus "
                    "(README, Which selector)")
        names = ", ".join(f"{c.name} {fmt_value(c)} (must {direction(c.threshold)} to {c.threshold})"
                          for c in self.failing)
        advice = "; ".join(dict.fromkeys(c.advice for c in self.failing if c.advice))
        return f"premise check FAILED: {names}. What to do: {advice}"

    def to_json(self) -> str:
        return json.dumps({"passed": self.passed, "verdict": self.verdict(), "checks": [asdict(c) for c in self.checks]})


def direction(threshold: str) -> str:
    """Which way a failing check must move to pass: ``rise`` for a ``>=`` threshold, ``fall`` for a ``<`` one."""
    return "rise" if threshold.lstrip().startswith(">") else "fall"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def fmt_interval(interval) -> str:
    """``" [0.19, 0.74]"``, or ``""`` for a check without an interval (a :class:`Check`'s or its JSON's)."""
    return f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def fmt_value(c: Check) -> str:
    """A check's value as printed: ``0.329 [-0.03, 0.62]`` where it has an interval."""
    return _fmt(c.value) + fmt_interval(c.interval)


def spearman_interval(r: float, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95% interval of a Spearman correlation from ``n`` pairs: Fisher's z, variance ``1.06 / (n - 3)`` (Fieller,
    Hartley & Pearson 1957); None below 4 pairs or at |r| = 1."""
    if n < 4 or not abs(r) < 1:
        return None
    centre, half = math.atanh(r), z * math.sqrt(1.06 / (n - 3))
    return math.tanh(centre - half), math.tanh(centre + half)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def eval_matching(x: np.ndarray, y: np.ndarray, chunk: int = 2048) -> tuple[float, float]:
    """``(matching accuracy, top-1 retrieval)`` over the eval set; chance 0.5 and ``1/N``. ``(N, N)``
    similarities are formed ``chunk`` rows at a time."""
    x, y = _unit(x), _unit(y)
    n = len(x)
    if n < 2:
        raise ValueError(f"the eval set needs at least 2 pairs, got {n}")
    wins = top1 = 0.0
    for a, b in ((x, y), (y, x)):
        for s in range(0, n, chunk):
            sim = a[s:s + chunk] @ b.T  # (c, N): anchor i against every caption (or image)
            rows = np.arange(len(sim))
            own = sim[rows, s + rows][:, None]
            wins += (sim < own).sum() + 0.5 * ((sim == own).sum() - len(sim))  # minus each anchor's tie with itself
            top1 += (sim.argmax(1) == s + rows).sum()
    return float(wins / (2 * n * (n - 1))), float(top1 / (2 * n))


def mean_pairwise_cosine(v: np.ndarray) -> float:
    r"""Mean of :math:`v_i \cdot v_j` over :math:`i \ne j` for unit rows: :math:`(\|\sum v\|^2 - N)/(N(N-1))`."""
    v = _unit(v)
    n = len(v)
    return float((np.square(v.sum(0)).sum() - n) / (n * (n - 1)))


def relative_spread(w: np.ndarray) -> float:
    q10, q50, q90 = np.quantile(np.asarray(w, dtype=np.float64), [0.1, 0.5, 0.9])
    return float((q90 - q10) / abs(q50)) if q50 else math.inf


def premise_checks(eval_features: FeatureBatch, eval_loss: float, pool_features: FeatureBatch, bank_size: int,
                   config: PremiseConfig = PremiseConfig(), endpoint_spearman: float | None = None,
                   endpoint_sample: int | None = None, endpoint_note: str = "measured by `chips check`") -> PremiseReport:
    """Every check from the eval set's features against the bank, its loss, and a pool sample's features;
    ``endpoint_sample``: how many pairs the end-point vs full Spearman was measured on (for its interval);
    ``endpoint_note``: why it is not measured when ``endpoint_spearman`` is None."""
    n, c = len(eval_features), config
    matching, top1 = eval_matching(eval_features.x, eval_features.y)
    loss_ratio = eval_loss / math.log(n)
    p_ratio = float(np.median(eval_features.p_corr)) * (bank_size + 1)
    cosine = max(mean_pairwise_cosine(eval_features.x), mean_pairwise_cosine(eval_features.y))
    spread = relative_spread(learnability_weight(pool_features.p_corr.astype(np.float64),
                                                 pool_features.margin.astype(np.float64)))
    sp_ok = None if endpoint_spearman is None else endpoint_spearman >= c.min_endpoint_spearman
    return PremiseReport((
        Check("eval_matching", matching, f">= {c.min_eval_matching}", matching >= c.min_eval_matching, ADVICE["cold"]),
        Check("eval_top1_retrieval", top1, f"informational (chance {1 / n:.3g})", None),
        Check("eval_loss_over_ln_n", loss_ratio, f"< {c.max_eval_loss_ratio}", loss_ratio < c.max_eval_loss_ratio,
              ADVICE["cold"]),
        Check("p_corr_over_chance", p_ratio, f">= {c.min_p_corr_over_chance}", p_ratio >= c.min_p_corr_over_chance,
              ADVICE["cold"]),
        Check("mean_pairwise_cosine", cosine, f"< {c.max_mean_cosine}", cosine < c.max_mean_cosine, ADVICE["cold"]),
        Check("w_learn_spread", spread, f">= {c.min_w_learn_spread}", spread >= c.min_w_learn_spread, ADVICE["flat"]),
        Check("endpoint_vs_full_spearman", endpoint_spearman, f">= {c.min_endpoint_spearman}"
              + (f" ({endpoint_note})" if endpoint_spearman is None else ""), sp_ok, ADVICE["endpoint"],
              None if endpoint_spearman is None or endpoint_sample is None
              else spearman_interval(endpoint_spearman, endpoint_sample)),
    ))
