"""Premise checks (scoring/premise.py): each statistic on hand-made embeddings with a known answer,
and the verdict on a model that knows its target vs one that does not."""
import math

import numpy as np
import pytest

from chips_core.errors import ConfigError
from chips_core.scoring.featurize import FeatureBatch
from chips_core.scoring.identity import FeatureIdentity
from chips_core.scoring.premise import (PremiseConfig, eval_matching, mean_pairwise_cosine, premise_checks,
                                        relative_spread, spearman_interval)


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_eval_matching_known_answers():
    eye = np.eye(6)
    assert eval_matching(eye, eye) == (1.0, 1.0)  # every image's own caption wins every comparison
    assert eval_matching(eye, eye[::-1]) == (pytest.approx(0.4), 0.0)  # own 0; of 5 others 1 wins, 4 tie
    same = np.ones((5, 3))
    assert eval_matching(same, same) == (0.5, 0.2)  # all ties: half credit; argmax picks index 0 once per 5
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    acc, top1 = eval_matching(x, y, chunk=37)
    assert abs(acc - 0.5) < 0.02 and eval_matching(x, y) == (acc, top1)  # chunking does not change it


def test_mean_pairwise_cosine_equals_the_brute_force_mean():
    v = _unit(np.random.default_rng(1).normal(size=(30, 8)) + 0.5)
    c = v @ v.T
    assert mean_pairwise_cosine(v) == pytest.approx((c.sum() - 30) / (30 * 29))
    assert mean_pairwise_cosine(np.tile([[1.0, 0.0]], (4, 1))) == pytest.approx(1.0)


def test_relative_spread():
    assert relative_spread(np.full(100, 1.68)) == 0.0
    assert relative_spread(np.linspace(1, 3, 101)) == pytest.approx((2.8 - 1.2) / 2.0)


def _features(x, y, p_corr, margin):
    n = len(x)
    ident = FeatureIdentity("m", "b", 0, 4)
    return FeatureBatch([f"p{i}" for i in range(n)], x.astype(np.float32), y.astype(np.float32),
                        np.zeros((n, 4), np.float32), np.asarray(p_corr, np.float32), np.asarray(margin, np.float32),
                        np.zeros(n, np.float32), np.zeros(n, np.float32), ident)


def test_a_model_that_knows_its_target_passes_and_a_collapsed_one_fails_naming_the_checks():
    rng = np.random.default_rng(2)
    n, k = 64, 255
    x = _unit(rng.normal(size=(n, 32)))
    good = _features(x, _unit(x + 0.3 * rng.normal(size=x.shape)), rng.uniform(0.05, 0.6, n), rng.normal(0, 0.1, n))
    report = premise_checks(good, 0.4 * math.log(n), good, k, endpoint_spearman=0.8)
    assert report.passed and "passed" in report.verdict()
    cone = _unit(np.ones((n, 32)) + 0.05 * rng.normal(size=(n, 32)))  # collapsed, and matched by chance
    cold = _features(cone, _unit(np.ones((n, 32)) + 0.05 * rng.normal(size=(n, 32))), np.zeros(n), np.full(n, -0.3))
    report = premise_checks(cold, 2.0 * math.log(n), cold, k, endpoint_spearman=0.2, endpoint_sample=32)
    failing = {c.name for c in report.failing}
    assert failing == {"eval_matching", "eval_loss_over_ln_n", "p_corr_over_chance", "mean_pairwise_cosine",
                       "w_learn_spread", "endpoint_vs_full_spearman"}
    assert report.verdict().startswith("premise check FAILED: eval_matching") and "warm it up" in report.verdict()
    assert '"passed": false' in report.to_json()
    # the Spearman is an estimate from 32 pairs: its 95% interval is printed beside it (Fisher z, 1.06 / (n - 3))
    assert "endpoint_vs_full_spearman 0.2 [-0.17, 0.52] (must rise to >= 0.5)" in report.verdict()


def test_spearman_interval_by_hand():
    lo, hi = spearman_interval(0.5, 32)
    half = 1.959964 * math.sqrt(1.06 / 29)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(0.5) - half), math.tanh(math.atanh(0.5) + half)))
    assert (round(lo, 3), round(hi, 3)) == (0.173, 0.728)
    assert spearman_interval(0.5, 3) is None and spearman_interval(1.0, 32) is None
    assert spearman_interval(0.5, 128)[1] - spearman_interval(0.5, 128)[0] < hi - lo  # more pairs, narrower


def test_premise_config_names_the_bad_value():
    with pytest.raises(ConfigError, match=r"PremiseConfig.min_eval_matching=0.3"):
        PremiseConfig(min_eval_matching=0.3)
