"""The score stage: target statistics from the eval set (the model runs over the eval set only), then
every method's score for every featurized pool pair from the stored features, bank and curvature,
and the premise checks (``stages/check.py``) in the run's ``diagnostics_json``."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..platform.features import load_bank, load_curvature, read_features
from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import SCHEMAS, Warehouse
from ..scoring.endpoint import EndpointModel, LoadedModel
from ..scoring.featurize import Featurizer
from ..scoring.premise import premise_checks
from ..scoring.score import Preconditioners, score_features, select_top
from .check import pool_sample, target_and_eval_features
from .common import model_fields, require_bank_model, require_pairs
from .runconfig import RunConfig


def scores_table(pair_ids, scores: dict, run_id: str) -> pa.Table:
    """One row per pair of a scoring run; ``utility`` is the CHIPS score, ``rank`` 1 = best (ties by pair id)."""
    order = select_top(scores["chips"], pair_ids, 1.0)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    cols = {"pair_id": list(pair_ids), "run_id": [run_id] * len(pair_ids)}
    cols.update({name: np.asarray(scores[name], dtype=np.float64) for name in SCHEMAS["scores"].names
                 if name in scores})
    cols["utility"] = np.asarray(scores["chips"], dtype=np.float64)
    cols["rank"] = rank
    return pa.table(cols, schema=SCHEMAS["scores"])


def score_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, featurize_run_id: str,
                run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    """Every score for every pool pair of ``featurize_run_id`` against the config's target set."""
    run_id = run_id or new_run_id("score")
    eval_ids = require_pairs(wh, cfg.target, "target")
    with recorded_run(wh, "score", cfg, run_id=run_id, parent_run_id=parent_run_id,
                      inputs={"featurize_run_id": featurize_run_id, "eval_pairs": len(eval_ids)},
                      **model_fields(cfg, loaded)) as row:
        bank = load_bank(wh, featurize_run_id)
        require_bank_model(loaded, bank, featurize_run_id)
        feat = Featurizer(EndpointModel(loaded.model), bank, cfg.sketch, cfg.featurize)
        tstats, eval_features = target_and_eval_features(cfg, wh, loaded, feat, eval_ids)
        features = read_features(wh, featurize_run_id)
        curv = load_curvature(wh, featurize_run_id)
        scores = score_features(features, tstats, curv, cfg.curvature, cfg.score,
                                Preconditioners.solve(tstats, curv, cfg.curvature))
        wh.write("scores", scores_table(features.pair_id, scores, run_id), {"run": run_id}, "scores")
        premise = premise_checks(eval_features, tstats.eval_loss, pool_sample(cfg, features), len(bank.pair_ids),
                                 cfg.check)
        row.update(bank_id=bank.bank_id, rows_in=len(features), rows_out=len(features), rows_quarantined=0,
                   diagnostics_json=premise.to_json())
    return {"run_id": run_id, "pairs": len(features), "eval_pairs": len(eval_ids), "eval_loss": tstats.eval_loss,
            "premise_passed": premise.passed, "premise": premise.verdict()}
