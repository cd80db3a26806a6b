"""`chips cpt` trains on a warehouse subset (or a manifest) and `chips eval` writes evals rows that
join to the selection that produced the model — real Prefect flows, real warehouse, real DuckDB."""
import re

import pytest
from typer.testing import CliRunner

from chips_core.platform.query import connect, query
from chips_core.platform.warehouse import Warehouse
from chips_core.stages import run_pipeline
from chips_core.stages.runconfig import load_run_config
from flows.cli import app
from flows.demo import write_suite

from ..conftest import tiny_pipeline_config

pytestmark = pytest.mark.slow  # real Prefect runs / training: deselect with -m 'not slow'


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_model):
    import yaml

    tmp = tmp_path_factory.mktemp("cptflow")
    write_suite(tmp / "scans.parquet", 40, seed=21)
    cfg = tiny_pipeline_config(tmp, demo_model, 80, 20, seed=9, budgets=[0.3], methods=["random", "chips"],
                               sketch={"k": 64}, bank={"size": 32}, curvature={"n_curv": 50, "hard_negatives": 4},
                               shard_size=40, outputs={"dir": str(tmp / "out"), "formats": ["csv"]},
                               cpt={"epochs": 2, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 3},
                               eval_suites=[{"name": "scans", "path": str(tmp / "scans.parquet"),
                                             "templates": ["a scan of a {c} lesion", "a {c}"]}])
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_pipeline(load_run_config(path))
    return tmp, path, out


def _cpt_run_id(output: str) -> str:
    """The run id in the command's summary (``cpt ID: N pairs, S steps, final loss``), not in the flow's log line
    (``... steps (resumed from 0), ...``); the progress bar may end without a newline before it."""
    found = re.search(r"cpt (cpt-[\w-]+): \d+ pairs, \d+ steps, final loss", output)
    assert found, output
    return found.group(1)


def test_cpt_on_a_subset_then_eval_joins_to_the_selection(prefect_api, setup):
    tmp, path, out = setup
    runner = CliRunner()
    sid = f"{out['score']['run_id']}:chips@0.3"
    res = runner.invoke(app, ["cpt", str(path), "--subset", sid, "--out", str(tmp / "cpt")])
    assert res.exit_code == 0, res.output
    assert "24 pairs, 6 steps" in res.output  # ceil(0.3 * 80) pairs, 3 batches of 8 per epoch, 2 epochs
    run_id = _cpt_run_id(res.output)
    res = runner.invoke(app, ["eval", str(path), "--checkpoint", str(tmp / "cpt" / "final.pt"), "--cpt-run", run_id,
                              "--subset", sid])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", str(path)])  # the start model, for comparison
    assert res.exit_code == 0, res.output

    cfg = load_run_config(path)
    con = connect(Warehouse(cfg.warehouse))
    rows = query(con, "select method, budget, suite, metric, value, n, cpt_run_id from mart_eval_by_selection "
                      "where subset_id is not null order by metric").to_pylist()
    metrics = [r["metric"] for r in rows]
    assert metrics == sorted(["zero_shot_top1", "image_mean_cosine"] + [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image")
                                                   for k in (1, 5, 10)])
    assert {(r["method"], r["budget"], r["suite"], r["n"], r["cpt_run_id"]) for r in rows} == \
        {("chips", 0.3, "scans", 40, run_id)}
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    base = query(con, "select count(*) n from stg_evals where subset_id is null and cpt_run_id is null").to_pylist()
    assert base[0]["n"] == len(rows)
    # the model before CPT is method 'none' at budget 0 in the mart; `full` is materialised like any method
    none = query(con, "select distinct method, budget from mart_eval_by_selection where cpt_run_id is null").to_pylist()
    assert none == [{"method": "none", "budget": 0.0}]
    full = query(con, "select count(*) n, min(budget) b from stg_subsets where subset_id = $s",
                 {"s": f"{out['score']['run_id']}:full@1"}).to_pylist()[0]
    assert full == {"n": out["score"]["pairs"], "b": 1.0}
    runs = query(con, "select stage, status from stg_runs where stage in ('cpt', 'eval') order by stage").to_pylist()
    assert runs == [{"stage": "cpt", "status": "succeeded"}] + [{"stage": "eval", "status": "succeeded"}] * 2


def test_cpt_from_a_manifest_and_errors(prefect_api, setup):
    tmp, path, out = setup
    runner = CliRunner()
    manifest = next((tmp / "out").rglob("random_at_0.3.csv"))
    res = runner.invoke(app, ["cpt", str(path), "--manifest", str(manifest), "--out", str(tmp / "cpt-m")])
    assert res.exit_code == 0, res.output
    assert (tmp / "cpt-m" / "final.pt").is_file()
    res = runner.invoke(app, ["cpt", str(path), "--subset", "nope:chips@0.3", "--out", str(tmp / "x")])
    assert res.exit_code == 1 and "subset 'nope:chips@0.3' is not in warehouse" in res.output
    res = runner.invoke(app, ["cpt", str(path), "--out", str(tmp / "x")])
    assert res.exit_code == 1 and "exactly one of --subset / --manifest" in res.output
    res = runner.invoke(app, ["eval", str(path), "--checkpoint", str(tmp / "missing.pt")])
    assert res.exit_code == 1 and "missing.pt" in res.output


def test_the_eval_marts_tell_base_models_seeds_and_manifests_apart(prefect_api, setup):
    """Two CPT seeds on one subset, a CPT on a manifest, and two base models evaluated as they are: each row of
    mart_eval_by_selection names its base model, seeds and method ('manifest:<file>'), and the summary mart counts
    the seeds and gives their spread per base model (issue 30)."""
    import yaml

    tmp, path, out = setup
    runner = CliRunner()
    sid = f"{out['score']['run_id']}:random@0.3"

    def cpt(args, out_dir, seed=0):
        cfg = yaml.safe_load(path.read_text())
        cfg["cpt"]["seed"] = seed
        seeded = tmp / f"mart-seed{seed}.yaml"
        seeded.write_text(yaml.safe_dump(cfg))
        res = runner.invoke(app, ["cpt", str(seeded), *args, "--out", str(tmp / out_dir)])
        assert res.exit_code == 0, res.output
        return _cpt_run_id(res.output)

    def evaluate(*args):
        res = runner.invoke(app, ["eval", str(path), *args])
        assert res.exit_code == 0, res.output

    for seed in (0, 1):
        run = cpt(["--subset", sid], f"mart-{seed}", seed)
        evaluate("--checkpoint", str(tmp / f"mart-{seed}" / "final.pt"), "--cpt-run", run, "--subset", sid)
    manifest = next((tmp / "out").rglob("random_at_0.3.csv"))
    run = cpt(["--manifest", str(manifest)], "mart-m")
    evaluate("--checkpoint", str(tmp / "mart-m" / "final.pt"), "--cpt-run", run)
    evaluate()  # base model A as it is
    evaluate("--checkpoint", str(tmp / "mart-0" / "final.pt"))  # base model B: A after CPT, evaluated as a base

    con = connect(Warehouse(load_run_config(path).warehouse))
    top1 = "metric = 'zero_shot_top1'"
    a = query(con, f"select distinct base_model_checksum b from mart_eval_by_selection where method = 'random' and {top1}")
    assert len(a) == 1
    base_a = a.to_pylist()[0]["b"]
    rows = query(con, f"select cpt_seed, score_seed, model_checksum from mart_eval_by_selection "
                      f"where method = 'random' and {top1} order by cpt_seed").to_pylist()
    assert [(r["cpt_seed"], r["score_seed"]) for r in rows] == [(0, 0), (1, 0)]
    assert rows[0]["model_checksum"] != rows[1]["model_checksum"] != base_a
    m = query(con, f"select method, base_model_checksum b from mart_eval_by_selection where method like 'manifest:%' "
                   f"and {top1}").to_pylist()
    assert m == [{"method": "manifest:random_at_0.3.csv", "b": base_a}]
    bases = query(con, f"select distinct base_model_checksum b from mart_eval_by_selection where method = 'none' "
                       f"and {top1}").to_pylist()
    assert len(bases) == 2 and base_a in {r["b"] for r in bases}
    summary = query(con, f"select base_model_checksum b, method, evals, cpt_seeds, score_seeds, sd "
                         f"from mart_eval_by_selection_summary where {top1} and suite = 'scans'").to_pylist()
    random = [r for r in summary if r["method"] == "random"]
    assert len(random) == 1 and (random[0]["evals"], random[0]["cpt_seeds"], random[0]["score_seeds"]) == (2, 2, 1)
    assert random[0]["b"] == base_a and random[0]["sd"] is not None
    assert len([r for r in summary if r["method"] == "none"]) == 2  # one reference per base model


def test_cpt_stage_replays_an_ingested_source_and_records_it(setup, demo_model):
    """``cpt.replay`` draws a share of every batch from an ingested source (here the target set stands in
    for a general-domain stream); the cpt run's inputs name the replay data; an unknown source is a
    one-line error naming the sources there are."""
    import dataclasses
    import json

    from chips_core.scoring.endpoint import load_model
    from chips_core.stages import cpt_stage, subset_data
    from chips_core.train.cpt import ReplayConfig

    tmp, path, out = setup
    cfg = load_run_config(path)
    cfg = dataclasses.replace(cfg, cpt=dataclasses.replace(cfg.cpt, replay=ReplayConfig(source="target", fraction=0.25)))
    wh = Warehouse(cfg.warehouse)
    loaded = load_model(cfg.model)
    data = subset_data(wh, f"{out['score']['run_id']}:chips@0.3", loaded)
    r = cpt_stage(cfg, wh, loaded, data, tmp / "cpt-replay")
    assert r["steps"] == 2 * 4  # 24 subset pairs in batches of 8 - 2 replay pairs: 4 per epoch
    row = query(connect(wh), "select input_fingerprints from stg_runs where run_id = $r", {"r": r["run_id"]})
    assert json.loads(row.to_pylist()[0]["input_fingerprints"])["replay"]
    bad = dataclasses.replace(cfg, cpt=dataclasses.replace(cfg.cpt, replay=ReplayConfig(source="nope", fraction=0.25)))
    with pytest.raises(KeyError, match="replay source 'nope' holds no pairs.*'target'"):
        cpt_stage(bad, wh, loaded, data, tmp / "cpt-bad")


def test_ctrl_c_ends_cpt_within_seconds_and_records_the_run_as_failed(setup, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group, the temporary Prefect API included. `chips cpt`
    still exits within 10 s, with one line and no traceback, and its cpt run is recorded as failed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    tmp, path, out = setup
    cfg = yaml.safe_load(path.read_text())
    cfg["cpt"] |= {"epochs": 2000, "checkpoint_every": 100000}  # minutes of training: interrupted long before
    long = tmp_path / "long.yaml"
    long.write_text(yaml.safe_dump(cfg))
    sid = f"{out['score']['run_id']}:random@0.3"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-c", "from flows.cli import main; main()", "cpt", str(long), "--subset",
                             sid, "--out", str(tmp_path / "cpt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)  # its own group: the test's is spared
    log = tmp_path / "cpt" / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "cpt did not start training"
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, (elapsed, stderr)
    assert proc.returncode == 130 and "chips: interrupted; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    runs = query(connect(Warehouse(cfg["warehouse"])), "select status, input_fingerprints from stg_runs where stage = 'cpt'")
    mine = [r for r in runs.to_pylist() if str(tmp_path / "cpt") in (r["input_fingerprints"] or "")]
    assert len(mine) == 1 and mine[0]["status"].startswith("failed: KeyboardInterrupt"), mine
