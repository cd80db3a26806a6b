"""Real resume (issue 28): a `chips run` pipeline killed with SIGKILL of its whole process group at featurize,
score or materialize, or stopped with SIGINT (Ctrl-C), then run again with the same config, keeps what the
interrupted run finished (featurize's shards, score's parts: the same run ids) and ends with the same outputs as a
run never interrupted: features, scores and subsets equal value for value. Every run is accounted for (no
`running` row is left), and `chips gc` leaves no part of a run that did not succeed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from chips_core.platform.features import read_features
from chips_core.platform.provenance import remove_unfinished
from chips_core.platform.query import connect, query
from chips_core.platform.warehouse import Warehouse
from chips_core.stages import run_pipeline
from chips_core.stages.runconfig import load_run_config

from ..conftest import tiny_pipeline_config

# the child runs the pipeline (argv[3] "pipeline": run_pipeline on the config JSON argv[1]; "cli": `chips run` on
# the config file argv[1]) and stops at a chosen point (prints "stop", then waits to be killed)
CHILD = r"""
import json, sys, time
import chips_core.stages.featurize as F
import chips_core.stages.ingest as I
import chips_core.stages.materialize as M
import chips_core.stages.score as S
from chips_core.stages import run_pipeline
from chips_core.stages.runconfig import load_run_config

where = sys.argv[2]

def stop():
    print("stop", flush=True)
    time.sleep(600)

if where == "ingest":  # the pool's source ingested, the target's not
    shard = I.ingest_shard
    def ingest_shard(*a, **k):
        shard(*a, **k)
        stop()
    I.ingest_shard = ingest_shard
elif where == "featurize":  # after the third shard a run forwards
    shard, done = F.featurize_shard, [0]
    def featurize_shard(*a, **k):
        written = shard(*a, **k)
        done[0] += bool(written)
        if done[0] == 3:
            if k.get("writer") is not None:
                k["writer"].wait()
            stop()
        return written
    F.featurize_shard = featurize_shard
elif where == "score":  # every part scored, not yet ranked
    def write_ranked_scores(*a, **k):
        stop()
    S.write_ranked_scores = write_ranked_scores
elif where == "materialize":  # the subsets written, the manifests not
    def write_manifests(*a, **k):
        stop()
    M.write_manifests = write_manifests
if sys.argv[3] == "cli":
    from flows.cli import main
    main(["run", sys.argv[1]])
else:
    run_pipeline(load_run_config(json.loads(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tiny_pipeline_config(tmp, demo_model, 160, 16, seed=41, sketch={"k": 32}, bank={"size": 16},
                               curvature={"n_curv": 40, "hard_negatives": 4}, budgets=[0.2, 0.5], shard_size=16,
                               methods=["random", "chips", "chips_plus", "chips_pursuit"],
                               outputs={"dir": str(tmp / "out")})
    out = run_pipeline(load_run_config(cfg))
    return tmp, cfg, _outputs(Warehouse(cfg["warehouse"]), out)


def _outputs(wh: Warehouse, out: dict) -> dict:
    con = connect(wh)
    f = read_features(wh, out["featurize"]["run_id"])
    scores = query(con, "select * exclude (run_id) from stg_scores where run_id = $r order by pair_id",
                   {"r": out["score"]["run_id"]})
    subsets = query(con, "select method, budget, pair_id, rank from stg_subsets where run_id = $r "
                         "order by method, budget, rank", {"r": out["materialize"]["run_id"]})
    return {"ids": f.pair_id, **{k: getattr(f, k) for k in ("x", "y", "g", "p_corr", "loss")},
            "scores": scores, "subsets": subsets}


def _interrupted(tmp, cfg: dict, where: str, sig: int) -> dict:
    """A fresh warehouse; the pipeline run in a child (its own process group) until ``where``, then ``sig`` to the
    whole group."""
    case = {**cfg, "warehouse": str(tmp / f"wh-{where}-{sig}"), "outputs": {"dir": str(tmp / f"out-{where}-{sig}")}}
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(case), where, "pipeline"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "stop"
        os.killpg(p.pid, sig)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    return case


@pytest.mark.parametrize("where,sig", [("ingest", signal.SIGKILL), ("featurize", signal.SIGKILL), ("score", signal.SIGKILL),
                                       ("materialize", signal.SIGKILL)])  # SIGINT: through the CLI, below
def test_a_rerun_after_a_kill_resumes_and_ends_as_an_uninterrupted_run(reference, where, sig):
    tmp, cfg, expected = reference
    case = _interrupted(tmp, cfg, where, sig)
    wh = Warehouse(case["warehouse"])
    before = {r["run_id"]: r for r in query(connect(wh), "select run_id, stage, status from stg_runs").to_pylist()}
    assert {r["status"] for r in before.values()} <= {"running", "succeeded", "failed: KeyboardInterrupt: "
                                                      "interrupted (Ctrl-C)"}
    killed = {r["stage"]: r["run_id"] for r in before.values() if r["stage"] in ("ingest", "featurize", "score")}

    out = run_pipeline(load_run_config(case))  # the same command again

    got = _outputs(wh, out)
    assert got["ids"] == expected["ids"]
    for k in ("x", "y", "g", "p_corr", "loss"):
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    assert got["scores"].equals(expected["scores"])
    assert got["subsets"].equals(expected["subsets"]) and got["subsets"].num_rows > 0
    # what the interrupted run finished is kept: its ingest, featurize and score runs are the ones resumed
    assert out["ingest"]["run_id"] == killed["ingest"]
    if where == "ingest":
        assert out["ingest"]["unchanged"] == 0  # the pool's shard skipped, not ingested again as "unchanged"
    else:
        assert out["featurize"]["run_id"] == killed["featurize"]
    if where == "featurize":
        assert 0 < out["featurize"]["shards_written"] < out["featurize"]["shards"]
    elif where != "ingest":
        assert out["featurize"]["shards_written"] == 0
    if where == "score":
        assert out["score"]["run_id"] == killed["score"]
    # every run accounted for; the interrupted pipeline is not hidden
    runs = query(connect(wh), "select run_id, stage, status from stg_runs").to_pylist()
    assert not [r for r in runs if r["status"] == "running"]
    pipelines = sorted(r["status"].split(":")[0] for r in runs if r["stage"] == "pipeline")
    assert pipelines == (["abandoned", "succeeded"] if sig == signal.SIGKILL else ["failed", "succeeded"])
    # gc: no part of a run that did not succeed is left, and no temporary file
    remove_unfinished(wh)
    ok = {r["run_id"] for r in query(connect(wh), "select run_id from stg_runs where status = 'succeeded'").to_pylist()}
    for table in ("features", "subsets", "scores"):
        for d in os.listdir(os.path.join(case["warehouse"], table)):
            assert d.removeprefix("run=") in ok, (table, d)
    assert not [f for _, _, files in os.walk(case["warehouse"]) for f in files if f.endswith(".tmp")]


def test_a_resumed_featurize_run_whose_pool_changed_forwards_every_shard_again(tmp_path, demo_model, caplog):
    """The interrupted run's parts belong to the pool it planned: after the pool changed, the resumed run (same id)
    drops them and ends equal to a fresh run over the new pool."""
    import dataclasses

    import open_clip
    import pyarrow as pa

    from chips_core.platform.warehouse import SCHEMAS
    from chips_core.scoring.endpoint import LoadedModel, state_dict_checksum
    from chips_core.stages import featurize_stage, ingest_stage
    from chips_core.train.synthetic import make_pairs
    from flows.demo import write_folder

    data = make_pairs(90, seed=43)
    write_folder(tmp_path / "pool", data, 60)
    cfg = load_run_config(tiny_pipeline_config(tmp_path / "t", demo_model, 10, 12, seed=44, sketch={"k": 16},
                                               bank={"size": 12}, curvature={"n_curv": 20, "hard_negatives": 4},
                                               shard_size=16, budgets=[0.5]))
    cfg = dataclasses.replace(cfg, pool=(dataclasses.replace(cfg.pool[0], paths=(str(tmp_path / "pool"),)),))
    wh = Warehouse(cfg.warehouse)
    loaded = LoadedModel(demo_model, open_clip.tokenizer.SimpleTokenizer(context_length=16),
                         state_dict_checksum(demo_model), "demo")
    ingest_stage(list(cfg.pool) + list(cfg.target), wh)
    first = featurize_stage(cfg, wh, loaded)["run_id"]
    row = query(connect(wh), "select * from stg_runs where run_id = $r", {"r": first}).to_pylist()[0]
    row["status"] = "abandoned: process 1 on this host ended without recording an outcome"  # as if killed
    wh.write("runs", pa.Table.from_pylist([{k: row.get(k) for k in SCHEMAS["runs"].names}], schema=SCHEMAS["runs"]),
             {"kind": "featurize"}, first)

    write_folder(tmp_path / "pool", data, 90)  # 30 more pairs in the same folder
    ingest_stage(list(cfg.pool), wh)
    resumed = featurize_stage(cfg, wh, loaded)
    assert resumed["run_id"] == first and resumed["pairs"] == 90
    assert resumed["shards_written"] == resumed["shards"]
    assert "the pool changed since it was interrupted" in caplog.text
    fresh = featurize_stage(cfg, wh, loaded, run_id="fresh")
    a, b = read_features(wh, first), read_features(wh, fresh["run_id"])
    assert a.pair_id == b.pair_id and len(a.pair_id) == 90
    np.testing.assert_array_equal(a.g, b.g)




@pytest.mark.slow
def test_chips_run_stopped_with_ctrl_c_keeps_its_promise(reference, tmp_path):
    """Through the CLI and its Prefect flows: Ctrl-C (SIGINT to the process group, as a terminal sends it) during
    featurize prints `interrupted; rerun the same command to resume`, and `chips run` again resumes that featurize
    run, ending with features parts byte-identical to an uninterrupted run's and no process of the group left."""
    import time

    import yaml

    from chips_core.platform.features import shard_parts

    _, cfg, expected = reference
    case = {**cfg, "warehouse": str(tmp_path / "wh"), "outputs": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(case))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), "featurize", "cli"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        assert p.stdout.readline().strip() == "stop"
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and "chips: interrupted; rerun the same command to resume" in err, err[-2000:]
    deadline = time.time() + 15  # the group's processes (the temporary Prefect API) are gone
    while time.time() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("a process of the interrupted command's group is still alive")
    wh = Warehouse(case["warehouse"])
    killed = query(connect(wh), "select run_id, status from stg_runs where stage = 'featurize'").to_pylist()
    assert len(killed) == 1 and killed[0]["status"].startswith("failed: KeyboardInterrupt")

    exe = os.path.join(os.path.dirname(sys.executable), "chips")
    again = subprocess.run([exe, "run", str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    runs = query(connect(wh), "select run_id, status from stg_runs where stage = 'featurize'").to_pylist()
    assert runs == [{"run_id": killed[0]["run_id"], "status": "succeeded"}]
    got = read_features(wh, killed[0]["run_id"])
    assert got.pair_id == expected["ids"]
    np.testing.assert_array_equal(got.g, expected["g"])
    # the parts themselves, byte for byte, against the uninterrupted run's
    ref_wh = Warehouse(cfg["warehouse"])
    ref_run = query(connect(ref_wh), "select run_id from stg_runs where stage = 'featurize'").column(0)[0].as_py()
    ours, theirs = shard_parts(wh, killed[0]["run_id"]), shard_parts(ref_wh, ref_run)
    assert sorted(ours) == sorted(theirs) and len(ours) > 3
    for name in ours:
        with open(ours[name], "rb") as a, open(theirs[name], "rb") as b:
            assert a.read() == b.read(), name
