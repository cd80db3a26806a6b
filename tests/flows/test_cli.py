"""The `chips` CLI: one-line errors, pre-flight checks, --debug, tables (the demo end to end is tests/test_newcomer.py;
`chips server` is tests/flows/test_server.py)."""
import pytest
from typer.testing import CliRunner

from flows.cli import app


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


def _cfg(tmp_path, name, pool, target=None, warehouse=None):
    import yaml

    path = tmp_path / f"{name}.yaml"
    target = target or [{"name": "tgt", "kind": "csv", "paths": [str(tmp_path / "good.csv")]}]
    path.write_text(yaml.safe_dump({"warehouse": str(warehouse or tmp_path / "wh"), "pool": pool,
                                    "target": target, "model": {"name": "RN50"}}))
    return path


def test_preflight_errors_are_one_line_before_any_model_or_flow(tmp_path):
    """Each mistake is found before a model loads or a flow starts (these run without a Prefect API), in one
    line naming the source, path, warehouse or id; the warehouse is created only after the sources pass."""
    from chips_core.platform.provenance import recorded_run
    from chips_core.platform.warehouse import Warehouse

    from ..platform.test_ingest import png

    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(1))
    (tmp_path / "nocap.csv").write_text("filepath,caption\nimgs/a.png,a cat\n")
    (tmp_path / "good.csv").write_text("filepath,title\nimgs/a.png,a cat\n")
    cases = {
        "missing": ([{"name": "web", "kind": "csv", "paths": [str(tmp_path / "nope.csv")]}],
                    f"pool source 'web' (csv) paths[0]='{tmp_path / 'nope.csv'}': no such file or folder"),
        "nocap": ([{"name": "web", "kind": "csv", "paths": [str(tmp_path / "nocap.csv")]}],
                  "column 'title' not found"),
        "empty": ([{"name": "web", "kind": "folder", "paths": [str(tmp_path / "empty")]}],
                  "is an empty folder (no image with a caption file)"),
        "notfolder": ([{"name": "web", "kind": "folder", "paths": [str(tmp_path / "good.csv")]}], "is not a folder"),
    }
    for name, (pool, expected) in cases.items():
        res = runner.invoke(app, ["run", str(_cfg(tmp_path, name, pool))])
        assert res.exit_code == 1 and res.output.startswith("chips: error: ") and expected in res.output, (name, res.output)
        assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "wh").exists()  # nothing created by a run that did not pass its pre-flight

    good = [{"name": "web", "kind": "csv", "paths": [str(tmp_path / "good.csv")]}]
    # a warehouse folder that exists but cannot be written (root writes anywhere chmod allows: use /proc)
    res = runner.invoke(app, ["run", str(_cfg(tmp_path, "ro", good, warehouse="/proc/self"))])
    assert res.exit_code == 1 and res.output.startswith("chips: error: warehouse '/proc/self' is not writable: "), res.output

    cfg = _cfg(tmp_path, "good", good)
    with recorded_run(Warehouse(str(tmp_path / "wh")), "ingest", {}):
        pass
    res = runner.invoke(app, ["cpt", str(cfg), "--subset", "score-x:chips@0.25", "--out", str(tmp_path / "cpt")])
    assert res.exit_code == 1 and res.output.startswith("chips: error: subset 'score-x:chips@0.25' is not in "
                                                        f"warehouse '{tmp_path / 'wh'}' (known: []"), res.output
    res = runner.invoke(app, ["rescore", str(cfg), "--featurize-run", "featurize-x"])
    assert res.exit_code == 1 and "run 'featurize-x' is not in warehouse" in res.output, res.output
    ingest = Warehouse(str(tmp_path / "wh")).read("runs", columns=["run_id"]).column("run_id")[0].as_py()
    res = runner.invoke(app, ["rescore", str(cfg), "--featurize-run", ingest])
    assert res.exit_code == 1 and f"run '{ingest}' is a ingest run with status 'succeeded', not a succeeded " \
                                  "featurize run" in res.output, res.output
    res = runner.invoke(app, ["eval", str(cfg)])
    assert res.exit_code == 1 and "no eval_suites configured" in res.output
    # issue 28.6: a checkpoint that is not weights, and a suite image outside its roots, refused in the pre-flight
    import yaml

    (tmp_path / "notes.pt").write_text("not weights\n")
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "suite.csv").write_text(f"filepath,title\n{tmp_path / 'imgs' / 'a.png'},a cat\n")
    with_suite = tmp_path / "suite.yaml"
    with_suite.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "eval_suites": [
        {"name": "cats", "path": str(tmp_path / "suite" / "suite.csv")}]}))
    res = runner.invoke(app, ["eval", str(with_suite), "--checkpoint", str(tmp_path / "notes.pt")])
    assert res.exit_code == 1 and res.output.startswith(f"chips: error: --checkpoint '{tmp_path / 'notes.pt'}' does "
                                                        "not load as weights"), res.output
    assert len(res.output.strip().splitlines()) == 1
    torch_save = __import__("torch").save
    torch_save({"w": __import__("torch").zeros(2)}, tmp_path / "weights.pt")
    res = runner.invoke(app, ["eval", str(with_suite), "--checkpoint", str(tmp_path / "weights.pt")])
    assert res.exit_code == 1 and res.output.startswith("chips: error: eval suite 'cats': image path ") \
        and "outside the allowed roots" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, ["report", "run-x", "-w", str(tmp_path / "wh"), "--out", "/proc/self/report"])
    assert res.exit_code == 1 and res.output.startswith("chips: error: no scoring run found for 'run-x'"), res.output


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_log_file(tmp_path, monkeypatch, capsys):
    import typer

    from flows import cli

    monkeypatch.setenv("CHIPS_LOG_DIR", str(tmp_path / "logs"))
    with pytest.raises(typer.Exit) as e:
        with cli._one_line_errors():
            raise RuntimeError("the disk ate the shard\nsecond line")
    assert e.value.exit_code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("chips: error: RuntimeError: the disk ate the shard (traceback in ") and \
        err.endswith("; --debug prints it)") and len(err.splitlines()) == 1
    log = next((tmp_path / "logs").glob("chips-error-*.log")).read_text()
    assert "Traceback (most recent call last)" in log and "second line" in log
    with pytest.raises(typer.Exit):
        with cli._one_line_errors():
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
    assert "the temporary Prefect API did not start within" in capsys.readouterr().err


def test_debug_prints_the_traceback_instead(tmp_path):
    """``--debug`` anywhere on the line: the error propagates with its traceback (a subprocess: ``main`` sets the
    process's SIGINT handler)."""
    import subprocess
    import sys

    args = [sys.executable, "-c", "from flows.cli import main; main()", "runs", "-w", str(tmp_path / "typo")]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120)
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and plain.stderr.strip().startswith("chips: error: not a chips warehouse")
    assert "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr and "WarehouseError" in debug.stderr


def test_found_cases_of_issue_28_are_one_line(tmp_path, monkeypatch):
    """Undecodable bytes in a query, INSTALL named as itself, a bad report id that creates no --out folder: one line,
    exit 1, no traceback and no empty log file."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from chips_core.platform.provenance import recorded_run
    from chips_core.platform.warehouse import Warehouse

    wh = Warehouse(str(tmp_path / "wh"))
    with recorded_run(wh, "ingest"):
        pass
    logs = tmp_path / "logs"
    env = {**os.environ, "CHIPS_LOG_DIR": str(logs)}
    exe = str(Path(sys.executable).with_name("chips"))
    cases = [([b"sql", b"-w", str(tmp_path / "wh").encode(), b"select '\xff'"], "the query is not valid UTF-8 text"),
             ([b"sql", b"-w", str(tmp_path / "wh").encode(), b"INSTALL httpfs"], "got ['INSTALL']"),
             ([b"report", b"nope", b"-w", str(tmp_path / "wh").encode(), b"--out", str(tmp_path / "rep").encode()],
              "no scoring run found for 'nope'")]
    for args, says in cases:
        p = subprocess.run([exe.encode(), *args], capture_output=True, env=env, timeout=120)
        err = p.stderr.decode("utf-8", "replace").strip()
        assert p.returncode == 1 and len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "rep").exists()
    assert not logs.exists() or all(f.stat().st_size for f in logs.iterdir())


def test_chips_ingest_takes_a_source_that_is_neither_pool_nor_target(tmp_path, prefect_api):
    """`chips ingest CONFIG --source NAME` ingests a `sources:` entry (here a replay stream) through the ingest flow,
    prints this run's counts per source and the warehouse's record, and names an unknown source in one line."""
    import yaml

    from chips_core.platform.query import connect, query
    from chips_core.platform.warehouse import Warehouse

    from ..platform.test_ingest import png

    runner = CliRunner()
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(i))
    (tmp_path / "good.csv").write_text("filepath,title\n" + "".join(f"imgs/{i}.png,pair {i}\n" for i in range(2)))
    (tmp_path / "replay.csv").write_text("filepath,title\n" + "".join(f"imgs/{i}.png,general {i}\n" for i in range(4))
                                         + "imgs/missing.png,lost\n")
    path = _cfg(tmp_path, "ingest", [{"name": "web", "kind": "csv", "paths": [str(tmp_path / "good.csv")]}])
    cfg = yaml.safe_load(path.read_text())
    cfg["sources"] = [{"name": "general", "kind": "csv", "paths": [str(tmp_path / "replay.csv")]}]
    path.write_text(yaml.safe_dump(cfg))

    res = runner.invoke(app, ["ingest", str(path), "--source", "general"])
    assert res.exit_code == 0, res.output
    assert "read 5, kept 4, quarantined 1, unchanged 0" in res.output
    assert ("general: this run read 5, quarantined 1; in the warehouse 1 of 5 rows quarantined (20%): "
            "read_error (missing_image_file) × 1") in res.output
    rows = query(connect(Warehouse(str(tmp_path / "wh"))), "select source, count(*) n from stg_pair_sources "
                                                          "group by source").to_pylist()
    assert rows == [{"source": "general", "n": 4}]  # only the named source
    again = runner.invoke(app, ["ingest", str(path), "--source", "general"])
    assert "general: this run read 5, quarantined 0, unchanged 5; in the warehouse 1 of 5 rows quarantined" in again.output

    res = runner.invoke(app, ["ingest", str(path), "--source", "nope"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "no source 'nope' in the config (its sources: web, tgt, general)" in res.output
