"""The materialize stage: the subsets at every (method, budget) as the ``subsets`` table, and per
subset a Parquet manifest and an open_clip_train CSV (``filepath``, ``title``) for the trainer."""
from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import SCHEMAS, Warehouse
from ..scoring.score import select_top
from .runconfig import RunConfig


def subsets_table(pair_ids, scores: dict, budgets, methods, run_id: str, score_run_id: str,
                  full: bool = False) -> pa.Table:
    """One row per selected pair per (method, budget); subset ids name both. With ``full``, also every pair as
    method ``full`` at budget 1 (ranked in pair-id order)."""
    rows = []
    if full:
        sid = f"{score_run_id}:full@1"
        rows += [{"subset_id": sid, "run_id": run_id, "score_run_id": score_run_id, "budget": 1.0, "method": "full",
                  "pair_id": p, "rank": r + 1} for r, p in enumerate(sorted(pair_ids))]
    for method in methods:
        for budget in budgets:
            keep = select_top(scores[method], pair_ids, budget)
            sid = f"{score_run_id}:{method}@{budget:g}"
            rows += [{"subset_id": sid, "run_id": run_id, "score_run_id": score_run_id, "budget": float(budget),
                      "method": method, "pair_id": pair_ids[i], "rank": r + 1} for r, i in enumerate(keep)]
    return pa.Table.from_pylist(rows, schema=SCHEMAS["subsets"])


def materialize_stage(cfg: RunConfig, wh: Warehouse, score_run_id: str, run_id: str | None = None,
                      parent_run_id: str | None = None) -> dict:
    """Subsets of one scoring run, written to the warehouse and as manifests under ``cfg.outputs.dir``."""
    run_id = run_id or new_run_id("materialize")
    with recorded_run(wh, "materialize", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"score_run_id": score_run_id}) as row:
        st = wh.read("scores", filter=pc.field("run_id") == score_run_id)
        ids = st.column("pair_id").to_pylist()
        scores = {m: st.column(m).to_numpy() for m in cfg.methods}
        subsets = subsets_table(ids, scores, cfg.budgets, cfg.methods, run_id, score_run_id, full=cfg.outputs.full)
        wh.write("subsets", subsets, {"run": run_id}, "subsets")
        files = write_manifests(wh, subsets, Path(cfg.outputs.dir) / run_id, cfg.outputs.formats)
        row.update(rows_in=len(ids), rows_out=subsets.num_rows, rows_quarantined=0)
    return {"run_id": run_id, "subsets": sorted(set(subsets.column("subset_id").to_pylist())), "files": files}


def write_manifests(wh: Warehouse, subsets: pa.Table, out: Path, formats) -> list[str]:
    """Export each selected image once (``images/<pair_id>.<ext>``) and write per-subset manifests."""
    if not formats:  # the subsets table only (e.g. a trainer that reads pairs from the warehouse)
        return []
    (out / "images").mkdir(parents=True, exist_ok=True)
    where = {}
    for p in wh.read_pairs(sorted(set(subsets.column("pair_id").to_pylist())), ["caption", "image", "image_format"]):
        ext = {"JPEG": "jpg"}.get(p["image_format"], (p["image_format"] or "bin").lower())
        path = (out / "images" / f"{p['pair_id']}.{ext}").resolve()
        if not path.exists():
            path.write_bytes(p["image"])
        where[p["pair_id"]] = (str(path), p["caption"])
    files = []
    for sid in sorted(set(subsets.column("subset_id").to_pylist())):
        rows = subsets.filter(pc.field("subset_id") == sid).sort_by("rank").to_pylist()
        stem = sid.split(":", 1)[1].replace("@", "_at_")
        if "parquet" in formats:
            t = pa.table({"pair_id": [r["pair_id"] for r in rows], "rank": [r["rank"] for r in rows],
                          "filepath": [where[r["pair_id"]][0] for r in rows],
                          "title": [where[r["pair_id"]][1] for r in rows]})
            pq.write_table(t, out / f"{stem}.parquet")
            files.append(str(out / f"{stem}.parquet"))
        if "csv" in formats:
            with open(out / f"{stem}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["filepath", "title"])
                w.writerows(where[r["pair_id"]] for r in rows)
            files.append(str(out / f"{stem}.csv"))
    return files
