"""Typed, validated configuration for each stage (house style 3).

Every field has the method's default from ../shared/CHIPS_METHOD.md; choices marked *(ours)*
there are fields here, so they can be changed and are recorded with a run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from .errors import ConfigError


def _check(cond: bool, cls: str, field: str, value, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{field}={value!r} is invalid: {rule}")


@dataclass(frozen=True)
class SketchConfig:
    k: int = 512  # JL dimension of the sketched gradient (§4)
    seed: int = 0  # seed of the Gaussian sketch matrices; part of a run's identity

    def __post_init__(self):
        _check(isinstance(self.k, int) and self.k >= 1, "SketchConfig", "k", self.k, "an int >= 1")


@dataclass(frozen=True)
class BankConfig:
    size: int = 1024  # K: number of reference pairs every pair is scored against (§2)
    seed: int = 0  # seed of the draw of bank pairs from the pool

    def __post_init__(self):
        _check(isinstance(self.size, int) and self.size >= 1, "BankConfig", "size", self.size, "an int >= 1")


@dataclass(frozen=True)
class CurvatureConfig:
    alpha: float = 0.7  # mix of negative-pair curvature: M = (1-alpha) Phi_pos + alpha Phi_neg + lambda I
    lambda_rel: float = 0.1  # lambda = lambda_rel * trace(mixed Phi) / k  (ours)
    hard_negatives: int = 16  # m: hardest negatives kept per anchor and direction
    n_curv: int = 20_000  # pool pairs sampled to estimate M (all if the pool is smaller)
    seed: int = 0  # seed of that sample

    def __post_init__(self):
        _check(0.0 <= self.alpha <= 1.0, "CurvatureConfig", "alpha", self.alpha, "must lie in [0, 1]")
        _check(self.lambda_rel > 0, "CurvatureConfig", "lambda_rel", self.lambda_rel, "must be > 0")
        _check(self.hard_negatives >= 1, "CurvatureConfig", "hard_negatives", self.hard_negatives, "must be >= 1")
        _check(self.n_curv >= 1, "CurvatureConfig", "n_curv", self.n_curv, "must be >= 1")


@dataclass(frozen=True)
class ScoreConfig:
    beta: float = 0.5  # text share of the relevance weight w_R (§6)
    random_seed: int = 0  # seed of the `random` baseline's keys

    def __post_init__(self):
        _check(0.0 <= self.beta <= 1.0, "ScoreConfig", "beta", self.beta, "must lie in [0, 1]")


@dataclass(frozen=True)
class FeaturizeConfig:
    micro_batch: int = 64  # every pair is computed in a padded chunk of exactly this many rows,
    #                        so its outputs are bit-identical whatever the caller's batch size
    eval_chunk: int = 4096  # rows of the eval-set logit matrix held at once (§2)

    def __post_init__(self):
        _check(self.micro_batch >= 1, "FeaturizeConfig", "micro_batch", self.micro_batch, "must be >= 1")
        _check(self.eval_chunk >= 1, "FeaturizeConfig", "eval_chunk", self.eval_chunk, "must be >= 1")


def config_hash(*configs) -> str:
    """Stable short hash of one or more config dataclasses (for provenance)."""
    payload = [{"type": type(c).__name__, **dataclasses.asdict(c)} for c in configs]
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
