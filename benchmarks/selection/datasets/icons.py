"""Target ``icons`` (issue: a third target of a different kind): zero-shot classification of desktop icons.

The images are real icons of eleven freedesktop icon themes that Debian ships as PNG files (:data:`ICON_PACKAGES`:
Adwaita's legacy set, Tango, GNOME 2, MATE and its Menta variant, LXDE's nuoveXT2, KDE's Oxygen, Moka, Paper,
Faenza and elementary-xfce). Each of the :data:`ICON_CLASSES` is a list of icon names per the icon naming spec
(``printer``, ``document-print``, ``audio-volume-high``, ...) whose pictures were checked by eye, less the files
of :data:`ICON_EXCLUDE` that show something else (a cheese wedge for ``cheese``, a drive tray for
``gnome-dev-cdrom``, ...). Every icon gives up to two *sources*: its large design (the smallest size >= 32 px)
and its small design (the 16-24 px pixel art, often drawn anew; ``@small`` in :data:`ICON_EXCLUDE`), each
cropped to its alpha and fitted to ``res`` x ``res`` with its alpha channel (the ``.npz`` cache holds these RGBA
arrays). Files with identical pixels are one source.

A pair is one source drawn in one *variant*, all of it true of the pixels: on one of :data:`BACKGROUNDS`,
``large``, ``medium-sized`` or ``small`` (:data:`SIZES`: the icon's side over the frame's), in colour or grayscale.
Its caption names the class with one of its synonyms (:data:`ICON_NOUNS`) in one of :data:`ICON_TEMPLATES` and
states some of the variant's attributes (:data:`MENTION`): the background (50%), the size (35%), grayscale (60% of
grayscale pairs).

Splits: the sources are grouped (:func:`_groups`) so that near-identical art is never on both sides of a split:
one group holds an icon's two designs, the same name in one theme family (GNOME, MATE and Menta share their art),
identical pixels, and icons of one class and family that differ by less than :data:`NEAR_DUP_MAD` (an emblem on
the same folder, a battery at another level). Per class, whole groups go to the test split (~20% of the class's
sources), the eval split (~10%), the warm-up split (~15%) and the pool (the rest; :func:`_split`). Pairs are
drawn class-balanced from their split's sources, every source once before any twice, each source's variants in a
seeded order (48 variants: no pair repeats another's source and variant up to 48 uses of a source).

The pool's noise (:data:`ICON_NOISE`, the sheets' fractions): ``mismatched`` (the caption of another mismatched
pair of a different class: a derangement), ``partly_wrong`` (the pair's own caption with the class or one
stated attribute, the background or the size, changed), ``near_duplicate`` (a jittered copy of a clean pool
pair with its caption) and ``off_domain`` (pairs of the general set). ``recipe["warm"]`` holds warm-up pairs of
the disjoint warm-up split captioned in the pool's grammar. The test suite's headline metric is zero-shot top-1
over :data:`ICON_CLASSNAMES` with :data:`ICON_ZS_TEMPLATES`. Everything depends only on ``seed``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import zlib

import numpy as np
from PIL import Image

from .common import (PairSet, Suite, Target, _article, _cached, _concat, _fractions, _jitter, _need_path,
                     _numbered_keys, _off_domain, _rng)

ICON_ROOT = "/usr/share/icons"
# theme directory -> Debian package (all PNG themes: no SVG renderer is needed)
ICON_PACKAGES = {"Adwaita": "adwaita-icon-theme", "Tango": "tango-icon-theme", "gnome": "gnome-icon-theme",
                 "mate": "mate-icon-theme", "menta": "mate-icon-theme", "nuoveXT2": "lxde-icon-theme",
                 "oxygen": "oxygen-icon-theme", "Moka": "moka-icon-theme", "Paper": "paper-icon-theme",
                 "Faenza": "faenza-icon-theme", "elementary-xfce": "elementary-xfce-icon-theme"}
# themes whose icons share their art (one group per icon name)
THEME_FAMILY = {"mate": "gnome", "menta": "gnome"}

# class -> icon names whose pictures show the object: a regular expression matched (in full) against the name or
# against ``theme:name``; the entries of ICON_EXCLUDE (``theme:name``, or ``theme:name@small`` for the small design
# only) are dropped. An icon in two classes after the exclusions is dropped.
ICON_CLASSES = {
    "folder": r"folder(-(documents|documents-open|download|music|pictures|images|image|videos|video|templates|"
              r"publicshare|public|remote|open|saved-search|new|home|recent|bookmark|favorites|development|games|html|"
              r"txt|tar|temp|important|locked|visiting|black|blue|brown|cyan|green|grey|magenta|orange|red|violet|"
              r"yellow))?|inode-directory|gtk-directory",
    "battery": r"(gpm-)?(primary-|ups-)?battery(-(full|good|low|caution|empty|missing|charging|charged|discharging|"
               r"\d{3}|(full|good|low|caution|empty|\d{3})-charg(ing|ed)))?",
    "envelope": r"mail-(unread|read|message-new|mark-read|mark-unread|replied|send)|internet-mail|emblem-mail|"
                r"evolution-mail|kmail|email|message",
    "speaker": r"audio-speakers?|audio-volume-(high|medium|low|muted|off)|speaker|player-volume",
    "padlock": r"changes-(allow|prevent)|emblem-readonly|locked|object-(locked|unlocked)|emblem-locked|"
               r"(Faenza|Moka):lock|oxygen:system-lock-screen",
    "magnifying glass": r"edit-find|system-search|kfind|search|Faenza:gtk-zoom-(in|out|100|fit)|"
                        r"oxygen:zoom-(in|out|original)",
    "printer": r"printer(-(network|remote|printing|error|warning|paused|info|laser|inkjet|local|idle|new|ready|"
               r"empty))?|document-print|gnome-dev-printer(-.*)?|printmgr|gtk-print|stock_print",
    "hard drive": r"drive-harddisk(-(system|usb|ieee1394|solidstate|root|encrypted))?|gnome-dev-harddisk(-.*)?",
    "compact disc": r"media-optical(-(cd|dvd|bd|audio|data|mixed-cd|recordable|cd-audio|dvd-r|cd-r))?|media-cdrom|"
                    r"gnome-dev-cdrom(-audio)?|gnome-dev-disc-.*",
    "camera": r"camera-photo|camera|accessories-camera|digikam",
    "computer monitor": r"computer|display|video-display|preferences-desktop-display",
    "floppy disk": r"media-floppy|gnome-dev-floppy|3floppy_unmount|(nuoveXT2|oxygen):document-save(-as)?",
    "trash can": r"user-trash(-full)?|trashcan_(full|empty)|emptytrash|edittrash|trash-(empty|full)",
    "warning sign": r"dialog-warning|emblem-important",
    # appointment-new is a clock in some themes and a calendar in others
    "clock": r"preferences-system-time|alarm-clock|clock|chronometer|appointment-soon|kalarm|"
             r"(Adwaita|Tango|elementary-xfce|gnome|mate|menta|nuoveXT2):appointment-new",
    "terminal window": r"utilities-terminal|gnome-terminal|Terminal|terminator|xterm|utilities-terminal-alt",
    "keyboard": r"input-keyboard|preferences-desktop-keyboard|gnome-dev-keyboard",
    "calendar": r"x-office-calendar|office-calendar|calendar|stock_calendar|evolution-calendar|korganizer|date|"
                r"oxygen:appointment-new",
}
# icons named for a class that show something else (checked by eye on contact sheets of every class)
ICON_EXCLUDE = {
    "folder": "Adwaita:folder-drag-accept Faenza:folder-dropbox Moka:folder-remote "
              "Paper:folder-download@small Paper:folder-music@small Paper:folder-pictures@small "
              "Paper:folder-recent@small Paper:folder-templates@small Paper:folder-videos@small "
              "elementary-xfce:folder-download@small elementary-xfce:folder-home@small "
              "elementary-xfce:folder-images@small elementary-xfce:folder-music@small "
              "elementary-xfce:folder-publicshare@small elementary-xfce:folder-recent@small "
              "elementary-xfce:folder-remote@small elementary-xfce:folder-templates@small "
              "elementary-xfce:folder-video@small",
    "envelope": "Adwaita:mail-send Faenza:internet-mail Faenza:mail-send Faenza:message Paper:mail-read "
                "Paper:mail-unread elementary-xfce:mail-unread elementary-xfce:mail-replied elementary-xfce:mail-send "
                "nuoveXT2:email nuoveXT2:internet-mail nuoveXT2:mail-message-new Faenza:mail-replied@small "
                "elementary-xfce:mail-message-new@small",
    "speaker": "Faenza:audio-volume-high Faenza:audio-volume-low Faenza:audio-volume-medium Faenza:audio-volume-muted "
               "Faenza:audio-volume-off elementary-xfce:audio-volume-high elementary-xfce:audio-volume-low "
               "elementary-xfce:audio-volume-medium elementary-xfce:audio-volume-muted "
               "elementary-xfce:audio-volume-off",  # panel glyphs, faint or blank
    "magnifying glass": "nuoveXT2:edit-find nuoveXT2:kfind nuoveXT2:system-search nuoveXT2:search oxygen:edit-find "
                        "oxygen:kfind",  # binoculars
    "compact disc": "Faenza:gnome-dev-cdrom Faenza:media-optical-copy Tango:gnome-dev-cdrom gnome:gnome-dev-cdrom "
                    "mate:gnome-dev-cdrom menta:gnome-dev-cdrom nuoveXT2:gnome-dev-cdrom-audio",
    "camera": "Paper:digikam Moka:digikam Paper:accessories-camera",
    "computer monitor": "Faenza:preferences-desktop-display Moka:preferences-desktop-display Moka:display "
                        "Paper:preferences-desktop-display Paper:display",
    "trash can": "Moka:emptytrash Moka:user-trash-full Moka:trashcan_empty",
    "warning sign": "Faenza:dialog-warning",
    "keyboard": "Moka:gnome-dev-keyboard",
}
ICON_CLASSNAMES = list(ICON_CLASSES)
# caption nouns per class (a synonym is drawn per caption; the first is the class name)
ICON_NOUNS = {
    "folder": ["folder", "file folder", "directory folder"],
    "battery": ["battery", "battery indicator", "battery level symbol"],
    "envelope": ["envelope", "mail envelope", "letter envelope"],
    "speaker": ["speaker", "loudspeaker", "volume speaker"],
    "padlock": ["padlock", "lock", "security lock"],
    "magnifying glass": ["magnifying glass", "magnifier", "search lens"],
    "printer": ["printer", "desktop printer", "office printer"],
    "hard drive": ["hard drive", "hard disk", "disk drive"],
    "compact disc": ["compact disc", "CD", "optical disc"],
    "camera": ["camera", "photo camera", "digital camera"],
    "computer monitor": ["computer monitor", "monitor", "computer screen"],
    "floppy disk": ["floppy disk", "diskette", "floppy"],
    "trash can": ["trash can", "wastebasket", "rubbish bin"],
    "warning sign": ["warning sign", "exclamation mark", "alert symbol"],
    "clock": ["clock", "clock face", "timepiece"],
    "terminal window": ["terminal window", "command prompt", "console window"],
    "keyboard": ["keyboard", "computer keyboard", "keyboard device"],
    "calendar": ["calendar", "calendar page", "desk calendar"],
}
# {np}: noun phrase with article and adjectives ("a small grayscale printer"); {n}: the noun with adjectives;
# {bg}: "" or " on a black background"
ICON_TEMPLATES = ["{np} icon{bg}", "an icon of {np}{bg}", "desktop icon: {n}{bg}", "a toolbar icon showing {np}{bg}",
                  "{np} symbol from a desktop icon theme{bg}", "the {n} icon{bg}", "a picture of {np}{bg}",
                  "{np}, flat user interface icon{bg}", "icon of {np} for a file manager{bg}", "{n} icon{bg}"]
ICON_ZS_TEMPLATES = ["an icon of the {c}.", "the {c} icon.", "a desktop icon showing the {c}.", "{c} icon."]
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128), "blue": (40, 70, 170),
               "green": (40, 125, 60), "yellow": (235, 200, 50), "red": (190, 40, 40), "purple": (110, 50, 150)}
SIZES = {"large": 0.94, "medium-sized": 0.75, "small": 0.56}  # the icon's side over the frame's
ICON_NOISE = {"mismatched": 0.10, "partly_wrong": 0.10, "near_duplicate": 0.10, "off_domain": 0.20}
MENTION = {"background": 0.5, "size": 0.35, "grayscale": 0.6}  # how often a caption states each attribute
SPLIT_FRACTIONS = {"test": 0.20, "eval": 0.10, "warm": 0.15}  # of each class's sources; the pool has the rest
NEAR_DUP_MAD = 14.0  # mean |difference| (0-255) at 16 px on grey under which two icons are one group
N_VARIANTS = len(BACKGROUNDS) * len(SIZES) * 2


_RAW_VERSION = 2  # bump when _icons_raw's decoding changes (the cache name also hashes the class spec)


def _spec_hash() -> str:
    spec = json.dumps([_RAW_VERSION, ICON_PACKAGES, ICON_CLASSES, ICON_EXCLUDE], sort_keys=True)
    return f"{zlib.crc32(spec.encode()):08x}"


def _need_themes():
    for theme, pkg in ICON_PACKAGES.items():
        _need_path(os.path.join(ICON_ROOT, theme), pkg)


def _scan() -> list[tuple]:
    """(theme, size, name, realpath) of every non-symbolic PNG icon of the themes (a size directory in the path)."""
    rows = []
    for theme in ICON_PACKAGES:
        base = os.path.join(ICON_ROOT, theme)
        for p in sorted(glob.glob(os.path.join(base, "**", "*.png"), recursive=True)):
            rel = os.path.relpath(p, base)
            if "symbolic" in rel or "@2x" in rel or "/animations/" in rel:
                continue
            sizes = [int(x.split("x")[0]) for x in rel.split("/")[:-1] if re.fullmatch(r"\d+(x\d+)?", x)]
            if sizes:
                rows.append((theme, sizes[0], os.path.basename(p)[:-4], os.path.realpath(p)))
    return rows


def _fit_icon(im: Image.Image, res: int) -> np.ndarray:
    """(res, res, 4) uint8 RGBA: the icon cropped to its alpha, padded to a square, resized (premultiplied)."""
    im = im.convert("RGBA")
    bbox = im.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if bbox:
        im = im.crop(bbox)
    w, h = im.size
    side = max(w, h)
    sq = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    sq.paste(im, ((side - w) // 2, (side - h) // 2))
    return np.asarray(sq.convert("RGBa").resize((res, res), Image.LANCZOS).convert("RGBA"))


def _icons_raw(res: int) -> dict:
    """Every source of every class: RGBA at ``res``, class, theme, icon name, design size (cached)."""
    _need_themes()

    def build():
        rows = _scan()
        by_icon: dict[tuple, dict] = {}
        for theme, size, name, path in rows:
            by_icon.setdefault((theme, name), {}).setdefault(size, path)
        excl = {c: set(s.split()) for c, s in ICON_EXCLUDE.items()}

        def matches(theme, name):
            return [c for c, rx in ICON_CLASSES.items()
                    if re.fullmatch(rx, name) or re.fullmatch(rx, f"{theme}:{name}")]

        cand, dropped, seen = [], set(), set()
        for (theme, name), sizes in sorted(by_icon.items()):
            cls = matches(theme, name)
            if len(cls) != 1:
                continue
            large = [s for s in sizes if s >= 32]
            small = [s for s in sizes if 16 <= s <= 24]
            for s, which in ([(min(large), "large")] if large else []) + ([(min(small), "small")] if small else []):
                with Image.open(sizes[s]) as im:
                    a = _fit_icon(im, res)
                h = hashlib.md5(a.tobytes()).hexdigest()
                if {f"{theme}:{name}", f"{theme}:{name}@{which}"} & excl.get(cls[0], set()):
                    dropped.add(h)  # excluded: so are its aliases (other names with the same pixels)
                elif h not in seen and a[..., 3].max() >= 32:  # identical pixels (linked or copied files): one source
                    seen.add(h)
                    cand.append((a, ICON_CLASSNAMES.index(cls[0]), theme, name, s,
                                 os.path.relpath(sizes[s], ICON_ROOT), h))
        cand = [c for c in cand if c[-1] not in dropped]
        return {"rgba": np.stack([c[0] for c in cand]), "cls": np.array([c[1] for c in cand], np.int64),
                "theme": np.array([c[2] for c in cand]), "name": np.array([c[3] for c in cand]),
                "size": np.array([c[4] for c in cand]), "path": np.array([c[5] for c in cand])}

    return _cached(f"icons_r{res}_{_spec_hash()}", build)


def _composite(rgba: np.ndarray, bg, size: str, gray: bool, res: int) -> np.ndarray:
    """One variant of a source: drawn at one of SIZES, centred, on a plain background, in colour or grayscale."""
    im = Image.fromarray(rgba, "RGBA")
    side = max(4, int(round(SIZES[size] * res)))
    im = im.convert("RGBa").resize((side, side), Image.LANCZOS).convert("RGBA")
    a = np.asarray(im).astype(np.float32)
    if gray:
        lum = a[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
        a[..., :3] = lum[..., None]
    canvas = np.empty((res, res, 3), np.float32)
    canvas[:] = np.array(bg, np.float32)
    o = (res - side) // 2
    al = a[..., 3:] / 255.0
    canvas[o:o + side, o:o + side] = a[..., :3] * al + canvas[o:o + side, o:o + side] * (1 - al)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _signature(rgba: np.ndarray) -> np.ndarray:
    im = Image.fromarray(rgba, "RGBA").convert("RGBa").resize((16, 16), Image.BILINEAR).convert("RGBA")
    a = np.asarray(im).astype(np.float32)
    al = a[..., 3:] / 255.0
    return (a[..., :3] * al + 128.0 * (1 - al)).reshape(-1)


def _groups(raw: dict) -> np.ndarray:
    """Group id per source: union of the same (theme family, name), identical pixels (already merged) and
    near-identical art of one class and family (mean |diff| < NEAR_DUP_MAD at 16 px on grey)."""
    n = len(raw["cls"])
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i, j):
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    fam = np.array([THEME_FAMILY.get(t, t) for t in raw["theme"]])
    first: dict[tuple, int] = {}
    for i in range(n):
        k = (fam[i], str(raw["name"][i]))
        union(i, first.setdefault(k, i))
    sig = np.stack([_signature(x) for x in raw["rgba"]])
    for c in np.unique(raw["cls"]):
        for f in np.unique(fam):
            idx = np.flatnonzero((raw["cls"] == c) & (fam == f))
            if len(idx) < 2:
                continue
            d = np.abs(sig[idx, None, :] - sig[None, idx, :]).mean(-1)
            for a, b in zip(*np.nonzero(np.triu(d < NEAR_DUP_MAD, 1))):
                union(idx[a], idx[b])
    roots = np.array([find(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


def _split(raw: dict, groups: np.ndarray, seed: int) -> np.ndarray:
    """Split name per source: per class, whole groups, largest first (ties in a seeded order), each to the split
    furthest below its share of the class's sources (:data:`SPLIT_FRACTIONS`, the pool the rest); a split left
    without a group then takes the smallest group of the split most over its share."""
    names = list(SPLIT_FRACTIONS) + ["pool"]
    share = np.array(list(SPLIT_FRACTIONS.values()) + [1 - sum(SPLIT_FRACTIONS.values())])
    out = np.full(len(groups), "pool", dtype="<U4")
    for c in range(len(ICON_CLASSNAMES)):
        idx = np.flatnonzero(raw["cls"] == c)
        ug, size = np.unique(groups[idx], return_counts=True)
        if len(ug) < len(names):
            raise ValueError(f"class {ICON_CLASSNAMES[c]!r} has {len(ug)} source groups; {len(names)} splits need "
                             f"{len(names)}")
        perm = _rng(seed, "icons", "split", ICON_CLASSNAMES[c]).permutation(len(ug))
        order = perm[np.argsort(-size[perm], kind="stable")]
        target, have = share * len(idx), np.zeros(len(names))
        where = np.empty(len(ug), np.int64)
        for g in order:
            j = int(np.argmax(target - have))
            where[g], have[j] = j, have[j] + size[g]
        for j in range(len(names)):
            if not (where == j).any():
                over = int(np.argmax([(have[k] - target[k]) if (where == k).sum() > 1 else -np.inf
                                      for k in range(len(names))]))
                g = min(np.flatnonzero(where == over), key=lambda g: (size[g], g))
                where[g], have[over], have[j] = j, have[over] - size[g], have[j] + size[g]
        for g, j in enumerate(where):
            out[idx[groups[idx] == ug[g]]] = names[j]
    return out


def _variant(v: int) -> tuple[str, str, bool]:
    b, rest = divmod(v, 2 * len(SIZES))
    s, g = divmod(rest, 2)
    return list(BACKGROUNDS)[b], list(SIZES)[s], bool(g)


def _draw(src_idx_by_class: list[np.ndarray], n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` class-balanced draws (source index, variant index): per class every source once before any twice,
    each source's k-th use taking the k-th variant of its own seeded order (a weighted permutation in which a
    grayscale variant weighs a third of a colour one, so most first uses are in colour)."""
    n_cls = len(src_idx_by_class)
    per = np.full(n_cls, n // n_cls)
    per[rng.permutation(n_cls)[:n - per.sum()]] += 1
    src, var = [], []
    gray_w = np.where(np.arange(N_VARIANTS) % 2 == 1, 1.0, 3.0)
    gray_w /= gray_w.sum()
    for c in range(n_cls):
        pool = src_idx_by_class[c]
        reps = -(-per[c] // len(pool))
        s = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:per[c]]
        uses: dict[int, int] = {}
        orders: dict[int, np.ndarray] = {}
        for i in s:
            if i not in orders:
                orders[i] = rng.choice(N_VARIANTS, N_VARIANTS, replace=False, p=gray_w)
            k = uses.get(i, 0)
            uses[i] = k + 1
            src.append(i)
            var.append(int(orders[i][k % N_VARIANTS]))
    order = rng.permutation(len(src))
    return np.array(src, np.int64)[order], np.array(var, np.int64)[order]


def _caption_meta(n: int, rng) -> dict:
    """What each caption says: template, synonym, and which attributes it mentions."""
    return {"template": rng.integers(len(ICON_TEMPLATES), size=n), "noun": rng.integers(3, size=n),
            "bg": rng.random(n) < MENTION["background"], "size": rng.random(n) < MENTION["size"],
            "gray": rng.random(n) < MENTION["grayscale"]}


def _caption(cls: int, bg: str, size: str, gray: bool, template: int, noun: int, say_bg: bool, say_size: bool,
             say_gray: bool) -> str:
    """The caption of one pair: every word true of the pixels (background, size, grayscale) or of the class."""
    cname = ICON_CLASSNAMES[cls]
    words = ([size] if say_size else []) + (["grayscale"] if gray and say_gray else [])
    n = " ".join(words + [ICON_NOUNS[cname][noun % len(ICON_NOUNS[cname])]])
    np_ = f"{_article(n)} {n}"
    return ICON_TEMPLATES[template].format(np=np_, n=n, bg=f" on a {bg} background" if say_bg else "")


def _pairs(raw: dict, src: np.ndarray, var: np.ndarray, meta: dict, res: int, split: str) -> PairSet:
    images, caps, keys = [], [], []
    seen: dict[str, int] = {}
    for j, (i, v) in enumerate(zip(src, var)):
        bg, size, gray = _variant(int(v))
        images.append(_composite(raw["rgba"][i], BACKGROUNDS[bg], size, gray, res))
        caps.append(_caption(int(raw["cls"][i]), bg, size, gray, int(meta["template"][j]), int(meta["noun"][j]),
                             bool(meta["bg"][j]), bool(meta["size"][j]), bool(meta["gray"][j])))
        k = f"icons/{split}/{raw['path'][i][:-4]}|{bg}-{size}{'-gray' if gray else ''}"
        c = seen.get(k, 0)
        seen[k] = c + 1
        keys.append(k + (f"#r{c}" if c else ""))
    n = len(src)
    return PairSet(images=np.stack(images) if n else np.zeros((0, res, res, 3), np.uint8), captions=caps,
                   labels=raw["cls"][src], classnames=list(ICON_CLASSNAMES), source=np.full(n, "icons"),
                   kind=np.full(n, "clean"), keys=np.array(keys))


def source_of(key: str) -> str:
    """The source image (theme-relative icon path without ``.png``) of a pair key of this target."""
    return str(key).split("/", 2)[2].split("|", 1)[0]


def _noise_counts(pool_size: int) -> dict:
    n = {k: int(round(v * pool_size)) for k, v in ICON_NOISE.items()}
    n["clean"] = pool_size - sum(n.values())
    return n


def _derangement_by_class(cls: np.ndarray, rng) -> np.ndarray:
    """donor[i] != i with cls[donor[i]] != cls[i] (when no class holds more than half of the items): items sorted
    by class in a random order, each taking the caption of the item ``max class count`` places further on."""
    n = len(cls)
    if n < 2:
        return np.arange(n)
    order = rng.permutation(n)
    order = order[np.argsort(cls[order], kind="stable")]
    shift = int(np.bincount(cls).max())
    if shift * 2 > n:
        raise ValueError("one class holds more than half of the mismatched pairs")
    donor = np.empty(n, np.int64)
    donor[order] = order[(np.arange(n) + shift) % n]
    return donor


def load_icons(general: PairSet, res: int = 32, seed: int = 0, pool_size: int = 8000, eval_size: int = 300,
               test_size: int = 1000, warm_size: int = 1200) -> Target:
    """Target ``icons``: desktop icons of eleven Debian icon themes in 18 classes (see the module's text): a noisy
    pool (:data:`ICON_NOISE`), a clean labelled eval set, a test suite for zero-shot top-1 (classnames and
    :data:`ICON_ZS_TEMPLATES`) and, in ``recipe["warm"]``, warm-up pairs from a disjoint split in the pool's
    caption grammar. ``recipe["truth"]`` maps each pool pair's key (a near-duplicate's is its original's +
    ``#dup1``) to its true caption, ``recipe["caption_classes"]`` to the class its caption names,
    ``recipe["source_items"]`` lists each split's sources (:func:`source_of` a key) and ``recipe["source_groups"]``
    maps every source to its group."""
    raw = _icons_raw(res)
    groups = _groups(raw)
    split = _split(raw, groups, seed)
    n_cls = len(ICON_CLASSNAMES)
    by = {s: [np.flatnonzero((split == s) & (raw["cls"] == c)) for c in range(n_cls)]
          for s in ("pool", "eval", "warm", "test")}
    cnt = _noise_counts(pool_size)
    n_base = cnt["clean"] + cnt["mismatched"] + cnt["partly_wrong"]

    def build(s: str, n: int, tag: str) -> tuple[PairSet, np.ndarray, np.ndarray, dict]:
        src, var = _draw(by[s], n, _rng(seed, "icons", "draw", tag))
        meta = _caption_meta(n, _rng(seed, "icons", "captions", tag))
        return _pairs(raw, src, var, meta, res, s), src, var, meta

    pool_base, psrc, pvar, pmeta = build("pool", n_base, "pool")
    eval_set = build("eval", eval_size, "eval")[0]
    warm = build("warm", warm_size, "warm")[0]
    test = build("test", test_size, "test")[0]

    order = _rng(seed, "icons", "noise").permutation(n_base)
    mis = np.sort(order[cnt["clean"]:cnt["clean"] + cnt["mismatched"]])
    wrong = np.sort(order[cnt["clean"] + cnt["mismatched"]:])
    truth = dict(zip(pool_base.keys.tolist(), pool_base.captions))
    caps, kind = list(pool_base.captions), pool_base.kind.astype("<U16")
    named = pool_base.labels.copy()  # the class each caption names
    donor = _derangement_by_class(pool_base.labels[mis], _rng(seed, "icons", "mismatch"))
    for a, b in zip(mis, mis[donor]):
        caps[a], named[a] = pool_base.captions[b], pool_base.labels[b]
    kind[mis] = "mismatched"
    rw = _rng(seed, "icons", "wrong")
    changed = {}
    for i in wrong:
        bg, size, gray = _variant(int(pvar[i]))
        c = int(pool_base.labels[i])
        say_bg, say_size = bool(pmeta["bg"][i]), bool(pmeta["size"][i])
        options = ["class"] * 2 + (["background"] if say_bg else []) + (["size"] if say_size else [])
        what = options[rw.integers(len(options))] if len(options) > 2 else "class"
        if what == "class":
            c = (c + 1 + rw.integers(n_cls - 1)) % n_cls
        elif what == "background":
            names = list(BACKGROUNDS)
            bg = names[(names.index(bg) + 1 + rw.integers(len(names) - 1)) % len(names)]
        else:
            names = list(SIZES)
            size = names[(names.index(size) + 1 + rw.integers(len(names) - 1)) % len(names)]
        caps[i] = _caption(c, bg, size, gray, int(pmeta["template"][i]), int(pmeta["noun"][i]), say_bg, say_size,
                           bool(pmeta["gray"][i]))
        changed[str(pool_base.keys[i])], named[i] = what, c
    kind[wrong] = "partly_wrong"
    pool_base.captions, pool_base.kind = caps, kind
    clean = np.flatnonzero(kind == "clean")
    r = _rng(seed, "icons", "dup")
    dup = pool_base.subset(r.choice(clean, cnt["near_duplicate"], replace=cnt["near_duplicate"] > len(clean)))
    dup.images, dup.kind = _jitter(dup.images, r), np.full(len(dup), "near_duplicate")
    dup.keys = _numbered_keys(dup.keys, "dup")
    off = _off_domain(general, cnt["off_domain"], res, _rng(seed, "icons", "off"), "offdomain-icons")
    pool = _concat([p for p in (pool_base, dup, off) if p is not None], classnames=list(ICON_CLASSNAMES))
    pool = pool.subset(_rng(seed, "icons", "order").permutation(len(pool)))

    sources = {s: sorted({source_of(k) for k in ps.keys}) for s, ps in
               (("pool", pool_base), ("eval", eval_set), ("warm", warm), ("test", test))}
    per_class = {s: {ICON_CLASSNAMES[c]: int(len(by[s][c])) for c in range(n_cls)} for s in by}
    recipe = {"seed": seed, "res": res, "noise": dict(ICON_NOISE), "pool_counts": cnt,
              "pool_fractions": _fractions(pool), "pool_size": len(pool), "eval_size": len(eval_set),
              "test_size": len(test), "warm_size": len(warm), "warm": warm, "truth": truth,
              "partly_wrong_changed": changed,
              "classnames": list(ICON_CLASSNAMES), "nouns": {k: list(v) for k, v in ICON_NOUNS.items()},
              "caption_templates": list(ICON_TEMPLATES), "zero_shot_templates": list(ICON_ZS_TEMPLATES),
              "backgrounds": list(BACKGROUNDS), "sizes": dict(SIZES), "mention": dict(MENTION),
              "packages": sorted(set(ICON_PACKAGES.values())), "themes": list(ICON_PACKAGES),
              "caption_classes": dict(zip(pool_base.keys.tolist(), named.tolist())),
              "sources": int(len(raw["cls"])), "groups": int(groups.max() + 1),
              "source_groups": {p[:-4]: int(g) for p, g in zip(raw["path"].tolist(), groups)},
              "sources_per_class_and_split": per_class, "source_items": sources,
              "distinct_pool_captions": len(set(pool.captions)),
              "splits": "per class, groups of near-identical icon sources (same name in one theme family, identical "
                        "pixels, or mean |diff| < %.0f at 16 px) go whole to test (~20%% of the class's sources), "
                        "eval (~10%%), warm-up (~15%%) or the pool (the rest); pairs are drawn class-balanced from "
                        "their split, every source once before any twice, in distinct variants" % NEAR_DUP_MAD,
              "mismatched": "the caption of another mismatched pool pair of a different class (a derangement); "
                            "label keeps the image's true class",
              "partly_wrong": "the pair's own caption with one thing changed, everything else word for word: the "
                              "class, or a background or size the caption states (the class two times in three "
                              "when it states one of them, one in two when both, always when neither)",
              "near_duplicate": "a jittered copy of a clean pool pair with its caption",
              "off_domain": "random pairs of the general training set with their own captions (label -1)"}
    return Target(name="icons", pool=pool, eval_set=eval_set, test=Suite("icons_test", test, list(ICON_ZS_TEMPLATES)),
                  recipe=recipe)
