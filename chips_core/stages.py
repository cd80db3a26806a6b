"""Stage functions over the warehouse: each reads inputs, writes its tables per shard, and returns
counts that reconcile (house style 4). Orchestration (Prefect) wraps these; nothing here imports it."""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import pyarrow as pa

from .ingest import RawRecord
from .validate import Validated, check_batch, validate_records
from .warehouse import SCHEMAS, Warehouse


def known_pairs(wh: Warehouse) -> tuple[dict[str, str], set[tuple[str, str, str]]]:
    """Pair ids already kept (-> a source key), and every (pair_id, source, source_key) already recorded."""
    ps = wh.read("pair_sources", columns=["pair_id", "source", "source_key"]).to_pylist()
    seen = {}
    for r in ps:
        seen.setdefault(r["pair_id"], r["source_key"])
    return seen, {(r["pair_id"], r["source"], r["source_key"]) for r in ps}


def ingest_shard(records: Iterable[RawRecord], wh: Warehouse, run_id: str, shard: str,
                 seen: dict[str, str] | None = None, recorded: set | None = None, chunk: int = 2048,
                 docs_dir: str | None = None) -> dict:
    """Validate a stream of records chunk by chunk and write this shard's parts of ``pairs``,
    ``pair_sources`` and ``quarantine``. Rows already recorded under the same source key are
    ``unchanged`` (re-ingesting the same data is a no-op): read = kept + quarantined + unchanged."""
    if seen is None or recorded is None:
        seen, recorded = known_pairs(wh)
    parts = Validated([], [], [], 0)
    unchanged = 0
    it = iter(records)
    while batch := list(itertools.islice(it, chunk)):
        v = validate_records(batch, run_id, seen)
        parts.read += v.read
        for row in v.pairs:
            parts.pairs.append(row)
        parts.quarantine.extend(v.quarantine)
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


def scores_table(pair_ids, scores: dict, run_id: str) -> pa.Table:
    """One row per pair of a scoring run; ``utility`` is the CHIPS score, ``rank`` 1 = best (ties by pair id)."""
    import numpy as np

    from .score import select_top

    order = select_top(scores["chips"], pair_ids, 1.0)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    cols = {"pair_id": list(pair_ids), "run_id": [run_id] * len(pair_ids)}
    cols.update({name: np.asarray(scores[name], dtype=np.float64) for name in SCHEMAS["scores"].names
                 if name in scores})
    cols["utility"] = np.asarray(scores["chips"], dtype=np.float64)
    cols["rank"] = rank
    return pa.table(cols, schema=SCHEMAS["scores"])


def subsets_table(pair_ids, scores: dict, budgets, methods, run_id: str, score_run_id: str) -> pa.Table:
    """One row per selected pair per (method, budget); subset ids name both."""
    from .score import select_top

    rows = []
    for method in methods:
        for budget in budgets:
            keep = select_top(scores[method], pair_ids, budget)
            sid = f"{score_run_id}:{method}@{budget:g}"
            rows += [{"subset_id": sid, "run_id": run_id, "score_run_id": score_run_id, "budget": float(budget),
                      "method": method, "pair_id": pair_ids[i], "rank": r + 1} for r, i in enumerate(keep)]
    return pa.Table.from_pylist(rows, schema=SCHEMAS["subsets"])


# ---------------------------------------------------------------------------------------------
# The ingest stage over configured sources

READERS = ("webdataset", "parquet", "csv", "folder")


@dataclass(frozen=True)
class SourceSpec:
    """One input source. Every file (or folder) in ``paths`` is one shard."""

    name: str  # recorded as pairs.source
    kind: str  # one of READERS
    paths: tuple[str, ...]  # local paths or fsspec URLs
    caption_col: str = "caption"  # parquet: caption column
    image_col: str | None = "image"  # parquet: image-bytes column
    path_col: str | None = None  # parquet: image-path column (instead of image_col)
    filepath_col: str = "filepath"  # csv: open_clip_train's columns
    title_col: str = "title"
    sep: str | None = None  # csv: None = by extension (.tsv -> tab)
    allowed_roots: tuple[str, ...] | None = None  # image paths must resolve inside these

    def __post_init__(self):
        if self.kind not in READERS:
            raise ValueError(f"SourceSpec {self.name!r}: kind={self.kind!r} is not one of {READERS}")


def open_shard(spec: SourceSpec, path: str):
    from .ingest import read_csv, read_image_folder, read_parquet, read_webdataset

    roots = list(spec.allowed_roots) if spec.allowed_roots else None
    if spec.kind == "webdataset":
        return read_webdataset(path, spec.name)
    if spec.kind == "parquet":
        return read_parquet(path, spec.name, spec.caption_col, spec.image_col, spec.path_col, roots)
    if spec.kind == "csv":
        return read_csv(path, spec.name, spec.filepath_col, spec.title_col, spec.sep, roots)
    return read_image_folder(path, spec.name)


def shard_name(spec: SourceSpec, path: str) -> str:
    import hashlib

    return f"{spec.name}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def input_fingerprint(path: str) -> str:
    """sha256 of a local file; size and modification time (or ETag) of a folder or remote object."""
    import os

    import fsspec

    from .provenance import fingerprint

    if "://" not in path and os.path.isfile(path):
        return "sha256:" + fingerprint(path)
    fs, p = fsspec.core.url_to_fs(path)
    info = fs.info(p)
    return f"{info.get('type')}:{info.get('size')}:{info.get('ETag') or info.get('mtime') or ''}"


def run_ingest(sources: Sequence[SourceSpec], wh: Warehouse, run_id: str | None = None,
               parent_run_id: str | None = None, progress: bool = False) -> dict:
    """Ingest every shard of every source into the warehouse, recording one ``runs`` row.
    Shards already written under this ``run_id`` are skipped (resume at shard granularity)."""
    from .provenance import new_run_id, recorded_run

    run_id = run_id or new_run_id("ingest")
    shards = [(spec, p) for spec in sources for p in spec.paths]
    inputs = {f"{spec.name}:{p}": input_fingerprint(p) for spec, p in shards}
    totals = {"read": 0, "kept": 0, "quarantined": 0, "unchanged": 0}
    docs = _DataDocs(wh)
    with wh.lock("ingest"), recorded_run(wh, "ingest", {"sources": [dataclasses.asdict(s) for s in sources]},
                                         run_id=run_id, parent_run_id=parent_run_id, inputs=inputs) as row, docs:
        seen, recorded = known_pairs(wh)
        bar = _progress(shards, progress, "ingest")
        for spec, path in bar:
            name = shard_name(spec, path)
            if wh.has_part("pairs", {"run": run_id}, name):
                counts = _written_counts(wh, run_id, name)
            else:
                counts = ingest_shard(open_shard(spec, path), wh, run_id, name, seen, recorded, docs_dir=docs.local)
            for k in totals:
                totals[k] += counts[k]
        row.update(rows_in=totals["read"], rows_out=totals["kept"], rows_quarantined=totals["quarantined"],
                   rows_unchanged=totals["unchanged"])
    return {"run_id": run_id, **totals}


class _DataDocs:
    """GX Data Docs beside the warehouse (``<warehouse>/data_docs/index.html``): rendered in place for a
    local warehouse, rendered to a temporary folder and uploaded for a remote one."""

    def __init__(self, wh: Warehouse):
        import posixpath
        import tempfile

        self.wh, self.target = wh, posixpath.join(wh.root, "data_docs")
        local = "file" in (wh.fs.protocol if isinstance(wh.fs.protocol, tuple) else (wh.fs.protocol,))
        self._tmp = None if local else tempfile.TemporaryDirectory(prefix="chips-docs-")
        self.local = self.target if local else self._tmp.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._tmp is not None:
            self.wh.fs.put(self._tmp.name + "/", self.target, recursive=True)
            self._tmp.cleanup()
        return False


def _written_counts(wh: Warehouse, run_id: str, shard: str) -> dict:
    return json.loads(wh.part_metadata("pairs", {"run": run_id}, shard)["chips.counts"])


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="shard")


# ---------------------------------------------------------------------------------------------
# Features (pair x featurization run)

def write_features(wh: Warehouse, features, run_id: str, shard: str) -> str:
    """One shard of a featurization run: float16 vectors, the feature identity in the footer."""
    return wh.write("features", features.to_arrow("float16"), {"run": run_id}, shard)


def read_features(wh: Warehouse, run_id: str):
    """All shards of a featurization run as one :class:`FeatureBatch`, in pair-id order; parts whose
    identity (model checksum, bank id, sketch seed, k) differs raise ``IncompatibleFeaturesError``."""
    import posixpath

    import numpy as np
    import pyarrow.parquet as pq

    from .featurize import FeatureBatch

    parts = sorted(wh.fs.glob(posixpath.join(wh.table_dir("features"), f"run={run_id}", "*.parquet")))
    if not parts:
        raise FileNotFoundError(f"no features for run {run_id!r} in warehouse {wh.url!r}")
    batches = []
    for p in parts:
        with wh.fs.open(p, "rb") as f:
            batches.append(FeatureBatch.from_arrow(pq.read_table(f)))
    out = FeatureBatch.concat(batches)
    order = np.argsort(np.asarray(out.pair_id, dtype=str), kind="stable")
    return FeatureBatch([out.pair_id[i] for i in order], out.x[order], out.y[order], out.g[order],
                        out.p_corr[order], out.margin[order], out.clipscore[order], out.loss[order], out.identity)
