"""How `chips_plus`'s defaults were chosen: variants scored, trained and judged on the target *eval set* only.

    .venv/bin/python benchmarks/selection/run.py --v2 --quick --workdir W      # first: the v2 benchmark
    .venv/bin/python benchmarks/selection/choose_plus.py --workdir W           # then: this (~3 min on 2 CPUs)

It reuses the v2 run's warehouse, featurize runs, general model and CPT settings. For each variant it
scores the pool through the product (``score_stage`` with that ``ScoreConfig``), selects at the v2
budgets, trains with the benchmark's CPT (the same replay and steps) and evaluates. The report
(``docs/benchmarks/chips_plus_defaults.md``) shows **only the eval-set metric** (the 300 target pairs
the selection itself uses); the held-out test is evaluated, as every CPT is, but not read here. The
variants:

- the agreement gate ``plus_match_quantile`` ∈ {0, 0.25, 0.5, 0.75} (0 admits what the relevance gate does);
- the order inside the eligible tier: the seeded random key (the default) or the paper's CHIPS utility.

Rows go to ``<workdir>/<mode>/choose_plus.jsonl``, so the v2 report is not touched; a rerun resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import report as rep  # noqa: E402
import run as bench_run  # noqa: E402

from chips_core.platform.warehouse import Warehouse  # noqa: E402
from chips_core.scoring.endpoint import load_model  # noqa: E402
from chips_core.scoring.score import ScoreConfig, select_top  # noqa: E402
from chips_core.stages import score_stage  # noqa: E402

MATCH_QUANTILES = (0.0, 0.25, 0.5, 0.75)
DEFAULT = ScoreConfig()


def eval_metric(row: dict) -> float:
    return rep.headline(row["metrics"][f"{row['target']}_evalset"])


def variants() -> list[tuple[str, float, str]]:
    """``(method name, plus_match_quantile, order inside the eligible tier)``."""
    out = [(f"chips_plus[match={q:g}]", q, "random") for q in MATCH_QUANTILES]
    return out + [(f"chips_plus[match={DEFAULT.plus_match_quantile:g},order=chips]", DEFAULT.plus_match_quantile,
                   "chips")]


def pick(scores, ids, budget: float, order: str) -> np.ndarray:
    key = scores["chips_plus"]
    if order == "chips":  # the same tiers, the paper's utility inside each (its rank scaled into [0, 1))
        rank = np.empty(len(ids))
        rank[np.argsort(scores["chips"], kind="stable")] = np.arange(len(ids)) / len(ids)
        key = np.floor(key) + rank
    return select_top(key, ids, budget)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="the workdir of a finished `run.py --v2` run")
    ap.add_argument("--mode", default="v2-quick", choices=sorted(bench_run.V2_MODES))
    ap.add_argument("--out", type=Path, default=bench_run.ROOT / "docs/benchmarks/chips_plus_defaults.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    bench = bench_run.Bench(args.mode, args.workdir)
    state = json.loads(bench.state_path.read_text()) if bench.state_path.exists() else {}
    if "--warm-size" in state.get("command", "") or "--warm-captions" in state.get("command", ""):
        raise SystemExit(f"{args.workdir} was run with non-default options ({state['command']}); use a default run")
    bench.results_path = bench.work / "choose_plus.jsonl"  # keep the v2 report's results untouched
    if bench.results_path.exists():  # resume: what an earlier invocation of this script trained
        for row in map(json.loads, bench.results_path.read_text().splitlines()):
            bench.rows.append(row)
            bench.done.add(row["key"])
            bench.trained[row["train_key"]] = row
    bench.load_data()
    name = "sheets"
    bench.set_target_suites(name)
    bench.ingest(name)
    loaded = load_model(bench.run_config(name, 0).model)
    for seed in bench.p["seeds"]:
        feat = bench.featurize(name, loaded, seed, bench_run.DEFAULT_K)
        for q in sorted({q for _, q, _ in variants()}):
            cfg = bench.run_config(name, seed)
            cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, plus_match_quantile=q))
            wh = Warehouse(cfg.warehouse)
            st = wh.read("scores", filter=pc.field("run_id") == score_stage(cfg, wh, loaded, feat)["run_id"])
            ids = st.column("pair_id").to_pylist()
            scores = {m: st.column(m).to_numpy() for m in ("chips", "chips_plus")}
            for method, vq, order in variants():
                if vq != q:
                    continue
                for b in bench.p["budgets"]:
                    idx = sorted(bench.index[name][ids[i]] for i in pick(scores, ids, b, order))
                    meta = {"target": name, "variant": "main", "method": method, "budget": b, "seed": seed}
                    bench.train_and_eval(name, f"{name}:choose:{method}:{b}:{seed}", meta, idx, None, seed)
    write(bench.rows, bench, args.out, time.perf_counter() - t0, " ".join(sys.argv[1:]))


def write(rows, bench, out: Path, wall: float, argv: str) -> None:
    budgets = bench.p["budgets"]
    agg = {**rep.aggregate(rows, eval_metric), **rep.aggregate(rows, eval_metric, variant="diagnostic")}
    L = ["# How chips_plus's defaults were chosen (target eval set only)", "",
         f"Generated by `python benchmarks/selection/choose_plus.py {argv}` ({rep.fmt_seconds(wall)}) on the "
         f"`{bench.mode}` benchmark's pool, general model and CPT settings; {len(bench.p['seeds'])} seeds. Metric: "
         "retrieval R@5 (%) on the **target eval set** — the pairs the selection itself uses. The held-out test "
         "is not read here; the v2 report gives it for the chosen default only.", "",
         f"Default: `plus_relevance_quantile = {DEFAULT.plus_relevance_quantile}`, `plus_match_quantile = "
         f"{DEFAULT.plus_match_quantile}`, seeded random order inside the eligible tier.", "",
         "| variant | " + " | ".join(f"{b:.0%} eval R@5 | {b:.0%} vs random_in_domain" for b in budgets) + " |",
         "|---|" + "---:|---:|" * len(budgets)]
    names = ["random", "random_in_domain", "chips", *[m for m, _, _ in variants()]]
    for m in names:
        cells = []
        for b in budgets:
            cells += [rep._fmt(agg.get(("sheets", m, b))),
                      rep.fmt_paired(rep.paired(rows, "sheets", m, "random_in_domain", b, eval_metric))]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += ["", "Paired differences are per seed (same featurize run, same CPT seed), mean [95% t-interval], points.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    bench_run.log(f"report: {out}")


if __name__ == "__main__":
    main()
