"""The takedown stage: opt-out and takedown lists (CSV or Parquet files) matched to the warehouse's pairs by pair
id, source key, image URL or image sha256, recorded in the ``takedowns`` table. Every listed pair is left out of
every later subset and manifest (``platform/selection.py``); keys that matched nothing are recorded too, so the
``runs`` row and ``stg_takedowns`` say how many were honoured and which were not. Nothing already written is
rewritten: earlier subsets and published versions stay as they were, and the next materialize supersedes them."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from ..errors import ConfigError
from ..platform.provenance import new_run_id, recorded_run
from ..platform.query import connect
from ..platform.warehouse import SCHEMAS, Warehouse
from .runconfig import RunConfig

KINDS = ("pair_id", "source_key", "url", "sha256")
LISTED = pa.schema([SCHEMAS["takedowns"].field(n) for n in ("listed_in", "kind", "key", "reason")])


def read_takedown_list(path: str) -> pa.Table:
    """``(listed_in, kind, key, reason)`` rows of one list: every non-empty cell of its ``pair_id``, ``source_key``,
    ``url`` or ``sha256`` columns is a key (``reason``, optional, is kept)."""
    if not os.path.isfile(path):
        raise ConfigError(f"takedown list not found: {path!r}")
    t = pq.read_table(path) if path.endswith(".parquet") else pcsv.read_csv(
        path, convert_options=pcsv.ConvertOptions(column_types={k: pa.string() for k in (*KINDS, "reason")}))
    kinds = [k for k in KINDS if k in t.column_names]
    if not kinds:
        raise ConfigError(f"takedown list {path!r} has none of the columns {KINDS} (it has {t.column_names})")
    reasons = t.column("reason").to_pylist() if "reason" in t.column_names else [None] * t.num_rows
    rows = [{"listed_in": path, "kind": k, "key": str(v).strip(), "reason": r}
            for k in kinds for v, r in zip(t.column(k).to_pylist(), reasons) if v is not None and str(v).strip()]
    return pa.Table.from_pylist(rows, schema=LISTED)


def takedown_stage(cfg: RunConfig, wh: Warehouse, run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """Match the config's takedown lists to the pairs ingested so far; one ``takedown`` run."""
    run_id = run_id or new_run_id("takedown")
    with recorded_run(wh, "takedown", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"lists": list(cfg.takedowns)}) as row:
        keys = pa.concat_tables([LISTED.empty_table(), *(read_takedown_list(p) for p in cfg.takedowns)])
        con = connect(wh)
        try:
            con.register("listed", keys)
            # the keys each pair answers to: its id, its image's URL and sha256, and its key in every source
            matched = con.sql("""
                with answers as (
                    select 'pair_id' as kind, pair_id as key, pair_id from raw_pairs
                    union all select 'url', image_uri, pair_id from raw_pairs where image_uri is not null
                    union all select 'sha256', image_sha256, pair_id from raw_pairs where image_sha256 is not null
                    union all select 'source_key', source_key, pair_id from raw_pair_sources)
                select distinct ? as run_id, l.listed_in, l.kind, l.key, a.pair_id, l.reason
                from listed l left join answers a on a.kind = l.kind and a.key = l.key
                order by l.listed_in, l.kind, l.key, a.pair_id""", params=[run_id]).to_arrow_table()
        finally:
            con.close()
        matched = matched.cast(SCHEMAS["takedowns"])
        if matched.num_rows:
            wh.write("takedowns", matched, {"run": run_id}, "takedowns")
        pairs = {p for p in matched.column("pair_id").to_pylist() if p is not None}
        unmatched = sorted({(k, v) for k, v, p in zip(matched.column("kind").to_pylist(), matched.column("key").to_pylist(),
                                                        matched.column("pair_id").to_pylist()) if p is None})
        summary = {"keys": keys.num_rows, "pairs_taken_down": len(pairs), "keys_unmatched": len(unmatched),
                   "unmatched_examples": [f"{k}={v}" for k, v in unmatched[:5]]}
        row.update(rows_in=keys.num_rows, rows_out=len(pairs), rows_quarantined=0, diagnostics_json=json.dumps(summary))
    return {"run_id": run_id, **summary}
