"""The ingest stage: read every shard of every source, validate it (Great Expectations), and write
``pairs``, ``pair_sources`` and ``quarantine`` per shard, with counts that reconcile
(read = kept + quarantined + unchanged)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import posixpath
import tempfile
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Iterable, Sequence

import pyarrow as pa

from ..platform.ingeststate import IngestState
from ..platform.provenance import input_fingerprint, interrupted_run, new_run_id, recorded_run
from ..platform.readers import RawRecord, SourceSpec, open_shard, shard_name
from ..platform.validate import (Judged, RowFacts, Validated, check_batch, judge_records, mark_duplicates, verdict,
                                 write_offline_index)
from ..platform.warehouse import SCHEMAS, Warehouse
from ..util import progress as progress_bar

if TYPE_CHECKING:
    from .common import MapShards

log = logging.getLogger("chips")


def known_pairs(wh: Warehouse) -> IngestState:
    """What the warehouse has recorded, on disk (``platform/ingeststate.py``): ``.seen``, pair ids already kept
    (-> a source key), and ``.recorded``, every (pair_id, source, source_key) of ``pair_sources`` and every
    ("quarantine", source, source_key, reason) of ``quarantine``. Close it when done (a context manager)."""
    return IngestState(wh)


@dataclass
class Decision:
    """What de-duplication decided for a run of rows (:func:`decide_rows`), by row index: the duplicates (with their
    detail), and the rows recorded before, which get no new quarantine or ``pair_sources`` row (``unchanged``)."""
    duplicates: dict[int, str] = field(default_factory=dict)
    skip_quarantine: set[int] = field(default_factory=set)
    skip_sources: set[int] = field(default_factory=set)
    unchanged: int = 0


def decide_rows(rows: Iterable[tuple[str, str, str | None, str | None]], seen, recorded) -> Decision:
    """De-duplicate rows ``(source, source_key, pair_id, first_reason)`` in input order against ``seen`` and
    ``recorded`` (:func:`known_pairs`; both updated in place). A row's reason is its first verdict (every rule but
    duplicate), else ``duplicate`` when its content was kept before. A quarantine row recorded before under the
    same key and reason, and a source row recorded before (with its duplicate quarantine row) are ``unchanged``:
    re-ingesting the same data is a no-op. This is the only part of ingest that reads other rows: the driver runs it
    in shard order, wherever the shards' facts were computed."""
    rows = list(rows)
    d = Decision(mark_duplicates([(i, pid, key) for i, (_, key, pid, first) in enumerate(rows)
                                  if first is None and pid is not None], seen))
    for i, (source, key, pair_id, first) in enumerate(rows):
        reason = first or ("duplicate" if i in d.duplicates else None)
        if reason is not None and reason != "duplicate":
            if ("quarantine", source, key, reason) in recorded:
                d.unchanged += 1
                d.skip_quarantine.add(i)
            else:
                recorded.add(("quarantine", source, key, reason))
        elif (pair_id, source, key) in recorded:  # kept or duplicate: its source row
            d.unchanged += 1
            d.skip_sources.add(i)
            if reason == "duplicate":
                d.skip_quarantine.add(i)
        else:
            recorded.add((pair_id, source, key))
    return d


def _light(judged: Judged) -> list[tuple[str, str, str | None, str | None]]:
    return [(r.source, r.source_key, f.pair_id, judged.first.get(i))
            for i, (r, f) in enumerate(zip(judged.records, judged.facts))]


def ingest_shard(records: Iterable[RawRecord], wh: Warehouse, run_id: str, shard: str,
                 seen=None, recorded=None, chunk: int = 2048, docs_dir: str | None = None,
                 images: str = "copy") -> dict:
    """Validate a stream of records chunk by chunk and write this shard's parts of ``pairs``,
    ``pair_sources`` and ``quarantine``. Rows already recorded under the same source key are
    ``unchanged`` (re-ingesting the same data is a no-op): read = kept + quarantined + unchanged.
    ``images="reference"`` keeps each image's location, hash and size but not its bytes."""
    if seen is None or recorded is None:
        with known_pairs(wh) as state:
            return ingest_shard(records, wh, run_id, shard, state.seen, state.recorded, chunk, docs_dir, images)
    parts, unchanged = Validated([], [], [], 0), 0
    it = iter(records)
    while batch := list(itertools.islice(it, chunk)):
        judged = judge_records(batch)
        d = decide_rows(_light(judged), seen, recorded)
        _add(parts, verdict(judged, d.duplicates, run_id, d.skip_quarantine, d.skip_sources), images)
        unchanged += d.unchanged
    return _write_shard(wh, run_id, shard, parts, unchanged, docs_dir)


def _add(parts: Validated, v: Validated, images: str) -> None:
    parts.read += v.read
    if images == "reference":  # validated (decoded, hashed); the bytes stay in the source
        for row in v.pairs:
            row["image"] = None
    parts.pairs += v.pairs
    parts.pair_sources += v.pair_sources
    parts.quarantine += v.quarantine


def _write_shard(wh: Warehouse, run_id: str, shard: str, parts: Validated, unchanged: int,
                 docs_dir: str | None) -> dict:
    """The batch rules over the shard, then its three parts; ``pairs`` last, with the counts."""
    pairs = pa.Table.from_pylist(parts.pairs, schema=SCHEMAS["pairs"])
    check_batch(pairs.drop_columns(["image"]).to_pandas().assign(image=None), parts.read, len(parts.pairs),
                len(parts.quarantine) + unchanged, docs_dir)
    partition = {"run": run_id}
    counts = {"read": parts.read, "kept": len(parts.pairs), "quarantined": len(parts.quarantine), "unchanged": unchanged,
              "duplicates": sum(1 for q in parts.quarantine if q["reason"] == "duplicate")}  # of the quarantined
    wh.write("pair_sources", pa.Table.from_pylist(parts.pair_sources, schema=SCHEMAS["pair_sources"]), partition, shard)
    wh.write("quarantine", pa.Table.from_pylist(parts.quarantine, schema=SCHEMAS["quarantine"]), partition, shard)
    # the pairs part goes last and carries the shard's counts: its presence marks the shard complete
    wh.write("pairs", pairs, partition, shard, metadata={"chips.counts": json.dumps(counts)})
    return counts


# Ingest on an executor (Dask): two passes over each shard on the workers, with de-duplication between them on the
# driver, in shard order. Pass 1 writes the shard's facts to a staging part; the driver decides on their light
# columns and writes a decision part; pass 2 reads both, runs the verdict and writes the shard's parts as a local
# ingest would (the same functions on the same rows: the same rows and bytes). Staging is removed as each shard is
# written, and any left by a killed run at the next ingest's start.
STAGED, DECIDED = "_ingest_staging", "_ingest_decisions"
_FACTS = [("read_ok", pa.bool_()), ("caption_utf8", pa.bool_()), ("caption_chars", pa.int64()),
          ("image_decodes", pa.bool_()), ("image_mode", pa.string()), ("min_side", pa.int64()), ("width", pa.int64()),
          ("height", pa.int64()), ("image_format", pa.string()), ("pair_id", pa.string()),
          ("image_sha256", pa.string()), ("image_size", pa.int64()), ("caption", pa.string())]
STAGED_SCHEMA = pa.schema([("source", pa.string()), ("source_key", pa.string()), ("image_uri", pa.string()),
                           ("image", pa.binary()), *_FACTS, ("detail", pa.string()), ("first_reason", pa.string())])
DECIDED_SCHEMA = pa.schema([("row", pa.int64()), ("duplicate", pa.string()), ("skip_quarantine", pa.bool_()),
                            ("skip_sources", pa.bool_())])


def stage_shard(wh: Warehouse, run_id: str, n: int, item: tuple[SourceSpec, str], chunk: int = 2048) -> int | None:
    """Pass 1 on a worker: read and judge one shard (decode, hash, the first GX pass), writing every row with its
    facts to the staging part (image bytes only for rows that may be kept, and only when the source copies them).
    Returns the rows read; None for a shard this run already wrote."""
    spec, path = item
    name = shard_name(spec, path)
    if wh.has_part("pairs", {"run": run_id}, name):
        return None
    rows, it = [], iter(open_shard(spec, path))
    while batch := list(itertools.islice(it, chunk)):
        judged = judge_records(batch)
        for i, (rec, f) in enumerate(zip(judged.records, judged.facts)):
            first = judged.first.get(i)
            keep_bytes = first is None and f.pair_id is not None and spec.images == "copy"
            rows.append({"source": rec.source, "source_key": rec.source_key, "image_uri": rec.image_uri,
                         "image": rec.image if keep_bytes else None, **{c: getattr(f, c) for c, _ in _FACTS},
                         "detail": json.dumps(f.detail), "first_reason": first})
    wh.write(STAGED, pa.Table.from_pylist(rows, schema=STAGED_SCHEMA), {"run": run_id}, name)
    return len(rows)


def decide_shard(wh: Warehouse, run_id: str, name: str, seen, recorded) -> None:
    """On the driver, between the passes, in shard order: :func:`decide_rows` over a staged shard's light columns
    (no image, no caption), written as the shard's decision part (only the rows with something decided)."""
    t = wh.read_part(STAGED, {"run": run_id}, name, ["source", "source_key", "pair_id", "first_reason"])
    d = decide_rows(zip(*(t.column(c).to_pylist() for c in t.column_names)), seen, recorded)
    rows = sorted(set(d.duplicates) | d.skip_quarantine | d.skip_sources)
    wh.write(DECIDED, pa.table({"row": rows, "duplicate": [d.duplicates.get(i) for i in rows],
                               "skip_quarantine": [i in d.skip_quarantine for i in rows],
                               "skip_sources": [i in d.skip_sources for i in rows]}, schema=DECIDED_SCHEMA),
             {"run": run_id}, name, metadata={"chips.unchanged": str(d.unchanged)})


def write_staged_shard(wh: Warehouse, run_id: str, n: int, item: tuple[SourceSpec, str], chunk: int = 2048) -> dict:
    """Pass 2 on a worker: the verdict over a staged shard with the driver's decision, and the shard's parts
    (:func:`_write_shard`); then its staging is removed. Returns the shard's counts."""
    spec, path = item
    name = shard_name(spec, path)
    partition = {"run": run_id}
    if wh.has_part("pairs", partition, name):
        return _written_counts(wh, run_id, name)
    staged = wh.read_part(STAGED, partition, name).to_pylist()
    decided = wh.read_part(DECIDED, partition, name)
    unchanged = int(wh.part_metadata(DECIDED, partition, name)["chips.unchanged"])
    d = {r["row"]: r for r in decided.to_pylist()}
    parts = Validated([], [], [], 0)
    for lo in range(0, len(staged), chunk):
        rows = staged[lo:lo + chunk]
        judged = Judged([RawRecord(r["source"], r["source_key"], r["image"], r["image_uri"], r["caption"])
                         for r in rows],
                        [RowFacts(**{c: r[c] for c, _ in _FACTS}, is_duplicate=False, detail=json.loads(r["detail"]))
                         for r in rows],
                        {i: r["first_reason"] for i, r in enumerate(rows) if r["first_reason"] is not None})
        mine = {i - lo: d[i] for i in range(lo, lo + len(rows)) if i in d}
        _add(parts, verdict(judged, {i: x["duplicate"] for i, x in mine.items() if x["duplicate"] is not None},
                            run_id, {i for i, x in mine.items() if x["skip_quarantine"]},
                            {i for i, x in mine.items() if x["skip_sources"]}), spec.images)
    counts = _write_shard(wh, run_id, name, parts, unchanged, None)
    for table in (STAGED, DECIDED):
        wh.fs.rm(wh.part_path(table, partition, name))
    return counts


def ingest_stage(sources: Sequence[SourceSpec], wh: Warehouse, run_id: str | None = None,
                 parent_run_id: str | None = None, progress: bool = False,
                 map_shards: MapShards | None = None) -> dict:
    """Ingest every shard of every source into the warehouse, recording one ``runs`` row. Returns the run's counts
    (read = kept + quarantined + unchanged), in all and per source (``sources``).
    Shards already written under this ``run_id`` are skipped (resume at shard granularity).
    In this process (``map_shards`` None) shards run one after another under the warehouse's ingest lock:
    de-duplication reads what the shards before wrote. With ``map_shards`` (an executor's map, e.g. Dask tasks)
    each shard's reading and judging, then its verdict and writing, run as tasks; de-duplication runs here in
    shard order between the two (:func:`stage_shard`, :func:`decide_shard`, :func:`write_staged_shard`), and the
    parts are the ones a local ingest writes. (GX Data Docs are rendered for a local ingest's batches only.)"""
    shards = [(spec, p) for spec in sources for p in spec.paths]
    inputs = {f"{spec.name}:{p}": input_fingerprint(p, spec.storage_options) for spec, p in shards}
    config = {"sources": [dataclasses.asdict(s) for s in sources]}
    # a rerun of a command that was killed or stopped here: the same sources with the same fingerprints carry on
    # under the interrupted run's id, so the shards it finished are skipped and the parts end as one run's would
    resumed = interrupted_run(wh, "ingest", config, inputs=inputs) if run_id is None else None
    if resumed:
        log.info("ingest: resuming run %s (%s); its finished shards are kept", *resumed)
    run_id = resumed[0] if resumed else run_id or new_run_id("ingest")
    totals = {"read": 0, "kept": 0, "quarantined": 0, "unchanged": 0, "duplicates": 0}
    by_source = {spec.name: dict(totals) for spec in sources}  # this run's counts per source
    docs = _DataDocs(wh)
    with wh.lock("ingest"), recorded_run(wh, "ingest", config, run_id=run_id, parent_run_id=parent_run_id,
                                         inputs=inputs) as row, docs:
        drop_incomplete_shards(wh)  # before the state is read from what they hold
        with known_pairs(wh) as state:
            if map_shards is None:
                counted = (_written_counts(wh, run_id, shard_name(spec, path))
                           if wh.has_part("pairs", {"run": run_id}, shard_name(spec, path)) else
                           ingest_shard(open_shard(spec, path), wh, run_id, shard_name(spec, path), state.seen,
                                        state.recorded, docs_dir=docs.local, images=spec.images)
                           for spec, path in shards)
            else:
                staged = map_shards(partial(stage_shard, wh, run_id), shards)
                for (spec, path), read in progress_bar(zip(shards, staged), enabled=progress, desc="ingest: judge",
                                                       total=len(shards)):
                    if read is not None:  # the shards before it are decided: in shard order, as a local ingest
                        decide_shard(wh, run_id, shard_name(spec, path), state.seen, state.recorded)
                counted = map_shards(partial(write_staged_shard, wh, run_id), shards)
            for (spec, _), counts in progress_bar(zip(shards, counted), enabled=progress, desc="ingest",
                                                  total=len(shards)):
                for k in totals:
                    totals[k] += counts.get(k, 0)  # a shard written before duplicates were counted has none
                    by_source[spec.name][k] += counts.get(k, 0)
            if map_shards is not None:
                _drop_staging(wh)  # every shard written: the emptied folders
        row.update(rows_in=totals["read"], rows_out=totals["kept"], rows_quarantined=totals["quarantined"],
                   rows_unchanged=totals["unchanged"])
    return {"run_id": run_id, **totals, "sources": by_source}


def drop_incomplete_shards(wh: Warehouse) -> list[str]:
    """Remove the ``pair_sources`` and ``quarantine`` parts of shards whose ``pairs`` part (written last, it marks a
    shard complete) is missing: what an ingest killed inside a shard leaves. Left in place, the next ingest would read
    their rows as already recorded and skip the shard's pairs as unchanged. Call it under the ingest lock (no ingest
    is writing). Returns the removed paths."""
    def parts(table: str) -> dict[str, str]:  # "run=<id>/<shard>.parquet" -> path; one listing, not a request per part
        d = wh.table_dir(table)
        found = wh.fs.glob(posixpath.join(d, "*", "*.parquet")) if wh.fs.exists(d) else []
        return {posixpath.relpath(p, d): p for p in found}

    complete = parts("pairs")
    removed = _drop_staging(wh)  # no ingest is running: what a two-pass ingest staged is left from a killed one
    for table in ("pair_sources", "quarantine"):
        d = wh.table_dir(table)
        for rel, path in parts(table).items():
            if rel not in complete:
                wh.fs.rm(path)
                removed.append(path)
        for folder in sorted({posixpath.dirname(p) for p in removed if p.startswith(d + "/")}) + [d]:
            if wh.is_local and wh.fs.exists(folder) and not wh.fs.ls(folder):  # no empty dataset folders left
                wh.fs.rmdir(folder)
    if removed:
        log.warning("ingest: removed %d part(s) of shards a killed ingest left incomplete (no pairs part)",
                    len(removed))
    return removed


def _drop_staging(wh: Warehouse) -> list[str]:
    """Remove the two-pass ingest's staging and decision parts (and their folders); returns the removed files."""
    removed = []
    for staging in (STAGED, DECIDED):
        if wh.fs.exists(wh.table_dir(staging)):
            removed += wh.fs.find(wh.table_dir(staging))
            wh.fs.rm(wh.table_dir(staging), recursive=True)
    return removed


class _DataDocs:
    """GX Data Docs beside the warehouse (``<warehouse>/data_docs/index.html``): rendered in place for a
    local warehouse, rendered to a temporary folder and uploaded for a remote one."""

    def __init__(self, wh: Warehouse):
        self.wh, self.target = wh, wh.path("data_docs")
        self._tmp = None if wh.is_local else tempfile.TemporaryDirectory(prefix="chips-docs-")
        self.local = self.target if wh.is_local else self._tmp.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        write_offline_index(self.local)
        if self._tmp is not None:
            self.wh.fs.put(self._tmp.name + "/", self.target, recursive=True)
            self._tmp.cleanup()
        return False


def _written_counts(wh: Warehouse, run_id: str, shard: str) -> dict:
    return json.loads(wh.part_metadata("pairs", {"run": run_id}, shard)["chips.counts"])
