"""The one stage sequence: ingest → featurize → score → materialize (→ publish), and the rescore
sequence for a new target over an already featurized pool.

The sequence is written once, here. Who runs each stage is a parameter: :func:`local_stages` calls
the stage functions in this process; the Prefect flows pass their own mapping (a sub-flow per
stage, shards as mapped tasks). Every entry takes the stage's inputs and ``parent_run_id``, and
returns the stage's summary dict.
"""
from __future__ import annotations

import json
from typing import Callable

from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import LoadedModel, load_model
from ..util import release_memory
from .common import MapShards, local_map, model_fields, require_pairs, require_quarantine_share
from .featurize import featurize_stage
from .ingest import ingest_stage
from .materialize import materialize_stage
from .publish import publish_runs, publish_stage
from .runconfig import RunConfig
from .score import score_stage
from .takedown import takedown_stage

Stages = dict[str, Callable[..., dict]]


def local_stages(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, progress: bool = False,
                 map_shards: MapShards = local_map) -> Stages:
    """Each stage called in this process (featurize's shards through ``map_shards``)."""
    return {
        "ingest": lambda sources, **kw: ingest_stage(sources, wh, progress=progress, **kw),
        "featurize": lambda **kw: featurize_stage(cfg, wh, loaded, progress=progress, map_shards=map_shards, **kw),
        "score": lambda featurize_run_id, **kw: score_stage(cfg, wh, loaded, featurize_run_id, **kw),
        "materialize": lambda score_run_id, **kw: materialize_stage(cfg, wh, score_run_id, **kw),
        "takedown": lambda **kw: takedown_stage(cfg, wh, **kw),
        "publish": lambda score_run_id, materialize_run_id, **kw: publish_stage(cfg, wh, score_run_id,
                                                                                materialize_run_id, **kw),
    }


def run_pipeline(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = False, *,
                 wh: Warehouse | None = None, stages: Stages | None = None, refresh: bool = False) -> dict:
    """Ingest (pool and target), featurize, score, materialize, and publish when configured; one
    ``pipeline`` run is the parent of each stage's run. A ``refresh`` (one ``refresh`` run) featurizes only what
    changed since the last featurize run of this pool (:func:`last_featurize_run`; none: everything)."""
    wh = wh or cfg.open_warehouse()
    loaded = loaded or load_model(cfg.model, cfg.device)
    stages = stages or local_stages(cfg, wh, loaded, progress)
    kind = "refresh" if refresh else "pipeline"
    parent = new_run_id(kind)
    base = last_featurize_run(wh, cfg) if refresh else None
    with recorded_run(wh, kind, cfg, run_id=parent, **model_fields(cfg, loaded),
                      **({"inputs": {"reuse_featurize_run_id": base}} if refresh else {})):
        out = {"run_id": parent, "ingest": stages["ingest"](list(cfg.pool) + list(cfg.target), parent_run_id=parent)}
        # before featurize, not after it
        out["quarantine"] = require_quarantine_share(wh, list(cfg.pool) + list(cfg.target), cfg.max_quarantine_share)
        require_pairs(wh, cfg.target, "target")
        require_pairs(wh, cfg.pool, "pool", ids=False)
        if cfg.takedowns:  # matched to what is ingested now; materialize leaves every listed pair out
            out["takedown"] = stages["takedown"](parent_run_id=parent)
        out["featurize"] = stages["featurize"](parent_run_id=parent, **({"reuse": base} if base else {}))
        release_memory()  # the next stages' peaks do not stack on featurize's freed heap
        out |= _score_and_materialize(cfg, stages, out["featurize"]["run_id"], parent)
    return _publish_runs(cfg, wh, out)


def last_featurize_run(wh: Warehouse, cfg: RunConfig) -> str | None:
    """The latest succeeded featurize run over the config's pool sources (what a refresh builds on), or None."""
    if not wh.fs.exists(wh.table_dir("runs")):
        return None
    runs = wh.read("runs", columns=["run_id", "stage", "status", "config_json", "ended_at"]).to_pylist()
    pool = sorted(s.name for s in cfg.pool)
    cands = [r for r in runs if r["stage"] == "featurize" and r["status"] == "succeeded"
             and sorted(s["name"] for s in json.loads(r["config_json"] or "{}").get("pool", [])) == pool]
    return max(cands, key=lambda r: (r["ended_at"], r["run_id"]))["run_id"] if cands else None


def run_rescore(cfg: RunConfig, featurize_run_id: str, loaded: LoadedModel | None = None, *,
                wh: Warehouse | None = None, stages: Stages | None = None) -> dict:
    """Score an already featurized pool for the config's (new) target set, then materialize: the model
    runs over the target evaluation set only; the pool's stored features, bank and curvature are reused."""
    wh = wh or cfg.open_warehouse()
    loaded = loaded or load_model(cfg.model, cfg.device)
    stages = stages or local_stages(cfg, wh, loaded)
    parent = new_run_id("rescore")
    with recorded_run(wh, "rescore", cfg, run_id=parent, inputs={"featurize_run_id": featurize_run_id},
                      **model_fields(cfg, loaded)):
        out = {"run_id": parent, "ingest": stages["ingest"](list(cfg.target), parent_run_id=parent)}
        out["quarantine"] = require_quarantine_share(wh, cfg.target, cfg.max_quarantine_share)
        require_pairs(wh, cfg.target, "target")
        out |= _score_and_materialize(cfg, stages, featurize_run_id, parent)
    return _publish_runs(cfg, wh, out)


def _publish_runs(cfg: RunConfig, wh: Warehouse, out: dict) -> dict:
    """Once the parent's own row is written: its ``runs`` rows and its stages' to the lakehouse (when configured)."""
    if "publish" in out:
        runs = publish_runs(cfg, wh, out["run_id"])
        out["publish"] = {**out["publish"], "tables": {**out["publish"]["tables"], **runs["tables"]},
                          "rows": {**out["publish"]["rows"], **runs["rows"]}}
    return out


def _score_and_materialize(cfg: RunConfig, stages: Stages, featurize_run_id: str, parent: str) -> dict:
    out = {"score": stages["score"](featurize_run_id, parent_run_id=parent)}
    release_memory()  # materialize's DuckDB queries do not stack on the ranking's freed memory
    out["materialize"] = stages["materialize"](out["score"]["run_id"], parent_run_id=parent)
    if cfg.publish.delta or cfg.publish.iceberg:
        out["publish"] = stages["publish"](out["score"]["run_id"], out["materialize"]["run_id"], parent_run_id=parent)
    return out
