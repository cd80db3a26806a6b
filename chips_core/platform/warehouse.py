"""The Parquet warehouse: explicit Arrow schemas, Hive-style partitions, atomic writes (PLATFORM.md).

Any fsspec URL works (a local path, ``s3://``, ``gs://``...). A file is written under a hidden
temporary name that no reader globs (``.<name>.tmp``) and then moved into place, so a reader never
sees half a file. Writing the same part again replaces it whole (a run's own ``runs`` row does this).
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..errors import ChipsError
from ..util import atomic_put, atomic_write
from .images import REFERENCE_COLUMNS, ImageSources


class WarehouseError(ChipsError):
    """The warehouse URL cannot be reached or a table cannot be written/read."""


_STR = pa.string()

SCHEMAS: dict[str, pa.Schema] = {
    # one row per distinct pair (first source seen; every source key lives in pair_sources)
    "pairs": pa.schema([
        pa.field("pair_id", _STR, nullable=False), ("source", _STR), ("source_key", _STR), ("caption", _STR),
        ("image_uri", _STR), ("image_sha256", _STR), ("width", pa.int32()), ("height", pa.int32()),
        ("image_format", _STR), ("image", pa.binary()), ("ingest_run_id", _STR),
        # bytes of the encoded image (null in parts written before it existed); ``image`` is null when the
        # source was ingested by reference (platform/images.py)
        ("image_size", pa.int64())]),
    # one row per (pair, source, source key): duplicates across sources collapse in pairs, not here
    "pair_sources": pa.schema([
        pa.field("pair_id", _STR, nullable=False), ("source", _STR), ("source_key", _STR), ("ingest_run_id", _STR)]),
    # one row per rejected input row
    "quarantine": pa.schema([
        ("source", _STR), ("source_key", _STR), ("reason", _STR), ("detail", _STR), ("run_id", _STR)]),
    # one row per stage run
    "runs": pa.schema([
        pa.field("run_id", _STR, nullable=False), ("parent_run_id", _STR), ("stage", _STR), ("status", _STR),
        ("config_json", _STR), ("config_hash", _STR), ("model_name", _STR), ("model_checksum", _STR),
        ("sketch_seed", pa.int64()), ("sketch_k", pa.int32()), ("bank_id", _STR), ("input_fingerprints", _STR),
        ("rows_in", pa.int64()), ("rows_out", pa.int64()), ("rows_quarantined", pa.int64()),
        ("rows_unchanged", pa.int64()),
        ("diagnostics_json", _STR),  # score and check runs: the premise checks (scoring/premise.py)
        ("code_version", _STR), ("host", _STR), ("started_at", pa.timestamp("us", tz="UTC")),
        ("ended_at", pa.timestamp("us", tz="UTC")),
        # the process that ran it ("<pid>:<its start time in clock ticks since boot>"): a `running` row whose process
        # is gone is marked `abandoned` (platform/provenance.mark_abandoned)
        ("process", _STR)]),
    # one row per pair per scoring run: every factor and baseline score, utility = chips, rank by utility
    "scores": pa.schema([
        pa.field("pair_id", _STR, nullable=False), ("run_id", _STR),
        *[(m, pa.float64()) for m in ("random", "clipscore", "dot", "trak", "chips_align", "chips_align_learn",
                                      "chips", "chips_plus", "w_learn", "w_relevance", "utility")],
        ("rank", pa.int64())]),
    # one row per pair per subset
    "subsets": pa.schema([
        ("subset_id", _STR), ("run_id", _STR), ("score_run_id", _STR), ("budget", pa.float64()), ("method", _STR),
        pa.field("pair_id", _STR, nullable=False), ("rank", pa.int64())]),
    # one row per takedown key per pair it matched (pair_id null: it matched nothing); every listed pair is left
    # out of every later subset and manifest (platform/selection.py)
    "takedowns": pa.schema([
        ("run_id", _STR), ("listed_in", _STR), ("kind", _STR), ("key", _STR), ("pair_id", _STR), ("reason", _STR)]),
    # one row per metric per suite per evaluated model; cpt_run_id / subset_id join it to the selection
    "evals": pa.schema([
        pa.field("run_id", _STR, nullable=False), ("cpt_run_id", _STR), ("subset_id", _STR),
        ("model_checkpoint", _STR), ("model_checksum", _STR), ("suite", _STR), ("metric", _STR),
        ("value", pa.float64()), ("n", pa.int64())]),
}


# rows per Parquet row group of a ``pairs`` part: featurize's shards are whole row groups, so a shard reads
# only its own pairs' bytes (platform/poolscan.py)
PAIRS_ROW_GROUP = 128


def _fs_options(url: str, storage_options: dict | None) -> dict:
    """fsspec options for a warehouse URL: on a remote store, no directory-listing cache unless the caller sets one.
    Other processes (Dask workers, a concurrent stage) write parts under the warehouse; a cached listing would hide
    them (a score stage that listed one of eight features parts scored 12 of 96 pairs)."""
    opts = dict(storage_options or {})
    if "://" in url and not url.startswith("file://"):
        opts.setdefault("use_listings_cache", False)
    return opts


@dataclass
class Warehouse:
    url: str
    storage_options: dict | None = None
    create: bool = True  # False: open an existing warehouse only (read commands never create one)
    # fsspec options per source name, to read images ingested by reference (platform/images.py)
    source_options: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self.images = ImageSources(self.source_options)
        # rows whose image bytes this process read from ``pairs`` (how tests hold featurize to one pass)
        self.image_rows_read: collections.Counter = collections.Counter()
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **_fs_options(self.url, self.storage_options))
            if self.create:
                self.fs.makedirs(self.root, exist_ok=True)
            else:
                has_runs = self.fs.isdir(self.root) and self.fs.exists(self.table_dir("runs"))
        except Exception as e:  # noqa: BLE001 - any backend error means the same thing to the user
            raise WarehouseError(f"cannot open warehouse {self.url!r}: {type(e).__name__}: {e}") from e
        if not self.create and not has_runs:
            what = "does not exist" if not self.fs.exists(self.root) else \
                "is not a directory" if not self.fs.isdir(self.root) else "has no runs table"
            raise WarehouseError(f"not a chips warehouse: {self.url!r} {what} (a warehouse is made by `chips run` "
                                 "or `chips demo`)")

    def table_dir(self, table: str) -> str:
        return posixpath.join(self.root, table)

    def part_path(self, table: str, partition: dict[str, str], name: str) -> str:
        parts = [f"{k}={v}" for k, v in partition.items()]
        return posixpath.join(self.table_dir(table), *parts, f"{name}.parquet")

    def write(self, table: str, data: pa.Table, partition: dict[str, str], name: str,
              metadata: dict[str, str] | None = None, compression: str | dict = "zstd") -> str:
        """Write one part atomically; the table's Arrow schema is enforced (cast, or a named error).
        ``metadata`` goes into the Parquet footer's key-value metadata; ``compression`` is per part, or per
        column (a column left out of the mapping is zstd)."""
        schema = SCHEMAS.get(table)
        if schema is not None:
            data = conform(data, schema, table)
        if metadata:
            data = data.replace_schema_metadata({**(data.schema.metadata or {}), **metadata})
        path = self.part_path(table, partition, name)
        if isinstance(compression, dict):
            compression = {c: compression.get(c, "zstd") for c in data.column_names}
        buf = io.BytesIO()
        pq.write_table(data, buf, compression=compression, row_group_size=PAIRS_ROW_GROUP if table == "pairs" else None)
        self.write_bytes(path, buf.getvalue())
        return path

    @contextlib.contextmanager
    def lock(self, name: str):
        """An exclusive, blocking lock for stages that read-then-write shared state (ingest's
        de-duplication). Local warehouses use ``flock`` on ``<root>/_locks/<name>.lock``; object
        stores have no such primitive, so there the caller must not run two ingests at once."""
        if not self.is_local:
            yield
            return
        path = posixpath.join(self.root, "_locks", f"{name}.lock")
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @property
    def protocol(self) -> str:
        return self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    def url_of(self, path: str) -> str:
        """A path inside the warehouse as a URL other engines (DuckDB, deltalake) open."""
        return path if self.is_local else f"{self.protocol}://{path}"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def write_bytes(self, path: str, data: bytes) -> str:
        """Write one file atomically (see :func:`chips_core.util.atomic_write`); errors name the path."""
        try:
            return atomic_write(path, data, self.fs)
        except Exception as e:  # noqa: BLE001 - any backend error means the same thing to the user
            raise WarehouseError(f"cannot write {path!r} in warehouse {self.url!r}: {e}") from e

    def put_file(self, local_path: str, path: str) -> str:
        """Move a local file into the warehouse atomically (a part written in a stream, too big for memory)."""
        try:
            return atomic_put(local_path, path, self.fs)
        except Exception as e:  # noqa: BLE001 - any backend error means the same thing to the user
            raise WarehouseError(f"cannot write {path!r} in warehouse {self.url!r}: {e}") from e

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()

    def has_part(self, table: str, partition: dict[str, str], name: str) -> bool:
        return self.fs.exists(self.part_path(table, partition, name))

    def part_metadata(self, table: str, partition: dict[str, str], name: str) -> dict[str, str]:
        with self.fs.open(self.part_path(table, partition, name), "rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        return {k.decode(): v.decode() for k, v in meta.items()}

    def read_part(self, table: str, partition: dict[str, str], name: str,
                  columns: list[str] | None = None) -> pa.Table:
        """One part of a table (the columns named, or all)."""
        with self.fs.open(self.part_path(table, partition, name), "rb") as f:
            return pq.read_table(f, columns=columns)

    def read(self, table: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        """Read a whole table (all partitions); an absent table reads as empty with its schema."""
        d = self.table_dir(table)
        if not self.fs.exists(d):
            schema = SCHEMAS[table]
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        ds = self._dataset(table)
        if table == "pairs" and (columns is None or "image" in columns):
            self.image_rows_read["pairs"] += ds.count_rows()  # a filtered scan still reads every row group
        return ds.to_table(columns=columns, filter=filter)

    def _dataset(self, table: str) -> pads.Dataset:
        # pairs parts written before a column was added read it as null (the table's schema, not the first part's)
        schema = SCHEMAS["pairs"].append(pa.field("run", pa.string())) if table == "pairs" else None
        return pads.dataset(self.table_dir(table), filesystem=self.fs, format="parquet", partitioning="hive",
                            exclude_invalid_files=False, schema=schema)

    def scan(self, table: str, columns: list[str], batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """A table's rows in batches (all partitions), only ``columns``; memory of one batch. Not for images."""
        if self.fs.exists(self.table_dir(table)):
            yield from self._dataset(table).to_batches(columns=columns, batch_size=batch_size)

    def parts(self, table: str) -> list[str]:
        """Every Parquet part of ``table`` (all partitions), sorted; none when the table does not exist."""
        d = self.table_dir(table)
        return sorted(self.fs.glob(posixpath.join(d, "**", "*.parquet"))) if self.fs.exists(d) else []

    def read_row_groups(self, path: str, row_groups: Sequence[int], columns: Sequence[str],
                        missing_as_null: pa.Schema | None = None) -> pa.Table:
        """Whole row groups of one part (a featurize shard's rows), only ``columns``. With ``missing_as_null`` (the
        table's schema), a column the part predates reads as nulls of its type."""
        with self.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names) if missing_as_null is not None else set(columns)
            t = pf.read_row_groups(list(row_groups), columns=[c for c in columns if c in have])
        for c in columns:
            if c not in have:
                t = t.append_column(missing_as_null.field(c), pa.nulls(t.num_rows, missing_as_null.field(c).type))
        t = t.select(list(columns))
        if "image" in columns:
            self.image_rows_read[posixpath.basename(posixpath.dirname(posixpath.dirname(path)))] += t.num_rows
        return t

    def read_pairs(self, ids: Sequence[str], columns: Sequence[str] = ("pair_id", "caption", "image"),
                   images: ImageSources | None = None) -> list[dict]:
        """Rows of ``pairs`` for ``ids``, in the order of ``ids``; an id not in the table is a named error.
        Images ingested by reference are read from their sources (through ``images``, default the warehouse's).

        Located, then read: the ``pair_id`` column of every row group finds the ids, and only the row groups
        holding them are read with ``columns`` (a filtered scan of the table would decode every image in it:
        the memory and time of the whole pool for a target set of a thousand pairs)."""
        cols = list(dict.fromkeys(["pair_id", *columns]))
        if "image" in cols:
            cols = list(dict.fromkeys([*cols, *REFERENCE_COLUMNS]))
        keep = list(dict.fromkeys(["pair_id", *columns]))
        want = pa.array(list(dict.fromkeys(ids)), pa.string())
        rows: dict[str, dict] = {}
        for path, groups in self._locate("pairs", want):
            t = self.read_row_groups(path, groups, cols, missing_as_null=SCHEMAS["pairs"])
            t = t.filter(pc.is_in(t.column("pair_id"), want))
            if "image" in cols:
                t = (images or self.images).fill(t)
            rows.update((r["pair_id"], r) for r in t.select(keep).to_pylist())
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"{len(missing)} pair ids not in the warehouse's pairs table, e.g. {missing[:3]}")
        return [rows[i] for i in ids]

    def _locate(self, table: str, ids: pa.Array) -> list[tuple[str, list[int]]]:
        """``(part, row groups)`` of ``table`` whose ``pair_id`` column holds any of ``ids`` (reads that column
        only, one row group at a time)."""
        out = []
        for path in self.parts(table):
            with self.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                groups = [rg for rg in range(pf.num_row_groups)
                          if pc.any(pc.is_in(pf.read_row_group(rg, columns=["pair_id"]).column("pair_id"), ids)).as_py()]
            if groups:
                out.append((path, groups))
        return out


def conform(data: pa.Table, schema: pa.Schema, table: str) -> pa.Table:
    """Select and cast ``data`` to ``schema``; a missing column is a named error, never a silent null."""
    missing = [f.name for f in schema if f.name not in data.column_names]
    if missing:
        raise WarehouseError(f"table {table!r}: missing column(s) {missing} (have {data.column_names})")
    try:
        return data.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise WarehouseError(f"table {table!r}: cannot cast to its schema: {e}") from e
