"""Ingest + validate throughput and memory, and DuckDB selection over a 10M-row scores table.

* ingest: N generated pairs (16x16 PNGs, short captions, 5% bad rows of several kinds) in
  WebDataset shards of 10k, through readers, GX row rules, quarantine and the Parquet warehouse;
  pairs/s, and peak RSS of a fresh process at 10k vs 100k pairs (must stay flat);
* SQL: a generated ``scores`` table of 10M rows (and the matching ``pairs`` rows, 8 sources) in the
  warehouse; DuckDB top-n selection at a 10% budget and the per-source selection mart, time and
  peak RSS of a fresh process.

Run: .venv/bin/python benchmarks/platform_throughput.py [--quick] [--out docs/benchmarks/platform.md]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_shards(folder: Path, n: int, per_shard: int = 10_000, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + per_shard, n)):
                arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
                img, cap = buf.getvalue(), f"pair {i}: a {['red', 'green', 'blue'][i % 3]} thing".encode()
                bad = rng.random()
                if bad < 0.02:
                    img = img[: len(img) // 2]  # truncated image
                elif bad < 0.04:
                    cap = b"   "
                elif bad < 0.05:
                    cap = b"\xff\xfe not utf-8"
                for name, data in ((f"{i:09d}.png", img), (f"{i:09d}.txt", cap)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def child_ingest(n: int) -> None:
    from chips_core.platform.readers import SourceSpec
    from chips_core.platform.warehouse import Warehouse
    from chips_core.stages import ingest_stage

    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), n)
        wh = Warehouse(str(Path(tmp) / "wh"))
        t0 = time.perf_counter()
        out = ingest_stage([SourceSpec("gen", "webdataset", tuple(shards))], wh)
        dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, **{k: out[k] for k in ("read", "kept", "quarantined")}, "seconds": dt,
                      "pairs_s": n / dt, "peak_rss_mib": rss}))


def child_sql(n: int) -> None:
    import pyarrow as pa

    from chips_core.platform.query import connect, query
    from chips_core.platform.warehouse import SCHEMAS, Warehouse

    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(str(Path(tmp) / "wh"))
        rng = np.random.default_rng(0)
        chunk = 1_000_000
        t0 = time.perf_counter()
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            ids = pa.array([f"p{i:09d}" for i in range(s, s + m)])
            cols = {name: rng.normal(size=m) for name in SCHEMAS["scores"].names if name not in ("pair_id", "run_id", "rank")}
            wh.write("scores", pa.table({"pair_id": ids, "run_id": pa.array(["score-1"] * m), **cols,
                                         "rank": np.zeros(m, dtype=np.int64)}), {"run": "score-1"}, f"part-{s // chunk:03d}")
            wh.write("pairs", pa.table({"pair_id": ids, "source": pa.array([f"src{i % 8}" for i in range(s, s + m)]),
                                        **{c: pa.nulls(m, SCHEMAS["pairs"].field(c).type) for c in SCHEMAS["pairs"].names
                                           if c not in ("pair_id", "source")}}), {"run": "ingest-1"}, f"part-{s // chunk:03d}")
        t_gen = time.perf_counter() - t0
        con = connect(wh)
        budget = 0.10
        t0 = time.perf_counter()
        top = query(con, "select pair_id, utility from stg_scores where run_id = $r order by utility desc, pair_id "
                         "limit $k", {"r": "score-1", "k": int(np.ceil(budget * n))})
        t_top = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_source = query(con, """
            with ranked as (
                select pair_id, row_number() over (order by utility desc, pair_id) as r from stg_scores where run_id = $r)
            select p.source, count(*) as n_scored, count(*) filter (where ranked.r <= $k) as n_selected
            from ranked join stg_pairs as p using (pair_id) group by p.source order by p.source""",
                           {"r": "score-1", "k": int(np.ceil(budget * n))})
        t_src = time.perf_counter() - t0
        assert top.num_rows == int(np.ceil(budget * n)) and sum(per_source.column("n_selected").to_pylist()) == top.num_rows
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": n, "generate_s": t_gen, "top_n_s": t_top, "per_source_s": t_src, "peak_rss_mib": rss}))


def run_child(kind: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, f"--child-{kind}", str(n)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--child-ingest", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-sql", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_ingest:
        return child_ingest(a.child_ingest)
    if a.child_sql:
        return child_sql(a.child_sql)
    t0 = time.perf_counter()
    ingest_ns, sql_n = ((2_000, 20_000), 1_000_000) if a.quick else ((10_000, 100_000), 10_000_000)
    ingest = [run_child("ingest", n) for n in ingest_ns]
    for r in ingest:
        print(json.dumps(r), flush=True)
    sql = run_child("sql", sql_n)
    print(json.dumps(sql), flush=True)
    lines = ["# Platform throughput: ingest + validate, and SQL selection", "",
             f"Generated by `python benchmarks/platform_throughput.py {' '.join(sys.argv[1:])}` on "
             f"{os.cpu_count()} CPUs; wall time {time.perf_counter() - t0:.0f} s. Each row is a fresh process.", "",
             "Ingest: generated 16x16 PNG pairs in WebDataset shards of 10k (5% bad rows: truncated images, "
             "blank or non-UTF-8 captions), readers + GX row rules (two passes) + batch rules + Parquet warehouse.", "",
             "| pairs | kept | quarantined | seconds | pairs/s | peak RSS MiB |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['n']:,} | {r['kept']:,} | {r['quarantined']:,} | {r['seconds']:.1f} | {r['pairs_s']:.0f} | "
              f"{r['peak_rss_mib']:.0f} |" for r in ingest]
    lines += ["", f"SQL: DuckDB over a generated `scores` table of {sql['rows']:,} rows (and as many `pairs` rows, 8 "
              "sources) in the Parquet warehouse, through the `stg_*` views of `sql/`.", "",
              "| query | seconds |", "| --- | --- |",
              f"| top 10% by utility (`order by utility desc, pair_id limit k`) | {sql['top_n_s']:.2f} |",
              f"| selected vs scored per source at 10% (window + join) | {sql['per_source_s']:.2f} |",
              f"| (generating and writing the tables) | {sql['generate_s']:.1f} |", "",
              f"Peak RSS of the SQL process: {sql['peak_rss_mib']:.0f} MiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
