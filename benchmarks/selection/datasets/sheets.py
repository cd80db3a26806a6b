"""Targets for benchmark v2 (issue 10): *sheets* of small items with grounded, diverse captions.

Two domains are built the same way (:class:`SheetDomain`): Fashion-MNIST catalogue sheets (target
``sheets``) and Animal-MNIST silhouette sheets (target ``animal_sheets``).

Each image is a 2×2 sheet of four Fashion-MNIST items, each tinted one of :data:`TINTS` and drawn
small or large in its cell. The caption names every item with its position and its attributes,
all of which are true of the pixels ("top left: a small red sneaker; top right: ..."), so there
are ~10⁸ possible captions, an anchor almost never meets a same-meaning negative in a batch, and
retrieval R@k measures whether the model reads the sheet.

The pool's noise is realistic and stated (:data:`SHEET_NOISE`): swapped captions (another sheet's),
partly wrong captions (one item's class or tint changed), near-duplicates (a jittered copy of a
clean sheet, same caption) and off-domain pairs (the general set). ``warm`` holds sheets from a
split disjoint from pool, eval and test, captioned *coarsely* (the four items and their colours in
any order; no positions, no sizes) or in the pool's grammar; mixed into pre-training at a few
percent, they give the base model knowledge of the domain, as a web-pretrained CLIP has (the premise
of gradient-based selection). The v2 runner uses the pool's grammar: with coarse captions the
premise check fails (median p_corr below chance against grounded captions).

Splits: pool, eval set and warm-up sheets are built from disjoint parts of the 60k train split;
the test sheets from the 10k test split. Everything depends only on ``seed``.
"""
from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from .common import PairSet, Suite, Target, _concat, _fractions, _jitter, _numbered_keys, _off_domain, _rng
from .fashion import _fashion_raw
from .templates import ANIMAL_NOUNS, FASHION_NOUNS

TINTS = {"red": (1.0, 0.25, 0.2), "green": (0.25, 0.9, 0.3), "blue": (0.3, 0.45, 1.0), "yellow": (1.0, 0.9, 0.2),
         "grey": (0.75, 0.75, 0.75), "purple": (0.7, 0.3, 0.9)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SHEET_NOISE = {"swapped": 0.10, "partly_wrong": 0.10, "near_duplicate": 0.10, "off_domain": 0.20}


@dataclass(frozen=True)
class SheetDomain:
    """What a sheet target is made of: its name (the pair-key prefix and source), the nouns of each item class
    (synonyms; the caption's choice is seeded) and how a coarse (web-like) caption of a sheet begins."""
    source: str
    nouns: tuple
    coarse_prefix: str

    @property
    def n_classes(self) -> int:
        return len(self.nouns)


FASHION_SHEETS = SheetDomain("fashion_sheets", tuple(tuple(n) for n in FASHION_NOUNS), "a catalogue sheet with ")
ANIMAL_SHEETS = SheetDomain("animal_sheets", tuple(tuple(n) for n in ANIMAL_NOUNS), "a sheet of animal silhouettes: ")


def _noise_counts(pool_size: int) -> dict:
    n = {k: int(round(v * pool_size)) for k, v in SHEET_NOISE.items()}
    n["clean"] = pool_size - sum(n.values())
    return n


def _draw_items(idx_pool: np.ndarray, n: int, rng, reuse: bool = False) -> dict:
    """``n`` sheets' items: item indices from ``idx_pool`` (each used once, or with ``reuse`` each used once
    before any is used again), tints and sizes, shape (n, 4)."""
    if 4 * n > len(idx_pool) and not reuse:
        raise ValueError(f"{n} sheets need {4 * n} items; the split has {len(idx_pool)}")
    reps = max(1, -(-4 * n // max(1, len(idx_pool))))
    items = np.concatenate([rng.permutation(idx_pool) for _ in range(reps)])[:4 * n]
    return {"item": items.reshape(n, 4), "tint": rng.integers(len(TINTS), size=(n, 4)),
            "size": rng.integers(len(SIZES), size=(n, 4)), "noun": rng.integers(12, size=(n, 4))}  # synonym choice


def _render(items: dict, x: np.ndarray, res: int) -> np.ndarray:
    """(n, res, res, 3) uint8 sheets: item j of a sheet in cell j, tinted, full cell (large) or 3/4 (small)."""
    n, cell = len(items["item"]), res // 2
    out = np.zeros((n, res, res, 3), np.float32)
    tints = np.array(list(TINTS.values()), np.float32)
    for j in range(4):
        r0, c0 = (j // 2) * cell, (j % 2) * cell
        g = x[items["item"][:, j]].astype(np.float32) / 255.0  # (n, cell, cell) gray, black background
        for s in (0, 1):
            sel = items["size"][:, j] == s
            if not sel.any():
                continue
            patch = g[sel]
            if s == 0:  # small: the item shrunk to 3/4 of the cell, centred
                k = (cell * 3) // 4
                idx = np.linspace(0, cell - 1, k).round().astype(int)
                shrunk = np.zeros_like(patch)
                off = (cell - k) // 2
                shrunk[:, off:off + k, off:off + k] = patch[:, idx][:, :, idx]
                patch = shrunk
            rgb = patch[..., None] * tints[items["tint"][sel, j]][:, None, None, :]
            out[sel, r0:r0 + cell, c0:c0 + cell] = rgb
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def _noun(dom: SheetDomain, c: int, choice: int) -> str:
    noun = dom.nouns[c][choice % len(dom.nouns[c])]
    return "pair of trousers" if noun == "trousers" else noun  # "a large red trousers" is not English


def _caption(dom: SheetDomain, cls: np.ndarray, tint: np.ndarray, size: np.ndarray, noun: np.ndarray) -> str:
    """``"top left: a small red sneaker; top right: ..."``: every word true of the sheet's pixels."""
    names = list(TINTS)
    return "; ".join(f"{POSITIONS[j]}: a {SIZES[size[j]]} {names[tint[j]]} {_noun(dom, cls[j], noun[j])}"
                     for j in range(4))


def _coarse_caption(dom: SheetDomain, cls: np.ndarray, tint: np.ndarray, rng) -> str:
    """What a web caption of a sheet would say: the items and their colours, in any order; no positions, no
    sizes (a base model warmed on these knows the domain coarsely, not the grounded captions)."""
    names = list(TINTS)
    items = [f"a {names[tint[j]]} {_noun(dom, cls[j], 0)}" for j in rng.permutation(4)]
    return dom.coarse_prefix + ", ".join(items[:-1]) + " and " + items[-1]


def _sheets(dom: SheetDomain, x, y, idx_pool, n, seed, tag, res, coarse=False, reuse=False,
            stream="sheets") -> tuple[PairSet, dict]:
    items = _draw_items(idx_pool, n, _rng(seed, stream, tag), reuse=reuse)
    cls = y[items["item"]]
    rc = _rng(seed, stream, tag, "captions")
    caps = [_coarse_caption(dom, cls[i], items["tint"][i], rc) if coarse else
            _caption(dom, cls[i], items["tint"][i], items["size"][i], items["noun"][i]) for i in range(n)]
    ps = PairSet(images=_render(items, x, res), captions=caps, labels=np.full(n, -1), classnames=[],
                 source=np.full(n, dom.source), kind=np.full(n, "clean"),
                 keys=np.array([f"{dom.source}/{tag}/{i:06d}" for i in range(n)]))
    return ps, {**items, "cls": cls}


def _partly_wrong(dom: SheetDomain, cls, tint, size, noun, rng) -> str:
    """The sheet's caption with one item's class or tint changed (everything else word for word)."""
    cls, tint = cls.copy(), tint.copy()
    j = rng.integers(4)
    if rng.random() < 0.5:
        cls[j] = (cls[j] + 1 + rng.integers(dom.n_classes - 1)) % dom.n_classes
    else:
        tint[j] = (tint[j] + 1 + rng.integers(len(TINTS) - 1)) % len(TINTS)
    return _caption(dom, cls, tint, size, noun)


def load_fashion_sheets(general: PairSet, res: int = 32, seed: int = 0, pool_size: int = 8000, eval_size: int = 300,
                        test_size: int = 1000, warm_size: int = 400, warm_captions: str = "coarse") -> Target:
    """Target ``sheets`` from Fashion-MNIST (Debian ``dataset-fashion-mnist``): see :func:`make_sheets`."""
    raw = _fashion_raw(res // 2)
    return make_sheets(*raw["train"], *raw["test"], general, res, seed, pool_size, eval_size, test_size, warm_size,
                       warm_captions)


def load_animal_sheets(general: PairSet, res: int = 32, seed: int = 0, pool_size: int = 4000, eval_size: int = 300,
                       test_size: int = 1000) -> Target:
    """Target ``animal_sheets`` from Animal-MNIST silhouettes (PyPI ``animal-mnist``), built like the fashion sheets.

    Animal-MNIST is also one of the general sources: the base model has seen single silhouettes captioned with
    their class (:func:`~.general.load_general`), which is the coarse knowledge a web CLIP has of a domain, so
    this target needs no warm-up sheets. Its test sheets are built only from the silhouettes the general mix
    holds out; pool and eval sheets from the others (disjoint from each other). With 10k items, the pool and
    the test reuse items across sheets (every item once before any twice); the sheets' tints, sizes, positions
    and companions differ."""
    from .general import _animals_raw, general_holdout

    raw = _animals_raw(res // 2)
    x, y = raw["images"][..., 0], raw["labels"]
    held = general_holdout("animals", len(y), seed)
    return make_sheets(x[~held], y[~held], x[held], y[held], general, res, seed, pool_size, eval_size, test_size,
                       warm_size=0, dom=ANIMAL_SHEETS, reuse=True, name="animal_sheets",
                       splits="pool and eval sheets from disjoint parts of the silhouettes the general mix trains on; "
                              "test sheets from the silhouettes it holds out")


def make_sheets(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, general: PairSet, res: int = 32,
                seed: int = 0, pool_size: int = 8000, eval_size: int = 300, test_size: int = 1000,
                warm_size: int = 400, warm_captions: str = "coarse", dom: SheetDomain = FASHION_SHEETS,
                reuse: bool = False, name: str = "sheets",
                splits: str = "pool, eval and warm-up sheets from disjoint parts of the 60k train split; test from t10k",
                ) -> Target:
    """Sheets of ``(res/2)``-pixel gray items ``x`` with class labels ``y`` (nouns from ``dom``): a noisy pool
    (:data:`SHEET_NOISE`), a clean eval set, a test suite (retrieval) and, in ``recipe["warm"]``, warm-up sheets
    for the base model's pre-training mix (none when ``warm_size`` is 0), captioned ``"coarse"`` (items and colours
    only: the default) or ``"grounded"`` (the pool's caption grammar: a base model that already knows the target
    well). ``recipe["truth"]`` maps each pool sheet's key to its true caption. Without ``reuse`` every train item
    is on one sheet at most; with it, eval and warm-up items are still used once and kept out of the pool, and
    the pool and test sheets reuse their items."""
    if warm_captions not in ("coarse", "grounded"):
        raise ValueError(f"warm_captions={warm_captions!r}: use 'coarse' or 'grounded'")
    stream = "sheets" if dom == FASHION_SHEETS else dom.source  # the fashion target's draws predate the domains
    cnt = _noise_counts(pool_size)
    n_pool_sheets = cnt["clean"] + cnt["swapped"] + cnt["partly_wrong"]
    need = 4 * (eval_size + warm_size) + (1 if reuse else 4 * n_pool_sheets)
    if need > len(ytr):
        raise ValueError(f"pool_size={pool_size}, eval_size={eval_size}, warm_size={warm_size} need {need} distinct "
                         f"train items (4 per sheet; near-duplicates and off-domain pairs need none); there are {len(ytr)}")
    perm = _rng(seed, stream, "split").permutation(len(ytr))
    if reuse:  # eval and warm-up items first, once each; the pool gets the rest
        ev, wm, pl = np.array_split(perm, np.cumsum([4 * eval_size, 4 * warm_size]))
        parts = [pl, ev, wm]
    else:
        parts = np.array_split(perm, np.cumsum([4 * n_pool_sheets, 4 * eval_size, 4 * warm_size]))
    pool_base, meta = _sheets(dom, xtr, ytr, parts[0], n_pool_sheets, seed, "pool", res, reuse=reuse, stream=stream)
    eval_set, eval_meta = _sheets(dom, xtr, ytr, parts[1], eval_size, seed, "eval", res, stream=stream)
    warm, warm_meta = _sheets(dom, xtr, ytr, parts[2], warm_size, seed, "warm", res, coarse=warm_captions == "coarse",
                              stream=stream)
    test, _ = _sheets(dom, xte, yte, np.arange(len(yte)), test_size, seed, "test", res, reuse=reuse, stream=stream)

    order = _rng(seed, stream, "noise").permutation(n_pool_sheets)
    swapped = np.sort(order[cnt["clean"]:cnt["clean"] + cnt["swapped"]])
    wrong = np.sort(order[cnt["clean"] + cnt["swapped"]:])
    truth = dict(zip(pool_base.keys.tolist(), pool_base.captions))
    caps, kind = list(pool_base.captions), pool_base.kind.astype("<U16")
    cycle = _rng(seed, stream, "swap").permutation(swapped)  # each takes the next one's caption: no fixed point
    for a, b in zip(cycle, np.roll(cycle, 1)):
        caps[a] = pool_base.captions[b]
    kind[swapped] = "mismatched"
    rw = _rng(seed, stream, "wrong")
    for i in wrong:
        caps[i] = _partly_wrong(dom, meta["cls"][i], meta["tint"][i], meta["size"][i], meta["noun"][i], rw)
    kind[wrong] = "partly_wrong"
    pool_base.captions, pool_base.kind = caps, kind
    clean = np.flatnonzero(kind == "clean")
    r = _rng(seed, stream, "dup")
    dup = pool_base.subset(r.choice(clean, cnt["near_duplicate"], replace=cnt["near_duplicate"] > len(clean)))
    dup.images, dup.kind = _jitter(dup.images, r), np.full(len(dup), "near_duplicate")
    dup.keys = _numbered_keys(dup.keys, "dup")
    off = _off_domain(general, cnt["off_domain"], res, _rng(seed, stream, "off"), f"offdomain-{name}")
    pool = _concat([p for p in (pool_base, dup, off) if p is not None])
    pool = pool.subset(_rng(seed, stream, "order").permutation(len(pool)))
    recipe = {"seed": seed, "res": res, "items_per_sheet": 4, "tints": list(TINTS), "sizes": list(SIZES),
              "positions": list(POSITIONS), "noise": dict(SHEET_NOISE), "pool_counts": cnt,
              "pool_fractions": _fractions(pool), "pool_size": len(pool), "eval_size": len(eval_set),
              "test_size": len(test), "warm_size": len(warm), "warm_captions": warm_captions, "warm": warm,
              "truth": truth,
              "train_items": {"pool": meta["item"], "eval": eval_meta["item"], "warm": warm_meta["item"]},
              # the four item classes of each pool sheet by key (a near-duplicate's key is its original's + "#dup1")
              "item_classes": dict(zip(pool_base.keys.tolist(), meta["cls"])),
              "distinct_pool_captions": len(set(pool.captions)),
              "splits": splits, "items_reused": reuse, "nouns": [list(n) for n in dom.nouns],
              "swapped": "the caption of another swapped sheet (a derangement)",
              "partly_wrong": "the sheet's own caption with one item's class or tint changed",
              "near_duplicate": "a jittered copy of a clean pool sheet with its caption",
              "off_domain": "random pairs of the general training set"}
    return Target(name=name, pool=pool, eval_set=eval_set, test=Suite(f"{name}_test", test, []), recipe=recipe)
