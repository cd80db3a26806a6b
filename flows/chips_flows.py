"""Prefect flows for every stage and the parent pipeline. Each is a few calls into ``chips_core``;
featurize maps over shards (with retries) between two reduce steps (bank; curvature)."""
from __future__ import annotations

from functools import lru_cache

from prefect import flow, get_run_logger, task, unmapped

from chips_core.models import LoadedModel, ModelSpec, load_model
from chips_core.pipeline import (cpt_stage, eval_stage, featurize_curvature, featurize_prepare, featurize_shard,
                                 load_bank, manifest_data, materialize_stage, score_stage, subset_data)
from chips_core.provenance import new_run_id, recorded_run
from chips_core.runconfig import RunConfig, load_run_config
from chips_core.stages import run_ingest
from chips_core.warehouse import Warehouse


@lru_cache(maxsize=4)
def _model(spec: ModelSpec, device: str) -> LoadedModel:
    return load_model(spec, device)  # one model per process, shared by the shard tasks' threads


def _setup(config: str | dict) -> tuple[RunConfig, Warehouse]:
    cfg = load_run_config(config)
    return cfg, Warehouse(cfg.warehouse, cfg.storage_options)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="shard")


@flow(name="chips-ingest")
def ingest_flow(config: str | dict, parent_run_id: str | None = None, progress: bool = False) -> dict:
    cfg, wh = _setup(config)
    out = run_ingest(list(cfg.pool) + list(cfg.target), wh, parent_run_id=parent_run_id, progress=progress)
    get_run_logger().info("ingest %s: read %d, kept %d, quarantined %d, unchanged %d", out["run_id"],
                          out["read"], out["kept"], out["quarantined"], out["unchanged"])
    return out


@task(name="featurize-prepare")
def _prepare(config, run_id):
    cfg, wh = _setup(config)
    return featurize_prepare(cfg, wh, _model(cfg.model, cfg.device), run_id)


@task(name="featurize-shard", retries=2, retry_delay_seconds=1)
def _shard(config, run_id, n, shard_ids):
    cfg, wh = _setup(config)
    return featurize_shard(cfg, wh, _model(cfg.model, cfg.device), run_id, n, shard_ids)


@task(name="featurize-curvature")
def _curvature(config, run_id, ids):
    cfg, wh = _setup(config)
    featurize_curvature(cfg, wh, _model(cfg.model, cfg.device), run_id, ids)


@flow(name="chips-featurize")
def featurize_flow(config: str | dict, run_id: str | None = None, parent_run_id: str | None = None,
                   progress: bool = False) -> dict:
    cfg, wh = _setup(config)
    loaded = _model(cfg.model, cfg.device)
    run_id = run_id or new_run_id("featurize")
    with recorded_run(wh, "featurize", cfg, run_id=run_id, parent_run_id=parent_run_id, model_name=loaded.label,
                      model_checksum=loaded.checksum, sketch_seed=cfg.sketch.seed, sketch_k=cfg.sketch.k) as row:
        ids, shards = _prepare(config, run_id)
        futures = _shard.map(unmapped(config), unmapped(run_id), list(range(len(shards))), shards)
        written = 0
        for n, f in enumerate(_progress(futures, progress, "featurize shards"), start=1):
            written += bool(f.result())
            if n % max(1, len(shards) // 10) == 0 or n == len(shards):
                get_run_logger().info("featurize %s: %d/%d shards done", run_id, n, len(shards))
        _curvature(config, run_id, ids)
        row.update(bank_id=load_bank(wh, run_id).bank_id, rows_in=len(ids), rows_out=len(ids), rows_quarantined=0)
    get_run_logger().info("featurize %s: %d pairs, %d shards (%d written now)", run_id, len(ids), len(shards), written)
    return {"run_id": run_id, "pairs": len(ids), "shards": len(shards), "shards_written": written}


@flow(name="chips-score")
def score_flow(config: str | dict, featurize_run_id: str, parent_run_id: str | None = None) -> dict:
    cfg, wh = _setup(config)
    return score_stage(cfg, wh, _model(cfg.model, cfg.device), featurize_run_id, parent_run_id=parent_run_id)


@flow(name="chips-materialize")
def materialize_flow(config: str | dict, score_run_id: str, parent_run_id: str | None = None) -> dict:
    cfg, wh = _setup(config)
    return materialize_stage(cfg, wh, score_run_id, parent_run_id=parent_run_id)


@flow(name="chips-pipeline")
def pipeline_flow(config: str | dict, progress: bool = False) -> dict:
    cfg, wh = _setup(config)
    parent = new_run_id("pipeline")
    with recorded_run(wh, "pipeline", cfg, run_id=parent):
        ingest = ingest_flow(config, parent_run_id=parent, progress=progress)
        feat = featurize_flow(config, parent_run_id=parent, progress=progress)
        score = score_flow(config, feat["run_id"], parent_run_id=parent)
        mat = materialize_flow(config, score["run_id"], parent_run_id=parent)
    return {"run_id": parent, "ingest": ingest, "featurize": feat, "score": score, "materialize": mat}


@flow(name="chips-rescore")
def rescore_flow(config: str | dict, featurize_run_id: str) -> dict:
    """Score an already featurized pool for the config's (new) target set, then materialize: the model
    runs over the target evaluation set only; the pool's stored features, bank and curvature are reused."""
    cfg, wh = _setup(config)
    parent = new_run_id("rescore")
    with recorded_run(wh, "rescore", cfg, run_id=parent, inputs={"featurize_run_id": featurize_run_id}):
        ingest = run_ingest(list(cfg.target), wh, parent_run_id=parent)
        score = score_flow(config, featurize_run_id, parent_run_id=parent)
        mat = materialize_flow(config, score["run_id"], parent_run_id=parent)
    return {"run_id": parent, "ingest": ingest, "score": score, "materialize": mat}


@flow(name="chips-cpt")
def cpt_flow(config: str | dict, out_dir: str, subset_id: str | None = None, manifest: str | None = None,
             progress: bool = False) -> dict:
    """Continual pre-training of the config's model on a materialised subset (read from the warehouse)
    or on a manifest file; resumes from ``out_dir``'s checkpoints."""
    if (subset_id is None) == (manifest is None):
        raise ValueError("give exactly one of subset_id / manifest")
    cfg, wh = _setup(config)
    loaded = load_model(cfg.model, cfg.device)  # a fresh copy: training changes it in place
    data = subset_data(wh, subset_id, loaded) if subset_id else manifest_data(manifest, loaded)
    out = cpt_stage(cfg, wh, loaded, data, out_dir, subset_id=subset_id, progress=progress)
    get_run_logger().info("cpt %s: %d pairs, %d steps (resumed from %d), final loss %.4f -> %s", out["run_id"],
                          out["pairs"], out["steps"], out["resumed_from_step"], out["final_loss"] or float("nan"),
                          out["final"])
    return out


@flow(name="chips-eval")
def eval_flow(config: str | dict, checkpoint: str | None = None, cpt_run_id: str | None = None,
              subset_id: str | None = None) -> dict:
    """Evaluate the config's model (or ``checkpoint`` of the same architecture) on every configured
    suite; one ``evals`` row per metric."""
    import dataclasses

    from chips_core.evaluate import load_suite
    from chips_core.pipeline import image_preprocess

    cfg, wh = _setup(config)
    if not cfg.eval_suites:
        raise ValueError("the config names no eval_suites")
    spec = dataclasses.replace(cfg.model, checkpoint=checkpoint) if checkpoint else cfg.model
    loaded = load_model(spec, cfg.device)
    prep = image_preprocess(loaded.model)
    suites = [load_suite(s, prep) for s in cfg.eval_suites]
    out = eval_stage(cfg, wh, loaded, suites, checkpoint=checkpoint or spec.checkpoint, cpt_run_id=cpt_run_id,
                     subset_id=subset_id)
    get_run_logger().info("eval %s: %d metrics over %d suites", out["run_id"], len(out["metrics"]), len(suites))
    return out
