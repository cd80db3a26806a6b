"""The pool in storage order: which rows of the ``pairs`` parts belong to a pool, and shards of whole Parquet
row groups, so that featurize reads every pair's bytes once per run whatever the number of shards.

A pair belongs to the pool when its ``pairs`` row was kept under a pool source, or when ``pair_sources``
records it under a pool source as well (a pair first seen under another source: the few cross-source
duplicates, found by one anti-join in DuckDB and held as a set). The scan reads only the ``pair_id`` and
``source`` columns; a shard then reads its own row groups' bytes (a Dask worker reads only its own shards).
"""
from __future__ import annotations

import hashlib

import posixpath
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .images import REFERENCE_COLUMNS
from .warehouse import Warehouse


@dataclass(frozen=True)
class PoolShard:
    """Row groups of one ``pairs`` part (or rows ``start:stop`` of one, when the shard size is below the row
    group size), and how many of their rows are pool pairs."""

    path: str
    row_groups: tuple[int, ...]
    pairs: int
    start: int = 0
    stop: int | None = None
    digest: str = ""  # sha256 over its pool pairs' ids in storage order: a refresh reuses a shard whose digest is unchanged


def _digest_of(h, ids: list[str]) -> str:
    """``h`` updated with each id and a newline (one update per call: the same bytes)."""
    if ids:
        h.update(("\n".join(ids) + "\n").encode())
    return h.hexdigest()


class PoolScan:
    """The pool of ``sources`` (names) over the warehouse's ``pairs`` parts."""

    def __init__(self, wh: Warehouse, sources: Sequence[str]):
        self.wh, self.sources = wh, sorted(set(sources))
        self.extra = frozenset(self._cross_source_ids())

    def parts(self) -> list[str]:
        return self.wh.parts("pairs")

    def _cross_source_ids(self) -> list[str]:
        """Pool pairs whose ``pairs`` row was kept under a source outside the pool."""
        from .selection import engine  # DuckDB anti-join, out of core

        if not self.wh.fs.exists(self.wh.table_dir("pair_sources")) or not self.parts():
            return []
        con = engine(self.wh)
        try:
            con.execute("create temp table pool_sources as select unnest(?::varchar[]) as source", [self.sources])
            # every pair has one ``pairs`` row, so "not kept under a pool source" is "kept under another one": the
            # join's build side is the pairs outside the pool (the target sets, usually), not the whole pool
            return [r[0] for r in con.execute(
                "select distinct ps.pair_id from read_parquet(?, hive_partitioning = false) ps "
                "where ps.source in (select source from pool_sources) and ps.pair_id in ("
                "  select p.pair_id from read_parquet(?, hive_partitioning = false, union_by_name = true) p "
                "  where p.source is null or p.source not in (select source from pool_sources))",
                [_rows_glob(self.wh, "pair_sources"), _rows_glob(self.wh, "pairs")]).fetchall()]
        finally:
            con.close()

    def member_mask(self, table: pa.Table) -> np.ndarray:
        """Which rows of a ``pairs`` table (``pair_id``, ``source``) are pool pairs."""
        mask = pc.is_in(table.column("source"), pa.array(self.sources, pa.string()))
        mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
        if self.extra:
            mask = mask | pc.is_in(table.column("pair_id"), pa.array(sorted(self.extra), pa.string())).to_numpy(
                zero_copy_only=False)
        return mask

    def plan(self, shard_size: int, on_ids: Callable[[list[str], pa.Table], None] | None = None) -> list[PoolShard]:
        """Shards of whole row groups holding about ``shard_size`` rows each, in storage order (below the row
        group size: row ranges of one row group, each of which reads that row group again); rows without a pool
        pair are left out. ``on_ids(ids, where)`` sees every pool pair id once, with ``where`` a table of
        ``(pair_id, path, row_group)`` to find it again."""
        shards: list[PoolShard] = []
        for path in self.parts():
            with self.wh.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                groups, rows, members, digest = [], 0, 0, hashlib.sha256()
                for rg in range(pf.num_row_groups):
                    t = pf.read_row_group(rg, columns=["pair_id", "source"])
                    mask = self.member_mask(t)
                    n = int(mask.sum())
                    ids = t.column("pair_id").filter(pa.array(mask)) if n else None
                    id_list = ids.to_pylist() if n else []
                    if n and on_ids is not None:
                        on_ids(id_list, pa.table({
                            "pair_id": ids, "path": pa.array([path] * n, pa.string()),
                            "row_group": pa.array(np.full(n, rg, np.int32))}))
                    if n and t.num_rows > shard_size:  # shards below the row group: row ranges of it
                        if groups:
                            shards.append(PoolShard(path, tuple(groups), members, digest=digest.hexdigest()))
                            groups, rows, members, digest = [], 0, 0, hashlib.sha256()
                        all_ids = t.column("pair_id").to_pylist()
                        for a in range(0, t.num_rows, shard_size):
                            m = int(mask[a:a + shard_size].sum())
                            if m:
                                part = [p for p, keep in zip(all_ids[a:a + shard_size], mask[a:a + shard_size]) if keep]
                                shards.append(PoolShard(path, (rg,), m, a, min(a + shard_size, t.num_rows),
                                                        _digest_of(hashlib.sha256(), part)))
                        continue
                    if n:
                        groups.append(rg)
                        rows += t.num_rows
                        members += n
                        _digest_of(digest, id_list)
                    if groups and (rows >= shard_size or rg == pf.num_row_groups - 1):
                        shards.append(PoolShard(path, tuple(groups), members, digest=digest.hexdigest()))
                        groups, rows, members, digest = [], 0, 0, hashlib.sha256()
        return shards

    def read(self, shard: PoolShard, columns: Sequence[str] = ("pair_id", "caption", "image")) -> pa.Table:
        """The pool pairs of one shard, in storage order."""
        cols = list(dict.fromkeys(["pair_id", "source", *columns, *(REFERENCE_COLUMNS if "image" in columns else ())]))
        t = self.wh.read_row_groups(shard.path, list(shard.row_groups), cols)
        if shard.stop is not None:
            t = t.slice(shard.start, shard.stop - shard.start)
        t = t.filter(pa.array(self.member_mask(t)))
        if "image" in columns:  # images ingested by reference: read from their sources, hash-checked
            t = self.wh.images.fill(t)
        return t.select(list(dict.fromkeys(["pair_id", *columns])))

    def read_located(self, where: pa.Table, columns: Sequence[str] = ("pair_id", "caption", "image")) -> pa.Table:
        """The rows of ``where`` (``pair_id, path, row_group``, as ``plan`` gave them), in its order, reading
        only their row groups."""
        want = where.column("pair_id").to_pylist()
        keep = list(dict.fromkeys(["pair_id", *columns]))
        cols = list(dict.fromkeys([*keep, *(REFERENCE_COLUMNS if "image" in columns else ())]))
        got: dict[str, dict] = {}
        for (path, rg) in sorted(set(zip(where.column("path").to_pylist(), where.column("row_group").to_pylist()))):
            t = self.wh.read_row_groups(path, [rg], cols)
            t = t.filter(pc.is_in(t.column("pair_id"), pa.array(want, pa.string())))
            if "image" in columns:
                t = self.wh.images.fill(t)
            got.update({r["pair_id"]: r for r in t.select(keep).to_pylist()})
        return pa.Table.from_pylist([got[p] for p in want])


def _rows_glob(wh: Warehouse, table: str) -> str:
    """Every Parquet part of ``table``, all partitions, as a URL DuckDB reads through the warehouse's filesystem."""
    return wh.url_of(posixpath.join(wh.table_dir(table), "**", "*.parquet"))


def source_key_counts(wh: Warehouse, sources: Sequence[str]) -> dict[str, int]:
    """Per source, its distinct source keys in ``pair_sources`` (kept or duplicate; a key whose content changed
    has a row per version and counts once). Counted by DuckDB, out of core: the memory of the pre-flight checks
    does not grow with the pool (a 1M-pair pool's keys in Arrow were the peak of a whole ``chips run``)."""
    from .selection import engine

    if not sources or not wh.parts("pair_sources"):
        return {}
    con = engine(wh)
    try:
        return dict(con.execute(
            "select source, count(*) from (select distinct source, source_key "
            "  from read_parquet(?, hive_partitioning = false) where source in (select unnest(?::varchar[]))) "
            "group by source", [_rows_glob(wh, "pair_sources"), sorted(set(sources))]).fetchall())
    finally:
        con.close()


def quarantine_causes(wh: Warehouse, sources: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per source, the quarantine causes recorded for it with their counts (duplicates left out: a duplicate is
    kept under its first source key, nothing is lost). A cause is the table's ``reason``, and for a ``read_error``
    whose detail starts with a name (``"path_outside_root: ..."``) that name in brackets: ``read_error
    (path_outside_root)``, what ``select reason, split_part(detail, ':', 1)`` groups by. Grouped by DuckDB: one row
    per source and cause."""
    from .selection import engine

    if not sources or not wh.parts("quarantine"):
        return {}
    con = engine(wh)
    try:
        rows = con.execute(
            "select source, cause, count(*) from (select source, case when reason = 'read_error' "
            "  and regexp_full_match(split_part(coalesce(detail, ''), ':', 1), '[A-Za-z_][A-Za-z0-9_]*') "
            "  then 'read_error (' || split_part(detail, ':', 1) || ')' else reason end as cause "  # = stg_quarantine.cause
            "  from read_parquet(?, hive_partitioning = false) "
            "  where source in (select unnest(?::varchar[])) and reason <> 'duplicate') "
            "group by source, cause order by source, cause",
            [_rows_glob(wh, "quarantine"), sorted(set(sources))]).fetchall()
    finally:
        con.close()
    out: dict[str, dict[str, int]] = {}
    for source, cause, n in rows:
        out.setdefault(source, {})[cause] = n
    return out
