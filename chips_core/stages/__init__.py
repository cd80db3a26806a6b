"""The pipeline's stages, one module each: plain functions over the warehouse that read tables, write
tables (per shard where the work is per pair) and record one ``runs`` row. ``pipeline`` holds the one
sequence that runs them; orchestrators (``flows/``) wrap these functions and never re-write them."""
from .check import check_stage
from .cpt import cpt_stage, manifest_data, subset_data
from .eval import eval_stage, load_eval_suites
from .featurize import featurize_stage
from .ingest import ingest_stage
from .materialize import materialize_stage
from .pipeline import last_featurize_run, local_stages, run_pipeline, run_rescore
from .publish import publish_stage
from .runconfig import RunConfig, load_run_config
from .score import score_stage
from .takedown import takedown_stage
from .warmup import warmup_stage

__all__ = ["check_stage", "cpt_stage", "manifest_data", "subset_data", "eval_stage", "load_eval_suites", "featurize_stage",
           "ingest_stage", "materialize_stage", "local_stages", "last_featurize_run", "run_pipeline", "run_rescore", "publish_stage",
           "RunConfig", "load_run_config", "score_stage", "takedown_stage", "warmup_stage"]
