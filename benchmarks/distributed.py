"""Dask execution (issue 29), measured on this machine alone: ingest and featurize on 1 vs 2 single-threaded worker
processes, Prefect-on-Dask overhead per task, the bytes each shard moves, and the driver's peak RSS at two pool sizes.

Every run starts its own scheduler and workers on 127.0.0.1 (``dask scheduler``, ``dask worker --nthreads 1`` with
``OMP_NUM_THREADS=1``, so a worker is one core) and drives them from a separate process, as a user's ``chips run
CONFIG --executor tcp://...`` does. Data: generated WebDataset tars of 16x16 PNG pairs (10k per tar, 5% bad rows;
``benchmarks/scale.py``'s), the demo-sized model with random weights, the default ``shard_size`` (2048).

* **scaling**: ingest (each tar a shard: judged, then written, on the workers) and featurize (each 2048-pair shard),
  timed inside the driver around each flow (the temporary Prefect API's start is outside), 1 worker then 2 workers,
  each with a fresh warehouse. Goal: 2 workers >= 1.8x the throughput of 1.
* **overhead per task**: a mapped no-op task on the same runner and one worker, wall time per task, against the
  1-worker featurize and ingest times per shard. Goal: <= 2% of a shard's time.
* **bytes per shard**: what the driver sends each task and gets back (the pickled function, shard and result), and
  what a shard reads and writes in the warehouse (measured on one ingest shard through the two-pass path; for
  featurize, its part's size and its share of the ``pairs`` parts it reads).
* **driver RSS**: ``chips run CONFIG --executor ADDRESS`` (2 workers) at each ``--sizes`` pool, the driver process's
  peak RSS (VmHWM, sampled every 0.2 s; the workers are other processes). Goal: the largest <= 1.1x the smallest.

Run: .venv/bin/python benchmarks/distributed.py --out docs/benchmarks/distributed.md
     [--scale-pairs 100000] [--sizes 100000,1000000] [--workdir /tmp/chips-dist]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this file's folder is first on sys.path, and this file would shadow Dask's `distributed` package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
BIN = Path(PY).parent
ONE_CORE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def cluster(workers: int, tmp: Path):
    """A scheduler and ``workers`` one-thread, one-core worker processes on 127.0.0.1; the scheduler's address."""
    from benchmarks.dask_cluster import dask_cluster

    with dask_cluster(tmp, workers=workers, env={**ONE_CORE, "PYTHONPATH": str(ROOT)},
                      dask=str(BIN / "dask")) as (address, _):
        yield address


def config_for(workdir: Path, data: Path, label: str, address: str) -> Path:
    """``scale.py``'s end-to-end config for ``data``, at the default shard size, on the scheduler at ``address``."""
    import yaml

    from benchmarks.scale import e2e_config

    path = e2e_config(workdir, data, label)
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("shard_size")  # the default
    cfg["executor"] = {"kind": "dask", "address": address}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ the driver

def _noop(n, shard):
    return None


def driver(config: str, noop_tasks: int) -> dict:
    """In a fresh process: ingest then featurize the config's pool on its scheduler, each flow timed here (the
    temporary Prefect API is started before, by an empty flow); then ``noop_tasks`` no-op tasks mapped on the same
    runner. Also the pickled size of every task's function, shard and result: what the driver and a worker
    exchange per task."""
    import cloudpickle
    from prefect import flow

    import flows.chips_flows as cf
    from chips_core.stages.runconfig import load_run_config

    sizes: dict[str, list] = {}
    real = cf._map_shards

    def recording(fn, shards, name="featurize-shard", what="shards", **kw):
        fn_bytes = len(cloudpickle.dumps(fn))
        for n, (shard, result) in enumerate(zip(shards, real(fn, shards, name=name, what=what, **kw))):
            sizes.setdefault(name, []).append({"function": fn_bytes, "shard": len(cloudpickle.dumps((n, shard))),
                                               "result": len(cloudpickle.dumps(result))})
            yield result

    cf._map_shards = recording

    @flow(name="chips-bench-start")
    def start() -> None:
        return None

    start()  # the temporary Prefect API starts here, outside every timing
    import psutil
    from distributed import Client

    me = psutil.Process()

    def cpu() -> float:  # this process and its children (the temporary Prefect API server)
        procs = [me] + me.children(recursive=True)
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    address = load_run_config(config).executor.address
    client = Client(address)
    client.get_task_stream()  # the scheduler records its task stream from the first request on
    workers = len(client.scheduler_info()["workers"])
    out: dict = {"workers": workers}
    for stage, run in (("ingest", cf.ingest_on), ("featurize", cf.featurize_on)):
        c0, t0, w0 = cpu(), time.perf_counter(), time.time()
        result = run(config)(config)
        out[f"{stage}_s"] = time.perf_counter() - t0
        out[f"{stage}_driver_cpu_s"] = cpu() - c0
        stream = client.get_task_stream(start=w0)
        busy = sum(ss["stop"] - ss["start"] for t in stream for ss in t["startstops"] if ss["action"] == "compute")
        out[f"{stage}_worker_busy"] = busy / (workers * out[f"{stage}_s"])  # share of the workers' time in tasks
        out[stage] = {k: result[k] for k in ("read", "kept", "quarantined", "unchanged", "run_id", "pairs",
                                              "shards") if k in result}
    out["ingest_shards"] = len(sizes.get("ingest-judge", []))
    if noop_tasks:
        @flow(name="chips-bench-noop", task_runner=cf.task_runner_for(load_run_config(config).executor))
        def noops(n: int) -> tuple[float, float]:
            t = time.perf_counter()
            list(real(_noop, [()] * n, name="noop", what="no-ops"))  # the flows' shard map: plain Dask tasks
            flows_map = time.perf_counter() - t
            t = time.perf_counter()  # the same no-ops as Prefect task runs on the Dask runner (the earlier map)
            futures = cf._shard.with_options(name="noop-task").map(cf.unmapped(_noop), list(range(n)), [()] * n)
            [f.result() for f in futures]
            return flows_map, time.perf_counter() - t

        out["noop_tasks"] = noop_tasks
        out["noop_s"], out["noop_prefect_s"] = noops(noop_tasks)
    client.close()
    out["task_bytes"] = {name: {k: sum(r[k] for r in rows) / len(rows) for k in ("function", "shard", "result")}
                         for name, rows in sizes.items()}
    return out


def run_driver(config: Path, noop_tasks: int, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([PY, __file__, "--driver", str(config), "--noop-tasks", str(noop_tasks)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"driver failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ bytes

def ingest_shard_bytes(tar: str, tmp: Path) -> dict:
    """One WebDataset tar through the two-pass ingest (in this process): the bytes each pass writes and reads in
    the warehouse, per table."""
    from chips_core.platform.readers import SourceSpec
    from chips_core.platform.warehouse import Warehouse
    from chips_core.stages.common import local_map
    from chips_core.stages.ingest import ingest_stage

    wrote: dict[str, int] = {}
    read: dict[str, int] = {}
    wh = Warehouse(str(tmp / "bytes-wh"))
    real_write, real_read = wh.write, wh.read_part

    def write(table, data, partition, name, **kw):
        path = real_write(table, data, partition, name, **kw)
        if table != "runs":  # the run's own row, not the shard's
            wrote[table] = wrote.get(table, 0) + wh.fs.size(path)
        return path

    def read_part(table, partition, name, columns=None):
        read[table] = read.get(table, 0) + wh.fs.size(wh.part_path(table, partition, name))  # the file, at most
        return real_read(table, partition, name, columns)

    wh.write, wh.read_part = write, read_part
    ingest_stage([SourceSpec("pool", "webdataset", (tar,))], wh, map_shards=local_map)
    return {"source": os.path.getsize(tar), "wrote": wrote, "read": read}


def featurize_bytes(warehouse: Path, run_id: str, shards: int) -> dict:
    """A featurize shard's part (mean) and its share of the ``pairs`` parts it reads (image and caption columns)."""
    import pyarrow.parquet as pq

    parts = list((warehouse / "features").glob(f"run={run_id}/*.parquet"))
    read = 0
    for p in (warehouse / "pairs").rglob("*.parquet"):
        meta = pq.ParquetFile(p).metadata
        cols = {meta.schema.column(i).name: i for i in range(meta.num_columns)}
        read += sum(meta.row_group(g).column(cols[c]).total_compressed_size
                    for g in range(meta.num_row_groups) for c in ("image", "caption", "pair_id"))
    return {"part": sum(p.stat().st_size for p in parts) / len(parts), "pairs_read": read / shards}


# ------------------------------------------------------------------------------------------------ report

def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def report(args, res: dict, wall: float) -> str:
    one, two = res["scaling"]["1"], res["scaling"]["2"]
    n = one["ingest"]["read"]
    lines = ["# Dask execution: scaling, overhead, bytes per shard, driver memory", "",
             f"Generated by `python benchmarks/distributed.py {' '.join(res['argv'])}` at {res['commit']} on this "
             f"machine ({os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}), alone on it; "
             f"wall time {wall / 60:.1f} min. Every run starts its own `dask scheduler` and `dask worker --nthreads 1` "
             "processes (`OMP_NUM_THREADS=1`: one core each) on 127.0.0.1 and drives them from another process. "
             f"Data: generated WebDataset tars of 16x16 PNG pairs (10k per tar, 5% bad rows), the demo-sized model "
             "(random weights), the default `shard_size` (2048).", "",
             "## Goals", "", "| goal | measured | met |", "| --- | --- | --- |"]
    ing = one["ingest_s"] / two["ingest_s"]
    feat = one["featurize_s"] / two["featurize_s"]
    per_task = one["noop_s"] / one["noop_tasks"]
    shard_f = one["featurize_s"] / one["featurize"]["shards"]
    shard_i = one["ingest_s"] / max(1, one["ingest_shards"])
    rss = res.get("rss", {})
    lines += [f"| ingest: 2 workers >= 1.8x the throughput of 1 | {ing:.2f}x | {'yes' if ing >= 1.8 else 'no'} |",
              f"| featurize: 2 workers >= 1.8x the throughput of 1 | {feat:.2f}x | {'yes' if feat >= 1.8 else 'no'} |",
              f"| overhead per task <= 2% of a featurize shard's time | {100 * per_task / shard_f:.1f}% "
              f"({1000 * per_task:.1f} ms of {shard_f:.2f} s) | {'yes' if per_task <= 0.02 * shard_f else 'no'} |",
              f"| overhead per task <= 2% of an ingest shard's time (each shard is two tasks) | "
              f"{100 * 2 * per_task / shard_i:.1f}% ({2000 * per_task:.0f} ms of {shard_i:.2f} s) | "
              f"{'yes' if 2 * per_task <= 0.02 * shard_i else 'no'} |"]
    if len(rss) >= 2:
        sizes = sorted(rss, key=int)
        ratio = rss[sizes[-1]]["peak_mib"] / rss[sizes[0]]["peak_mib"]
        lines.append(f"| driver peak RSS at {int(sizes[-1]):,} pairs <= 1.1x at {int(sizes[0]):,} | {ratio:.2f}x "
                     f"({rss[sizes[-1]]['peak_mib']:,.0f} / {rss[sizes[0]]['peak_mib']:,.0f} MiB) | "
                     f"{'yes' if ratio <= 1.1 else 'no'} |")
    lines += ["", f"## 1 vs 2 workers ({n:,} pairs read)", "",
              "| workers | stage | seconds | pairs/s | shards | driver CPU s | workers busy |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for w, r in (("1", one), ("2", two)):
        for stage, pairs, shards in (("ingest", r["ingest"]["read"], r["ingest_shards"]),
                                     ("featurize", r["featurize"]["pairs"], r["featurize"]["shards"])):
            lines.append(f"| {w} | {stage} | {r[f'{stage}_s']:.1f} | {pairs / r[f'{stage}_s']:,.0f} | {shards} | "
                         f"{r.get(f'{stage}_driver_cpu_s', float('nan')):.1f} | "
                         f"{100 * r.get(f'{stage}_worker_busy', float('nan')):.0f}% |")
    lines += ["", "Each time is one flow call in the driver: the flow run's creation, the task runner's connection "
              "and the check of the workers are inside it; the temporary Prefect API's start is not. Ingest's "
              "de-duplication runs in the driver, in shard order, between the two passes. *Driver CPU*: the "
              "driving process and its children (the temporary Prefect API server) during the stage, on the same "
              "two cores as the workers. *Workers busy*: the time the workers spent computing tasks (the "
              "scheduler's task stream) over workers x the stage's seconds; a worker's first task includes its "
              "imports and the model's load.", "",
              "## Overhead per task", "",
              f"{one['noop_tasks']} no-op tasks mapped through the flows' shard map on one worker took "
              f"{one['noop_s']:.2f} s: **{1000 * per_task:.1f} ms per task** (plain Dask tasks through the Dask "
              f"task runner's client: the round trip and the flow's progress log). A featurize shard took {shard_f:.2f} s on one worker and "
              f"an ingest shard (two tasks) {shard_i:.2f} s."
              + (f" The same no-ops as Prefect task runs on the Dask runner (how the flows mapped shards before "
                 f"this benchmark: `_shard.map`) took {1000 * one['noop_prefect_s'] / one['noop_tasks']:.0f} ms "
                 "per task." if "noop_prefect_s" in one else ""),
              "",
              "## Bytes per shard", "", "| what | bytes |", "| --- | --- |"]
    tb = one["task_bytes"]
    for name in ("ingest-judge", "ingest-write", "featurize-shard"):
        if name in tb:
            b = tb[name]
            lines.append(f"| `{name}` task: function / shard / result, pickled (driver <-> worker) | "
                         f"{fmt_bytes(b['function'])} / {fmt_bytes(b['shard'])} / {fmt_bytes(b['result'])} |")
    ib = res["ingest_bytes"]
    lines.append(f"| ingest shard: the source tar read (pass 1) | {fmt_bytes(ib['source'])} |")
    for table, b in ib["wrote"].items():
        lines.append(f"| ingest shard: `{table}` written | {fmt_bytes(b)} |")
    for table, b in ib["read"].items():
        lines.append(f"| ingest shard: `{table}` read back (pass 2 or the driver) | {fmt_bytes(b)} |")
    fb = res["featurize_bytes"]
    lines += [f"| featurize shard: its share of the `pairs` parts read (image, caption, id) | "
              f"{fmt_bytes(fb['pairs_read'])} |", f"| featurize shard: its `features` part written | "
              f"{fmt_bytes(fb['part'])} |", "",
              "The function (it closes over the config; the featurize one over the model's spec too) goes with each "
              "task to its worker; the model travels as its spec and checksum (each worker loads it once per process). Ingest's staging part holds the shard's "
              "rows with their facts (images only for rows that may be kept); the decision part, the driver's "
              "de-duplication verdicts for the rows it concerns."]
    if rss:
        lines += ["", "## Driver memory with the Dask executor", "",
                  "`chips run CONFIG --executor ADDRESS` on 2 workers; the peak RSS of the driver process only.", "",
                  "| pairs | peak RSS MiB | run s |", "| --- | --- | --- |"]
        for size in sorted(rss, key=int):
            lines.append(f"| {int(size):,} | {rss[size]['peak_mib']:,.0f} | {rss[size]['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/chips-dist")
    ap.add_argument("--scale-pairs", type=int, default=100_000)
    ap.add_argument("--sizes", default="100000,1000000", help="pool sizes for the driver-RSS runs ('' for none)")
    ap.add_argument("--noop-tasks", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--driver", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.driver:
        print(json.dumps(driver(a.driver, a.noop_tasks)))
        return
    from benchmarks.scale import env_for, make_e2e_data, sampled_run

    t_start = time.time()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    res: dict = {"argv": sys.argv[1:], "commit": commit, "scaling": {}, "rss": {}}
    data = make_e2e_data(work, a.scale_pairs)
    for workers in (1, 2):
        with cluster(workers, work) as address:
            cfg = config_for(work, data, f"scale-{workers}", address)
            res["scaling"][str(workers)] = run_driver(cfg, a.noop_tasks if workers == 1 else 0, a.timeout)
        print(f"{workers} worker(s): {res['scaling'][str(workers)]}", flush=True)
    one = res["scaling"]["1"]
    res["ingest_bytes"] = ingest_shard_bytes(sorted(str(p) for p in (data / "pool").glob("*.tar"))[0], work)
    res["featurize_bytes"] = featurize_bytes(work / "run-scale-1" / "warehouse", one["featurize"]["run_id"],
                                             one["featurize"]["shards"])
    for size in [int(s) for s in a.sizes.split(",") if s]:
        sdata = make_e2e_data(work, size)
        with cluster(2, work) as address:
            cfg = config_for(work, sdata, f"rss-{size}", address)
            cmd = [str(BIN / "chips"), "run", str(cfg), "--executor", address]
            rc, samples, seconds, output = sampled_run(cmd, env_for(ROOT), a.timeout)
        if rc != 0:
            raise SystemExit(f"chips run at {size} failed ({rc}):\n{output[-3000:]}")
        res["rss"][str(size)] = {"peak_mib": max(m for _, m in samples), "seconds": seconds}
        print(f"driver RSS at {size}: {res['rss'][str(size)]}", flush=True)
    text = report(a, res, time.time() - t_start)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
