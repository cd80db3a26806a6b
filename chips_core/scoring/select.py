r"""Set-aware selection with the gradient features (issue 27): which *set* of eligible pairs to train on.

Top-k by a per-pair utility fails in two known ways: k copies of the best direction all rank high
(redundancy), and raw inner products favour pairs with large gradients (here: mismatched captions). The
selectors below read only stored features — the sketched gradients :math:`\hat g`, the preconditioned target
direction :math:`v = M^{-1}\hat u` — and choose jointly. Each works on unit gradient rows
:math:`a_i = \hat g_i / \lVert\hat g_i\rVert` (LESS's cosine, not the inner product) and the unit target
:math:`t = v / \lVert v\rVert`:

``chips_pursuit``
    Joint pursuit of :math:`t` (orthogonal matching pursuit, as Gradient Trajectory Pursuit): pick the atom most
    correlated with the residual, refit the least-squares weights of every atom picked in this round, recompute
    the residual. An atom whose direction is already spanned adds nothing, so duplicates are not picked twice in
    a round. After ``pursuit_round`` atoms (or when no atom correlates positively with the residual) the residual
    restarts at :math:`t` with the picked atoms removed: a budget of thousands of pairs is many rounds of a
    ``k``-dimensional pursuit.
``chips_infomax``
    Score minus redundancy (InfoMax): greedily maximise
    :math:`\sum_{i\in S} \cos(a_i, t) - \lambda \sum_{\{i,j\}\subseteq S} W_{ij}` over a sparsified similarity
    graph, :math:`W_{ij} = \max(0, a_i\cdot a_j)` on the union of each pair's ``neighbours`` nearest gradient
    directions.
``chips_cluster``
    Cluster-balanced influence (Quad): spherical k-means of the gradient directions; each step takes the next
    best pair (by :math:`\cos(a_i, t)`) of the cluster with the highest
    :math:`\bar s_c + \gamma\sqrt{2\ln(1 + T)/(1 + T_c)}` (its mean alignment plus a bonus for clusters chosen
    less often; :math:`T` picks so far, :math:`T_c` from cluster :math:`c`).

Superlinear work is bounded by partitioning the candidates (``partition`` pairs each, by a seeded hash of the
pair id, so a partition does not depend on shards or threads); each partition selects its share of the budget
(largest remainder) and the shares interleave. Candidates inside a partition are in ``pair_id`` order and every
``argmax`` takes the first maximum, so ties go to the smaller ``pair_id``. The slow references in
:mod:`chips_core.scoring.reference` recompute everything from scratch at each step; the functions here update
incrementally and are held equal to them in ``tests/scoring/test_select.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse

from ..errors import check
from .identity import seeded_unit

SET_METHODS = ("chips_pursuit", "chips_infomax", "chips_cluster")
TOL = 1e-12  # a correlation at most this is no progress (the pursuit restarts or stops)
DEPENDENT = 1e-10  # an atom whose squared distance to the span of the round's atoms is below this is spanned
BLOCK = 1024  # rows of a similarity block (the kNN graph, k-means): memory BLOCK x n float64


@dataclass(frozen=True)
class SelectConfig:
    """Parameters of the set-aware selectors. ``pursuit_round``, ``redundancy`` and ``explore`` were chosen on the
    ``sheets`` target's *eval set* only (docs/benchmarks/select_defaults.md), then frozen for every target."""

    partition: int = 16384  # candidates per partition: bounds the superlinear work (kNN graph, pursuit rounds)
    pursuit_round: int = 256  # atoms before the pursuit's residual restarts at the target direction
    redundancy: float = 1.0  # infomax's lambda: the price of similarity to a pair already chosen
    neighbours: int = 10  # infomax's graph degree before symmetrising
    clusters: int = 0  # chips_cluster's k-means clusters per partition; 0: round(sqrt(n / 2))
    explore: float = 0.25  # chips_cluster's gamma: weight of the bonus for clusters chosen less often
    kmeans_iters: int = 10  # chips_cluster's spherical k-means iterations
    seed: int = 0  # the partition hash's seed

    def __post_init__(self):
        check(self.partition >= 2, "SelectConfig", "partition", self.partition, "must be at least 2")
        check(self.pursuit_round >= 1, "SelectConfig", "pursuit_round", self.pursuit_round, "must be at least 1")
        check(self.redundancy >= 0, "SelectConfig", "redundancy", self.redundancy, "must be >= 0")
        check(self.neighbours >= 1, "SelectConfig", "neighbours", self.neighbours, "must be at least 1")
        check(self.clusters >= 0, "SelectConfig", "clusters", self.clusters, "must be >= 0 (0: automatic)")
        check(self.explore >= 0, "SelectConfig", "explore", self.explore, "must be >= 0")
        check(self.kmeans_iters >= 1, "SelectConfig", "kmeans_iters", self.kmeans_iters, "must be at least 1")


def unit_rows(g: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float64 (a zero row stays zero: it correlates with nothing)."""
    a = np.asarray(g, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", a, a))
    return a / np.where(norms > 0, norms, 1.0)[:, None]


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(v))
    if not n > 0:
        raise ValueError("the target direction M^-1 u is zero; nothing to align with")
    return v / n


def _first_max(values: np.ndarray, avail: np.ndarray) -> int:
    """Index of the largest available value, the first on ties (candidates are in pair-id order); -1 if none."""
    masked = np.where(avail, values, -np.inf)
    j = int(np.argmax(masked))
    return j if avail[j] else -1


# -- chips_pursuit ------------------------------------------------------------------------------------------
def pursuit(A: np.ndarray, t: np.ndarray, m: int, round_size: int) -> np.ndarray:
    """Restarted orthogonal matching pursuit of ``t`` by the unit rows of ``A``: up to ``m`` indices in pick
    order (fewer when no remaining atom correlates positively with ``t``). Incremental Cholesky of the round's
    Gram matrix; :func:`chips_core.scoring.reference.pursuit_reference` re-solves least squares each step."""
    n = len(A)
    avail = np.ones(n, dtype=bool)
    chosen: list[int] = []
    base = A @ t
    while len(chosen) < m:
        S: list[int] = []
        L = np.zeros((round_size, round_size))
        c = base.copy()
        while len(chosen) < m and len(S) < round_size:
            j = _first_max(c, avail)
            if j < 0 or not c[j] > TOL:
                break
            s = len(S)
            if s:
                w = scipy.linalg.solve_triangular(L[:s, :s], A[S] @ A[j], lower=True)
                d = 1.0 - float(w @ w)
                if d <= DEPENDENT:  # spanned by this round's atoms: it cannot reduce the residual
                    avail[j] = False
                    continue
                L[s, :s], L[s, s] = w, math.sqrt(d)
            else:
                L[0, 0] = 1.0
            S.append(j)
            chosen.append(j)
            avail[j] = False
            coef = scipy.linalg.cho_solve((L[:s + 1, :s + 1], True), base[S])
            c = A @ (t - A[S].T @ coef)
        if not S:
            break
    return np.asarray(chosen, dtype=np.int64)


# -- chips_infomax ------------------------------------------------------------------------------------------
def knn_graph(A: np.ndarray, neighbours: int) -> scipy.sparse.csr_matrix:
    """The symmetrised ``neighbours``-nearest-direction graph of the unit rows of ``A`` (cosine, ties by the
    smaller index; no self loops), weights ``max(0, cos)``, as CSR."""
    n = len(A)
    kk = min(neighbours, n - 1)
    if kk <= 0:
        return scipy.sparse.csr_matrix((n, n))
    rows, cols, vals = [], [], []
    for s in range(0, n, BLOCK):
        sims = A[s:s + BLOCK] @ A.T
        r = len(sims)
        sims[np.arange(r), np.arange(s, s + r)] = -np.inf
        for i in range(r):
            nb = _top(sims[i], kk)
            rows.append(np.full(kk, s + i))
            cols.append(nb)
            vals.append(np.maximum(sims[i, nb], 0.0))
    W = scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    W = W.maximum(W.T).tocsr()
    W.sort_indices()
    return W


def _top(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values of ``row``, ties by the smaller index (exact at the boundary)."""
    part = np.argpartition(-row, k - 1)[:k]
    kth = row[part].min()
    cand = np.flatnonzero(row >= kth)  # every index tied with the k-th value, in index order
    order = np.lexsort((cand, -row[cand]))
    return cand[order[:k]]


def infomax(A: np.ndarray, t: np.ndarray, m: int, redundancy: float, neighbours: int) -> np.ndarray:
    """Greedy score-minus-redundancy: ``m`` indices in pick order. Gains start at ``cos(a_i, t)`` and each pick
    lowers its graph neighbours' gains by ``redundancy * W_ij``."""
    n = len(A)
    W = knn_graph(A, neighbours)
    gain = A @ t
    avail = np.ones(n, dtype=bool)
    chosen = []
    for _ in range(min(m, n)):
        j = _first_max(gain, avail)
        chosen.append(j)
        avail[j] = False
        lo, hi = W.indptr[j], W.indptr[j + 1]
        gain[W.indices[lo:hi]] -= redundancy * W.data[lo:hi]
    return np.asarray(chosen, dtype=np.int64)


# -- chips_cluster ------------------------------------------------------------------------------------------
def n_clusters(n: int, clusters: int) -> int:
    return max(1, min(n, clusters or round(math.sqrt(n / 2))))


def spherical_kmeans(A: np.ndarray, C: int, iters: int) -> np.ndarray:
    """Cluster labels: centres start at ``C`` evenly spaced rows (pair-id order: a hash order), each point goes to
    its most similar centre (ties: the smaller label), a centre is its points' normalised sum (an empty cluster
    keeps its centre); ``iters`` rounds."""
    n = len(A)
    centres = A[np.linspace(0, n - 1, C).round().astype(np.int64)].copy()
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        for s in range(0, n, BLOCK):
            labels[s:s + BLOCK] = np.argmax(A[s:s + BLOCK] @ centres.T, axis=1)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, A)
        norms = np.linalg.norm(sums, axis=1)
        keep = norms > 0
        centres[keep] = sums[keep] / norms[keep, None]
    return labels


def cluster_balanced(A: np.ndarray, t: np.ndarray, m: int, clusters: int, explore: float, iters: int) -> np.ndarray:
    """Quad-style cluster-balanced selection: ``m`` indices in pick order."""
    n = len(A)
    s = A @ t
    labels = spherical_kmeans(A, n_clusters(n, clusters), iters)
    C = int(labels.max()) + 1
    order = np.lexsort((np.arange(n), -s, labels))  # by cluster, then alignment descending, then index
    size = np.bincount(labels, minlength=C)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    value = np.bincount(labels, weights=s, minlength=C) / np.maximum(size, 1)
    taken = np.zeros(C, dtype=np.int64)
    chosen = []
    for step in range(min(m, n)):
        pri = value + explore * np.sqrt(2.0 * math.log(1.0 + step) / (1.0 + taken))
        c = _first_max(pri, taken < size)
        chosen.append(int(order[start[c] + taken[c]]))
        taken[c] += 1
    return np.asarray(chosen, dtype=np.int64)


# -- partitions and the whole selection ---------------------------------------------------------------------
def partition_of(pair_ids, n_parts: int, seed: int) -> np.ndarray:
    """Each pair's partition, a function of its id and ``seed`` only."""
    if n_parts <= 1:
        return np.zeros(len(pair_ids), dtype=np.int64)
    return np.minimum((seeded_unit(pair_ids, seed ^ 0x5E7) * n_parts).astype(np.int64), n_parts - 1)


def quotas(sizes: np.ndarray, m: int) -> np.ndarray:
    """``m`` picks shared in proportion to ``sizes`` (largest remainder; ties to the lower index), none above a size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    m = min(m, total)
    if total == 0:
        return np.zeros_like(sizes)
    exact = sizes * (m / total)
    q = np.minimum(np.floor(exact).astype(np.int64), sizes)
    rest = m - int(q.sum())
    order = np.lexsort((np.arange(len(sizes)), -(exact - q)))
    for i in order:
        if rest == 0:
            break
        if q[i] < sizes[i]:
            q[i] += 1
            rest -= 1
    return q


def run_selector(method: str, A: np.ndarray, t: np.ndarray, m: int, config: SelectConfig) -> np.ndarray:
    if method == "chips_pursuit":
        return pursuit(A, t, m, config.pursuit_round)
    if method == "chips_infomax":
        return infomax(A, t, m, config.redundancy, config.neighbours)
    if method == "chips_cluster":
        return cluster_balanced(A, t, m, config.clusters, config.explore, config.kmeans_iters)
    raise ValueError(f"method {method!r} is not a set-aware selector ({', '.join(SET_METHODS)})")


def select_set(method: str, pair_ids, g: np.ndarray, v: np.ndarray, m: int,
               config: SelectConfig = SelectConfig()) -> list[str]:
    """Up to ``m`` of the candidate pairs (``pair_ids`` with their sketched gradients ``g``, any order), in
    selection order, by a set-aware selector against the preconditioned target direction ``v``: the candidates in
    memory. :func:`select_partitions` is the same selection over partitions held elsewhere (the platform spools
    them to disk)."""
    check(method in SET_METHODS, "select_set", "method", method, f"not in {SET_METHODS}")
    ids = np.asarray(list(pair_ids), dtype=object)
    if len(ids) == 0 or m <= 0:
        return []
    check(len(set(ids.tolist())) == len(ids), "select_set", "pair_ids", "duplicates", "must be distinct")
    n_parts = math.ceil(len(ids) / config.partition)
    part = partition_of(ids.tolist(), n_parts, config.seed)
    rows = [np.flatnonzero(part == p) for p in range(n_parts)]
    return select_partitions(method, [(ids[r].tolist(), (lambda r=r: g[r])) for r in rows], v, m, config)


def select_partitions(method: str, parts, v: np.ndarray, m: int, config: SelectConfig = SelectConfig()) -> list[str]:
    """The selection over ``parts``: for partition ``p`` (as :func:`partition_of` numbers them), its pair ids and a
    function returning its gradients (rows in the same order). Each partition selects its quota (largest
    remainder, in proportion to its size) among its pairs in pair-id order; the result interleaves them by the
    fraction of its quota each pick is (ties: the lower partition). One partition's gradients are in memory at a
    time. Fewer than ``m`` when the pursuit runs out of positively correlated atoms."""
    check(method in SET_METHODS, "select_partitions", "method", method, f"not in {SET_METHODS}")
    t = unit(v)
    sizes = np.array([len(ids) for ids, _ in parts], dtype=np.int64)
    share = quotas(sizes, m)
    keys, picked = [], []
    for p, (ids, load) in enumerate(parts):
        if share[p] == 0 or len(ids) == 0:
            continue
        ids = np.asarray(ids, dtype=object)
        order = np.argsort(ids.astype(str), kind="stable")  # pair-id order inside a partition
        got = run_selector(method, unit_rows(np.asarray(load())[order]), t, int(share[p]), config)
        picked.append(ids[order][got])
        keys.append(np.column_stack([(np.arange(len(got)) + 1) / share[p], np.full(len(got), p)]))
    if not picked:
        return []
    key = np.concatenate(keys)
    merged = np.lexsort((key[:, 1], key[:, 0]))
    return np.concatenate(picked)[merged].tolist()
