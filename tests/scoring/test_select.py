"""Set-aware selectors (chips_core/scoring/select.py): held equal to their slow references, and the behaviour
they exist for on planted pools."""
import numpy as np
import pytest

from chips_core.errors import ConfigError
from chips_core.scoring import reference as ref
from chips_core.scoring import select as sel


def _pool(n=120, k=16, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, k)) * rng.uniform(0.2, 5.0, size=(n, 1))  # norms vary: the cosine must not care
    v = rng.normal(size=k)
    return sel.unit_rows(g), sel.unit(v)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pursuit_equals_reference(seed):
    A, t = _pool(seed=seed)
    for m, rnd in ((40, 8), (90, 16), (5, 64)):
        fast = sel.pursuit(A, t, m, rnd)
        np.testing.assert_array_equal(fast, ref.pursuit_reference(A, t, m, rnd))
        assert len(set(fast.tolist())) == len(fast)


@pytest.mark.parametrize("seed", [0, 1])
def test_infomax_equals_reference(seed):
    A, t = _pool(n=80, seed=seed)
    W = sel.knn_graph(A, 5).toarray()
    np.testing.assert_allclose(W, ref.knn_graph_reference(A, 5), rtol=0, atol=1e-12)
    for lam in (0.0, 0.5, 3.0):
        np.testing.assert_array_equal(sel.infomax(A, t, 30, lam, 5), ref.infomax_reference(A, t, 30, lam, 5))


@pytest.mark.parametrize("seed", [0, 1])
def test_cluster_equals_reference(seed):
    A, t = _pool(n=90, seed=seed)
    np.testing.assert_array_equal(sel.spherical_kmeans(A, 6, 5), ref.kmeans_reference(A, 6, 5))
    for explore in (0.0, 0.5, 2.0):
        np.testing.assert_array_equal(sel.cluster_balanced(A, t, 40, 6, explore, 5),
                                      ref.cluster_balanced_reference(A, t, 40, 6, explore, 5))


def _copies_pool(seed=0, k=32, copies=30, others=40):
    """One direction close to the target, present many times (near-copies); other distinct directions each
    moderately aligned with the target."""
    rng = np.random.default_rng(seed)
    t = sel.unit(rng.normal(size=k))
    best = sel.unit(t + 0.3 * sel.unit(rng.normal(size=k)))
    dup = best + 0.01 * rng.normal(size=(copies, k))
    other = t * 0.5 + sel.unit_rows(rng.normal(size=(others, k)))
    g = np.vstack([dup, other])
    return sel.unit_rows(g), t, np.arange(len(g)) < copies


def test_set_selectors_do_not_pick_copies_of_one_direction():
    A, t, is_copy = _copies_pool()
    m = 15
    topk = np.argsort(-(A @ t), kind="stable")[:m]
    assert is_copy[topk].sum() == m  # top-k by alignment: every pick a copy of the best direction
    cfg = sel.SelectConfig()
    picks = {"pursuit": sel.pursuit(A, t, m, cfg.pursuit_round),
             "infomax": sel.infomax(A, t, m, cfg.redundancy, cfg.neighbours),
             "cluster": sel.cluster_balanced(A, t, m, 6, 1.0, cfg.kmeans_iters),
             "cluster_default": sel.cluster_balanced(A, t, m, 6, cfg.explore, cfg.kmeans_iters)}
    assert all(len(p) == m for p in picks.values())
    # the pursuit spans each direction once; infomax's graph links a pair to its `neighbours` nearest only, so of
    # 30 copies some stay unpenalised; with a bonus weight of 1 the best cluster gives about a third of the picks,
    # with the eval-chosen default (0.25) over half, still fewer than top-k's all
    assert is_copy[picks["pursuit"]].sum() <= 2, picks
    assert is_copy[picks["infomax"]].sum() <= m // 2, picks
    assert is_copy[picks["cluster"]].sum() <= m // 2, picks
    assert is_copy[picks["cluster_default"]].sum() < m, picks


def test_pursuit_recovers_a_mixture_target():
    """The target is a non-negative mix of three directions; the pool holds noisy copies of each plus
    distractors. The pursuit's first round picks each mixture direction and no distractor."""
    rng = np.random.default_rng(3)
    k = 64
    dirs = sel.unit_rows(rng.normal(size=(3, k)))
    t = sel.unit(0.5 * dirs[0] + 0.3 * dirs[1] + 0.2 * dirs[2])
    atoms = [d + 0.01 * rng.normal(size=(4, k)) for d in dirs]
    distract = rng.normal(size=(60, k))
    A = sel.unit_rows(np.vstack(atoms + [distract]))
    src = np.repeat([0, 1, 2, 3], [4, 4, 4, 60])
    picks = sel.pursuit(A, t, 3, 64)
    assert sorted(src[picks].tolist()) == [0, 1, 2]
    topk = np.argsort(-(A @ t), kind="stable")[:3]
    assert sorted(src[topk].tolist()) != [0, 1, 2]  # top-k picks the dominant direction's copies instead


def test_quotas_and_partitions():
    assert sel.quotas(np.array([5, 5, 5]), 7).tolist() == [3, 2, 2]
    assert sel.quotas(np.array([1, 10]), 11).tolist() == [1, 10]
    assert sel.quotas(np.array([0, 4]), 9).tolist() == [0, 4]
    ids = [f"p{i:04d}" for i in range(500)]
    a = sel.partition_of(ids, 4, 0)
    b = sel.partition_of(list(reversed(ids)), 4, 0)[::-1]
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("method", sel.SET_METHODS)
def test_select_set_is_order_free_and_partitioned(method):
    rng = np.random.default_rng(5)
    n, k = 300, 16
    ids = [f"pair-{i:05d}" for i in range(n)]
    g = rng.normal(size=(n, k)) * rng.uniform(0.5, 2, size=(n, 1))
    v = rng.normal(size=k)
    cfg = sel.SelectConfig(partition=100, neighbours=4, clusters=5)
    out = sel.select_set(method, ids, g, v, 60, cfg)
    perm = rng.permutation(n)
    assert sel.select_set(method, [ids[i] for i in perm], g[perm], v, 60, cfg) == out  # input order free
    assert len(out) == len(set(out)) and (len(out) == 60 or method == "chips_pursuit")
    whole = sel.select_set(method, ids, g, v, 60, sel.SelectConfig(partition=10_000, neighbours=4, clusters=5))
    assert len(whole) == len(out)


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="pursuit_round"):
        sel.SelectConfig(pursuit_round=0)
    with pytest.raises(ConfigError, match="method"):
        sel.select_set("chips", ["a"], np.ones((1, 2)), np.ones(2), 1)
