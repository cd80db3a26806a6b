"""Streaming readers for the pool and target formats users have (PLATFORM.md, "Inputs"), and the
source specification that picks one (:class:`SourceSpec`, :func:`open_shard`).

A new input format is a ``read_<format>`` generator here, a name in :data:`READERS` and a branch in
:func:`open_shard`.

Every reader yields :class:`RawRecord` one at a time (memory bounded by one record), with a
``source_key`` that points back at the raw input. A record that cannot even be read (a missing
image file, a truncated tar member, a caption member without an image) carries ``error`` =
(reason, detail) and is quarantined by :mod:`chips_core.validate`; nothing is dropped silently.
A schema change (a configured column absent) is not a row problem: it raises
:class:`SchemaChangeError` naming the column and the file.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import fsspec
import pyarrow.parquet as pq

from ..errors import ChipsError, check
from .images import IMAGE_MODES, parquet_row_uri
from ..util import relative_to, within_roots

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS = ("txt", "json")


class SchemaChangeError(ChipsError, ValueError):
    """An input file lacks a column (or member kind) the source is configured to read."""


@dataclass
class RawRecord:
    source: str
    source_key: str  # where the row came from: "shard.tar#key", "file.parquet#row=12", "list.csv#line=7"
    image: bytes | None
    image_uri: str | None
    caption: bytes | str | None
    error: tuple[str, str] | None = None  # (reason, detail) when the row could not be read


def _caption_from_json(raw: bytes) -> bytes | str | None:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw  # let validation judge the bytes
    if isinstance(obj, dict):
        for key in ("caption", "text", "title", "txt"):
            if key in obj:
                return obj[key] if isinstance(obj[key], str) else json.dumps(obj[key])
    return None


def _wds_key(name: str) -> tuple[str, str]:
    base = posixpath.basename(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(posixpath.dirname(name), stem), ext.lower()


def read_webdataset(url: str, source: str, storage_options: dict | None = None) -> Iterator[RawRecord]:
    """Samples of a WebDataset tar shard (image + ``.txt``/``.json`` caption), local or any fsspec URL."""
    current, members = None, {}

    def emit(key: str, m: dict) -> RawRecord:
        ref = f"{url}#{key}"
        img_ext = next((e for e in IMAGE_EXTS if e in m), None)
        cap_ext = next((e for e in CAPTION_EXTS if e in m), None)
        cap = None if cap_ext is None else (m[cap_ext] if cap_ext == "txt" else _caption_from_json(m[cap_ext]))
        image = m.get(img_ext) if img_ext else None
        err = None
        if image is None:
            err = ("missing_image", f"sample {key!r} has members {sorted(m)} but no image ({', '.join(IMAGE_EXTS)})")
        elif cap is None:
            err = ("missing_caption", f"sample {key!r} has members {sorted(m)} but no .txt/.json caption")
        uri = f"tar://{key}.{img_ext}::{url}" if img_ext else None
        return RawRecord(source, ref, image, uri, cap, err)

    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _wds_key(member.name)
                    if key != current and current is not None:
                        yield emit(current, members)
                        members = {}
                    current = key
                    members[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            ref = f"{url}#{current}" if current else url
            yield RawRecord(source, ref, None, None, None,
                            ("truncated_shard", f"tar stream ended early after sample {current!r}: {e}"))
            return
    if current is not None:
        yield emit(current, members)


def _read_path(path: str, allowed_roots: Sequence[str]) -> tuple[bytes | None, tuple[str, str] | None]:
    """Read an image file if it lies inside an allowed root; else a (reason, detail)."""
    if "://" not in path:
        real = os.path.realpath(path)
        if not within_roots(path, allowed_roots):
            roots = [os.path.realpath(r) for r in allowed_roots]
            return None, ("path_outside_root", f"{path!r} resolves to {real!r}, outside allowed roots {roots}")
        if not os.path.isfile(real):
            return None, ("missing_image_file", f"no file at {path!r}")
        return Path(real).read_bytes(), None
    try:
        with fsspec.open(path, "rb") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, ("missing_image_file", f"no file at {path!r}")


def read_csv(path: str, source: str, filepath_col: str = "filepath", caption_col: str = "title",
             sep: str | None = None, allowed_roots: Sequence[str] | None = None) -> Iterator[RawRecord]:
    """open_clip_train's CSV/TSV (``filepath``, ``title``); relative paths are relative to the CSV's folder."""
    base = os.path.dirname(os.path.abspath(path))
    roots = list(allowed_roots or [base])
    sep = sep or ("\t" if path.endswith((".tsv", ".tab")) else ",")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=sep)
        for col in (filepath_col, caption_col):
            if col not in (reader.fieldnames or []):
                raise SchemaChangeError(f"{path}: column {col!r} not found (columns: {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            rel = row[filepath_col] or ""
            full = relative_to(rel, base)
            image, err = _read_path(full, roots)
            cap = row[caption_col]
            cap = cap.encode("utf-8", "surrogateescape") if cap is not None else None
            yield RawRecord(source, f"{path}#line={line}", image, full, cap, err)


def read_parquet(path: str, source: str, caption_col: str = "caption", image_col: str | None = "image",
                 path_col: str | None = None, allowed_roots: Sequence[str] | None = None,
                 batch_size: int = 1024, storage_options: dict | None = None) -> Iterator[RawRecord]:
    """Parquet with an image-bytes column (binary, or a ``{bytes, path}`` struct) or an image-path column."""
    with fsspec.open(path, "rb", **(storage_options or {})) as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        img = path_col if path_col else image_col
        for col in (caption_col, img):
            if col not in names:
                raise SchemaChangeError(f"{path}: column {col!r} not found (columns: {names})")
        base = os.path.dirname(os.path.abspath(path)) if "://" not in path else ""
        roots = list(allowed_roots or [base])
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=[caption_col, img]):
            caps, imgs = batch.column(caption_col).to_pylist(), batch.column(img).to_pylist()
            for cap, im in zip(caps, imgs):
                ref = f"{path}#row={row}"
                row += 1
                if path_col:
                    full = relative_to(im or "", base)
                    image, err = _read_path(full, roots)
                    yield RawRecord(source, ref, image, full, cap, err)
                    continue
                if isinstance(im, dict):
                    im = im.get("bytes")
                err = None if im else ("missing_image", f"row {row - 1}: empty image bytes")
                yield RawRecord(source, ref, im, parquet_row_uri(path, row - 1, img), cap, err)


def read_image_folder(root: str, source: str) -> Iterator[RawRecord]:
    """Images with a sidecar caption file of the same stem (``cat.jpg`` + ``cat.txt``)."""
    for dirpath, _, files in sorted(os.walk(root)):
        stems = {}
        for name in sorted(files):
            stem, _, ext = name.rpartition(".")
            stems.setdefault(stem, {})[ext.lower()] = os.path.join(dirpath, name)
        for stem, found in sorted(stems.items()):
            img = next((found[e] for e in IMAGE_EXTS if e in found), None)
            if img is None:
                if "txt" in found:
                    yield RawRecord(source, found["txt"], None, None, None,
                                    ("missing_image", f"caption {found['txt']!r} has no image beside it"))
                continue
            cap_path = found.get("txt")
            cap = Path(cap_path).read_bytes() if cap_path else None
            err = None if cap_path else ("missing_caption", f"image {img!r} has no {stem}.txt beside it")
            yield RawRecord(source, img, Path(img).read_bytes(), img, cap, err)


# ---------------------------------------------------------------------------------------------
# Sources: which reader, which files

READERS = ("webdataset", "parquet", "csv", "folder")


@dataclass(frozen=True)
class SourceSpec:
    """One input source. Every file (or folder) in ``paths`` is one shard."""

    name: str  # recorded as pairs.source
    kind: str  # one of READERS: webdataset (tar shards), parquet, csv (open_clip_train's) or folder
    paths: tuple[str, ...]  # local paths or fsspec URLs
    caption_col: str = "caption"  # parquet: caption column
    image_col: str | None = "image"  # parquet: image-bytes column
    path_col: str | None = None  # parquet: image-path column (instead of image_col)
    filepath_col: str = "filepath"  # csv: open_clip_train's columns
    title_col: str = "title"  # csv: the caption column
    sep: str | None = None  # csv: None = by extension (.tsv -> tab)
    allowed_roots: tuple[str, ...] | None = None  # image paths must resolve inside these
    # copy (default): the warehouse keeps the image bytes, so it stands alone when the source moves or goes;
    # reference: it keeps where they live, their sha256 and size (platform/images.py), and reads them from there
    images: str = "copy"
    # fsspec options for remote paths (credentials, endpoint); never recorded in the runs table
    storage_options: dict | None = field(default=None, hash=False, compare=False, repr=False)

    def __post_init__(self):
        check(self.kind in READERS, f"SourceSpec({self.name})", "kind", self.kind, f"not one of {READERS}")
        check(self.images in IMAGE_MODES, f"SourceSpec({self.name})", "images", self.images,
              f"not one of {IMAGE_MODES}")


def open_shard(spec: SourceSpec, path: str) -> Iterator[RawRecord]:
    """The records of one shard (one file or folder of ``spec.paths``)."""
    roots = list(spec.allowed_roots) if spec.allowed_roots else None
    if spec.kind == "webdataset":
        return read_webdataset(path, spec.name, spec.storage_options)
    if spec.kind == "parquet":
        return read_parquet(path, spec.name, spec.caption_col, spec.image_col, spec.path_col, roots,
                            storage_options=spec.storage_options)
    if spec.kind == "csv":
        return read_csv(path, spec.name, spec.filepath_col, spec.title_col, spec.sep, roots)
    return read_image_folder(path, spec.name)


def shard_name(spec: SourceSpec, path: str) -> str:
    return f"{spec.name}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
