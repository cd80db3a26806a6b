"""The materialize stage: the subsets at every (method, budget) as the ``subsets`` table, and per
subset a Parquet manifest and an open_clip_train CSV (``filepath``, ``title``) for the trainer.

:func:`subsets_table` is the in-memory reference (``select_top``); the stage computes the same rows out of
core."""
from __future__ import annotations

import csv
import json
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
                                cfg.duckdb_memory_limit)
        row.update(rows_in=written["scored"], rows_out=written["rows"], rows_quarantined=0,
                   diagnostics_json=json.dumps({"taken_down": written["taken_down"]}))
    return {"run_id": run_id, "subsets": sorted(written["subsets"]), "files": files, "taken_down": written["taken_down"]}


def write_manifests(wh: Warehouse, run_id: str, subset_ids, out: Path, formats,
                    memory_limit: str = MEMORY_LIMIT) -> list[str]:
    """Export each selected image once (``images/<pair_id>.<ext>``) and write per-subset manifests, streamed."""
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
            try:
                for batch in manifest_rows(con, sid, str(out / "images")):
                    for w in writers:
                        w.write(batch)
            finally:
                for w in writers:
                    w.close()
            files += [str(w.path) for w in writers]
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

    def close(self) -> None:
        self.f.close()
