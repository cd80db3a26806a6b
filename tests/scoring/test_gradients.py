"""§3–§5: closed-form and fast sketched gradients, eval gradient and curvature equal the references."""
import numpy as np
import pytest
import torch

from chips_core.scoring.endpoint import EndpointModel
from chips_core.scoring.featurize import FeaturizeConfig, Featurizer, sample_features
from chips_core.scoring.reference import (autograd_sample_gradients, closed_form_sample_gradients,
                                          reference_curvature, reference_eval_gradient, reference_features)
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig, curvature_stats_pre, eval_gradient, target_stats_pre

from ..conftest import make_bank


@pytest.fixture(scope="module", params=["tiny_vit", "tiny_resnet"])
def setup(request, pairs):
    model = request.getfixturevalue(request.param)
    bank = make_bank(model, pairs, size=16)
    ep = EndpointModel(model)
    images, texts, ids = pairs
    hv, ht = ep.encode_pre(images[:40], texts[:40])
    ids = ids[:40]
    assert len(set(ids) & set(bank.pair_ids)) > 0, "some scored pairs must be bank members (masking path)"
    return ep, bank, hv, ht, ids


def test_closed_form_equals_autograd_float64(setup):
    ep, bank, hv, ht, ids = setup
    auto = autograd_sample_gradients(ep, hv, ht, ids, bank)
    closed = closed_form_sample_gradients(ep, hv, ht, ids, bank)
    assert auto.dtype == torch.float64 and auto.abs().max() > 1e-3
    torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-12)


def test_fast_sketched_gradient_equals_sketch_of_autograd(setup):
    ep, bank, hv, ht, ids = setup
    feat = Featurizer(ep, bank, SketchConfig(k=256, seed=3), FeaturizeConfig(micro_batch=16), dtype=torch.float64)
    emb = feat.ctx.embed(hv[:16], ht[:16], ids[:16])
    fast = sample_features(feat.ctx, emb)
    ref = feat.ctx.sketch.project_flat(autograd_sample_gradients(ep, hv[:16], ht[:16], ids[:16], bank))
    torch.testing.assert_close(fast["g"], ref, rtol=1e-9, atol=1e-11)
    rf = reference_features(ep, hv[:16], ht[:16], ids[:16], bank, feat.ctx.sketch, feat.identity)
    for name in ("p_corr", "margin", "clipscore", "loss"):
        np.testing.assert_allclose(fast[name].numpy(), getattr(rf, name), rtol=1e-10, atol=1e-12, err_msg=name)


def test_rank_one_sketch_equals_dense_form(setup):
    ep, *_ = setup
    feat_sketch = Featurizer(ep, setup[1], SketchConfig(k=64, seed=5)).ctx.sketch
    D, dv = feat_sketch.D, feat_sketch.d_v
    g = torch.Generator().manual_seed(0)
    a, h = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(dv, generator=g, dtype=torch.float64)
    flat = torch.zeros(feat_sketch.P, dtype=torch.float64)
    flat[: D * dv] = torch.outer(a, h).reshape(-1)
    U_v, V_v, *_ = feat_sketch.mats(torch.float64, "cpu")
    torch.testing.assert_close(feat_sketch.project_flat(flat[None])[0], (U_v @ a) * (V_v @ h) / 8.0)


def test_eval_gradient_equals_autograd(setup, eval_pairs):
    ep, bank, *_ = setup
    images, texts, ids = eval_pairs
    hv, ht = ep.encode_pre(images, texts)
    feat = Featurizer(ep, bank, SketchConfig(k=128), dtype=torch.float64)
    emb = feat.ctx.embed(hv, ht, ids)
    ref, ref_loss = reference_eval_gradient(ep, hv, ht)
    for chunk in (5, 4096):  # chunked rows give the same gradient
        eg = eval_gradient(feat.ctx, emb, chunk=chunk)
        fast = torch.cat([eg.G_v.reshape(-1), eg.G_t.reshape(-1), eg.g_t.reshape(1)])
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)
        assert eg.loss == pytest.approx(ref_loss, rel=1e-12)
    ts = target_stats_pre(feat.ctx, hv, ht, ids)
    np.testing.assert_allclose(ts.u, feat.ctx.sketch.project_flat(ref[None])[0].numpy(), rtol=1e-9, atol=1e-12)


def test_curvature_equals_reference(setup):
    ep, bank, hv, ht, ids = setup
    cfg = CurvatureConfig(hard_negatives=4)
    feat = Featurizer(ep, bank, SketchConfig(k=32, seed=1), dtype=torch.float64)
    fast = curvature_stats_pre(feat.ctx, hv[:24], ht[:24], ids[:24], cfg, micro_batch=8)
    ref = reference_curvature(ep, hv[:24], ht[:24], ids[:24], bank, feat.ctx.sketch, 4, feat.identity)
    for name in ("phi_pos", "phi_neg", "fisher"):
        np.testing.assert_allclose(getattr(fast, name), getattr(ref, name), rtol=1e-8, atol=1e-12, err_msg=name)


def test_sign_convention_matches_a_real_step(setup, eval_pairs):
    """A small step along -g_i changes L_eval by about -eta * g_i . u (the sign of §6)."""
    ep, bank, hv, ht, ids = setup
    ev_h = ep.encode_pre(eval_pairs[0], eval_pairs[1])
    u, loss0 = reference_eval_gradient(ep, *ev_h)
    g = closed_form_sample_gradients(ep, hv[:6], ht[:6], ids[:6], bank)
    W_v, W_t, t = ep.weights(torch.float64)
    D, dv = W_v.shape
    for gi in g:
        eta = 1e-4 / float(gi.norm())
        Wv2 = W_v - eta * gi[: D * dv].reshape(W_v.shape)
        Wt2 = W_t - eta * gi[D * dv: -1].reshape(W_t.shape)
        t2 = t - eta * gi[-1]
        x = ev_h[0].double() @ Wv2.t()
        y = ev_h[1].double() @ Wt2.t()
        x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
        L = t2.exp() * x @ y.t()
        tgt = torch.arange(len(L))
        loss1 = 0.5 * (torch.nn.functional.cross_entropy(L, tgt) + torch.nn.functional.cross_entropy(L.t(), tgt))
        predicted = -eta * float(gi @ u)
        assert float(loss1) - loss0 == pytest.approx(predicted, rel=1e-2, abs=1e-12)


@pytest.mark.parametrize("bank_size,k,factored", [(16, 256, False), (64, 256, True)])
def test_both_bank_product_associations_equal_autograd(tiny_vit, pairs, bank_size, k, factored):
    """``W @ (bank sketched)`` and ``(W @ bank) @ sketch^T`` are chosen by cost; both must be exact."""
    bank = make_bank(tiny_vit, pairs, size=bank_size)
    ep = EndpointModel(tiny_vit)
    hv, ht = ep.encode_pre(pairs[0][:16], pairs[1][:16])
    ids = pairs[2][:16]
    feat = Featurizer(ep, bank, SketchConfig(k=k, seed=2), dtype=torch.float64)
    assert all((dense is not None) == factored for dense, _, _ in feat.ctx._bank_terms.values())
    fast = sample_features(feat.ctx, feat.ctx.embed(hv, ht, ids))["g"]
    ref = feat.ctx.sketch.project_flat(autograd_sample_gradients(ep, hv, ht, ids, bank))
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)


def test_endpoint_math_matches_the_model_itself(tiny_resnet, pairs, eval_pairs):
    """Alignment through the *model's own* autograd restricted to its projections and logit scale
    equals the closed form built from extracted h and W (checks extraction, bias and bank terms)."""
    from chips_core.scoring.reference import full_parameter_alignment

    model = tiny_resnet.double()
    try:
        bank = make_bank(model, (pairs[0].double(), pairs[1], pairs[2]), size=16)
        ep = EndpointModel(model)
        images, texts, ids = pairs[0][:12].double(), pairs[1][:12], pairs[2][:12]
        bidx = [pairs[2].index(p) for p in bank.pair_ids]
        via_model = full_parameter_alignment(model, images, texts, ids, pairs[0][bidx].double(), pairs[1][bidx],
                                             bank.pair_ids, eval_pairs[0].double(), eval_pairs[1], params="endpoint")
        hv, ht = ep.encode_pre(images, texts)
        u, _ = reference_eval_gradient(ep, *ep.encode_pre(eval_pairs[0].double(), eval_pairs[1]))
        closed = closed_form_sample_gradients(ep, hv.double(), ht.double(), ids, bank) @ u
        np.testing.assert_allclose(closed.numpy(), via_model, rtol=1e-6, atol=1e-9)
    finally:
        model.float()


def test_bank_masking_of_same_captions_and_near_duplicate_images_matches_the_references(pairs, tiny_vit):
    """§2 (ours, optional): with the masking rules on, bank members with the pair's caption or a near-duplicate
    image leave its negatives; the fast path equals float64 autograd and the dense references under them."""
    from chips_core.errors import IncompatibleFeaturesError
    from chips_core.scoring.featurize import FeatureBatch, ReferenceBank

    images, texts, ids = pairs
    ep = EndpointModel(tiny_vit)
    plain = make_bank(tiny_vit, pairs, size=32)
    bank = ReferenceBank(plain.pair_ids, plain.h_v, plain.h_t, plain.model_checksum, plain.seed,
                         mask_same_caption=True, mask_image_cosine=0.999)
    assert plain.masking == {} and bank.masking == {"same_caption": True, "image_cosine": 0.999}
    assert bank.bank_id != plain.bank_id  # features under other rules are other features (§8)
    hv, ht = ep.encode_pre(images[:48], texts[:48])
    feat = Featurizer(ep, bank, SketchConfig(k=128, seed=2), FeaturizeConfig(micro_batch=16), dtype=torch.float64)
    emb = feat.ctx.embed(hv[:16], ht[:16], ids[:16])
    mask = feat.ctx.bank_mask(emb)
    by_id = sum(p in bank.pair_ids for p in ids[:16])
    assert int(mask.sum()) > by_id, "the templated captions must give some same-caption members"
    fast = sample_features(feat.ctx, emb)
    ref = feat.ctx.sketch.project_flat(autograd_sample_gradients(ep, hv[:16], ht[:16], ids[:16], bank))
    torch.testing.assert_close(fast["g"], ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(closed_form_sample_gradients(ep, hv[:16], ht[:16], ids[:16], bank),
                               autograd_sample_gradients(ep, hv[:16], ht[:16], ids[:16], bank), rtol=1e-10, atol=1e-12)
    rf = reference_features(ep, hv[:16], ht[:16], ids[:16], bank, feat.ctx.sketch, feat.identity)
    for name in ("p_corr", "margin", "loss"):
        np.testing.assert_allclose(fast[name].numpy(), getattr(rf, name), rtol=1e-10, atol=1e-12, err_msg=name)
    plain_ctx = Featurizer(ep, plain, SketchConfig(k=128, seed=2), dtype=torch.float64).ctx
    unmasked = sample_features(plain_ctx, plain_ctx.embed(hv[:16], ht[:16], ids[:16]))
    assert (fast["p_corr"] >= unmasked["p_corr"] - 1e-12).all() and (fast["p_corr"] > unmasked["p_corr"]).any()
    cfg = CurvatureConfig(hard_negatives=4)
    curv = curvature_stats_pre(feat.ctx, hv[:24], ht[:24], ids[:24], cfg, micro_batch=8)
    ref_curv = reference_curvature(ep, hv[:24], ht[:24], ids[:24], bank, feat.ctx.sketch, 4, feat.identity)
    for name in ("phi_pos", "phi_neg", "fisher"):
        np.testing.assert_allclose(getattr(curv, name), getattr(ref_curv, name), rtol=1e-8, atol=1e-12, err_msg=name)
    a = Featurizer(ep, bank).featurize(images[:8], texts[:8], ids[:8])
    b = Featurizer(ep, plain).featurize(images[8:16], texts[8:16], ids[8:16])
    with pytest.raises(IncompatibleFeaturesError, match="bank_id"):
        FeatureBatch.concat([a, b])
