"""§5–§8: curvature assembly, the three factors, selection, storage and the refusals."""
import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.stats import spearmanr

from chips_core.errors import ConfigError, IncompatibleFeaturesError, NonFiniteEmbeddingError
from chips_core.scoring.endpoint import EndpointModel
from chips_core.scoring.featurize import FeatureBatch, FeaturizeConfig, Featurizer
from chips_core.scoring.identity import StreamSample, seeded_sample, seeded_unit
from chips_core.scoring.score import (METHODS, ROW_BLOCK, ScoreConfig, learnability_weight, relevance_weight, row_dots,
                                      score_features, select_top, sigmoid)
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig, curvature_stats_pre, target_stats
from chips_core.train.synthetic import make_pairs

from ..conftest import make_bank


def _score_inputs(model, bank_pairs, pool, target, bank_size=32, micro_batch=32):
    """Featurize ``pool`` against a bank drawn from ``bank_pairs``; its curvature and ``target``'s statistics."""
    bank = make_bank(model, bank_pairs, size=bank_size)
    feat = Featurizer(EndpointModel(model), bank, SketchConfig(k=64), FeaturizeConfig(micro_batch=micro_batch))
    images, texts, ids = pool
    features = feat.featurize(images, texts, ids)
    hv, ht = feat.endpoint.encode_pre(images, texts)
    ccfg = CurvatureConfig(hard_negatives=8)
    curv = curvature_stats_pre(feat.ctx, hv, ht, ids, ccfg)
    tgt = target_stats(feat.ctx, *target)
    return feat, features, curv, tgt, ccfg


@pytest.fixture(scope="module")
def scored(demo_model, pairs, eval_pairs):
    return _score_inputs(demo_model, pairs, pairs, eval_pairs)


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


def test_row_dots_give_a_row_the_same_bits_whatever_rows_share_its_part():
    """The stage scores a pool part by part; a row's dots must not depend on the part's size or the row's place."""
    rng = np.random.default_rng(7)
    n = 3 * ROW_BLOCK + 41
    a = rng.standard_normal((n, 96)).astype(np.float16)
    vs = [rng.standard_normal(96), rng.standard_normal(96) * 1e3]
    whole = row_dots(a, vs, squares=True)
    exact = np.array([[math.fsum(float(p) * float(q) for p, q in zip(row, v)) for row in a] for v in vs])
    np.testing.assert_allclose(whole[:2], exact, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(whole[2], [math.fsum(float(p) ** 2 for p in row) for row in a], rtol=1e-12)
    for cuts in ([1], [7, ROW_BLOCK + 3], [ROW_BLOCK, 2 * ROW_BLOCK], [n - 1]):
        edges = [0, *cuts, n]
        parts = [row_dots(a[lo:hi], vs, squares=True) for lo, hi in zip(edges, edges[1:])]
        assert np.array_equal(np.concatenate(parts, axis=1), whole), cuts
    order = rng.permutation(n)
    assert np.array_equal(row_dots(a[order], vs, squares=True), whole[:, order])


def test_row_dots_widen_float16_exactly():
    """Stored float16 rows are widened through float32 (torch, then NumPy): the same float64 values, so the same
    bits, as NumPy's own cast, over every float16 value there is (subnormals, signed zeros, the largest)."""
    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    a = every[np.isfinite(every)].reshape(-1, 64)  # 992 rows of 64 (four blocks): every finite value once
    vs = [np.random.default_rng(1).standard_normal(a.shape[1]) * 1e-3]
    got = row_dots(a, vs, squares=True)
    assert np.array_equal(got, row_dots(a.astype(np.float64), vs, squares=True))
    frozen = np.frombuffer(a.tobytes(), dtype=np.float16).reshape(a.shape)  # read-only, as a memory-mapped part
    assert not frozen.flags.writeable
    assert np.array_equal(row_dots(frozen, vs, squares=True), got)
    assert np.array_equal(row_dots(frozen[::-1], vs, squares=True), got[:, ::-1])  # negative strides: copied
    assert np.array_equal(row_dots(frozen[1::3], vs, squares=True), got[:, 1::3])  # strided rows, in place


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
    assert table.schema.field("g").type == pa.binary(128)  # 64 float16 values, little endian
    assert table.schema.field("g").metadata == {b"chips.dtype": b"float16", b"chips.dim": b"64"}
    back = FeatureBatch.from_arrow(table)
    assert back.identity == features.identity and back.pair_id == features.pair_id
    assert back.pair_id_array() is back.stored_ids and back.stored_ids.equals(pa.array(features.pair_id, pa.string()))
    assert back.take([1, 0]).stored_ids is None and back.take([1, 0]).pair_id_array().to_pylist() == features.pair_id[1::-1]
    np.testing.assert_allclose(back.g, features.g, rtol=2e-3, atol=1e-3 * np.abs(features.g).max())
    exact = score_features(features, tgt, curv, ccfg)["chips"]
    stored = score_features(back, tgt, curv, ccfg)["chips"]
    assert spearmanr(exact, stored).statistic > 0.999
    # parts written before the binary layout (vectors as fixed-size lists of float16) still read the same
    old = table.set_column(table.schema.get_field_index("g"), "g", pa.FixedSizeListArray.from_arrays(
        pa.array(back.g.astype(np.float16).reshape(-1), pa.float16()), 64))
    np.testing.assert_array_equal(FeatureBatch.from_arrow(old).g, back.g)


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
    # checked once per call (not per micro-batch): a bad row in a later micro-batch is still named by its own id
    small = Featurizer(feat.endpoint, feat.ctx.bank_rules, SketchConfig(k=feat.ctx.k, seed=feat.ctx.identity.sketch_seed),
                       FeaturizeConfig(micro_batch=2))
    with pytest.raises(NonFiniteEmbeddingError, match=r"^pair 'pair-c': a zero-norm"):
        small.featurize_pre(zero, ht, ["pair-a", "pair-b", "pair-c"])
    assert len(small.featurize_pre(hv, ht, ["pair-a", "pair-b", "pair-c"])) == 3


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


def test_random_keys_are_the_premise_sample_keys(scored):
    """The score stage hands the `random` method's keys to the premise sample when the seeds agree: the sample
    drawn with them is the sample drawn by hashing again."""
    _, features, curv, tgt, ccfg = scored
    keys = score_features(features, tgt, curv, ccfg, ScoreConfig(random_seed=3))["random"]
    np.testing.assert_array_equal(keys, seeded_unit(features.pair_id, 3))
    given, hashed = StreamSample(17, 3), StreamSample(17, 3)
    given.offer(features.pair_id, keys=keys)
    hashed.offer(features.pair_id)
    assert given.ids == hashed.ids == seeded_sample(features.pair_id, 17, 3)
    with pytest.raises(ValueError, match="keys offered"):
        given.offer(features.pair_id, keys=keys[:-1])


# --- chips_plus: the guarded selector (not the paper's; the paper's `chips` is untouched) -----------------

def test_chips_plus_is_tier_then_the_random_order(scored):
    _, features, curv, tgt, ccfg = scored
    s = score_features(features, tgt, curv, ccfg, ScoreConfig(random_seed=3))
    tier = np.floor(s["chips_plus"])
    assert set(np.unique(tier)) <= {0.0, 1.0, 2.0}
    np.testing.assert_allclose(s["chips_plus"] - tier, s["random"])  # the `random` key of the same seed
    # the gates, recomputed from their definition: quantiles of the eval pairs' own w_R and x.y
    eval_wr = relevance_weight(tgt.eval_x, tgt.eval_y, tgt.mu_x, tgt.mu_y, 0.5)
    relevant = s["w_relevance"] >= np.quantile(eval_wr, 0.05)
    agrees = s["clipscore"] >= np.quantile(np.sum(tgt.eval_x * tgt.eval_y, 1), 0.25)
    np.testing.assert_array_equal(tier, relevant.astype(int) + (relevant & agrees))
    keep = select_top(s["chips_plus"], features.pair_id, 0.3)
    n2 = int((tier == 2).sum())
    assert 0 < n2 < len(tier), "the fixture must exercise the gate on both sides"
    first = keep[:min(n2, len(keep))]
    assert np.all(tier[first] == 2)  # every eligible pair before any other
    np.testing.assert_array_equal(first, select_top(np.where(tier == 2, s["random"], -1.0), features.pair_id,
                                                    len(first) / len(tier)))


def test_chips_plus_gates_are_calibrated_on_the_eval_set(demo_model, eval_pairs, pairs):
    """Scoring the eval pairs themselves: quantile 0 admits all of them, quantile q about a (1 - q) share."""
    _, features, curv, tgt, _ = _score_inputs(demo_model, pairs, eval_pairs, eval_pairs)
    tier = lambda **kw: np.floor(score_features(features, tgt, curv, CurvatureConfig(), ScoreConfig(**kw))["chips_plus"])  # noqa: E731
    assert np.all(tier(plus_relevance_quantile=0.0, plus_match_quantile=0.0) == 2)
    half = tier(plus_relevance_quantile=0.0, plus_match_quantile=0.5)
    assert abs((half == 2).mean() - 0.5) <= 1.5 / len(features)
    assert np.all(half >= 1)
    no_eval = dataclasses.replace(tgt, eval_x=None)
    with pytest.raises(ValueError, match="eval_x"):
        score_features(features, no_eval, curv, CurvatureConfig())


@pytest.mark.parametrize("key,value", [("plus_match_quantile", 1.0), ("plus_relevance_quantile", -0.1)])
def test_chips_plus_quantiles_checked(key, value):
    with pytest.raises(ConfigError, match=key):
        ScoreConfig(**{key: value})


def test_chips_plus_guards_against_off_domain_and_swapped_captions(demo_model, tokenizer):
    """On a noisy mixed pool, chips_plus keeps fewer off-domain pairs and fewer swapped captions than random."""
    pool = make_pairs(600, seed=21, scan_fraction=0.4, noise_fraction=0.3)
    target = make_pairs(64, seed=22, scan_fraction=1.0, noise_fraction=0.0)
    inputs = (pool.images, tokenizer(pool.captions), pool.pair_ids)
    _, features, curv, tgt, ccfg = _score_inputs(demo_model, inputs, inputs,
                                                 (target.images, tokenizer(target.captions), target.pair_ids),
                                                 bank_size=64, micro_batch=64)
    s = score_features(features, tgt, curv, ccfg)
    picked = {m: select_top(s[m], features.pair_id, 0.15) for m in ("random", "chips_plus")}
    off = {m: np.mean(pool.domain[k] != "scan") for m, k in picked.items()}
    swapped = {m: np.mean(pool.noisy[k]) for m, k in picked.items()}
    assert off["chips_plus"] < 0.5 * off["random"], off
    assert swapped["chips_plus"] < swapped["random"], swapped
