"""Publish ``scores``, ``subsets`` and the stages' ``runs`` rows as Delta Lake tables (the ``deltalake`` package;
no JVM, no catalog service) and as Iceberg tables (``pyiceberg`` with a SQL catalog: SQLite by default). Spark,
Trino, Databricks, DuckDB (via the Arrow dataset or its delta extension) and Polars read the Delta tables where
they are; the Iceberg tables through their catalog (docs/platform.md).
"""
from __future__ import annotations

import posixpath
import warnings

import pyarrow as pa

from .warehouse import SCHEMAS, Warehouse, conform

# the published tables and the column each is partitioned (and replaced) by: a run's scores and subsets; the
# runs rows of one pipeline, refresh or rescore (its own row and its stages' rows) by that run's id
PUBLISHED = {"scores": "run_id", "subsets": "run_id", "runs": "root_run_id"}
# a published table's schema: the warehouse table's; ``runs`` adds the id of the run each row belongs under
PUBLISHED_SCHEMAS = {"scores": SCHEMAS["scores"], "subsets": SCHEMAS["subsets"],
                     "runs": SCHEMAS["runs"].append(pa.field("root_run_id", pa.string()))}


def _one_run(table: str, data: pa.Table) -> tuple[pa.Table, str, str]:
    """A published table's rows conformed to its schema, its partition column, and the one run they belong to."""
    if table not in PUBLISHED:
        raise ValueError(f"table {table!r} is not published (only {tuple(PUBLISHED)})")
    data, key = conform(data, PUBLISHED_SCHEMAS[table], table), PUBLISHED[table]
    runs = set(data.column(key).to_pylist())
    if len(runs) != 1 or None in runs:
        raise ValueError(f"publish one run at a time; got {key} values {sorted(runs, key=str)}")
    return data, key, runs.pop()


def delta_uri(wh: Warehouse, table: str) -> str:
    return wh.url_of(wh.path("delta", table))


def publish_delta(wh: Warehouse, table: str, data: pa.Table, storage_options: dict | None = None) -> str:
    """Append one run's rows to the Delta table, partitioned by ``run_id`` (``runs``: by ``root_run_id``); a run already published
    is replaced, not duplicated (``replaceWhere`` on its partition), so re-publishing is idempotent."""
    from deltalake import DeltaTable, write_deltalake

    data, key, run_id = _one_run(table, data)
    uri = delta_uri(wh, table)
    try:
        DeltaTable(uri, storage_options=storage_options)
        exists = True
    except Exception:  # noqa: BLE001 - deltalake raises TableNotFoundError and others alike
        exists = False
    if not exists:
        write_deltalake(uri, data, partition_by=[key], mode="append", storage_options=storage_options)
    else:
        # schema_mode merge: a column added since the table was created (e.g. runs.process) joins it, older rows null
        write_deltalake(uri, data, partition_by=[key], mode="overwrite", schema_mode="merge",
                        predicate=f"{key} = '{run_id.replace(chr(39), chr(39) * 2)}'", storage_options=storage_options)
    return uri


ICEBERG_NAMESPACE = "chips"


def iceberg_catalog(wh: Warehouse, uri: str | None = None):
    """The Iceberg SQL catalog (``pyiceberg``): ``uri`` (any SQLAlchemy URL: PostgreSQL, MySQL...), by default
    a SQLite file in ``<warehouse>/iceberg/``; table data under ``<warehouse>/iceberg/`` (local warehouses)."""
    from pyiceberg.catalog.sql import SqlCatalog

    if uri is None and not wh.is_local:
        raise ValueError(f"publish.iceberg_catalog_uri is required for a remote warehouse ({wh.url!r}): the "
                         "default SQLite catalog file must be local")
    root = wh.path("iceberg")
    if wh.is_local:
        wh.fs.makedirs(root, exist_ok=True)
    cat = SqlCatalog("chips", uri=uri or f"sqlite:///{posixpath.join(root, 'catalog.db')}",
                     warehouse=wh.url_of(root) if not wh.is_local else f"file://{root}")
    cat.create_namespace_if_not_exists(ICEBERG_NAMESPACE)
    return cat


def publish_iceberg(wh: Warehouse, table: str, data: pa.Table, catalog_uri: str | None = None) -> str:
    """One run's rows into the Iceberg table ``chips.<table>``, partitioned as :func:`publish_delta`: a run already published
    is overwritten (one new snapshot), never duplicated; earlier snapshots stay readable (time travel).
    Returns the table identifier."""
    from pyiceberg.expressions import EqualTo

    data, key, run_id = _one_run(table, data)
    cat, ident = iceberg_catalog(wh, catalog_uri), f"{ICEBERG_NAMESPACE}.{table}"
    if not cat.table_exists(ident):
        created = cat.create_table(ident, schema=data.schema)
        with created.update_spec() as spec:
            spec.add_identity(key)
    t = cat.load_table(ident)
    if set(data.schema.names) - set(t.schema().column_names):  # a column added since (e.g. runs.process): evolve
        with t.update_schema() as update:
            update.union_by_name(data.schema)
        t = cat.load_table(ident)
    with warnings.catch_warnings():  # a run published for the first time has nothing to replace: not news
        warnings.filterwarnings("ignore", message="Delete operation did not match any records")
        t.overwrite(data, overwrite_filter=EqualTo(key, run_id))
    return ident
