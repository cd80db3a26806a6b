"""§5–§8: curvature assembly, the three factors, selection, storage and the refusals."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from chips_core.errors import ConfigError, IncompatibleFeaturesError, NonFiniteEmbeddingError
from chips_core.scoring.endpoint import EndpointModel
from chips_core.scoring.featurize import FeatureBatch, FeaturizeConfig, Featurizer
from chips_core.scoring.score import (METHODS, ScoreConfig, learnability_weight, relevance_weight, score_features,
                                      select_top, sigmoid)
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig, curvature_stats_pre, target_stats

from ..conftest import make_bank


@pytest.fixture(scope="module")
def scored(demo_model, pairs, eval_pairs):
    bank = make_bank(demo_model, pairs, size=32)
    feat = Featurizer(EndpointModel(demo_model), bank, SketchConfig(k=64), FeaturizeConfig(micro_batch=32))
    images, texts, ids = pairs
    features = feat.featurize(images, texts, ids)
    hv, ht = feat.endpoint.encode_pre(images, texts)
    ccfg = CurvatureConfig(hard_negatives=8)
    curv = curvature_stats_pre(feat.ctx, hv, ht, ids, ccfg)
    tgt = target_stats(feat.ctx, *eval_pairs)
    return feat, features, curv, tgt, ccfg


def test_alpha_zero_is_positive_pair_curvature(scored):
    *_, curv, _, _ = scored
    M, lam = curv.matrix(alpha=0.0, lambda_rel=0.1)
    k = curv.phi_pos.shape[0]
    assert lam == pytest.approx(0.1 * np.trace(curv.phi_pos) / k)
    np.testing.assert_allclose(M, curv.phi_pos + lam * np.eye(k))
    M1, _ = curv.matrix(alpha=1.0, lambda_rel=0.1)
    assert not np.allclose(M1, M), "negative-pair curvature must differ from positive-pair curvature"
    assert np.all(np.linalg.eigvalsh(curv.matrix(0.7, 0.1)[0]) > 0)


def test_relevance_weight_bounds_and_learnability_monotone(scored):
    _, features, _, tgt, _ = scored
    w_r = relevance_weight(features.x, features.y, tgt.mu_x, tgt.mu_y, 0.5)
    assert w_r.min() >= sigmoid(np.array(-1.0)) - 1e-12 and w_r.max() <= sigmoid(np.array(1.0)) + 1e-12
    # the extremes are reached exactly by embeddings equal / opposite to the target means
    ext = relevance_weight(np.stack([tgt.mu_x, -tgt.mu_x]), np.stack([tgt.mu_y, -tgt.mu_y]), tgt.mu_x, tgt.mu_y, 0.5)
    np.testing.assert_allclose(ext, [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])
    assert sigmoid(np.array(-1.0)) == pytest.approx(0.2689, abs=1e-4)
    p = np.linspace(0, 1, 11)
    for m in (-0.5, 0.0, 0.5):
        w = learnability_weight(p, np.full_like(p, m))
        assert np.all(np.diff(w) < 0) and w[-1] == 0.0


def test_scores_table_and_factor_product(scored):
    _, features, curv, tgt, ccfg = scored
    s = score_features(features, tgt, curv, ccfg, ScoreConfig())
    assert set(METHODS) <= set(s)
    np.testing.assert_allclose(s["chips"], s["chips_align"] * s["w_learn"] * s["w_relevance"])
    np.testing.assert_allclose(s["dot"], features.g.astype(np.float64) @ tgt.u)
    np.testing.assert_allclose(s["clipscore"], np.sum(features.x * features.y, 1), atol=1e-5)
    assert not np.allclose(s["trak"], s["chips_align"])
    for v in s.values():
        assert np.all(np.isfinite(v))


def test_select_top_budget_and_ties():
    ids = [f"p{i:02d}" for i in range(10)]
    scores = np.array([1, 5, 5, 5, 0, 2, 2, 9, 3, 5], dtype=float)
    keep = select_top(scores, ids, 0.3)  # ceil(0.3 * 10) = 3, not 4 by float error
    assert [ids[i] for i in keep] == ["p07", "p01", "p02"]
    assert len(select_top(scores, ids, 0.25)) == 3 and len(select_top(scores, ids, 1.0)) == 10
    with pytest.raises(ValueError, match="budget=1.5"):
        select_top(scores, ids, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        select_top(np.array([1.0, np.nan]), ids[:2], 0.5)


@pytest.mark.parametrize("field,value", [("model_checksum", "0" * 64), ("bank_id", "other"), ("sketch_seed", 99), ("k", 32)])
def test_incompatible_features_refused(scored, field, value):
    _, features, curv, tgt, ccfg = scored
    bad = dataclasses.replace(features, identity=dataclasses.replace(features.identity, **{field: value}))
    with pytest.raises(IncompatibleFeaturesError, match=field):
        score_features(bad, tgt, curv, ccfg)
    with pytest.raises(IncompatibleFeaturesError, match=field):
        FeatureBatch.concat([features, bad])


def test_arrow_roundtrip_float16(scored):
    _, features, curv, tgt, ccfg = scored
    table = features.to_arrow("float16")
    assert str(table.schema.field("g").type) == "fixed_size_list<item: halffloat>[64]"
    back = FeatureBatch.from_arrow(table)
    assert back.identity == features.identity and back.pair_id == features.pair_id
    np.testing.assert_allclose(back.g, features.g, rtol=2e-3, atol=1e-3 * np.abs(features.g).max())
    exact = score_features(features, tgt, curv, ccfg)["chips"]
    stored = score_features(back, tgt, curv, ccfg)["chips"]
    assert spearmanr(exact, stored).statistic > 0.999


def test_non_finite_and_zero_norm_embeddings_name_the_pair(scored):
    feat, *_ = scored
    hv, ht = torch.randn(3, feat.ctx.W_v.shape[1]), torch.randn(3, feat.ctx.W_t.shape[1])
    bad = hv.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(NonFiniteEmbeddingError, match="'pair-b'.*non-finite"):
        feat.featurize_pre(bad, ht, ["pair-a", "pair-b", "pair-c"])
    zero = hv.clone()
    zero[2] = 0.0
    with pytest.raises(NonFiniteEmbeddingError, match="'pair-c'.*zero-norm"):
        feat.featurize_pre(zero, ht, ["pair-a", "pair-b", "pair-c"])


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match=r"CurvatureConfig.alpha=1.5"):
        CurvatureConfig(alpha=1.5)
    with pytest.raises(ConfigError, match=r"SketchConfig.k=0"):
        SketchConfig(k=0)


def test_features_in_the_warehouse_roundtrip_and_refuse_mixed_identities(scored, tmp_path):
    from chips_core.platform.features import read_features, write_features
    from chips_core.platform.warehouse import Warehouse

    _, features, curv, tgt, ccfg = scored
    wh = Warehouse(str(tmp_path / "wh"))
    half = len(features) // 2
    sl = lambda a, s: a[s]  # noqa: E731
    parts = [FeatureBatch(features.pair_id[s], *(sl(getattr(features, f), s) for f in
                                                ("x", "y", "g", "p_corr", "margin", "clipscore", "loss")),
                          features.identity) for s in (slice(half, None), slice(0, half))]
    for i, part in enumerate(parts):
        write_features(wh, part, "feat-1", f"shard-{i}")
    back = read_features(wh, "feat-1")
    assert back.pair_id == sorted(features.pair_id) and back.identity == features.identity
    ranks = score_features(back, tgt, curv, ccfg)["chips"]
    direct = score_features(features, tgt, curv, ccfg)["chips"]
    order = np.argsort(np.asarray(features.pair_id, dtype=str))
    assert spearmanr(ranks, direct[order]).statistic > 0.999
    other = dataclasses.replace(parts[0], identity=dataclasses.replace(features.identity, k=999))
    write_features(wh, other, "feat-1", "shard-9")
    with pytest.raises(IncompatibleFeaturesError, match="k"):
        read_features(wh, "feat-1")
