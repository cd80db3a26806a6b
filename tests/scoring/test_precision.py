"""Trunk precision (``featurize.precision``): the encoders run under autocast, the end-point maths stays float32,
the precision is part of the feature identity (never mixed), and the outputs stay batch-invariant."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.stats import spearmanr

from chips_core.errors import ConfigError, IncompatibleFeaturesError
from chips_core.scoring.endpoint import EndpointModel, resolve_precision, state_dict_checksum
from chips_core.scoring.featurize import FeatureBatch, FeaturizeConfig, Featurizer, ReferenceBank
from chips_core.scoring.identity import FeatureIdentity, seeded_sample
from chips_core.scoring.score import ScoreConfig, score_features
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig, curvature_sample, curvature_stats, target_stats


def featurizer(model, pairs, precision: str, device: str = "cpu") -> Featurizer:
    images, texts, ids = pairs
    model = model if device == "cpu" else copy.deepcopy(model).to(device)
    ep = EndpointModel(model, precision)
    chosen = seeded_sample(ids, 32, 0)
    idx = [ids.index(p) for p in chosen]
    bank = ReferenceBank.from_pairs(ep, images[idx].to(device), texts[idx].to(device), chosen,
                                    model_checksum=state_dict_checksum(model), seed=0, micro_batch=16)
    return Featurizer(ep, bank, SketchConfig(k=128), FeaturizeConfig(micro_batch=16))


def scores(feat: Featurizer, pairs, eval_pairs, device: str = "cpu") -> dict:
    images, texts, ids = pairs
    ccfg = CurvatureConfig(n_curv=40, hard_negatives=4)
    sample = curvature_sample(ids, ccfg)
    idx = [ids.index(p) for p in sample]
    curv = curvature_stats(feat.ctx, images[idx].to(device), texts[idx].to(device), sample, ccfg)
    ei, et, eids = eval_pairs
    tgt = target_stats(feat.ctx, ei.to(device), et.to(device), eids)
    return score_features(feat.featurize(images.to(device), texts.to(device), ids), tgt, curv, ccfg, ScoreConfig())


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu_and_unknown_precisions_are_refused():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ConfigError, match=r"precision='fp8' is invalid"):
        FeaturizeConfig(precision="fp8")
    assert FeatureIdentity.from_json('{"model_checksum": "m", "bank_id": "b", "sketch_seed": 0, "k": 8}').precision \
        == "fp32"  # identities stored before precision existed


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_trunks_give_float32_features_close_to_fp32_with_their_own_identity(demo_model, pairs, eval_pairs,
                                                                                 device):
    f32, b16 = featurizer(demo_model, pairs, "fp32", device), featurizer(demo_model, pairs, "bf16", device)
    assert (f32.identity.precision, b16.identity.precision) == ("fp32", "bf16")
    assert f32.identity.bank_id != b16.identity.bank_id  # a bf16 bank is another bank
    images, texts, ids = pairs
    a, b = f32.featurize(images.to(device), texts.to(device), ids), b16.featurize(images.to(device), texts.to(device), ids)
    assert b.g.dtype == np.float32 and not np.array_equal(a.x, b.x)  # the trunk did run in bf16
    assert np.min(np.sum(a.x * b.x, axis=1)) > 0.99  # embeddings: cosine to the fp32 ones
    again = f32.featurize(images.to(device), texts.to(device), ids)  # autocast left nothing behind
    assert np.array_equal(again.g, a.g)
    sa, sb = scores(f32, pairs, eval_pairs, device), scores(b16, pairs, eval_pairs, device)
    for method in ("chips", "dot", "clipscore"):
        assert spearmanr(sa[method], sb[method]).statistic > 0.95, method


def test_bf16_features_are_batch_invariant(demo_model, pairs):
    feat = featurizer(demo_model, pairs, "bf16")
    images, texts, ids = pairs
    whole = feat.featurize(images, texts, ids)
    parts = FeatureBatch.concat([feat.featurize(images[s], texts[s], ids[s]) for s in (slice(0, 7), slice(7, 96))])
    for name in ("x", "y", "g", "p_corr", "clipscore", "loss"):
        assert np.array_equal(getattr(whole, name), getattr(parts, name)), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mixing_precisions_is_refused(demo_model, pairs, eval_pairs, device):
    f32, b16 = featurizer(demo_model, pairs, "fp32", device), featurizer(demo_model, pairs, "bf16", device)
    with pytest.raises(IncompatibleFeaturesError, match="bank was forwarded in fp32 but this model runs in bf16"):
        Featurizer(EndpointModel(b16.endpoint.model, "bf16"), f32.ctx.bank_rules, SketchConfig(k=128))
    images, texts, ids = (pairs[0].to(device), pairs[1].to(device), pairs[2])
    ei, et, eids = (eval_pairs[0].to(device), eval_pairs[1].to(device), eval_pairs[2])
    ccfg = CurvatureConfig(n_curv=40, hard_negatives=4)
    sample = curvature_sample(ids, ccfg)
    idx = [ids.index(p) for p in sample]
    curv = curvature_stats(f32.ctx, images[idx], texts[idx], sample, ccfg)
    tgt = target_stats(f32.ctx, ei, et, eids)
    with pytest.raises(IncompatibleFeaturesError, match=r"precision: 'fp32' != 'bf16'|bank_id"):
        score_features(b16.featurize(images, texts, ids), tgt, curv, ccfg, ScoreConfig())
    tgt16 = target_stats(b16.ctx, ei, et, eids)
    with pytest.raises(IncompatibleFeaturesError, match=r"precision: 'bf16' != 'fp32'"):
        score_features(f32.featurize(images, texts, ids), tgt16, curv, ccfg, ScoreConfig())
