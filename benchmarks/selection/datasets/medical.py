"""Target B: brain MRI (mricron-data templates, AAL atlas region captions), head CT
(invesalius-examples) and pydicom test DICOM frames, split into pool / eval / test by alternating
slice blocks with gaps."""
from __future__ import annotations

import glob
import os
import plistlib
import re
import tarfile
import warnings
import zlib

import numpy as np
from PIL import Image

from .common import (INSTALL_HINT, NOISE, PairSet, Suite, Target, _cached, _concat, _fractions, _gray_to_rgb,
                     _jitter, _mismatch, _need_module, _need_path, _noise_counts, _numbered_keys, _off_domain,
                     _rng)
from .templates import (AAL_WORDS, CT_TEMPLATES, DICOM_TEMPLATES, MACAQUE_TEMPLATES, MED_CLASSES_ALL,
                        MED_POSITION_WORDS, MED_ZS_TEMPLATES, MRI_NOREGION_TEMPLATES, MRI_TEMPLATES, PLANES)

MRICRON_DIR = "/usr/share/mricron/templates"
INV3_PATH = "/usr/share/doc/invesalius-examples/examples/Cranium.inv3"
MED_CANON = 128  # cached slice size (grayscale); images are resized/augmented from it
BLOCK, GAP = 6, 3  # slices per block / gap slices between blocks
ROLE_CYCLE = ("pool", "test", "pool", "eval", "pool", "test")
# human MRIs on/in the MNI space of the AAL atlas: same subject (Colin27), so the split is done
# on world (mm) positions shared by all three
MNI_MRIS = {"ch2": ("ch2.nii.gz", "T1 MRI", False), "ch2bet": ("ch2bet.nii.gz", "T1 MRI", True),
            "ch2better": ("ch2better.nii.gz", "T1 MRI", True)}


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
