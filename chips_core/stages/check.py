"""The premise check (``chips check``; also part of every score run): does this model know this target
well enough for gradient-based selection to mean something? See ``scoring/premise.py`` for the checks.

``check_stage`` runs before anything is featurized (it forwards the bank, a pool sample and the eval
set only), so a team learns that the premise fails before it pays for featurizing the pool. A score
run measures every check but the end-point vs full-parameter one from what it computes anyway (the
model runs over the eval set once, never over the pool: a rescore stays target-only)."""
from __future__ import annotations

import dataclasses

from scipy.stats import spearmanr

from ..platform.provenance import new_run_id, recorded_run
from ..platform.warehouse import Warehouse
from ..scoring.endpoint import LoadedModel
from ..scoring.featurize import FeatureBatch, Featurizer, forward_pre_batches
from ..scoring.identity import seeded_sample
from ..scoring.premise import premise_checks
from ..scoring.reference import full_parameter_alignment
from ..scoring.target import TargetStats, target_stats_pre
from .common import endpoint_for, featurize_workers, input_batches, load_pairs, model_fields, require_pairs
from .featurize import build_bank
from .runconfig import RunConfig


def endpoint_spearman(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, bank_ids: list[str], eval_ids: list[str],
                      pool_ids: list[str]) -> float | None:
    """Spearman of end-point vs full-parameter alignment on a seeded pool sample (None when configured off)."""
    c = cfg.check
    if not c.full_param_sample:
        return None
    sample = seeded_sample(pool_ids, min(c.full_param_sample, len(pool_ids)), c.seed)
    bank = bank_ids[:c.full_param_bank]
    evals = seeded_sample(eval_ids, min(c.full_param_bank, len(eval_ids)), c.seed)
    device = next(loaded.model.parameters()).device
    on = lambda t: t.to(device)  # noqa: E731
    images, texts = map(on, load_pairs(wh, sample, loaded))
    bi, bt = map(on, load_pairs(wh, bank, loaded))
    ei, et = map(on, load_pairs(wh, evals, loaded))
    full, end = (full_parameter_alignment(loaded.model, images, texts, sample, bi, bt, bank, ei, et, params=p)
                 for p in ("all", "endpoint"))
    return float(spearmanr(full, end).statistic)


def target_and_eval_features(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, feat: Featurizer,
                             eval_ids: list[str]) -> tuple[TargetStats, FeatureBatch]:
    """One forward pass over the eval set: its target statistics (§4–§6) and its features against the bank."""
    h_v, h_t = forward_pairs(cfg, wh, loaded, feat, eval_ids)
    return target_stats_pre(feat.ctx, h_v, h_t, eval_ids, cfg.featurize), feat.featurize_pre(h_v, h_t, eval_ids)


def forward_pairs(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, feat: Featurizer, ids: list[str]):
    """The model's pre-projection outputs ``(h_v, h_t)`` for the warehouse's pairs ``ids``, in micro-batches decoded
    as featurize does (``featurize.num_workers``)."""
    mb = cfg.featurize.micro_batch
    batches = input_batches(wh.read_pairs(ids), loaded, mb, featurize_workers(cfg, loaded))
    return forward_pre_batches(feat.endpoint, batches, mb)


def pool_sample_ids(cfg: RunConfig, pool_ids: list[str]) -> list[str]:
    """The seeded pool sample the learnability check reads (the same pairs in a check and a score run)."""
    return seeded_sample(pool_ids, min(cfg.check.pool_sample, len(pool_ids)), cfg.check.seed)


def check_stage(cfg: RunConfig, wh: Warehouse, loaded: LoadedModel, run_id: str | None = None,
                parent_run_id: str | None = None) -> dict:
    """The premise check over the ingested pool and target, before any featurization; one ``check`` run
    whose ``diagnostics_json`` holds every check."""
    run_id = run_id or new_run_id("check")
    pool_ids, eval_ids = require_pairs(wh, cfg.pool, "pool"), require_pairs(wh, cfg.target, "target")
    with recorded_run(wh, "check", cfg, run_id=run_id, parent_run_id=parent_run_id, **model_fields(cfg, loaded)) as row:
        bank = build_bank(cfg, wh, loaded, pool_ids)
        feat = Featurizer(endpoint_for(cfg, loaded), bank, cfg.sketch, cfg.featurize)
        sample = pool_sample_ids(cfg, pool_ids)
        pool_features = feat.featurize(*load_pairs(wh, sample, loaded), sample)
        tstats, eval_features = target_and_eval_features(cfg, wh, loaded, feat, eval_ids)
        spearman = endpoint_spearman(cfg, wh, loaded, bank.pair_ids, eval_ids, pool_ids)
        report = premise_checks(eval_features, tstats.eval_loss, pool_features, len(bank.pair_ids), cfg.check, spearman,
                                min(cfg.check.full_param_sample, len(pool_ids)),
                                endpoint_note="skipped: check.full_param_sample is 0")
        row.update(bank_id=bank.bank_id, rows_in=len(sample) + len(eval_ids), rows_out=0, rows_quarantined=0,
                   diagnostics_json=report.to_json())
    return {"run_id": run_id, "passed": report.passed, "verdict": report.verdict(),
            "checks": [dataclasses.asdict(c) for c in report.checks]}
