"""§2/§9: the same pair gets bit-identical outputs whatever the batch size, order or shard layout."""
import numpy as np
import pytest

from chips_core.config import CurvatureConfig, FeaturizeConfig, ScoreConfig, SketchConfig
from chips_core.featurize import FeatureBatch, Featurizer
from chips_core.models import EndpointModel
from chips_core.score import score_features
from chips_core.target import curvature_sample, curvature_stats, target_stats

from .conftest import make_bank


@pytest.fixture(scope="module")
def featurizer(demo_model, pairs):
    bank = make_bank(demo_model, pairs, size=32)
    return Featurizer(EndpointModel(demo_model), bank, SketchConfig(k=128), FeaturizeConfig(micro_batch=16))


def _run(featurizer, images, texts, ids, batch: int, order: np.ndarray) -> FeatureBatch:
    parts = []
    for start in range(0, len(order), batch):
        sel = order[start:start + batch]
        parts.append(featurizer.featurize(images[sel], texts[sel], [ids[i] for i in sel]))
    out = FeatureBatch.concat(parts)
    back = np.argsort(order)  # undo the permutation
    return FeatureBatch(pair_id=[out.pair_id[i] for i in back], x=out.x[back], y=out.y[back], g=out.g[back],
                        p_corr=out.p_corr[back], margin=out.margin[back], clipscore=out.clipscore[back],
                        loss=out.loss[back], identity=out.identity)


def test_features_identical_across_batch_sizes_and_orders(featurizer, pairs):
    images, texts, ids = pairs
    n = len(ids)
    ref = _run(featurizer, images, texts, ids, n, np.arange(n))
    rng = np.random.default_rng(0)
    for batch in (1, 7, 16, 50):
        got = _run(featurizer, images, texts, ids, batch, rng.permutation(n))
        assert got.pair_id == ref.pair_id
        for name in ("x", "y", "g", "p_corr", "margin", "clipscore", "loss"):
            assert np.array_equal(getattr(got, name), getattr(ref, name)), f"{name} differs at batch={batch}"


def test_scores_identical_across_shard_layouts(featurizer, pairs, eval_pairs):
    images, texts, ids = pairs
    ccfg = CurvatureConfig(n_curv=40, hard_negatives=4)
    sample = curvature_sample(ids, ccfg)
    idx = [ids.index(p) for p in sample]
    curv = curvature_stats(featurizer.ctx, images[idx], texts[idx], sample, ccfg)
    # the curvature sample is a function of the pair ids, not of their order
    assert curvature_sample(list(reversed(ids)), ccfg) == sample
    tgt = target_stats(featurizer.ctx, *eval_pairs)
    one = score_features(featurizer.featurize(images, texts, ids), tgt, curv, ccfg, ScoreConfig())
    shards = [slice(0, 30), slice(30, 31), slice(31, 96)]
    many = FeatureBatch.concat([featurizer.featurize(images[s], texts[s], ids[s]) for s in shards])
    two = score_features(many, tgt, curv, ccfg, ScoreConfig())
    for name, values in one.items():
        assert np.array_equal(values, two[name]), name
