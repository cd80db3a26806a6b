"""A refresh featurizes only what changed: day 1 a pool, day 2 new pairs ingested beside it; the day-2 featurize run
reuses day 1's bank and the features parts of every unchanged shard, forwards only the new pairs, and reuses or
recomputes the curvature by how much the pool grew; a changed model forwards everything again and says why."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from chips_core.platform.features import feature_parts, load_bank, load_curvature, read_features
from chips_core.platform.readers import SourceSpec
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import EndpointModel, load_model
from chips_core.scoring.featurize import Featurizer
from chips_core.stages import featurize_stage, ingest_stage, load_run_config, score_stage
from chips_core.stages.common import load_pairs, source_pair_ids
from chips_core.train.synthetic import make_pairs
from flows.demo import write_folder

from ..conftest import tiny_pipeline_config

DAY1, DAY2, TARGET = 1000, 100, 20  # the day 1 and day 2; 10 of them are taken down below


@pytest.fixture(scope="module")
def days(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("refresh")
    raw = tiny_pipeline_config(tmp, demo_model, DAY1, TARGET, seed=5, sketch={"k": 32}, bank={"size": 24},
                               curvature={"n_curv": 40, "hard_negatives": 4}, shard_size=64)
    write_folder(tmp / "pool-day2", make_pairs(DAY2, seed=55), DAY2)
    day1 = load_run_config(raw)
    day2 = dataclasses.replace(day1, pool=(SourceSpec("pool", "folder", (str(tmp / "pool"), str(tmp / "pool-day2"))),))
    wh = Warehouse(day1.warehouse)
    loaded = load_model(day1.model)
    ingest_stage(list(day1.pool) + list(day1.target), wh)
    first = featurize_stage(day1, wh, loaded, run_id="day1")
    ingest_stage(list(day2.pool), wh)  # day 1's files unchanged, 30 new pairs in a new part
    return tmp, day1, day2, wh, loaded, first


def _counting(model):
    seen, original = [], model.encode_image

    def counting(images, *a, **kw):
        seen.append(len(images))
        return original(images, *a, **kw)
    model.encode_image = counting
    return seen


def test_a_day2_refresh_forwards_the_new_pairs_and_the_target_set_only(days):
    """The whole day-2 refresh (ingest, featurize, score, materialize) forwards the 100 new pairs and the target
    set through the image tower, nothing else (counted, in micro-batches)."""
    from chips_core.stages import run_pipeline

    _, _, day2, wh, loaded, _ = days
    seen = _counting(loaded.model)
    try:
        out = run_pipeline(day2, loaded, wh=wh, refresh=True)
    finally:
        del loaded.model.encode_image
    micro = day2.featurize.micro_batch
    assert sum(seen) == micro * (-(-DAY2 // micro) + -(-TARGET // micro)), seen
    assert out["featurize"]["refresh"]["pairs_forwarded"] == DAY2 and out["score"]["pairs"] == DAY1 + DAY2


def test_day2_forwards_only_the_new_pairs_and_reuses_the_rest(days):
    _, day1, day2, wh, loaded, first = days
    seen = _counting(loaded.model)
    try:
        out = featurize_stage(day2, wh, loaded, run_id="day2", reuse="day1")
    finally:
        del loaded.model.encode_image
    micro = day2.featurize.micro_batch
    assert sum(seen) == micro * -(-DAY2 // micro), f"forwarded {sum(seen)} images for {DAY2} new pairs"
    r = out["refresh"]
    assert (r["reused"], r["pairs_reused"], r["pairs_forwarded"], r["curvature"]) == (True, DAY1, DAY2, "reused")
    assert out["pairs"] == DAY1 + DAY2 and out["bank_id"] == first["bank_id"]

    # the day-1 parts are read in place (not copied, not rewritten), and every current pair has features
    assert set(feature_parts(wh, "day1")) <= set(feature_parts(wh, "day2"))
    old, new = read_features(wh, "day1"), read_features(wh, "day2")
    assert sorted(new.pair_id) == sorted(source_pair_ids(wh, day2.pool))
    pos = {p: i for i, p in enumerate(new.pair_id)}
    rows = [pos[p] for p in old.pair_id]
    for name in ("x", "y", "g", "p_corr", "margin", "clipscore", "loss"):
        np.testing.assert_array_equal(getattr(new, name)[rows], getattr(old, name))
    assert load_curvature(wh, "day2").identity == load_curvature(wh, "day1").identity

    # the new pairs: the features of forwarding them against the kept bank
    fresh = sorted(set(new.pair_id) - set(old.pair_id))
    ref = Featurizer(EndpointModel(loaded.model), load_bank(wh, "day1"), day2.sketch, day2.featurize).featurize(
        *load_pairs(wh, fresh, loaded), fresh)
    got = new.take(np.array([pos[p] for p in fresh]))
    np.testing.assert_array_equal(got.to_arrow("float16").column("g").to_pylist(),
                                  ref.to_arrow("float16").column("g").to_pylist())

    # a refresh's score covers every current pair (parts from two runs, whose file names repeat)
    assert score_stage(day2, wh, loaded, "day2")["pairs"] == DAY1 + DAY2


def test_growth_past_the_threshold_recomputes_the_curvature(days):
    _, _, day2, wh, loaded, _ = days
    cfg = dataclasses.replace(day2, refresh=dataclasses.replace(day2.refresh, recompute_curvature_after=0.05))
    out = featurize_stage(cfg, wh, loaded, run_id="day2-recomputed", reuse="day1")
    assert out["refresh"]["curvature"] == "recomputed" and out["refresh"]["pool_growth"] == pytest.approx(DAY2 / DAY1)
    curv, before = load_curvature(wh, "day2-recomputed"), load_curvature(wh, "day1")
    assert curv.n == before.n and not np.array_equal(curv.phi_pos, before.phi_pos)  # a sample of the grown pool
    # the same statistics as the day-2 run that reused them, had it recomputed: refresh twice, same bytes
    again = featurize_stage(cfg, wh, loaded, run_id="day2-recomputed-again", reuse="day1")
    assert again["refresh"]["curvature"] == "recomputed"
    np.testing.assert_array_equal(load_curvature(wh, "day2-recomputed-again").phi_neg, curv.phi_neg)


def test_a_new_checkpoint_forwards_everything_and_says_why(days, caplog):
    tmp, _, day2, wh, loaded, _ = days
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    state["visual.proj"] += 0.01
    torch.save(state, tmp / "after-cpt.pt")
    cfg = dataclasses.replace(day2, model=dataclasses.replace(day2.model, checkpoint=str(tmp / "after-cpt.pt")))
    other = load_model(cfg.model)
    with caplog.at_level(logging.WARNING, logger="chips"):
        out = featurize_stage(cfg, wh, other, run_id="day2-new-model", reuse="day1")
    r = out["refresh"]
    assert not r["reused"] and r["pairs_forwarded"] == DAY1 + DAY2 and "the model changed" in r["reason"]
    assert any("the model changed" in m and "featurized again" in m for m in caplog.messages)
    assert out["bank_id"] != load_bank(wh, "day1").bank_id
    import json

    runs = wh.read("runs").to_pylist()
    row = [x for x in runs if x["run_id"] == "day2-new-model"][0]
    assert "the model changed" in json.loads(row["diagnostics_json"])["refresh"]["reason"]


def test_a_refresh_killed_mid_featurize_resumes_to_the_same_bytes(days):
    """A refresh's featurize killed after its forwarded shards but before the curvature reduce (their parts and the
    curvature file removed, as if never written), then rerun under the same run id: the same files, byte for byte."""
    import glob
    import hashlib
    import os

    _, _, day2, wh, loaded, _ = days

    def files(run_id):
        found = sorted(glob.glob(f"{wh.root}/features/run={run_id}/*.parquet") +
                       glob.glob(f"{wh.root}/globals/run={run_id}/**/*.*", recursive=True))
        return {os.path.relpath(p, wh.root): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in found}

    featurize_stage(day2, wh, loaded, run_id="day2-killed", reuse="day1")
    whole = files("day2-killed")
    own = glob.glob(f"{wh.root}/features/run=day2-killed/*.parquet")
    assert own  # the new pairs' shard was forwarded into this run
    for p in own + glob.glob(f"{wh.root}/globals/run=day2-killed/curvature.npz"):
        os.remove(p)
    again = featurize_stage(day2, wh, loaded, run_id="day2-killed", reuse="day1")
    assert again["shards_written"] == len(own) and files("day2-killed") == whole


@pytest.mark.parametrize("stage", ["ingest", "takedown", "featurize", "score", "materialize", "publish"])
def test_a_refresh_killed_at_a_stage_then_rerun_gives_the_same_tables(days, monkeypatch, stage):
    """`chips refresh` (with a takedown list and publishing to Delta and Iceberg) killed inside any of its stages,
    then run again: the same subsets, and the same published subsets and runs, as a refresh never interrupted."""
    import chips_core.stages.featurize as F
    import chips_core.stages.ingest as I
    import chips_core.stages.materialize as M
    import chips_core.stages.publish as P
    import chips_core.stages.score as S
    import chips_core.stages.takedown as T
    from deltalake import DeltaTable

    from chips_core.platform.lakehouse import delta_uri, iceberg_catalog
    from chips_core.stages import run_pipeline
    from chips_core.stages.runconfig import PublishConfig

    tmp, _, day2, wh, loaded, _ = days
    listed = tmp / f"optout-{stage}.csv"
    listed.write_text("source_key,reason\n" + "".join(f"{k},opt-out\n" for k in _source_keys(wh, 10)))
    cfg = dataclasses.replace(day2, takedowns=(str(listed),), publish=PublishConfig(delta=True, iceberg=True))

    def subsets(rows, run_id):
        return sorted((r["method"], r["budget"], r["pair_id"], r["rank"]) for r in rows if r["run_id"] == run_id)

    def published(out):
        """This refresh's subsets as Delta and Iceberg hold them, and the stages of its published runs rows."""
        mat = out["materialize"]["run_id"]
        ice = iceberg_catalog(wh).load_table("chips.subsets").scan().to_arrow().to_pylist()
        runs = [r for r in DeltaTable(delta_uri(wh, "runs")).to_pyarrow_table().to_pylist()
                if r["root_run_id"] == out["run_id"]]
        return (subsets(DeltaTable(delta_uri(wh, "subsets")).to_pyarrow_table().to_pylist(), mat), subsets(ice, mat),
                sorted((r["stage"], r["status"]) for r in runs))

    uninterrupted = run_pipeline(cfg, loaded, wh=wh, refresh=True)
    want = subsets(wh.read("subsets").to_pylist(), uninterrupted["materialize"]["run_id"])
    assert want and not {r[2] for r in want} & set(_taken_down(wh))
    target = {"ingest": (I, "ingest_shard"), "takedown": (T, "read_takedown_list"),
              "featurize": (F, "featurize_curvature"), "score": (S, "write_ranked_scores"),
              "materialize": (M, "write_manifests"), "publish": (P, "publish_iceberg")}[stage]

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")
    with monkeypatch.context() as m:
        m.setattr(*target, killed)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg, loaded, wh=wh, refresh=True)
    again = run_pipeline(cfg, loaded, wh=wh, refresh=True)
    assert subsets(wh.read("subsets").to_pylist(), again["materialize"]["run_id"]) == want
    assert published(again) == published(uninterrupted) == (want, want, sorted(
        (s, "succeeded") for s in ("refresh", "ingest", "takedown", "featurize", "score", "materialize", "publish")))


def _source_keys(wh, n):
    rows = wh.read("pair_sources", columns=["source", "source_key"]).to_pylist()
    return sorted(r["source_key"] for r in rows if r["source"] == "pool")[:n]


def _taken_down(wh):
    return [p for p in wh.read("takedowns", columns=["pair_id"]).column("pair_id").to_pylist() if p]
