"""Real Prefect flow runs (one temporary Prefect API for the session) over a real warehouse."""
import pytest
import yaml

from chips_core.platform.query import connect, query, run_audits
from chips_core.platform.warehouse import Warehouse
from chips_core.train.synthetic import make_pairs
from flows.demo import write_folder

from ..conftest import tiny_pipeline_config

pytestmark = pytest.mark.slow  # real Prefect runs / training: deselect with -m 'not slow'


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("flows")
    cfg = tiny_pipeline_config(tmp, demo_model, 90, 20, seed=7, sketch={"k": 64}, bank={"size": 32},
                               curvature={"n_curv": 40, "hard_negatives": 4}, budgets=[0.2, 0.5], shard_size=30,
                               outputs={"dir": str(tmp / "out")})
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_flow_end_to_end(prefect_api, config_path):
    from flows.chips_flows import pipeline_flow

    out = pipeline_flow(str(config_path))
    assert out["featurize"]["shards"] == 3 and out["featurize"]["shards_written"] == 3
    wh = Warehouse(yaml.safe_load(config_path.read_text())["warehouse"])
    con = connect(wh)
    runs = query(con, "select stage, parent_run_id, status from stg_runs order by stage").to_pylist()
    assert [r["stage"] for r in runs] == ["featurize", "ingest", "materialize", "pipeline", "score"]
    assert all(r["status"] == "succeeded" for r in runs)
    assert {r["parent_run_id"] for r in runs if r["stage"] != "pipeline"} == {out["run_id"]}
    assert all(t.num_rows == 0 for t in run_audits(con).values())
    n = query(con, "select count(*) n from stg_subsets where method = 'chips' and budget = 0.2").column("n")
    assert n.to_pylist() == [18]


def test_featurize_flow_resumes_missing_shards_only(prefect_api, config_path):
    import os

    from flows.chips_flows import featurize_flow, ingest_flow

    ingest_flow(str(config_path))
    first = featurize_flow(str(config_path), run_id="featurize-resume")
    wh = Warehouse(yaml.safe_load(config_path.read_text())["warehouse"])
    parts = sorted(wh.fs.glob(f"{wh.root}/features/run=featurize-resume/*.parquet"))
    before = open(parts[2], "rb").read()
    os.remove(parts[2])
    again = featurize_flow(str(config_path), run_id="featurize-resume")
    assert (first["shards_written"], again["shards_written"]) == (3, 1)
    assert open(parts[2], "rb").read() == before


def test_bad_config_names_the_key(tmp_path):
    from chips_core.errors import ConfigError
    from chips_core.stages.runconfig import load_run_config

    p = tmp_path / "bad.yaml"
    p.write_text("warehouse: /tmp/x\npool: []\ntarget: []\nmodel: {name: RN50}\nsketch: {k: -3}\n")
    with pytest.raises(ConfigError, match=r"sketch\.SketchConfig\.k=-3"):
        load_run_config(p)
    p.write_text("warehouse: /tmp/x\npool: []\ntarget: []\nmodel: {name: RN50}\nbudget: [0.1]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'budget'"):
        load_run_config(p)


def test_rescore_runs_the_model_over_the_new_target_only(prefect_api, config_path, tmp_path):
    from chips_core.scoring.endpoint import shared_model
    from chips_core.stages.runconfig import load_run_config
    from flows.chips_flows import featurize_flow, ingest_flow, rescore_flow

    base = yaml.safe_load(config_path.read_text())
    ingest_flow(str(config_path))  # a no-op (all unchanged) when an earlier test ingested already
    feat = featurize_flow(str(config_path), run_id="featurize-for-rescore")
    write_folder(tmp_path / "new-target", make_pairs(17, seed=99, scan_fraction=0.0, noise_fraction=0.0), 17)
    new = {**base, "target": [{"name": "new-target", "kind": "folder", "paths": [str(tmp_path / "new-target")]}]}
    cfg = load_run_config(new)
    model = shared_model(cfg.model, cfg.device).model
    seen = []
    original = model.encode_image

    def counting(images, *a, **kw):
        seen.append(len(images))
        return original(images, *a, **kw)

    model.encode_image = counting
    try:
        out = rescore_flow(new, feat["run_id"])
    finally:
        del model.encode_image
    micro = cfg.featurize.micro_batch
    assert sum(seen) == micro * -(-17 // micro), f"forwarded {sum(seen)} images for a 17-pair target"
    assert out["score"]["pairs"] == 90 and out["score"]["eval_pairs"] == 17


def test_featurize_flow_with_decode_workers_equals_decoding_in_process(prefect_api, config_path):
    """DataLoader workers forked inside a Prefect flow (shard tasks on threads, Prefect's services running):
    they finish cleanly (Prefect's exit hooks asserted in a forked child and failed every shard) and the feature
    parts are the bytes of a run decoding in process."""
    import glob
    import hashlib

    from flows.chips_flows import featurize_flow

    base = yaml.safe_load(config_path.read_text())
    digests = {}
    for workers in (0, 2):
        cfg = {**base, "featurize": {**base.get("featurize", {}), "num_workers": workers}}
        out = featurize_flow(cfg, run_id=f"featurize-workers-{workers}")
        assert out["shards_written"] == 3
        parts = sorted(glob.glob(f"{base['warehouse']}/features/run=featurize-workers-{workers}/*.parquet"))
        digests[workers] = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in parts]
    assert len(digests[0]) == 3 and digests[2] == digests[0]


def test_featurize_and_score_on_dask_equal_the_local_run(prefect_api, config_path):
    """Two Dask worker processes (prefect-dask's DaskTaskRunner on a LocalCluster) write byte-identical
    feature shards, and the scores computed from them are identical to the single-process run's."""
    import hashlib

    from prefect_dask import DaskTaskRunner

    from flows.chips_flows import featurize_flow, ingest_flow, score_flow

    ingest_flow(str(config_path))
    featurize_flow(str(config_path), run_id="featurize-local")
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "processes": True, "threads_per_worker": 1})
    featurize_flow.with_options(task_runner=runner)(str(config_path), run_id="featurize-dask")
    wh = Warehouse(yaml.safe_load(config_path.read_text())["warehouse"])

    def digests(run):
        parts = sorted(wh.fs.glob(f"{wh.root}/features/run={run}/*.parquet"))
        return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in parts]

    assert len(digests("featurize-local")) == 3 and digests("featurize-local") == digests("featurize-dask")
    a = score_flow(str(config_path), "featurize-local")
    b = score_flow(str(config_path), "featurize-dask")
    con = connect(wh)
    cols = "pair_id, random, clipscore, dot, trak, chips_align, chips_align_learn, chips, chips_plus, rank"
    ta = query(con, f"select {cols} from stg_scores where run_id = $r order by pair_id", {"r": a["run_id"]})
    tb = query(con, f"select {cols} from stg_scores where run_id = $r order by pair_id", {"r": b["run_id"]})
    assert ta.num_rows == 90 and ta.equals(tb)


def test_chips_refresh_forwards_only_new_pairs_the_second_night(prefect_api, tmp_path, demo_model):
    """`chips refresh` (the nightly deployment's flow): the first night has no earlier featurize run and featurizes
    every pair; the second, after new pairs arrive, reuses the first night's features and forwards the new ones."""
    from typer.testing import CliRunner

    from chips_core.stages import last_featurize_run
    from flows.cli import app

    cfg = tiny_pipeline_config(tmp_path, demo_model, 60, 12, seed=21, sketch={"k": 32}, bank={"size": 16},
                               curvature={"n_curv": 20, "hard_negatives": 4}, budgets=[0.5], shard_size=32,
                               outputs={"dir": str(tmp_path / "out")}, publish={"delta": True, "iceberg": True})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    first = runner.invoke(app, ["refresh", str(path)])
    assert first.exit_code == 0, first.output
    assert "Refresh run refresh-" in first.output and "no earlier featurize run of this pool" in first.output
    wh = Warehouse(cfg["warehouse"])
    night1 = last_featurize_run(wh, load_run_config_dict(cfg))

    write_folder(tmp_path / "pool-night2", make_pairs(10, seed=77), 10)
    cfg["pool"][0]["paths"].append(str(tmp_path / "pool-night2"))
    gone = query(connect(wh), "select pair_id from stg_subsets order by pair_id limit 1").column("pair_id")[0].as_py()
    (tmp_path / "optout.csv").write_text(f"pair_id\n{gone}\nnever-ingested\n")
    cfg["takedowns"] = [str(tmp_path / "optout.csv")]
    path.write_text(yaml.safe_dump(cfg))
    second = runner.invoke(app, ["refresh", str(path)])
    assert second.exit_code == 0, second.output
    assert f"refresh of {night1}: 60 pairs' features reused, 10 forwarded" in second.output
    assert "takedown    2 listed keys: 1 pairs left out of every subset, 1 keys matched nothing" in second.output
    last = query(connect(wh), "select run_id from stg_runs where stage = 'materialize' order by started_at desc "
                              "limit 1").column("run_id")[0].as_py()
    kept = query(connect(wh), "select pair_id from stg_subsets where run_id = $r", {"r": last}).column("pair_id")
    assert gone not in kept.to_pylist() and len(kept) > 0
    con = connect(wh)
    rows = query(con, "select stage, count(*) n from stg_runs where stage in ('refresh', 'featurize', 'takedown') "
                      "group by stage order by stage").to_pylist()
    assert rows == [{"stage": "featurize", "n": 2}, {"stage": "refresh", "n": 2}, {"stage": "takedown", "n": 1}]
    n = query(con, "select count(*) n from stg_scores s join stg_runs r using (run_id) where r.parent_run_id = "
                   "(select run_id from stg_runs where stage = 'refresh' order by started_at desc limit 1)").column("n")
    assert n.to_pylist() == [70]  # the second night scores every current pair, old and new

    # published each night to Delta and Iceberg: two versions, and the first still reads back
    from deltalake import DeltaTable

    from chips_core.platform.lakehouse import delta_uri, iceberg_catalog

    score_runs = query(con, "select run_id from stg_runs where stage = 'score' order by started_at").column("run_id")
    night1_scores, night2_scores = score_runs.to_pylist()
    delta = DeltaTable(delta_uri(wh, "scores"))
    assert delta.version() == 1 and set(delta.to_pyarrow_table().column("run_id").to_pylist()) == set(score_runs.to_pylist())
    assert set(DeltaTable(delta_uri(wh, "scores"), version=0).to_pyarrow_table().column("run_id").to_pylist()) == {night1_scores}
    ice = iceberg_catalog(wh).load_table("chips.scores")
    snaps = ice.snapshots()
    assert len(snaps) == 2 and ice.scan().to_arrow().num_rows == 60 + 70
    assert set(ice.scan(snapshot_id=snaps[0].snapshot_id).to_arrow().column("run_id").to_pylist()) == {night1_scores}
    # and the runs rows of each night: the refresh's own and its stages', partitioned by the refresh
    refreshes = query(con, "select run_id from stg_runs where stage = 'refresh' order by started_at").column("run_id")
    published = DeltaTable(delta_uri(wh, "runs")).to_pyarrow_table()
    assert set(published.column("root_run_id").to_pylist()) == set(refreshes.to_pylist())
    night2 = [r["stage"] for r in published.to_pylist() if r["root_run_id"] == refreshes[1].as_py()]
    assert sorted(night2) == ["featurize", "ingest", "materialize", "publish", "refresh", "score", "takedown"]
    assert iceberg_catalog(wh).load_table("chips.runs").scan().to_arrow().num_rows == published.num_rows
    # the summary says what was published, and where
    assert "publish     70 scores rows" in second.output and "7 runs rows to Delta (" in second.output
    assert "and Iceberg (chips.scores, chips.subsets, chips.runs)" in second.output


def load_run_config_dict(cfg: dict):
    from chips_core.stages.runconfig import load_run_config

    return load_run_config(cfg)
