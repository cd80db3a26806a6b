"""Target A: Fashion-MNIST with a noisy candidate pool, a clean target eval set and the test split."""
from __future__ import annotations

import gzip
import os

import numpy as np

from .common import (NOISE, PairSet, Suite, Target, _concat, _fractions, _gray_to_rgb, _jitter, _mismatch,
                     _need_path, _noise_counts, _np, _numbered_keys, _off_domain, _resize_gray_batch, _rng)
from .templates import FASHION_ATTRS, FASHION_CLASSES, FASHION_NOUNS, FASHION_TEMPLATES, FASHION_ZS_TEMPLATES

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", ndim, 4).astype(int)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_raw(res: int) -> dict:
    _need_path(FASHION_DIR, "dataset-fashion-mnist")
    out = {}
    for split, pre in (("train", "train"), ("test", "t10k")):
        x = _read_idx(os.path.join(FASHION_DIR, f"{pre}-images-idx3-ubyte.gz"))
        y = _read_idx(os.path.join(FASHION_DIR, f"{pre}-labels-idx1-ubyte.gz")).astype(np.int64)
        out[split] = (_resize_gray_batch(x, res), y)
    return out


def _fashion_captions(labels, rng) -> list[str]:
    out = []
    for y in labels:
        noun = FASHION_NOUNS[y][rng.integers(len(FASHION_NOUNS[y]))]
        if rng.random() < 0.35:
            noun = FASHION_ATTRS[rng.integers(len(FASHION_ATTRS))] + " " + noun
        t = FASHION_TEMPLATES[rng.integers(len(FASHION_TEMPLATES))]
        out.append(t.format(np=_np(noun), n=noun))
    return out


def load_fashion(general: PairSet, res: int = 32, seed: int = 0, pool_size: int = 20000, eval_size: int = 300,
                 test_size: int | None = None) -> Target:
    """Target A: Fashion-MNIST.  Pool from the train split with 15% mismatched captions, 20% off-domain
    pairs from ``general``, 10% near-duplicates; eval_set = eval_size clean train pairs not in the pool;
    test = the 10k test split (or a stratified test_size subset)."""
    raw = _fashion_raw(res)
    xtr, ytr = raw["train"]
    xte, yte = raw["test"]
    rng = _rng(seed, "fashion")
    cnt = _noise_counts(pool_size)
    n_base = cnt["clean"] + cnt["mismatched"]
    if eval_size + n_base > len(ytr):
        raise ValueError(f"pool_size {pool_size} + eval_size {eval_size} need more than the {len(ytr)} train items")
    perm = rng.permutation(len(ytr))
    ev_idx, base_idx = np.sort(perm[:eval_size]), perm[eval_size:eval_size + n_base]
    clean_idx, mis_idx = np.sort(base_idx[:cnt["clean"]]), np.sort(base_idx[cnt["clean"]:])

    def mk(idx, caps, kind, split="train", suffix="", x=xtr, y=ytr):
        return PairSet(images=_gray_to_rgb(x[idx]), captions=caps, labels=y[idx], classnames=list(FASHION_CLASSES),
                       source=np.full(len(idx), "fashion_mnist"), kind=np.full(len(idx), kind),
                       keys=np.array([f"fashion_mnist/{split}/{i:05d}{suffix}" for i in idx]))

    eval_set = mk(ev_idx, _fashion_captions(ytr[ev_idx], _rng(seed, "fashion", "cap-eval")), "clean")
    clean = mk(clean_idx, _fashion_captions(ytr[clean_idx], _rng(seed, "fashion", "cap-clean")), "clean")
    # mismatched: the caption of another pool item of a different class
    own = _fashion_captions(ytr[mis_idx], _rng(seed, "fashion", "cap-mis"))
    mis_caps = _mismatch(own, ytr[mis_idx], clean.captions + own, np.concatenate([clean.labels, ytr[mis_idx]]),
                         _rng(seed, "fashion", "mismatch"))
    mis = mk(mis_idx, mis_caps, "mismatched", suffix="#mismatched")
    # near duplicates of clean pool items
    r = _rng(seed, "fashion", "dup")
    src = r.choice(len(clean), cnt["near_duplicate"], replace=cnt["near_duplicate"] > len(clean))
    dup = clean.subset(src)
    dup.images = _jitter(dup.images, r)
    recap = _fashion_captions(dup.labels, _rng(seed, "fashion", "cap-dup"))
    dup.captions = [c2 if r.random() < 0.5 else c1 for c1, c2 in zip(dup.captions, recap)]
    dup.kind = np.full(len(dup), "near_duplicate")
    dup.keys = _numbered_keys(dup.keys, "dup")
    off = _off_domain(general, cnt["off_domain"], res, _rng(seed, "fashion", "off"), "offdomain-fashion")
    pool = _concat([p for p in (clean, mis, dup, off) if p is not None], classnames=list(FASHION_CLASSES))
    pool = pool.subset(_rng(seed, "fashion", "order").permutation(len(pool)))

    # test split (optionally a stratified subset)
    te_idx = np.arange(len(yte))
    if test_size is not None and test_size < len(yte):
        rt = _rng(seed, "fashion", "test-subset")
        per = np.bincount(yte, minlength=10)
        take = np.floor(per / per.sum() * test_size).astype(int)
        take[np.argsort(-(per / per.sum() * test_size - take))[:test_size - take.sum()]] += 1
        te_idx = np.sort(np.concatenate([rt.choice(np.flatnonzero(yte == c), take[c], replace=False)
                                         for c in range(10)]))
    test = Suite(name="fashion_test",
                 pairs=mk(te_idx, _fashion_captions(yte[te_idx], _rng(seed, "fashion", "cap-test")), "clean",
                          split="test", x=xte, y=yte),
                 templates=list(FASHION_ZS_TEMPLATES))
    recipe = {
        "seed": seed, "res": res, "source": f"Debian dataset-fashion-mnist ({FASHION_DIR}, IDX gz)",
        "pool_size": len(pool), "pool_counts": cnt, "pool_fractions": _fractions(pool),
        "noise": dict(NOISE), "eval_size": len(eval_set), "test_size": len(test.pairs),
        "splits": "pool and eval_set from the 60k train split (disjoint images); test = t10k split",
        "mismatched": "caption of another pool item of a different class; label keeps the image's true class",
        "near_duplicate": "copy of a clean pool item: 1-px shift and/or brightness/contrast + gaussian noise; "
                          "50% same caption, 50% re-templated",
        "off_domain": "random pairs of the general training set with their own captions (label -1)",
        "caption_templates": FASHION_TEMPLATES, "caption_nouns": dict(zip(FASHION_CLASSES, FASHION_NOUNS)),
        "attribute_words (35% of captions)": FASHION_ATTRS,
        "zero_shot_classnames": FASHION_CLASSES, "zero_shot_templates": FASHION_ZS_TEMPLATES,
    }
    return Target(name="fashion", pool=pool, eval_set=eval_set, test=test, recipe=recipe)
