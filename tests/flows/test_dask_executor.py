"""The Dask executor (issue 29): ingest's and featurize's shards and score's feature parts as Dask tasks on a real scheduler and two worker processes
started here on 127.0.0.1 (`dask scheduler`, `dask worker`), through the same Prefect flows and stage sequence as
a local run, end with features parts byte-identical to the local run's, and scores and subsets equal; a worker
killed (SIGKILL) mid-run, with the warehouse on S3 (moto's server as a process), has its shards rerun elsewhere
with the same bytes; the checks before a run name the
worker and the path it cannot see."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chips_core.platform.features import shard_parts
from chips_core.platform.query import connect, query
from chips_core.platform.warehouse import Warehouse
from chips_core.stages.runconfig import load_run_config

from benchmarks.dask_cluster import dask_cluster, free_port

from ..conftest import tiny_pipeline_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_cluster(tmp_path_factory.mktemp("dask"), resources={0: "slot=1"}) as c:  # only w0 declares a slot
        yield c


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server as a real process on 127.0.0.1 with one bucket; the storage options that reach it."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=tmp_path_factory.mktemp("moto"))
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        deadline = time.time() + 60
        while True:
            try:
                client.create_bucket(Bucket="chips-dask")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint,
                                                                          "region_name": "us-east-1"}}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _config(tmp, demo_model, name: str, **executor) -> dict:
    return tiny_pipeline_config(tmp, demo_model, 96, 16, seed=51, sketch={"k": 32}, bank={"size": 16},
                                curvature={"n_curv": 40, "hard_negatives": 4}, budgets=[0.2, 0.5], shard_size=12,
                                outputs={"dir": str(tmp / f"out-{name}")}, warehouse=str(tmp / f"wh-{name}"),
                                **({"executor": executor} if executor else {}))


def _results(cfg: dict, out: dict) -> tuple[dict, object, object, object]:
    wh = Warehouse(cfg["warehouse"], cfg.get("storage_options"))
    parts = {name: wh.fs.cat_file(p) for name, p in shard_parts(wh, out["featurize"]["run_id"]).items()}
    con = connect(wh)
    scores = query(con, "select * exclude (run_id) from stg_scores order by pair_id")
    subsets = query(con, "select method, budget, pair_id, rank from stg_subsets order by method, budget, rank")
    # what ingest kept, with every column but the run's id (two runs' ids differ), the image bytes included
    pairs = query(con, "select * exclude (ingest_run_id, run) from raw_pairs order by source, source_key")
    return parts, scores, subsets, pairs


def test_a_dask_run_equals_a_local_run_byte_for_byte_even_when_a_worker_is_killed(cluster, s3_server, prefect_api,
                                                                                 tmp_path, demo_model):
    from flows.chips_flows import pipeline_flow, refresh_flow

    address, procs = cluster
    local_cfg = _config(tmp_path, demo_model, "local")
    local = _results(local_cfg, pipeline_flow(local_cfg))
    assert len(local[0]) == 8

    # each featurize shard task holds a `slot`, which only worker w0 declares: every shard runs there
    from distributed import Client

    dask_cfg = _config(tmp_path, demo_model, "dask", kind="dask", address=address, resources={"slot": 1})
    with Client(address) as client:
        client.get_task_stream()  # the scheduler records its task stream from the first request on
        t0 = time.time()
        out = pipeline_flow(dask_cfg)
        stream = client.get_task_stream(start=t0)
        names = {w: n for w, n in client.run(lambda dask_worker: dask_worker.name).items()}
    ran_on = {t["key"]: names[t["worker"]] for t in stream}
    featurized = _named(ran_on, "featurize-shard")  # each shard a Dask task keyed <name>-<n>-<run>
    assert len(featurized) == len(local[0]) and set(featurized.values()) == {"w0"}, ran_on
    assert _results(dask_cfg, out)[0] == local[0]  # every features part, byte for byte
    got = _results(dask_cfg, out)
    assert got[1].equals(local[1]) and got[2].equals(local[2]) and got[3].equals(local[3])
    # ingest's shards ran as tasks too, each judged then written (the pool's shard and the target's), and score's
    # feature parts (the local run scores on its own threads), on either worker: they hold no slot
    assert len(_named(ran_on, "ingest-judge")) == len(_named(ran_on, "ingest-write")) == 2, ran_on
    assert len(_named(ran_on, "score-part")) == len(local[0]), ran_on
    # the scheduler's two workers are other processes than this driver
    with __import__("distributed").Client(address) as c:
        logs = c.run(lambda: __import__("os").getpid())
    assert os.getpid() not in logs.values() and len(logs) == 2

    # a worker (its nanny and process) killed while the shards run: its shards are rerun on the other
    # (through the refresh flow with the scheduler as its `executor` parameter, as the scheduled-refresh-dask
    # deployment runs it; a refresh of a new warehouse featurizes everything), the warehouse on S3 (moto's server,
    # another process): the workers read and write it through fsspec with the config's storage options
    killed_cfg = {**_config(tmp_path, demo_model, "killed"), "warehouse": "s3://chips-dask/wh",
                  "storage_options": s3_server}
    fs = Warehouse(killed_cfg["warehouse"], s3_server).fs

    def kill_when_the_first_part_lands():
        deadline = time.time() + 300
        while time.time() < deadline and not fs.glob("chips-dask/wh/features/run=*/*.parquet"):
            time.sleep(0.05)
            fs.invalidate_cache()
        os.killpg(procs["worker1"].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_the_first_part_lands, daemon=True)
    killer.start()
    with Client(address) as client:
        t0 = time.time()
        out = refresh_flow(killed_cfg, executor=address)
        keys = {t["key"] for t in client.get_task_stream(start=t0)}
    killer.join(timeout=1)
    assert procs["worker1"].wait(timeout=30) == -signal.SIGKILL
    assert _results(killed_cfg, out)[0] == local[0]
    runs = query(connect(Warehouse(killed_cfg["warehouse"], s3_server)), "select stage, status from stg_runs").to_pylist()
    assert {r["status"] for r in runs} == {"succeeded"} and "refresh" in {r["stage"] for r in runs}
    assert len(_named(dict.fromkeys(keys), "score-part")) == len(local[0])  # this run's parts went to Dask too


def _named(tasks: dict, name: str) -> dict:
    """The entries of ``tasks`` (task key -> anything) whose key is one of ``name``'s tasks: ``<name>-<n>-<run>``."""
    return {k: v for k, v in tasks.items() if re.fullmatch(rf"{re.escape(name)}-\d+-[0-9a-f]+", str(k))}


def test_the_checks_before_a_dask_run_name_the_worker_and_the_path(cluster, tmp_path, demo_model):
    from flows.dask_workers import WorkerMismatchError, check_workers

    address, procs = cluster
    alive = [k for k, p in procs.items() if k.startswith("worker") and p.poll() is None]
    cfg = load_run_config(_config(tmp_path, demo_model, "checks", kind="dask", address=address))
    with pytest.raises(WorkerMismatchError, match=r"cannot see warehouse"):
        check_workers(cfg)  # not made yet: a run makes it before it checks the workers
    Warehouse(cfg.warehouse)
    assert len(check_workers(cfg)) == len(alive)
    missing = load_run_config({**_config(tmp_path, demo_model, "checks", kind="dask", address=address),
                               "model": {"config": cfg.model.config, "checkpoint": str(tmp_path / "gone.pt")}})
    with pytest.raises(WorkerMismatchError, match=r"^Dask worker tcp://127\.0\.0\.1:\d+ cannot see model\.checkpoint "
                                                  f"'{tmp_path / 'gone.pt'}'"):
        check_workers(missing)
    nobody = load_run_config({**_config(tmp_path, demo_model, "nobody", kind="dask",
                                        address=f"tcp://127.0.0.1:{free_port()}")})
    with pytest.raises(WorkerMismatchError, match=r"cannot reach the Dask scheduler"):
        check_workers(nobody, timeout=2)


def test_a_killed_scheduler_stops_the_run_in_one_line_and_the_same_command_resumes(prefect_api, tmp_path, demo_model):
    """`chips run CONFIG --executor ADDRESS` with the scheduler killed (SIGKILL) once the first features part lands:
    exit 1 with one line saying what to do; with a scheduler and workers at the same address again, the same
    command resumes the featurize run: the parts finished before are kept, not written again."""
    from prefect.settings import PREFECT_API_URL

    cfg = _config(tmp_path, demo_model, "sched")
    path = tmp_path / "sched.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    port = free_port()
    command = [str(Path(sys.executable).with_name("chips")), "run", str(path), "--executor", f"tcp://127.0.0.1:{port}"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # this session's API: no temporary one per run
    features = Path(cfg["warehouse"]) / "features"
    with dask_cluster(tmp_path, port) as (_, procs):
        def kill_when_the_first_part_lands():
            deadline = time.time() + 300
            while time.time() < deadline and not list(features.glob("run=*/*.parquet")):
                time.sleep(0.05)
            os.killpg(procs["scheduler"].pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_the_first_part_lands, daemon=True)
        killer.start()
        first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        killer.join(timeout=1)
    assert procs["scheduler"].returncode == -signal.SIGKILL
    assert first.returncode == 1, first.stderr[-2000:]
    line = first.stderr.strip().splitlines()[-1]
    assert line.startswith("chips: error: the connection to the Dask scheduler was lost mid-run"), line
    kept = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in features.glob("run=*/*.parquet")}
    assert 1 <= len(kept) < 8
    con = connect(Warehouse(cfg["warehouse"]))
    failed = query(con, "select run_id, status from stg_runs where stage = 'featurize'").to_pylist()
    assert len(failed) == 1 and failed[0]["status"].startswith(("failed: FutureCancelledError",
                                                                 "failed: CommClosedError")), failed

    with dask_cluster(tmp_path, port):
        again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    runs = query(connect(Warehouse(cfg["warehouse"])),
                 "select run_id, status from stg_runs where stage = 'featurize'").to_pylist()
    assert [r["run_id"] for r in runs] == [failed[0]["run_id"]] and runs[0]["status"] == "succeeded"
    after = {p.name: p for p in features.glob("run=*/*.parquet")}
    assert len(after) == 8
    for name, (data, mtime) in kept.items():  # resumed: the finished shards kept as they were
        assert after[name].read_bytes() == data and after[name].stat().st_mtime_ns == mtime
