"""Prefect flows: one per stage, each a few lines around the ``chips_core.stages`` function, and the
pipeline and rescore flows, which run the library's one stage sequence with each stage as a sub-flow.
Featurize's shards run as mapped tasks (with retries) on the flow's task runner; with ``executor: {kind: dask}``
ingest's shards (two passes each) and score's feature parts do too."""
from __future__ import annotations

import dataclasses
from functools import partial

from prefect import flow, get_run_logger, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.cache_policies import NONE

from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import LoadedModel, load_model, shared_model
from chips_core.stages import (check_stage, cpt_stage, eval_stage, featurize_stage, ingest_stage, load_eval_suites,
                               load_run_config, manifest_data, materialize_stage, publish_stage, run_pipeline,
                               run_rescore, score_stage, subset_data, takedown_stage, warmup_stage)
from chips_core.stages.runconfig import ExecutorConfig, RunConfig, with_executor

from .dask_workers import check_workers

from .prefect_child import tie_ephemeral_api_to_this_process

tie_ephemeral_api_to_this_process()  # the temporary Prefect API dies with this process, even on SIGKILL


def _config(config: str | dict) -> tuple[RunConfig, Warehouse]:
    cfg = load_run_config(config)
    return cfg, cfg.open_warehouse()


def _setup(config: str | dict) -> tuple[RunConfig, Warehouse, LoadedModel]:
    cfg, wh = _config(config)
    return cfg, wh, shared_model(cfg.model, cfg.device)  # one model per process, shared by shard threads


@task(name="featurize-shard", retries=2, retry_delay_seconds=1, cache_policy=NONE)
def _shard(fn, n: int, shard):
    return fn(n, shard)


def _map_shards(fn, shards, resources: dict | None = None, name: str = "featurize-shard", what: str = "shards"):
    """The stage's shard work, results in shard order, progress in the logs. On the flow's Dask task runner: plain
    Dask tasks keyed ``<name>-<n>-<run>`` on the runner's cluster, retried twice, each holding ``resources`` on its
    worker (e.g. one GPU); a Prefect task run per shard cost about 100 ms of the cores a shard needs (measured:
    docs/benchmarks/distributed.md). On threads: mapped Prefect tasks named ``name`` (with retries)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and type(ctx.task_runner).__name__ == "DaskTaskRunner":
        results = _dask_map(ctx.task_runner.client, fn, shards, resources, name)
    else:
        results = (f.result() for f in _shard.with_options(name=name).map(unmapped(fn), list(range(len(shards))),
                                                                          list(shards)))
    for n, result in enumerate(results, start=1):
        yield result
        if n % max(1, len(shards) // 10) == 0 or n == len(shards):
            get_run_logger().info("%d/%d %s done", n, len(shards), what)


def _dask_map(client, fn, shards, resources: dict | None, name: str):
    """``fn(n, shards[n])`` for every shard as Dask tasks through the flow's Dask task runner's client, in order;
    each result released once yielded."""
    import uuid

    run = uuid.uuid4().hex[:8]
    keys = [f"{name}-{n}-{run}" for n in range(len(shards))]
    futures = client.map(fn, list(range(len(shards))), list(shards), key=keys, retries=2,
                         resources=dict(resources) if resources else None)
    for n in range(len(futures)):
        future, futures[n] = futures[n], None
        yield future.result()


@flow(name="chips-ingest")
def ingest_flow(config: str | dict, sources: list[str] | None = None, parent_run_id: str | None = None,
                progress: bool = False) -> dict:
    """Ingest the named sources (default: every pool and target source; ``sources`` may also name the config's
    other ``sources:``, e.g. a replay stream)."""
    cfg, wh = _config(config)
    specs = list(cfg.pool) + list(cfg.target) if sources is None else [cfg.source(n) for n in sources]
    shards = None
    if cfg.executor.kind == "dask":  # each shard's two passes as tasks: "ingest-judge", then "ingest-write"
        if cfg.executor.address:
            check_workers(cfg)
        shards = _two_pass_map()
    out = ingest_stage(specs, wh, parent_run_id=parent_run_id, progress=progress, map_shards=shards)
    get_run_logger().info("ingest %s: read %d, kept %d, quarantined %d, unchanged %d", out["run_id"],
                          out["read"], out["kept"], out["quarantined"], out["unchanged"])
    return out


def _two_pass_map():
    """Ingest's map: its first call maps the judging pass, its second the writing pass (named tasks each)."""
    names = iter([("ingest-judge", "shards judged"), ("ingest-write", "shards written")])

    def map_shards(fn, shards):
        name, what = next(names)
        return _map_shards(fn, shards, name=name, what=what)
    return map_shards


def ingest_on(config: str | dict):
    """The ingest flow on the config's ``executor:``: local, shards one after another in this process; dask, each
    shard's reading and judging, then its writing, tasks on the cluster (de-duplication stays here, in order)."""
    executor = load_run_config(config).executor
    return ingest_flow if executor.kind == "local" else ingest_flow.with_options(task_runner=task_runner_for(executor))


# Prefect's default thread pool is unbounded: it would run every shard at once, so memory would grow with the
# pool. Two shards at a time overlap one shard's reading and decoding with another's forward pass (torch uses
# every core inside a shard). A Dask runner (`featurize_flow.with_options(task_runner=...)`) replaces this.
FEATURIZE_SHARDS_AT_ONCE = 2


def task_runner_for(executor: ExecutorConfig):
    """The featurize flow's task runner for ``executor:`` (runconfig.ExecutorConfig): threads in this process, or
    prefect-dask's DaskTaskRunner on an existing scheduler or on a LocalCluster of worker processes it starts."""
    if executor.kind == "local":
        return ThreadPoolTaskRunner(max_workers=FEATURIZE_SHARDS_AT_ONCE)
    from prefect_dask import DaskTaskRunner

    if executor.address:
        return DaskTaskRunner(address=executor.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": executor.n_workers, "processes": True,
                                         "threads_per_worker": executor.threads_per_worker,
                                         "dashboard_address": None})


def featurize_on(config: str | dict):
    """The featurize flow on the task runner the config's ``executor:`` names (the same flow, the same stage)."""
    return featurize_flow.with_options(task_runner=task_runner_for(load_run_config(config).executor))


@flow(name="chips-featurize", task_runner=ThreadPoolTaskRunner(max_workers=FEATURIZE_SHARDS_AT_ONCE))
def featurize_flow(config: str | dict, run_id: str | None = None, parent_run_id: str | None = None,
                   progress: bool = False, reuse: str | None = None) -> dict:
    cfg, wh, loaded = _setup(config)
    if cfg.executor.kind == "dask" and cfg.executor.address:
        check_workers(cfg)  # same software, and the model and warehouse visible, on every worker
    out = featurize_stage(cfg, wh, loaded, run_id=run_id, parent_run_id=parent_run_id, progress=progress,
                          map_shards=partial(_map_shards, resources=cfg.executor.resources), reuse=reuse)
    get_run_logger().info("featurize %s: %d pairs, %d shards (%d written now)", out["run_id"], out["pairs"],
                          out["shards"], out["shards_written"])
    return out


def score_on(config: str | dict):
    """The score flow on the config's ``executor:``: local, its parts on threads in this process (the stage's own
    bounded map); dask, each feature part a task on the cluster."""
    executor = load_run_config(config).executor
    return score_flow if executor.kind == "local" else score_flow.with_options(task_runner=task_runner_for(executor))


@flow(name="chips-score")
def score_flow(config: str | dict, featurize_run_id: str, parent_run_id: str | None = None) -> dict:
    cfg, wh, loaded = _setup(config)
    if cfg.executor.kind == "dask" and cfg.executor.address:
        check_workers(cfg)
    parts = (partial(_map_shards, name="score-part", what="parts") if cfg.executor.kind == "dask" else None)
    return score_stage(cfg, wh, loaded, featurize_run_id, parent_run_id=parent_run_id, map_parts=parts)


@flow(name="chips-takedown")
def takedown_flow(config: str | dict, parent_run_id: str | None = None) -> dict:
    return takedown_stage(*_config(config), parent_run_id=parent_run_id)


@flow(name="chips-materialize")
def materialize_flow(config: str | dict, score_run_id: str, parent_run_id: str | None = None) -> dict:
    return materialize_stage(*_config(config), score_run_id, parent_run_id=parent_run_id)


@flow(name="chips-publish")
def publish_flow(config: str | dict, score_run_id: str, materialize_run_id: str,
                 parent_run_id: str | None = None) -> dict:
    return publish_stage(*_config(config), score_run_id, materialize_run_id, parent_run_id=parent_run_id)


@flow(name="chips-check")
def check_flow(config: str | dict, ingest: bool = True) -> dict:
    """The premise check: ingest the pool and target (unchanged rows are skipped), then measure whether
    the model knows the target well enough for gradient-based selection; nothing is featurized."""
    if ingest:
        ingest_on(config)(config)
    out = check_stage(*_setup(config))
    (get_run_logger().info if out["passed"] else get_run_logger().warning)("check %s: %s", out["run_id"], out["verdict"])
    return out


def _subflows(config: str | dict, progress: bool = False) -> dict:
    """The library's stage mapping, with each stage run as its Prefect flow (see stages/pipeline.py)."""
    return {"ingest": lambda sources, **kw: ingest_on(config)(config, [s.name for s in sources], progress=progress,
                                                               **kw),
            "featurize": partial(featurize_on(config), config, progress=progress), "score": partial(score_on(config), config),
            "materialize": partial(materialize_flow, config), "publish": partial(publish_flow, config),
            "takedown": partial(takedown_flow, config)}


@flow(name="chips-pipeline")
def pipeline_flow(config: str | dict, progress: bool = False, executor: str | None = None) -> dict:
    """The whole pipeline; ``executor`` (``local``, ``dask`` or a scheduler address) overrides the config's."""
    config = config if executor is None else with_executor(config, executor)
    cfg, wh, loaded = _setup(config)
    return run_pipeline(cfg, loaded, wh=wh, stages=_subflows(config, progress))


@flow(name="chips-refresh")
def refresh_flow(config: str | dict, progress: bool = False, executor: str | None = None) -> dict:
    """The pipeline featurizing only what changed since the pool's last featurize run (new shards; every pair
    again when the model or the feature settings changed, with the reason in the log and the runs row);
    ``executor`` overrides the config's (a deployment's parameter: the nightly refresh on a Dask cluster)."""
    config = config if executor is None else with_executor(config, executor)
    cfg, wh, loaded = _setup(config)
    if cfg.executor.address:
        check_workers(cfg)  # before any stage: the scheduler reachable, its workers like this process
    return run_pipeline(cfg, loaded, wh=wh, stages=_subflows(config, progress), refresh=True)


@flow(name="chips-rescore")
def rescore_flow(config: str | dict, featurize_run_id: str) -> dict:
    """A new target over an already featurized pool: the model runs over the target set only."""
    cfg, wh, loaded = _setup(config)
    return run_rescore(cfg, featurize_run_id, loaded, wh=wh, stages=_subflows(config))


@flow(name="chips-cpt")
def cpt_flow(config: str | dict, out_dir: str, subset_id: str | None = None, manifest: str | None = None,
             progress: bool = False) -> dict:
    """Continual pre-training of the config's model on a materialised subset (read from the warehouse)
    or on a manifest file; resumes from ``out_dir``'s checkpoints."""
    if (subset_id is None) == (manifest is None):
        raise ValueError("give exactly one of subset_id / manifest")
    cfg, wh = _config(config)
    loaded = load_model(cfg.model, cfg.device)  # a fresh copy: training changes it in place
    data = subset_data(wh, subset_id, loaded) if subset_id else \
        manifest_data(manifest, loaded, cfg.cpt.manifest_allowed_roots or None)
    out = cpt_stage(cfg, wh, loaded, data, out_dir, subset_id=subset_id, progress=progress, manifest=manifest)
    get_run_logger().info("cpt %s: %d pairs, %d steps (resumed from %d), final loss %.4f -> %s", out["run_id"],
                          out["pairs"], out["steps"], out["resumed_from_step"], out["final_loss"] or float("nan"),
                          out["final"])
    return out


@flow(name="chips-warmup")
def warmup_flow(config: str | dict, out_dir: str, ingest: bool = True, progress: bool = False) -> dict:
    """The premise check's warm-up: CPT rounds on in-domain pool pairs (``warmup:``), the check after each, until it
    passes or the round limit; ingests the pool and target first (unchanged rows are skipped)."""
    if ingest:
        ingest_on(config)(config)
    cfg, wh = _config(config)
    loaded = load_model(cfg.model, cfg.device)  # a fresh copy: the rounds train it in place
    logger = get_run_logger()
    out = warmup_stage(cfg, wh, loaded, out_dir, progress=progress, log=logger.info)
    (logger.info if out["passed"] else logger.warning)("warmup %s: %s", out["run_id"], out["verdict"])
    return out


@flow(name="chips-eval")
def eval_flow(config: str | dict, checkpoint: str | None = None, cpt_run_id: str | None = None,
              subset_id: str | None = None) -> dict:
    """Evaluate the config's model (or ``checkpoint`` of the same architecture) on every configured
    suite; one ``evals`` row per metric."""
    cfg, wh = _config(config)
    spec = dataclasses.replace(cfg.model, checkpoint=checkpoint) if checkpoint else cfg.model
    loaded = load_model(spec, cfg.device)
    suites = load_eval_suites(cfg, loaded)
    out = eval_stage(cfg, wh, loaded, suites,
                     checkpoint=checkpoint or spec.checkpoint, cpt_run_id=cpt_run_id, subset_id=subset_id)
    get_run_logger().info("eval %s: %d metrics over %d suites", out["run_id"], len(out["metrics"]), len(suites))
    return out
