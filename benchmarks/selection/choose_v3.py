"""How the set-aware selectors' defaults were chosen: variants materialized, trained and judged on the target
*eval set* only (as choose_plus.py chose chips_plus's).

    .venv/bin/python benchmarks/selection/run.py --v3 --quick --workdir W      # first: the v3-quick benchmark
    .venv/bin/python benchmarks/selection/choose_v3.py --workdir W             # then: this

It reuses the v3-quick run's warehouse, score runs (one per seed), general model and CPT settings. Each variant
changes one parameter of one selector (``SelectConfig``); the product materializes its subsets from the same score
run (``materialize_stage``), and every subset is trained with the benchmark's CPT and evaluated. The report
(``docs/benchmarks/select_defaults.md``) shows **only the eval-set metric**; the held-out test is evaluated, as
every CPT is, but not read here. The chosen value per selector is the one with the best mean eval metric over
budgets and seeds; it becomes the ``SelectConfig`` default, the same for every target.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import report as rep  # noqa: E402
import run as bench_run  # noqa: E402

from chips_core.scoring.endpoint import load_model  # noqa: E402
from chips_core.scoring.select import SelectConfig  # noqa: E402

DEFAULT = SelectConfig()
GRID = {  # selector: (parameter, values); the default is one of them
    "chips_pursuit": ("pursuit_round", (16, 64, 256)),
    "chips_infomax": ("redundancy", (0.25, 1.0, 4.0)),
    "chips_cluster": ("explore", (0.25, 1.0, 4.0)),
}


def eval_metric(row: dict) -> float:
    return rep.headline(row["metrics"][f"{row['target']}_evalset"])


def variants():
    """``(label, selector, SelectConfig)``; the label names the parameter and value."""
    for method, (param, values) in GRID.items():
        for v in values:
            yield f"{method}[{param}={v:g}]", method, dataclasses.replace(DEFAULT, **{param: v})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="the workdir of a finished `run.py --v3 --quick` run")
    ap.add_argument("--mode", default="v3-quick", choices=sorted(bench_run.V3_MODES))
    ap.add_argument("--target", default="sheets")
    ap.add_argument("--out", type=Path, default=bench_run.ROOT / "docs/benchmarks/select_defaults.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    bench = bench_run.Bench(args.mode, args.workdir)
    bench.results_path = bench.work / "choose_v3.jsonl"  # keep the v3 report's results untouched
    bench.rows, bench.done = [], set()
    if bench.results_path.exists():
        for row in map(json.loads, bench.results_path.read_text().splitlines()):
            bench.rows.append(row)
            bench.done.add(row["key"])
            bench.trained[row["train_key"]] = row
    bench.load_data()
    name = args.target
    bench.set_target_suites(name)
    bench.ingest(name)
    loaded = load_model(bench.run_config(name, 0).model)
    for seed in bench.p["seeds"]:
        score_run = bench.state.get(f"score_run:{name}:{seed}")
        if score_run is None:
            raise SystemExit(f"{args.workdir}: no v3 score run for {name} seed {seed}; run the v3-quick benchmark first")
        for label, method, cfg in variants():
            keys = [f"{name}:choose:{label}:{b}:{seed}" for b in bench.p["budgets"]]
            if all(k in bench.done for k in keys):
                continue
            picks = bench.select(name, loaded, seed, methods=[method], select=cfg, score_run_id=score_run)
            for b, key in zip(bench.p["budgets"], keys):
                sid, idx = picks[(method, b)]
                meta = {"target": name, "variant": "main", "method": label, "budget": b, "seed": seed}
                bench.train_and_eval(name, key, meta, idx, sid, seed)
    write(bench, name, args.out, time.perf_counter() - t0, " ".join(sys.argv[1:]))


def chosen(rows, name: str) -> dict[str, tuple[str, float]]:
    """Per selector, the parameter value with the best mean eval metric over budgets and seeds."""
    out = {}
    for method, (param, values) in GRID.items():
        means = {v: np.mean([eval_metric(r) for r in rows if r["method"] == f"{method}[{param}={v:g}]"
                             and r["target"] == name] or [np.nan]) for v in values}
        out[method] = (param, max(values, key=lambda v: (np.nan_to_num(means[v], nan=-1.0), -values.index(v))))
    return out


def write(bench, name: str, out: Path, wall: float, argv: str) -> None:
    rows, budgets = bench.rows, bench.p["budgets"]
    main_rows = [json.loads(line) for line in (bench.work / "results.jsonl").read_text().splitlines()]
    agg = {**rep.aggregate(rows, eval_metric), **rep.aggregate(main_rows, eval_metric),
           **rep.aggregate(main_rows, eval_metric, variant="diagnostic")}
    both = rows + main_rows
    L = ["# How the set-aware selectors' defaults were chosen (target eval set only)", "",
         f"Generated by `python benchmarks/selection/choose_v3.py {argv}` ({rep.fmt_seconds(wall)}) on the "
         f"`{bench.mode}` benchmark's pool ({name}), general model, score runs and CPT settings; "
         f"{len(bench.p['seeds'])} seeds. Metric: retrieval R@5 (%) on the **target eval set** — the pairs the "
         "selection itself uses. The held-out test is not read here.", "",
         "| variant | " + " | ".join(f"{b:.0%} eval R@5 | {b:.0%} vs chips_plus" for b in budgets) + " |",
         "|---|" + "---:|---:|" * len(budgets)]
    for m in ["random", "random_in_domain", "chips", "chips_plus", *[lab for lab, _, _ in variants()]]:
        cells = []
        for b in budgets:
            cells += [rep._fmt(agg.get((name, m, b))), rep.fmt_paired(rep.paired(both, name, m, "chips_plus", b, eval_metric))]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    pick = chosen(rows, name)
    L += ["", "Paired differences are per seed (same score run, same CPT seed), mean [95% t-interval], points.", "",
          "Chosen (best mean eval metric over budgets and seeds), now the `SelectConfig` defaults: "
          + "; ".join(f"`{m}`: `{p} = {v:g}`" for m, (p, v) in pick.items()) + ".", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    bench_run.log(f"report: {out}; chosen: {pick}")


if __name__ == "__main__":
    main()
