"""The warm-up (`chips warmup`): CPT rounds on in-domain pool pairs for a model that fails the premise check, the check
after each round, stopping when it passes or after warmup.max_rounds; a real untrained open_clip model, a real
warehouse, real CPT."""
import json

import pytest
import torch

from chips_core.platform.query import connect, query
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import build_custom_model, load_model
from chips_core.stages import check_stage, ingest_stage, load_run_config, warmup_stage
from chips_core.stages.common import source_pair_ids
from chips_core.stages.warmup import warmup_pairs
from chips_core.train.synthetic import DEMO_MODEL_CONFIG

from ..conftest import tiny_pipeline_config

CHECK = {"pool_sample": 128, "full_param_sample": 0, "full_param_bank": 16}


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """A pool of synthetic scans and photos, a scan target, and the demo architecture untrained (a cold model)."""
    tmp = tmp_path_factory.mktemp("warmup")
    torch.manual_seed(0)
    raw = tiny_pipeline_config(tmp, build_custom_model(DEMO_MODEL_CONFIG).eval(), 600, 60, seed=31, sketch={"k": 32},
                               bank={"size": 64}, check=CHECK,
                               cpt={"batch_size": 32, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 1000},
                               warmup={"size": 192, "candidates": 400, "epochs_per_round": 4, "max_rounds": 2})
    cfg = load_run_config(raw)
    wh = Warehouse(cfg.warehouse)
    ingest_stage(list(cfg.pool) + list(cfg.target), wh)
    return raw, wh, tmp


def _cfg(raw, **check):
    return load_run_config({**raw, "check": {**CHECK, **check}})


def test_the_warm_up_pairs_are_seeded_in_domain_pool_pairs_never_the_targets(cold):
    raw, wh, _ = cold
    cfg = _cfg(raw)
    loaded = load_model(cfg.model)
    pool, target = source_pair_ids(wh, cfg.pool), source_pair_ids(wh, cfg.target)
    ids, gate = warmup_pairs(cfg, wh, loaded, pool, target)
    assert gate["candidates"] == 400 and 2 <= gate["in_domain"] < 400  # the gate lets some through, not all
    assert len(ids) == min(192, gate["in_domain"]) and set(ids) <= set(pool) and not set(ids) & set(target)
    assert warmup_pairs(cfg, wh, loaded, pool, target)[0] == ids  # seeded: the same pairs in the same order
    other = load_run_config({**raw, "warmup": {**raw["warmup"], "seed": 1}})
    assert warmup_pairs(other, wh, loaded, pool, target)[0] != ids


def test_a_warm_up_that_cannot_pass_runs_every_round_and_recommends_chips_plus(cold):
    """An unreachable threshold: both rounds run, eval matching rises over them, and the verdict says the check still
    fails, which way each failing check must move, and to select with chips_plus; each round is a cpt and a check run
    under the warmup run."""
    raw, wh, tmp = cold
    cfg = _cfg(raw, min_eval_matching=1.0)
    out = warmup_stage(cfg, wh, load_model(cfg.model), tmp / "never")
    assert not out["passed"] and out["checkpoint"] is None and len(out["rounds"]) == 2
    before = {c["name"]: c["value"] for c in out["before"]["checks"]}["eval_matching"]
    after = [r["checks"]["eval_matching"] for r in out["rounds"]]
    assert before < after[0] < after[1], (before, after)  # the in-domain CPT teaches the cold model the target
    assert "still fails after 2 warm-up round(s)" in out["verdict"]
    assert f"eval_matching {before:.3g} -> {after[1]:.3g} (must rise to >= 1.0)" in out["verdict"]
    assert "select with chips_plus" in out["verdict"]
    runs = query(connect(wh), "select stage, status, parent_run_id from stg_runs where run_id = $r or parent_run_id = $r",
                 {"r": out["run_id"]}).to_pylist()
    assert sorted(r["stage"] for r in runs) == ["check", "check", "check", "cpt", "cpt", "warmup"]
    assert {r["status"] for r in runs} == {"succeeded"}
    diag = json.loads(query(connect(wh), "select diagnostics_json d from stg_runs where run_id = $r",
                            {"r": out["run_id"]}).to_pylist()[0]["d"])
    assert [r["round"] for r in diag["rounds"]] == [1, 2] and diag["verdict"] == out["verdict"]


def test_a_warm_up_stops_at_the_first_passing_round_names_its_checkpoint_and_resumes(cold):
    """A threshold just above the cold model's eval matching (every other check relaxed): round 1 passes, the run
    stops there and names round 1's weights; the same command again trains nothing (round 1 resumes finished)."""
    raw, wh, tmp = cold
    relaxed = dict(max_eval_loss_ratio=100.0, min_p_corr_over_chance=0.0, max_mean_cosine=1.0, min_w_learn_spread=0.0)
    cfg = _cfg(raw, **relaxed)
    cold_matching = {c["name"]: c["value"] for c in check_stage(cfg, wh, load_model(cfg.model))["checks"]}["eval_matching"]
    cfg = _cfg(raw, **relaxed, min_eval_matching=max(0.5, cold_matching + 0.005))
    out = warmup_stage(cfg, wh, load_model(cfg.model), tmp / "once")
    assert out["passed"] and len(out["rounds"]) == 1 and out["checkpoint"] == out["rounds"][0]["final"]
    assert f"set model.checkpoint: {out['checkpoint']}" in out["verdict"]
    warmed = load_model(load_run_config({**raw, "model": {**raw["model"], "checkpoint": out["checkpoint"]}}).model)
    assert check_stage(cfg, wh, warmed)["passed"]  # the named checkpoint is the one that passed
    again = warmup_stage(cfg, wh, load_model(cfg.model), tmp / "once")
    assert again["rounds"][0]["resumed_from_step"] == again["rounds"][0]["steps"] > 0
    assert again["checkpoint"] == out["checkpoint"] and again["rounds"][0]["checks"] == out["rounds"][0]["checks"]


def test_a_model_that_passes_already_is_not_trained(cold, demo_model):
    raw, wh, tmp = cold
    torch.save(demo_model.state_dict(), tmp / "trained.pt")
    cfg = load_run_config({**raw, "model": {**raw["model"], "checkpoint": str(tmp / "trained.pt")}})
    out = warmup_stage(cfg, wh, load_model(cfg.model), tmp / "none")
    assert out["before"]["passed"], out["before"]["verdict"]
    assert out["passed"] and out["rounds"] == [] and out["checkpoint"] is None and "no warm-up needed" in out["verdict"]
    assert not (tmp / "none" / "round-1").exists()
