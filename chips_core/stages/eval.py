"""The eval stage: every metric of every configured suite for one model, as ``evals`` rows that join
to the subset (and so the method and budget) that trained it."""
from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import SCHEMAS, Warehouse
from ..scoring.endpoint import LoadedModel, image_preprocess
from ..train.evaluate import EvalSuite, evaluate_suite, load_eval_suite
from .common import model_fields
from .runconfig import RunConfig


def load_eval_suites(cfg: RunConfig, loaded: LoadedModel) -> list[EvalSuite]:
    """The config's ``eval_suites``, read and preprocessed for ``loaded``'s image size."""
    if not cfg.eval_suites:
        raise ValueError("the config names no eval_suites")
    prep = image_preprocess(loaded.model)
    return [load_eval_suite(s, prep) for s in cfg.eval_suites]


def eval_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, suites: Sequence[EvalSuite],
               checkpoint: str | None = None, cpt_run_id: str | None = None, subset_id: str | None = None,
               run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """Evaluate ``loaded`` on ``suites``; one ``evals`` row per (suite, metric)."""
    run_id = run_id or new_run_id("eval")
    rows = []
    with recorded_run(wh, "eval", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"checkpoint": checkpoint, "cpt_run_id": cpt_run_id, "subset_id": subset_id,
                              "suites": [s.name for s in suites]}, **model_fields(cfg, loaded)) as row:
        for suite in suites:
            for metric, value in evaluate_suite(loaded.model, loaded.tokenizer, suite, cfg.device).items():
                rows.append({"run_id": run_id, "cpt_run_id": cpt_run_id, "subset_id": subset_id,
                             "model_checkpoint": checkpoint, "model_checksum": loaded.checksum, "suite": suite.name,
                             "metric": metric, "value": value, "n": len(suite.captions)})
        wh.write("evals", pa.Table.from_pylist(rows, schema=SCHEMAS["evals"]), {"run": run_id}, "evals")
        row.update(rows_in=sum(len(s.captions) for s in suites), rows_out=len(rows), rows_quarantined=0)
    return {"run_id": run_id, "metrics": rows}
