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
from typing import Iterable, Sequence

import pyarrow as pa

from ..platform.ingeststate import IngestState
from ..platform.provenance import input_fingerprint, interrupted_run, new_run_id, recorded_run
from ..platform.readers import RawRecord, SourceSpec, open_shard, shard_name
from ..platform.validate import Validated, check_batch, validate_records, write_offline_index
from ..platform.warehouse import SCHEMAS, Warehouse
from ..util import progress as progress_bar

log = logging.getLogger("chips")


def known_pairs(wh: Warehouse) -> IngestState:
    """What the warehouse has recorded, on disk (``platform/ingeststate.py``): ``.seen``, pair ids already kept
    (-> a source key), and ``.recorded``, every (pair_id, source, source_key) of ``pair_sources`` and every
    ("quarantine", source, source_key, reason) of ``quarantine``. Close it when done (a context manager)."""
    return IngestState(wh)


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
    parts = Validated([], [], [], 0)
    unchanged = 0
    it = iter(records)
    while batch := list(itertools.islice(it, chunk)):
        v = validate_records(batch, run_id, seen)
        parts.read += v.read
        for row in v.pairs:
            if images == "reference":  # validated (decoded, hashed) above; the bytes stay in the source
                row["image"] = None
            parts.pairs.append(row)
        for q in v.quarantine:  # quarantined before under the same key and reason: unchanged, not a new row
            key = ("quarantine", q["source"], q["source_key"], q["reason"])
            if q["reason"] != "duplicate" and key in recorded:  # (a duplicate has a pair_sources row: below)
                unchanged += 1
                continue
            recorded.add(key)
            parts.quarantine.append(q)
        again = set()  # source keys recorded before: no new quarantine row, no new source row
        for s in v.pair_sources:
            key = (s["pair_id"], s["source"], s["source_key"])
            if key in recorded:
                unchanged += 1
                again.add(s["source_key"])
                continue
            recorded.add(key)
            parts.pair_sources.append(s)
        if again:  # one pass per chunk, not one per unchanged row
            parts.quarantine = [q for q in parts.quarantine
                                if q["source_key"] not in again or q["reason"] != "duplicate"]
    pairs = pa.Table.from_pylist(parts.pairs, schema=SCHEMAS["pairs"])
    check_batch(pairs.drop_columns(["image"]).to_pandas().assign(image=None), parts.read, len(parts.pairs),
                len(parts.quarantine) + unchanged, docs_dir)
    partition = {"run": run_id}
    counts = {"read": parts.read, "kept": len(parts.pairs), "quarantined": len(parts.quarantine), "unchanged": unchanged}
    wh.write("pair_sources", pa.Table.from_pylist(parts.pair_sources, schema=SCHEMAS["pair_sources"]), partition, shard)
    wh.write("quarantine", pa.Table.from_pylist(parts.quarantine, schema=SCHEMAS["quarantine"]), partition, shard)
    # the pairs part goes last and carries the shard's counts: its presence marks the shard complete
    wh.write("pairs", pairs, partition, shard, metadata={"chips.counts": json.dumps(counts)})
    return counts


def ingest_stage(sources: Sequence[SourceSpec], wh: Warehouse, run_id: str | None = None,
                 parent_run_id: str | None = None, progress: bool = False) -> dict:
    """Ingest every shard of every source into the warehouse, recording one ``runs`` row. Returns the run's counts
    (read = kept + quarantined + unchanged), in all and per source (``sources``).
    Shards already written under this ``run_id`` are skipped (resume at shard granularity).
    Shards run one after another under the warehouse's ingest lock: de-duplication reads what the
    shards before wrote."""
    shards = [(spec, p) for spec in sources for p in spec.paths]
    inputs = {f"{spec.name}:{p}": input_fingerprint(p, spec.storage_options) for spec, p in shards}
    config = {"sources": [dataclasses.asdict(s) for s in sources]}
    # a rerun of a command that was killed or stopped here: the same sources with the same fingerprints carry on
    # under the interrupted run's id, so the shards it finished are skipped and the parts end as one run's would
    resumed = interrupted_run(wh, "ingest", config, inputs=inputs) if run_id is None else None
    if resumed:
        log.info("ingest: resuming run %s (%s); its finished shards are kept", *resumed)
    run_id = resumed[0] if resumed else run_id or new_run_id("ingest")
    totals = {"read": 0, "kept": 0, "quarantined": 0, "unchanged": 0}
    by_source = {spec.name: dict(totals) for spec in sources}  # this run's counts per source
    docs = _DataDocs(wh)
    with wh.lock("ingest"), recorded_run(wh, "ingest", config, run_id=run_id, parent_run_id=parent_run_id,
                                         inputs=inputs) as row, docs:
        drop_incomplete_shards(wh)  # before the state is read from what they hold
        with known_pairs(wh) as state:
            for spec, path in progress_bar(shards, enabled=progress, desc="ingest"):
                name = shard_name(spec, path)
                if wh.has_part("pairs", {"run": run_id}, name):
                    counts = _written_counts(wh, run_id, name)
                else:
                    counts = ingest_shard(open_shard(spec, path), wh, run_id, name, state.seen, state.recorded,
                                          docs_dir=docs.local, images=spec.images)
                for k in totals:
                    totals[k] += counts[k]
                    by_source[spec.name][k] += counts[k]
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
    removed = []
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
