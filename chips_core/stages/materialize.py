"""The materialize stage: the subsets at every (method, budget) as the ``subsets`` table, and per
subset a Parquet manifest and an open_clip_train CSV (``filepath``, ``title``) for the trainer.

:func:`subsets_table` is the in-memory reference (``select_top``); the stage computes the same rows out of
core."""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..platform.provenance import new_run_id, recorded_run, remove_unfinished
from ..platform.selection import MEMORY_LIMIT, export_images, manifest_engine, manifest_rows, write_subsets
from ..platform.warehouse import SCHEMAS, Warehouse
from ..scoring.score import select_top
from .runconfig import RunConfig


def subsets_table(pair_ids, scores: dict, budgets, methods, run_id: str, score_run_id: str,
                  full: bool = False) -> pa.Table:
    """One row per selected pair per (method, budget); subset ids name both. With ``full``, also every pair as
    method ``full`` at budget 1 (ranked in pair-id order)."""
    rows = []
    if full:
        sid = f"{score_run_id}:full@1"
        rows += [{"subset_id": sid, "run_id": run_id, "score_run_id": score_run_id, "budget": 1.0, "method": "full",
                  "pair_id": p, "rank": r + 1} for r, p in enumerate(sorted(pair_ids))]
    for method in methods:
        for budget in budgets:
            keep = select_top(scores[method], pair_ids, budget)
            sid = f"{score_run_id}:{method}@{budget:g}"
            rows += [{"subset_id": sid, "run_id": run_id, "score_run_id": score_run_id, "budget": float(budget),
                      "method": method, "pair_id": pair_ids[i], "rank": r + 1} for r, i in enumerate(keep)]
    return pa.Table.from_pylist(rows, schema=SCHEMAS["subsets"])


def materialize_stage(cfg: RunConfig, wh: Warehouse, score_run_id: str, run_id: str | None = None,
                      parent_run_id: str | None = None) -> dict:
    """Subsets of one scoring run, written to the warehouse and as manifests under ``cfg.outputs.dir``.
    Out of core: DuckDB ranks the run's scores and the subsets and manifests are streamed
    (``platform/selection.py``), equal to :func:`subsets_table` (``select_top``) on any pool that fits memory."""
    run_id = run_id or new_run_id("materialize")
    remove_unfinished(wh)  # the parts of a killed or failed earlier materialize (no reader sees them)
    with recorded_run(wh, "materialize", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"score_run_id": score_run_id}) as row:
        written = write_subsets(wh, score_run_id, cfg.methods, cfg.budgets, run_id, full=cfg.outputs.full,
                                memory_limit=cfg.duckdb_memory_limit, select=cfg.select)
        files = write_manifests(wh, run_id, written["subsets"], Path(cfg.outputs.dir) / run_id, cfg.outputs.formats,
                                cfg.duckdb_memory_limit, cfg.outputs.shard_max_bytes)
        row.update(rows_in=written["scored"], rows_out=written["rows"], rows_quarantined=0,
                   diagnostics_json=json.dumps({"taken_down": written["taken_down"]}))
    return {"run_id": run_id, "subsets": sorted(written["subsets"]), "files": files, "taken_down": written["taken_down"]}


def write_manifests(wh: Warehouse, run_id: str, subset_ids, out: Path, formats,
                    memory_limit: str = MEMORY_LIMIT, shard_max_bytes: int = 1 << 30) -> list[str]:
    """Export each selected image once (``images/<pair_id>.<ext>``) and write per-subset manifests, streamed:
    Parquet, open_clip's CSV, and WebDataset tar shards of at most about ``shard_max_bytes`` each."""
    if not formats:  # the subsets table only (e.g. a trainer that reads pairs from the warehouse)
        return []
    con = manifest_engine(wh, run_id, memory_limit)
    files = []
    try:
        export_images(con, str(out / "images"), wh.images)
        for sid in sorted(subset_ids):
            stem = sid.split(":", 1)[1].replace("@", "_at_")
            writers = []
            if "parquet" in formats:
                writers.append(_ParquetManifest(out / f"{stem}.parquet"))
            if "csv" in formats:
                writers.append(_CsvManifest(out / f"{stem}.csv"))
            if "webdataset" in formats:
                writers.append(_WebDatasetShards(out / "webdataset" / stem, sid, shard_max_bytes))
            try:
                for batch in manifest_rows(con, sid, str(out / "images")):
                    for w in writers:
                        w.write(batch)
            finally:
                for w in writers:
                    w.close()
            files += [str(p) for w in writers for p in w.paths]
    finally:
        con.close()
    return files


class _ParquetManifest:
    SCHEMA = pa.schema([("pair_id", pa.string()), ("rank", pa.int64()), ("filepath", pa.string()), ("title", pa.string())])

    def __init__(self, path: Path):
        self.path = path
        self.w = pq.ParquetWriter(path, self.SCHEMA)

    def write(self, batch: pa.RecordBatch) -> None:
        self.w.write_table(pa.Table.from_batches([batch]).select(self.SCHEMA.names).cast(self.SCHEMA))

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self.w.close()


class _CsvManifest:
    """open_clip_train's CSV: ``filepath``, ``title``."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "w", newline="", encoding="utf-8")
        self.w = csv.writer(self.f)
        self.w.writerow(["filepath", "title"])

    def write(self, batch: pa.RecordBatch) -> None:
        self.w.writerows(zip(batch.column("filepath").to_pylist(), batch.column("title").to_pylist()))

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self.f.close()


class _WebDatasetShards:
    """One subset as WebDataset tar shards (``<stem>/000000.tar``, ...), what open_clip's training reads with
    ``--dataset-type webdataset``: per pair, ``<key>.<ext>`` (the exported image's bytes, streamed from its file),
    ``<key>.txt`` (the caption, UTF-8) and ``<key>.json`` (pair_id, rank, subset_id). The key is the rank, nine
    digits (no dot; tar order is rank order). A shard is closed once it holds ``max_bytes`` of members (so each holds
    at least one pair); member metadata is fixed (mtime 0, owner root), so the same subset writes the same bytes."""

    def __init__(self, folder: Path, subset_id: str, max_bytes: int):
        self.folder, self.subset_id, self.max_bytes = folder, subset_id, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.tar"):  # a rerun's shards replace an earlier attempt's, not add to them
            old.unlink()
        self.paths: list[Path] = []
        self.tar: tarfile.TarFile | None = None
        self.size = 0

    def _member(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "root", "root"
        return info

    def write(self, batch: pa.RecordBatch) -> None:
        cols = (batch.column(c).to_pylist() for c in ("pair_id", "rank", "filepath", "title"))
        for pair_id, rank, path, title in zip(*cols):
            if self.tar is None:
                self.paths.append(self.folder / f"{len(self.paths):06d}.tar")
                self.tar, self.size = tarfile.open(self.paths[-1], "w", format=tarfile.USTAR_FORMAT), 0
            key = f"{rank:09d}"
            ext = os.path.splitext(path)[1].lstrip(".").lower() or "bin"
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                self.tar.addfile(self._member(f"{key}.{ext}", size), f)
            for suffix, data in (("txt", (title or "").encode("utf-8")),
                                 ("json", json.dumps({"pair_id": pair_id, "rank": rank, "subset_id": self.subset_id},
                                                     sort_keys=True).encode("utf-8"))):
                self.tar.addfile(self._member(f"{key}.{suffix}", len(data)), io.BytesIO(data))
                size += len(data)
            self.size += size
            if self.size >= self.max_bytes:
                self.close()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
