"""The warm-up (``chips warmup``): what the premise check advises for a model that does not know the target yet.

Gradient selection needs a model that already knows the target coarsely (scoring/premise.py). When the check fails
as ``cold``, the warm-up trains the model a little on the target's domain and checks again:

1. **the pairs**: a seeded sample of ``warmup.candidates`` pool pairs (never the target's own pairs), featurized
   with the current model against a bank, exactly as the check and the score stage do; those that pass
   ``chips_plus``'s relevance gate (``w_R`` at least the eval pairs' ``score.plus_relevance_quantile``,
   scoring/score.py ``in_domain``) in the seeded order, the first ``warmup.size`` of them;
2. **rounds**: ``warmup.epochs_per_round`` epochs of CPT with ``cpt:``'s settings (replay too) on those pairs, each
   round from the last round's weights (``<out>/round-N/final.pt``), then the premise check again on those weights;
3. **stop** when the check passes, or after ``warmup.max_rounds`` rounds.

A ``warmup`` run records every round (its cpt and check runs are its children); the verdict names the checkpoint to
put in ``model.checkpoint`` and the checks that still fail, with the direction each must move. A model that does not
pass after the last round is reported as such, with what the benchmarks support instead: ``chips_plus``, which reads
no gradient. Rerunning the same command resumes: a round whose CPT finished is not trained again.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import LoadedModel, load_model
from ..scoring.featurize import Featurizer
from ..scoring.identity import seeded_sample
from ..scoring.premise import direction
from ..scoring.score import in_domain, relevance_weight
from .check import check_stage, forward_pairs, target_and_eval_features
from .common import endpoint_for, model_fields, require_pairs
from .cpt import cpt_stage, pair_data
from .featurize import build_bank
from .runconfig import RunConfig


def warmup_pairs(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, pool_ids: list[str],
                 eval_ids: list[str]) -> tuple[list[str], dict]:
    """The warm-up's pairs in training order, and what the gate saw: ``{"candidates", "in_domain"}``."""
    w = cfg.warmup
    eval_set = set(eval_ids)
    pool = [i for i in pool_ids if i not in eval_set]  # never train on the pairs the check reads
    candidates = seeded_sample(pool, min(w.candidates or len(pool), len(pool)), w.seed)
    bank = build_bank(cfg, wh, loaded, pool_ids)
    feat = Featurizer(endpoint_for(cfg, loaded), bank, cfg.sketch, cfg.featurize)
    target, _ = target_and_eval_features(cfg, wh, loaded, feat, eval_ids)
    features = feat.featurize_pre(*forward_pairs(cfg, wh, loaded, feat, candidates), candidates)
    w_r = relevance_weight(features.x.astype(np.float64), features.y.astype(np.float64), target.mu_x, target.mu_y,
                           cfg.score.beta)
    keep = in_domain(w_r, target, cfg.score)
    chosen = [i for i, k in zip(candidates, keep) if k][:w.size]
    return chosen, {"candidates": len(candidates), "in_domain": int(keep.sum())}


def _failing(check: dict) -> list[dict]:
    return [c for c in check["checks"] if c["passed"] is False]


def _moves(check: dict) -> str:
    """``eval_matching 0.52 must rise to >= 0.6, ...`` for the failing checks."""
    return ", ".join(f"{c['name']} {c['value']:.3g} must {direction(c['threshold'])} to {c['threshold']}"
                     for c in _failing(check))


def warmup_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, out_dir: str | Path, run_id: str | None = None,
                 parent_run_id: str | None = None, progress: bool = False,
                 log: Callable[[str], None] = lambda line: None) -> dict:
    """Warm ``loaded`` up on in-domain pool pairs until the premise check passes (see the module doc). Returns
    ``{"run_id", "passed", "checkpoint", "rounds": [{"round", "cpt_run_id", "check_run_id", "final", "passed",
    "failing", "checks"}], "pairs", "gate", "before", "verdict"}``; ``checkpoint``: the passing round's weights
    (None when no round passed, or when the model passed before any round)."""
    w = cfg.warmup
    run_id = run_id or new_run_id("warmup")
    out = Path(out_dir)
    pool_ids, eval_ids = require_pairs(wh, cfg.pool, "pool"), require_pairs(wh, cfg.target, "target")
    with recorded_run(wh, "warmup", cfg, run_id=run_id, parent_run_id=parent_run_id, inputs={"out_dir": str(out)},
                      **model_fields(cfg, loaded)) as row:
        before = check_stage(cfg, wh, loaded, parent_run_id=run_id)
        rounds, ids, gate = [], [], {}
        if before["passed"]:
            verdict = "the premise check passes already: no warm-up needed (chips run CONFIG as it is)"
        else:
            log(f"warm-up: the check fails ({_moves(before)})")
            ids, gate = warmup_pairs(cfg, wh, loaded, pool_ids, eval_ids)
            if len(ids) < 2:
                raise ValueError(f"the warm-up found {len(ids)} in-domain pairs among {gate['candidates']} pool "
                                 f"candidates: raise warmup.candidates, or ingest more of the target's domain")
            log(f"warm-up: {len(ids)} pairs ({gate['in_domain']} of {gate['candidates']} candidates in-domain), "
                f"{w.epochs_per_round} epochs a round, at most {w.max_rounds} rounds")
            round_cfg = dataclasses.replace(cfg, cpt=dataclasses.replace(cfg.cpt, epochs=w.epochs_per_round))
            data = pair_data(wh, ids, loaded)
            model, last = loaded, before
            for n in range(1, w.max_rounds + 1):
                trained = cpt_stage(round_cfg, wh, model, data, out / f"round-{n}", parent_run_id=run_id,
                                    progress=progress, warmup=run_id)
                model = load_model(dataclasses.replace(cfg.model, checkpoint=trained["final"]), cfg.device)
                last = check_stage(cfg, wh, model, parent_run_id=run_id)
                rounds.append({"round": n, "cpt_run_id": trained["run_id"], "check_run_id": last["run_id"],
                               "final": trained["final"], "steps": trained["steps"],
                               "resumed_from_step": trained["resumed_from_step"], "passed": last["passed"],
                               "failing": [c["name"] for c in _failing(last)],
                               "checks": {c["name"]: c["value"] for c in last["checks"]}})
                log(f"warm-up round {n}: " + ("the check passes" if last["passed"] else f"still failing: "
                                                                                        f"{_moves(last)}"))
                if last["passed"]:
                    break
            verdict = _verdict(before, last, rounds, w.max_rounds)
        row.update(rows_in=len(ids), rows_out=len(rounds), rows_quarantined=0,
                   diagnostics_json=json.dumps({"passed_before": before["passed"], "gate": gate, "rounds": rounds,
                                                "verdict": verdict}))
    passed = before["passed"] or bool(rounds and rounds[-1]["passed"])
    return {"run_id": run_id, "passed": passed, "checkpoint": rounds[-1]["final"] if rounds and passed else None,
            "rounds": rounds, "pairs": len(ids), "gate": gate, "before": before, "verdict": verdict}


def _verdict(before: dict, last: dict, rounds: list[dict], max_rounds: int) -> str:
    if last["passed"]:
        return (f"the premise check passes after {len(rounds)} round(s): set model.checkpoint: {rounds[-1]['final']} "
                f"and run chips run CONFIG (on our benchmarks a passing check was needed, and not enough, for a "
                f"gradient selector to beat chips_plus: README, Which selector)")
    moved = {c["name"]: c["value"] for c in before["checks"]}
    trend = ", ".join(f"{c['name']} {moved.get(c['name']):.3g} -> {c['value']:.3g} (must {direction(c['threshold'])} "
                      f"to {c['threshold']})" for c in _failing(last) if moved.get(c["name"]) is not None)
    return (f"the premise check still fails after {max_rounds} warm-up round(s): {trend}. The gradient scores "
            f"(chips, dot, trak, the set-aware selectors) are not to be trusted with this model: select with "
            f"chips_plus, which reads no gradient (README, Which selector); or warm up longer (warmup.max_rounds, "
            f"warmup.epochs_per_round) and check again")
