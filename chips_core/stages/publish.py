"""The publish stage: one scoring run's ``scores``, its materialised ``subsets`` and (under a pipeline or refresh)
its stages' ``runs`` rows appended to Delta Lake tables under ``<warehouse>/delta/`` and/or Iceberg tables
``chips.<table>`` in a SQL catalog (``publish.delta``, ``publish.iceberg``; partitioned by run; re-publishing a run
replaces it, each publish is a new table version), so Spark, Trino, Databricks, DuckDB and Polars read them."""
from __future__ import annotations

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
        if parent_run_id is not None:  # the pipeline's or refresh's stage runs so far (its own row ends after this)
            tables["runs"] = wh.read("runs", filter=pc.field("parent_run_id") == parent_run_id)
        uris = {}
        for name, data in tables.items():
            if cfg.publish.delta or not cfg.publish.iceberg:  # called with neither set: Delta, as it always did
                uris[name] = publish_delta(wh, name, data, cfg.storage_options)
            if cfg.publish.iceberg:
                uris[f"iceberg:{name}"] = publish_iceberg(wh, name, data, cfg.publish.iceberg_catalog_uri)
        n = sum(t.num_rows for t in tables.values())
        row.update(rows_in=n, rows_out=n, rows_quarantined=0)
    return {"run_id": run_id, "tables": uris, "rows": {k: t.num_rows for k, t in tables.items()}}
