r"""Slow references, for tests and reports only (house style 2).

* :func:`autograd_sample_gradients` — float64 autograd of the per-sample loss of §2 with
  respect to :math:`\theta = \{W_v, W_t, t\}`, through the bank's embeddings too.
* :func:`closed_form_sample_gradients` — the same gradient assembled from dense pair Jacobians
  (§3), one explicit ``D x d`` outer product at a time.
* :func:`reference_features` / :func:`reference_target` / :func:`reference_curvature` — the whole
  scoring input under *any* projection of the flattened gradient (the dense Gaussian sketch,
  the rank-one sketch applied to dense gradients, or no sketch at all).
* :func:`full_parameter_alignment` — per-sample alignment with the eval-loss gradient over
  every model parameter, for the end-point-vs-full comparison the paper reports.

Flattened layout: ``[vec(G_v), vec(G_t), g_t]`` (see :mod:`chips_core.sketch`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .endpoint import EndpointModel, resolve_sites
from .featurize import FeatureBatch, ReferenceBank
from .identity import FeatureIdentity
from .target import CurvatureStats, TargetStats


def _params(endpoint: EndpointModel):
    W_v, W_t, t = endpoint.weights(torch.float64)
    return W_v.cpu().requires_grad_(), W_t.cpu().requires_grad_(), t.cpu().requires_grad_()


def _embed(W, h):
    e = h @ W.t()
    return e / e.norm(dim=1, keepdim=True)


def _per_sample_loss(W_v, W_t, t, hv_i, ht_i, hv_b, ht_b, masked: torch.Tensor):
    """Symmetric InfoNCE of one pair against the bank (masked bank rows excluded)."""
    x, y = _embed(W_v, hv_i[None])[0], _embed(W_t, ht_i[None])[0]
    xb, yb = _embed(W_v, hv_b), _embed(W_t, ht_b)
    s = t.exp()
    # scale before masking: d(-inf * s)/ds would be NaN
    row = torch.cat([s * (x * y).sum()[None], (s * (yb @ x)).masked_fill(masked, -math.inf)])
    col = torch.cat([s * (x * y).sum()[None], (s * (xb @ y)).masked_fill(masked, -math.inf)])
    return -0.5 * (row.log_softmax(0)[0] + col.log_softmax(0)[0])


def _flat(*grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _mask(bank: ReferenceBank, pid, ht, x, xb) -> torch.Tensor:
    """``(K,)`` bank members that are not negatives of one pair, one comparison at a time: the pair itself,
    and as the bank says, members with its caption (equal text features) or a near-duplicate image."""
    same_caption = [bank.mask_same_caption and bool(torch.equal(bank.h_t[j].double(), ht.double()))
                    for j in range(len(bank))]
    near_image = [bank.mask_image_cosine is not None and float(xb[j] @ x) >= bank.mask_image_cosine
                  for j in range(len(bank))]
    return torch.tensor([b == pid or c or n for b, c, n in zip(bank.pair_ids, same_caption, near_image)],
                        dtype=torch.bool)


def autograd_sample_gradients(endpoint: EndpointModel, h_v, h_t, pair_ids, bank: ReferenceBank) -> torch.Tensor:
    """``(B, P)`` exact per-sample gradients by float64 autograd (§3's ground truth)."""
    W_v, W_t, t = _params(endpoint)
    hv, ht = h_v.double().cpu(), h_t.double().cpu()
    hvb, htb = bank.h_v.double(), bank.h_t.double()
    with torch.no_grad():
        x, xb = _embed(W_v.detach(), hv), _embed(W_v.detach(), hvb)
    out = []
    for i, pid in enumerate(pair_ids):
        loss = _per_sample_loss(W_v, W_t, t, hv[i], ht[i], hvb, htb, _mask(bank, pid, ht[i], x[i], xb))
        out.append(_flat(*torch.autograd.grad(loss, (W_v, W_t, t))))
    return torch.stack(out)


def dense_jacobians(W_v, W_t, t, hv_a, ht_b) -> torch.Tensor:
    r"""``(n, P)`` flattened :math:`J(a, b)` for rows of image features ``hv_a`` × text features ``ht_b``:
    :math:`[\alpha_{ab}\otimes h_{v,a},\ \beta_{ab}\otimes h_{t,b},\ s\,c_{ab}]`."""
    ev, et = hv_a @ W_v.t(), ht_b @ W_t.t()
    nv, nt = ev.norm(dim=1, keepdim=True), et.norm(dim=1, keepdim=True)
    x, y = ev / nv, et / nt
    s = t.exp()
    c = (x * y).sum(1, keepdim=True)
    alpha = s * (y - c * x) / nv
    beta = s * (x - c * y) / nt
    Jv = alpha[:, :, None] * hv_a[:, None, :]
    Jt = beta[:, :, None] * ht_b[:, None, :]
    return torch.cat([Jv.flatten(1), Jt.flatten(1), s * c], 1)


def closed_form_sample_gradients(endpoint: EndpointModel, h_v, h_t, pair_ids, bank: ReferenceBank) -> torch.Tensor:
    r"""``(B, P)`` :math:`g_i = \tfrac12\sum_j (P_j-\delta_{j0}) J(i, j) + \tfrac12\sum_j (Q_j-\delta_{j0}) J(j, i)`."""
    with torch.no_grad():
        W_v, W_t, t = (p.detach() for p in _params(endpoint))
        s = t.exp()
        hvb, htb = bank.h_v.double(), bank.h_t.double()
        xb, yb = _embed(W_v, hvb), _embed(W_t, htb)
        out = []
        for i, pid in enumerate(pair_ids):
            hv, ht = h_v[i].double()[None], h_t[i].double()[None]
            x, y = _embed(W_v, hv)[0], _embed(W_t, ht)[0]
            m = _mask(bank, pid, ht[0], x, xb)
            P = (torch.cat([(x * y).sum()[None], (yb @ x).masked_fill(m, -math.inf)]) * s).softmax(0)
            Q = (torch.cat([(x * y).sum()[None], (xb @ y).masked_fill(m, -math.inf)]) * s).softmax(0)
            P[0] -= 1
            Q[0] -= 1
            J_row = dense_jacobians(W_v, W_t, t, hv.expand(len(bank) + 1, -1), torch.cat([ht, htb]))
            J_col = dense_jacobians(W_v, W_t, t, torch.cat([hv, hvb]), ht.expand(len(bank) + 1, -1))
            out.append(0.5 * (P @ J_row) + 0.5 * (Q @ J_col))
        return torch.stack(out)


def reference_eval_gradient(endpoint: EndpointModel, h_v, h_t) -> tuple[torch.Tensor, float]:
    """``(P,)`` autograd gradient of the mean symmetric InfoNCE over the eval set, and the loss."""
    W_v, W_t, t = _params(endpoint)
    x, y = _embed(W_v, h_v.double().cpu()), _embed(W_t, h_t.double().cpu())
    L = t.exp() * x @ y.t()
    target = torch.arange(L.shape[0])
    loss = 0.5 * (torch.nn.functional.cross_entropy(L, target) + torch.nn.functional.cross_entropy(L.t(), target))
    return _flat(*torch.autograd.grad(loss, (W_v, W_t, t))), float(loss.detach())


def _stats(endpoint, h_v, h_t, pair_ids, bank):
    with torch.no_grad():
        W_v, W_t, t = (p.detach() for p in _params(endpoint))
        s = t.exp()
        x, y = _embed(W_v, h_v.double().cpu()), _embed(W_t, h_t.double().cpu())
        xb, yb = _embed(W_v, bank.h_v.double()), _embed(W_t, bank.h_t.double())
        mask = torch.stack([_mask(bank, p, h_t[i], x[i], xb) for i, p in enumerate(pair_ids)])
        c = (x * y).sum(1)
        C_it = (x @ yb.t()).masked_fill(mask, -math.inf)
        C_ti = (y @ xb.t()).masked_fill(mask, -math.inf)
        P0 = (torch.cat([c[:, None], C_it], 1) * s).softmax(1)[:, 0]
        Q0 = (torch.cat([c[:, None], C_ti], 1) * s).softmax(1)[:, 0]
        margin = c - torch.maximum(C_it.amax(1), C_ti.amax(1))
        loss = -0.5 * (P0.log() + Q0.log())
    return x, y, c, 0.5 * (P0 + Q0), margin, loss


def reference_features(endpoint, h_v, h_t, pair_ids, bank: ReferenceBank, project, identity: FeatureIdentity) -> FeatureBatch:
    g = project.project_flat(autograd_sample_gradients(endpoint, h_v, h_t, pair_ids, bank))
    x, y, c, p_corr, margin, loss = _stats(endpoint, h_v, h_t, pair_ids, bank)
    f = lambda a: a.numpy().astype(np.float64)  # noqa: E731
    return FeatureBatch(list(pair_ids), f(x), f(y), f(g.detach()), f(p_corr), f(margin), f(c), f(loss), identity)


def reference_target(endpoint, h_v, h_t, project, identity: FeatureIdentity) -> TargetStats:
    grad, loss = reference_eval_gradient(endpoint, h_v, h_t)
    u = project.project_flat(grad[None])[0]
    with torch.no_grad():
        W_v, W_t, _ = (p.detach() for p in _params(endpoint))
        ex, ey = _embed(W_v, h_v.double().cpu()), _embed(W_t, h_t.double().cpu())
        mx, my = ex.mean(0), ey.mean(0)
    return TargetStats(u.detach().numpy(), (mx / mx.norm()).numpy(), (my / my.norm()).numpy(), loss, len(h_v), identity,
                       ex.numpy(), ey.numpy())


def reference_curvature(endpoint, h_v, h_t, pair_ids, bank: ReferenceBank, project, m: int,
                        identity: FeatureIdentity, seed: int = 0) -> CurvatureStats:
    """Φ_pos, Φ_neg and F from dense Jacobians, one anchor at a time (same conventions as the fast path)."""
    with torch.no_grad():
        W_v, W_t, t = (p.detach() for p in _params(endpoint))
        s = t.exp()
        hvb, htb = bank.h_v.double(), bank.h_t.double()
        xb, yb = _embed(W_v, hvb), _embed(W_t, htb)
        k = project.k
        pos, neg = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
        for i, pid in enumerate(pair_ids):
            hv, ht = h_v[i].double()[None], h_t[i].double()[None]
            x, y = _embed(W_v, hv)[0], _embed(W_t, ht)[0]
            sp = project.project_flat(dense_jacobians(W_v, W_t, t, hv, ht))
            pos += sp.t() @ sp
            m_ = min(m, len(bank))
            mask = _mask(bank, pid, ht[0], x, xb)
            for cos, pair_of in (((yb @ x), lambda j: (hv.expand(len(j), -1), htb[j])),
                                 ((xb @ y), lambda j: (hvb[j], ht.expand(len(j), -1)))):
                top, j = cos.masked_fill(mask, -math.inf).topk(m_)
                w = 0.5 * (s * top).softmax(0)
                sj = project.project_flat(dense_jacobians(W_v, W_t, t, *pair_of(j)))
                neg += (sj * w[:, None]).t() @ sj
    g = project.project_flat(autograd_sample_gradients(endpoint, h_v, h_t, pair_ids, bank)).detach()
    n = len(pair_ids)
    return CurvatureStats((pos / n).numpy(), (neg / n).numpy(), (g.t() @ g / n).numpy(), n, m, seed, identity)


# ---------------------------------------------------------------------------------------------
# Full-parameter alignment (for the end-point-vs-full report)

def _model_loss_terms(model, images, texts):
    xi = model.encode_image(images, normalize=True)
    yt = model.encode_text(texts, normalize=True)
    return xi, yt, model.logit_scale.exp()


def full_parameter_alignment(model: torch.nn.Module, images, texts, pair_ids: Sequence[str],
                             bank_images, bank_texts, bank_ids: Sequence[str],
                             eval_images, eval_texts, params: str = "all") -> np.ndarray:
    r"""``(B,)`` :math:`\langle \nabla\ell_i, \nabla L_{eval}\rangle` over ``params``: ``"all"`` model
    parameters, or ``"endpoint"`` (projections and logit scale only). Unsketched, no curvature."""

    model = model.eval()
    if params == "all":
        plist = [p for p in model.parameters() if p.requires_grad]
    else:
        vs, ts = resolve_sites(model)
        plist = [p for site in (vs, ts) for p in (site.value.parameters() if isinstance(site.value, torch.nn.Module) else [site.value])]
        plist.append(model.logit_scale)
    xe, ye, s = _model_loss_terms(model, eval_images, eval_texts)
    L = s * xe @ ye.t()
    tgt = torch.arange(L.shape[0], device=L.device)
    eval_loss = 0.5 * (torch.nn.functional.cross_entropy(L, tgt) + torch.nn.functional.cross_entropy(L.t(), tgt))
    u = torch.autograd.grad(eval_loss, plist)
    xb, yb, _ = _model_loss_terms(model, bank_images, bank_texts)  # bank in the graph: cross terms flow
    out = []
    for i, pid in enumerate(pair_ids):
        x, y, s = _model_loss_terms(model, images[i:i + 1], texts[i:i + 1])
        mask = torch.tensor([b == pid for b in bank_ids], device=x.device)
        c = (x * y).sum()
        row = torch.cat([s * c[None], (s * (yb @ x[0])).masked_fill(mask, -math.inf)])
        col = torch.cat([s * c[None], (s * (xb @ y[0])).masked_fill(mask, -math.inf)])
        loss = -0.5 * (row.log_softmax(0)[0] + col.log_softmax(0)[0])
        g = torch.autograd.grad(loss, plist, retain_graph=True)
        out.append(sum(float((a * b).sum()) for a, b in zip(g, u)))
    return np.array(out)


# -- set-aware selection (scoring/select.py): every step recomputed from scratch -------------------------------
def _first_max_ref(values, avail) -> int:
    best, arg = -np.inf, -1
    for i, (val, ok) in enumerate(zip(values, avail)):
        if ok and val > best:
            best, arg = val, i
    return arg


def pursuit_reference(A: np.ndarray, t: np.ndarray, m: int, round_size: int) -> np.ndarray:
    """Restarted OMP with a fresh least-squares fit (``lstsq``) and fresh correlations at every step."""
    from .select import DEPENDENT, TOL

    avail = [True] * len(A)
    chosen: list[int] = []
    while len(chosen) < m:
        S: list[int] = []
        r = t.copy()
        while len(chosen) < m and len(S) < round_size:
            c = [float(a @ r) for a in A]
            j = _first_max_ref(c, avail)
            if j < 0 or not c[j] > TOL:
                break
            if S:  # the atom's squared distance to the span of this round's atoms
                coef = np.linalg.lstsq(A[S].T, A[j], rcond=None)[0]
                if float(np.sum((A[j] - A[S].T @ coef) ** 2)) <= DEPENDENT:
                    avail[j] = False
                    continue
            S.append(j)
            chosen.append(j)
            avail[j] = False
            w = np.linalg.lstsq(A[S].T, t, rcond=None)[0]
            r = t - A[S].T @ w
        if not S:
            break
    return np.asarray(chosen, dtype=np.int64)


def knn_graph_reference(A: np.ndarray, neighbours: int) -> np.ndarray:
    """Dense symmetric weights: each row's ``neighbours`` most similar other rows (ties: smaller index), weight
    ``max(0, cos)``, then ``W = max(W, W^T)``."""
    n = len(A)
    W = np.zeros((n, n))
    for i in range(n):
        sims = [(-float(A[i] @ A[j]), j) for j in range(n) if j != i]
        for negsim, j in sorted(sims)[:neighbours]:
            W[i, j] = max(0.0, -negsim)
    return np.maximum(W, W.T)


def infomax_reference(A: np.ndarray, t: np.ndarray, m: int, redundancy: float, neighbours: int) -> np.ndarray:
    """Greedy on ``sum cos(a_i, t) - redundancy * sum_{pairs in S} W_ij``, each gain summed afresh."""
    W = knn_graph_reference(A, neighbours)
    s = A @ t
    avail = [True] * len(A)
    chosen: list[int] = []
    for _ in range(min(m, len(A))):
        gain = [s[i] - redundancy * sum(W[i, j] for j in chosen) for i in range(len(A))]
        j = _first_max_ref(gain, avail)
        chosen.append(j)
        avail[j] = False
    return np.asarray(chosen, dtype=np.int64)


def kmeans_reference(A: np.ndarray, C: int, iters: int) -> np.ndarray:
    n = len(A)
    centres = [A[i].copy() for i in np.linspace(0, n - 1, C).round().astype(np.int64)]
    labels = [0] * n
    for _ in range(iters):
        labels = [_first_max_ref([float(a @ c) for c in centres], [True] * C) for a in A]
        for c in range(C):
            members = [A[i] for i in range(n) if labels[i] == c]
            if members:
                total = np.sum(members, axis=0)
                if np.linalg.norm(total) > 0:
                    centres[c] = total / np.linalg.norm(total)
    return np.asarray(labels, dtype=np.int64)


def cluster_balanced_reference(A: np.ndarray, t: np.ndarray, m: int, clusters: int, explore: float,
                               iters: int) -> np.ndarray:
    """Each step: every cluster's priority recomputed, then the best remaining pair of the best cluster."""
    from .select import n_clusters

    s = A @ t
    C = n_clusters(len(A), clusters)
    labels = kmeans_reference(A, C, iters)
    members = {c: [i for i in range(len(A)) if labels[i] == c] for c in range(C)}
    value = {c: (sum(s[i] for i in members[c]) / len(members[c]) if members[c] else 0.0) for c in range(C)}
    taken = {c: [] for c in range(C)}
    chosen: list[int] = []
    for step in range(min(m, len(A))):
        pri = [value[c] + explore * math.sqrt(2.0 * math.log(1.0 + step) / (1.0 + len(taken[c]))) for c in range(C)]
        c = _first_max_ref(pri, [len(taken[c]) < len(members[c]) for c in range(C)])
        rest = [i for i in members[c] if i not in taken[c]]
        i = min(rest, key=lambda i: (-s[i], i))
        taken[c].append(i)
        chosen.append(i)
    return np.asarray(chosen, dtype=np.int64)
