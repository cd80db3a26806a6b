"""§4: the sketch preserves inner products (JL), and the dense reference sketch ranks like the fast one."""
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from chips_core.scoring.endpoint import EndpointModel
from chips_core.scoring.featurize import FeaturizeConfig, Featurizer
from chips_core.scoring.identity import FeatureIdentity
from chips_core.scoring.reference import (closed_form_sample_gradients, reference_curvature, reference_features,
                                          reference_target)
from chips_core.scoring.score import ScoreConfig, score_features
from chips_core.scoring.sketch import DenseSketch, RankOneSketch, SketchConfig
from chips_core.scoring.target import CurvatureConfig, curvature_stats_pre, target_stats_pre

from ..conftest import make_bank


@pytest.fixture(scope="module")
def grads(demo_model, pairs):
    ep = EndpointModel(demo_model)
    bank = make_bank(demo_model, pairs, size=32)
    hv, ht = ep.encode_pre(pairs[0][:48], pairs[1][:48])
    return ep, bank, hv, ht, pairs[2][:48], closed_form_sample_gradients(ep, hv, ht, pairs[2][:48], bank)


@pytest.mark.parametrize("k", [256, 1024])
def test_sketched_inner_products_within_jl_tolerance(grads, k):
    *_, g = grads
    D, P = 64, g.shape[1]
    sk = RankOneSketch(D, (P - 1) // 2 // D, (P - 1) // 2 // D, k=k, seed=7)
    s = sk.project_flat(g)
    exact, approx = g @ g.t(), s @ s.t()
    norms = g.norm(dim=1)
    scale = torch.outer(norms, norms)
    err = ((approx - exact) / scale).flatten()
    # Var of a sketched inner product is ~ (1 + cos^2)/k per unit norms for a Gaussian sketch; the
    # rank-one (Khatri-Rao) sketch has heavier tails, so allow a generous but k-scaled bound.
    assert err.abs().mean() < 1.5 / np.sqrt(k)
    assert err.abs().max() < 8.0 / np.sqrt(k)


def test_sketch_is_unbiased_over_seeds(grads):
    *_, g = grads
    D, P = 64, g.shape[1]
    d = (P - 1) // 2 // D
    a, b = g[0], g[1]
    est = []
    for seed in range(200):
        sk = RankOneSketch(D, d, d, k=32, seed=seed)
        sa, sb = sk.project_flat(torch.stack([a, b]))
        est.append(float(sa @ sb))
    est = np.array(est)
    exact = float(a @ b)
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est))


def test_dense_reference_sketch_ranks_like_fast_sketch(grads, eval_pairs):
    """CHIPS scores with the dense Gaussian sketch vs the rank-one sketch (both k=512)."""
    ep, bank, hv, ht, ids, _ = grads
    k = 512
    fast = Featurizer(ep, bank, SketchConfig(k=k, seed=0), FeaturizeConfig(), dtype=torch.float64)
    ev_hv, ev_ht = ep.encode_pre(eval_pairs[0], eval_pairs[1])
    ccfg = CurvatureConfig(hard_negatives=8)
    fast_scores = score_features(
        fast.featurize_pre(hv, ht, ids), target_stats_pre(fast.ctx, ev_hv, ev_ht, eval_pairs[2]),
        curvature_stats_pre(fast.ctx, hv, ht, ids, ccfg), ccfg, ScoreConfig())
    dense = DenseSketch(fast.ctx.sketch.P, k=k, seed=0)
    ident = FeatureIdentity(bank.model_checksum, bank.bank_id, -1, k)
    ref_scores = score_features(
        reference_features(ep, hv, ht, ids, bank, dense, ident), reference_target(ep, ev_hv, ev_ht, dense, ident),
        reference_curvature(ep, hv, ht, ids, bank, dense, 8, ident), ccfg, ScoreConfig())
    for method in ("dot", "chips"):
        rho = spearmanr(fast_scores[method], ref_scores[method]).statistic
        assert rho > 0.75, f"{method}: Spearman {rho:.3f}"
