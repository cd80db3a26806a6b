"""Shared pieces of the selection datasets: the PairSet / Suite / Target containers, the seeded
generators and the ``.npz`` cache, package checks, image decoding / resizing, caption text helpers,
the noise recipe shared by the two targets and contact sheets."""
from __future__ import annotations

import importlib
import os
import re
import tempfile
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
# contact sheets
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
