"""sql/: staging, marts, audits and lineage, fed given rows (in-memory DuckDB) and over a real warehouse."""
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from chips_core.platform.provenance import recorded_run
from chips_core.platform.query import ReadOnlyQueryError, connect, lineage, query, run_audits
from chips_core.platform.warehouse import SCHEMAS, Warehouse
from chips_core.scoring.score import METHODS
from chips_core.stages.materialize import subsets_table
from chips_core.stages.score import scores_table


def _pairs(ids, sources):
    rows = [{"pair_id": p, "source": s, "source_key": f"{s}#{p}", "caption": f"cap {p}", "image_uri": None,
             "image_sha256": "0" * 64, "width": 16, "height": 16, "image_format": "PNG", "image": b"",
             "ingest_run_id": "ingest-1"} for p, s in zip(ids, sources)]
    return pa.Table.from_pylist(rows, schema=SCHEMAS["pairs"])


def _scores(ids, run_id="score-1"):
    rng = np.random.default_rng(0)
    scores = {m: rng.normal(size=len(ids)) for m in (*METHODS, "w_learn", "w_relevance")}
    return scores, scores_table(ids, scores, run_id)


def test_marts_and_clean_audits_on_given_rows():
    ids = [f"p{i:02d}" for i in range(10)]
    sources = ["a"] * 6 + ["b"] * 4
    scores, st = _scores(ids)
    subs = subsets_table(ids, scores, [0.3, 0.5], ["chips", "random"], "mat-1", "score-1", full=True)
    full = subs.filter(pc.field("method") == "full")
    assert full.column("pair_id").to_pylist() == sorted(ids) and set(full.column("budget").to_pylist()) == {1.0}
    subs = subs.filter(pc.field("method") != "full")
    runs = pa.Table.from_pylist([{"run_id": "score-1", "stage": "score", "status": "succeeded"},
                                 {"run_id": "mat-1", "stage": "materialize", "status": "succeeded"}], schema=SCHEMAS["runs"])
    con = connect(tables={"pairs": _pairs(ids, sources), "scores": st, "subsets": subs, "runs": runs})
    sel = query(con, "select * from mart_selection_by_source where method = $m and budget = $b order by source",
                {"m": "chips", "b": 0.3}).to_pylist()
    assert [r["n_scored"] for r in sel] == [6, 4] and sum(r["n_selected"] for r in sel) == 3
    curves = query(con, "select method, budget, n_selected from mart_budget_curves order by method, budget").to_pylist()
    assert [(c["method"], c["budget"], c["n_selected"]) for c in curves] == [
        ("chips", 0.3, 3), ("chips", 0.5, 5), ("random", 0.3, 3), ("random", 0.5, 5)]
    summary = query(con, "select * from mart_score_summary where factor = 'chips'").to_pylist()[0]
    assert summary["n_pairs"] == 10 and summary["mean"] == pytest.approx(float(np.mean(scores["chips"])))
    assert all(t.num_rows == 0 for t in run_audits(con).values())


def test_audits_return_rows_when_something_is_wrong():
    ids = ["p1", "p2", "p3", "p4"]
    scores, st = _scores(ids, run_id="orphan-run")
    subs = subsets_table(ids, scores, [0.5], ["chips"], "mat-1", "orphan-run").slice(0, 1)  # 1 row, budget says 2
    pairs = pa.concat_tables([_pairs(ids, ["a"] * 4), _pairs(["p1"], ["b"])])  # duplicate pair id
    runs = pa.Table.from_pylist([{"run_id": "ingest-1", "stage": "ingest", "status": "succeeded", "rows_in": 10,
                                  "rows_out": 4, "rows_quarantined": 5, "rows_unchanged": 0},
                                 {"run_id": "mat-1", "stage": "materialize", "status": "succeeded"}], schema=SCHEMAS["runs"])
    audits = run_audits(connect(tables={"pairs": pairs, "scores": st, "subsets": subs, "runs": runs}))
    assert audits["duplicate_pair_ids"].column("pair_id").to_pylist() == ["p1"]
    assert audits["subset_size_off_budget"].column("expected").to_pylist() == [2]
    assert audits["scores_without_run"].column("run_id").to_pylist() == ["orphan-run"]
    assert audits["ingest_not_reconciled"].column("run_id").to_pylist() == ["ingest-1"]


def test_writes_are_refused():
    con = connect()
    for sql in ("create table x (a int)", "insert into raw_pairs select * from raw_pairs", "select 1; drop view stg_pairs",
                "copy (select 1) to '/tmp/x.csv'"):
        with pytest.raises(ReadOnlyQueryError):
            query(con, sql)
    assert query(con, "select count(*) as n from stg_pairs").column("n").to_pylist() == [0]


def test_lineage_of_a_subset_row_over_a_real_warehouse(tmp_path):
    wh = Warehouse(str(tmp_path / "wh"))
    ids = ["p1", "p2", "p3"]
    wh.write("pairs", _pairs(ids, ["a", "a", "b"]), {"run": "ingest-1"}, "s0")
    wh.write("pair_sources", pa.Table.from_pylist(
        [{"pair_id": p, "source": s, "source_key": f"{s}#{p}", "ingest_run_id": "ingest-1"}
         for p, s in [("p1", "a"), ("p2", "a"), ("p3", "b"), ("p1", "b")]], schema=SCHEMAS["pair_sources"]),
        {"run": "ingest-1"}, "s0")
    with recorded_run(wh, "ingest", {"sources": ["a", "b"]}, run_id="ingest-1", inputs={"a": "sha-a"}) as r:
        r.update(rows_in=4, rows_out=3, rows_quarantined=1, rows_unchanged=0)
    wh.write("quarantine", pa.Table.from_pylist([{"source": "b", "source_key": "b#p1", "reason": "duplicate",
                                                  "detail": "", "run_id": "ingest-1"}], schema=SCHEMAS["quarantine"]),
             {"run": "ingest-1"}, "s0")
    scores, st = _scores(ids)
    with recorded_run(wh, "score", {"alpha": 0.7}, run_id="score-1", model_checksum="abc", sketch_k=512):
        wh.write("scores", st, {"run": "score-1"}, "s0")
    with recorded_run(wh, "materialize", {}, run_id="mat-1"):
        wh.write("subsets", subsets_table(ids, scores, [1.0], ["chips"], "mat-1", "score-1"), {"run": "mat-1"}, "s0")
    con = connect(wh)
    rows = lineage(con, "score-1:chips@1", "p1").to_pylist()
    assert [(r["source"], r["source_key"]) for r in rows] == [("a", "a#p1"), ("b", "b#p1")]
    assert rows[0]["model_checksum"] == "abc" and '"alpha": 0.7' in rows[0]["score_config"]
    assert rows[0]["ingest_inputs"] == '{"a": "sha-a"}'
    assert all(t.num_rows == 0 for t in run_audits(con).values())
    with pytest.raises(ValueError):
        with recorded_run(wh, "score", {}, run_id="score-bad"):
            raise ValueError("boom")
    status = query(connect(wh), "select status from stg_runs where run_id = 'score-bad'").column("status").to_pylist()
    assert status == ["failed: ValueError: boom"]


def _every_view(con) -> list[str]:
    return [r[0] for r in con.sql("select view_name from duckdb_views() where not internal order by 1").fetchall()]


def test_connection_is_confined_to_the_warehouse(tmp_path):
    """Files outside the warehouse cannot be read or listed, in a query or through a view's variable."""
    wh = Warehouse(str(tmp_path / "wh"))
    wh.write("pairs", _pairs(["p1", "p2"], ["a", "b"]), {"run": "ingest-1"}, "s0")
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n")
    con = connect(wh)
    assert query(con, "select count(*) as n from stg_pairs").column("n").to_pylist() == [2]
    for sql in ("select * from read_csv('/etc/passwd', header=false, sep=':')", "select * from glob('/etc/*')",
                f"select * from read_blob('{tmp_path}/**')", f"select * from read_csv('{tmp_path}/secret.csv')",
                f"select * from read_csv('{wh.root}/../secret.csv')"):
        with pytest.raises(duckdb.PermissionException):
            query(con, sql)
    assert query(con, f"select count(*) as n from glob('{wh.root}/pairs/**/*.parquet')").column("n").to_pylist() == [1]
    views = _every_view(con)
    assert len(views) >= 10
    for view in views:  # every sql/ view (staging, marts, audits) still reads under the confinement
        query(con, f"select * from {view} limit 1")


def test_no_network_and_no_extension_install(tmp_path, monkeypatch):
    """An http URL is refused before any request is made, and nothing is written under ~/.duckdb."""
    import http.server
    import threading

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"a\n1\n")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        con = connect(Warehouse(str(tmp_path / "wh")))
        with pytest.raises(duckdb.PermissionException):
            query(con, f"select * from read_csv('http://127.0.0.1:{server.server_port}/x.csv')")
    finally:
        server.shutdown()
    assert hits == []
    assert not (tmp_path / "home" / ".duckdb").exists()


@pytest.mark.parametrize("statement", [
    "set enable_external_access = true", "reset enable_external_access", "pragma enable_external_access = true",
    "set allowed_directories = ['/']", "set lock_configuration = false", "set autoinstall_known_extensions = true",
    "set autoload_known_extensions = true", "reset allowed_directories"])
def test_the_lock_cannot_be_undone(tmp_path, statement):
    con = connect(Warehouse(str(tmp_path / "wh")))
    with pytest.raises(ReadOnlyQueryError):  # query() takes one SELECT only
        query(con, statement)
    with pytest.raises(duckdb.InvalidInputException, match="Cannot change configuration"):  # nor does the raw connection
        con.execute(statement)
    with pytest.raises(duckdb.PermissionException):
        query(con, "select * from read_csv('/etc/passwd', header=false, sep=':')")


@pytest.mark.parametrize("statement", ["set memory_limit = '100GB'", "set max_temp_directory_size = '1TB'",
                                       "reset memory_limit", "set threads = 64"])
def test_the_limits_are_set_and_locked(tmp_path, statement):
    from chips_core.platform.query import SqlLimits

    con = connect(Warehouse(str(tmp_path / "wh")), limits=SqlLimits(memory_limit="300MiB", max_temp="1GiB"))
    got = con.execute("select current_setting('memory_limit'), current_setting('max_temp_directory_size')").fetchall()
    assert got == [("300.0 MiB", "1.0 GiB")]
    with pytest.raises(duckdb.InvalidInputException, match="Cannot change configuration"):
        con.execute(statement)


def test_a_huge_result_is_streamed_to_the_row_cap_and_a_slow_query_is_interrupted(tmp_path):
    """The issue's query (200M rows) returns its first rows at once, the rest never computed; a query past its time
    limit is interrupted with a named error."""
    import time

    from chips_core.platform.query import QueryLimitError, SqlLimits, query_rows

    con = connect(Warehouse(str(tmp_path / "wh")), limits=SqlLimits(timeout_s=3))
    t0 = time.perf_counter()
    table, more = query_rows(con, "select range, repeat('x', 50) s from range(200000000)", max_rows=50)
    assert table.num_rows == 50 and more and table.column("range").to_pylist() == list(range(50))
    assert query_rows(con, "select * from range(10)", max_rows=50) [1] is False
    with pytest.raises(QueryLimitError, match="time limit of 3 s"):
        query(con, "select sum(range) from range(20000000000)")
    assert time.perf_counter() - t0 < 60
    with pytest.raises(ValueError, match="max_rows=-1"):
        query_rows(con, "select 1", max_rows=-1)


def _chips(*args, timeout=300):
    import resource
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("chips")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    return p, (peak_mib if resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss > before else None)


@pytest.mark.slow
def test_chips_sql_holds_memory_flat_and_says_what_it_left_out(tmp_path):
    from chips_core.platform.provenance import recorded_run

    wh = Warehouse(str(tmp_path / "wh"))
    with recorded_run(wh, "ingest"):  # a warehouse: it has a runs table
        wh.write("pairs", _pairs(["p1"], ["a"]), {"run": "ingest-1"}, "s0")
    p, peak = _chips("sql", "-w", str(tmp_path / "wh"), "select range, repeat('x',50) s from range(200000000)",
                     "--limit", "5")
    assert p.returncode == 0, p.stderr
    assert "the first 5 rows; the query has more" in p.stderr and p.stdout.count("x" * 50) == 5
    assert peak is None or peak < 1.2 * 1024, peak  # MiB (None: an earlier child of this process peaked higher)
    p, _ = _chips("sql", "-w", str(tmp_path / "wh"), "select sum(range) from range(20000000000)", "--timeout", "2")
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "time limit of 2 s" in p.stderr
    p, _ = _chips("sql", "-w", str(tmp_path / "wh"), "select 1", "--limit", "-1")
    assert p.returncode == 1 and p.stderr.strip() == "chips: error: --limit -1: must be >= 0"
