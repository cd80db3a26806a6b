"""Publish ``scores`` and ``subsets`` as Delta Lake tables (the ``deltalake`` package; no JVM, no
catalog service). Spark, Trino, Databricks, DuckDB (via the Arrow dataset or its delta extension)
and Polars read them where they are. Why Delta rather than Iceberg: see docs/platform.md.
"""
from __future__ import annotations

import pyarrow as pa

from .warehouse import SCHEMAS, Warehouse, conform

DELTA_TABLES = ("scores", "subsets")


def delta_uri(wh: Warehouse, table: str) -> str:
    return wh.url_of(wh.path("delta", table))


def publish_delta(wh: Warehouse, table: str, data: pa.Table, storage_options: dict | None = None) -> str:
    """Append one run's rows to the Delta table, partitioned by ``run_id``; a run already published
    is replaced, not duplicated (``replaceWhere`` on its partition), so re-publishing is idempotent."""
    from deltalake import DeltaTable, write_deltalake

    if table not in DELTA_TABLES:
        raise ValueError(f"table {table!r} is not published to Delta (only {DELTA_TABLES})")
    data = conform(data, SCHEMAS[table], table)
    runs = set(data.column("run_id").to_pylist())
    if len(runs) != 1:
        raise ValueError(f"publish one run at a time; got run ids {sorted(runs)}")
    run_id = runs.pop()
    uri = delta_uri(wh, table)
    try:
        DeltaTable(uri, storage_options=storage_options)
        exists = True
    except Exception:  # noqa: BLE001 - deltalake raises TableNotFoundError and others alike
        exists = False
    if not exists:
        write_deltalake(uri, data, partition_by=["run_id"], mode="append", storage_options=storage_options)
    else:
        write_deltalake(uri, data, partition_by=["run_id"], mode="overwrite",
                        predicate=f"run_id = '{run_id.replace(chr(39), chr(39) * 2)}'", storage_options=storage_options)
    return uri
