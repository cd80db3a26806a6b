"""Out-of-core selection and ranking (DuckDB, platform/selection.py) equal the in-memory reference
(select_top): the same subsets in the same rank order, ties, -0.0 and float-error budgets included."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from chips_core.platform.selection import unranked_dir, write_ranked_scores, write_subsets
from chips_core.platform.warehouse import Warehouse
from chips_core.scoring.score import METHODS
from chips_core.stages.materialize import subsets_table
from chips_core.stages.score import scores_table, unranked_table

BUDGETS = [0.1, 0.3, 0.25]


def _scores(n: int, seed: int) -> tuple[list[str], dict]:
    rng = np.random.default_rng(seed)
    ids = [f"p{rng.integers(1e9):09d}-{i}" for i in range(n)]
    scores = {m: rng.normal(size=n) for m in METHODS}
    scores["chips"][: n // 3] = 0.5  # a block of ties, broken by pair id
    scores["chips"][n // 3: n // 3 + 4] = [0.0, -0.0, 0.0, -0.0]  # signed zeros tie too
    scores["clipscore"] = np.round(scores["clipscore"], 1)  # many ties
    scores["random"] = np.full(n, 0.25)  # all tied: pair-id order
    scores.update(w_learn=rng.random(n), w_relevance=rng.random(n))
    return ids, scores


def _write_unranked(wh: Warehouse, ids, scores, run_id: str, parts: int) -> None:
    import io

    import pyarrow.parquet as pq
    bounds = np.linspace(0, len(ids), parts + 1).astype(int)
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        buf = io.BytesIO()
        pq.write_table(unranked_table(ids[a:b], {m: v[a:b] for m, v in scores.items()}, run_id), buf)
        wh.write_bytes(f"{unranked_dir(wh, run_id)}/shard-{k:05d}.parquet", buf.getvalue())


def test_unranked_table_takes_a_stored_id_column_as_it_is():
    ids, scores = _scores(50, 1)
    want = unranked_table(ids, scores, "score-1")
    assert unranked_table(pa.array(ids, pa.string()), scores, "score-1").equals(want)
    assert want.column("run_id").to_pylist() == ["score-1"] * 50 and want.column("pair_id").to_pylist() == ids


@pytest.mark.parametrize("n,parts,budgets", [(10, 1, BUDGETS), (97, 3, BUDGETS + [1.0]), (1000, 7, BUDGETS)])
def test_ranked_scores_and_subsets_equal_the_in_memory_reference(tmp_path, n, parts, budgets):
    wh = Warehouse(str(tmp_path / "wh"))
    ids, scores = _scores(n, n)
    _write_unranked(wh, ids, scores, "score-1", parts)
    assert write_ranked_scores(wh, "score-1") == n
    assert not wh.fs.exists(unranked_dir(wh, "score-1"))
    got = wh.read("scores").drop_columns([c for c in wh.read("scores").column_names if c == "run"])
    want = scores_table(ids, scores, "score-1").sort_by("rank")
    assert got.column("rank").to_pylist() == list(range(1, n + 1))  # stored in rank order
    assert got.select(want.column_names).equals(want)

    out = write_subsets(wh, "score-1", list(METHODS), budgets, "mat-1", full=True)
    ref = subsets_table(ids, scores, budgets, list(METHODS), "mat-1", "score-1", full=True)
    assert out["scored"] == n and out["rows"] == ref.num_rows
    sub = wh.read("subsets", filter=pc.field("run_id") == "mat-1")
    key = [("subset_id", "ascending"), ("rank", "ascending")]
    assert sub.select(ref.column_names).sort_by(key).equals(ref.sort_by(key))
    assert sorted(out["subsets"]) == sorted(set(ref.column("subset_id").to_pylist()))


def test_nan_scores_are_refused_as_in_memory(tmp_path):
    wh = Warehouse(str(tmp_path / "wh"))
    ids, scores = _scores(20, 1)
    scores["dot"][3] = np.nan
    _write_unranked(wh, ids, scores, "score-1", 2)
    write_ranked_scores(wh, "score-1")
    with pytest.raises(ValueError, match=r"1 scores are NaN.*'dot'"):
        write_subsets(wh, "score-1", ["chips", "dot"], [0.5], "mat-1")


def test_duckdb_spill_directory_is_one_per_process_and_removed_at_exit(tmp_path):
    """Every stage connection and every user SQL connection of a process share one spill directory, and it
    is gone when the process exits (a directory per connection was once left behind in the temp folder)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, sys
        from chips_core.platform.query import spill_dir
        from chips_core.platform.selection import engine
        from chips_core.platform.warehouse import Warehouse
        wh = Warehouse({str(tmp_path / 'wh')!r})
        dirs = set()
        for _ in range(3):
            con = engine(wh)
            dirs.add(con.execute("select current_setting('temp_directory')").fetchone()[0])
            con.close()
        assert dirs == {{spill_dir()}}, dirs
        assert os.path.isdir(spill_dir())
        print(spill_dir())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    spill = out.stdout.strip().splitlines()[-1]
    assert "chips-duckdb-" in spill
    assert not os.path.exists(spill)


def test_spill_directory_of_a_killed_process_is_removed_by_the_next_one(tmp_path):
    """A process that dies without its exit handlers (``os._exit``, SIGKILL) leaves its spill directory, with
    whatever DuckDB had spilled; the next process that needs a spill directory removes it, not a live one's."""
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.run([sys.executable, "-c", "import os; from chips_core.platform.query import spill_dir; "
                             "d = spill_dir(); open(os.path.join(d, 'spilled.tmp'), 'wb').write(b'x' * 1000); "
                             "print(d, flush=True); os._exit(0)"], env=env, capture_output=True, text=True, check=True)
    stale = killed.stdout.strip().splitlines()[-1]
    assert os.path.isdir(stale)
    live = tmp_path / f"chips-duckdb-{os.getpid()}-keep"  # a live process's directory (this test's pid)
    live.mkdir()
    subprocess.run([sys.executable, "-c", "from chips_core.platform.query import spill_dir; spill_dir()"], env=env,
                   check=True)
    assert not os.path.exists(stale)
    assert live.is_dir()
