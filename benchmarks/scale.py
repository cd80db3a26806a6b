"""Pools larger than memory (issue 11): end to end through ``chips run`` at growing pool sizes, and a rescore over
stored features at ViT-B dimensions, each in a fresh process, this tree beside another revision (``--base``,
default the commit before the streaming work) in the same run.

* end to end: generated pools of 16x16 PNG pairs (WebDataset shards of 10k, 5% bad rows), the demo-sized
  model (random weights: speed and memory do not depend on them), ``chips run`` (Prefect, temporary API).
  Per stage: seconds (from the ``runs`` table) and the peak RSS of the ``chips`` process while the stage ran
  (the peak within each 0.2 s interval: VmHWM, reset after each read). Goals: peak RSS flat (largest within 10%
  of smallest), seconds per pair linear (within 1.2x).
* rescore: ``score_stage`` over ``--rescore`` generated feature rows with the identity of a real ViT-B-32
  featurize run (k = 512, d = 512; its bank, curvature and eval set are real). Goals: >= 300k pairs/s,
  peak RSS < 2 GiB. Reading and arithmetic are timed alone to say which one limits.

Run: .venv/bin/python benchmarks/scale.py --out docs/benchmarks/scale.md
     [--sizes 100000,1000000] [--rescore 2000000] [--base f6d642b] [--base-sizes 100000]
     [--base-rescore 250000,500000] [--workdir /tmp/chips-scale]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
CHIPS = str(ROOT / ".venv" / "bin" / "chips")
STAGES = ("ingest", "featurize", "score", "materialize")


# ------------------------------------------------------------------------------------------------ helpers

def base_tree(workdir: Path, rev: str) -> Path:
    """A checkout of ``rev`` (git worktree) to run the other side of the before/after."""
    tree = workdir / f"tree-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
    return tree


def sampled_run(cmd: list[str], env: dict, timeout: float, cwd: Path | None = None,
                per_interval_peak: bool = False, anon: list | None = None) -> tuple[int, list[tuple[float, float]], float, str]:
    """Run ``cmd``, sampling its memory every 0.2 s: ``(returncode, [(unix time, MiB)], seconds, output)``;
    returncode -9 when it ran past ``timeout``. Each sample is VmRSS, or with ``per_interval_peak`` the process's
    peak since the previous sample (its VmHWM, reset after each read through ``/proc/PID/clear_refs`` where that is
    allowed), so that a spike shorter than the interval is counted in the stage it happened in (not for a child that
    reads its own VmHWM at the end). ``anon``, when given, collects ``(unix time, RssAnon MiB)`` at each sample: the
    process's own allocations, without the shared libraries' pages, whose count in RSS depends on what the page cache
    holds (a sample, not a peak: a spike shorter than 0.2 s can be missed)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    samples: list[tuple[float, float]] = []
    peak = [0.0]  # VmHWM: the process's true peak, between samples too
    resettable = per_interval_peak
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            status = open(f"/proc/{proc.pid}/status").read()
            mib = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
                   if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:"))}
            if anon is not None and "RssAnon" in mib:
                anon.append((time.time(), mib["RssAnon"]))
            peak[0] = max(peak[0], mib.get("VmHWM", 0.0))
            if resettable:
                try:
                    with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                        f.write("5")  # reset VmHWM to the current RSS
                except OSError:
                    resettable = False
            if "VmRSS" in mib:  # absent once the process has exited (a zombie until reaped)
                samples.append((time.time(), mib["VmHWM"] if resettable and "VmHWM" in mib else mib["VmRSS"]))
        except OSError:
            pass
        if time.time() - t0 > timeout:
            proc.kill()
            proc.wait()
            reader.join(5)
            return -9, samples + [(time.time(), peak[0])], time.time() - t0, "".join(out)
        time.sleep(0.2)
    reader.join(5)
    return proc.returncode, samples + [(time.time(), peak[0])], time.time() - t0, "".join(out)


def env_for(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p),
               CHIPS_LOG_DIR=str(tree / ".logs"))
    env.pop("PREFECT_API_URL", None)
    return env


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------ end to end

def make_e2e_data(workdir: Path, n: int) -> Path:
    """Pool tars of ``n`` pairs, a target tar, and a random demo-sized checkpoint (cached per size)."""
    from benchmarks.platform_throughput import make_shards

    data = workdir / f"data-{n}"
    if not (data / "done").exists():
        (data / "pool").mkdir(parents=True, exist_ok=True)
        (data / "target").mkdir(exist_ok=True)
        make_shards(data / "pool", n, seed=1)
        make_shards(data / "target", 500, seed=2)
        (data / "done").write_text("ok")
    ckpt = workdir / "demo-random.pt"
    if not ckpt.exists():
        import torch

        from chips_core.scoring.endpoint import ModelSpec, load_model
        from chips_core.train.synthetic import DEMO_MODEL_CONFIG
        torch.manual_seed(0)
        torch.save(load_model(ModelSpec(config=DEMO_MODEL_CONFIG)).model.state_dict(), ckpt)
    return data


def e2e_config(workdir: Path, data: Path, label: str, images: str = "copy") -> Path:
    import yaml

    from chips_core.train.synthetic import DEMO_MODEL_CONFIG
    run = workdir / f"run-{label}"
    if run.exists():
        subprocess.run(["rm", "-rf", str(run)], check=True)
    run.mkdir(parents=True)
    by = {} if images == "copy" else {"images": images}  # a base tree predates the option
    cfg = {"warehouse": str(run / "warehouse"),
           "pool": [{"name": "pool", "kind": "webdataset", "paths": sorted(str(p) for p in (data / "pool").glob("*.tar")),
                     **by}],
           "target": [{"name": "target", "kind": "webdataset", "paths": sorted(str(p) for p in (data / "target").glob("*.tar")),
                       **by}],
           "model": {"config": DEMO_MODEL_CONFIG, "checkpoint": str(workdir / "demo-random.pt")},
           "sketch": {"k": 256}, "bank": {"size": 256}, "curvature": {"n_curv": 2000, "hard_negatives": 16},
           "budgets": [0.1, 0.3, 0.5], "shard_size": 4096,
           "outputs": {"dir": str(run / "out"), "formats": []}}
    path = run / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def stage_table(warehouse: Path, samples) -> dict:
    """Per stage: seconds and the peak sampled RSS inside its window (from the ``runs`` table)."""
    import pyarrow.dataset as pads
    runs = pads.dataset(str(warehouse / "runs"), format="parquet", partitioning="hive").to_table(
        columns=["stage", "status", "started_at", "ended_at"]).to_pylist()
    out = {}
    for r in runs:
        if r["stage"] not in STAGES:
            continue
        a, b = r["started_at"].timestamp(), r["ended_at"].timestamp()
        inside = [m for t, m in samples if a <= t <= b]
        out[r["stage"]] = {"seconds": b - a, "peak_rss_mib": max(inside) if inside else None, "status": r["status"],
                           "window": [a, b]}
    return out


def between_stages(stages: dict, samples, t0: float) -> list[dict]:
    """The stretches of the run no stage's window covers (before the first, between two, after the last): each one's
    start and end in seconds from the process's start, the stages on either side, and its peak sampled RSS."""
    windows = sorted((s["window"][0], s["window"][1], name) for name, s in stages.items())
    edges = [(t0, "start")] + [x for a, b, name in windows for x in ((a, name), (b, name))] + [(samples[-1][0] if samples else t0, "end")]
    out = []
    for (a, left), (b, right) in zip(edges[0::2], edges[1::2]):
        inside = [m for t, m in samples if a < t < b]
        out.append({"after": left, "before": right, "from_s": round(a - t0, 1), "to_s": round(b - t0, 1),
                    "peak_rss_mib": max(inside) if inside else None,
                    "peak_at_s": round(max((x for x in samples if a < x[0] < b), key=lambda x: x[1])[0] - t0, 1) if inside else None})
    return out


def e2e(workdir: Path, tree: Path, label: str, n: int, timeout: float, images: str = "copy") -> dict:
    data = make_e2e_data(workdir, n)
    cfg = e2e_config(workdir, data, f"{label}-{n}" + ("" if images == "copy" else f"-{images}"), images)
    t0, anon = time.time(), []
    rc, samples, secs, out = sampled_run([CHIPS, "run", str(cfg)], env_for(tree), timeout, cwd=tree,
                                         per_interval_peak=True, anon=anon)
    wh = cfg.parent / "warehouse"
    stages = stage_table(wh, samples) if (wh / "runs").exists() else {}
    res = {"tree": label, "n": n, "images": images, "rc": rc, "seconds": secs,
           "peak_rss_mib": max((m for _, m in samples), default=0), "peak_anon_mib": max((m for _, m in anon), default=0),
           "stages": stages, "between": between_stages(stages, samples[:-1], t0),
           # the whole curve, one point per second (each the peak of its samples), for a plot or a second look
           "timeline": [[round(t - t0), m] for t, m in _per_second(samples[:-1], t0)],
           "warehouse_bytes": dir_bytes(wh) if wh.exists() else 0,
           "pairs_bytes": dir_bytes(wh / "pairs") if (wh / "pairs").exists() else 0,
           "source_bytes": dir_bytes(data / "pool") + dir_bytes(data / "target"), "tail": out[-600:] if rc else ""}
    print(json.dumps({k: v for k, v in res.items() if k != "tail"}), flush=True)
    if rc:
        print(out[-2000:], flush=True)
    return res


def _per_second(samples, t0: float) -> list[tuple[float, float]]:
    best: dict[int, tuple[float, float]] = {}
    for t, m in samples:
        k = int(t - t0)
        if k not in best or m > best[k][1]:
            best[k] = (t, m)
    return [best[k] for k in sorted(best)]


REINGEST_CHILD = r"""
import json, sys, time
import yaml
from chips_core.stages import ingest_stage, load_run_config
from chips_core.platform.warehouse import Warehouse
cfg = load_run_config(yaml.safe_load(open(sys.argv[1])))
t0 = time.perf_counter()
out = ingest_stage(list(cfg.pool) + list(cfg.target), Warehouse(cfg.warehouse))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": hwm, **{k: out[k] for k in ("read", "kept", "unchanged")}}))
"""


def reingest(workdir: Path, tree: Path, label: str, n: int, timeout: float) -> dict:
    """Ingest the same sources again into the warehouse an end-to-end run left: every row is unchanged."""
    cfg = workdir / f"run-{label}-{n}" / "run.yaml"
    rc, samples, secs, out = sampled_run([PY, "-c", REINGEST_CHILD, str(cfg)], env_for(tree), timeout, cwd=tree)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    res = {"tree": label, "n": n, "rc": rc, **(json.loads(line) if line and not rc else {"tail": out[-600:]})}
    print(json.dumps(res), flush=True)
    return res


# ------------------------------------------------------------------------------------------------ rescore

RESCORE_PART = 16384


def prepare_rescore(workdir: Path, n: int, lists: bool = False) -> Path:
    """A warehouse with a real ViT-B-32 featurize run over a small pool ("seed": bank, curvature, identity),
    and ``n`` generated feature rows under that identity (run "big-<n>"; with ``lists``, "big-<n>-lists" in the
    layout before the streaming work, vectors as fixed-size lists of float16, which the base revision reads)."""
    import shutil

    import torch

    from benchmarks.platform_throughput import make_shards
    from chips_core.platform.features import write_features
    from chips_core.platform.warehouse import Warehouse
    from chips_core.scoring.endpoint import ModelSpec, load_model
    from chips_core.scoring.featurize import FeatureBatch

    base = workdir / "rescore"
    cfg_path = base / "rescore.json"
    if not cfg_path.exists():
        (base / "pool").mkdir(parents=True, exist_ok=True)
        (base / "target").mkdir(exist_ok=True)
        make_shards(base / "pool", 320, seed=3)
        make_shards(base / "target", 256, seed=4)
        torch.manual_seed(0)
        ckpt = base / "vitb32-random.pt"
        torch.save(load_model(ModelSpec(name="ViT-B-32")).model.state_dict(), ckpt)
        cfg = {"warehouse": str(base / "warehouse"),
               "pool": [{"name": "pool", "kind": "webdataset", "paths": [str(p) for p in sorted((base / "pool").glob("*.tar"))]}],
               "target": [{"name": "target", "kind": "webdataset", "paths": [str(p) for p in sorted((base / "target").glob("*.tar"))]}],
               "model": {"name": "ViT-B-32", "checkpoint": str(ckpt)}, "sketch": {"k": 512}, "bank": {"size": 256},
               "curvature": {"n_curv": 256, "hard_negatives": 16}, "budgets": [0.1], "shard_size": RESCORE_PART}
        from chips_core.stages import featurize_stage, ingest_stage, load_run_config
        rc = load_run_config(cfg)
        wh = Warehouse(rc.warehouse)
        ingest_stage(list(rc.pool) + list(rc.target), wh)
        featurize_stage(rc, wh, load_model(rc.model), run_id="seed")
        cfg_path.write_text(json.dumps(cfg))
    wh = Warehouse(str(base / "warehouse"))
    run = f"big-{n}" + ("-lists" if lists else "")
    if not wh.fs.exists(wh.path("globals", f"run={run}", "done")):
        from chips_core.platform.features import read_features
        seed = read_features(wh, "seed")
        shutil.copytree(wh.path("globals", "run=seed"), wh.path("globals", f"run={run}"), dirs_exist_ok=True)
        rng = np.random.default_rng(n)
        g_scale = float(np.std(seed.g))
        for p, a in enumerate(range(0, n, RESCORE_PART)):
            m = min(RESCORE_PART, n - a)

            def unit(d):
                v = rng.standard_normal((m, d), dtype=np.float32)
                return v / np.linalg.norm(v, axis=1, keepdims=True)
            fb = FeatureBatch(pair_id=[f"{rng.integers(2**62):016x}{a + i:012d}" for i in range(m)],
                              x=unit(seed.x.shape[1]), y=unit(seed.y.shape[1]),
                              g=(rng.standard_normal((m, seed.g.shape[1]), dtype=np.float32) * g_scale),
                              p_corr=rng.random(m, dtype=np.float32), margin=rng.standard_normal(m, dtype=np.float32),
                              clipscore=rng.standard_normal(m, dtype=np.float32) * 0.1,
                              loss=rng.random(m, dtype=np.float32) * 5, identity=seed.identity)
            if lists:
                import pyarrow as pa
                t = fb.to_arrow("float16")
                for v in FeatureBatch.VECTORS:
                    a = getattr(fb, v).astype(np.float16)
                    t = t.set_column(t.schema.get_field_index(v), v, pa.FixedSizeListArray.from_arrays(
                        pa.array(a.reshape(-1), pa.float16()), a.shape[1]))
                wh.write("features", t.replace_schema_metadata(fb.to_arrow().schema.metadata), {"run": run},
                         f"shard-{p:05d}")
            else:
                write_features(wh, fb, run, f"shard-{p:05d}")
        wh.write_bytes(wh.path("globals", f"run={run}", "done"), b"ok")
    return cfg_path


RESCORE_CHILD = r"""
import json, sys, time
import chips_core
print("chips_core from", chips_core.__file__, flush=True)
import torch
torch.set_num_threads(2)
from chips_core.stages import load_run_config, score_stage
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.endpoint import load_model


def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024


cfg = load_run_config(json.loads(open(sys.argv[1]).read()))
wh, loaded, run = Warehouse(cfg.warehouse), load_model(cfg.model), sys.argv[2]
mode = sys.argv[3]
extra = {}
if mode == "stream":  # the stage with the eval set's statistics computed before the clock starts
    import chips_core.stages.score as S
    from chips_core.stages.common import require_pairs
    from chips_core.platform.features import load_bank
    from chips_core.scoring.featurize import Featurizer
    from chips_core.scoring.endpoint import EndpointModel
    feat = Featurizer(EndpointModel(loaded.model), load_bank(wh, run), cfg.sketch, cfg.featurize)
    cached = S.target_and_eval_features(cfg, wh, loaded, feat, require_pairs(wh, cfg.target, "target"))
    S.target_and_eval_features = lambda *a: cached
    extra["rss_before_mib"] = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the peak below is the streaming's
t0 = time.perf_counter()
if mode in ("stage", "stream"):
    out = score_stage(cfg, wh, loaded, run)
    n = out["pairs"]
elif mode == "target":  # the fixed cost: the model over the eval set (target statistics)
    from chips_core.stages.check import target_and_eval_features
    from chips_core.stages.common import require_pairs
    from chips_core.platform.features import load_bank
    from chips_core.scoring.featurize import Featurizer
    from chips_core.scoring.endpoint import EndpointModel
    feat = Featurizer(EndpointModel(loaded.model), load_bank(wh, run), cfg.sketch, cfg.featurize)
    target_and_eval_features(cfg, wh, loaded, feat, require_pairs(wh, cfg.target, "target"))
    n = 0
elif mode in ("read", "arith"):  # one thread: reading the parts alone; the arithmetic alone on parts in memory
    from chips_core.platform.features import feature_parts, read_feature_part, load_bank, load_curvature
    from chips_core.scoring.score import Preconditioners, score_features
    from chips_core.stages.check import target_and_eval_features
    from chips_core.stages.common import require_pairs
    from chips_core.scoring.featurize import Featurizer
    from chips_core.scoring.endpoint import EndpointModel
    parts = feature_parts(wh, run)
    if mode == "read":
        n = sum(len(read_feature_part(wh, p)) for p in parts)
    else:
        feat = Featurizer(EndpointModel(loaded.model), load_bank(wh, run), cfg.sketch, cfg.featurize)
        ts, _ = target_and_eval_features(cfg, wh, loaded, feat, require_pairs(wh, cfg.target, "target"))
        curv = load_curvature(wh, run)
        pre = Preconditioners.solve(ts, curv, cfg.curvature)
        batches = [read_feature_part(wh, p) for p in parts[:8]]
        t0 = time.perf_counter()
        n = 0
        for _ in range(3):
            for b in batches:
                score_features(b, ts, curv, cfg.curvature, cfg.score, pre)
                n += len(b)
dt = time.perf_counter() - t0
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak across exec)
print(json.dumps({"mode": mode, "n": n, "seconds": dt, "peak_rss_mib": status("VmHWM"), **extra}))
"""


SELECT_CHILD = r"""
import json, math, os, sys, tempfile, time
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024


n, mode, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
k, share, budget = 512, 0.45, 0.1  # k of ViT-B scoring; sheets' eligible tier held 45% of its pool
rng = np.random.default_rng(n)
ids = [f"{rng.integers(2**62):016x}{i:012d}" for i in range(n)]
if mode == "rank":  # today's ranking of the same pool: the score stage's DuckDB sort into the run's scores part
    from chips_core.platform.selection import unranked_dir, write_ranked_scores
    from chips_core.platform.warehouse import SCHEMAS, Warehouse
    wh = Warehouse(os.path.join(folder, f"rank-{n}"))
    names = [f.name for f in SCHEMAS["scores"] if f.name not in ("pair_id", "run_id", "rank")]
    for p, a in enumerate(range(0, n, 16384)):
        m = min(16384, n - a)
        t = pa.table({"pair_id": ids[a:a + m], "run_id": ["r"] * m, **{c: rng.standard_normal(m) for c in names}})
        os.makedirs(unranked_dir(wh, "r"), exist_ok=True)
        pq.write_table(t, os.path.join(unranked_dir(wh, "r"), f"part-{p:06d}.parquet"), compression="none")
    open("/proc/self/clear_refs", "w").write("5")
    t0 = time.perf_counter()
    write_ranked_scores(wh, "r")
    seconds = time.perf_counter() - t0
else:  # a set-aware method over the eligible pairs' spooled partitions (as EligibleGradients leaves them)
    from chips_core.scoring.select import SelectConfig, partition_of, select_partitions
    cfg = SelectConfig()
    elig = [ids[i] for i in np.flatnonzero(rng.random(n) < share)]
    n_parts = max(1, math.ceil(len(elig) / cfg.partition))
    where = partition_of(elig, n_parts, cfg.seed)
    spool = tempfile.mkdtemp(dir=folder)
    parts = []
    for p in range(n_parts):
        rows = np.flatnonzero(where == p)
        path = os.path.join(spool, f"part-{p:06d}.f16")
        rng.standard_normal((len(rows), k), dtype=np.float32).astype(np.float16).tofile(path)
        parts.append(([elig[i] for i in rows], (lambda f=path: np.fromfile(f, dtype=np.float16).reshape(-1, k))))
    v = rng.standard_normal(k)
    open("/proc/self/clear_refs", "w").write("5")
    t0 = time.perf_counter()
    picked = select_partitions(mode, parts, v, math.ceil(budget * n - 1e-9), cfg)
    seconds = time.perf_counter() - t0
print(json.dumps({"n": n, "mode": mode, "seconds": seconds, "peak_rss_mib": status("VmHWM")}))
"""


def select_bench(workdir: Path, n: int, mode: str, timeout: float) -> dict:
    """One row of the set-aware selection's scale table: ``mode`` "rank" (today's ranking of an ``n``-pair score
    run) or a set-aware method selecting 10% of ``n`` pairs among a 45% eligible tier (random k = 512 gradients,
    spooled per partition before the clock starts), in a fresh process."""
    folder = workdir / "select"
    folder.mkdir(parents=True, exist_ok=True)
    rc, samples, secs, out = sampled_run([PY, "-c", SELECT_CHILD, str(n), mode, str(folder)], env_for(ROOT), timeout,
                                         cwd=ROOT)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    res = {"n": n, "mode": mode, "rc": rc, **(json.loads(line) if line and not rc else {"tail": out[-600:]})}
    print(json.dumps(res), flush=True)
    return res


def rescore(workdir: Path, tree: Path, label: str, n: int, mode: str, timeout: float, lists: bool = False) -> dict:
    cfg = prepare_rescore(workdir, n, lists)
    run = f"big-{n}" + ("-lists" if lists else "")
    anon: list = []
    rc, samples, secs, out = sampled_run([PY, "-c", RESCORE_CHILD, str(cfg), run, mode], env_for(tree), timeout,
                                         cwd=tree, anon=anon)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    res = {"tree": label, "n": n, "mode": mode, "rc": rc,
           "peak_rss_mib": max((m for _, m in samples), default=0), "peak_anon_mib": max((m for _, m in anon), default=0), **(json.loads(line) if line and not rc else {})}
    if rc:
        res["tail"] = out[-600:]
    print(json.dumps(res), flush=True)
    return res


# ------------------------------------------------------------------------------------------------ report

def fmt(x, d=1):
    return "—" if x is None else f"{x:,.{d}f}"


def report(args, results: dict, wall: float) -> str:
    import torch
    e2e_rows, rs = results["e2e"], results["rescore"]
    lines = ["# Pools larger than memory: end to end and rescore at scale", "",
             f"Generated by `python benchmarks/scale.py {results.get('argv') or ' '.join(sys.argv[1:])}`"
             + (" then the same with `--reingest-only --run-args '<those arguments>'` (the re-ingest table)"
                if results.get("reingest") else "")
             + (f"; the rescore section by `python benchmarks/scale.py {results['rescore_argv']}` "
                f"({results['rescore_wall_s'] / 60:.1f} min), an earlier run on the same machine of code that scores "
                f"the same way (the change between the two runs touched ingest only)" if results.get("rescore_argv") else "")
             + f" on {os.cpu_count()} CPUs "
             f"({platform.processor() or platform.machine()}), torch {torch.__version__}, Python "
             f"{platform.python_version()}; wall time {wall / 60:.1f} min. Each row is a fresh process; `this` is "
             f"this tree, `base` is `{args.base}` (before the streaming work), run side by side in this one run.", ""]
    lines += ["## End to end through `chips run`", "",
              "Generated pools of 16x16 PNG pairs (WebDataset shards of 10k, 5% bad rows), the demo-sized model "
              "(random weights), k = 256, K = 256, 2000 curvature pairs, budgets 0.1/0.3/0.5, shard size 4096, "
              "subsets table only (no manifests). Seconds per stage from the `runs` table; peak RSS of the `chips` "
              "process while the stage ran (each 0.2 s sample is the peak within its interval: VmHWM, reset after each read).", "",
              "| tree | images | pairs | stage | seconds | µs per pair | peak RSS MiB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in e2e_rows:
        im = r.get("images", "copy")
        if r["rc"] and not r["stages"]:
            lines.append(f"| {r['tree']} | {im} | {r['n']:,} | (failed or stopped: rc {r['rc']} after {r['seconds']:.0f} s) "
                         "| — | — | — |")
            continue
        for st in STAGES:
            s = r["stages"].get(st)
            if s:
                lines.append(f"| {r['tree']} | {im} | {r['n']:,} | {st} | {fmt(s['seconds'])} | "
                             f"{fmt(1e6 * s['seconds'] / r['n'])} | {fmt(s['peak_rss_mib'], 0)} |")
        total = sum(s["seconds"] for s in r["stages"].values())
        lines.append(f"| {r['tree']} | {im} | {r['n']:,} | **all four** ({'finished' if r['rc'] == 0 else 'stopped at ' + str(int(r['seconds'])) + ' s'}) "
                     f"| {fmt(total)} | {fmt(1e6 * total / r['n'])} | {fmt(r['peak_rss_mib'], 0)} |")
    lines.append("")
    this = sorted([r for r in e2e_rows if r["tree"] == "this" and r["rc"] == 0 and r.get("images", "copy") == "copy"],
                  key=lambda r: r["n"])
    if len(this) >= 2:
        a, b = this[0], this[-1]
        ta = sum(s["seconds"] for s in a["stages"].values()) / a["n"]
        tb = sum(s["seconds"] for s in b["stages"].values()) / b["n"]
        rss = b["peak_rss_mib"] / a["peak_rss_mib"]
        lines += [f"- peak RSS at {b['n']:,} / at {a['n']:,}: **{rss:.2f}** (goal ≤ 1.10: {'met' if rss <= 1.10 else 'not met'})"
                  + (f"; anonymous memory (sampled RssAnon) {b['peak_anon_mib']:,.0f} / {a['peak_anon_mib']:,.0f} MiB = "
                     f"{b['peak_anon_mib'] / a['peak_anon_mib']:.2f}" if a.get("peak_anon_mib") else ""),
                  f"- seconds per pair at {b['n']:,} / at {a['n']:,}: **{tb / ta:.2f}** (goal ≤ 1.20: "
                  f"{'met' if tb / ta <= 1.2 else 'not met'})",
                  f"- warehouse size at {b['n']:,} pairs (`images: copy`): {b['warehouse_bytes'] / 2**20:,.0f} MiB"]
        for r in this:  # the run's peak outside every stage's window (pre-flight checks, sub-flow set-up, summary)
            gaps = [g for g in r.get("between", []) if g.get("peak_rss_mib")]
            if gaps:
                g = max(gaps, key=lambda g: g["peak_rss_mib"])
                lines.append(f"- between stages at {r['n']:,}: at most {g['peak_rss_mib']:,.0f} MiB (after {g['after']}, "
                             f"before {g['before']}, {g['peak_at_s']:.0f} s into the run)")
    for r in sorted((r for r in e2e_rows if r["tree"] == "this" and r["rc"] == 0 and r.get("images") == "reference"),
                    key=lambda r: r["n"]):
        c = next((x for x in this if x["n"] == r["n"]), None)
        mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        lines.append(f"- warehouse size at {r['n']:,} pairs: `copy` {mib(c['warehouse_bytes']) if c else '—'} "
                     f"(`pairs` {mib(c['pairs_bytes']) if c and c.get('pairs_bytes') else '—'}), `reference` "
                     f"{mib(r['warehouse_bytes'])} (`pairs` {mib(r['pairs_bytes'])}); the source tars "
                     f"{mib(r['source_bytes'])}. With `reference` the stages read every image from its tar, hash-checked "
                     f"(seconds per pair vs `copy`: {sum(s['seconds'] for s in r['stages'].values()) / sum(s['seconds'] for s in c['stages'].values()):.2f}x)."
                     if c else "")
    lines.append("")
    if results.get("reingest"):
        lines += ["### Re-ingesting an unchanged pool", "",
                  "`ingest_stage` over the same sources again, into the warehouse the run above left (a fresh process; "
                  "every row is `unchanged`, nothing is written but the run's row and empty parts).", "",
                  "| tree | pairs | read | unchanged | seconds | peak RSS MiB |", "| --- | --- | --- | --- | --- | --- |"]
        for r in results["reingest"]:
            lines.append(f"| {r['tree']} | {r['n']:,} | {r.get('read', '—')} | {r.get('unchanged', '—')} | "
                         f"{fmt(r.get('seconds'))} | {fmt(r.get('peak_rss_mib'), 0)} |")
        ok = [r for r in results["reingest"] if r.get("peak_rss_mib")]
        if len(ok) >= 2:
            lo, hi = min(ok, key=lambda r: r["n"]), max(ok, key=lambda r: r["n"])
            lines += ["", f"- re-ingest peak RSS at {hi['n']:,} / at {lo['n']:,}: **{hi['peak_rss_mib'] / lo['peak_rss_mib']:.2f}**", ""]
    lines += ["## Rescore over stored features (ViT-B-32 dimensions: k = 512, d = 512)", "",
              "`score_stage` over generated feature rows carrying the identity of a real ViT-B-32 featurize run (its "
              "bank, curvature and 256-pair eval set are real; random weights). `stage` is the whole stage: the model "
              "over the eval set (`target`, a fixed cost), scoring every part, and ranking; `stream` is the stage with "
              "the eval set's statistics computed before the clock starts (the part that grows with the pool), its "
              "peak RSS measured from there (VmHWM reset); `read` opens every part (memory-mapped: the float16 "
              "vectors are first touched by the arithmetic, so this is Parquet metadata and ids, not the bytes); "
              "`arith` scores 8 parts already open, 3 times, on one thread.", "",
              "| tree | rows | mode | seconds | pairs/s | peak RSS MiB | note |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rs:
        pps = r["n"] / r["seconds"] if r.get("seconds") and r["n"] else None
        note = "" if r["rc"] == 0 else f"rc {r['rc']}: " + (r.get("tail", "").strip().splitlines() or [""])[-1][:80]
        if r.get("rss_before_mib"):
            note = f"RSS {r['rss_before_mib']:,.0f} MiB before streaming (model, eval statistics)" + (f"; {note}" if note else "")
        if r.get("peak_anon_mib"):
            note = f"anonymous {r['peak_anon_mib']:,.0f} MiB (sampled)" + (f"; {note}" if note else "")
        lines.append(f"| {r['tree']} | {r['n']:,} | {r['mode']} | {fmt(r.get('seconds'))} | {fmt(pps, 0)} | "
                     f"{fmt(r['peak_rss_mib'], 0)} | {note} |")
    pick = lambda mode: next((r for r in rs if r["tree"] == "this" and r["mode"] == mode and r["rc"] == 0  # noqa: E731
                              and r["n"] == args.rescore), None)
    st, sm, rd, ar = pick("stage"), pick("stream"), pick("read"), pick("arith")
    tg = next((r for r in rs if r["tree"] == "this" and r["mode"] == "target" and r["rc"] == 0), None)
    if st and sm:
        pps = sm["n"] / sm["seconds"]
        lines += ["", f"- whole stage: {st['n'] / st['seconds']:,.0f} pairs/s, of which the model over the eval set "
                  f"takes {fmt(tg['seconds'] if tg else None)} s whatever the pool size; the streaming part (`stream`): "
                  f"**{pps:,.0f} pairs/s** (goal ≥ 300,000: {'met' if pps >= 3e5 else 'not met'})",
                  f"- peak RSS: whole stage **{st['peak_rss_mib']:,.0f} MiB**, streaming part {sm['peak_rss_mib']:,.0f} MiB "
                  f"from {sm.get('rss_before_mib', 0):,.0f} MiB before it (goal < 2048: "
                  f"{'met' if st['peak_rss_mib'] < 2048 else 'not met'})"]
        if rd and ar:
            r_pps, a_pps = rd["n"] / rd["seconds"], ar["n"] / ar["seconds"]
            lines.append(f"- one thread: reading alone {r_pps:,.0f} pairs/s, arithmetic alone {a_pps:,.0f} pairs/s: "
                         f"**{'reading' if r_pps < a_pps else 'arithmetic'}** is the larger cost")
        base = sorted((r for r in rs if r["tree"] == "base" and r["rc"] == 0 and r.get("rss_before_mib")),
                      key=lambda r: r["n"])
        if len(base) >= 2:
            slope = (base[-1]["peak_rss_mib"] - base[0]["peak_rss_mib"]) / (base[-1]["n"] - base[0]["n"])
            oom = base[-1]["n"] + (24 * 1024 - base[-1]["peak_rss_mib"]) / slope
            lines.append(f"- base holds every feature row in memory: its peak grows {slope * 2**20 / 1e3:,.1f} KB per "
                         f"pair ({base[0]['n']:,} → {base[-1]['n']:,}); at that rate it passes this machine's 24 GiB "
                         f"near **{oom / 1e6:.1f}M pairs** (extrapolated, not run), so 2M was not run on base")
        for big in (24e6, 128e6):
            lines.append(f"- extrapolated (linear) rescore of {big / 1e6:.0f}M pairs: {big / pps / 60:,.1f} min")
    lines.append("")
    lines += select_section(results)
    return "\n".join(lines)


def select_section(results: dict) -> list[str]:
    """The set-aware selectors (issue 27) against today's ranking of the same pool, side by side in one run."""
    rows = [r for r in results.get("select", []) if r.get("rc") == 0]
    if not rows:
        return []
    sizes = sorted({r["n"] for r in rows})
    modes = [m for m in dict.fromkeys(r["mode"] for r in rows)]
    at = {(r["n"], r["mode"]): r for r in rows}
    L = ["## Set-aware selection at scale (issue 27)", "",
         f"Generated by `python benchmarks/scale.py {results.get('select_argv', '')}`. Each cell is a fresh process: "
         "`rank` is today's ranking of an n-pair score run (the score stage's DuckDB sort into its scores part); each "
         "set-aware method selects 10% of the n pairs among a 45% eligible tier (`sheets`' share) of random "
         "k = 512 gradients, spooled to one file per 16,384-pair partition before the clock starts (the pass over the "
         "feature parts that writes them is the score stage's read again: ~3 s per million pairs). Seconds, then "
         "peak RSS (VmHWM of the process), then the ratio to `rank` at the same n.", "",
         "| method | " + " | ".join(f"{n:,} pairs" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for m in modes:
        cells = []
        for n in sizes:
            r, rk = at.get((n, m)), at.get((n, "rank"))
            cells.append("—" if r is None else f"{r['seconds']:.1f} s, {r['peak_rss_mib']:,.0f} MiB"
                         + ("" if m == "rank" or not rk else f", {r['seconds'] / rk['seconds']:,.0f}×"))
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    big = sizes[-1]
    L += ["", f"Extrapolated from {big:,} pairs (not run). A set-aware method's work is per partition (each has a "
          "fixed size and a quota in proportion to it), so it grows linearly in the pool; the ranking is an n log n "
          "sort, near linear here:", "",
          "| method | 2M | 24M | 128M |", "|---|---:|---:|---:|"]
    for m in modes:
        r = at.get((big, m))
        if r:
            L.append(f"| {m} | " + " | ".join(f"{r['seconds'] * t / big / 60:,.1f} min" for t in (2e6, 24e6, 128e6)) + " |")
    return L + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/chips-scale")
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--rescore", type=int, default=2_000_000)
    ap.add_argument("--base", default="f6d642b")
    ap.add_argument("--base-sizes", default="100000")
    ap.add_argument("--reference-sizes", default="100000", help="also run end to end with images: reference")
    ap.add_argument("--base-rescore", default="250000,500000")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--base-timeout", type=float, default=1200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--run-args", default=None, help="with --reingest-only: the arguments of the run that made --json")
    ap.add_argument("--report-only", action="store_true", help="rewrite --out from --json's results")
    ap.add_argument("--select", default="", help="pool sizes at which to time the set-aware selectors against the "
                                                  "ranking (e.g. 100000,400000); with --select-only, added to --json")
    ap.add_argument("--select-only", action="store_true",
                    help="run only --select, add its rows to --json's results, rewrite --json/--out")
    ap.add_argument("--reingest-only", action="store_true",
                    help="read --json's results, re-ingest into the end-to-end warehouses it left, rewrite --json/--out")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = base_tree(workdir, args.base) if args.base else None
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if args.report_only:
        results = json.loads(Path(args.json).read_text())
        text = report(args, results, results.get("wall_s", 0.0))
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return
    if args.select_only:
        from chips_core.scoring.select import SET_METHODS
        results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {"e2e": [], "rescore": []}
        results["select"] = [select_bench(workdir, n, mode, args.timeout) for n in ints(args.select)
                             for mode in ("rank", *SET_METHODS)]
        results["select_argv"] = " ".join(sys.argv[1:])
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        text = report(args, results, results.get("wall_s", 0.0))
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return
    if args.reingest_only:
        results = json.loads(Path(args.json).read_text())
        results["argv"] = args.run_args or results.get("argv")
        results["reingest"] = [reingest(workdir, ROOT, "this", r["n"], args.timeout)
                               for r in results["e2e"] if r["tree"] == "this" and r["rc"] == 0]
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        text = report(args, results, results.get("wall_s", time.time() - t0))
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return
    results = {"e2e": [], "rescore": []}
    for n in ints(args.sizes):
        results["e2e"].append(e2e(workdir, ROOT, "this", n, args.timeout))
    for n in ints(args.reference_sizes):
        results["e2e"].append(e2e(workdir, ROOT, "this", n, args.timeout, images="reference"))
    if base:
        for n in ints(args.base_sizes):
            results["e2e"].append(e2e(workdir, base, "base", n, args.base_timeout))
    if args.rescore:
        for mode in ("stage", "stream", "target", "read", "arith"):
            results["rescore"].append(rescore(workdir, ROOT, "this", args.rescore, mode, args.timeout))
    if base:
        for n in ints(args.base_rescore):
            results["rescore"].append(rescore(workdir, ROOT, "this", n, "stream", args.timeout))
            results["rescore"].append(rescore(workdir, base, "base", n, "stream", args.base_timeout, lists=True))
    results["wall_s"] = time.time() - t0
    results["argv"] = None
    text = report(args, results, time.time() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
