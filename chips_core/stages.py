"""Stage functions over the warehouse: each reads inputs, writes its tables per shard, and returns
counts that reconcile (house style 4). Orchestration (Prefect) wraps these; nothing here imports it."""
from __future__ import annotations

import itertools
from typing import Iterable

import pandas as pd
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
                 seen: dict[str, str] | None = None, recorded: set | None = None, chunk: int = 2048) -> dict:
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
        for q in v.quarantine:
            parts.quarantine.append(q)
        for s in v.pair_sources:
            key = (s["pair_id"], s["source"], s["source_key"])
            if key in recorded:  # same row as before: no new quarantine row, no new source row
                unchanged += 1
                parts.quarantine = [q for q in parts.quarantine if q["source_key"] != s["source_key"]
                                    or q["reason"] != "duplicate"]
                continue
            recorded.add(key)
            parts.pair_sources.append(s)
    pairs = pa.Table.from_pylist(parts.pairs, schema=SCHEMAS["pairs"])
    check_batch(pairs.drop_columns(["image"]).to_pandas().assign(image=None), parts.read, len(parts.pairs),
                len(parts.quarantine) + unchanged)
    partition = {"run": run_id}
    wh.write("pairs", pairs, partition, shard)
    wh.write("pair_sources", pa.Table.from_pylist(parts.pair_sources, schema=SCHEMAS["pair_sources"]), partition, shard)
    wh.write("quarantine", pa.Table.from_pylist(parts.quarantine, schema=SCHEMAS["quarantine"]), partition, shard)
    return {"read": parts.read, "kept": len(parts.pairs), "quarantined": len(parts.quarantine), "unchanged": unchanged}


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
