"""The publish stage: one scoring run's ``scores`` and its materialised ``subsets`` appended to Delta Lake tables
under ``<warehouse>/delta/`` and/or Iceberg tables ``chips.<table>`` in a SQL catalog (``publish.delta``,
``publish.iceberg``; partitioned by run; re-publishing a run replaces it, each publish is a new table version), so
Spark, Trino, Databricks, DuckDB and Polars read them. When a pipeline, refresh or rescore has ended,
:func:`publish_runs` adds its ``runs`` rows (its own and every stage's, the publish stage's included)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ..platform.lakehouse import publish_delta, publish_iceberg
from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import Warehouse
from .runconfig import RunConfig


def publish_stage(cfg: RunConfig, wh: Warehouse, score_run_id: str, materialize_run_id: str,
                  run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """Publish the rows of ``score_run_id`` (scores) and ``materialize_run_id`` (subsets) to Delta and/or Iceberg."""
    run_id = run_id or new_run_id("publish")
    with recorded_run(wh, "publish", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"score_run_id": score_run_id, "materialize_run_id": materialize_run_id}) as row:
        tables = {"scores": wh.read("scores", filter=pc.field("run_id") == score_run_id),
                  "subsets": wh.read("subsets", filter=pc.field("run_id") == materialize_run_id)}
        uris = _publish(cfg, wh, tables)
        n = sum(t.num_rows for t in tables.values())
        row.update(rows_in=n, rows_out=n, rows_quarantined=0)
    return {"run_id": run_id, "tables": uris, "rows": {k: t.num_rows for k, t in tables.items()}}


def publish_runs(cfg: RunConfig, wh: Warehouse, root_run_id: str) -> dict:
    """Publish the ``runs`` rows of a pipeline, refresh or rescore that has ended: its own row and those of its
    stages, each with ``root_run_id``, the partition (re-publishing replaces it). Called after the run's own row
    is written, so it is not itself a recorded stage; a run that failed is not published."""
    rows = wh.read("runs", filter=(pc.field("run_id") == root_run_id) | (pc.field("parent_run_id") == root_run_id))
    rows = rows.append_column("root_run_id", pa.array([root_run_id] * rows.num_rows, pa.string()))
    return {"tables": _publish(cfg, wh, {"runs": rows}), "rows": {"runs": rows.num_rows}}


def _publish(cfg: RunConfig, wh: Warehouse, tables: dict) -> dict:
    uris = {}
    for name, data in tables.items():
        if cfg.publish.delta or not cfg.publish.iceberg:  # called with neither set: Delta, as it always did
            uris[name] = publish_delta(wh, name, data, cfg.storage_options)
        if cfg.publish.iceberg:
            uris[f"iceberg:{name}"] = publish_iceberg(wh, name, data, cfg.publish.iceberg_catalog_uri)
    return uris
