"""The `chips` CLI: the embedded demo end to end (a real Prefect run), sql, runs, and one-line errors."""
import pytest
from typer.testing import CliRunner

from flows.cli import app


@pytest.mark.slow
def test_chips_demo_then_sql_and_runs(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("CHIPS_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--pool-size", "150",
                              "--eval-size", "30", "--steps", "40"])
    assert res.exit_code == 0, res.output
    for text in ("ingest      read 183, kept 180, quarantined 3", "premise check", "Top pairs by CHIPS utility",
                 "chips@0.3=45",
                 "Share of 'scan' captions", "chips sql -w"):
        assert text in res.output
    assert "Calculating Metrics" not in res.output  # GX's own progress bars stay out of the demo's output
    wh = str(tmp_path / "demo" / "warehouse")
    res = runner.invoke(app, ["sql", "-w", wh, "select reason, count(*) n from stg_quarantine group by reason order by reason"])
    assert res.exit_code == 0 and "image_undecodable" in res.output and "caption_empty" in res.output
    res = runner.invoke(app, ["runs", "-w", wh, "--stage", "score"])
    assert res.exit_code == 0 and "succeeded" in res.output
    from chips_core.platform.query import connect, query
    from chips_core.platform.warehouse import Warehouse

    pipeline = query(connect(Warehouse(wh)), "select run_id from stg_runs where stage = 'pipeline'").to_pylist()[0]
    res = runner.invoke(app, ["report", pipeline["run_id"], "-w", wh, "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "report" / "index.html").read_text()
    for png in ("factors.png", "utility_vs_clipscore.png", "selection_by_source.png", "budget_curves.png"):
        assert f'src="{png}"' in page and (tmp_path / "report" / png).stat().st_size > 5000
    assert "scan-archive" in page or "web-photos" in page
    assert "Premise check" in page and "eval_matching" in page
    import yaml

    from flows.demo import prepare_demo

    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(prepare_demo(tmp_path / "demo", 150, 30, 40)))
    res = runner.invoke(app, ["check", str(cfg_path), "--no-ingest"])
    for name in ("eval_matching", "p_corr_over_chance", "mean_pairwise_cosine", "w_learn_spread"):
        assert name in res.output
    assert res.exit_code == (0 if "premise check passed" in res.output else 2), res.output
    res = runner.invoke(app, ["report", "no-such-run", "-w", wh])
    assert res.exit_code == 1 and "no scoring run found for 'no-such-run'" in res.output


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("warehouse: /tmp/x\npool: []\ntarget: []\nmodel: {name: RN50}\nsketch: {k: zero}\n")
    res = runner.invoke(app, ["run", str(bad)])
    assert res.exit_code == 1 and res.output.strip() == f"chips: error: {bad}: sketch.k='zero' must be int"
    res = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1 and "run config not found" in res.output
    ckpt = tmp_path / "bad2.yaml"
    ckpt.write_text(f"warehouse: {tmp_path / 'wh'}\npool: []\ntarget: []\n"
                    f"model: {{name: RN50, checkpoint: {tmp_path / 'nope.pt'}}}\n")
    res = runner.invoke(app, ["run", str(ckpt)])
    assert res.exit_code == 1 and "nope.pt" in res.output
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text("warehouse: /proc/chips-cannot-write-here/wh\npool: []\ntarget: []\nmodel: {name: RN50}\n")
    res = runner.invoke(app, ["run", str(unreachable)])
    assert res.exit_code == 1 and res.output.startswith("chips: error: cannot open warehouse '/proc/chips-cannot")
    assert len(res.output.strip().splitlines()) == 1
    for cmd in (["sql", "-w", str(tmp_path / "typo"), "select 1"], ["runs", "-w", str(tmp_path / "typo")],
                ["report", "run-x", "-w", str(tmp_path / "typo")]):  # a mistyped -w is refused, never created
        res = runner.invoke(app, cmd)
        assert res.exit_code == 1 and res.output.startswith(f"chips: error: not a chips warehouse: '{tmp_path / 'typo'}' "
                                                            "does not exist"), res.output
        assert not (tmp_path / "typo").exists()
    res = runner.invoke(app, ["runs", "-w", "/etc/passwd"])
    assert res.exit_code == 1 and res.output.strip() == ("chips: error: not a chips warehouse: '/etc/passwd' is not a "
                                                         "directory (a warehouse is made by `chips run` or `chips demo`)")
    from chips_core.platform.provenance import recorded_run
    from chips_core.platform.warehouse import Warehouse

    with recorded_run(Warehouse(str(tmp_path / "wh")), "ingest", {}):
        pass
    res = runner.invoke(app, ["sql", "-w", str(tmp_path / "wh"), "delete from stg_pairs"])
    assert res.exit_code == 1 and "only a single SELECT" in res.output
    res = runner.invoke(app, ["sql", "-w", str(tmp_path / "wh"), "select * from read_csv('/etc/passwd')"])
    assert res.exit_code == 1 and res.output.startswith("chips: error: PermissionException: ")
    assert len(res.output.strip().splitlines()) == 1


def test_tables_never_wrap_or_cut_ids(capsys):
    import pyarrow as pa

    from flows.cli import _print_table

    ids = [f"materialize-20261126T230411-{i:08x}:chips_plus@0.25" for i in range(3)]
    table = pa.table({"run_id": ids, **{f"column_{j}": [f"value-{j}-" + "x" * 40] * 3 for j in range(14)}})
    _print_table(table, 50)
    lines = capsys.readouterr().out.splitlines()
    for run_id in ids:
        assert any(run_id in line for line in lines), run_id
    assert all(any(f"column_{j}" in line for line in lines) for j in range(14))  # no column elided
