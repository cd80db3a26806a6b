"""Out-of-core selection: the top ``ceil(rN)`` pairs per method and budget, computed by DuckDB over a scoring
run's ``scores`` parts and streamed into ``subsets`` parts, so no Python object per pair is ever held.

It is :func:`chips_core.scoring.score.select_top` at any size: scores descending, ties by ascending
``pair_id`` (byte order, which for UTF-8 is the code-point order NumPy sorts by), ``-0.0`` equal to
``0.0``, NaN refused. ``tests/platform/test_selection.py`` holds the two equal, ties included. DuckDB sorts
out of core: it spills to its temp directory beyond ``memory_limit``.
"""
from __future__ import annotations

import contextlib
import math
import os
import posixpath
import shutil
import tempfile
from typing import Iterable, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..scoring.select import SET_METHODS, SelectConfig, partition_of, select_partitions
from .features import feature_parts, load_direction, read_feature_part
from .images import ImageSources
from .query import spill_dir
from .warehouse import SCHEMAS, Warehouse

ROWS_PER_BATCH = 65536
# DuckDB's working memory for the stages' ranking and selection (RunConfig.duckdb_memory_limit); beyond it DuckDB
# spills to disk (its external sort: ranks are numbered in Python, see _numbered). Measured ad hoc on the 1M-pair
# warehouse of benchmarks/scale.py: the score stage's ranking adds about 290 MB of process RSS at 256MB and 200 MB at
# 128MB; 64MB fails (DuckDB cannot pin its sort blocks).
# 128MB since the eighth session: at 256MB a 1M ranking stayed in memory, so the stages' own memory at 1M pairs sat
# ~250 MiB above a 100k run's (docs/benchmarks/scale.md); a 2M ranking takes the same time at either limit.
MEMORY_LIMIT = "128MB"


def engine(wh: Warehouse, memory_limit: str = MEMORY_LIMIT, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for the stages' own (trusted, internal) queries over the warehouse: bounded
    memory, spilling to a temp directory. User SQL goes through ``platform.query.connect`` instead."""
    con = duckdb.connect(":memory:")
    if not wh.is_local:
        con.register_filesystem(wh.fs)
    con.execute("set temp_directory = ?", [spill_dir()])
    con.execute("set memory_limit = ?", [memory_limit])
    con.execute("set preserve_insertion_order = false")
    if threads:
        con.execute(f"set threads = {int(threads)}")
    return con


def parts_glob(wh: Warehouse, table: str, partition: dict[str, str]) -> str:
    parts = [f"{k}={v}" for k, v in partition.items()]
    return wh.url_of(posixpath.join(wh.table_dir(table), *parts, "*.parquet"))


def n_keep(budget: float, n: int) -> int:
    """``ceil(budget * n)``, robust to float error (0.3 * 10 keeps 3), as ``select_top``."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget!r} must lie in (0, 1]")
    return math.ceil(budget * n - 1e-9)


def _scores(con: duckdb.DuckDBPyConnection, wh: Warehouse, score_run_id: str) -> int:
    """``run_scores``: a view over one scoring run's parts, less every pair a takedown list matched (stages/takedown.py).
    Returns how many of the run's pairs were taken down."""
    src = f"read_parquet({_lit(parts_glob(wh, 'scores', {'run': score_run_id}))})"
    down = posixpath.join(wh.table_dir("takedowns"), "*", "*.parquet")
    if not wh.fs.glob(down):
        con.execute(f"create or replace temp view run_scores as select * from {src}")
        return 0
    listed = f"(select pair_id from read_parquet({_lit(wh.url_of(down))}) where pair_id is not null)"
    con.execute(f"create or replace temp view run_scores as select * from {src} where pair_id not in {listed}")
    return con.execute(f"select count(*) from {src} where pair_id in {listed}").fetchall()[0][0]


def unranked_dir(wh: Warehouse, score_run_id: str) -> str:
    """Where the score stage writes its per-shard parts before they are ranked (beside the run's globals)."""
    return wh.path("globals", f"run={score_run_id}", "unranked")


def write_ranked_scores(wh: Warehouse, score_run_id: str, memory_limit: str = MEMORY_LIMIT) -> int:
    """The run's one ``scores`` part from its unranked parts, ``rank`` numbered by utility (ties by
    ``pair_id``) and rows in rank order, streamed; then the unranked parts are removed. Returns the rows."""
    con = engine(wh, memory_limit)
    try:
        src = _lit(wh.url_of(posixpath.join(unranked_dir(wh, score_run_id), "*.parquet")))
        # run_id is one value: added to each batch, not carried through the sort
        cols = ", ".join(f'"{c}"' for c in SCHEMAS["scores"].names if c not in ("rank", "run_id"))
        n = con.execute(f"select count(*) filter (where isnan(utility)) from read_parquet({src})").fetchall()[0][0]
        if n:
            raise ValueError(f"{n} utilities are NaN; refusing to rank them")
        rel = con.sql(f"select {cols} from read_parquet({src}) order by {_order('utility')}")
        run = pa.scalar(score_run_id, pa.string())
        rows = _write_part(wh, "scores", {"run": score_run_id}, "scores", [
            (b.add_column(1, "run_id", pa.repeat(run, b.num_rows)) for b in _numbered(rel))])
    finally:
        con.close()
    wh.fs.rm(unranked_dir(wh, score_run_id), recursive=True)
    return rows


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(name: str) -> str:
    if name not in SCHEMAS["scores"].names:
        raise ValueError(f"method {name!r} is not a column of the scores table ({SCHEMAS['scores'].names})")
    return '"' + name + '"'


def count_scored(con: duckdb.DuckDBPyConnection, methods: Sequence[str]) -> int:
    """Pairs in the run; a method with NaN scores is refused as ``select_top`` refuses it."""
    cols = ", ".join(f"count(*) filter (where isnan({_ident(m)}))" for m in methods)
    row = con.execute(f"select count(*){', ' + cols if cols else ''} from run_scores").fetchall()[0]
    for m, bad in zip(methods, row[1:]):
        if bad:
            raise ValueError(f"{bad} scores are NaN; refusing to rank them (method {m!r})")
    return int(row[0])


def _order(column: str | None) -> str:
    """The ranking order: ``column`` descending, ties by ascending ``pair_id`` (``None``: pair-id order, the
    ``full`` subset). ``+ 0.0`` turns ``-0.0`` into ``0.0`` so that the two tie, as in NumPy."""
    return "pair_id" if column is None else f"({_ident(column)} + 0.0) desc, pair_id"


def _numbered(rel: duckdb.DuckDBPyRelation, limit: int | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of an ordered relation with ``rank`` (1 first) appended, the first ``limit`` only, streamed.

    Ranks are numbered here rather than by a ``row_number()`` window: an ordered scan is DuckDB's external
    sort, which spills beyond ``memory_limit``, where a window over the whole table (one partition) held it
    in memory (256MB failed at 1M pairs)."""
    start = 1
    for batch in _batches(rel):  # read to the end even past ``limit``: DuckDB wants a result fetched fully
        if limit is not None:
            batch = batch.slice(0, max(0, limit - start + 1))
        if batch.num_rows:
            rank = pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64))
            yield pa.RecordBatch.from_arrays([*batch.columns, rank], names=[*batch.schema.names, "rank"])
            start += batch.num_rows


def ranked(con: duckdb.DuckDBPyConnection, method: str | None, limit: int) -> Iterator[pa.RecordBatch]:
    """``(pair_id, rank)`` of the ``limit`` best pairs by ``method`` (``None``: every pair in pair-id order, the
    ``full`` subset), rank 1 first, streamed."""
    return _numbered(con.sql(f"select pair_id from run_scores order by {_order(method)}"), limit)


def write_subsets(wh: Warehouse, score_run_id: str, methods: Sequence[str], budgets: Sequence[float], run_id: str,
                  full: bool = False, memory_limit: str = MEMORY_LIMIT, select: SelectConfig = SelectConfig()) -> dict:
    """The ``subsets`` parts of one materialize run (one part per method; and ``full@1``), streamed from DuckDB.
    Returns ``{"scored": N, "rows": rows written, "subsets": [ids]}``.

    A per-pair method is sorted once: its best ``ceil(max budget * N)`` pairs go to a local temporary Parquet file
    in rank order, and each budget's rows are a prefix of that file. A set-aware method (``SET_METHODS``) selects
    each budget's set on its own (:func:`set_ranking`): its 10% set need not be a prefix of its 20% set."""
    con = engine(wh, memory_limit)
    candidates = None
    try:
        taken_down = _scores(con, wh, score_run_id)
        n = count_scored(con, [m for m in methods if m not in SET_METHODS])
        rows, ids = 0, []
        plan = ([(None, [1.0])] if full else []) + [(m, sorted(budgets)) for m in methods]
        for method, bs in plan:
            keeps = {b: n_keep(b, n) for b in bs}
            label = method or "full"
            sids = [f"{score_run_id}:{label}@{b:g}" for b in keeps]
            ids += sids
            if method in SET_METHODS:
                candidates = candidates or EligibleGradients.load(con, wh, score_run_id, select)
                for sid, (b, k) in zip(sids, keeps.items()):
                    with _spooled(set_ranking(con, candidates, method, k, select), TOP_SCHEMA) as top:
                        rows += _write_part(wh, "subsets", {"run": run_id}, f"{label}@{b:g}", [
                            _subset_rows(top, k, sid, run_id, score_run_id, b, label)])
                continue
            with _spooled(ranked(con, method, max(keeps.values())), TOP_SCHEMA) as top:
                rows += _write_part(wh, "subsets", {"run": run_id}, label, [
                    _subset_rows(top, k, sid, run_id, score_run_id, b, label)
                    for sid, (b, k) in zip(sids, keeps.items())])
        return {"scored": n, "rows": rows, "subsets": ids, "taken_down": taken_down}
    finally:
        if candidates is not None:
            candidates.close()
        con.close()


TOP_SCHEMA = pa.schema([("pair_id", pa.string()), ("rank", pa.int64())])


class EligibleGradients:
    """The sketched gradients of the pairs in ``chips_plus``'s eligible tier (both gates passed; takedowns left
    out), read once from the score run's featurize run and spooled to local files, one per partition of the
    set-aware selection (``SelectConfig.partition``): memory holds the ids and one partition's gradients, whatever
    the pool's size. Removed by :meth:`close`."""

    def __init__(self, v: np.ndarray, ids: list[list[str]], files: list[str], k: int, folder: str | None):
        self.v, self.ids, self.files, self.k, self.folder = v, ids, files, k, folder

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection, wh: Warehouse, score_run_id: str,
             select: SelectConfig) -> "EligibleGradients":
        v, featurize_run_id = load_direction(wh, score_run_id)
        eligible = con.sql("select pair_id from run_scores where chips_plus >= 2").to_arrow_table().column(0)
        n_parts = max(1, math.ceil(len(eligible) / select.partition))
        folder = tempfile.mkdtemp(prefix="chips-select-", dir=spill_dir())
        files = [os.path.join(folder, f"part-{p:06d}.f16") for p in range(n_parts)]
        ids: list[list[str]] = [[] for _ in range(n_parts)]
        try:
            for path in feature_parts(wh, featurize_run_id):
                part = read_feature_part(wh, path)
                keep = np.flatnonzero(pc.is_in(part.pair_id_array(), value_set=eligible).to_numpy(zero_copy_only=False))
                if not len(keep):
                    continue
                kept = [part.pair_id[i] for i in keep]
                where = partition_of(kept, n_parts, select.seed)
                g = np.ascontiguousarray(part.g[keep], dtype=np.float16)  # as stored: exact
                for p in np.unique(where):
                    rows = np.flatnonzero(where == p)
                    ids[p] += [kept[i] for i in rows]
                    with open(files[p], "ab") as f:
                        f.write(g[rows].tobytes())
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(v, ids, files, len(v), folder)

    def partitions(self) -> list[tuple[list[str], object]]:
        """``(ids, load)`` per partition, for :func:`chips_core.scoring.select.select_partitions`."""
        return [(ids, (lambda f=f: np.fromfile(f, dtype=np.float16).reshape(-1, self.k) if os.path.exists(f)
                       else np.zeros((0, self.k), np.float16))) for ids, f in zip(self.ids, self.files)]

    def close(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def set_ranking(con: duckdb.DuckDBPyConnection, candidates: EligibleGradients, method: str, k: int,
                select: SelectConfig) -> Iterator[pa.RecordBatch]:
    """``(pair_id, rank)`` of a set-aware method's ``k`` pairs: the selector's picks among the eligible pairs in
    its order, then (when it picks fewer, or the tier is smaller than ``k``) ``chips_plus``'s order of the rest."""
    picked = select_partitions(method, candidates.partitions(), candidates.v, k, select)
    yield pa.record_batch([pa.array(picked, pa.string()), pa.array(np.arange(1, len(picked) + 1), pa.int64())],
                          schema=TOP_SCHEMA)
    need, rank, chosen = k - len(picked), len(picked) + 1, set(picked)
    if need <= 0:
        return
    for batch in ranked(con, "chips_plus", k):
        rest = [p for p in batch.column("pair_id").to_pylist() if p not in chosen][:need]
        if rest:
            yield pa.record_batch([pa.array(rest, pa.string()), pa.array(np.arange(rank, rank + len(rest)), pa.int64())],
                                  schema=TOP_SCHEMA)
        need, rank = need - len(rest), rank + len(rest)


@contextlib.contextmanager
def _spooled(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Iterator[str]:
    """``batches`` written to a local temporary Parquet file (its path yielded), removed afterwards."""
    fd, tmp = tempfile.mkstemp(suffix=".parquet", prefix="chips-top-", dir=spill_dir())
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema) as w:
            for batch in batches:
                w.write_batch(batch.cast(schema))
        yield tmp
    finally:
        os.remove(tmp)


def _subset_rows(top: str, k: int, subset_id: str, run_id: str, score_run_id: str, budget: float,
                 method: str) -> Iterator[pa.RecordBatch]:
    """One subset's rows: the first ``k`` rows of the spooled ranking ``top``, streamed."""
    done = 0
    for batch in pq.ParquetFile(top).iter_batches(batch_size=ROWS_PER_BATCH):
        if done >= k:
            break
        batch = batch.slice(0, k - done)
        done += batch.num_rows
        same = [pa.repeat(pa.scalar(v, t), batch.num_rows) for v, t in
                ((subset_id, pa.string()), (run_id, pa.string()), (score_run_id, pa.string()),
                 (float(budget), pa.float64()), (method, pa.string()))]
        yield pa.RecordBatch.from_arrays([*same, batch.column("pair_id"), batch.column("rank")],
                                         names=SCHEMAS["subsets"].names)


def _write_part(wh: Warehouse, table: str, partition: dict[str, str], name: str,
                streams: Sequence[Iterable[pa.RecordBatch]]) -> int:
    """Stream record batches into one part of ``table`` (its Arrow schema enforced), written to a local temp
    file and moved into place atomically."""
    schema = SCHEMAS[table]
    fd, tmp = tempfile.mkstemp(suffix=".parquet", prefix="chips-part-")
    os.close(fd)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=dictionary_columns(schema)) as w:
            for stream in streams:
                for batch in stream:
                    w.write_table(pa.Table.from_batches([batch]).cast(schema))
                    rows += batch.num_rows
        wh.put_file(tmp, wh.part_path(table, partition, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return rows


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The string columns worth a dictionary (run and subset ids, methods: a few values each). Scores and pair
    ids are all distinct: a dictionary for them is built, overflows and is dropped, for nothing (3x slower)."""
    return [f.name for f in schema if pa.types.is_string(f.type) and f.name != "pair_id"]


def _batches(rel: duckdb.DuckDBPyRelation) -> Iterator[pa.RecordBatch]:
    reader = rel.to_arrow_reader(ROWS_PER_BATCH)
    yield from reader


def _pairs(con: duckdb.DuckDBPyConnection, wh: Warehouse) -> None:
    """``all_pairs``: a view over every ``pairs`` part."""
    con.execute("create or replace temp view all_pairs as select * from read_parquet("
                f"{_lit(wh.url_of(posixpath.join(wh.table_dir('pairs'), '**', '*.parquet')))}, "
                "hive_partitioning = false, union_by_name = true)")


def _subsets(con: duckdb.DuckDBPyConnection, wh: Warehouse, run_id: str) -> None:
    con.execute("create or replace temp view run_subsets as select * from read_parquet("
                f"{_lit(parts_glob(wh, 'subsets', {'run': run_id}))})")


EXT_SQL = "case image_format when 'JPEG' then 'jpg' else lower(coalesce(image_format, 'bin')) end"


def manifest_engine(wh: Warehouse, run_id: str, memory_limit: str = MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    """One connection for a materialize run's exports: ``all_pairs`` and ``run_subsets`` set up once."""
    con = engine(wh, memory_limit)
    _pairs(con, wh)
    _subsets(con, wh, run_id)
    return con


def export_images(con: duckdb.DuckDBPyConnection, folder: str, images: ImageSources | None = None) -> int:
    """Every image selected by the run (:func:`manifest_engine`), once, as ``<folder>/<pair_id>.<ext>`` (a file
    already there is kept), streamed from the ``pairs`` table (or, for a source ingested by reference, read from
    the source through ``images`` and hash-checked). Returns the number of images."""
    os.makedirs(folder, exist_ok=True)
    images = images or ImageSources()
    n = 0
    rel = con.sql(f"select pair_id, {EXT_SQL} as ext, image, source, image_uri, image_sha256 from all_pairs "
                  "where pair_id in (select pair_id from run_subsets)")
    for batch in _batches(rel):
        t = pa.Table.from_batches([batch])
        paths = [os.path.join(folder, f"{p}.{e}") for p, e in zip(t.column("pair_id").to_pylist(),
                                                                  t.column("ext").to_pylist())]
        todo = [not os.path.exists(p) for p in paths]
        n += t.num_rows
        t = images.fill(t.filter(pa.array(todo, pa.bool_())))
        for path, image in zip([p for p, d in zip(paths, todo) if d], t.column("image").to_pylist()):
            with open(path, "wb") as f:
                f.write(image)
    return n


def manifest_rows(con: duckdb.DuckDBPyConnection, subset_id: str, folder: str) -> Iterator[pa.RecordBatch]:
    """``(pair_id, rank, filepath, title)`` of one subset in rank order, streamed (``filepath`` is the exported
    image under ``folder``)."""
    prefix = os.path.join(os.path.abspath(folder), "")
    rel = con.sql(f"select s.pair_id, s.rank, {_lit(prefix)} || s.pair_id || '.' || {EXT_SQL} as filepath, "
                  "p.caption as title from run_subsets s join all_pairs p using (pair_id) "
                  f"where s.subset_id = {_lit(subset_id)} order by s.rank")
    yield from _batches(rel)
