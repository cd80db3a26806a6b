"""Takedowns: a list of pair ids, source keys, image URLs or sha256s matched to the ingested pairs; every listed
pair is left out of every later subset and manifest, the run and ``stg_takedowns`` say what was honoured and what
matched nothing, and earlier subsets are not rewritten."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from chips_core.errors import ConfigError
from chips_core.platform.query import connect, query
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import load_model
from chips_core.stages import featurize_stage, ingest_stage, load_run_config, materialize_stage, score_stage, takedown_stage

from ..conftest import tiny_pipeline_config


@pytest.fixture(scope="module")
def scored(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("takedowns")
    cfg = load_run_config(tiny_pipeline_config(tmp, demo_model, 60, 12, seed=9, sketch={"k": 32}, bank={"size": 16},
                                               curvature={"n_curv": 20, "hard_negatives": 4}, budgets=[0.5],
                                               outputs={"dir": str(tmp / "out")}))
    wh = Warehouse(cfg.warehouse)
    loaded = load_model(cfg.model)
    ingest_stage(list(cfg.pool) + list(cfg.target), wh)
    featurize_stage(cfg, wh, loaded, run_id="f")
    score = score_stage(cfg, wh, loaded, "f")
    before = materialize_stage(cfg, wh, score["run_id"])
    return tmp, cfg, wh, score["run_id"], before


def test_listed_pairs_leave_every_later_subset_and_manifest(scored):
    tmp, cfg, wh, score_run, before = scored
    con = connect(wh)
    pairs = query(con, "select p.pair_id, s.source_key, p.image_sha256 from stg_pairs p join stg_pair_sources s "
                       "using (pair_id) where s.source = 'pool' order by p.pair_id").to_pylist()
    by_id, by_key, by_hash = pairs[0]["pair_id"], pairs[1]["source_key"], pairs[2]["image_sha256"]
    want = {pairs[0]["pair_id"], pairs[1]["pair_id"], pairs[2]["pair_id"]}
    listed = tmp / "optout.csv"
    with open(listed, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair_id", "source_key", "sha256", "reason"])
        w.writerow([by_id, "", "", "opt-out"])
        w.writerow(["", by_key, "", "dmca"])
        w.writerow(["", "", by_hash, ""])
        w.writerow(["no-such-pair", "", "", "typo"])
    cfg = dataclasses.replace(cfg, takedowns=(str(listed),))
    out = takedown_stage(cfg, wh)
    assert (out["keys"], out["pairs_taken_down"], out["keys_unmatched"]) == (4, 3, 1)
    assert out["unmatched_examples"] == ["pair_id=no-such-pair"]

    after = materialize_stage(cfg, wh, score_run)
    assert after["taken_down"] == 3
    con = connect(wh)
    sub = query(con, "select subset_id, pair_id from stg_subsets where run_id = $r", {"r": after["run_id"]}).to_pylist()
    assert sub and not want & {r["pair_id"] for r in sub}
    full = [r for r in sub if r["subset_id"].endswith(":full@1")]
    assert len(full) == 60 - 3  # budgets are shares of the pairs still there
    for f in after["files"]:
        if f.endswith(".csv"):
            text = open(f).read()
            assert not any(p in text for p in want), f
    # the earlier subsets are not rewritten: a later materialize supersedes them
    old = query(con, "select pair_id from stg_subsets where run_id = $r", {"r": before["run_id"]}).column("pair_id")
    assert want <= set(old.to_pylist())
    report = query(con, "select kind, key, honoured, reason from stg_takedowns order by kind, key").to_pylist()
    assert sum(r["honoured"] for r in report) == 3 and [r for r in report if not r["honoured"]] == [
        {"kind": "pair_id", "key": "no-such-pair", "honoured": False, "reason": "typo"}]
    row = [r for r in wh.read("runs").to_pylist() if r["run_id"] == out["run_id"]][0]
    assert json.loads(row["diagnostics_json"])["pairs_taken_down"] == 3 and row["stage"] == "takedown"


def test_a_list_without_key_columns_is_refused_by_name(scored, tmp_path):
    _, cfg, wh, _, _ = scored
    bad = tmp_path / "list.csv"
    bad.write_text("id,why\nabc,x\n")
    with pytest.raises(ConfigError, match=r"list.csv' has none of the columns \('pair_id', 'source_key', 'url', 'sha256'\)"):
        takedown_stage(dataclasses.replace(cfg, takedowns=(str(bad),)), wh)
    with pytest.raises(ConfigError, match="takedown list not found"):
        takedown_stage(dataclasses.replace(cfg, takedowns=(str(tmp_path / "nope.csv"),)), wh)
