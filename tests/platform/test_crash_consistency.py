"""A process killed with SIGKILL in the middle of a stage (issue 28): its run is accounted for (`running`, then
`abandoned` once its process is gone), and the subset parts it wrote are invisible to every reader until the next
materialize or `chips gc` removes them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from chips_core.platform.provenance import mark_abandoned, recorded_run, remove_unfinished
from chips_core.platform.query import connect, query, run_audits
from chips_core.platform.warehouse import SCHEMAS, Warehouse

CHILD = r"""
import sys, time
import pyarrow as pa
from chips_core.platform.provenance import recorded_run
from chips_core.platform.warehouse import SCHEMAS, Warehouse
wh = Warehouse(sys.argv[1])
with recorded_run(wh, "materialize", run_id="materialize-killed"):
    rows = [{"subset_id": "score-1:random@0.1", "run_id": "materialize-killed", "score_run_id": "score-1",
             "budget": 0.1, "method": "random", "pair_id": f"p{i}", "rank": i + 1} for i in range(3)]
    wh.write("subsets", pa.Table.from_pylist(rows, schema=SCHEMAS["subsets"]), {"run": "materialize-killed"}, "random")
    print("written", flush=True)
    time.sleep(600)
"""


def _good_run(wh):
    with recorded_run(wh, "materialize", run_id="materialize-good"):
        rows = [{"subset_id": "score-1:chips@0.1", "run_id": "materialize-good", "score_run_id": "score-1",
                 "budget": 0.1, "method": "chips", "pair_id": f"p{i}", "rank": i + 1} for i in range(2)]
        wh.write("subsets", pa.Table.from_pylist(rows, schema=SCHEMAS["subsets"]), {"run": "materialize-good"}, "chips")


def test_a_killed_materialize_is_accounted_for_and_invisible(tmp_path):
    wh = Warehouse(str(tmp_path / "wh"))
    _good_run(wh)
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "wh")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "written"
    con = connect(wh)
    assert query(con, "select status from stg_runs where run_id = 'materialize-killed'").column(0).to_pylist() \
        == ["running"]  # while it runs, it says so
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)

    con = connect(wh)
    assert query(con, "select distinct run_id from stg_subsets").column(0).to_pylist() == ["materialize-good"]
    audit = run_audits(con)["subsets_without_succeeded_run"]
    assert audit.column("run_id").to_pylist() == ["materialize-killed"]  # the leftover is reported, not hidden

    from chips_core.stages.preflight import PreflightError, require_subset
    with pytest.raises(PreflightError, match="did not succeed"):
        require_subset(wh, "score-1:random@0.1")
    require_subset(wh, "score-1:chips@0.1")

    assert mark_abandoned(wh) == ["materialize-killed"]
    status = query(connect(wh), "select status from stg_runs where run_id = 'materialize-killed'").column(0).to_pylist()
    assert len(status) == 1 and status[0].startswith("abandoned: process")
    assert mark_abandoned(wh) == []
    removed = remove_unfinished(wh)
    assert [r.rsplit("/", 1)[-1] for r in removed] == ["run=materialize-killed"]
    assert all(t.num_rows == 0 for t in run_audits(connect(wh)).values())
    assert query(connect(wh), "select count(*) from stg_subsets").column(0).to_pylist() == [2]


def test_a_live_running_row_is_left_alone_and_ctrl_c_is_named(tmp_path):
    wh = Warehouse(str(tmp_path / "wh"))
    with pytest.raises(KeyboardInterrupt):
        with recorded_run(wh, "featurize", run_id="featurize-int"):
            assert mark_abandoned(wh) == []  # this very process is alive: its running row stays
            raise KeyboardInterrupt
    status = query(connect(wh), "select status from stg_runs").column(0).to_pylist()
    assert status == ["failed: KeyboardInterrupt: interrupted (Ctrl-C)"]


def test_chips_gc_command(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    wh = Warehouse(str(tmp_path / "wh"))
    _good_run(wh)
    rows = [{"subset_id": "s:x@0.1", "run_id": "materialize-orphan", "score_run_id": "s", "budget": 0.1,
             "method": "x", "pair_id": "p0", "rank": 1}]
    wh.write("subsets", pa.Table.from_pylist(rows, schema=SCHEMAS["subsets"]), {"run": "materialize-orphan"}, "x")
    res = CliRunner().invoke(app, ["gc", "-w", str(tmp_path / "wh")])
    assert res.exit_code == 0 and res.output.strip() == "gc: 0 run(s) marked abandoned, 1 unfinished part folder(s) removed"
    assert not wh.fs.exists(wh.path("subsets", "run=materialize-orphan"))
