"""Images ingested by reference (a source's ``images: reference``): the ``pairs`` row keeps where the bytes
live (``image_uri``: a file path or fsspec URL, a tar member ``tar://<member>::<shard url>``, or a Parquet row
``<file>#row=<n>&column=<name>``), their sha256 and size, but not the bytes. Every reader of image bytes
(featurize's pool scan, materialize's export, CPT, the report) goes through :meth:`ImageSources.fill`, which
reads the bytes back from the source and checks them against the hash taken at ingest.

A file that is missing, unreadable or changed since ingest is a :class:`SourceImageError` naming the pair,
the file and the source; the warehouse is left as it was, so restoring the file (or re-ingesting the
source) and rerunning the same command resumes.
"""
from __future__ import annotations

import hashlib
import tarfile
import threading
from collections import OrderedDict
from typing import Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ChipsError

IMAGE_MODES = ("copy", "reference")
# the columns a reader of ``pairs`` needs beside ``image`` to fill referenced images
REFERENCE_COLUMNS = ("pair_id", "source", "image_uri", "image_sha256")


class SourceImageError(ChipsError, OSError):
    """An image ingested by reference is missing from its source, unreadable, or changed since ingest."""


def parquet_row_uri(path: str, row: int, column: str) -> str:
    """Where a Parquet source's image bytes live: row ``row`` (0-based, over the whole file) of ``column``."""
    return f"{path}#row={row}&column={column}"


def _parse_parquet_row(uri: str) -> tuple[str, int, str] | None:
    path, sep, frag = uri.rpartition("#row=")
    if not sep:
        return None
    row, _, rest = frag.partition("&")
    column = dict(kv.partition("=")[::2] for kv in rest.split("&") if kv).get("column", "image")
    return path, int(row), column


class ImageSources:
    """How to read referenced images: fsspec storage options per source name (a source's
    ``storage_options``); a source not named here is read with fsspec's defaults (environment, config)."""

    def __init__(self, options: Mapping[str, dict | None] | None = None, cached_row_groups: int = 2):
        self.options = {k: dict(v) for k, v in (options or {}).items() if v}
        self._groups: OrderedDict = OrderedDict()  # (source, path, row group, column) -> list of values
        self._starts: dict = {}  # (source, path) -> first row of each row group, and the row count last
        self._cached = cached_row_groups
        self._tars: OrderedDict = OrderedDict()  # (source, shard url) -> {member: (offset, size)}
        self._cached_tars = 8
        self._lock = threading.Lock()
        self.reads = 0  # images read back from their sources by this object (tests count them)

    def __getstate__(self):  # a Dask worker gets the options, not the lock or the cache
        return {"options": self.options, "cached_row_groups": self._cached}

    def __setstate__(self, state):
        self.__init__(state["options"], state["cached_row_groups"])

    def fill(self, table: pa.Table) -> pa.Table:
        """``table`` with every null ``image`` read from its reference and checked against ``image_sha256``.
        Needs :data:`REFERENCE_COLUMNS` beside ``image`` when any image is null; rows with bytes pass as they are."""
        col = table.column("image")
        if col.null_count == 0:
            return table
        missing = [c for c in REFERENCE_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"filling referenced images needs the columns {missing} of pairs")
        images = col.to_pylist()
        rows = {c: table.column(c).to_pylist() for c in REFERENCE_COLUMNS}
        for i, image in enumerate(images):
            if image is None:
                images[i] = self.read(rows["pair_id"][i], rows["source"][i], rows["image_uri"][i],
                                      rows["image_sha256"][i])
        return table.set_column(table.column_names.index("image"), "image", pa.array(images, pa.binary()))

    def read(self, pair_id: str, source: str | None, uri: str | None, sha256: str | None) -> bytes:
        """The bytes of one referenced image, checked against the hash recorded at ingest."""
        where = f"pair {pair_id}: image {uri!r} (source {source!r}, ingested by reference)"
        if not uri:
            raise SourceImageError(f"{where} has neither bytes nor a location in the pairs table")
        try:
            data = self._read_uri(source, uri)
        except SourceImageError:
            raise
        except Exception as e:  # noqa: BLE001 - any backend error means the same thing to the user
            kind = "is missing" if isinstance(e, (FileNotFoundError, KeyError, IndexError)) else "cannot be read"
            raise SourceImageError(f"{where} {kind} ({type(e).__name__}: {e}); restore it or re-ingest the "
                                   "source") from e
        got = hashlib.sha256(data).hexdigest()
        if sha256 and got != sha256:
            raise SourceImageError(f"{where} has changed since ingest: sha256 {got[:16]}… != {sha256[:16]}… "
                                   "recorded; restore the original or re-ingest the source")
        self.reads += 1
        return data

    def _open_kwargs(self, source: str | None, url: str) -> dict:
        opts = self.options.get(source or "")
        if not opts:
            return {}
        if url.startswith("tar://"):  # a chained URL: the options belong to the shard's own protocol
            inner = url.split("::", 1)[1]
            return {fsspec.core.split_protocol(inner)[0] or "file": opts}
        return dict(opts)

    def _read_uri(self, source: str | None, uri: str) -> bytes:
        parsed = _parse_parquet_row(uri)
        if parsed is not None:
            return self._parquet_value(source, *parsed)
        if uri.startswith("tar://"):
            return self._tar_member(source, uri)
        with fsspec.open(uri, "rb", **self._open_kwargs(source, uri)) as f:
            return f.read()

    def _tar_member(self, source: str | None, uri: str) -> bytes:
        """One member of a tar shard: the shard's member index (name -> offset, size; one pass over its headers)
        is kept for the last few shards, and the bytes are read by seek + read on a handle of the reader's own
        (``fsspec.open`` of the chained URL indexed the whole shard again for every member: 0.5 s an image)."""
        member, shard = uri[len("tar://"):].split("::", 1)
        opts = self._open_kwargs(source, uri)
        with self._lock:
            index = self._tars.get((source, shard))
            if index is not None:
                self._tars.move_to_end((source, shard))
        if index is None:
            with fsspec.open(shard, "rb", **opts) as fh:
                try:
                    with tarfile.open(fileobj=fh, mode="r:") as tf:
                        members = [m for m in tf.getmembers() if m.isfile()]
                except tarfile.ReadError:  # a compressed shard: no offsets to seek to, read through it
                    return self._compressed_tar_member(shard, member, opts)
            index = {m.name: (m.offset_data, m.size) for m in members}
            for m in members:  # ingest lower-cases the extension in the URI (readers._wds_key)
                stem, dot, ext = m.name.rpartition(".")
                index.setdefault(f"{stem}{dot}{ext.lower()}", (m.offset_data, m.size))
            with self._lock:
                self._tars[(source, shard)] = index
                while len(self._tars) > self._cached_tars:
                    self._tars.popitem(last=False)
        if member not in index:
            raise FileNotFoundError(f"no member {member!r} in tar shard {shard!r}")
        offset, size = index[member]
        with fsspec.open(shard, "rb", **opts) as fh:
            fh.seek(offset)
            return fh.read(size)

    @staticmethod
    def _compressed_tar_member(shard: str, member: str, opts: dict) -> bytes:
        with fsspec.open(shard, "rb", **opts) as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
            for m in tf:
                stem, dot, ext = m.name.rpartition(".")
                if m.isfile() and member in (m.name, f"{stem}{dot}{ext.lower()}"):
                    return tf.extractfile(m).read()
        raise FileNotFoundError(f"no member {member!r} in tar shard {shard!r}")

    def _parquet_value(self, source: str | None, path: str, row: int, column: str) -> bytes:
        with self._lock:
            starts = self._starts.get((source, path))
            rg = None if starts is None else int(np.searchsorted(starts, row, side="right")) - 1
            key = (source, path, rg, column)
            if key not in self._groups:  # open the file only for a row group not in the cache
                with fsspec.open(path, "rb", **self._open_kwargs(source, path)) as fh:
                    pf = pq.ParquetFile(fh)
                    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
                    starts = self._starts[(source, path)] = np.concatenate([[0], np.cumsum(sizes)])
                    if not 0 <= row < starts[-1]:
                        raise IndexError(f"row {row} is past the end of {path} ({starts[-1]} rows)")
                    rg = int(np.searchsorted(starts, row, side="right")) - 1
                    key = (source, path, rg, column)
                    self._groups[key] = pf.read_row_group(rg, columns=[column]).column(0).to_pylist()
                    while len(self._groups) > self._cached:
                        self._groups.popitem(last=False)
            value = self._groups[key][row - int(starts[rg])]
        if isinstance(value, dict):  # a {bytes, path} struct column
            value = value.get("bytes")
        if value is None:
            raise KeyError(f"row {row} of {path} has no bytes in column {column!r}")
        return value
