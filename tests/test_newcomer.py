"""A newcomer's path through the README: `chips demo`, then exactly the commands the demo prints (report, cpt on
a subset, the eval command cpt prints, eval of the model before CPT, the mart query), each run as printed — real
Prefect flows, a real open_clip model, DuckDB over the warehouse's Parquet."""
import shlex

import pytest
from typer.testing import CliRunner

from chips_core.platform.query import connect, query
from chips_core.platform.warehouse import Warehouse
from flows.cli import app

pytestmark = pytest.mark.slow


def _run(runner, line: str):
    args = shlex.split(line)
    assert args[0] == "chips", line
    res = runner.invoke(app, args[1:])
    assert res.exit_code == 0, (line, res.output)
    return res.output


def _commands(output: str, after: str) -> list[str]:
    lines = output.split(after, 1)[1].splitlines()
    return [ln.strip() for ln in lines if ln.strip().startswith("chips ")]


def test_demo_then_the_printed_commands_through_cpt_eval_and_the_mart(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("CHIPS_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    workdir = tmp_path / "demo"
    out = _run(runner, f"chips demo --workdir {workdir} --pool-size 150 --eval-size 30 --steps 40")
    for text in ("ingest      read 183, kept 180, quarantined 3", "web-photos: this run read 110, quarantined 3; in the warehouse 3 of 110 rows quarantined (3%): "
                 "caption_empty × 1",
                 "premise check", "Top pairs by CHIPS utility", "chips@0.3=45", "Share of 'scan' captions",
                 f"Its config: {workdir / 'demo.yaml'}"):
        assert text in out, text
    assert "Calculating Metrics" not in out  # GX's own progress bars stay out of the demo's output
    cpt, eval_base, sql, report = _commands(out, "Next steps")  # in the order that works
    assert cpt.startswith("chips cpt") and eval_base.startswith("chips eval") and sql.startswith("chips sql") \
        and report.startswith("chips report")

    cpt_out = _run(runner, cpt)
    (eval_cpt,) = _commands(cpt_out, "next:")
    _run(runner, eval_cpt)
    _run(runner, eval_base)
    mart = _run(runner, sql)
    assert "chips_plus" in mart and "none" in mart
    for metric in ("zero_shot_top1", "image_to_text_R@5", "text_to_image_R@5"):  # every metric, before and after
        assert mart.count(metric) >= 2, metric

    wh = Warehouse(str(workdir / "warehouse"))
    rows = query(connect(wh), "select method, budget, suite, value from mart_eval_by_selection "
                              "where metric = 'zero_shot_top1' order by budget").to_pylist()
    assert [(r["method"], r["budget"], r["suite"]) for r in rows] == [("none", 0.0, "scans"), ("chips_plus", 0.3, "scans")]
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    _run(runner, report)  # after cpt and eval: the report shows the evaluations beside the selection
    page = (workdir / "report" / "index.html").read_text()
    assert "Premise check" in page and "eval_matching" in page and ("scan-archive" in page or "web-photos" in page)
    for png in ("factors.png", "utility_vs_clipscore.png", "selection_by_source.png", "budget_curves.png",
                "source_share.png"):
        assert f'src="{png}"' in page and (workdir / "report" / png).stat().st_size > 5000
    assert page.count('<div class="thumb"><img src="thumbs/') == 16  # the top and bottom 8, as images
    assert "No model trained on this run's subsets has been evaluated yet" not in page
    evals = (workdir / "report" / "index.html").read_text().split("<h2>Evaluations</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<td>chips_plus</td><td>0.3</td>" in evals and "<td>none</td><td>0</td>" in evals

    # the same warehouse through the read commands, and the premise check from the demo's own config
    try_sql = _commands(out, "Try:")[0]  # the summary's query: the causes, in the summary's words
    res = runner.invoke(app, shlex.split(try_sql)[1:])
    assert res.exit_code == 0 and "image_undecodable" in res.output and "caption_empty" in res.output
    res = runner.invoke(app, ["runs", "-w", str(wh.url), "--stage", "score"])
    assert res.exit_code == 0 and "succeeded" in res.output
    res = runner.invoke(app, ["check", str(workdir / "demo.yaml"), "--no-ingest"])
    for name in ("eval_matching", "p_corr_over_chance", "mean_pairwise_cosine", "w_learn_spread"):
        assert name in res.output
    assert res.exit_code == (0 if "premise check passed" in res.output else 2), res.output
    res = runner.invoke(app, ["report", "no-such-run", "-w", str(wh.url)])
    assert res.exit_code == 1 and "no scoring run found for 'no-such-run'" in res.output
