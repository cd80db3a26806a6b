"""Benchmark v2's catalogue-sheet builder (benchmarks/selection/datasets/sheets.py) on synthetic items:
the stated noise fractions, captions true of the sheet (or wrong exactly as stated), distinct captions,
and disjoint splits. (The real builder feeds it Fashion-MNIST; the properties are the builder's.)"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "selection"))
from datasets import SHEET_NOISE, PairSet, make_sheets  # noqa: E402


@pytest.fixture(scope="module")
def target():
    rng = np.random.default_rng(0)
    n_tr, n_te = 12000, 2000
    xtr, xte = (rng.integers(0, 256, (n, 16, 16)).astype(np.uint8) for n in (n_tr, n_te))
    ytr, yte = rng.integers(0, 10, n_tr), rng.integers(0, 10, n_te)
    general = PairSet(images=rng.integers(0, 256, (60, 32, 32, 3)).astype(np.uint8),
                      captions=[f"a drawing number {i}" for i in range(60)], labels=np.full(60, -1), classnames=[],
                      source=np.full(60, "general"), kind=np.full(60, "clean"),
                      keys=np.array([f"g{i}" for i in range(60)]))
    return make_sheets(xtr, ytr, xte, yte, general, pool_size=2000, eval_size=100, test_size=200, warm_size=100)


def test_noise_fractions_are_the_stated_ones(target):
    fr = target.recipe["pool_fractions"]
    assert fr["mismatched"] == SHEET_NOISE["swapped"] and fr["partly_wrong"] == SHEET_NOISE["partly_wrong"]
    assert fr["near_duplicate"] == SHEET_NOISE["near_duplicate"] and fr["off_domain"] == SHEET_NOISE["off_domain"]
    assert len(target.pool) == 2000 and target.pool.images.shape == (2000, 32, 32, 3)


def test_captions_are_true_or_wrong_exactly_as_stated(target):
    truth, pool = target.recipe["truth"], target.pool
    for key, cap, kind in zip(pool.keys, pool.captions, pool.kind):
        own = truth.get(str(key).split("#dup")[0])
        if kind in ("clean", "near_duplicate"):
            assert cap == own
        elif kind == "mismatched":  # another sheet's true caption, never its own
            assert cap != own and cap in set(truth.values())
        elif kind == "partly_wrong":  # one item's clause differs, the other three are word for word
            diff = [a != b for a, b in zip(cap.split("; "), own.split("; "))]
            assert sum(diff) == 1, (cap, own)


def test_captions_are_distinct_and_splits_disjoint(target):
    sheets = [c for c, k in zip(target.pool.captions, target.pool.kind) if k in ("clean", "mismatched", "partly_wrong")]
    assert len(set(sheets)) >= 0.99 * len(sheets)  # ~10^8 possible captions: an anchor meets no same-meaning negative
    assert all(c.startswith("a catalogue sheet with ") for c in target.recipe["warm"].captions)  # coarse only
    items = {k: set(v.ravel().tolist()) for k, v in target.recipe["train_items"].items()}
    assert not (items["pool"] & items["eval"]) and not (items["pool"] & items["warm"])
    assert not (items["eval"] & items["warm"])
    assert len(items["pool"]) == 4 * 1400 and len(items["eval"]) == 4 * 100  # every item used once


def test_grounded_warm_up_and_item_classes(target):
    """``warm_captions="grounded"`` captions the warm-up sheets in the pool's grammar; ``item_classes`` gives the
    four item classes of every pool sheet by key (what the report's class balance reads)."""
    rng = np.random.default_rng(1)
    xtr, xte = rng.integers(0, 256, (4000, 16, 16)).astype(np.uint8), rng.integers(0, 256, (400, 16, 16)).astype(np.uint8)
    ytr, yte = rng.integers(0, 10, 4000), rng.integers(0, 10, 400)
    general = target.recipe["warm"].subset(np.arange(10))  # any PairSet serves as off-domain here
    g = make_sheets(xtr, ytr, xte, yte, general, pool_size=500, eval_size=20, test_size=20, warm_size=50,
                    warm_captions="grounded")
    assert all(c.startswith("top left: a ") for c in g.recipe["warm"].captions)
    with pytest.raises(ValueError, match="warm_captions='fine'"):
        make_sheets(xtr, ytr, xte, yte, general, pool_size=500, eval_size=20, test_size=20, warm_size=50,
                    warm_captions="fine")
    ic = target.recipe["item_classes"]
    in_domain = [str(k).split("#", 1)[0] for k, kind in zip(target.pool.keys, target.pool.kind) if kind != "off_domain"]
    assert all(k in ic and len(ic[k]) == 4 for k in in_domain)
    for key, classes in g.recipe["item_classes"].items():  # the true labels of the sheet's four items
        np.testing.assert_array_equal(classes, ytr[g.recipe["train_items"]["pool"][int(key.rsplit("/", 1)[1])]])


def test_a_second_domain_with_reused_items_and_no_warm_up():
    """``make_sheets`` builds any item domain: the captions use that domain's nouns and coarse prefix; with
    ``reuse`` the eval items are used once and kept out of the pool, the pool reuses the rest (every item once
    before any twice); ``warm_size=0`` gives no warm-up sheets. The fashion target's draws do not change."""
    from datasets import ANIMAL_SHEETS, FASHION_SHEETS
    rng = np.random.default_rng(2)
    xtr, xte = rng.integers(0, 256, (1500, 16, 16)).astype(np.uint8), rng.integers(0, 256, (300, 16, 16)).astype(np.uint8)
    ytr, yte = rng.integers(0, 10, 1500), rng.integers(0, 10, 300)
    general = PairSet(images=rng.integers(0, 256, (40, 32, 32, 3)).astype(np.uint8),
                      captions=[f"a drawing number {i}" for i in range(40)], labels=np.full(40, -1), classnames=[],
                      source=np.full(40, "general"), kind=np.full(40, "clean"), keys=np.array([f"g{i}" for i in range(40)]))
    a = make_sheets(xtr, ytr, xte, yte, general, pool_size=1000, eval_size=100, test_size=200, warm_size=0,
                    dom=ANIMAL_SHEETS, reuse=True, name="animal_sheets")
    assert a.name == "animal_sheets" and a.test.name == "animal_sheets_test" and len(a.recipe["warm"]) == 0
    nouns = {n[0] for n in ANIMAL_SHEETS.nouns}
    for cap, key in zip(a.pool.captions[:50], a.pool.keys[:50]):
        if str(key).startswith("animal_sheets/"):
            assert {c.rsplit(" ", 1)[-1] for c in cap.split("; ")} <= nouns, cap  # "top left: a small red cat"
    items = a.recipe["train_items"]
    pool_items = items["pool"].ravel()
    assert not set(pool_items.tolist()) & set(items["eval"].ravel().tolist())
    assert len(set(items["eval"].ravel().tolist())) == 4 * 100  # eval items once each
    counts = np.bincount(pool_items, minlength=1500)[np.unique(pool_items)]
    assert len(counts) == 1500 - 400 and counts.max() - counts.min() <= 1  # 2800 uses of 1100 items: 2 or 3 each
    assert len(a.test.pairs) == 200 and a.recipe["items_reused"]  # 800 item uses of 300 test items
    with pytest.raises(ValueError, match="eval_size=400"):  # eval items are never reused
        make_sheets(xtr, ytr, xte, yte, general, pool_size=1000, eval_size=400, test_size=20, warm_size=0,
                    dom=ANIMAL_SHEETS, reuse=True)
    f = make_sheets(xtr, ytr, xte, yte, general, pool_size=200, eval_size=20, test_size=20, warm_size=10,
                    dom=FASHION_SHEETS)
    g = make_sheets(xtr, ytr, xte, yte, general, pool_size=200, eval_size=20, test_size=20, warm_size=10)
    assert f.pool.captions == g.pool.captions and f.recipe["warm"].captions[0].startswith("a catalogue sheet with ")
