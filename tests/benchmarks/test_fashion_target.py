"""The v3 benchmark's classification target, ``fashion`` (benchmarks/selection/datasets/fashion.py), built small from
the real Fashion-MNIST files (Debian ``dataset-fashion-mnist``, installed by benchmarks/selection/install_data.sh;
skips, naming the package, where it is missing): the stated noise counts, captions that name the image's class or,
for the mismatched pairs, another class, eval and test items disjoint from the pool, and the same target from the
same seed."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "selection"))
from datasets import PairSet, load_fashion  # noqa: E402
from datasets.common import _noise_counts  # noqa: E402
from datasets.fashion import FASHION_DIR  # noqa: E402
from datasets.templates import FASHION_CLASSES, FASHION_NOUNS  # noqa: E402

POOL, TEST = 1000, 200


def _general(n: int = 400) -> PairSet:
    rng = np.random.default_rng(0)
    return PairSet(images=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                   captions=[f"a drawing number {i}" for i in range(n)], labels=np.full(n, -1), classnames=[],
                   source=np.full(n, "general"), kind=np.full(n, "clean"), keys=np.array([f"g{i}" for i in range(n)]))


@pytest.fixture(scope="module")
def target():
    if not Path(FASHION_DIR).is_dir():
        pytest.skip("Fashion-MNIST not installed (Debian dataset-fashion-mnist; benchmarks/selection/install_data.sh)")
    return load_fashion(_general(), seed=0, pool_size=POOL, test_size=TEST)


def _names(caption: str) -> set[int]:
    return {c for c, nouns in enumerate(FASHION_NOUNS) if any(n in caption for n in nouns)}


def test_kinds_and_counts_are_the_stated_ones(target):
    kinds, counts = target.pool.kind, _noise_counts(POOL)
    assert len(target.pool) == POOL
    assert {k: int((kinds == k).sum()) for k in counts} == counts
    off = kinds == "off_domain"
    assert (target.pool.labels[off] == -1).all() and (target.pool.labels[~off] >= 0).all()
    assert target.pool.classnames == list(FASHION_CLASSES) and target.test.pairs.classnames == list(FASHION_CLASSES)


def test_captions_name_the_class_or_another_one_when_mismatched(target):
    pool = target.pool
    for cap, label, kind in zip(pool.captions, pool.labels, pool.kind):
        if kind in ("clean", "near_duplicate"):
            assert label in _names(cap), (cap, FASHION_CLASSES[label])
        elif kind == "mismatched":
            assert _names(cap) - {label}, (cap, FASHION_CLASSES[label])
    mis = pool.kind == "mismatched"
    own = np.array([label in _names(c) and len(_names(c)) == 1 for c, label in zip(pool.captions, pool.labels)])
    assert own[mis].mean() < 0.05  # a mismatched caption is another class's (nouns overlap: "shirt" in "t-shirt")
    for cap, label in zip(target.eval_set.captions, target.eval_set.labels):
        assert label in _names(cap)


def test_eval_and_test_items_are_disjoint_from_the_pool(target):
    item = lambda k: str(k).split("#", 1)[0]  # noqa: E731  (a near-duplicate's or mismatched pair's base item)
    pool = {item(k) for k, kind in zip(target.pool.keys, target.pool.kind) if kind != "off_domain"}
    assert not pool & {item(k) for k in target.eval_set.keys}
    assert all(str(k).startswith("fashion_mnist/test/") for k in target.test.pairs.keys)
    assert all(k.startswith("fashion_mnist/train/") for k in pool)
    assert len(target.test.pairs) == TEST and np.bincount(target.test.pairs.labels, minlength=10).min() >= TEST // 10 - 1


def test_same_seed_same_target(target):
    again = load_fashion(_general(), seed=0, pool_size=POOL, test_size=TEST)
    assert again.pool.captions == target.pool.captions
    assert np.array_equal(again.pool.images, target.pool.images) and np.array_equal(again.pool.keys, target.pool.keys)
    other = load_fashion(_general(), seed=1, pool_size=POOL, test_size=TEST)
    assert other.pool.captions != target.pool.captions
