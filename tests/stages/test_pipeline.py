"""The library pipeline over a real warehouse: ingest -> featurize -> score -> materialize."""
import csv
import hashlib
import json
import os

import pytest

from chips_core.platform.query import connect, query, run_audits
from chips_core.platform.readers import SourceSpec
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import LoadedModel, ModelSpec, state_dict_checksum
from chips_core.scoring.featurize import BankConfig
from chips_core.scoring.sketch import SketchConfig
from chips_core.scoring.target import CurvatureConfig
from chips_core.stages import featurize_stage, run_pipeline
from chips_core.stages.common import require_pairs, require_quarantine_share
from chips_core.stages.runconfig import OutputConfig, RunConfig
from chips_core.train.synthetic import DEMO_MODEL_CONFIG, make_pairs
from flows.demo import write_folder

from ..conftest import tiny_pipeline_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_model):
    import open_clip

    tmp = tmp_path_factory.mktemp("pipe")
    write_folder(tmp / "pool", make_pairs(120, seed=5), 120)
    write_folder(tmp / "target", make_pairs(24, seed=6, scan_fraction=1.0, noise_fraction=0.0), 24)
    cfg = RunConfig(warehouse=str(tmp / "wh"), pool=(SourceSpec("pool", "folder", (str(tmp / "pool"),)),),
                    target=(SourceSpec("target", "folder", (str(tmp / "target"),)),),
                    model=ModelSpec(config=DEMO_MODEL_CONFIG), sketch=SketchConfig(k=64), bank=BankConfig(size=32),
                    curvature=CurvatureConfig(n_curv=50, hard_negatives=4), budgets=(0.1, 0.3), shard_size=50,
                    outputs=OutputConfig(dir=str(tmp / "out")))
    loaded = LoadedModel(demo_model, open_clip.tokenizer.SimpleTokenizer(context_length=16),
                         state_dict_checksum(demo_model), "demo")
    return cfg, loaded, run_pipeline(cfg, loaded)


def test_pipeline_tables_runs_and_audits(run):
    cfg, _, out = run
    assert out["ingest"]["kept"] == 144 and out["featurize"]["pairs"] == 120 and out["featurize"]["shards"] == 3
    con = connect(Warehouse(cfg.warehouse))
    stages = query(con, "select stage, status from stg_runs order by stage").to_pylist()
    assert [s["stage"] for s in stages] == ["featurize", "ingest", "materialize", "pipeline", "score"]
    assert all(s["status"] == "succeeded" for s in stages)
    sizes = query(con, "select method, budget, count(*) n from stg_subsets group by all order by all").to_pylist()
    assert {(s["budget"], s["n"]) for s in sizes} == {(0.1, 12), (0.3, 36), (1.0, 120)}  # and full@1: every pair
    assert [s["method"] for s in sizes if s["budget"] == 1.0] == ["full"]
    assert all(t.num_rows == 0 for t in run_audits(con).values()), run_audits(con)
    sid = f"{out['score']['run_id']}:chips@0.1"
    top = query(con, "select pair_id from stg_subsets where subset_id = $s and rank = 1", {"s": sid}).to_pylist()[0]
    from chips_core.platform.query import lineage

    lin = lineage(con, sid, top["pair_id"]).to_pylist()
    assert lin and lin[0]["source"] == "pool" and lin[0]["model_checksum"]


def test_manifests_are_open_clip_csv(run):
    cfg, _, out = run
    csvs = [f for f in out["materialize"]["files"] if f.endswith("chips_at_0.3.csv")]
    with open(csvs[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 and set(rows[0]) == {"filepath", "title"}
    assert all(os.path.isfile(r["filepath"]) for r in rows)


def test_featurize_resume_writes_the_same_bytes(run, tmp_path):
    cfg, loaded, out = run
    wh = Warehouse(cfg.warehouse)
    fid = out["featurize"]["run_id"]
    parts = sorted(wh.fs.glob(f"{wh.root}/features/run={fid}/*.parquet"))
    digest = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in parts}
    os.remove(parts[1])  # as if the run died before its second shard
    again = featurize_stage(cfg, wh, loaded, run_id=fid)
    assert again["shards_written"] == 1
    assert {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in parts} == digest


def test_write_behind_keeps_order_holds_one_write_and_raises_a_failed_one():
    import threading

    from chips_core.stages.common import WriteBehind

    done, gate, w = [], threading.Event(), WriteBehind()
    w.submit(lambda: (gate.wait(5), done.append(0)))
    assert done == []  # submit returned while the write waits on its thread
    gate.set()
    w.submit(lambda: done.append(1))  # finishes the first write before queueing the second
    assert done[:1] == [0]
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.submit(lambda: done.append(3))  # the failed write surfaces at the next submit; the new one is not queued
    w.wait()
    w.close()
    assert done == [0, 1]


def test_a_failed_background_write_fails_the_featurize_run_and_a_rerun_finishes_it(run, monkeypatch, tmp_path):
    """Featurize in this process writes shard n's part while shard n+1 runs: a write that fails fails the stage
    (its runs row says so) and the parts written before it stay; the rerun writes the rest, the same bytes."""
    import dataclasses
    import shutil

    import chips_core.stages.featurize as F

    cfg, loaded, out = run
    shutil.copytree(cfg.warehouse, tmp_path / "wh")  # the module's warehouse keeps its runs as they were
    cfg = dataclasses.replace(cfg, warehouse=str(tmp_path / "wh"))
    wh = Warehouse(cfg.warehouse)
    good = {p.rsplit("/", 1)[1]: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in wh.fs.glob(f"{wh.root}/features/run={out['featurize']['run_id']}/*.parquet")}
    real = F.write_features

    def failing(wh_, batch, run_id, name):
        if name == "shard-00001":
            raise OSError("disk full (injected)")
        return real(wh_, batch, run_id, name)

    monkeypatch.setattr(F, "write_features", failing)
    with pytest.raises(OSError, match="injected"):
        featurize_stage(cfg, wh, loaded, run_id="write-fails")
    con = connect(wh)
    status = query(con, "select status from stg_runs where run_id = 'write-fails'").to_pylist()
    assert [r["status"] for r in status] == ["failed: OSError: disk full (injected)"]
    assert sorted(p.rsplit("/", 1)[1] for p in wh.fs.glob(f"{wh.root}/features/run=write-fails/*.parquet")) == [
        "shard-00000.parquet"]
    monkeypatch.setattr(F, "write_features", real)
    again = featurize_stage(cfg, wh, loaded, run_id="write-fails")
    assert again["shards_written"] == 2
    assert {p.rsplit("/", 1)[1]: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in wh.fs.glob(f"{wh.root}/features/run=write-fails/*.parquet")} == good


def test_a_shard_failing_after_its_predecessors_leaves_their_parts_written(run, monkeypatch, tmp_path):
    """Shard 1's part is still being written (behind) when shard 2 fails: the failure does not lose it."""
    import dataclasses
    import shutil

    import chips_core.stages.featurize as F

    cfg, loaded, _ = run
    shutil.copytree(cfg.warehouse, tmp_path / "wh")
    cfg = dataclasses.replace(cfg, warehouse=str(tmp_path / "wh"))
    wh = Warehouse(cfg.warehouse)
    real = F.featurize_shard

    def shard(*args, **kw):
        if args[5] == 2:  # (cfg, wh, loaded, run_id, plan, n, shard)
            raise RuntimeError("forward failed (injected)")
        return real(*args, **kw)

    monkeypatch.setattr(F, "featurize_shard", shard)
    with pytest.raises(RuntimeError, match="injected"):
        featurize_stage(cfg, wh, loaded, run_id="shard-fails")
    assert sorted(p.rsplit("/", 1)[1] for p in wh.fs.glob(f"{wh.root}/features/run=shard-fails/*.parquet")) == [
        "shard-00000.parquet", "shard-00001.parquet"]


def test_open_clip_train_reads_a_materialised_csv_and_trains_a_step(run):
    import copy

    import torch
    from open_clip_train.data import CsvDataset

    from chips_core.scoring.endpoint import image_preprocess

    cfg, loaded, out = run
    csv_path = [f for f in out["materialize"]["files"] if f.endswith("chips_at_0.3.csv")][0]
    model = copy.deepcopy(loaded.model).train()
    ds = CsvDataset(csv_path, image_preprocess(model), img_key="filepath", caption_key="title", sep=",",
                    tokenizer=loaded.tokenizer)
    images, texts = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xi, yt, scale = model(images, texts)[:3]
    logits = scale * xi @ yt.t()
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))
    loss.backward()
    before = model.visual.proj.detach().clone()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.visual.proj.detach())


@pytest.mark.slow
def test_featurize_killed_mid_run_resumes_to_the_same_bytes(run, tmp_path):
    """A real SIGKILL in the middle of featurize; the rerun finishes only the missing shards and
    its parts equal, byte for byte, those of an uninterrupted run."""
    import dataclasses
    import signal
    import subprocess
    import sys
    import time

    import torch

    cfg, loaded, _ = run
    cfg = dataclasses.replace(cfg, shard_size=4)  # 30 shards, so the kill lands mid-run
    ckpt = tmp_path / "demo.pt"
    torch.save(loaded.model.state_dict(), ckpt)
    script = tmp_path / "featurize.py"
    script.write_text(
        "import sys, dataclasses, json\n"
        "from chips_core.stages.runconfig import load_run_config\n"
        "from chips_core.scoring.endpoint import load_model\n"
        "from chips_core.stages import featurize_stage\n"
        "from chips_core.platform.warehouse import Warehouse\n"
        "cfg = load_run_config(json.loads(sys.argv[1]))\n"
        "loaded = load_model(cfg.model)\n"
        "print(featurize_stage(cfg, Warehouse(cfg.warehouse), loaded, run_id=sys.argv[2]), flush=True)\n")
    as_dict = json.loads(json.dumps(dataclasses.asdict(cfg)))
    as_dict["model"] = {"config": as_dict["model"]["config"], "checkpoint": str(ckpt)}
    as_dict["storage_options"] = None
    wh = Warehouse(cfg.warehouse)
    folder = f"{wh.root}/features/run=killed"
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(as_dict), "killed"])
    deadline = time.time() + 300
    while time.time() < deadline and len(wh.fs.glob(f"{folder}/*.parquet")) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(wh.fs.glob(f"{folder}/*.parquet"))
    assert 3 <= done_before < 30, f"kill landed after {done_before} of 30 shards"
    assert not wh.fs.exists(f"{wh.root}/globals/run=killed/curvature.npz")
    subprocess.run([sys.executable, str(script), json.dumps(as_dict), "killed"], check=True)
    subprocess.run([sys.executable, str(script), json.dumps(as_dict), "uninterrupted"], check=True)
    a = sorted(wh.fs.glob(f"{folder}/*.parquet"))
    b = sorted(wh.fs.glob(f"{wh.root}/features/run=uninterrupted/*.parquet"))
    assert len(a) == len(b) == 30
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]


@pytest.mark.slow
def test_two_pipelines_at_once_on_one_warehouse(tmp_path, demo_model):
    """Two processes run the whole pipeline into the same warehouse at the same time (different run
    ids): both succeed, and the audits find nothing wrong afterwards."""
    import subprocess
    import sys


    cfg = tiny_pipeline_config(tmp_path, demo_model, 60, 12, seed=31, sketch={"k": 32}, bank={"size": 16},
                               curvature={"n_curv": 30, "hard_negatives": 4}, budgets=[0.5], shard_size=20)
    script = ("import sys, json\nfrom chips_core.stages.runconfig import load_run_config\n"
              "from chips_core.stages import run_pipeline\n"
              "print(run_pipeline(load_run_config(json.loads(sys.argv[1])))['run_id'])\n")
    procs = [subprocess.Popen([sys.executable, "-c", script,
                               json.dumps({**cfg, "outputs": {"dir": str(tmp_path / f"out{i}")}})],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    con = connect(Warehouse(cfg["warehouse"]))
    runs = query(con, "select stage, count(*) n, min(status) s from stg_runs group by stage order by stage").to_pylist()
    assert [(r["stage"], r["n"], r["s"]) for r in runs] == [(st, 2, "succeeded") for st in
                                                            ("featurize", "ingest", "materialize", "pipeline", "score")]
    audits = run_audits(con)
    assert all(t.num_rows == 0 for t in audits.values()), {k: v.to_pylist() for k, v in audits.items()}
    assert query(con, "select count(*) n from stg_pairs").column("n").to_pylist() == [72]


def test_rescore_with_publish_writes_delta_tables_under_one_parent(run):
    """The library's rescore sequence with ``publish: {delta: true}``: the publish stage appends the run's
    scores and subsets to Delta tables that deltalake reads back, and records a run under the same parent."""
    import dataclasses

    from deltalake import DeltaTable

    from chips_core.stages import run_rescore
    from chips_core.stages.runconfig import PublishConfig

    cfg, loaded, out = run
    cfg = dataclasses.replace(cfg, publish=PublishConfig(delta=True))
    res = run_rescore(cfg, out["featurize"]["run_id"], loaded)
    # + full@1; and, once the rescore has ended, its own runs row and its stages' (the publish stage's included)
    assert res["publish"]["rows"] == {"scores": 120, "subsets": len(cfg.methods) * (12 + 36) + 120, "runs": 5}
    runs = DeltaTable(res["publish"]["tables"]["runs"]).to_pyarrow_table()
    assert sorted(runs.column("stage").to_pylist()) == ["ingest", "materialize", "publish", "rescore", "score"]
    assert set(runs.column("root_run_id").to_pylist()) == {res["run_id"]}
    assert set(runs.column("status").to_pylist()) == {"succeeded"}
    scores = DeltaTable(res["publish"]["tables"]["scores"]).to_pyarrow_table()
    assert set(scores.column("run_id").to_pylist()) == {res["score"]["run_id"]} and scores.num_rows == 120
    con = connect(Warehouse(cfg.warehouse))
    runs = query(con, "select stage, parent_run_id from stg_runs where parent_run_id = $p order by stage",
                 {"p": res["run_id"]}).to_pylist()
    assert [r["stage"] for r in runs] == ["ingest", "materialize", "publish", "score"]


def test_scoring_a_featurize_run_with_other_weights_is_refused(run, demo_model):
    """§8: the featurize run's bank and features belong to its model; another checkpoint must featurize again."""
    import open_clip
    import torch

    from chips_core.errors import IncompatibleFeaturesError
    from chips_core.scoring.endpoint import build_custom_model
    from chips_core.stages import score_stage

    cfg, _, out = run
    torch.manual_seed(3)
    other = build_custom_model(DEMO_MODEL_CONFIG).eval()
    loaded = LoadedModel(other, open_clip.tokenizer.SimpleTokenizer(context_length=16), state_dict_checksum(other), "x")
    with pytest.raises(IncompatibleFeaturesError, match="featurize the pool again"):
        score_stage(cfg, Warehouse(cfg.warehouse), loaded, out["featurize"]["run_id"])


def test_a_bank_larger_than_the_pool_is_clipped_recorded_and_warned(run, caplog):
    import dataclasses
    import json
    import logging

    cfg, loaded, _ = run
    big = dataclasses.replace(cfg, bank=BankConfig(size=500))
    wh = Warehouse(cfg.warehouse)
    with caplog.at_level(logging.WARNING, logger="chips"):
        out = featurize_stage(big, wh, loaded)
    assert out["bank_size"] == 120
    assert "bank.size=500 clipped to the pool's 120 pairs (K=120)" in caplog.text
    row = query(connect(wh), "select diagnostics_json from stg_runs where run_id = $r",
                {"r": out["run_id"]}).to_pylist()[0]
    assert json.loads(row["diagnostics_json"]) == {"bank_size": 120, "bank_size_configured": 500}


def test_cpt_on_a_subset_or_on_its_manifest_trains_the_same_model(run, tmp_path):
    """``cpt --subset X`` and ``cpt --manifest <X's csv>`` read the same pairs in the same (rank) order."""
    import copy
    import dataclasses

    import torch

    from chips_core.stages import cpt_stage
    from chips_core.stages.cpt import manifest_data, subset_data
    from chips_core.train.cpt import CPTConfig

    cfg, loaded, out = run
    cfg = dataclasses.replace(cfg, cpt=CPTConfig(epochs=1, batch_size=8, warmup_steps=1, checkpoint_every=10**6))
    wh = Warehouse(cfg.warehouse)
    sid = f"{out['score']['run_id']}:chips@0.3"
    csv_path = next(f for f in out["materialize"]["files"] if f.endswith("chips_at_0.3.csv"))
    finals = []
    for name, data in (("subset", subset_data(wh, sid, loaded)), ("manifest", manifest_data(csv_path, loaded))):
        model = copy.deepcopy(loaded)
        res = cpt_stage(cfg, wh, model, data, tmp_path / name, subset_id=sid if name == "subset" else None)
        finals.append(torch.load(res["final"], weights_only=True))
    a, b = finals
    a, b = (x["state_dict"] for x in (a, b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_target_lost_to_quarantine_stops_the_run_before_featurize(tmp_path, demo_model):
    """Images given outside allowed_roots are quarantined; the run stops right after ingest, naming the
    target source, the reason with its count and the fix — no featurize run is started."""

    import open_clip

    from chips_core.stages import run_pipeline

    from ..platform.test_ingest import png

    (tmp_path / "imgs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    rows = []
    for i in range(3):
        (tmp_path / "elsewhere" / f"{i}.png").write_bytes(png(i))
        rows.append(f"{tmp_path / 'elsewhere' / f'{i}.png'},a scan {i}")
    (tmp_path / "target.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    write_folder(tmp_path / "pool", make_pairs(20, seed=5), 20)
    cfg = RunConfig(warehouse=str(tmp_path / "wh"), pool=(SourceSpec("pool", "folder", (str(tmp_path / "pool"),)),),
                    target=(SourceSpec("scans", "csv", (str(tmp_path / "target.csv"),),
                                       allowed_roots=(str(tmp_path / "imgs"),)),),
                    model=ModelSpec(config=DEMO_MODEL_CONFIG), bank=BankConfig(size=8))
    loaded = LoadedModel(demo_model, open_clip.tokenizer.SimpleTokenizer(context_length=16),
                         state_dict_checksum(demo_model), "demo")
    with pytest.raises(ValueError, match=r"source 'scans': 3 of 3 rows \(100%\) quarantined at ingest: "
                                         r"read_error \(path_outside_root\) × 3 \(fix: list the images' folder in the "
                                         r"source's allowed_roots\); above max_quarantine_share=0.5"):
        run_pipeline(cfg, loaded)
    wh = Warehouse(cfg.warehouse)
    stages = query(connect(wh), "select stage, status from stg_runs order by stage").to_pylist()
    assert [s["stage"] for s in stages] == ["ingest", "pipeline"] and stages[1]["status"].startswith("failed")
    # all rows lost always stops a run, whatever the limit; the pool (nothing lost) passes any limit
    with pytest.raises(ValueError, match="3 of 3 rows"):
        require_quarantine_share(wh, cfg.target, 1.0)
    assert require_quarantine_share(wh, cfg.pool, 0.0)["pool"] == {"rows": 20, "quarantined": 0, "share": 0.0,
                                                                  "causes": {}}
    with pytest.raises(ValueError, match=r"target sources \['scans'\] hold 0 pairs; need at least 2; quarantined at "
                                         r"ingest: read_error \(path_outside_root\) × 3 \(fix: list the images' folder"):
        require_pairs(wh, cfg.target, "target")  # what rescore and score say when the share check is off


def test_a_source_above_the_quarantine_limit_stops_the_run_and_the_limit_is_configurable(tmp_path):
    """3 of 8 rows outside allowed_roots: 38% quarantined. The default limit (0.5) lets it through, 0.3 stops
    it with the cause and the fix; duplicates are not counted as lost."""
    from chips_core.stages.ingest import ingest_stage

    from ..platform.test_ingest import png

    for d in ("imgs", "elsewhere"):
        (tmp_path / d).mkdir()
    rows = []
    for i in range(8):
        d = "elsewhere" if i < 3 else "imgs"
        (tmp_path / d / f"{i}.png").write_bytes(png(i if i != 7 else 6))  # row 7 duplicates row 6's pair
        rows.append(f"{tmp_path / d / f'{i}.png'},a scan {i if i != 7 else 6}")
    (tmp_path / "t.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    spec = SourceSpec("scans", "csv", (str(tmp_path / "t.csv"),), allowed_roots=(str(tmp_path / "imgs"),))
    wh = Warehouse(str(tmp_path / "wh"))
    ingest_stage([spec], wh)
    shares = require_quarantine_share(wh, [spec], 0.5)
    assert shares["scans"]["quarantined"] == 3 and shares["scans"]["rows"] == 8
    assert shares["scans"]["causes"] == {"read_error (path_outside_root)": 3}
    with pytest.raises(ValueError, match=r"source 'scans': 3 of 8 rows \(38%\) quarantined at ingest: "
                                         r"read_error \(path_outside_root\) × 3 .*above max_quarantine_share=0.3"):
        require_quarantine_share(wh, [spec], 0.3)
    with pytest.raises(ValueError, match=r"max_quarantine_share=1.5 is invalid"):
        RunConfig(warehouse="w", pool=(), target=(), model=ModelSpec(config=DEMO_MODEL_CONFIG), max_quarantine_share=1.5)
    # an image whose content changed is a new pair under the same source key: a second pair_sources row, one key
    (tmp_path / "imgs" / "5.png").write_bytes(png(50))
    ingest_stage([spec], wh)
    ps = wh.read("pair_sources", columns=["source", "source_key"])
    assert ps.num_rows == 6 and require_quarantine_share(wh, [spec], 0.5)["scans"]["rows"] == 8
    # DuckDB's out-of-core counts equal Arrow's in-memory ones
    from chips_core.platform.poolscan import source_key_counts
    arrow = ps.group_by("source").aggregate([("source_key", "count_distinct")]).to_pylist()
    assert source_key_counts(wh, ["scans", "absent"]) == {r["source"]: r["source_key_count_distinct"] for r in arrow}
