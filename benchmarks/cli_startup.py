"""What each `chips` command costs before it works: wall time of every command against the demo warehouse, with
a temporary Prefect API per command (the default) and with one kept by `chips server`; and `chips demo` cold
(no cached demo CLIP) vs cached. Writes docs/benchmarks/cli_startup.md.

    .venv/bin/python benchmarks/cli_startup.py [--repeats 3] [--out docs/benchmarks/cli_startup.md]

Run it alone on the machine: it measures wall time."""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHIPS = [sys.executable, "-c", "from flows.cli import main; main()"]


def timed(args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(CHIPS + args, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode not in (0, 2):  # check exits 2 when the premise fails: still a finished command
        raise RuntimeError(f"chips {' '.join(args)} failed ({res.returncode}): {res.stderr[-2000:]}")
    return wall, res.stdout


def stage_seconds(wh: str, stage: str) -> float:
    """How long the newest run of ``stage`` took by its own runs row (the work, without start-up)."""
    sys.path.insert(0, str(ROOT))
    from chips_core.platform.query import connect, query
    from chips_core.platform.warehouse import Warehouse

    row = query(connect(Warehouse(wh, create=False)), "select epoch(ended_at) - epoch(started_at) s from stg_runs "
                "where stage = $s order by started_at desc limit 1", {"s": stage}).to_pylist()
    return float(row[0]["s"]) if row else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/cli_startup.md")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="chips-startup-"))
    env = {**os.environ, "CHIPS_CACHE": str(scratch / "cache"), "PREFECT_HOME": str(scratch / "prefect")}
    env.pop("PREFECT_API_URL", None)
    demo_args = ["demo", "--pool-size", "600", "--eval-size", "100"]
    rows = []

    cold, _ = timed(demo_args + ["--workdir", str(scratch / "demo-cold")], env)
    cached, out = timed(demo_args + ["--workdir", str(scratch / "demo")], env)
    rows += [("chips demo, cold (trains the demo CLIP first)", cold, None),
             ("chips demo, cached demo CLIP", cached, None)]
    workdir = scratch / "demo"
    wh, cfg = str(workdir / "warehouse"), str(workdir / "demo.yaml")
    run_id = next(line.split()[2] for line in out.splitlines() if line.startswith("  chips report "))

    def measure(label, cmd, stage, e):
        walls = [timed(cmd, e)[0] for _ in range(args.repeats)]
        rows.append((label, statistics.median(walls), stage_seconds(wh, stage) if stage else None))

    reads = [("chips runs", ["runs", "-w", wh], None), ("chips sql", ["sql", "-w", wh, "select count(*) from stg_pairs"], None),
             ("chips report", ["report", run_id, "-w", wh, "--out", str(scratch / "report")], None)]
    flows = [("chips eval", ["eval", cfg], "eval"), ("chips check --no-ingest", ["check", cfg, "--no-ingest"], "check")]
    for label, cmd, stage in reads:
        measure(label, cmd, stage, env)
    for label, cmd, stage in flows:
        measure(f"{label} (temporary Prefect API)", cmd, stage, env)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    server = subprocess.Popen(CHIPS + ["server", "--port", str(port)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("chips server did not answer in 300 s")
        rows.append(("chips server (until its API answers; once a day)", time.perf_counter() - t0, None))
        warm = {**env, "PREFECT_API_URL": url}
        for label, cmd, stage in flows:
            measure(f"{label} (with `chips server`)", cmd, stage, warm)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
    shutil.rmtree(scratch, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = ["# What each `chips` command costs before it works", "",
             f"Generated by `.venv/bin/python benchmarks/cli_startup.py --repeats {args.repeats}` on {cpu}, "
             f"{os.cpu_count()} CPUs, Python {platform.python_version()}, alone on the machine. Wall time of the "
             f"whole command (median of {args.repeats} runs, except the demo and the server: one each), and the "
             "stage's own time from its `runs` row; the difference is start-up (imports, the Prefect API, the flow "
             "run's bookkeeping).", "",
             "| command | wall (s) | the stage itself (s) | start-up and overhead (s) |", "|---|---:|---:|---:|"]
    for label, wall, stage in rows:
        lines.append(f"| {label} | {wall:.1f} | {'' if stage is None else f'{stage:.1f}'} | "
                     f"{'' if stage is None else f'{wall - stage:.1f}'} |")
    lines += ["", "`sql`, `runs` and `report` never start Prefect. A flow command without `PREFECT_API_URL` starts a "
              "temporary API of its own; `chips server` keeps one for a working day (`export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api` in other shells)."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
