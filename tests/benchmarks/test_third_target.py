"""The third target, ``icons`` (benchmarks/selection/datasets/icons.py), built small from the real icon themes
(Debian packages installed by benchmarks/selection/install_data.sh; skips, naming the package, where one is
missing): the stated noise fractions, captions true of the pixels or wrong exactly as stated, test icons disjoint
from pool, eval and warm-up icons by source and by source group, labels and classnames for zero-shot top-1, and
the same arrays and captions from the same seed."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "selection"))
from datasets import ICON_NOISE, PairSet  # noqa: E402
from datasets import icons  # noqa: E402

POOL, EVAL, TEST, WARM = 1800, 90, 180, 180


def _general(n: int = 40) -> PairSet:
    rng = np.random.default_rng(0)
    return PairSet(images=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                   captions=[f"a drawing number {i}" for i in range(n)], labels=np.full(n, -1), classnames=[],
                   source=np.full(n, "general"), kind=np.full(n, "clean"), keys=np.array([f"g{i}" for i in range(n)]))


def _build(seed: int = 0):
    return icons.load_icons(_general(), seed=seed, pool_size=POOL, eval_size=EVAL, test_size=TEST, warm_size=WARM)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    try:
        icons._need_themes()
    except RuntimeError as e:  # names the missing Debian package
        pytest.skip(f"icon themes not installed (benchmarks/selection/install_data.sh): {e}")
    return _build()


def _in_domain(ps):
    return np.flatnonzero(ps.kind != "off_domain")


def test_kinds_and_counts_are_the_stated_ones(target):
    pool, r = target.pool, target.recipe
    assert len(pool) == POOL and pool.images.shape == (POOL, 32, 32, 3) and pool.images.dtype == np.uint8
    kinds, counts = np.unique(pool.kind, return_counts=True)
    got = dict(zip(kinds.tolist(), counts.tolist()))
    assert set(got) == {"clean", "mismatched", "partly_wrong", "near_duplicate", "off_domain"}
    for k, f in ICON_NOISE.items():
        assert got[k] == round(f * POOL) == r["pool_counts"][k]
    assert got["clean"] == POOL - sum(round(f * POOL) for f in ICON_NOISE.values())
    assert r["pool_fractions"] == {k: round(v / POOL, 4) for k, v in got.items()}
    assert len(pool.keys) == len(set(pool.keys))  # keys are unique
    assert (len(target.eval_set), len(target.test.pairs), len(r["warm"])) == (EVAL, TEST, WARM)
    for ps in (target.eval_set, target.test.pairs, r["warm"]):
        assert set(ps.kind) == {"clean"} and len(ps.keys) == len(set(ps.keys))


def test_labels_classnames_and_zero_shot_suite(target):
    n_cls = len(icons.ICON_CLASSNAMES)
    assert n_cls >= 8 and target.test.templates and all("{c}" in t for t in target.test.templates)
    for ps in (target.pool, target.eval_set, target.test.pairs, target.recipe["warm"]):
        assert ps.classnames == icons.ICON_CLASSNAMES
        dom = ps.kind != "off_domain"
        assert ((ps.labels[dom] >= 0) & (ps.labels[dom] < n_cls)).all() and (ps.labels[~dom] == -1).all()
    # class-balanced test and eval sets: every class, within one pair of each other
    for ps in (target.eval_set, target.test.pairs):
        per = np.bincount(ps.labels, minlength=n_cls)
        assert per.min() >= 1 and per.max() - per.min() <= 1


def test_captions_name_their_class_or_are_wrong_as_stated(target):
    pool, r = target.pool, target.recipe
    truth, named, changed = r["truth"], r["caption_classes"], r["partly_wrong_changed"]

    def names(cap, c):
        return any(n in cap for n in icons.ICON_NOUNS[icons.ICON_CLASSNAMES[c]])

    for ps in (target.eval_set, target.test.pairs, r["warm"]):
        assert all(names(cap, c) for cap, c in zip(ps.captions, ps.labels))
    for i in _in_domain(pool):
        key, cap, kind, c = str(pool.keys[i]), pool.captions[i], pool.kind[i], int(pool.labels[i])
        base = key.split("#dup")[0]
        if kind in ("clean", "near_duplicate"):
            assert cap == truth[base] and named[base] == c and names(cap, c), (key, cap)
        elif kind == "mismatched":  # another pair's true caption, of another class
            assert named[key] != c and cap != truth[key] and names(cap, named[key]), (key, cap)
        else:  # partly wrong: the class, or one stated attribute, changed; the rest word for word
            assert cap != truth[key]
            if changed[key] == "class":
                assert named[key] != c and names(cap, named[key])
            else:
                assert named[key] == c
                pat = {"background": r"on a (\w+) background", "size": r"\b(large|medium-sized|small)\b"}[changed[key]]
                was, now = re.findall(pat, truth[key]), re.findall(pat, cap)
                assert len(was) == len(now) == 1 and was != now, (cap, truth[key])
                assert re.sub(pat, "", cap) == re.sub(pat, "", truth[key])
    # grounded attributes: a background a caption states is the one the image shows (its border pixel)
    for ps in (target.eval_set, target.test.pairs):
        for img, cap in zip(ps.images, ps.captions):
            for name, rgb in icons.BACKGROUNDS.items():
                if f"on a {name} background" in cap:
                    assert np.abs(img[0, 0].astype(int) - rgb).max() <= 2, (cap, img[0, 0])


def test_test_icons_are_disjoint_from_pool_eval_and_warm(target):
    r = target.recipe
    src = {s: set(v) for s, v in r["source_items"].items()}
    keys = {"pool": target.pool.keys[_in_domain(target.pool)], "eval": target.eval_set.keys,
            "warm": r["warm"].keys, "test": target.test.pairs.keys}
    for s, ks in keys.items():  # the recipe's lists are the keys' sources
        assert {icons.source_of(k) for k in ks} == src[s]
    groups = {s: {r["source_groups"][p] for p in v} for s, v in src.items()}
    for a in ("pool", "eval", "warm"):
        assert not src["test"] & src[a] and not groups["test"] & groups[a], a
    assert not src["pool"] & src["eval"] and not src["pool"] & src["warm"] and not src["eval"] & src["warm"]
    assert not groups["pool"] & groups["eval"] and not groups["pool"] & groups["warm"]
    # no image of the test set appears (pixel for pixel) elsewhere
    test_imgs = {im.tobytes() for im in target.test.pairs.images}
    for ps in (target.pool, target.eval_set, r["warm"]):
        assert not any(im.tobytes() in test_imgs for im in ps.images)


def test_same_seed_same_target(target):
    again = _build(seed=0)
    for a, b in ((target.pool, again.pool), (target.eval_set, again.eval_set), (target.test.pairs, again.test.pairs),
                 (target.recipe["warm"], again.recipe["warm"])):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.kind, b.kind)
        assert a.captions == b.captions
    other = _build(seed=1)
    assert other.pool.captions != target.pool.captions
